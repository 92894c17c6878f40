"""Export: folded biases in a directory plain transformers loads, sparsification re-attached by the toolkit."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from spon_toolkit import SparseModel, SponBiases, ThresholdSparsifier
from spon_toolkit.checkpoint import CheckpointError, save_checkpoint
from spon_toolkit.errors import ConfigError
from spon_toolkit.export import SPARSIFIER_FILE, export_checkpoint, export_model, load_exported
from spon_toolkit.testing.tiny import make_tiny_llama


def _setup(tiny_ids, bias_sites):
    model = make_tiny_llama(seed=0)
    sp = ThresholdSparsifier(0.6)
    sp.calibrate(model, "down_proj", [tiny_ids])
    biases = SponBiases(model, bias_sites)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in biases.params.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model, sp, biases


def test_reloaded_logits_equal_in_memory_sparse_spon(tmp_path, tiny_ids, builtin_toolkit):
    model, sp, biases = _setup(tiny_ids, "down_proj")
    with SparseModel(model, sp, "down_proj", biases=biases) as sm, torch.no_grad():
        ref = sm(input_ids=tiny_ids).logits
        out = export_model(model, biases, tmp_path / "exp", sparsifier=sp, sparse_sites=sm.sparse_sites)
        assert torch.equal(sm(input_ids=tiny_ids).logits, ref)  # the in-memory model is restored
    assert model.model.layers[0].mlp.down_proj.bias is None and not model.config.mlp_bias
    # plain transformers: only mlp_bias is switched on; gate/up biases are zero, down biases are the betas
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.config.mlp_bias and not plain.config.attention_bias
    layer = plain.model.layers[1].mlp
    assert torch.count_nonzero(layer.gate_proj.bias) == 0 and torch.count_nonzero(layer.up_proj.bias) == 0
    assert torch.allclose(layer.down_proj.bias, biases.beta("layers.1.down_proj").detach())
    assert plain.model.layers[0].self_attn.q_proj.bias is None
    # the toolkit re-attaches the recorded sparsifier: sparse + folded SPON == in-memory sparse + SPON
    sm2, _ = load_exported(out, toolkit=builtin_toolkit)
    with torch.no_grad():
        got = sm2(input_ids=tiny_ids).logits
    assert torch.allclose(got, ref, atol=1e-5)
    assert sm2.sparsifier.thresholds == sp.thresholds
    doc = json.loads((out / SPARSIFIER_FILE).read_text())
    assert doc["bias_flags"] == {"mlp_bias": True} and doc["biased_sites"] == biases.sites


def test_attention_site_enables_attention_bias_only(tmp_path, tiny_ids, builtin_toolkit):
    model, sp, biases = _setup(tiny_ids, ["layers.0.o_proj"])
    with SparseModel(model, sp, "down_proj", biases=biases) as sm, torch.no_grad():
        ref = sm(input_ids=tiny_ids).logits
        out = export_model(model, biases, tmp_path / "exp", sparsifier=sp, sparse_sites=sm.sparse_sites)
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.config.attention_bias and not plain.config.mlp_bias
    assert torch.count_nonzero(plain.model.layers[1].self_attn.o_proj.bias) == 0
    sm2, _ = load_exported(out, toolkit=builtin_toolkit)
    with torch.no_grad():
        assert torch.allclose(sm2(input_ids=tiny_ids).logits, ref, atol=1e-5)


def test_export_from_checkpoint_and_refusals(tmp_path, tiny_ids, builtin_toolkit):
    model, sp, biases = _setup(tiny_ids, "down_proj")
    ckpt = save_checkpoint(tmp_path / "c", biases, model=model, sparsifier=sp, sparse_sites=["down_proj"])
    fresh = make_tiny_llama(seed=0)
    out = export_checkpoint(ckpt, fresh, tmp_path / "exp", toolkit=builtin_toolkit)
    assert (out / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="not empty"):
        export_checkpoint(ckpt, fresh, tmp_path / "exp", toolkit=builtin_toolkit)
    with pytest.raises(CheckpointError, match="weights differ"):
        export_checkpoint(ckpt, make_tiny_llama(seed=3), tmp_path / "exp2", toolkit=builtin_toolkit)
    assert not (tmp_path / "exp2").exists()
    with pytest.raises(ConfigError, match="not a spon export"):
        load_exported(tmp_path, toolkit=builtin_toolkit)
    # nothing half-written next to the outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "exp"]


def test_cli_export_and_train_errors(tmp_path, tiny_ids, capsys):
    from spon_toolkit.cli import main

    model, sp, biases = _setup(tiny_ids, "down_proj")
    # the CLI loads "tiny-random" by name; save a checkpoint trained on that same model
    from spon_toolkit.models import load_model

    tm, _ = load_model("tiny-random")
    b = SponBiases(tm, "down_proj")
    ckpt = save_checkpoint(tmp_path / "c", b, model=tm, sparsifier=sp, sparse_sites=["down_proj"])
    assert main(["export", str(ckpt), "-o", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / SPARSIFIER_FILE).is_file()
    assert main(["export", str(ckpt), "-o", str(tmp_path / "exp")]) == 2
    assert "not empty" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    assert main(["export", str(bad), "-o", str(tmp_path / "exp3")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    for argv, match in [
        (["train", "--model", "tiny-random", "--lr", "0"], "learning rate"),
        (["train", "--model", "tiny-random", "--lr=-1e-3"], "learning rate"),
        (["train", "--model", "tiny-random", "--bias-sites", ""], "nothing to train"),
        (["train", "--model", "tiny-random", "--sparsity", "1.5"], "sparsity"),
        (["train", "--model", "tiny-random", "--trainer", "kll"], "unknown trainer"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1
    assert not (tmp_path / "exp3").exists()
