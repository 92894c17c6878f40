"""SPON checkpoints: round trip, recorded provenance, refusal of mismatches, corrupt files, atomic writes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from spon_toolkit import MagnitudeSparsifier, SparseModel, SponBiases, ThresholdSparsifier
from spon_toolkit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from spon_toolkit.testing.tiny import make_tiny_llama


def _trained(model, sites=("layers.0.down_proj", "layers.1.o_proj"), parametrisation="output", seed=0):
    biases = SponBiases(model, list(sites), parametrisation=parametrisation)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in biases.params.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return biases


@pytest.mark.parametrize("parametrisation", ["output", "input"])
def test_round_trip_restores_logits_and_metadata(tmp_path, tiny_ids, parametrisation, builtin_toolkit):
    model = make_tiny_llama(seed=0)
    sp = ThresholdSparsifier(0.5)
    sp.calibrate(model, ["down_proj", "o_proj"], [tiny_ids])
    biases = _trained(model, parametrisation=parametrisation)
    with SparseModel(model, sp, ["down_proj", "o_proj"], biases=biases) as sm, torch.no_grad():
        ref = sm(input_ids=tiny_ids).logits
        sparse_sites = sm.sparse_sites
    path = save_checkpoint(tmp_path / "run" / "ckpt", biases, model=model, sparsifier=sp, sparse_sites=sparse_sites,
                           training={"trainer": "kl", "learning_rate": 3e-3}, data={"text_sha256": "abc"},
                           metrics={"ppl": 12.5})
    assert path.name == "ckpt.safetensors" and [p.name for p in path.parent.iterdir()] == ["ckpt.safetensors"]
    ckpt = load_checkpoint(path)
    meta = ckpt.metadata
    assert meta["sites"] == ["layers.0.down_proj", "layers.1.o_proj"]
    assert meta["parametrisation"] == parametrisation and meta["sparsity"] == 0.5
    assert meta["sparsifier"]["name"] == "threshold" and set(meta["sparsifier"]["state"]["thresholds"]) == set(sparse_sites)
    assert meta["model"]["fingerprint"].startswith("sha256:") and meta["model"]["n_layers"] == 2
    assert meta["training"]["learning_rate"] == 3e-3 and meta["data"]["text_sha256"] == "abc"
    assert meta["toolkit_version"]
    fresh = make_tiny_llama(seed=0)
    with ckpt.apply(fresh, builtin_toolkit) as sm2, torch.no_grad():
        assert torch.allclose(sm2(input_ids=tiny_ids).logits, ref, atol=1e-6)
    assert ckpt.sparsifier(builtin_toolkit).thresholds == sp.thresholds


def test_infinite_thresholds_survive(tmp_path, tiny_ids, builtin_toolkit):
    model = make_tiny_llama(seed=0)
    sp = ThresholdSparsifier(0.0)  # s = 0 calibrates to -inf (identity)
    sp.calibrate(model, ["down_proj"], [tiny_ids])
    path = save_checkpoint(tmp_path / "c", _trained(model, ["layers.0.down_proj"]), model=model, sparsifier=sp,
                           sparse_sites=["layers.0.down_proj", "layers.1.down_proj"])
    restored = load_checkpoint(path).sparsifier(builtin_toolkit)
    assert all(math.isinf(t) and t < 0 for t in restored.thresholds.values())


def test_refuses_other_model_sites_and_sparsity(tmp_path, builtin_toolkit):
    model = make_tiny_llama(seed=0)
    path = save_checkpoint(tmp_path / "c", _trained(model), model=model, sparsifier=MagnitudeSparsifier(0.5),
                           sparse_sites=["layers.0.down_proj"])
    ckpt = load_checkpoint(path)
    ckpt.validate(model, sites=["layers.0.down_proj", "layers.1.o_proj"], sparsity=0.5)  # the matching case passes
    with pytest.raises(CheckpointError, match="weights differ"):
        ckpt.validate(make_tiny_llama(seed=1))
    with pytest.raises(CheckpointError, match="3 layers"):
        ckpt.validate(make_tiny_llama(seed=0, num_layers=3))
    with pytest.raises(CheckpointError, match="shape"):
        ckpt.validate(make_tiny_llama(seed=0, hidden_size=32, intermediate_size=64), check_fingerprint=False)
    with pytest.raises(CheckpointError, match="other sites"):
        ckpt.validate(model, sites="down_proj")
    with pytest.raises(CheckpointError, match="sparsity 0.5, not 0.6"):
        ckpt.validate(model, sparsity=0.6)
    for err in (CheckpointError,):
        with pytest.raises(err):
            ckpt.apply(make_tiny_llama(seed=2), builtin_toolkit)


def test_corrupt_and_foreign_files(tmp_path):
    model = make_tiny_llama(seed=0)
    good = save_checkpoint(tmp_path / "good", _trained(model), model=model)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(3)}, str(foreign))
    bad_json = tmp_path / "badjson.safetensors"
    save_file({"layers.0.down_proj": torch.zeros(64)}, str(bad_json), metadata={"spon": "{not json"})
    other_format = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(1)}, str(other_format), metadata={"spon": json.dumps({"format": "x/9"})})
    cases = [(truncated, "not a readable safetensors"), (garbage, "not a readable safetensors"),
             (foreign, "no SPON metadata"), (bad_json, "corrupt metadata"), (other_format, "format"),
             (tmp_path / "missing", "does not exist")]
    for path, match in cases:
        with pytest.raises(CheckpointError, match=match) as info:
            load_checkpoint(path)
        assert "\n" not in str(info.value)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    model = make_tiny_llama(seed=0)
    biases = _trained(model)
    save_checkpoint(tmp_path / "c", biases, model=model)
    before = (tmp_path / "c.safetensors").read_bytes()

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with torch.no_grad():
        next(iter(biases.params.values())).add_(1.0)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "c", biases, model=model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]
    assert (tmp_path / "c.safetensors").read_bytes() == before
