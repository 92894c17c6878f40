"""Analyzers: the math on data with known structure, option checks, answer validation, the runner's item and
sweep analyzers and an end-to-end `spon analyze` on a tiny checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spon_toolkit import cli
from spon_toolkit.analysis.cka import linear_cka, shuffled_cka
from spon_toolkit.analysis.pca import alignment, random_max_cos, single_cos_null
from spon_toolkit.analysis.probes import probe_accuracy
from spon_toolkit.analysis.prompts import builtin_categories, load_prompts
from spon_toolkit.analysis.runs import check_analyzer
from spon_toolkit.analysis.stats import bias_statistics, excess_kurtosis, permutation_test
from spon_toolkit.contracts import run_analyzer
from spon_toolkit.errors import ConfigError, PluginError
from spon_toolkit.plugins import Toolkit

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def toolkit():
    return Toolkit(load_entrypoints=False)


def anisotropic(n=2000, d=64, seed=0):
    """Activations with a known spectrum: variance 100, 50, 25 along three known orthonormal directions."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = np.ones(d)
    scales[:3] = [10.0, 7.0, 5.0]
    return (rng.standard_normal((n, d)) * scales) @ basis.T, basis


# --- PCA alignment ---------------------------------------------------------------------------------------

def test_bias_along_a_principal_component_is_aligned():
    acts, basis = anisotropic()
    res = alignment(basis[:, 1] * 3.0, acts, k=5)
    assert res["max_abs_cos"] > 0.99 and res["argmax_component"] == 1
    assert res["max_abs_cos"] > res["null_max_abs_cos_p95"] and res["p_value"] < 0.01
    assert res["variance_ratio"] == pytest.approx(49 / ((100 + 49 + 25 + 61) / 64), rel=0.1)  # 49 vs mean 3.7


def test_random_bias_sits_inside_the_null_band():
    acts, _ = anisotropic()
    rng = np.random.default_rng(5)
    res = alignment(rng.standard_normal(64), acts, k=5)
    assert res["max_abs_cos"] < res["null_max_abs_cos_p95"] and res["p_value"] > 0.05
    assert res["null_variance_ratio_p05"] < res["variance_ratio"] < res["null_variance_ratio_p95"]


def test_null_matches_random_vectors_against_a_fixed_basis():
    d, k = 576, 10
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((d, k)))
    r = rng.standard_normal((4000, d))
    direct = np.abs(r @ basis).max(1) / np.linalg.norm(r, axis=1)
    null = random_max_cos(d, k, 20000, seed=1)
    assert abs(np.quantile(direct, 0.95) - np.quantile(null, 0.95)) < 0.004
    assert abs(direct.mean() - null.mean()) < 0.002
    one = single_cos_null(d)
    assert abs(one["mean"] - np.sqrt(2 / (np.pi * d))) < 1e-3  # the seed's 2048 dims: about 0.018 per direction


def test_k_larger_than_the_dimension_is_refused():
    with pytest.raises(ValueError, match="k=9"):
        alignment(np.ones(8), np.random.default_rng(0).standard_normal((50, 8)), k=9)


# --- CKA ---------------------------------------------------------------------------------------------------

matrices = st.integers(0, 10_000).map(lambda s: np.random.default_rng(s).standard_normal((40, 12)))


@settings(max_examples=25, deadline=None)
@given(x=matrices, seed=st.integers(0, 1000), scale=st.floats(0.01, 100))
def test_cka_identity_and_invariances(x, seed, scale):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((12, 12)))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, scale * x) == pytest.approx(1.0, abs=1e-9)
    y = np.random.default_rng(seed + 1).standard_normal((40, 7))
    assert linear_cka(x, y) == pytest.approx(linear_cka(x @ q * scale, y), abs=1e-9)
    assert 0.0 <= linear_cka(x, y) <= 1.0 + 1e-12


def test_cka_gram_and_feature_forms_agree_and_shuffling_destroys_it():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 50))  # n < d: the Gram form is used
    y = x + 0.1 * rng.standard_normal((30, 50))
    xc, yc = x - x.mean(0), y - y.mean(0)
    feature_form = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert linear_cka(x, y) == pytest.approx(feature_form, rel=1e-10)
    assert linear_cka(x, y) > 0.95 and shuffled_cka(x, y) < 0.9


# --- statistics ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,sample,expected", [
    ("normal", lambda r: r.standard_normal(200_000), 0.0),
    ("uniform", lambda r: r.uniform(-1, 1, 200_000), -1.2),
    ("laplace", lambda r: r.laplace(0, 1, 1_000_000), 3.0),
])
def test_kurtosis_matches_scipy_and_the_known_values(name, sample, expected):
    from scipy import stats

    x = sample(np.random.default_rng(0))
    assert excess_kurtosis(x) == pytest.approx(stats.kurtosis(x, fisher=True, bias=True), rel=1e-12)
    assert excess_kurtosis(x) == pytest.approx(expected, abs=0.1)


def test_kurtosis_is_never_below_minus_two():
    assert excess_kurtosis(np.array([-1.0, 1.0] * 50)) == pytest.approx(-2.0)
    s = bias_statistics(np.array([-1.0, 1.0] * 50), init=np.array([-1.0, 1.0] * 50))
    assert s["cos_to_init"] == pytest.approx(1.0) and s["rel_change_from_init"] == pytest.approx(0.0)
    assert s["positive_fraction"] == 0.5 and s["l2_norm"] == pytest.approx(10.0)


def test_permutation_test_separates_groups_and_not_noise():
    rng = np.random.default_rng(0)
    labels = ["a"] * 30 + ["b"] * 30 + ["c"] * 30
    same = permutation_test(rng.standard_normal(90), labels, 500)
    shifted = permutation_test(np.r_[rng.standard_normal(60), rng.standard_normal(30) + 2], labels, 500)
    assert same["p_value"] > 0.05
    assert shifted["p_value"] < 0.01 and shifted["per_group"]["c"]["p_value"] < 0.01


# --- probes -------------------------------------------------------------------------------------------------

def test_probe_on_separable_categories_and_on_shuffled_labels():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 16)) * 4
    groups = np.repeat(np.arange(80), 3)  # 80 "prompts" of 3 tokens, 20 per category
    y = np.array([f"c{g % 4}" for g in groups])
    x = centers[groups % 4] + rng.standard_normal((240, 16))
    res = probe_accuracy(x, y, groups, folds=5, n_shuffles=3)
    assert res["accuracy"] > 0.98
    assert abs(res["shuffled_accuracy_mean"] - 0.25) < 0.12 and res["chance"] == 0.25


# --- prompts ------------------------------------------------------------------------------------------------

def test_builtin_prompt_sets():
    assert {"math", "commonsense", "coding", "safety", "factual"} <= set(builtin_categories())
    pairs = load_prompts()
    for c in ("math", "commonsense", "coding", "safety", "factual"):
        assert sum(1 for cat, _ in pairs if cat == c) >= 40
    assert len({t for _, t in pairs}) == len(pairs)  # no prompt twice


def test_prompt_file_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_prompts([tmp_path / "empty.txt"])
    with pytest.raises(ConfigError, match="unknown prompt category 'poetry'"):
        load_prompts(categories=["math", "poetry"])
    (tmp_path / "p.jsonl").write_text('{"text": "two plus two", "category": "math"}\n{"text": "hi", "category": "chat"}\n')
    assert load_prompts([tmp_path / "p.jsonl"]) == [("math", "two plus two"), ("chat", "hi")]


# --- option checks and answer validation ----------------------------------------------------------------

@pytest.mark.parametrize("name,options,context,needle", [
    ("pca_alignment", {"k": 700}, {"dims": {"layers.0.down_proj": 576}}, "k=700 principal components exceed the dimension 576"),
    ("pca_alignment", {"kk": 3}, {}, r"analyzer 'pca_alignment' \(plugin 'spon.analyzers'\) has no option 'kk'"),
    ("pca_alignment", {"sites": ["layers.9.down_proj"]}, {"biased_sites": ["layers.0.down_proj"]},
     "needs a bias on 'layers.9.down_proj'"),
    ("category_probes", {"categories": ["math", "poems"]}, {}, "unknown prompt category 'poems'"),
    ("category_probes", {"layers": [0, 40]}, {"n_layers": 30}, "outside 0..29"),
    ("hidden_state_shift", {"blocks": 0}, {}, "option 'blocks' must be an integer >= 1"),
])
def test_bad_options_are_one_line_errors(toolkit, name, options, context, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        check_analyzer(toolkit, name, options, context)
    assert "\n" not in str(info.value)


class BadAnswer:
    __name__ = "bad_answer_plugin"

    @staticmethod
    @__import__("spon_toolkit").hookimpl
    def spon_register_analyzers(register):
        register("tensor_answer", lambda run: {"x": torch.ones(2)}, "returns a tensor")


def test_non_json_answer_names_the_plugin():
    tk = Toolkit(load_entrypoints=False, extra_plugins=[BadAnswer()])
    with pytest.raises(PluginError, match="analyzer 'tensor_answer' \\(plugin 'bad_answer_plugin'\\).*not JSON"):
        run_analyzer(tk, "tensor_answer", None, {})


# --- analyzers on a tiny model ------------------------------------------------------------------------------

def tiny_run(toolkit, sparsity, bias_scale=0.0):
    from spon_toolkit.models import load_model
    from spon_toolkit.runner import AnalysisRun
    from spon_toolkit.sites import SiteMap
    from spon_toolkit.sparse import SponBiases

    model, tok = load_model("tiny-random", toolkit=toolkit)
    sitemap = SiteMap(model, toolkit.architectures)
    sites = sitemap.resolve("down_proj")
    sp = toolkit.sparsifiers.get("magnitude")(sparsity)
    biases = SponBiases(model, sites, sitemap=sitemap)
    with torch.no_grad():
        for s in sites:
            biases.param(s).copy_(bias_scale * torch.randn_like(biases.param(s)))
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    data = SimpleNamespace(eval=_Blocks(ids), calibration=_Blocks(ids))
    plan = SimpleNamespace(sparse_sites=tuple(sites), biased_sites=tuple(sites))
    return AnalysisRun(item=SimpleNamespace(id="tiny"), record={}, model=model, tokenizer=tok, sparsifier=sp, plan=plan,
                       biases=biases, data=data, run_dir=Path("."), figures_dir=Path("."), sitemap=sitemap,
                       toolkit=toolkit)


class _Blocks:
    def __init__(self, ids):
        self.ids = ids
        self.block_size = ids.shape[1]

    def __len__(self):
        return len(self.ids)

    def head(self, n):
        return _Blocks(self.ids[:n])

    def batches(self, b):
        return iter([self.ids[i:i + b] for i in range(0, len(self.ids), b)])


def test_hidden_state_shift_is_zero_at_sparsity_zero(toolkit):
    res = run_analyzer(toolkit, "hidden_state_shift", tiny_run(toolkit, 0.0), {"blocks": 4})
    assert all(lay["shift_sparse"]["mean"] == 0.0 and lay["shift_spon"]["mean"] == 0.0 for lay in res["layers"])
    assert res["output"]["kl_sparse"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert res["output"]["top1_sparse"]["mean"] == 1.0


def test_hidden_state_shift_with_sparsity_and_biases(toolkit):
    res = run_analyzer(toolkit, "hidden_state_shift", tiny_run(toolkit, 0.5, bias_scale=0.05), {"blocks": 4})
    assert all(lay["shift_sparse"]["mean"] > 0 for lay in res["layers"])
    assert res["layers"][0]["shift_spon"]["mean"] != res["layers"][0]["shift_sparse"]["mean"]
    assert res["output"]["kl_sparse"]["mean"] > 0


def test_pca_alignment_and_bias_statistics_on_a_tiny_model(toolkit):
    run = tiny_run(toolkit, 0.5, bias_scale=1.0)
    pca = run_analyzer(toolkit, "pca_alignment", run, {"k": 4, "blocks": 4, "n_null": 2000})
    assert set(pca["sites"]) == {"layers.0.down_proj", "layers.1.down_proj"}
    assert all(len(v["abs_cos"]) == 4 and 0 <= v["max_abs_cos"] <= 1 for v in pca["sites"].values())
    stats = run_analyzer(toolkit, "bias_statistics", run, {"init_blocks": 4})
    assert all(-2 <= v["excess_kurtosis"] and -1 <= v["cos_to_init"] <= 1 for v in stats["sites"].values())


# --- runner and CLI --------------------------------------------------------------------------------------

def test_runner_item_and_sweep_analyzers(tmp_path, toolkit):
    from test_runner import write_spec

    from spon_toolkit.experiment import load_experiment
    from spon_toolkit.runner import run_experiment

    path = write_spec(tmp_path, expect="  []", replace={
        "allocations: [BASELINE-TEAL, UNIF-ALL, TOP-50]": "allocations: [UNIF-ALL, TOP-50]",
        "epochs: 2": "epochs: 1",
        "report: false": "report: false\nanalyzers: [{name: bias_statistics}, {name: cross_config}]"})
    exp = load_experiment(path, toolkit)
    sweep = run_experiment(exp, toolkit=toolkit, output_dir=tmp_path / "out", keyword="UNIF-ALL or seed=0",
                           progress=False)
    assert not sweep.errors
    analysis = tmp_path / "out/tiny/analysis"
    stats = json.loads((analysis / "bias_statistics.json").read_text())
    assert stats["scope"] == "item" and len(stats["items"]) == 3
    cross = json.loads((analysis / "cross_config.json").read_text())["result"]
    kinds = sorted(p["kind"] for p in cross["pairs"])
    assert kinds == ["config", "config", "seed"]
    seed_pair = next(p for p in cross["pairs"] if p["kind"] == "seed")
    config_pair = next(p for p in cross["pairs"] if p["kind"] == "config")
    # only UNIF-ALL has two seeds: the floor of a site is the cosine of its two seeds there
    floor = np.mean([seed_pair["sites"][s]["cos"] for s in config_pair["sites"]])
    assert config_pair["noise_floor_cos"] == pytest.approx(floor)
    assert -1 <= config_pair["mean_cos"] <= 1 and config_pair["mean_cos_update"] is not None
    # the experiment report shows one executed section per analyzer that ran
    assert cli.main(["report", str(tmp_path / "out/tiny"), "--reports-dir", str(tmp_path / "reports")]) == 0
    nb = json.loads((tmp_path / "reports/tiny.ipynb").read_text())
    ids = {c["id"]: c for c in nb["cells"]}
    for name in ("bias_statistics", "cross_config"):
        assert ids[f"{name}-1"]["outputs"], name
    assert "pca_alignment-0" not in ids  # not run, no section
    assert "noise floor cos" in (tmp_path / "reports/tiny.html").read_text()


def test_bad_analyzer_option_fails_before_the_model(tmp_path, monkeypatch, capsys):
    from test_runner import write_spec

    path = write_spec(tmp_path, expect="  []", replace={
        "report: false": "report: false\nanalyzers: [{name: category_probes, options: {categories: [math, poetry]}}]"})
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", path.name, "--output-dir", "out"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: exp_tiny.yaml: key 'analyzers[0]': analyzer 'category_probes' (plugin 'spon.analyzers'): unknown prompt "
                          "category 'poetry'") and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, toolkit):
    from test_runner import write_texts

    from spon_toolkit.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("ckpt")
    write_texts(d)
    run = tiny_run(toolkit, 0.5, bias_scale=0.1)
    path = save_checkpoint(d / "tiny.safetensors", run.biases, model=run.model, sparsifier=run.sparsifier,
                           sparse_sites=run.plan.sparse_sites)
    return d, path


def test_spon_analyze_end_to_end(tiny_checkpoint, capsys):
    d, ckpt = tiny_checkpoint
    out = d / "analysis_out"
    code = cli.main(["analyze", str(ckpt), "--analyzer", "pca_alignment", "--analyzer", "hidden_state_shift",
                     "--analyzer", "category_probes", "--option", "pca_alignment.k=3",
                     "--option", "category_probes.per_category=5", "--option", "category_probes.probe_layers=1",
                     "--option", "category_probes.folds=2", "--option", "category_probes.n_shuffles=1",
                     "--option", "category_probes.n_resamples=100",
                     "--data", str(d / "eval.txt"), "--calib-data", str(d / "calib.txt"), "--block-size", "32",
                     "--blocks", "4", "--calib-blocks", "4", "-o", str(out)])
    assert code == 0
    pca = json.loads((out / "analysis/pca_alignment.json").read_text())
    assert pca["items"]["tiny"]["protocol"]["k"] == 3
    nb = json.loads((out / "report.ipynb").read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert outputs and not any(o.get("output_type") == "error" for o in outputs)
    assert "PCA alignment" in (out / "report.html").read_text()
    assert (out / "figures/pca_alignment.png").is_file() and (out / "figures/hidden_state_shift.png").is_file()


@pytest.mark.parametrize("extra,needle", [
    (["--option", "pca_alignment.k=1000"], "k=1000 principal components exceed the dimension 64"),
    (["--option", "pca_alignment.sites=[layers.7.down_proj]"], "needs a bias on 'layers.7.down_proj'"),
    (["--option", "bias_statistics.k=3"], "names analyzer 'bias_statistics', which is not run"),
])
def test_spon_analyze_bad_input(tiny_checkpoint, capsys, extra, needle):
    d, ckpt = tiny_checkpoint
    code = cli.main(["analyze", str(ckpt), "--analyzer", "pca_alignment", *extra, "-o", str(d / "never")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not (d / "never").exists()
