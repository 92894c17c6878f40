"""Many writers on one run directory: per-item records and claims (two processes, one killed mid-item)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from test_runner import AGGREGATED, write_spec

from spon_toolkit.experiment import load_experiment
from spon_toolkit.plugins import Toolkit
from spon_toolkit.runner import run_experiment

WORKER = """
import os, sys, time
from spon_toolkit.experiment import load_experiment
from spon_toolkit.plugins import Toolkit
from spon_toolkit.results import ExperimentManager
from spon_toolkit.runner import ExperimentRunner, run_experiment

victim, log = os.environ.get("SPON_VICTIM"), os.environ["SPON_LOG"]
real_compute, real_record = ExperimentRunner._compute, ExperimentManager.record

def compute(self, item):
    out = real_compute(self, item)  # the checkpoint is written; the record is not yet
    if item.id == victim:
        open(os.environ["SPON_MARKER"], "w").close()
        time.sleep(3600)  # killed here, mid-item
    return out

def record(self, item_id, record, logs=None):
    with open(log, "a") as f:
        f.write(item_id + "\\n")
    return real_record(self, item_id, record, logs)

ExperimentRunner._compute, ExperimentManager.record = compute, record
toolkit = Toolkit(load_entrypoints=False)
sweep = run_experiment(load_experiment("exp_tiny.yaml", toolkit), toolkit=toolkit, output_dir="out", progress=False)
sys.exit(1 if sweep.errors else 0)
"""

pytest_plugins = ("pytester",)


def _wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _n_finished(run_root) -> int:
    files = list(run_root.glob("run_*/items/*.json"))
    return sum(not f.name.endswith(".failure.json") for f in files)


def test_two_processes_one_killed_mid_item_lose_and_duplicate_nothing(tmp_path):
    toolkit = Toolkit(load_entrypoints=False)
    ref = tmp_path / "ref"
    ref.mkdir()
    exp = load_experiment(write_spec(ref, expect="  []"), toolkit)
    assert not run_experiment(exp, toolkit=toolkit, output_dir=ref / "out", progress=False).errors

    work = tmp_path / "work"
    work.mkdir()
    write_spec(work, expect="  []")
    victim = "exp_tiny.yaml::UNIF-ALL[s=0.5,seed=0]"  # the second item
    env = {**os.environ, "SPON_LOG": str(work / "a.log"), "SPON_VICTIM": victim, "SPON_MARKER": str(work / "mark")}
    a = subprocess.Popen([sys.executable, "-c", WORKER], cwd=work, env=env)
    b = None
    try:
        _wait_for(lambda: (work / "mark").exists() or a.poll() is not None, 240, "worker A to reach the item")
        assert a.poll() is None
        b = subprocess.Popen([sys.executable, "-c", WORKER], cwd=work,
                             env={**env, "SPON_LOG": str(work / "b.log"), "SPON_VICTIM": ""})
        # B takes every item but the one A holds, then waits for A's claim
        _wait_for(lambda: _n_finished(work / "out/tiny/runs") == 5 or b.poll() is not None, 240, "worker B")
        assert b.poll() is None  # still waiting for the claimed item
        a.send_signal(signal.SIGKILL)  # kill -9 mid-item: its checkpoint is written, its record is not
        a.wait()
        assert b.wait(timeout=240) == 0
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    done_a = (work / "a.log").read_text().split()
    done_b = (work / "b.log").read_text().split()
    assert victim not in done_a and victim in done_b
    assert sorted(done_a + done_b) == sorted(it.id for it in exp.items())  # each item recorded exactly once
    runs = list((work / "out/tiny/runs").iterdir())
    assert len(runs) == 1
    results = json.loads((runs[0] / "results.json").read_text())
    assert list(results) == [it.id for it in exp.items()]
    for rel in AGGREGATED:
        assert (ref / "out/tiny" / rel).read_bytes() == (work / "out/tiny" / rel).read_bytes(), rel


def test_cooperating_writers_share_the_directory_and_an_exclusive_holder_is_refused(tmp_path):
    from spon_toolkit.errors import ConfigError
    from spon_toolkit.results import ExperimentManager

    a, b = ExperimentManager(tmp_path, "e"), ExperimentManager(tmp_path, "e")
    a.start_run("h", {"spec": {}}, ["x", "y"])
    b.start_run("h", {"spec": {}}, ["x", "y"])
    assert a.run_dir == b.run_dir
    claim = a.claim("x")
    assert claim is not None and b.claim("x") is None  # one claimant per item
    a.record("x", {"id": "x", "config": "C", "sparsity": 0.5, "seed": 0, "dense_ppl": 2.0, "sparse_ppl": 3.0,
                   "ppl": 2.5})
    claim.release()
    assert b.is_finished("x") and not b.is_finished("y")  # seen from the other writer
    a.release()
    b.release()
    holder = subprocess.Popen(
        [sys.executable, "-c", "from spon_toolkit.results import ExperimentManager; import sys; "
         "m = ExperimentManager(sys.argv[1], 'e'); m.acquire(); print('locked', flush=True); sys.stdin.read()",
         str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by pid {holder.pid}"):
            ExperimentManager(tmp_path, "e").start_run("h", {"spec": {}}, ["x"])
    finally:
        holder.kill()
        holder.wait()


def test_shared_teacher_gives_the_same_biases_as_the_per_item_teacher(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from spon_toolkit.runner import ExperimentRunner
    from spon_toolkit.train.trainers import LogitDistillationTrainer

    toolkit = Toolkit(load_entrypoints=False)
    exp = load_experiment(write_spec(tmp_path, expect="  []"), toolkit)
    calls = []
    real = LogitDistillationTrainer.teacher_targets
    monkeypatch.setattr(LogitDistillationTrainer, "teacher_targets",
                        lambda self, sm, ids: calls.append(1) or real(self, sm, ids))
    runs = {}
    for shared in (True, False):
        calls.clear()
        runner = ExperimentRunner(exp, toolkit=toolkit, output_dir=tmp_path / f"out{shared}", progress=False)
        runner.share_teacher = shared
        records = [runner.run_item(it, check=False).record for it in exp.items()]
        runs[shared] = (records, runner.manager.run_dir, len(calls))
    trained = [r for r in runs[True][0] if r["checkpoint"]]
    assert len(trained) == 4
    # 4 training batches: computed once for the experiment vs once per trained item (2 epochs use the cache)
    assert runs[True][2] == 4 and runs[False][2] == 4 * len(trained)
    for r_shared, r_item in zip(runs[True][0], runs[False][0], strict=True):
        assert r_shared["ppl"] == r_item["ppl"] and r_shared["train_final_loss"] == r_item["train_final_loss"]
        if r_shared["checkpoint"]:
            a = load_file(str(runs[True][1] / r_shared["checkpoint"]))
            b = load_file(str(runs[False][1] / r_item["checkpoint"]))
            assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_threshold_calibration_is_collected_once_and_fits_every_sparsity_level(tmp_path, monkeypatch):
    from spon_toolkit.runner import ExperimentRunner
    from spon_toolkit.sparsifiers import ThresholdSparsifier

    toolkit = Toolkit(load_entrypoints=False)
    exp = load_experiment(write_spec(tmp_path, expect="  []", replace={
        "sparsifier: magnitude": "sparsifier: threshold", "sparsity: [0.5]": "sparsity: [0.4, 0.7]"}), toolkit)
    collected = []
    real = ThresholdSparsifier.collect_calibration
    monkeypatch.setattr(ThresholdSparsifier, "collect_calibration",
                        lambda self, *a, **k: collected.append(1) or real(self, *a, **k))
    runner = ExperimentRunner(exp, toolkit=toolkit, output_dir=tmp_path / "out", progress=False)
    runner._load()
    shared = {s: runner.sparsifier(s) for s in (0.4, 0.7)}
    assert len(collected) == 1
    for s, sp in shared.items():  # same thresholds as calibrating each level on its own
        alone = ThresholdSparsifier(s)
        alone.calibrate(runner._model, sp.thresholds, runner._batches(runner._data.calibration),
                        sitemap=runner._sitemap)
        assert alone.thresholds == sp.thresholds and len(sp.thresholds) == 2
    assert all(shared[0.4].thresholds[k] < shared[0.7].thresholds[k] for k in shared[0.4].thresholds)


def test_pytest_xdist_two_workers_run_a_tiny_spec_like_spon_run(tmp_path, pytester):
    pytest.importorskip("xdist")
    toolkit = Toolkit(load_entrypoints=False)
    ref = tmp_path / "ref"
    ref.mkdir()
    exp = load_experiment(write_spec(ref), toolkit)  # expectations compare items run by other workers
    assert not run_experiment(exp, toolkit=toolkit, output_dir=ref / "out", progress=False).errors

    write_spec(pytester.path)
    result = pytester.runpytest_subprocess("-n", "2", "-v", "exp_tiny.yaml", "--spon-output-dir", "out")
    result.assert_outcomes(passed=6)
    out = result.stdout.str()
    assert re.search(r"\[gw0\][^\n]*PASSED", out) and re.search(r"\[gw1\][^\n]*PASSED", out), out  # both worked
    runs = list((pytester.path / "out/tiny/runs").iterdir())
    assert len(runs) == 1  # both workers joined one run
    results = json.loads((runs[0] / "results.json").read_text())
    assert list(results) == [it.id for it in exp.items()]
    for rel in AGGREGATED:
        assert (ref / "out/tiny" / rel).read_bytes() == (pytester.path / "out/tiny" / rel).read_bytes(), rel


def test_worker_device_follows_the_index_and_the_override(monkeypatch):
    from spon_toolkit.errors import ConfigError
    from spon_toolkit.scaleout import worker_device

    assert worker_device(3, "0,2") == 2 and worker_device(0, "5") == 5
    with pytest.raises(ConfigError, match="SPON_DEVICES"):
        worker_device(0, "a,b")
    monkeypatch.delenv("SPON_DEVICES", raising=False)
    import torch

    expected = None if not torch.cuda.is_available() else 1 % torch.cuda.device_count()
    assert worker_device(1) == expected


def test_cpu_workers_split_the_cores_instead_of_oversubscribing(monkeypatch):
    import torch

    from spon_toolkit.scaleout import cpu_threads, use_worker_device

    assert cpu_threads(2, cores=2) == 1 and cpu_threads(4, cores=16) == 4 and cpu_threads(8, cores=2) == 1
    assert cpu_threads(1, cores=6) == 6
    if not torch.cuda.is_available():
        before = torch.get_num_threads()
        try:
            assert use_worker_device(0, workers=10**6) == "cpu" and torch.get_num_threads() == 1
        finally:
            torch.set_num_threads(before)


KILLER = '''
import os
from spon_toolkit.hookspecs import hookimpl
from spon_toolkit.train import KLTrainer

MARKER = {marker!r}


class KillOnce(KLTrainer):
    """KL, but the first item to train kills its worker process (like an OOM kill or a lost node)."""

    def train(self, sm, batches, **kwargs):
        if not os.path.exists(MARKER):
            open(MARKER, "w").close()
            os._exit(1)
        return super().train(sm, batches, **kwargs)


@hookimpl
def spon_register_trainers(register):
    register("kl_kill_once", KillOnce, description="test trainer")
'''


@pytest.fixture
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_executor_matches_local_and_retries_a_killed_worker(tmp_path, ray_cluster):
    from spon_toolkit.ray_executor import run_experiment_ray

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "killer.py").write_text(KILLER.format(marker=str(tmp_path / "killed")))
    kwargs = {"plugins_dir": str(plugins), "load_entrypoints": False}
    toolkit = Toolkit(**kwargs)
    replace = {"name: kl,": "name: kl_kill_once,", "seeds: [0, 1]": "seeds: [0]"}
    ref = tmp_path / "ref"
    ref.mkdir()
    (tmp_path / "killed").touch()  # the local reference run is not killed
    exp = load_experiment(write_spec(ref, replace=replace), toolkit)
    assert not run_experiment(exp, toolkit=toolkit, output_dir=ref / "out", progress=False).errors
    (tmp_path / "killed").unlink()

    work = tmp_path / "work"
    work.mkdir()
    exp = load_experiment(write_spec(work, replace=replace), toolkit)
    seen = []
    sweep = run_experiment_ray(exp, toolkit=toolkit, output_dir=work / "out", toolkit_kwargs=kwargs,
                               on_item=lambda item, outcome, err: seen.append((item.id, err)))
    assert (tmp_path / "killed").exists()  # a worker was killed mid-item ...
    assert not sweep.errors and [e for _, e in seen] == [None] * 3  # ... and its item retried
    assert [i for i, _ in seen] == [it.id for it in exp.items()]
    for rel in AGGREGATED:
        assert (ref / "out/tiny" / rel).read_bytes() == (work / "out/tiny" / rel).read_bytes(), rel


def test_ray_executor_without_ray_is_one_line(tmp_path, monkeypatch, capsys):
    import builtins

    from spon_toolkit import cli

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    monkeypatch.chdir(tmp_path)
    write_spec(tmp_path)
    assert cli.main(["run", "exp_tiny.yaml", "--executor", "ray", "--output-dir", "out"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --executor ray needs Ray: pip install 'spon-toolkit[ray]' (the extra 'ray')"
    assert not (tmp_path / "out").exists()
