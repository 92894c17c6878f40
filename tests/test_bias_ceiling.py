"""studies/bias_ceiling.py: the shares a constant removes, against direct computation, and its dense-forward
mean against the toolkit's closed-form bias."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

spec = importlib.util.spec_from_file_location("bias_ceiling", Path(__file__).parents[1] / "studies" / "bias_ceiling.py")
bias_ceiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bias_ceiling)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), offset=st.floats(0.0, 3.0), n=st.integers(2, 200))
def test_shares_match_the_residual_energy_computed_directly(seed, offset, n):
    g = torch.Generator().manual_seed(seed)
    errors = torch.randn(n, 6, generator=g, dtype=torch.float64) + offset
    calib = torch.randn(50, 6, generator=g, dtype=torch.float64) + offset
    ev, cal = bias_ceiling.ErrorStats(), bias_ceiling.ErrorStats()
    ev.add("s", errors)
    cal.add("s", calib)
    got = bias_ceiling.shares(ev, cal, ["s"])["overall"]
    energy = errors.pow(2).sum()
    best = 1 - (errors - errors.mean(0)).pow(2).sum() / energy
    held = 1 - (errors - calib.mean(0)).pow(2).sum() / energy
    assert abs(got["in_sample"] - float(best)) < 1e-9
    assert abs(got["held_out"] - float(held)) < 1e-9
    assert got["held_out"] <= got["in_sample"] + 1e-12  # the text's own mean is the best constant
    assert 0 <= got["null"] and 0 <= got["in_sample"] <= 1


def test_a_zero_mean_error_gives_a_null_sized_share_and_a_shifted_one_more():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    for shift, low, high in ((0.0, 0.0, 0.01), (1.0, 0.45, 0.55)):  # |m|^2 / (|m|^2 + 1) = 0.5 at shift 1
        ev = bias_ceiling.ErrorStats()
        ev.add("s", noise + shift)
        got = bias_ceiling.shares(ev, ev, ["s"])["overall"]
        assert low <= got["in_sample"] <= high and got["null"] < 0.01


def test_the_dense_forward_mean_is_the_closed_form_bias(tiny_model, tiny_ids):
    from spon_toolkit import MagnitudeSparsifier, SponBiases
    from spon_toolkit.sites import SiteMap

    model, batches = tiny_model, [tiny_ids]
    sparsifier = MagnitudeSparsifier(0.5)
    sitemap = SiteMap(model)
    sites = sitemap.resolve("down_proj")
    stats = bias_ceiling.collect(model, sitemap, sites, sparsifier, batches, "dense")
    biases = SponBiases(model, "down_proj")
    with torch.no_grad():
        biases.init_closed_form(model, sparsifier, batches)
    for site in sites:
        torch.testing.assert_close(stats.mean(site).float(), biases.beta(site).float(), rtol=1e-4, atol=1e-6)
    sparse = bias_ceiling.collect(model, sitemap, sites, sparsifier, batches, "sparse")
    assert sparse.tokens == stats.tokens  # both forwards see every token of every site
    assert any(not torch.allclose(sparse.mean(s), stats.mean(s)) for s in sites[1:])  # upstream sparsity matters
