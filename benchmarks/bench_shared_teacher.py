"""Main-job wall time with and without the shared dense teacher (same machine, same process, one after the other).

Protocol: the experiment (default ``experiments/quickstart.yaml``, the main job: model load, 5 configs,
analyzers, executed report) is run twice into fresh temporary output directories, first with every item
computing its own teacher targets (``share_teacher=False``, the runner before the shared teacher), then with
the targets computed once per experiment and reused by every item (the default). Wall time covers
``run_experiment`` end to end (model load included); the ``train`` stage total is the sum of the items'
train-stage timings. The aggregated files of the two runs are compared byte for byte.

Run on an otherwise idle machine: ``python benchmarks/bench_shared_teacher.py [SPEC]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

AGGREGATED = ("aggregated/summary.csv", "aggregated/pareto.json", "aggregated/latex_tables/ppl.tex",
              "analysis/statistics.json", "analysis/comparisons.json")


def _run(spec: str, out: Path, share: bool) -> dict:
    from spon_toolkit.experiment import load_experiment
    from spon_toolkit.plugins import Toolkit
    from spon_toolkit.runner import run_experiment

    toolkit = Toolkit()
    exp = load_experiment(spec, toolkit)
    t0 = time.perf_counter()
    sweep = run_experiment(exp, toolkit=toolkit, output_dir=out, resume=False, progress=False,
                           share_teacher=share)
    wall = time.perf_counter() - t0
    if sweep.errors:
        raise SystemExit(f"run failed: {sweep.errors[0]}")
    train = sum(o.record.get("timings", {}).get("train", 0.0) for o in sweep.outcomes)
    teacher = sweep.runner.teacher
    return {"wall_s": round(wall, 1), "train_stage_s": round(train, 1),
            "teacher_hits": teacher.hits if teacher else 0, "teacher_misses": teacher.misses if teacher else 0,
            "run_dir": sweep.runner.manager.run_dir}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default="experiments/quickstart.yaml")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, share in (("per_item_teacher", False), ("shared_teacher", True)):
            runs[name] = _run(args.spec, Path(tmp) / name, share)
            print(name, {k: v for k, v in runs[name].items() if k != "run_dir"}, flush=True)
        # the aggregated files live in the experiment directory, two levels above the run directory
        a, b = (Path(runs[n].pop("run_dir")).parents[1] for n in ("per_item_teacher", "shared_teacher"))
        identical = {rel: (a / rel).read_bytes() == (b / rel).read_bytes() for rel in AGGREGATED if (a / rel).exists()}
    before, after = runs["per_item_teacher"], runs["shared_teacher"]
    print(json.dumps({
        "protocol": f"{args.spec}, run_experiment end to end, per-item teacher first, then shared",
        **runs,
        "wall_saving": round(1 - after["wall_s"] / before["wall_s"], 3),
        "train_stage_saving": round(1 - after["train_stage_s"] / before["train_stage_s"], 3),
        "aggregated_identical": identical,
    }, indent=2))


if __name__ == "__main__":
    main()
