"""The toolkit's one I/O module: atomic writes, the JSON policy, CSV writing, and reading user files safely.

Writes
- Every file the toolkit writes (results, checkpoints, caches, CLI outputs) goes through :func:`atomic_path`:
  the content is written to a temporary file in the target's directory and renamed onto the target; on any
  error the temporary file is removed and the target is left untouched. Files get the usual permissions
  (``0666 & ~umask``), not ``mkstemp``'s ``0600``. :func:`atomic_write_bytes`, :func:`atomic_write_text`,
  :func:`atomic_write_json` and :func:`atomic_write_csv` are built on it.
- **JSON policy** (:func:`to_jsonable`, used by every JSON writer): JSON has no literal for NaN or infinity,
  so a non-finite float is written as the string ``"nan"``, ``"inf"`` or ``"-inf"`` (lossless: a sparsifier
  threshold of +inf must come back as +inf), and :func:`load_json_object` / :func:`decode_nonfinite` read
  those three strings back as floats. Tensors and numpy values become lists / numbers, tuples and sets
  lists, paths and dtypes strings; anything else is a ``TypeError`` (nothing is
  stringified by accident). Documents are written with ``allow_nan=False``, so nothing else can
  produce invalid JSON.
- CSV cells: finite floats as ``repr`` (round-trip), non-finite ones as ``nan`` / ``inf`` / ``-inf`` (what
  pandas and Python's ``float`` read back), None as an empty cell.

Reads

- YAML is read with PyYAML's *safe* loader only (no Python objects), refuses duplicate keys (PyYAML keeps
  the last one silently), and bounds the document: at most :data:`MAX_SPEC_BYTES` of text and at most
  :data:`MAX_NODES` nodes once aliases are expanded (an "alias bomb" of nested anchors is refused before
  anything walks it).
- Text must be UTF-8; binary files are refused with one line.
- JSON documents read back from results directories must be the expected shape (an object); anything else
  is a :class:`~spon_toolkit.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

NONFINITE: dict[str, float] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

MAX_SPEC_BYTES = 1 << 20  # 1 MiB of YAML is far beyond any real experiment spec
MAX_NODES = 100_000  # nodes after alias expansion


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a mapping that repeats a key."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first at line {seen[key].line + 1}); give each key once",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def expanded_size(node: yaml.Node, memo: dict[int, int] | None = None) -> int:
    """Number of nodes of ``node`` with every alias expanded, computed without expanding (memoised)."""
    memo = {} if memo is None else memo
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # cycles (recursive anchors) count once; the constructor refuses them anyway
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(expanded_size(k, memo) + expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[key] = size
    return size


def read_text(path: str | Path, what: str, *, max_bytes: int | None = None) -> str:
    """UTF-8 text of ``path``; a missing, unreadable, binary or oversized file is one line naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a {what}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise ConfigError(f"{path}: the {what} is {len(data):,} bytes, more than the {max_bytes:,} allowed")
    if b"\x00" in data:
        raise ConfigError(f"{path}: the {what} is a binary file, not UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the {what} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                          f"save it as UTF-8") from None


def load_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """Parse a YAML file safely (see the module docstring); errors are one line with the position."""
    path = Path(path)
    text = read_text(path, what, max_bytes=MAX_SPEC_BYTES)
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = expanded_size(node)
        if size > MAX_NODES:
            raise ConfigError(f"{path}: the {what} expands to {size:,} values through YAML aliases (at most "
                              f"{MAX_NODES:,}); write it without nested anchors")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: the {what} is nested too deeply") from None
    finally:
        loader.dispose()


def load_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; corrupt JSON or another shape is one line naming the file."""
    path = Path(path)
    text = read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: the {what} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                          f"restore or delete it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the {what} must be a JSON object, got {type(data).__name__}; restore or delete it")
    return decode_nonfinite(data)


# --- atomic writes ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


# --- the JSON policy --------------------------------------------------------------------------------------

def _float_text(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def to_jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values under the toolkit's policy (see the module docstring)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else _float_text(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "detach"):  # a torch tensor
        obj = obj.detach().cpu()
    if hasattr(obj, "tolist"):  # tensors, numpy arrays and numpy scalars
        return to_jsonable(obj.tolist())
    if type(obj).__module__ == "torch":  # torch.dtype, torch.device
        return str(obj).removeprefix("torch.")
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__} (write numbers, strings, lists, dicts, "
                    f"tensors or paths)")


def decode_nonfinite(obj: Any) -> Any:
    """Undo the policy's encoding: the strings ``"nan"``, ``"inf"``, ``"-inf"`` become floats again."""
    if isinstance(obj, str):
        return NONFINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: decode_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_nonfinite(v) for v in obj]
    return obj


def json_text(obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """``obj`` as JSON text under the policy (ends with a newline when indented)."""
    text = json.dumps(to_jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)
    return text + "\n" if indent is not None else text


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Write ``obj`` as JSON (the policy above) to ``path`` atomically."""
    atomic_write_text(path, json_text(obj, indent=indent, sort_keys=sort_keys))


# --- CSV --------------------------------------------------------------------------------------------------

def _csv_cell(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else _float_text(v)
    return "" if v is None else v


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows as CSV with a header of ``columns`` (other keys ignored)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k)) for k in columns})
    return buf.getvalue()


def atomic_write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    atomic_write_text(path, csv_text(rows, columns))
