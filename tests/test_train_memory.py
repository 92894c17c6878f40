"""Memory options of the training loop: micro-batches and activation checkpointing give the gradient of
the whole batch (so the same biases), and the model is given back unchanged."""

from __future__ import annotations

import pytest
import torch
from test_seed_losses import _batches, _train

from spon_toolkit.errors import ConfigError
from spon_toolkit.train import HiddenMSETrainer, KLTrainer
from spon_toolkit.train.surgery import checkpointed_layers

OPTS = dict(learning_rate=1e-2, epochs=2, shuffle=False, progress=False, warmup_steps=0)


@pytest.mark.parametrize("trainer", [KLTrainer, HiddenMSETrainer])
@pytest.mark.parametrize("memory", [{}, {"micro_batch_size": 1}, {"micro_batch_size": 3},
                                    {"activation_checkpointing": True},
                                    {"activation_checkpointing": True, "micro_batch_size": 2}])
def test_memory_options_give_the_biases_of_whole_batches(trainer, memory):
    if trainer is HiddenMSETrainer and memory.get("micro_batch_size"):
        with pytest.raises(ConfigError, match="micro-batches would change the loss"):
            trainer(**OPTS, **memory)
        return
    batches = _batches(n=2, b=4, t=16, seed=3)
    r_ref, b_ref = _train(trainer(**OPTS, micro_batch_size=None), batches)  # whole batches
    r_mem, b_mem = _train(trainer(**OPTS, **memory), batches)
    assert r_mem.steps == r_ref.steps and r_mem.tokens == r_ref.tokens
    assert r_mem.mean_loss == pytest.approx(r_ref.mean_loss, rel=1e-5)
    moved = max(float((b_ref[k]).abs().max()) for k in b_ref)
    assert moved > 1e-3  # the comparison is between trained biases, not two untouched zeros
    for k in b_ref:
        torch.testing.assert_close(b_mem[k], b_ref[k], atol=1e-6, rtol=1e-5)


def test_checkpointing_leaves_the_layers_as_they_were_also_on_errors():
    from spon_toolkit.testing.tiny import make_tiny_llama

    model = make_tiny_llama(seed=0)
    layers = list(model.model.layers)
    with checkpointed_layers(layers):
        assert all("forward" in vars(layer) for layer in layers)
    assert not any("forward" in vars(layer) for layer in layers)
    with pytest.raises(ValueError), checkpointed_layers(layers):
        raise ValueError("boom")
    assert not any("forward" in vars(layer) for layer in layers)


def test_bad_micro_batch_size_is_one_line():
    with pytest.raises(ConfigError, match="micro_batch_size must be >= 1"):
        KLTrainer(micro_batch_size=0)
