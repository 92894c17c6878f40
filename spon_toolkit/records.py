"""Per-item record files and locks that let several processes write one run directory.

Layout inside ``runs/run_<stamp>/``::

    items/<name>.json           {"id", "record", "logs"} of one finished item (atomic; written after its
                                checkpoint, so its presence marks the item finished)
    items/<name>.failure.json   {"id", "stage", "error"} of an item whose last attempt failed
    claims/<name>.lock          OS lock held while a process computes the item

Writers cooperate: a process claims an item (non-blocking OS lock; released by the OS when the process
dies, even by kill -9), re-checks that no record exists, computes, writes the record, then rebuilds the
run's aggregated files (``results.json``, ``logs.json``, ``metrics.csv``, ``summary.json``) from every item
record on disk under a short-lived lock (``.aggregate.lock``), so the last rebuild always sees every item.
The experiment directory's ``.lock`` is shared by cooperating writers (``flock`` LOCK_SH) and taken
exclusively by :meth:`ExperimentManager.acquire`, which other writers refuse with one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path
from typing import Any

ITEMS = "items"
CLAIMS = "claims"


def item_file_name(item_id: str) -> str:
    """A file-name-safe, collision-free name for an item id (readable part + 10 hex digits of its hash)."""
    safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", item_id)[:80].lstrip(".") or "item"
    return f"{safe}-{hashlib.sha256(item_id.encode()).hexdigest()[:10]}"


def item_path(run_dir: Path, item_id: str) -> Path:
    return Path(run_dir) / ITEMS / f"{item_file_name(item_id)}.json"


def failure_path(run_dir: Path, item_id: str) -> Path:
    return Path(run_dir) / ITEMS / f"{item_file_name(item_id)}.failure.json"


def read_item_files(run_dir: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, dict[str, str]]]:
    """``(records, logs, failures)`` of every item file in ``run_dir/items`` (a broken file: ConfigError)."""
    from .fileio import load_json_object
    from .results import check_record

    records: dict[str, dict[str, Any]] = {}
    logs: dict[str, Any] = {}
    failures: dict[str, dict[str, str]] = {}
    d = Path(run_dir) / ITEMS
    if not d.is_dir():
        return records, logs, failures
    for path in sorted(d.glob("*.json")):
        data = load_json_object(path, "item record")
        item_id = data.get("id")
        if not isinstance(item_id, str) or path.name not in (item_path(run_dir, item_id).name,
                                                             failure_path(run_dir, item_id).name):
            from .errors import ConfigError

            raise ConfigError(f"{path}: not an item record of this run (its 'id' does not match the file name); "
                              f"delete it (the item re-runs) or start with --fresh")
        if path.name.endswith(".failure.json"):
            failures[item_id] = {"stage": str(data.get("stage")), "error": str(data.get("error"))}
        else:
            records[item_id] = check_record(item_id, data.get("record"), path)
            if data.get("logs") is not None:
                logs[item_id] = data["logs"]
    for item_id in records:
        failures.pop(item_id, None)
    return records, logs, failures


class SharedDirLock:
    """A shared ``flock`` on the experiment directory's ``.lock`` (cooperating writers of one directory).

    ``acquire()`` returns True when this process was the only writer at that moment (it may then clean
    leftovers of interrupted writes); raises :class:`BlockingIOError` when an exclusive holder exists."""

    _held: dict[str, tuple[int, int]] = {}  # path -> (fd, count) in this process

    def __init__(self, path: Path):
        self.path = str(Path(path).resolve())
        self.locked = False

    def acquire(self) -> bool:
        import fcntl

        if self.locked:
            return False
        held = self._held.get(self.path)
        if held is not None:
            self._held[self.path] = (held[0], held[1] + 1)
            self.locked = True
            return False
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        alone = True
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                alone = False
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # downgrade, or join the other cooperators
        except BaseException:
            os.close(fd)
            raise
        self._held[self.path] = (fd, 1)
        self.locked = True
        return alone

    def release(self) -> None:
        if not self.locked:
            return
        self.locked = False
        fd, count = self._held.pop(self.path)
        if count > 1:
            self._held[self.path] = (fd, count - 1)
        else:
            os.close(fd)  # closing the last descriptor drops the flock


class ItemClaim:
    """The OS lock of one item in ``claims/`` (a :class:`filelock.FileLock`)."""

    def __init__(self, run_dir: Path, item_id: str):
        from filelock import FileLock

        d = Path(run_dir) / CLAIMS
        d.mkdir(exist_ok=True)
        self.item_id = item_id
        self.lock = FileLock(str(d / f"{item_file_name(item_id)}.lock"), is_singleton=False, preserve_lock_file=True)

    def try_acquire(self) -> bool:
        from filelock import Timeout

        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            return False
        return True

    def acquire(self) -> None:
        self.lock.acquire(poll_interval=0.2)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.lock.release()


@contextlib.contextmanager
def aggregate_lock(run_dir: Path):
    """Serialises the rebuilds of a run's aggregated files (held for milliseconds)."""
    from filelock import FileLock

    lock = FileLock(str(Path(run_dir) / ".aggregate.lock"), is_singleton=False, preserve_lock_file=True)
    with lock:
        yield


def write_item(run_dir: Path, item_id: str, record: dict[str, Any], logs: Any) -> None:
    from .fileio import atomic_write_json

    (Path(run_dir) / ITEMS).mkdir(exist_ok=True)
    atomic_write_json(item_path(run_dir, item_id), {"id": item_id, "record": record, "logs": logs})
    with contextlib.suppress(FileNotFoundError):
        failure_path(run_dir, item_id).unlink()


def write_failure(run_dir: Path, item_id: str, stage: str, error: str) -> None:
    from .fileio import atomic_write_json

    (Path(run_dir) / ITEMS).mkdir(exist_ok=True)
    atomic_write_json(failure_path(run_dir, item_id), {"id": item_id, "stage": stage, "error": error})


def read_item(run_dir: Path, item_id: str) -> dict[str, Any] | None:
    """The record of one finished item from disk, or None."""
    from .fileio import load_json_object
    from .results import check_record

    path = item_path(run_dir, item_id)
    if not path.is_file():
        return None
    return check_record(item_id, load_json_object(path, "item record").get("record"), path)


__all__ = ["item_file_name", "item_path", "read_item_files", "read_item", "write_item", "write_failure",
           "ItemClaim", "SharedDirLock", "aggregate_lock"]
