"""Properties of the distillation losses (hypothesis) and agreement with a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spon_toolkit.errors import ConfigError, UnknownNameError
from spon_toolkit.losses import (
    chunked_divergence,
    hidden_mse,
    js_divergence,
    kl_divergence,
    reverse_kl_divergence,
)

DIVS = ["kl", "reverse_kl", "js"]


def _logits(seed: int, n: int, v: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64).float() * scale


shapes = st.tuples(st.integers(1, 40), st.integers(2, 50))


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 10_000), st.floats(0.1, 20.0), st.sampled_from(DIVS))
def test_divergence_nonnegative(shape, seed, scale, div):
    n, v = shape
    t, s = _logits(seed, n, v, scale), _logits(seed + 1, n, v, scale)
    assert float(chunked_divergence(t, s, divergence=div, chunk_size=7)) >= -1e-6


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 10_000), st.floats(0.1, 20.0), st.sampled_from(DIVS), st.floats(-5, 5))
def test_divergence_zero_for_equal_distributions(shape, seed, scale, div, shift):
    n, v = shape
    t = _logits(seed, n, v, scale)
    # A constant shift of the logits is the same distribution.
    assert abs(float(chunked_divergence(t, t + shift, divergence=div, chunk_size=5))) < 1e-5


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 10_000), st.integers(1, 64), st.sampled_from(DIVS), st.floats(0.5, 3.0))
def test_chunked_equals_unchunked_value_and_gradient(shape, seed, chunk, div, temperature):
    n, v = shape
    t = _logits(seed, n, v, 3.0)
    s1 = _logits(seed + 7, n, v, 3.0).requires_grad_(True)
    s2 = s1.detach().clone().requires_grad_(True)
    a = chunked_divergence(t, s1, divergence=div, chunk_size=chunk, temperature=temperature)
    b = chunked_divergence(t, s2, divergence=div, chunk_size=None, temperature=temperature)
    a.backward()
    b.backward()
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-7)


def test_kl_matches_torch_reference_and_autograd():
    t = _logits(0, 24, 30, 2.0).reshape(2, 12, 30)
    s = _logits(1, 24, 30, 2.0).reshape(2, 12, 30).requires_grad_(True)
    ours = kl_divergence(t, s, chunk_size=5)
    ours.backward()
    s_ref = s.detach().clone().requires_grad_(True)
    ref = F.kl_div(F.log_softmax(s_ref.reshape(-1, 30), -1), F.log_softmax(t.reshape(-1, 30), -1),
                   log_target=True, reduction="batchmean")
    ref.backward()
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(s.grad, s_ref.grad, atol=1e-7)


def test_reverse_kl_and_js_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    q = torch.tensor([[0.2, 0.5, 0.3]])
    tl, sl = p.log(), q.log()
    rkl = float((q * (q / p).log()).sum())
    m = (p + q) / 2
    js = float(0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum())
    assert math.isclose(float(reverse_kl_divergence(tl, sl)), rkl, rel_tol=1e-5)
    assert math.isclose(float(js_divergence(tl, sl)), js, rel_tol=1e-5)
    assert float(js_divergence(torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]]))) <= math.log(2) + 1e-6


def test_head_path_equals_logit_path():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 8, generator=g)
    h1 = torch.randn(2, 9, 8, generator=g).requires_grad_(True)
    h2 = h1.detach().clone().requires_grad_(True)
    t = torch.randn(18, 40, generator=g)
    a = chunked_divergence(t, h1, head=lambda x: x @ w.T, chunk_size=4)
    b = kl_divergence(t, (h2 @ w.T).reshape(-1, 40), chunk_size=None)
    a.backward()
    b.backward()
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(h1.grad, h2.grad, atol=1e-6)


def test_teacher_callable_sees_every_token_once():
    t = _logits(0, 10, 6, 1.0)
    seen = []

    def teacher(sl):
        seen.append((sl.start, sl.stop))
        return t[sl]

    chunked_divergence(teacher, _logits(1, 10, 6, 1.0), chunk_size=3)
    assert seen == [(0, 3), (3, 6), (6, 9), (9, 10)]


def test_bad_input():
    t = _logits(0, 4, 5, 1.0)
    with pytest.raises(ConfigError, match="chunk_size"):
        kl_divergence(t, t, chunk_size=0)
    with pytest.raises(ConfigError, match="temperature"):
        kl_divergence(t, t, temperature=0)
    with pytest.raises(ConfigError, match="tokens"):
        kl_divergence(t[:3], t)
    with pytest.raises(UnknownNameError, match="divergence"):
        chunked_divergence(t, t, divergence="kll")


def test_hidden_mse_relative():
    t = {"a": torch.ones(3, 4) * 2, "b": torch.ones(3, 4)}
    assert float(hidden_mse(t, {k: v.clone() for k, v in t.items()})) == 0.0
    zeros = {k: torch.zeros_like(v) for k, v in t.items()}
    assert math.isclose(float(hidden_mse(t, zeros)), 1.0, rel_tol=1e-6)
    with pytest.raises(ConfigError):
        hidden_mse({}, {})


def test_gradient_scales_with_upstream_gradient():
    t = _logits(0, 6, 9, 2.0)
    s1 = _logits(1, 6, 9, 2.0).requires_grad_(True)
    s2 = s1.detach().clone().requires_grad_(True)
    kl_divergence(t, s1, chunk_size=4).backward()
    (3.0 * kl_divergence(t, s2, chunk_size=4)).backward()
    assert torch.allclose(3.0 * s1.grad, s2.grad, atol=1e-8)
