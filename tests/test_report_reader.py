"""The report as a reader sees it: generated summary (numbers equal to the tables'), frontiers per set of
sparsified sites, no absolute path in a report that was moved, and the page in headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import zlib

import nbformat
import numpy as np
import pytest
from test_runner import write_spec

from spon_toolkit.experiment import load_experiment
from spon_toolkit.plugins import Toolkit
from spon_toolkit.report import export_html, summary, views, write_report
from spon_toolkit.results import BASELINE, load_results
from spon_toolkit.runner import run_experiment

NUMBER = re.compile(r"(?<![\w.-])-?\d[\d,]*(?:\.\d+)?(?![\w])")  # not inside names such as TOP-50
#: an absolute POSIX path of this machine, as it would appear in text
ABSOLUTE = re.compile(r"(?<![\w.~])/(?:tmp|home|root|work|usr|opt|var|mnt|srv|private|Users)/")


# --- synthetic records: exact control over sites, PPLs and blocks ------------------------------------------

def _sites(module: str, layers=range(4)) -> list[str]:
    return [f"layers.{i}.{module}" for i in layers]


def _record(config, sparsity, seed, sparse_sites, params, dense, teal, spon):
    """A record as the runner writes it, with per-block NLLs whose means give the PPLs."""
    rng = np.random.default_rng(zlib.crc32(f"{config}|{sparsity}|{seed}".encode()))
    def blocks(ppl):  # 8 eval blocks, their mean NLL exactly log(ppl)
        noise = rng.normal(0, 0.02, size=8)
        return list(math.log(ppl) + noise - noise.mean())

    dense_b, teal_b, spon_b = blocks(dense), blocks(teal), blocks(spon)
    ppl = {k: math.exp(float(np.mean(v))) for k, v in (("d", dense_b), ("t", teal_b), ("s", spon_b))}
    gap = ppl["t"] - ppl["d"]
    return {"id": f"x::{config}[s={sparsity},seed={seed}]", "config": config, "sparsity": sparsity, "seed": seed,
            "dense_ppl": ppl["d"], "sparse_ppl": ppl["t"], "ppl": ppl["s"],
            "damage_recovered": (ppl["t"] - ppl["s"]) / gap if gap > 0 else None, "spon_params": params,
            "plan": {"sparse_sites": list(sparse_sites)},
            "block_nll": {"dense": dense_b, "sparse": teal_b, "spon": spon_b}}


def mixed_records(seeds=(0, 1)):
    """Two sparsity levels; down_proj configs and an o_proj-only config (ATTN-ONLY, sparsify: biased)."""
    recs = []
    down, o = _sites("down_proj"), _sites("o_proj")
    for s, teal, o_teal in ((0.5, 26.0, 25.0), (0.7, 30.0, 27.0)):
        for seed in seeds:
            j = 0.01 * seed
            recs += [
                _record(BASELINE, s, seed, down, 0, 24.0, teal, teal),
                _record("UNIF-ALL", s, seed, down, 2304, 24.0, teal, teal - 1.2 + j),
                _record("TOP-50", s, seed, down, 1152, 24.0, teal, teal - 1.0 + j),
                _record("BOTTOM-50", s, seed, down, 1152, 24.0, teal, teal - 0.4 + j),
                # lowest PPL of all, but on other sites: never the best down_proj config, never on their frontier
                _record("ATTN-ONLY", s, seed, o, 2304, 24.0, o_teal, o_teal - 0.8 + j),
            ]
    return recs


def test_site_groups_split_configs_by_sparsified_sites():
    groups = summary.site_groups(mixed_records())
    assert [(g["sparsity"], g["main"], g["configs"]) for g in groups] == [
        (0.5, True, [BASELINE, "UNIF-ALL", "TOP-50", "BOTTOM-50"]), (0.5, False, ["ATTN-ONLY"]),
        (0.7, True, [BASELINE, "UNIF-ALL", "TOP-50", "BOTTOM-50"]), (0.7, False, ["ATTN-ONLY"])]
    assert groups[0]["label"] == "down_proj (4 layers)" and groups[1]["label"] == "o_proj (4 layers)"
    assert summary.sites_label(["layers.0.q_proj", "layers.0.k_proj", "layers.1.q_proj"]) == \
        "q_proj (2 layers), k_proj (1 layer)"


def test_pareto_frontier_per_sparsity_and_sparsified_sites():
    groups = summary.pareto_groups(mixed_records())
    assert len(groups) == 4
    for g in groups:
        configs = {p["config"] for p in g["points"]}
        if g["main"]:
            assert "ATTN-ONLY" not in configs
            # TOP-50 (1152 params) beats BOTTOM-50 at the same cost; UNIF-ALL is better still
            assert g["frontier"] == [BASELINE, "TOP-50", "UNIF-ALL"]
        else:
            # its own TEAL at zero parameters (o_proj-only TEAL), then the config
            assert configs == {summary.TEAL_POINT, "ATTN-ONLY"}
            teal = next(p for p in g["points"] if p["config"] == summary.TEAL_POINT)
            assert teal["spon_params"] == 0 and teal["ppl"] == pytest.approx(g["teal_ppl"])
            assert g["teal_ppl"] == pytest.approx(25.0 if g["sparsity"] == 0.5 else 27.0, rel=1e-3)
            assert g["frontier"] == [summary.TEAL_POINT, "ATTN-ONLY"]


def test_headline_picks_the_best_config_of_each_site_set_with_interval_and_test():
    from scipy import stats

    records = mixed_records()
    rows = summary.headline(records)
    assert [(r["sparsity"], r["config"], r["main"]) for r in rows] == [
        (0.5, "UNIF-ALL", True), (0.5, "ATTN-ONLY", False), (0.7, "UNIF-ALL", True), (0.7, "ATTN-ONLY", False)]
    for row in rows:
        mine = [r for r in records if r["config"] == row["config"] and r["sparsity"] == row["sparsity"]]
        assert row["damage_recovered"] == pytest.approx(np.mean([r["damage_recovered"] for r in mine]))
        lo, hi = row["damage_ci"]
        assert lo < row["damage_recovered"] < hi
        diff = np.mean([np.subtract(r["block_nll"]["spon"], r["block_nll"]["sparse"]) for r in mine], axis=0)
        assert row["test"]["p_value"] == pytest.approx(stats.ttest_1samp(diff, 0.0).pvalue)
        assert row["test"]["mean"] < 0  # the biases lower the NLL in these records
    # the o_proj config is compared with o_proj TEAL (25.0), not with BASELINE-TEAL (26.0)
    assert rows[1]["teal_ppl"] == pytest.approx(25.0, rel=1e-3)


def test_bootstrap_interval_is_deterministic_and_narrows_with_more_blocks():
    recs = [r for r in mixed_records(seeds=(0,)) if r["config"] == "UNIF-ALL" and r["sparsity"] == 0.5]
    a, b = summary._bootstrap_damage(recs), summary._bootstrap_damage(recs)
    assert a == b
    wide = [dict(r, block_nll={k: v * 4 for k, v in r["block_nll"].items()}) for r in recs]
    lo, hi = summary._bootstrap_damage(wide)
    assert hi - lo < a[1] - a[0]


def _numbers(text: str) -> set[str]:
    return {m.group(0) for m in NUMBER.finditer(text)}


def _table_numbers(*frames) -> set[str]:
    out: set[str] = set()
    for frame in frames:
        frame = getattr(frame, "data", frame)  # a pandas Styler holds its frame in .data
        flat = frame.reset_index()
        for value in [*flat.columns, *flat.astype(str).to_numpy().ravel()]:
            out |= _numbers(str(value))
    return out


def test_sentences_state_the_table_numbers_synthetic():
    records = mixed_records()
    text = summary.sentences(records)
    assert 3 <= len(text["sentences"]) <= 5
    table = _table_numbers(__import__("pandas").DataFrame(summary.headline_rows(records)))
    points = {summary.fmt_ppl(p["ppl"]) for g in summary.pareto_groups(records) for p in g["points"]}
    params = {summary.fmt_params(p["spon_params"]) for g in summary.pareto_groups(records) for p in g["points"]}
    for sentence in text["sentences"]:
        assert _numbers(sentence) <= table | points | params, sentence
    joined = " ".join(text["sentences"])
    assert "not comparable with the down_proj (4 layers) configs" in joined
    assert "95% interval [" in joined and "p = " in joined
    assert "bootstrap" in text["protocol"] and "paired t-test" in text["protocol"]


# --- a tiny run: the real pipeline ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """One tiny sweep (one sparsity level, a config with other sparsified sites), reported in ``a/``."""
    tmp = tmp_path_factory.mktemp("reader")
    root = tmp / "a"
    root.mkdir()
    toolkit = Toolkit(load_entrypoints=False)
    spec = write_spec(root, replace={
        "seeds: [0, 1]": "seeds: [0]", "sparsity: [0.5]": "sparsity: [0.9]",
        "allocations: [BASELINE-TEAL, UNIF-ALL, TOP-50]":
            "allocations: [BASELINE-TEAL, UNIF-ALL, TOP-50, {name: ATTN-ONLY, options: {sparsify: biased}}]"})
    sweep = run_experiment(load_experiment(spec, toolkit), toolkit=toolkit, output_dir=root / "out",
                           progress=False)
    assert not sweep.errors
    paths = write_report(root / "out/tiny", root / "reports", toolkit)
    return tmp, paths


def test_summary_of_a_tiny_run_equals_its_tables(tiny_report):
    tmp, _ = tiny_report
    results = load_results(tmp / "a/out/tiny")
    text = summary.sentences(results.records)
    tables = _table_numbers(views.headline_table(results), views.ppl_table(results), views.pareto_table(results))
    assert 3 <= len(text["sentences"]) <= 5
    for sentence in text["sentences"]:
        assert _numbers(sentence) <= tables, (sentence, _numbers(sentence) - tables)
    headline = summary.headline_rows(results.records)
    assert [r["sparsified sites"] for r in headline] == ["down_proj (2 layers)", "o_proj (2 layers)"]
    assert headline[0]["best config"] in {"UNIF-ALL", "TOP-50"}


def test_one_sparsity_level_draws_no_empty_panel(tiny_report):
    tmp, _ = tiny_report
    results = load_results(tmp / "a/out/tiny")
    for fig in (views.per_sparsity(results), views.pareto(results), views.ppl_bars(results)):
        for ax in fig.axes:
            assert ax.axison and (ax.lines or ax.collections or ax.patches), ax.get_title()
    assert len(views.per_sparsity(results).axes) == 1
    assert len(views.pareto(results).axes) == 2  # down_proj configs and the o_proj-only config, apart


def test_moved_report_has_no_absolute_path_and_reruns(tiny_report):
    from spon_toolkit.report import execute_notebook

    tmp, paths = tiny_report
    moved = tmp / "moved"
    shutil.copytree(tmp / "a", moved)
    html = (moved / "reports/tiny.html").read_text()
    text = (moved / "reports/tiny.ipynb").read_text()
    for content in (html, text):
        assert str(tmp) not in content and str(tmp.resolve()) not in content
        assert not ABSOLUTE.search(content), ABSOLUTE.search(content).group(0)
    nb = nbformat.reads(text, as_version=4)
    assert nb.cells[2].source == "results_dir = '../out/tiny'"
    # self-contained: nothing fetched (scripts, styles, fonts, images all inline or absent)
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=|@import|url\((?!data:)|src=\"(?!data:)", html)
    # code hidden by default behind one switch; no stderr or traceback in any output
    switch = re.findall(r"<input[^>]*>", html)
    assert [i for i in switch if 'id="spon-show-code"' in i and 'type="checkbox"' in i and "checked" not in i]
    assert html.count('id="spon-show-code"') == 1
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error" or o.get("name") == "stderr"]
    # the moved notebook re-runs where it lies (results path relative to it)
    rerun = nbformat.reads(text, as_version=4)
    assert execute_notebook(rerun, cwd=moved / "reports") == []
    assert export_html(rerun).count("data:image/png;base64") == html.count("data:image/png;base64")


def test_papermill_reruns_with_another_results_dir(tiny_report, tmp_path):
    papermill = pytest.importorskip("papermill", reason="papermill is not installed")
    tmp, _ = tiny_report
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(tmp / "a/reports/tiny.ipynb"), str(out), cwd=str(tmp_path),
                               parameters={"results_dir": str(tmp / "a/out/tiny")}, progress_bar=False,
                               kernel_name="python3")
    nb = nbformat.read(out, as_version=4)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


# --- the page in a real browser ---------------------------------------------------------------------------

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)

#: appended to a copy of the page: measures it after load and writes the verdict into the DOM
PROBE = """
<script>
window.addEventListener("load", () => {
  const visible = el => el.offsetParent !== null && el.getBoundingClientRect().height > 0;
  const imgs = [...document.querySelectorAll(".jp-OutputArea-output img")];
  const codeBefore = [...document.querySelectorAll(".jp-CodeCell .jp-Cell-inputWrapper")].filter(visible).length;
  document.getElementById("spon-show-code").click();
  const codeAfter = [...document.querySelectorAll(".jp-CodeCell .jp-Cell-inputWrapper")].filter(visible).length;
  document.getElementById("spon-show-code").click();
  const errors = [...document.querySelectorAll(
      '[data-mime-type="application/vnd.jupyter.stderr"], .jp-OutputArea-output.jp-RenderedText[data-mime-type*="error"]')]
    .filter(visible).map(e => e.innerText.slice(0, 200));
  const body = document.body.innerText;
  const verdict = {
    images: imgs.map(i => ({complete: i.complete, natural: i.naturalWidth,
                           w: Math.round(i.getBoundingClientRect().width), h: Math.round(i.getBoundingClientRect().height),
                           shown: visible(i)})),
    resources: performance.getEntriesByType("resource").map(r => r.name).filter(n => !n.startsWith("data:")),
    errors: errors, traceback: /Traceback \\(most recent call last\\)|Error:/.test(body),
    codeBefore: codeBefore, codeAfter: codeAfter, title: document.title,
  };
  const out = document.createElement("pre");
  out.id = "spon-probe";
  out.textContent = JSON.stringify(verdict);
  document.body.appendChild(out);
});
</script>
"""


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium_offline(tiny_report, tmp_path):
    _, paths = tiny_report
    page = tmp_path / "page.html"
    page.write_text(paths["html"].read_text().replace("</body>", PROBE + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",  # no network at all
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900", "--virtual-time-budget=10000",
           "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="spon-probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"probe did not run: {proc.stderr[-500:]}"
    verdict = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                         .replace("&gt;", ">"))
    assert verdict["resources"] == []  # nothing requested beyond the page itself
    assert len(verdict["images"]) >= 5
    for img in verdict["images"]:
        assert img["complete"] and img["natural"] > 100 and img["shown"], img
        assert img["w"] >= 300 and img["h"] >= 150, img
    assert verdict["errors"] == [] and not verdict["traceback"]
    assert verdict["codeBefore"] == 0 and verdict["codeAfter"] > 0  # hidden by default, one switch shows them
    assert verdict["title"] == "SPON report: tiny"
