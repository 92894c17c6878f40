"""Property tests of the sparsifier math (reference semantics of DESIGN.md)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spon_toolkit.errors import ConfigError
from spon_toolkit.sparsifiers import (
    MagnitudeSparsifier,
    ThresholdSparsifier,
    calibrated_threshold,
    check_sparsity,
    compute_sparsity_stats,
    kept_count,
    magnitude_sparsify,
    threshold_sparsify,
)

sparsities = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])


@st.composite
def tensors(draw, max_rows=6, max_dim=40, with_ties=False):
    rows = draw(st.integers(1, max_rows))
    dim = draw(st.integers(1, max_dim))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g)
    if with_ties:
        # Round to a coarse grid so many magnitudes are equal.
        x = torch.round(x * 2) / 2
    return x.to(draw(dtypes))


def reference_topk_mask(x: torch.Tensor, s: float) -> torch.Tensor:
    """Exactly k = d - round(s*d) largest |x| per row, ties to the lower index (stable sort)."""
    d = x.shape[-1]
    k = d - round(s * d)
    order = torch.sort(x.abs().float(), dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask.scatter_(-1, order[..., :k], True)
    assert int(mask.sum()) == k * x.shape[0]
    return mask


@settings(max_examples=200, deadline=None)
@given(x=tensors(with_ties=True), s=sparsities)
def test_magnitude_keeps_exactly_k_per_row_ties_to_lower_index(x, s):
    out = magnitude_sparsify(x, s)
    assert torch.equal(out, x * reference_topk_mask(x, s))


@settings(max_examples=100, deadline=None)
@given(x=tensors(), s=sparsities)
def test_magnitude_preserves_sign_magnitude_dtype_shape(x, s):
    out = magnitude_sparsify(x, s)
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    kept = out != 0
    assert torch.equal(out[kept], x[kept])
    assert torch.equal(torch.sign(out[kept]), torch.sign(x[kept]))


@given(x=tensors())
def test_magnitude_identity_at_zero_and_zeros_at_one(x):
    assert torch.equal(magnitude_sparsify(x, 0.0), x)
    assert torch.count_nonzero(magnitude_sparsify(x, 1.0)) == 0


def test_magnitude_ties_keep_lower_indices():
    x = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.5, 2.0]])
    # s=0.5 of d=6 keeps 3: the 2.0 then the first two tied 1.0s by index.
    out = magnitude_sparsify(x, 0.5)
    assert out.tolist() == [[1.0, -1.0, 0.0, 0.0, 0.0, 2.0]]


def test_magnitude_is_deterministic_across_calls():
    x = torch.round(torch.randn(64, 128) * 3) / 3
    a = magnitude_sparsify(x, 0.6)
    b = magnitude_sparsify(x.clone(), 0.6)
    assert torch.equal(a, b)


@pytest.mark.parametrize("d,s,k", [(10, 0.25, 8), (4, 0.5, 2), (6, 0.25, 4), (576, 0.5, 288), (3, 0.5, 1)])
def test_kept_count_rounding(d, s, k):
    assert kept_count(d, s) == k


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan"), float("inf"), "0.5", None, True])
def test_bad_sparsity_is_a_one_line_error(bad):
    with pytest.raises(ConfigError) as info:
        check_sparsity(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        MagnitudeSparsifier(bad)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 3000), s=sparsities, seed=st.integers(0, 2**16))
def test_threshold_reaches_target_on_calibration_data(n, s, seed):
    values = torch.randn(n, generator=torch.Generator().manual_seed(seed)).abs().sort().values
    t = calibrated_threshold(values, s)
    achieved = float((values <= t).float().mean())
    # within one quantile step of the target
    assert abs(achieved - s) <= 1.0 / n + 1e-12


def test_threshold_extremes():
    v = torch.tensor([0.1, 0.2, 0.3])
    assert calibrated_threshold(v, 0.0) == -math.inf
    assert calibrated_threshold(v, 1.0) == math.inf
    x = torch.randn(3, 5)
    assert torch.equal(threshold_sparsify(x, -math.inf), x)
    assert torch.count_nonzero(threshold_sparsify(x, math.inf)) == 0


@settings(max_examples=50, deadline=None)
@given(x=tensors(), t=st.floats(0, 3))
def test_threshold_sparsify_rule(x, t):
    out = threshold_sparsify(x, t)
    assert out.dtype == x.dtype and out.shape == x.shape
    big = x.abs() > t
    assert torch.equal(out[big], x[big])
    assert torch.count_nonzero(out[~big]) == 0


def test_threshold_sparsifier_calibrates_per_site_and_reports(tiny_model, tiny_ids):
    sp = ThresholdSparsifier({"down_proj": 0.7, "default": 0.3})
    sp.calibrate(tiny_model, ["layers.0.down_proj", "layers.1.q_proj"], [tiny_ids])
    assert sp.calibration_sparsity["layers.0.down_proj"] == pytest.approx(0.7, abs=1e-3)
    assert sp.calibration_sparsity["layers.1.q_proj"] == pytest.approx(0.3, abs=1e-3)
    state = sp.state_dict()
    other = ThresholdSparsifier(0.1)
    other.load_state_dict(state)
    assert other.thresholds == sp.thresholds


def test_sparsity_mapping_needs_every_site():
    sp = MagnitudeSparsifier({"down_proj": 0.5})
    assert sp.sparsity_for("layers.2.down_proj") == 0.5
    with pytest.raises(ConfigError, match="no sparsity given"):
        sp.sparsity_for("layers.2.q_proj")


def test_compute_sparsity_stats():
    stats = compute_sparsity_stats(torch.tensor([0.0, 1.0, 0.0, -2.0]))
    assert stats["sparsity"] == 0.5 and stats["num_zeros"] == 2 and stats["max_abs"] == 2.0
