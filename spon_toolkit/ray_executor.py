"""``spon run SPEC --executor ray``: the items of an experiment on a Ray cluster.

One long-lived actor per device (a GPU, or a CPU slot on a cluster without GPUs) loads the model once and
keeps the experiment's shared caches (dense and TEAL evaluations, sparsifier calibrations, the shared
dense teacher); the driver hands items to idle actors and is the only process that writes results: each
actor returns the item's record and logs and the driver records them (the checkpoint is written by the
actor into the run directory, so the cluster needs the output directory on a shared file system). A stage
failure comes back as the item's :class:`StageError` and the others go on; an actor whose process dies is
restarted by Ray and its item retried once; an item that kills its worker twice is recorded as failed in
stage ``worker``. Expectations are checked by the driver once every item is in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .experiment import Experiment, Item
from .runner import ExpectationFailed, ExperimentRunner, ItemOutcome, StageError, SweepResult, select_items

MISSING_RAY = "--executor ray needs Ray: pip install 'spon-toolkit[ray]' (the extra 'ray')"


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(MISSING_RAY) from None
    return ray


class _ItemWorker:
    """The actor: one model and one set of shared caches, items computed one after another."""

    def __init__(self, spec_path: str, output_dir: str, run_dir: str, toolkit_kwargs: Mapping[str, Any]):
        from .experiment import load_experiment
        from .plugins import Toolkit
        from .results import RunState, read_json

        toolkit = Toolkit(**dict(toolkit_kwargs))
        experiment = load_experiment(spec_path, toolkit)
        self.runner = ExperimentRunner(experiment, toolkit=toolkit, output_dir=output_dir, progress=False)
        # writes nothing but checkpoints: the run directory is the driver's
        self.runner.manager.run = RunState(Path(run_dir), read_json(Path(run_dir) / "config.json", "run config"))
        self.runner.started = True
        self.items = {it.id: it for it in experiment.items()}

    def compute(self, item_id: str) -> dict[str, Any]:
        import time

        t0 = time.perf_counter()
        try:
            record, logs = self.runner._compute(self.items[item_id])
        except StageError as exc:
            return {"error": str(exc), "stage": exc.stage}
        return {"record": record, "logs": logs, "seconds": time.perf_counter() - t0}


def _cluster_slots(ray, gpus_per_item: float) -> int:
    resources = ray.cluster_resources()
    if gpus_per_item > 0 and resources.get("GPU", 0) > 0:
        return max(1, int(resources["GPU"] // gpus_per_item))
    return max(1, int(resources.get("CPU", 1)))


def run_experiment_ray(experiment: Experiment, *, toolkit, output_dir: str | Path = "results",
                       keyword: str | None = None, resume: bool = True, address: str | None = None,
                       gpus_per_item: float = 1.0, workers: int | None = None,
                       toolkit_kwargs: Mapping[str, Any] | None = None, init_options: Mapping[str, Any] | None = None,
                       on_item: Callable[[Item, ItemOutcome | None, StageError | None], None] | None = None
                       ) -> SweepResult:
    """Like :func:`spon_toolkit.runner.run_experiment`, with the items computed by Ray actors."""
    ray = import_ray()
    if gpus_per_item < 0:
        raise ConfigError(f"--gpus-per-item must be >= 0, got {gpus_per_item}")
    runner = ExperimentRunner(experiment, toolkit=toolkit, output_dir=output_dir, resume=resume, progress=False)
    runner.compute_missing = False  # the driver never computes an item itself
    sweep = SweepResult(experiment, runner)
    items = select_items(experiment, keyword)
    runner.start()
    todo = [it for it in items if not runner.is_finished(it)]
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **dict(init_options or {}))
    try:
        results: dict[str, dict[str, Any]] = {}
        if todo:
            gpus = gpus_per_item if ray.cluster_resources().get("GPU", 0) > 0 else 0
            n = min(len(todo), workers or _cluster_slots(ray, gpus_per_item))
            actor_cls = ray.remote(_ItemWorker).options(num_gpus=gpus, num_cpus=0 if gpus else 1,
                                                        max_restarts=1, max_task_retries=1)
            args = (str(experiment.path), str(Path(output_dir).resolve()), str(runner.manager.run_dir.resolve()),
                    dict(toolkit_kwargs or {}))
            actors = [actor_cls.remote(*args) for _ in range(n)]
            queue = list(todo)
            running: dict[Any, tuple[Any, Item]] = {}
            for actor in actors:
                if queue:
                    item = queue.pop(0)
                    running[actor.compute.remote(item.id)] = (actor, item)
            while running:
                done, _ = ray.wait(list(running), num_returns=1)
                actor, item = running.pop(done[0])
                try:
                    answer = ray.get(done[0])
                except ray.exceptions.RayError as exc:  # the worker died twice (or could not start)
                    answer = {"error": f"{item.id}: stage 'worker' failed: {type(exc).__name__}", "stage": "worker"}
                    actor = None
                if "record" in answer:
                    runner.manager.record(item.id, answer["record"], logs=answer["logs"])
                    runner._records[item.id] = answer["record"]
                else:
                    runner.manager.record_failure(item.id, answer["stage"], answer["error"])
                results[item.id] = answer
                if actor is not None and queue:
                    nxt = queue.pop(0)
                    running[actor.compute.remote(nxt.id)] = (actor, nxt)
                elif actor is None and queue and not running:  # every actor lost: go on with a fresh one
                    fresh = actor_cls.remote(*args)
                    nxt = queue.pop(0)
                    running[fresh.compute.remote(nxt.id)] = (fresh, nxt)
        for item in items:  # in the spec's order, like the local executor
            answer = results.get(item.id)
            outcome, err = None, None
            if answer is not None and "error" in answer:
                err = StageError(item.id, answer["stage"], answer["error"].split(" failed: ", 1)[-1])
                sweep.errors.append(err)
            else:
                outcome = ItemOutcome(item, runner._records[item.id], reused=answer is None,
                                      seconds=0.0 if answer is None else answer["seconds"])
                if item.expectations:
                    outcome.checks = runner.check_expectations(item)
                    failed = [m for ok, m in outcome.checks if not ok]
                    if failed:
                        err = ExpectationFailed(item.id, failed)
                        err.outcome = outcome
                        sweep.errors.append(err)
                sweep.outcomes.append(outcome)
            if on_item is not None:
                on_item(item, outcome, err)
        runner.finish()
    finally:
        if started_ray:
            ray.shutdown()
        runner.manager.release()
    return sweep


__all__ = ["run_experiment_ray", "import_ray", "MISSING_RAY"]
