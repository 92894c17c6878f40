"""Notebook reports: built from a tiny-model sweep's results, executed once, exported to HTML."""

from __future__ import annotations

import nbformat
import pytest
from test_runner import write_spec

from spon_toolkit import cli
from spon_toolkit.experiment import load_experiment
from spon_toolkit.plugins import Toolkit
from spon_toolkit.report import build_notebook
from spon_toolkit.results import load_results
from spon_toolkit.runner import run_experiment

SECTIONS = ["summary", "protocol", "ppl-table", "ppl-bars", "damage-recovered", "pareto", "training-curves", "per-sparsity",
            "latex-table"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    toolkit = Toolkit(load_entrypoints=False)
    exp = load_experiment(write_spec(tmp, replace={"seeds: [0, 1]": "seeds: [0]"}), toolkit)
    sweep = run_experiment(exp, toolkit=toolkit, output_dir=tmp / "out", progress=False)
    assert not sweep.errors
    return tmp


def test_notebook_structure_is_deterministic(sweep_dir):
    toolkit = Toolkit(load_entrypoints=False)
    results = load_results(sweep_dir / "out/tiny")
    reports = sweep_dir / "reports"
    a, b = build_notebook(results, toolkit, reports_dir=reports), build_notebook(results, toolkit, reports_dir=reports)
    assert [c.id for c in a.cells] == [c.id for c in b.cells]
    assert nbformat.writes(a) == nbformat.writes(b)
    ids = [c.id for c in a.cells]
    assert ids[1:4] == ["parameters", "injected-parameters", "setup"]
    assert a.cells[1].metadata.tags == ["parameters"] and a.cells[2].metadata.tags == ["injected-parameters"]
    assert a.cells[2].source == "results_dir = '../out/tiny'"  # relative to the report, never absolute
    for name in SECTIONS:
        assert f"{name}-0" in ids and f"{name}-1" in ids, name
    # cells only read saved results: no model loading, training or evaluation in the notebook
    code = "\n".join(c.source for c in a.cells if c.cell_type == "code")
    for heavy in ("load_model", "evaluate_perplexity", "train(", "run_experiment"):
        assert heavy not in code


def test_report_executes_without_errors(sweep_dir, monkeypatch, capsys):
    monkeypatch.chdir(sweep_dir)
    assert cli.main(["report", "out/tiny", "--reports-dir", "reports"]) == 0
    assert "report: reports/tiny.html" in capsys.readouterr().out
    nb = nbformat.read(sweep_dir / "reports/tiny.ipynb", as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert not [c.id for c in code_cells for o in c.outputs if o.output_type == "error"]
    with_output = {c.id for c in code_cells if c.outputs}
    assert {f"{s}-1" for s in SECTIONS} <= with_output
    images = sum("image/png" in o.get("data", {}) for c in code_cells for o in c.outputs)
    assert images >= 5  # bars, damage, pareto, curves, per-sparsity
    html = (sweep_dir / "reports/tiny.html").read_text()
    assert "Pareto frontier" in html and "data:image/png;base64" in html and "UNIF-ALL" in html
    figures = list((sweep_dir / "out/tiny/runs").glob("run_*/figures/*.png"))
    assert len(figures) >= 5
