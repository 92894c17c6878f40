"""Gradient-norm sensitivity, ILA and the top_k / threshold / elbow selection rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from spon_toolkit.allocation import AllocationContext, allocate
from spon_toolkit.errors import ConfigError
from spon_toolkit.importance import compute_importance
from spon_toolkit.importance.learned import LayerScales, gradient_norm, ila, select_layers
from spon_toolkit.plugins import Toolkit
from spon_toolkit.sites import SiteMap
from spon_toolkit.testing.tiny import make_tiny_llama


def _blocks(n=4, t=16, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n, t), generator=g)]


def test_ila_at_initialisation_leaves_logits_unchanged(tiny_model, tiny_ids):
    with torch.no_grad():
        before = tiny_model(input_ids=tiny_ids).logits
        sitemap = SiteMap(tiny_model, Toolkit().architectures)
        with LayerScales(sitemap) as scales:
            assert torch.equal(scales.scales(), torch.ones(sitemap.n_layers))
            during = tiny_model(input_ids=tiny_ids).logits
            scales.logits.fill_(-30.0)  # scale ~0: every layer skipped
            skipped = tiny_model(input_ids=tiny_ids).logits
        after = tiny_model(input_ids=tiny_ids).logits
    assert torch.allclose(before, during, atol=1e-5)
    assert torch.equal(before, after)  # hooks removed
    assert not torch.allclose(before, skipped, atol=1e-2)


def test_ila_learns_and_restores_the_model(tiny_model):
    flags = [p.requires_grad for p in tiny_model.parameters()]
    res = ila(tiny_model, _blocks(), steps=5, learning_rate=0.1, batch_size=2, progress=False)
    assert res.method == "ila" and len(res.scores) == 2
    assert all(0.0 < v < 2.0 for v in res.scores.values())
    assert any(abs(v - 1.0) > 1e-3 for v in res.scores.values())  # the scales moved
    assert [p.requires_grad for p in tiny_model.parameters()] == flags
    again = ila(tiny_model, _blocks(), steps=5, learning_rate=0.1, batch_size=2, progress=False)
    assert again.scores == res.scores  # seeded
    with pytest.raises(ConfigError, match="ILA steps"):
        ila(tiny_model, _blocks(), steps=0)


def test_gradient_norm_is_the_norm_of_the_loss_gradient_at_each_layer_output(tiny_model):
    ids = _blocks(n=2)[0]
    res = gradient_norm(tiny_model, [ids], batch_size=2, progress=False)
    # reference: retain_grad on the decoder layers' outputs
    outs = []
    handles = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
               for layer in tiny_model.model.layers]
    emb = tiny_model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.requires_grad_(True))
    logits = tiny_model(input_ids=ids).logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    grads = torch.autograd.grad(loss, outs)
    for h in [*handles, emb]:
        h.remove()
    tiny_model.zero_grad(set_to_none=True)
    want = [float(g.norm()) for g in grads]
    assert [res.scores[f"layers.{i}"] for i in range(2)] == pytest.approx(want, rel=1e-5)
    assert all(p.grad is None for p in tiny_model.parameters())


def test_plugins_run_through_compute_importance(tmp_path, tiny_model):
    toolkit = Toolkit()
    for method in ("gradient_norm", "ila"):
        opts = {"steps": 2} if method == "ila" else {}
        res = compute_importance(method, tiny_model, _blocks(), None, None, toolkit=toolkit, cache_dir=tmp_path,
                                 **opts)
        assert set(res.scores) == {"layers.0", "layers.1"}


def test_selection_rules():
    scores = {0: 5.0, 1: 4.8, 2: 1.0, 3: 0.9, 4: 0.5}
    assert select_layers(scores, "elbow") == [0, 1]
    assert select_layers(scores, "top_k", k=3) == [0, 1, 2]
    assert select_layers(scores, "top_k", fraction=0.5) == [0, 1, 2]  # 2.5 rounds half up
    assert select_layers(scores, "threshold", threshold=0.95) == [0, 1, 2]
    with pytest.raises(ConfigError, match="selection rule"):
        select_layers(scores, "knee")


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40))
def test_elbow_takes_a_prefix_of_the_ranking_ending_at_the_largest_drop(values):
    scores = dict(enumerate(values))
    chosen = select_layers(scores, "elbow")
    assert chosen
    rest = [v for i, v in scores.items() if i not in chosen]
    if rest:
        low, high = min(scores[i] for i in chosen), max(rest)
        assert low >= high
        ordered = sorted(values, reverse=True)
        gaps = [a - b for a, b in zip(ordered, ordered[1:], strict=False)]
        assert low - high == max(gaps)


def test_importance_select_allocation():
    model = make_tiny_llama(seed=0, num_layers=4)
    toolkit = Toolkit()
    ctx = AllocationContext.from_model(model, "down_proj", importance={"gradient_norm": {
        "layers.0": 3.0, "layers.1": 2.9, "layers.2": 0.2, "layers.3": 0.1}}, sitemap=SiteMap(model, toolkit.architectures))
    plan = allocate(toolkit, "IMPORTANCE-SELECT", ctx)
    assert sorted(plan.biased_sites) == ["layers.0.down_proj", "layers.1.down_proj"]
    plan = allocate(toolkit, "IMPORTANCE-SELECT", ctx, rule="top_k", k=3)
    assert len(plan.biased_sites) == 3
