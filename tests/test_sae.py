"""The SAE analysis: decomposition math, restoration, sae-lens training end to end, caching, errors."""

from __future__ import annotations

import builtins
import json
import math

import numpy as np
import pytest
import torch

from spon_toolkit import sae as S
from spon_toolkit.errors import ConfigError

needs_sae_lens = pytest.mark.skipif(not S.sae_lens_available(), reason="sae-lens not installed (extra 'sae')")


def _dictionary(width=64, d=32, seed=0):
    g = np.random.default_rng([seed, 1])
    D = g.standard_normal((width, d))
    return D / np.linalg.norm(D, axis=1, keepdims=True)


# --- decomposition --------------------------------------------------------------------------------

def test_bias_from_three_atoms_is_recovered_with_those_atoms():
    D = _dictionary()
    atoms, weights = [5, 17, 40], [2.0, -1.5, 0.8]
    bias = sum(w * D[a] for a, w in zip(atoms, weights, strict=True))
    out = S.decompose_bias(D, bias, ns=(1, 3, 5), top=3, n_null=50, seed=0)
    found = {f["feature"]: f["weight"] for f in out["top_features"]}
    assert set(found) == set(atoms)
    for a, w in zip(atoms, weights, strict=True):
        assert found[a] == pytest.approx(w, abs=1e-8)
    assert out["explained"]["3"]["observed"] == pytest.approx(1.0, abs=1e-10)
    # three atoms in 32 dimensions: random vectors are far from explained by 3 directions
    assert out["explained"]["3"]["null_isotropic_p95"] < 0.9
    assert out["explained"]["3"]["null_isotropic_p"] == pytest.approx(1 / 51)


def test_random_bias_is_not_more_explained_than_the_null():
    D = _dictionary(seed=1)
    bias = np.random.default_rng(7).standard_normal(32)
    out = S.decompose_bias(D, bias, ns=(1, 5), n_null=100, seed=0)
    # the bias is itself a draw from the null: its p-value is not small
    assert out["explained"]["5"]["null_isotropic_p"] > 0.01
    fr = out["explained"]["1"]
    assert 0 < fr["observed"] < 1 and fr["null_isotropic_mean"] < fr["null_isotropic_p95"]


def test_explained_fraction_grows_with_atoms():
    D = _dictionary()
    v = np.random.default_rng(3).standard_normal((4, 32))
    fr = S.explained_fractions(D, v, (1, 5, 20))
    assert np.all(fr[1] <= fr[5] + 1e-12) and np.all(fr[5] <= fr[20] + 1e-12)
    assert np.all((fr[20] >= 0) & (fr[20] <= 1 + 1e-12))


# --- restoration ----------------------------------------------------------------------------------

def test_restoration_is_full_when_spon_equals_dense():
    g = np.random.default_rng(0)
    dense = 1.0 + 0.1 * g.random((12, 50))
    sparse = dense.copy()
    sparse[:, :5] *= 0.2  # sparsification suppresses features 0-4 on every block
    sparse[:, 5:8] += 1.0  # and creates 5-7
    out = S.feature_restoration(dense, sparse, dense.copy(), null=sparse, seed=0)
    assert out["restoration_share"] == pytest.approx(1.0)
    assert out["restoration_share_ci95"][0] == pytest.approx(1.0)
    assert out["restoration_share_null"] == pytest.approx(0.0)
    assert {r["feature"] for r in out["suppressed"]} == set(range(5))
    assert {r["feature"] for r in out["created"]} == {5, 6, 7}
    assert all(r["restored"] == pytest.approx(1.0) for r in out["suppressed"] + out["created"])


def test_restoration_is_zero_when_spon_equals_sparse_and_half_when_halfway():
    g = np.random.default_rng(1)
    dense = g.random((10, 20))
    sparse = dense - 0.5
    assert S.feature_restoration(dense, sparse, sparse)["restoration_share"] == pytest.approx(0.0)
    assert S.feature_restoration(dense, sparse, (dense + sparse) / 2)["restoration_share"] == pytest.approx(0.5)


# --- spaces ---------------------------------------------------------------------------------------

def test_bias_spaces():
    assert S.bias_space("layers.3.down_proj").kind == "resid_post"
    assert S.bias_space("layers.3.o_proj").kind == "resid_mid"
    assert S.bias_space("layers.3.q_proj").kind == "site_output"
    assert S.bias_space("layers.3.down_proj", "input").kind == "site_input"


def test_spaces_see_what_the_bias_is_added_to(tiny_model):
    """A bias added at a site shifts its space's activation by exactly that bias."""
    from spon_toolkit.plugins import Toolkit
    from spon_toolkit.sites import SiteMap
    from spon_toolkit.sparse import SponBiases

    sitemap = SiteMap(tiny_model, Toolkit().architectures)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    for site in ("layers.1.down_proj", "layers.1.o_proj", "layers.1.q_proj"):
        space = S.bias_space(site)
        base = S.collect_activations(tiny_model, sitemap, [space], ids, skip_first=0)[space.name]
        biases = SponBiases(tiny_model, [site], sitemap=sitemap)
        beta = torch.randn(biases.param(site).shape)
        biases.load_tensors({site: beta})
        biases.attach()
        try:
            shifted = S.collect_activations(tiny_model, sitemap, [space], ids, skip_first=0)[space.name]
        finally:
            biases.detach()
        # in its own space the bias is a constant shift at every token (later layers are not involved)
        torch.testing.assert_close(shifted - base, beta.expand_as(base), atol=1e-4, rtol=1e-4)


def test_settings_errors():
    with pytest.raises(ConfigError, match="width"):
        S.SaeSettings(width=0).check()
    with pytest.raises(ConfigError, match="must not exceed"):
        S.SaeSettings(width=8, k=16).check()
    with pytest.raises(ConfigError, match="exceeds the width"):
        S.SaeSettings(k=300).check(d_in=64)
    with pytest.raises(ConfigError, match="architecture"):
        S.SaeSettings(architecture="gated").check()


def test_missing_extra_is_one_line(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "sae_lens" or name.startswith("sae_lens."):
            raise ImportError("No module named 'sae_lens'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError) as exc:
        S.require_sae_lens()
    assert "spon-toolkit[sae]" in str(exc.value) and "\n" not in str(exc.value)
    from spon_toolkit.builtin.sae_analyzer import analyze

    with pytest.raises(ConfigError, match=r"spon-toolkit\[sae\]"):
        analyze(None)


def test_analyzer_is_listed_and_checks_options():
    from spon_toolkit.builtin.sae_analyzer import check_options
    from spon_toolkit.plugins import Toolkit

    assert "sae_decomposition" in Toolkit().analyzers
    with pytest.raises(ConfigError, match="unknown option"):
        check_options({"widht": 4})
    with pytest.raises(ConfigError, match="width"):
        check_options({"width": 0})
    with pytest.raises(ConfigError, match="must not exceed"):
        check_options({"width": 4, "k": 8})
    with pytest.raises(ConfigError, match="ns"):
        check_options({"ns": [0]})


# --- sae-lens end to end on a tiny model -----------------------------------------------------------

@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPON_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _tiny_run(tmp_path, model, *, n_cal=16, n_eval=4, T=24):
    from spon_toolkit.data import TokenBlocks
    from spon_toolkit.expdata import ExperimentData
    from spon_toolkit.models import byte_tokenizer
    from spon_toolkit.plugins import Toolkit
    from spon_toolkit.runner import AnalysisRun
    from spon_toolkit.sites import SiteMap
    from spon_toolkit.sparse import SponBiases
    from spon_toolkit.sparsifiers import MagnitudeSparsifier

    g = torch.Generator().manual_seed(0)

    def blocks(n, split):
        return TokenBlocks(torch.randint(0, 256, (n, T), generator=g), "synthetic", split, split * 4, "byte", n * T)

    sitemap = SiteMap(model, Toolkit().architectures)
    sites = ["layers.0.down_proj", "layers.1.down_proj"]
    biases = SponBiases(model, sites, sitemap=sitemap)
    biases.load_tensors({s: 0.3 * torch.randn(biases.param(s).shape, generator=g) for s in sites})

    class Plan:
        sparse_sites = tuple(sites)
        biased_sites = tuple(sites)

    data = ExperimentData(blocks(n_cal, "calibration"), None, blocks(n_eval, "validation"), blocks(n_eval, "eval"))
    return AnalysisRun(item=None, record={}, model=model, tokenizer=byte_tokenizer(), sparsifier=MagnitudeSparsifier(0.5),
                       plan=Plan(), biases=biases, data=data, run_dir=tmp_path / "run", figures_dir=tmp_path / "run" / "figures")


@needs_sae_lens
def test_trained_sae_is_cached(tiny_model, cache_dir):
    from spon_toolkit.plugins import Toolkit
    from spon_toolkit.sites import SiteMap

    sitemap = SiteMap(tiny_model, Toolkit().architectures)
    ids = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(0))
    space = S.bias_space("layers.1.down_proj")
    settings = S.SaeSettings(width=96, k=8, steps=20, batch_size=32)
    sae, info = S.trained_sae(tiny_model, sitemap, space, ids, settings, progress=False)
    assert info["cache_hit"] is False and info["training"]["steps"] == 20
    again, info2 = S.trained_sae(tiny_model, sitemap, space, ids, settings, progress=False)
    assert info2["cache_hit"] is True and info2["key"] == info["key"]
    torch.testing.assert_close(again.W_dec, sae.W_dec)
    # the cached directory is sae-lens' own format, loadable by load_sae with a dimension check
    loaded = S.load_sae(info2["directory"], d_in=64)
    torch.testing.assert_close(loaded.W_enc, sae.W_enc)
    with pytest.raises(ConfigError, match="64-dimensional inputs"):
        S.load_sae(info2["directory"], d_in=128)
    # other hyperparameters are another cache entry
    _, info3 = S.trained_sae(tiny_model, sitemap, space, ids, S.SaeSettings(width=96, k=4, steps=20, batch_size=32),
                             progress=False)
    assert info3["cache_hit"] is False and info3["key"] != info["key"]


@needs_sae_lens
def test_analyzer_end_to_end_on_tiny_model(tiny_model, tmp_path, cache_dir):
    from spon_toolkit.builtin.sae_analyzer import analyze

    run = _tiny_run(tmp_path, tiny_model)
    opts = dict(width=96, k=8, steps=30, batch_size=64, train_blocks=16, validation_blocks=4, eval_blocks=4,
                n_null=20, ns=[1, 5], contexts=2, window=4, progress=False)
    out = analyze(run, **opts)
    assert set(out["sites"]) == {"layers.0.down_proj", "layers.1.down_proj"}
    entry = out["sites"]["layers.1.down_proj"]
    q = entry["quality"]
    assert 0 <= q["fvu"] and q["l0"] <= 8 + 1e-9 and 0 <= q["dead_fraction"] <= 1
    assert math.isfinite(q["delta_loss"]) and math.isfinite(q["loss_mean_ablated"])
    assert entry["sae"]["cache_hit"] is False and entry["sae"]["training"]["steps"] == 30
    dec = entry["decomposition"]
    assert len(dec["top_features"]) > 0 and set(dec["explained"]) == {"1", "5"}
    assert dec["explained"]["1"]["observed"] <= dec["explained"]["5"]["observed"] + 1e-12
    r = entry["restoration"]
    assert r["n_features"] == 96 and "restoration_share_null" in r
    feat = str(dec["top_features"][0]["feature"])
    assert all("[[" in c["context"] for c in entry["contexts"][feat])
    saved = json.loads((tmp_path / "run" / "analysis" / "sae_decomposition_item.json").read_text())
    assert saved["sites"].keys() == out["sites"].keys()
    assert all((tmp_path / "run" / "figures").joinpath(p.split("/")[-1]).is_file() for p in out["figures"])
    # the report section draws tables and figures from the stored result
    import types

    from spon_toolkit.builtin import sae_analyzer

    results = types.SimpleNamespace(records=[{"id": "UNIF-ALL@0.5#0", "config": "UNIF-ALL",
                                              "analyses": {"sae_decomposition": saved}}])
    assert len(sae_analyzer.report_section(results)) == 2
    assert len(sae_analyzer.quality_table(results)) == 2 and len(sae_analyzer.decomposition_table(results)) == 4
    assert len(sae_analyzer.restoration_table(results)) == 2 and len(sae_analyzer.features_table(results)) > 0
    assert len(sae_analyzer.plots(results)) == 2
    assert sae_analyzer.report_section(types.SimpleNamespace(records=[{"id": "a", "analyses": {}}])) == []
    # second call: the SAEs come from the cache
    again = analyze(run, **opts)
    assert again["sites"]["layers.1.down_proj"]["sae"]["cache_hit"] is True
    assert again["sites"]["layers.1.down_proj"]["quality"]["fvu"] == pytest.approx(q["fvu"])


@needs_sae_lens
def test_analyzer_bad_input_is_one_line(tiny_model, tmp_path, cache_dir):
    from spon_toolkit.builtin.sae_analyzer import analyze

    run = _tiny_run(tmp_path, tiny_model)
    with pytest.raises(ConfigError, match="has no SPON bias"):
        analyze(run, sites="layers.0.o_proj")
    with pytest.raises(ConfigError, match="exceeds the width|must not exceed"):
        analyze(run, width=16, k=32)
    with pytest.raises(ConfigError, match="neither an SAE directory"):
        analyze(run, sae="no-such-sae")


def test_spec_options_are_checked_when_the_spec_loads(tmp_path):
    from spon_toolkit.experiment import load_experiment
    from spon_toolkit.plugins import Toolkit

    spec = tmp_path / "e.yaml"
    spec.write_text("model: tiny-random\nsparsity: [0.5]\nallocations: [UNIF-ALL]\n"
                    "analyzers: [{name: sae_decomposition, options: {width: 8, k: 16}}]\n")
    with pytest.raises(ConfigError, match=r"analyzers\[0\]': analyzer 'sae_decomposition' \(plugin 'spon.sae_analyzer'\): SAE option 'k' \(16\) must not exceed"):
        load_experiment(spec, Toolkit())


def test_sae_train_command_checks_input_before_loading(capsys):
    from spon_toolkit.cli import main

    assert main(["sae-train", "--site", "layers.1.down_proj", "--width", "0"]) == 2
    assert "width" in capsys.readouterr().err
