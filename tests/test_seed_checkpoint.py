"""Seed ``.pt`` checkpoints: read with weights_only, converted to toolkit checkpoints, refused when hostile."""

from __future__ import annotations

import collections

import pytest
import torch

from spon_toolkit import cli
from spon_toolkit.checkpoint import CheckpointError, load_checkpoint
from spon_toolkit.models import load_model
from spon_toolkit.plugins import Toolkit
from spon_toolkit.seed_checkpoint import import_seed_checkpoint, read_seed_checkpoint
from spon_toolkit.sparse import register_sparsification_hooks, remove_hooks


def _seed_file(path, model, sparsity=0.5, modules=("down_proj",), extra=None):
    g = torch.Generator().manual_seed(3)
    biases = {}
    for i in range(model.config.num_hidden_layers):
        for m in modules:
            out = getattr(model.model.layers[i].mlp if m.endswith(("down_proj", "up_proj", "gate_proj"))
                          else model.model.layers[i].self_attn, m).out_features
            biases[f"layer_{i}_{m}"] = torch.randn(out, generator=g) * 0.1
    biases.update(extra or {})
    torch.save({"config": {"name": "UNIF-ALL", "layer_mask": list(range(model.config.num_hidden_layers)),
                           "modules": list(modules), "capacity_multiplier": 1.0},
                "sparsity": sparsity, "biases": biases,
                "training_args": {"epochs": 10, "learning_rate": 1e-5, "batch_size": 8}}, path)
    return biases


def test_round_trip_gives_identical_biases_and_the_seed_model(tmp_path, tiny_model, tiny_ids):
    toolkit = Toolkit()
    biases = _seed_file(tmp_path / "seed.pt", tiny_model, modules=("down_proj", "o_proj"))
    out = import_seed_checkpoint(tmp_path / "seed.pt", tiny_model, tmp_path / "ck", toolkit=toolkit)
    ckpt = load_checkpoint(out)
    assert ckpt.sparsity == 0.5 and ckpt.metadata["sparsifier"]["name"] == "magnitude"
    assert ckpt.metadata["extra"]["imported_from"]["format"] == "seed .pt"
    for key, tensor in biases.items():
        _, i, m = key.split("_", 2)
        assert torch.equal(ckpt.tensors[f"layers.{i}.{m}"], tensor)
    # the imported checkpoint rebuilds the seed's sparse + SPON model
    with torch.no_grad():
        hooks = register_sparsification_hooks(tiny_model, 0.5, ["down_proj", "o_proj"], spon_biases=biases)
        seed_logits = tiny_model(input_ids=tiny_ids).logits
        remove_hooks(hooks)
        with ckpt.apply(tiny_model, toolkit=toolkit) as sm:
            ours = sm.model(input_ids=tiny_ids).logits
    assert torch.allclose(seed_logits, ours, atol=1e-6)


def test_sparsity_must_agree(tmp_path, tiny_model):
    _seed_file(tmp_path / "seed.pt", tiny_model, sparsity=0.6)
    with pytest.raises(CheckpointError, match="trained at sparsity 0.6, not 0.5"):
        import_seed_checkpoint(tmp_path / "seed.pt", tiny_model, tmp_path / "ck", toolkit=Toolkit(), sparsity=0.5)
    assert not list(tmp_path.glob("ck*"))


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize("payload, match", [
    ({"biases": {"layer_0_down_proj": Evil()}}, "objects other than tensors"),
    ({"biases": {"layer_0_down_proj": collections.OrderedDict()}}, "not a tensor"),
    ({"biases": {"layer_0_down_proj": "text"}}, "is a str, not a tensor"),
    ({"biases": {"layer_0_mlp": torch.zeros(3)}}, "not of the form layer_<i>_<module>"),
    ({"weights": {}}, "no non-empty 'biases' dict"),
    ([torch.zeros(2)], "holds a list"),
])
def test_hostile_or_foreign_files_are_refused_in_one_line(tmp_path, payload, match, capsys):
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=match) as info:
        read_seed_checkpoint(tmp_path / "bad.pt")
    assert "\n" not in str(info.value)
    assert "unpickled!" not in capsys.readouterr().out


def test_cli_import_seed(tmp_path, capsys):
    model, _ = load_model("tiny-random", device="cpu")
    biases = _seed_file(tmp_path / "seed.pt", model, sparsity=0.5)
    assert cli.main(["import-seed", str(tmp_path / "seed.pt"), "--model", "tiny-random", "--sparsity", "0.5",
                     "-o", str(tmp_path / "ck.safetensors")]) == 0
    ckpt = load_checkpoint(tmp_path / "ck.safetensors")
    assert torch.equal(ckpt.tensors["layers.0.down_proj"], biases["layer_0_down_proj"])
    torch.save({"biases": {"layer_0_down_proj": Evil()}}, tmp_path / "evil.pt")
    code = cli.main(["import-seed", str(tmp_path / "evil.pt"), "--model", "tiny-random", "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()
