"""Atomic writes: kept as an import path; the implementation and the JSON policy live in
:mod:`spon_toolkit.fileio`, the toolkit's one I/O module."""

from .fileio import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]
