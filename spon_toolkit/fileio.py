"""Reading user files safely: YAML specs and JSON documents from disk.

- YAML is read with PyYAML's *safe* loader only (no Python objects), refuses duplicate keys (PyYAML keeps
  the last one silently), and bounds the document: at most :data:`MAX_SPEC_BYTES` of text and at most
  :data:`MAX_NODES` nodes once aliases are expanded (an "alias bomb" of nested anchors is refused before
  anything walks it).
- Text must be UTF-8; binary files are refused with one line.
- JSON documents read back from results directories must be the expected shape (an object); anything else
  is a :class:`~spon_toolkit.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

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
    return data
