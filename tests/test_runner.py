"""The runner end to end on a tiny random Llama and a small local text: sharing, resume, stage errors,
expectations, `spon run`, and pytest collection of exp_*.yaml through pytester."""

from __future__ import annotations

import json
import random
import textwrap

import pytest

from spon_toolkit import cli
from spon_toolkit.errors import UnknownNameError
from spon_toolkit.experiment import load_experiment
from spon_toolkit.plugins import Toolkit
from spon_toolkit.runner import ExperimentRunner, StageError, run_experiment

pytest_plugins = ("pytester",)

WORDS = ("the of and to a in that is for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their").split()

SPEC = """
model: tiny-random
data: {{calibration_source: calib.txt, eval_source: eval.txt, block_size: 32, calibration_blocks: 8,
        eval_blocks: 4, batch_size: 2}}
sparsifier: magnitude
sites: down_proj
sparsity: [0.5]
allocations: [BASELINE-TEAL, UNIF-ALL, TOP-50]
trainer: {{name: kl, options: {{epochs: 2, learning_rate: 0.01, logging_steps: 1, progress: false}}}}
seeds: [0, 1]
report: false
expect:
{expect}
"""
PASSING = "  - spon_params[TOP-50] < spon_params[UNIF-ALL]\n  - sparse_ppl[BASELINE-TEAL] > 0"
FAILING = "  - spon_params[UNIF-ALL] < spon_params[TOP-50]"


def write_texts(directory):
    rng = random.Random(0)
    for name, n in (("calib.txt", 1500), ("eval.txt", 800)):
        (directory / name).write_text(" ".join(rng.choice(WORDS) for _ in range(n)))


def write_spec(directory, expect=PASSING, name="exp_tiny.yaml", replace=None):
    write_texts(directory)
    text = SPEC.format(expect=expect)
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def toolkit():
    return Toolkit(load_entrypoints=False)


AGGREGATED = ("aggregated/summary.csv", "aggregated/pareto.json", "aggregated/latex_tables/ppl.tex",
              "analysis/statistics.json", "analysis/comparisons.json")


@pytest.fixture(scope="module")
def counted_sweep(tmp_path_factory, toolkit):
    """One uninterrupted 6-item sweep, counting model loads and evaluations."""
    import spon_toolkit.evaluate as evaluate
    import spon_toolkit.models as models

    tmp = tmp_path_factory.mktemp("sweep")
    calls = {"load": 0, "eval": []}
    real_load, real_eval = models.load_model, evaluate.evaluate_perplexity

    def counting_load(*a, **k):
        calls["load"] += 1
        return real_load(*a, **k)

    def counting_eval(*a, **k):
        calls["eval"].append(k.get("desc"))
        return real_eval(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_model", counting_load)
        mp.setattr(evaluate, "evaluate_perplexity", counting_eval)
        exp = load_experiment(write_spec(tmp), toolkit)
        sweep = run_experiment(exp, toolkit=toolkit, output_dir=tmp / "out", progress=False)
    return tmp, exp, sweep, calls


def test_sweep_shares_model_dense_and_calibration(counted_sweep):
    tmp, _, sweep, calls = counted_sweep
    assert not sweep.errors and len(sweep.outcomes) == 6
    assert calls["load"] == 1
    # dense once, TEAL once for the sparsity, then one SPON evaluation per trained item (2 configs x 2 seeds)
    assert calls["eval"].count("dense") == 1 and calls["eval"].count("TEAL s=0.5") == 1
    assert len(calls["eval"]) == 2 + 4

    recs = {o.item.name: o.record for o in sweep.outcomes}
    base, unif = recs["BASELINE-TEAL[s=0.5,seed=0]"], recs["UNIF-ALL[s=0.5,seed=1]"]
    assert base["ppl"] == base["sparse_ppl"] and base["spon_params"] == 0 and base["train_steps"] == 0
    assert unif["sparse_ppl"] == base["sparse_ppl"] and unif["dense_ppl"] == base["dense_ppl"]
    assert unif["spon_params"] == 2 * 64 and unif["train_steps"] == 2 * 4  # 8 blocks / batch 2, 2 epochs
    assert recs["TOP-50[s=0.5,seed=0]"]["spon_params"] == 64
    assert unif["achieved_sparsity"] == pytest.approx(0.5)
    assert len(unif["block_nll"]["spon"]) == 4 and unif["protocol"]["block_size"] == 32
    assert unif["protocol"]["text_sha256"] and unif["checkpoint"].startswith("checkpoints/")
    # the seed orders the training batches, so two seeds of a trained config differ
    assert recs["UNIF-ALL[s=0.5,seed=0]"]["ppl"] != unif["ppl"]
    run_dir = sweep.runner.manager.run_dir
    assert (run_dir / unif["checkpoint"]).is_file()
    assert len(json.loads((run_dir / "logs.json").read_text())[unif["id"]]["train_history"]) == 8
    for rel in AGGREGATED:
        assert (tmp / "out/tiny" / rel).is_file()


def test_resume_after_crash_gives_identical_aggregates(counted_sweep, tmp_path, toolkit, monkeypatch):
    uninterrupted, exp, _, _ = counted_sweep

    real = ExperimentRunner._compute
    done = []

    def crashing(self, item):
        if len(done) == 3:
            raise KeyboardInterrupt  # killed between items
        done.append(item.id)
        return real(self, item)

    monkeypatch.setattr(ExperimentRunner, "_compute", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, toolkit=toolkit, output_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(ExperimentRunner, "_compute", real)
    summary = next((tmp_path / "b/tiny/runs").glob("run_*/summary.json"))
    assert json.loads(summary.read_text())["n_finished"] == 3

    sweep = run_experiment(exp, toolkit=toolkit, output_dir=tmp_path / "b", progress=False)
    assert [o.reused for o in sweep.outcomes] == [True] * 3 + [False] * 3
    assert len(list((tmp_path / "b/tiny/runs").iterdir())) == 1
    for rel in AGGREGATED:
        assert (uninterrupted / "out/tiny" / rel).read_bytes() == (tmp_path / "b/tiny" / rel).read_bytes(), rel


def test_stage_errors_name_the_stage(tmp_path, toolkit):
    path = write_spec(tmp_path, expect="  []", replace={
        "[BASELINE-TEAL, UNIF-ALL, TOP-50]": "[BASELINE-TEAL, {name: TOP, options: {fraction: 2}}]"})
    exp = load_experiment(path, toolkit)
    runner = ExperimentRunner(exp, toolkit=toolkit, output_dir=tmp_path / "out", progress=False)
    with pytest.raises(StageError) as info:
        runner.run_item(exp.item("TOP", 0.5, 0))
    assert info.value.stage == "allocate" and "fraction" in str(info.value)
    assert str(info.value).startswith("exp_tiny.yaml::TOP[s=0.5,seed=0]: stage 'allocate' failed")
    summary = json.loads((runner.manager.run_dir / "summary.json").read_text())
    assert summary["failed"]["exp_tiny.yaml::TOP[s=0.5,seed=0]"]["stage"] == "allocate"

    bad_sites = write_spec(tmp_path, expect="  []", replace={"sites: down_proj": "sites: layers.9.down_proj"})
    exp = load_experiment(bad_sites, toolkit)
    runner = ExperimentRunner(exp, toolkit=toolkit, output_dir=tmp_path / "out2", progress=False)
    with pytest.raises(StageError, match="stage 'load' failed"):
        runner.run_item(exp.items()[0])


def test_spon_run_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_spec(tmp_path, expect=FAILING)
    code = cli.main(["run", "exp_tiny.yaml", "-k", "UNIF-ALL and seed=0", "--output-dir", "out"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 1  # the expectation fails
    # one line per finished item with its PPL, counted also when the bar is off (not a terminal)
    assert "exp_tiny.yaml::UNIF-ALL[s=0.5,seed=0]  SPON PPL" in captured.err and "[1/1]" in captured.err
    assert "FAILED exp_tiny.yaml::UNIF-ALL[s=0.5,seed=0]: stage 'expectations' failed" in out
    assert "spon_params[UNIF-ALL] = 128 < spon_params[TOP-50] = 64 is False" in out
    # the expectation needed TOP-50 at the same (sparsity, seed): it was run and recorded too
    results = json.loads(next((tmp_path / "out/tiny/runs").glob("run_*/results.json")).read_text())
    assert sorted(results) == ["exp_tiny.yaml::TOP-50[s=0.5,seed=0]", "exp_tiny.yaml::UNIF-ALL[s=0.5,seed=0]"]
    assert "0 passed, 1 failed" in out and "item" in out.splitlines()[0]


@pytest.mark.parametrize("args, needle", [
    (["run", "exp_bad.yaml"], "exp_bad.yaml: key 'allocations[2].name': unknown allocation strategy 'TOP-5O'"),
    (["run", "exp_bad_s.yaml"], "exp_bad_s.yaml: key 'sparsity[0]'"),
    (["run", "exp_tiny.yaml", "--output-dir", "afile"], "afile: --output-dir names a file"),
    (["run", "exp_rep.yaml", "--reports-dir", "afile"], "afile: --reports-dir names a file"),
    (["report", "out_missing"], "out_missing: results directory not found"),
    (["report", "half"], "aggregated/summary.csv"),
])
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path)
    (tmp_path / "exp_bad.yaml").write_text(spec.read_text().replace("TOP-50]", "TOP-5O]").replace(
        "  - spon_params[TOP-50] < spon_params[UNIF-ALL]\n", ""))
    (tmp_path / "exp_bad_s.yaml").write_text(spec.read_text().replace("sparsity: [0.5]", "sparsity: [-0.1]"))
    (tmp_path / "exp_rep.yaml").write_text(spec.read_text().replace("report: false", "report: true"))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "half").mkdir()
    (tmp_path / "half/metadata.json").write_text("{}")
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err
    assert not (tmp_path / "results").exists()


def test_pytest_collects_experiments(pytester):
    write_spec(pytester.path, expect=FAILING, replace={"seeds: [0, 1]": "seeds: [0]"})
    result = pytester.runpytest("--collect-only", "-q", "exp_tiny.yaml")
    result.stdout.fnmatch_lines(["exp_tiny.yaml::BASELINE-TEAL[[]s=0.5,seed=0[]]",
                                 "exp_tiny.yaml::TOP-50[[]s=0.5,seed=0[]]", "3 tests collected*"])
    # runs that execute items go to a subprocess: pytester's in-process runs forget the modules imported
    # inside them, and C extensions (numpy, torch) cannot be imported twice in one process.
    result = pytester.runpytest_subprocess("-k", "UNIF-ALL", "--spon-output-dir", "out", "exp_tiny.yaml")
    result.assert_outcomes(failed=1, deselected=2)
    result.stdout.fnmatch_lines(["*stage 'expectations' failed*", "*spon_params[[]UNIF-ALL[]] = 128 < *is False*"])
    result = pytester.runpytest_subprocess("-k", "TOP-50 or BASELINE", "--spon-output-dir", "out", "exp_tiny.yaml")
    result.assert_outcomes(passed=2, deselected=1)
    summary = (pytester.path / "out/tiny/aggregated/summary.csv").read_text()
    assert "UNIF-ALL" in summary and "TOP-50" in summary and "BASELINE-TEAL" in summary


def test_pytest_collects_an_explicit_spec_whatever_its_name(pytester):
    write_spec(pytester.path, name="quick.yaml", replace={"seeds: [0, 1]": "seeds: [0]"})
    (pytester.path / "other.yaml").write_text("not: a spec\n")
    result = pytester.runpytest("--collect-only", "-q", "quick.yaml")
    result.stdout.fnmatch_lines(["quick.yaml::UNIF-ALL[[]s=0.5,seed=0[]]", "3 tests collected*"])
    result = pytester.runpytest("--collect-only", "-q", ".")  # inside a directory: exp_*.yaml only
    assert "quick.yaml" not in result.stdout.str() and "other.yaml" not in result.stdout.str()


def test_pytest_reports_spec_errors_at_collection(pytester):
    write_spec(pytester.path, name="exp_bad.yaml")
    bad = pytester.path / "exp_bad.yaml"
    bad.write_text(bad.read_text().replace("sparsity: [0.5]", "sparsity: [0.5, 2]"))
    result = pytester.runpytest("--collect-only", "-q", "exp_bad.yaml")
    result.stdout.fnmatch_lines(["*exp_bad.yaml: key 'sparsity[[]1[]]': Input should be less than or equal to 1*"])
    assert result.ret != 0


class BiasNormAnalyzer:
    """A test plugin: an analyzer that reads the trained biases of the item it is given."""

    __name__ = "bias_norm_test_plugin"

    @staticmethod
    @__import__("spon_toolkit").hookimpl
    def spon_register_analyzers(register):
        def analyze(run, scale=1.0):
            norms = {s: float(t.norm()) * scale for s, t in run.biases.tensors().items()} if run.biases else {}
            return {"item": run.item.id, "sites": sorted(norms), "total": sum(norms.values()),
                    "figures_dir_exists": run.figures_dir.is_dir()}

        register("bias_norm", analyze, "L2 norm of each trained bias")


def test_analyzers_receive_the_trained_item(tmp_path):
    toolkit = Toolkit(load_entrypoints=False, extra_plugins=[BiasNormAnalyzer()])
    path = write_spec(tmp_path, expect="  []", replace={
        "report: false": "report: false\nanalyzers: [{name: bias_norm, options: {scale: 2.0}}]"})
    exp = load_experiment(path, toolkit)
    runner = ExperimentRunner(exp, toolkit=toolkit, output_dir=tmp_path / "out", progress=False)
    record = runner.run_item(exp.item("UNIF-ALL", 0.5, 0)).record
    out = record["analyses"]["bias_norm"]
    assert out["item"] == "exp_tiny.yaml::UNIF-ALL[s=0.5,seed=0]" and out["figures_dir_exists"]
    assert out["sites"] == ["layers.0.down_proj", "layers.1.down_proj"] and out["total"] > 0
    with pytest.raises(UnknownNameError, match="unknown analyzer 'bias_norm'"):
        load_experiment(path, Toolkit(load_entrypoints=False))
