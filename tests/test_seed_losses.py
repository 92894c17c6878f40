"""The seed repository's training options: ce / soft_ce / kl+logit_l2 losses, temperature, gradient accumulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_train import _offset_model  # tiny Llama with non-zero-mean down_proj inputs

from spon_toolkit import MagnitudeSparsifier, SparseModel, SponBiases
from spon_toolkit.errors import ConfigError
from spon_toolkit.losses import chunked_cross_entropy, chunked_divergence, kl_logit_l2_rows
from spon_toolkit.train import CETrainer, KLLogitL2Trainer, KLTrainer, SoftCETrainer, TrainingArgs


def _batches(n=3, b=2, t=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (b, t), generator=g) for _ in range(n)]


def _sm(model, sparsity=0.7):
    return SparseModel(model, MagnitudeSparsifier(sparsity), "down_proj", biases=SponBiases(model, "down_proj"))


def _train(trainer, batches, model=None):
    model = model or _offset_model()
    with _sm(model) as sm:
        result = trainer.train(sm, batches)
        biases = {k: v.detach().clone() for k, v in sm.biases.params.items()}
    return result, biases


@torch.no_grad()
def _lm_loss(sm, batches):
    total, n = 0.0, 0
    for ids in batches:
        logits = sm.model(input_ids=ids).logits[:, :-1]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        n += ids[:, 1:].numel()
    return total / n


def test_ce_lowers_the_lm_loss():
    model = _offset_model()
    batches = _batches()
    with _sm(model) as sm:
        before = _lm_loss(sm, batches)
        res = CETrainer(learning_rate=3e-2, epochs=6, init="zeros", logging_steps=3, progress=False).train(sm, batches)
        after = _lm_loss(sm, batches)
    assert res.objective == "ce"
    assert after < before - 1e-3
    assert res.training_loss[-1] < res.training_loss[0]


def test_ce_loss_is_the_next_token_nll():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 11, generator=g)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    want = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1))
    got = chunked_cross_entropy(labels, logits, chunk_size=3)
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ConfigError, match="temperature must be 1"):
        CETrainer(temperature=2.0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_logit_l2_matches_the_seed_formula(temperature):
    g = torch.Generator().manual_seed(4)
    teacher, student = torch.randn(10, 13, generator=g), torch.randn(10, 13, generator=g)
    w = 0.3
    p = F.softmax(teacher / temperature, -1)
    log_q = F.log_softmax(student / temperature, -1)
    want = F.kl_div(log_q, p, reduction="batchmean") * temperature**2 + w * F.mse_loss(student, teacher)
    got = chunked_divergence(teacher, student, divergence=kl_logit_l2_rows(w), chunk_size=4,
                             temperature=temperature)
    assert torch.allclose(got, want, atol=1e-5)
    soft = chunked_divergence(teacher, student, divergence="soft_ce", temperature=temperature)
    seed_ce = -(p * log_q).sum(-1).mean() * temperature**2
    assert torch.allclose(soft, seed_ce, atol=1e-5)


def test_kl_logit_l2_with_weight_zero_is_kl():
    opts = dict(learning_rate=2e-2, epochs=3, temperature=1.5, progress=False)
    r_kl, b_kl = _train(KLTrainer(**opts), _batches())
    r_l2, b_l2 = _train(KLLogitL2Trainer(logit_l2_weight=0.0, **opts), _batches())
    assert r_l2.training_loss == pytest.approx(r_kl.training_loss, rel=1e-6)
    for k in b_kl:
        assert torch.allclose(b_kl[k], b_l2[k], atol=1e-7)
    r_w, b_w = _train(KLLogitL2Trainer(logit_l2_weight=1.0, **opts), _batches())
    assert r_w.training_loss[0] > r_kl.training_loss[0]  # the L2 term counts
    with pytest.raises(ConfigError, match="logit_l2_weight must be"):
        KLLogitL2Trainer(logit_l2_weight=-1.0)
    with pytest.raises(ConfigError, match="unknown trainer option"):
        KLTrainer(logit_l2_weight=1.0)


def test_soft_ce_trains_like_kl_and_reports_kl_plus_entropy():
    opts = dict(learning_rate=2e-2, epochs=2, progress=False, shuffle=False)
    r_kl, b_kl = _train(KLTrainer(**opts), _batches())
    r_ce, b_ce = _train(SoftCETrainer(**opts), _batches())
    for k in b_kl:
        assert torch.allclose(b_kl[k], b_ce[k], atol=1e-5)
    assert r_ce.mean_loss > r_kl.mean_loss + 1.0  # teacher entropy of a 256-token vocabulary is several nats


@pytest.mark.parametrize("epochs", [1, 3])
def test_gradient_accumulation_equals_the_joined_batch(epochs):
    big = _batches(n=1, b=8, t=16, seed=7)
    small = list(big[0].split(2))  # 4 x 2 rows, the same tokens
    opts = dict(learning_rate=1e-2, epochs=epochs, shuffle=False, progress=False, warmup_steps=0)
    r_big, b_big = _train(KLTrainer(**opts), big)
    r_acc, b_acc = _train(KLTrainer(gradient_accumulation_steps=4, **opts), small)
    assert r_acc.steps == r_big.steps == epochs
    assert r_acc.tokens == r_big.tokens
    assert r_acc.mean_loss == pytest.approx(r_big.mean_loss, rel=1e-5)
    for k in b_big:
        assert torch.allclose(b_big[k], b_acc[k], atol=1e-6, rtol=1e-5)
    # without accumulation the same 4 batches take 4 steps and end elsewhere
    r_4, b_4 = _train(KLTrainer(**opts), small)
    assert r_4.steps == 4 * epochs
    assert any(not torch.allclose(b_big[k], b_4[k], atol=1e-6) for k in b_big)


def test_accumulation_groups_keep_every_batch():
    groups = KLTrainer._groups(micro_steps=10, n=5, accumulate=2)
    assert [len(g) for _, g in groups] == [2, 2, 1, 2, 2, 1]  # an epoch's remainder is its own step
    assert [pos for _, g in groups for _, pos in g] == [0, 1, 2, 3, 4] * 2
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        KLTrainer(gradient_accumulation_steps=0)


def test_training_args_speak_the_seed_vocabulary():
    assert TrainingArgs(distillation_loss="ce").trainer_name() == "soft_ce"
    assert TrainingArgs(distillation_loss="KL").trainer_name() == "kl"
    args = TrainingArgs(distillation_loss="kl+logit_l2", logit_l2_weight=0.5, kl_temperature=2.0,
                        gradient_accumulation_steps=4)
    opts = args.trainer_options()
    assert args.trainer_name() == "kl+logit_l2"
    assert (opts["logit_l2_weight"], opts["temperature"], opts["gradient_accumulation_steps"]) == (0.5, 2.0, 4)
    with pytest.raises(ConfigError, match="only applies to distillation_loss='kl\\+logit_l2'"):
        TrainingArgs(logit_l2_weight=0.5).trainer_options()
