"""Results on disk (the seed repository's layout) and their aggregation.

::

    <output_dir>/<experiment>/
      metadata.json                       experiment name, spec file, environment, list of runs
      runs/run_<timestamp>/
        config.json                       the validated spec, its hash and the item ids
        results.json                      {item id: record} of every finished item (numbers + protocol)
        metrics.csv                       one row of scalars per finished item (incl. timings)
        logs.json                         {item id: training history, stage timings}
        summary.json                      status, counts, failures
        checkpoints/<item>.safetensors    trained SPON biases (+ JSON side-car)
        figures/
      aggregated/{summary.csv, pareto.json, latex_tables/ppl.tex}
      analysis/{statistics.json, comparisons.json}

Every file is written atomically (temporary file in the same directory, then ``os.replace``), and an
item counts as finished only once its record is in ``results.json`` -- the last write of an item. A sweep
that is killed and started again continues the latest run with the same spec hash, skips finished
items, and rebuilds the aggregated files from ``results.json`` alone (no timings, stable order), so they
equal those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .aggregate import (  # noqa: F401  (re-exported: results is where users look for them)
    STAT_METRICS,
    SUMMARY_COLUMNS,
    _block_means,
    _group,
    _latex_escape,
    _summary_rows,
    aggregate_statistics,
    compare_to_baseline,
    compute_pareto_frontier,
    latex_ppl_table,
    summarize,
)
from .errors import ConfigError
from .expdata import SEED_SCOPE_MEANING
from .fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, csv_text  # noqa: F401  (re-exported)

BASELINE = "BASELINE-TEAL"
CONFIDENCE = 0.95

#: scalar columns of one item record, in CSV order
RECORD_COLUMNS = (
    "id", "config", "allocation", "sparsity", "seed", "dense_ppl", "sparse_ppl", "ppl", "damage_recovered",
    "spon_params", "n_biased_sites", "n_sparse_sites", "achieved_sparsity", "train_steps", "train_final_loss",
)


# --- atomic writes ------------------------------------------------------------------------------------

def read_json(path: Path, what: str = "file") -> dict[str, Any]:
    """Read a JSON object; a missing, broken or wrongly shaped file is a one-line :class:`ConfigError`."""
    from .fileio import load_json_object

    if not Path(path).exists():
        raise ConfigError(f"{path}: missing {what}; is this a results directory written by 'spon run'?")
    return load_json_object(path, what)


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def check_name(name: Any, what: str, where: Path | str) -> str:
    """A name read from data that becomes a file or directory name: one path component, no '..'."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"{where}: {what} {name!r} is not a safe file name (letters, digits, _ . - only); "
                          f"it would name a file outside its directory; fix or delete the file")
    return name


def check_record(item_id: str, record: Any, where: Path | str) -> dict[str, Any]:
    """A finished item read back from disk: the shape and the ranges the toolkit writes (PPL >= 1, finite).

    An edited or corrupted record is refused rather than resumed and reported."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: the record of '{item_id}' is a {type(record).__name__}, not an object; "
                          f"delete it (the item re-runs) or start with --fresh")
    for key in ("dense_ppl", "sparse_ppl", "ppl"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 1):
            raise ConfigError(f"{where}: the record of '{item_id}' has {key}={value!r}, but a perplexity is a "
                              f"finite number >= 1; the file was edited or corrupted: delete that record (the "
                              f"item re-runs) or start with --fresh")
    sparsity = record.get("sparsity")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity <= 1:
        raise ConfigError(f"{where}: the record of '{item_id}' has sparsity={sparsity!r} (must be in [0, 1]); "
                          f"delete that record or start with --fresh")
    return record


# --- the experiment directory -------------------------------------------------------------------------

def _environment() -> dict[str, Any]:
    import platform
    import sys

    from . import __version__

    env: dict[str, Any] = {"spon_toolkit": __version__, "python": sys.version.split()[0],
                           "platform": platform.platform(), "cpu_count": os.cpu_count()}
    for mod in ("torch", "transformers", "numpy", "pandas"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            env[mod] = None
    try:
        import torch

        env["torch_threads"] = torch.get_num_threads()
        env["cuda"] = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        pass
    return env


def check_output_file(path: str | os.PathLike, key: str = "--output") -> Path:
    """A file the command will write at the end: checked now (not a directory, under a writable directory,
    not under a regular file), so a bad path fails in a second rather than after the work."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: {key} is a directory; give a file name inside it")
    check_output_dir(path.parent if str(path.parent) else ".", key, create=False)
    return path


def check_output_dir(output_dir: str | os.PathLike, key: str = "--output-dir", *, create: bool = True) -> Path:
    """Make sure ``output_dir`` is (or can become) a writable directory; one-line error otherwise.

    With ``create=False`` nothing is created: the nearest existing ancestor must be a writable directory.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: {key} names a file, not a directory; pass a directory path")
    if not create:
        ancestor = path.absolute()
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ConfigError(f"{path}: {key} lies under the file '{ancestor}'; pass a directory path")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ConfigError(f"{path}: {key} is not writable; pass a writable directory")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{path}: {key} cannot be created ({exc.strerror}); pass a writable directory") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: {key} is not writable; pass a writable directory")
    return path


@dataclass
class RunState:
    """What one run directory holds in memory; written back after each finished item."""

    run_dir: Path
    config: dict[str, Any]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    logs: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, dict[str, str]] = field(default_factory=dict)
    resumed: bool = False


_LOCKS: dict[str, Any] = {}  # experiment-directory lock path -> this process's FileLock


class ExperimentManager:
    """Owns ``<output_dir>/<experiment>/``: run directories, per-item records, aggregation.

    Typical use (what :mod:`spon_toolkit.runner` does)::

        mgr = ExperimentManager("results", "allocation")
        mgr.start_run(spec_hash, config={...}, item_ids=[...])
        if not mgr.is_finished(item_id):
            mgr.record(item_id, record, logs=history)     # atomic, after the item's checkpoint
        mgr.aggregate()                                   # aggregated/ + analysis/
    """

    def __init__(self, output_dir: str | os.PathLike, experiment: str):
        self.output_dir = Path(output_dir)
        self.experiment = check_name(experiment, "experiment name", output_dir)
        self.experiment_dir = self.output_dir / experiment
        self.run: RunState | None = None
        self._lock = None
        self._shared = None

    # layout
    @property
    def runs_dir(self) -> Path:
        return self.experiment_dir / "runs"

    @property
    def aggregated_dir(self) -> Path:
        return self.experiment_dir / "aggregated"

    @property
    def analysis_dir(self) -> Path:
        return self.experiment_dir / "analysis"

    @property
    def run_dir(self) -> Path:
        if self.run is None:
            raise RuntimeError("no run started; call start_run() first")
        return self.run.run_dir

    def checkpoint_path(self, item_slug: str) -> Path:
        return self.run_dir / "checkpoints" / f"{item_slug}.safetensors"

    # runs
    def _latest_run(self, spec_hash: str) -> Path | None:
        if not self.runs_dir.is_dir():
            return None
        for run_dir in sorted(self.runs_dir.glob("run_*"), reverse=True):
            cfg = run_dir / "config.json"
            if cfg.is_file():
                try:
                    if read_json(cfg, "run config").get("spec_hash") == spec_hash:
                        return run_dir
                except ConfigError:  # a broken run directory is not resumed; a new run starts beside it
                    continue
        return None

    # one writer per experiment directory
    def _in_use(self, owner: Path) -> ConfigError:
        """The one-line refusal naming the process that holds this experiment directory."""
        try:
            who = json.loads(owner.read_text())
            holder = (f"pid {who.get('pid')} on {who.get('host')} (user {who.get('user')}, since "
                      f"{who.get('since')}, {who.get('command')})")
        except (OSError, ValueError, AttributeError):
            holder = "another process"
        return ConfigError(f"{self.experiment_dir}: in use by {holder}; wait for it to finish or pass "
                           f"another --output-dir")

    def acquire(self) -> None:
        """Take the experiment directory's lock (``.lock``; released when the process ends, even by kill -9).

        A second process on the same directory refuses with one line naming the holder, instead of racing
        on ``results.json``. Leftover temporary files of interrupted atomic writes are removed once the
        lock is held (no other writer can own them)."""
        import getpass
        import socket

        from filelock import FileLock, Timeout

        if self._lock is not None:
            return
        check_output_dir(self.output_dir)
        self.experiment_dir.mkdir(parents=True, exist_ok=True)
        # one FileLock object per path in this process: managers of one process share it (filelock counts
        # re-entries), other processes are excluded
        key = str((self.experiment_dir / ".lock").resolve())
        lock = _LOCKS.setdefault(key, FileLock(key))
        owner = self.experiment_dir / ".lock.owner"
        if lock.is_locked:
            lock.acquire(timeout=0)
            self._lock = lock
            return
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise self._in_use(owner) from None
        self._lock = lock
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "?"
        atomic_write_json(owner, {
            "pid": os.getpid(), "host": socket.gethostname(), "user": user,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv[:3])})
        for tmp in self.experiment_dir.rglob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def join(self) -> None:
        """Join the experiment directory as one of several cooperating writers (a shared OS lock on
        ``.lock``; see :mod:`spon_toolkit.records`). An exclusive holder (:meth:`acquire`) is refused
        with one line; the first writer to arrive removes leftover temporary files."""
        if self._lock is not None or self._shared is not None:
            return
        try:
            import fcntl  # noqa: F401
        except ImportError:  # pragma: no cover - no flock: one writer at a time
            self.acquire()
            return
        from .records import SharedDirLock

        check_output_dir(self.output_dir)
        self.experiment_dir.mkdir(parents=True, exist_ok=True)
        shared = SharedDirLock(self.experiment_dir / ".lock")
        try:
            alone = shared.acquire()
        except BlockingIOError:
            owner = self.experiment_dir / ".lock.owner"
            raise self._in_use(owner) from None
        self._shared = shared
        if alone:
            for tmp in self.experiment_dir.rglob(".*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def claim(self, item_id: str, *, wait: bool = False):
        """Claim ``item_id`` for this process: an acquired :class:`~spon_toolkit.records.ItemClaim`, or
        ``None`` when another process holds it (``wait=True``: block until it is released)."""
        from .records import ItemClaim

        claim = ItemClaim(self.run_dir, item_id)
        if claim.try_acquire():
            return claim
        if not wait:
            return None
        claim.acquire()
        return claim

    def refresh(self) -> None:
        """Re-read the item records that other processes wrote."""
        from .records import read_item_files

        state = self.run
        if state is not None:
            state.results, logs, failures = read_item_files(state.run_dir)
            state.logs.update(logs)
            state.failures = {**{k: v for k, v in state.failures.items() if k not in state.results}, **failures}

    def release(self) -> None:
        if self._shared is not None:
            self._shared.release()
            self._shared = None
        if self._lock is not None:
            self._lock.release()
            if not self._lock.is_locked:
                with contextlib.suppress(OSError):
                    (self.experiment_dir / ".lock.owner").unlink()
            self._lock = None

    def start_run(self, spec_hash: str, config: Mapping[str, Any], item_ids: Sequence[str], *,
                  resume: bool = True, metadata: Mapping[str, Any] | None = None,
                  run_name: str | None = None, run_tag: str | None = None) -> RunState:
        """Continue the latest run with the same ``spec_hash`` (``resume=True``) or create a new one;
        ``run_name`` joins that run (cooperating workers of one sweep). Several processes may do this at
        once: the choice of the run is serialised by a short-lived lock. ``run_tag``: processes of one
        session (pytest-xdist workers) share the run carrying that tag, also when it is a fresh run."""
        from filelock import FileLock

        self.join()
        with FileLock(str(self.experiment_dir / ".start.lock"), is_singleton=False, preserve_lock_file=True):
            return self._start_run(spec_hash, config, item_ids, resume, metadata, run_name, run_tag)

    def _tagged_run(self, spec_hash: str, tag: str) -> Path | None:
        for run_dir in sorted(self.runs_dir.glob("run_*"), reverse=True) if self.runs_dir.is_dir() else []:
            with contextlib.suppress(ConfigError):
                cfg = read_json(run_dir / "config.json", "run config") if (run_dir / "config.json").is_file() else {}
                if cfg.get("spec_hash") == spec_hash and cfg.get("run_tag") == tag:
                    return run_dir
        return None

    def _start_run(self, spec_hash, config, item_ids, resume, metadata, run_name, run_tag=None) -> RunState:
        from .records import read_item_files, write_item

        self._check_same_spec_file((metadata or {}).get("spec_file"))
        if run_name is not None:
            existing = self.runs_dir / check_name(run_name, "run name", self.runs_dir)
            if read_json(existing / "config.json", "run config").get("spec_hash") != spec_hash:
                raise ConfigError(f"{existing}: run '{run_name}' belongs to another version of the spec")
        else:
            existing = self._tagged_run(spec_hash, run_tag) if run_tag is not None else None
            if existing is None and resume:
                existing = self._latest_run(spec_hash)
        if existing is not None:
            state = RunState(existing, read_json(existing / "config.json", "run config"), resumed=True)
            legacy: dict[str, Any] = {}
            if (existing / "results.json").is_file():  # an edited aggregate is refused, not resumed
                path = existing / "results.json"
                legacy = {k: check_record(k, v, path) for k, v in read_json(path, "run results").items()}
            state.results, state.logs, state.failures = read_item_files(existing)
            if legacy and not (existing / "items").is_dir():  # a run written before per-item records
                old_logs = read_json(existing / "logs.json", "run logs") if (existing / "logs.json").is_file() else {}
                for k, v in legacy.items():
                    write_item(existing, k, v, old_logs.get(k))
                state.results, state.logs, state.failures = read_item_files(existing)
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            run_dir = self.runs_dir / f"run_{stamp}"
            n = 1
            while run_dir.exists():
                n += 1
                run_dir = self.runs_dir / f"run_{stamp}-{n}"
            (run_dir / "checkpoints").mkdir(parents=True)
            (run_dir / "figures").mkdir()
            (run_dir / "items").mkdir()
            state = RunState(run_dir, {"experiment": self.experiment, "spec_hash": spec_hash,
                                       "item_ids": list(item_ids), **config,
                                       **({} if run_tag is None else {"run_tag": run_tag})})
            atomic_write_json(run_dir / "config.json", state.config)
        self.run = state
        self._write_metadata(metadata or {})
        self._write_run_files()
        return state

    def _check_same_spec_file(self, spec_file: str | None) -> None:
        """Two spec files with one ``name:`` would overwrite each other's aggregated files: refuse."""
        path = self.experiment_dir / "metadata.json"
        if spec_file is None or not path.is_file():
            return
        previous = read_json(path, "metadata").get("spec_file")
        if not previous or previous == spec_file or not Path(previous).is_file():
            return
        if Path(previous).resolve() != Path(spec_file).resolve():
            raise ConfigError(f"{spec_file}: experiment name '{self.experiment}' is already used by {previous} in "
                              f"{self.output_dir}; give one of them another 'name:' or pass another --output-dir")

    def _write_metadata(self, extra: Mapping[str, Any]) -> None:
        path = self.experiment_dir / "metadata.json"
        meta = read_json(path, "metadata") if path.is_file() else {}
        runs = sorted(p.name for p in self.runs_dir.glob("run_*")) if self.runs_dir.is_dir() else []
        meta.update({"experiment": self.experiment, **extra, "runs": runs, "latest_run": self.run_dir.name,
                     "environment": _environment()})
        atomic_write_json(path, meta)

    def is_finished(self, item_id: str) -> bool:
        """Finished here or by another writer of the run (its record file exists)."""
        from .records import read_item

        if self.run is None:
            return False
        if item_id not in self.run.results:
            record = read_item(self.run.run_dir, item_id)
            if record is None:
                return False
            self.run.results[item_id] = record
        return True

    def finished(self) -> dict[str, dict[str, Any]]:
        return dict(self.run.results) if self.run else {}

    def record(self, item_id: str, record: Mapping[str, Any], logs: Any = None) -> None:
        """Store a finished item: its own record file (atomic; it marks the item finished), then the run's
        aggregated files rebuilt from every item record on disk."""
        from .records import write_item

        state = self.run
        if state is None:
            raise RuntimeError("no run started; call start_run() first")
        state.failures.pop(item_id, None)
        write_item(state.run_dir, item_id, dict(record), logs)
        if logs is not None:
            state.logs[item_id] = logs
        state.results[item_id] = dict(record)
        self._write_run_files()

    def record_failure(self, item_id: str, stage: str, error: str) -> None:
        from .records import write_failure

        if self.run is None:
            raise RuntimeError("no run started; call start_run() first")
        self.run.failures[item_id] = {"stage": stage, "error": error}
        write_failure(self.run.run_dir, item_id, stage, error)
        self._write_run_files()

    def _ordered(self) -> list[dict[str, Any]]:
        state = self.run
        assert state is not None
        order = {i: n for n, i in enumerate(state.config.get("item_ids", []))}
        return [state.results[i] for i in sorted(state.results, key=lambda i: (order.get(i, len(order)), i))]

    def _write_run_files(self) -> None:
        from .records import aggregate_lock

        assert self.run is not None
        with aggregate_lock(self.run.run_dir):
            self.refresh()
            self._write_run_files_locked()

    def _write_run_files_locked(self) -> None:
        state = self.run
        assert state is not None
        records = self._ordered()
        atomic_write_json(state.run_dir / "results.json", {r["id"]: r for r in records})
        atomic_write_json(state.run_dir / "logs.json", {r["id"]: state.logs[r["id"]] for r in records
                                                        if r["id"] in state.logs})
        time_cols = sorted({f"time_{k}_s" for r in records for k in r.get("timings", {})})
        metric_cols = [*RECORD_COLUMNS, *time_cols]
        rows = [{**r, **{f"time_{k}_s": v for k, v in r.get("timings", {}).items()}} for r in records]
        atomic_write_text(state.run_dir / "metrics.csv", csv_text(rows, metric_cols))
        n_items = len(state.config.get("item_ids", []))
        status = "complete" if n_items and all(i in state.results for i in state.config["item_ids"]) else (
            "failed" if state.failures else "partial")
        atomic_write_json(state.run_dir / "summary.json", {
            "experiment": self.experiment, "run": state.run_dir.name, "spec_hash": state.config.get("spec_hash"),
            "status": status, "n_items": n_items, "n_finished": len(records), "n_failed": len(state.failures),
            "finished": [r["id"] for r in records], "failed": state.failures,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })

    # aggregation
    def aggregate(self) -> dict[str, Any]:
        """Rebuild ``aggregated/`` and ``analysis/`` from the run's item records (deterministic)."""
        from .records import aggregate_lock

        assert self.run is not None
        with aggregate_lock(self.run.run_dir):
            self.refresh()
            return self._aggregate_locked()

    def _aggregate_locked(self) -> dict[str, Any]:
        records = self._ordered()
        stat_rows = aggregate_statistics(records)
        comparisons = compare_to_baseline(records)
        from .report.summary import pareto_groups  # one frontier per (sparsity, set of sparsified sites)

        pareto = {"x": "spon_params", "y": "ppl_mean", "by_sparsity": [
            {k: g[k] for k in ("sparsity", "sites", "label", "main", "teal_ppl", "points", "frontier")}
            for g in pareto_groups(records)]}
        atomic_write_text(self.aggregated_dir / "summary.csv", csv_text(_summary_rows(stat_rows), SUMMARY_COLUMNS))
        atomic_write_json(self.aggregated_dir / "pareto.json", pareto)
        atomic_write_text(self.aggregated_dir / "latex_tables" / "ppl.tex", latex_ppl_table(
            stat_rows, caption=f"{self.experiment}: perplexity (mean $\\pm$ std over seeds) and damage recovered."))
        scopes = sorted({r.get("seed_scope", "training") for r in records})
        atomic_write_json(self.analysis_dir / "statistics.json", {
            "confidence": CONFIDENCE, "method": "Student-t interval over seeds (std with ddof=1; "
            "null when only one seed)", "seed_scope": scopes[0] if len(scopes) == 1 else scopes,
            "seed_scope_meaning": {s: SEED_SCOPE_MEANING[s] for s in scopes}, "rows": stat_rows})
        atomic_write_json(self.analysis_dir / "comparisons.json", {
            "baseline": BASELINE, "method": "paired by seed (PPL differences) and by eval block (NLL differences "
            "averaged over seeds; one-sample t-test against 0); negative = lower perplexity than the baseline",
            "comparisons": comparisons})
        return {"statistics": stat_rows, "comparisons": comparisons, "pareto": pareto}


# --- reading results back (reports) -------------------------------------------------------------------

REQUIRED_FILES = ("metadata.json", "aggregated/summary.csv", "aggregated/pareto.json",
                  "analysis/statistics.json", "analysis/comparisons.json")


@dataclass
class Results:
    """A finished experiment directory, loaded for reports (no model, nothing heavy)."""

    experiment_dir: Path
    metadata: dict[str, Any]
    run_dir: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    logs: dict[str, Any]
    statistics: dict[str, Any]
    comparisons: dict[str, Any]
    pareto: dict[str, Any]

    @property
    def name(self) -> str:
        return self.metadata.get("experiment", self.experiment_dir.name)

    def summary_frame(self):
        import pandas as pd

        return pd.read_csv(self.experiment_dir / "aggregated" / "summary.csv")

    def records_frame(self):
        import pandas as pd

        return pd.DataFrame([{k: r.get(k) for k in RECORD_COLUMNS} for r in self.records])


def find_experiment_dirs(path: str | os.PathLike) -> list[Path]:
    """``path`` itself if it is an experiment directory, else its sub-directories that are."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: results directory not found; pass <output-dir>/<experiment> as written by 'spon run'")
    if (path / "metadata.json").is_file() or (path / "runs").is_dir():
        return [path]
    found = sorted(p for p in path.iterdir() if p.is_dir() and (p / "metadata.json").is_file())
    if not found:
        raise ConfigError(f"{path}: missing 'metadata.json' (not an experiment results directory, and no "
                          "sub-directory is one); pass <output-dir>/<experiment>")
    return found


def latest_run_dir(experiment_dir: str | os.PathLike) -> tuple[dict[str, Any], Path | None]:
    """An experiment directory's ``metadata.json`` and the run directory its ``latest_run`` names (``None``
    when it names none). A name that is not one safe path component is a one-line :class:`ConfigError`."""
    d = Path(experiment_dir)
    metadata = read_json(d / "metadata.json", "metadata")
    latest = metadata.get("latest_run")
    if not latest:
        return metadata, None
    return metadata, d / "runs" / check_name(latest, "key 'latest_run'", d / "metadata.json")


def load_results(experiment_dir: str | os.PathLike) -> Results:
    """Load an experiment directory; a missing file is a one-line error naming it."""
    d = Path(experiment_dir)
    for rel in REQUIRED_FILES:
        if not (d / rel).is_file():
            raise ConfigError(f"{d / rel}: missing file '{rel}' of the results layout; re-run 'spon run' on the "
                              "experiment to write it")
    metadata, run_dir = latest_run_dir(d)
    if run_dir is None:
        raise ConfigError(f"{d / 'metadata.json'}: key 'latest_run' is missing; re-run 'spon run'")
    latest = run_dir.name
    check_name(metadata.get("experiment", d.name), "key 'experiment'", d / "metadata.json")
    for rel in ("config.json", "results.json", "logs.json"):
        if not (run_dir / rel).is_file() and rel != "logs.json":
            raise ConfigError(f"{run_dir / rel}: missing file '{rel}' of run '{latest}' (named by key "
                              "'latest_run' in metadata.json)")
    results = {k: check_record(k, v, run_dir / "results.json")
               for k, v in read_json(run_dir / "results.json", "run results").items()}
    logs = read_json(run_dir / "logs.json", "run logs") if (run_dir / "logs.json").is_file() else {}
    return Results(
        experiment_dir=d, metadata=metadata, run_dir=run_dir, config=read_json(run_dir / "config.json"),
        records=list(results.values()), logs=logs,
        statistics=read_json(d / "analysis" / "statistics.json"),
        comparisons=read_json(d / "analysis" / "comparisons.json"),
        pareto=read_json(d / "aggregated" / "pareto.json"),
    )
