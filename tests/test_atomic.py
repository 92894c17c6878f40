"""The one atomic-write mechanism every writer uses."""

from __future__ import annotations

import math
import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spon_toolkit.fileio import atomic_path, atomic_write_text


def test_error_inside_the_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write("half")
        raise RuntimeError("writer failed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_new_files_get_the_usual_permissions_and_parent_dirs(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    old = os.umask(0o022)
    try:
        atomic_write_text(path, "x")
    finally:
        os.umask(old)
    assert path.read_text() == "x"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# --- the one JSON policy --------------------------------------------------------------------------------


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet="abcxyz_-. ", max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(alphabet="abc", max_size=3), inner, max_size=4),
    max_leaves=20,
)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b and type(a) is type(b)


@given(value=st.dictionaries(st.text(alphabet="abc", max_size=3), _json_values, max_size=5))
def test_json_policy_round_trips_non_finite_floats(value, tmp_path_factory):
    import json

    from spon_toolkit.fileio import atomic_write_json, load_json_object

    path = tmp_path_factory.mktemp("j") / "doc.json"
    atomic_write_json(path, value)
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))  # strict JSON
    assert _same(load_json_object(path, "doc"), value)


def test_json_policy_encodes_tensors_dtypes_and_paths():
    from pathlib import Path

    import torch

    from spon_toolkit.fileio import to_jsonable

    out = to_jsonable({"t": torch.tensor([1.0, math.inf]), "d": torch.bfloat16, "p": Path("a/b"), "s": (1, 2)})
    assert out == {"t": [1.0, "inf"], "d": "bfloat16", "p": "a/b", "s": [1, 2]}


def test_csv_cells_keep_non_finite_values_readable():
    from spon_toolkit.fileio import csv_text

    text = csv_text([{"a": 0.1, "b": math.nan, "c": None, "d": -math.inf}], ["a", "b", "c", "d"])
    assert text == "a,b,c,d\n0.1,nan,,-inf\n"
    assert [float(x) if x else None for x in text.splitlines()[1].split(",")][3] == -math.inf
