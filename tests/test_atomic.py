"""The one atomic-write mechanism every writer uses."""

from __future__ import annotations

import os
import stat

import pytest

from spon_toolkit.atomic import atomic_path, atomic_write_text


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
