"""The SPON training loop on tiny random Llama models: what trains, determinism, budgets, errors, seed API."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from spon_toolkit import MagnitudeSparsifier, SparseModel, SponBiases
from spon_toolkit.errors import ConfigError, UnknownNameError
from spon_toolkit.losses import kl_divergence
from spon_toolkit.plugins import Toolkit
from spon_toolkit.testing.tiny import make_tiny_llama
from spon_toolkit.train import (
    KLTrainer,
    SPONConfig,
    SPONTrainer,
    TrainingArgs,
    TrainingDivergedError,
    lr_factor,
    split_head,
)


def _batches(n=3, b=2, t=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (b, t), generator=g) for _ in range(n)]


def _offset_model():
    """A tiny random Llama whose down_proj inputs have a large positive mean (MLP biases on gate/up).

    Random weights alone give zero-mean activations, where a constant bias has nothing to win back; real
    LLMs have the non-zero-mean activations SPON relies on, which this mimics.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         mlp_bias=True, initializer_range=0.1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.bias.fill_(2.0)
            layer.mlp.up_proj.bias.fill_(1.0)
    return model


def _sparse(model, sparsity=0.7, bias_sites="down_proj"):
    biases = SponBiases(model, bias_sites)
    return SparseModel(model, MagnitudeSparsifier(sparsity), "down_proj", biases=biases)


@torch.no_grad()
def _kl(sm, ids):
    with sm.dense():
        dense = sm.model(input_ids=ids).logits
    return float(kl_divergence(dense, sm.model(input_ids=ids).logits))


def test_split_head_is_exact(tiny_model, tiny_ids):
    split = split_head(tiny_model)
    with torch.no_grad():
        assert torch.equal(split.head(split.body(tiny_ids)), tiny_model(input_ids=tiny_ids).logits)


def test_only_spon_biases_train_and_kl_drops_on_heldout():
    model = _offset_model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    heldout = _batches(1, b=4, t=32, seed=99)[0]
    with _sparse(model) as sm:
        before = _kl(sm, heldout)
        seen_grad = []
        orig = KLTrainer.student_loss

        class Probe(KLTrainer):
            def student_loss(self, sm_, ids, targets):
                seen_grad.append({k for k, p in model.named_parameters() if p.requires_grad})
                return orig(self, sm_, ids, targets)

        result = Probe(learning_rate=3e-2, epochs=10, progress=False).train(sm, _batches())
        after = _kl(sm, heldout)
    assert seen_grad and all(not s for s in seen_grad)  # no model weight requires grad while training
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags  # restored
    assert after < 0.8 * before
    assert result.training_loss[-1] < result.training_loss[0]
    assert result.steps == 30 and result.tokens == 30 * 32 and result.teacher_cached


def test_deterministic_and_metrics_csv(tmp_path):
    def run(path):
        model = make_tiny_llama(seed=0)
        with _sparse(model) as sm:
            res = KLTrainer(learning_rate=5e-3, epochs=2, logging_steps=2, metrics_csv=str(path), seed=3,
                            progress=False).train(sm, _batches())
            return {s: t.clone() for s, t in sm.biases.tensors().items()}, res

    b1, r1 = run(tmp_path / "a.csv")
    b2, r2 = run(tmp_path / "b.csv")
    assert all(torch.equal(b1[s], b2[s]) for s in b1)
    assert any(float(t.abs().max()) > 0 for t in b1.values())
    assert [m["loss"] for m in r1.metrics] == [m["loss"] for m in r2.metrics]
    rows = list(csv.DictReader(open(tmp_path / "a.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert set(rows[0]) == {"step", "epoch", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
    assert all(float(r["tokens_per_s"]) > 0 and float(r["grad_norm"]) > 0 for r in rows)


def test_token_budget_and_schedule():
    model = make_tiny_llama(seed=0)
    with _sparse(model) as sm:
        res = KLTrainer(max_tokens=200, epochs=None, logging_steps=1, warmup_steps=2, progress=False).train(
            sm, _batches(n=2))
    assert res.steps == 7 and res.tokens == 224  # ceil(200 / 32) steps of 32 tokens
    lrs = [m["lr"] for m in res.metrics]
    assert lrs[0] < lrs[1] < lrs[2] and lrs[-1] < lrs[2]
    assert lr_factor(0, 10, 0, "constant", 0.0) == 1.0
    assert lr_factor(9, 10, 0, "linear", 0.0) == pytest.approx(0.1)
    assert lr_factor(5, 10, 0, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_closed_form_init_is_the_mean_removed_contribution():
    model = make_tiny_llama(seed=0)
    batches = _batches()
    ref = SponBiases(model, "down_proj")
    ref.init_closed_form(model, MagnitudeSparsifier(0.7), batches)
    with _sparse(model) as sm:
        # lr so small that one step leaves the initial values in place
        KLTrainer(init="closed_form", learning_rate=1e-12, epochs=1, progress=False).train(sm, batches[:1],
                                                                                             calibration_batches=batches)
        got = sm.biases.tensors()
    for site, t in ref.tensors().items():
        assert torch.allclose(got[site], t, atol=1e-8)
        assert float(t.abs().max()) > 0


def test_non_finite_loss_stops_and_keeps_last_good_biases():
    model = make_tiny_llama(seed=0)
    snapshots = []

    class Breaks(KLTrainer):
        calls = 0

        def student_loss(self, sm, ids, targets):
            Breaks.calls += 1
            snapshots.append({s: t.clone() for s, t in sm.biases.tensors().items()})
            loss = super().student_loss(sm, ids, targets)
            return loss * float("nan") if Breaks.calls == 4 else loss

    with _sparse(model) as sm:
        with pytest.raises(TrainingDivergedError, match="step 4"):
            Breaks(learning_rate=1e-2, epochs=3, progress=False).train(sm, _batches())
        final = sm.biases.tensors()
    # the biases that produced the last finite loss (step 3's inputs) are kept
    assert all(torch.equal(final[s], snapshots[2][s]) for s in final)
    assert not all(torch.equal(final[s], snapshots[3][s]) for s in final)


@pytest.mark.parametrize("options, match", [
    ({"learning_rate": 0.0}, "learning rate"),
    ({"learning_rate": -1e-3}, "learning rate"),
    ({"learning_rate": float("nan")}, "learning rate"),
    ({"epochs": 0}, "epochs"),
    ({"schedule": "step"}, "schedule"),
    ({"init": "random"}, "init"),
    ({"lr": 1e-3}, "unknown trainer option"),
])
def test_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        KLTrainer(**options)


def test_empty_site_set_and_no_batches():
    model = make_tiny_llama(seed=0)
    with SparseModel(model, MagnitudeSparsifier(0.5), "down_proj") as sm:
        with pytest.raises(ConfigError, match="no sites carry a SPON bias"):
            KLTrainer(progress=False).train(sm, _batches())
    with _sparse(model) as sm:
        with pytest.raises(ConfigError, match="no training batches"):
            KLTrainer(progress=False).train(sm, [])


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "js", "hidden_mse"])
def test_trainer_plugins_reduce_their_loss(spon_toolkit_fresh, name):
    trainer = spon_toolkit_fresh.trainers.get(name)(learning_rate=3e-2, epochs=6, logging_steps=6,
                                                     progress=False)
    model = _offset_model()
    heldout = _batches(1, b=4, t=32, seed=5)[0]
    with _sparse(model) as sm:
        before = _kl(sm, heldout)
        res = trainer.train(sm, _batches())
        after = _kl(sm, heldout)
    assert res.objective == name
    assert res.training_loss[-1] < res.training_loss[0]
    assert after < before  # every objective also brings the distributions closer


def test_builtin_trainers_registered(spon_toolkit_fresh: Toolkit):
    assert {"kl", "reverse_kl", "js", "hidden_mse"} <= set(spon_toolkit_fresh.trainers.names())
    assert spon_toolkit_fresh.trainers.entry("kl").plugin == "spon.trainers"


def test_seed_api(tiny_ids):
    from spon_toolkit import register_sparsification_hooks, remove_hooks

    model = make_tiny_llama(seed=0)
    with torch.no_grad():
        dense = model(input_ids=tiny_ids).logits
    config = SPONConfig(name="all", layer_mask=[0, 1], modules=["down_proj"])
    args = TrainingArgs(epochs=5, learning_rate=1e-2, batch_size=2, block_size=16, device="cpu", progress=False)
    trainer = SPONTrainer(model, config, 0.7, args)
    assert sum(p.numel() for p in trainer.spon_params) == 2 * 64
    loader = [{"input_ids": b} for b in _batches()]
    metrics = trainer.train(loader)
    assert {"final_loss", "training_loss"} <= set(metrics) and metrics["final_loss"] > 0
    biases = trainer.get_spon_biases()
    assert sorted(biases) == ["layer_0_down_proj", "layer_1_down_proj"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=tiny_ids).logits, dense)  # hooks removed after training
        hooks = register_sparsification_hooks(model, 0.7, ["down_proj"], spon_biases=biases)
        seed_logits = model(input_ids=tiny_ids).logits
        remove_hooks(hooks)
        with SparseModel(model, MagnitudeSparsifier(0.7), "down_proj", biases=trainer.biases) as sm:
            ours = sm(input_ids=tiny_ids).logits
    assert torch.allclose(seed_logits, ours, atol=1e-6)
    assert not torch.allclose(seed_logits, dense)
    # the seed's evaluation call takes the dict as returned
    from spon_toolkit import compute_perplexity

    with_dict = compute_perplexity(model, loader, "cpu", use_sparse=True, sparsity=0.7, spon_biases=biases)
    with_obj = compute_perplexity(model, loader, "cpu", use_sparse=True, sparsity=0.7, spon_biases=trainer.biases)
    without = compute_perplexity(model, loader, "cpu", use_sparse=True, sparsity=0.7)
    assert with_dict.perplexity == pytest.approx(with_obj.perplexity, rel=1e-6)
    assert with_dict.perplexity != without.perplexity


def test_seed_api_rejects_bad_args():
    model = make_tiny_llama(seed=0)
    with pytest.raises(ConfigError, match="learning rate"):
        SPONTrainer(model, SPONConfig("x", [0]), 0.5, TrainingArgs(learning_rate=0))
    with pytest.raises(UnknownNameError, match="trainer 'cross_entropy'"):
        SPONTrainer(model, SPONConfig("x", [0]), 0.5, TrainingArgs(distillation_loss="cross_entropy"))
    trainer = SPONTrainer(model, SPONConfig("none", []), 0.5, TrainingArgs(progress=False))
    with pytest.raises(ConfigError, match="no sites carry"):
        trainer.train(_batches())
