"""`spon doctor`: a healthy install, and simulated missing pieces (blocked built-in, unwritable cache)."""

from __future__ import annotations

import json

import pytest

from spon_toolkit import cli


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SPON_BLOCK_PLUGINS", raising=False)


def doctor(capsys, *extra):
    rc = cli.main(["doctor", "--skip-model", "--json", *extra])
    report = json.loads(capsys.readouterr().out)
    return rc, report, {c["name"]: c for c in report["checks"]}


def test_healthy_install(capsys):
    rc, report, checks = doctor(capsys)
    assert rc == 0 and report["healthy"] is True
    for name in ("torch", "transformers", "pluggy", "device", "user cache", "corpus", "plugins"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["corpus"]["data"] == {"calibration": 234, "validation": 7, "eval": 8}
    assert "every entry validated" in checks["plugins"]["detail"]
    # an empty temporary cache: the model is not cached, which --skip-model reports as a warning only
    assert checks["offline model"]["status"] == "warn" and checks["offline model"]["required"]
    assert checks["sae-lens"]["required"] is False and checks["lm-eval"]["required"] is False


def test_verdict_lines(capsys):
    rc = cli.main(["doctor", "--skip-model"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert lines[-1].startswith("healthy: 0 required check(s) failed")
    assert all(line.split()[0] in ("ok", "warn", "FAIL", "info") for line in lines[:-1])
    assert len(lines) - 1 == len({line[6:20].strip() for line in lines[:-1]})  # one line per check


def test_blocked_builtin_plugin_fails(capsys, monkeypatch):
    monkeypatch.setenv("SPON_BLOCK_PLUGINS", "spon.sparsifiers")
    rc, report, checks = doctor(capsys)
    assert rc == 1 and report["healthy"] is False
    assert checks["plugins"]["status"] == "FAIL"
    assert "sparsifier 'magnitude'" in checks["plugins"]["detail"]
    assert "spon.sparsifiers blocked by SPON_BLOCK_PLUGINS" in checks["plugins"]["detail"]


def test_blocking_an_optional_builtin_only_warns(capsys, monkeypatch):
    monkeypatch.setenv("SPON_BLOCK_PLUGINS", "spon.report_sections")
    rc, report, checks = doctor(capsys)
    assert rc == 0 and checks["plugins"]["status"] == "warn"


def test_unwritable_cache_fails(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SPON_CACHE_DIR", str(blocker / "cache"))
    rc, report, checks = doctor(capsys)
    assert rc == 1
    assert checks["user cache"]["status"] == "FAIL" and "SPON_CACHE_DIR" in checks["user cache"]["detail"]


def test_plugin_with_a_bad_registration_fails(tmp_path, capsys, monkeypatch):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken_sparsifier.py").write_text(
        "from spon_toolkit import hookimpl\n\n"
        "@hookimpl\n"
        "def spon_register_sparsifiers(register):\n"
        "    register('broken', 42)\n")
    rc = cli.main(["--plugins-dir", str(plugins), "doctor", "--skip-model", "--json"])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert rc == 1
    assert "sparsifier 'broken' of plugin 'broken_sparsifier' registered a non-callable int" in checks["plugins"]["detail"]


def test_missing_optional_package_is_a_warning(capsys, monkeypatch):
    from spon_toolkit.builtin import cmd_doctor

    real = cmd_doctor._version
    monkeypatch.setattr(cmd_doctor, "_version", lambda dist: None if dist in ("lm_eval", "sae-lens") else real(dist))
    rc, report, checks = doctor(capsys)
    assert rc == 0
    assert checks["lm-eval"]["status"] == "warn" and "spon-toolkit[lmeval]" in checks["lm-eval"]["detail"]
    assert checks["sae-lens"]["status"] == "warn"
