"""The seed's helper names in spon_toolkit.compat behave like the engine they wrap."""

from __future__ import annotations

import torch

from spon_toolkit import compat
from spon_toolkit.sparse import SparseModel, SponBiases
from spon_toolkit.sparsifiers import MagnitudeSparsifier


def test_patch_and_sparse_linear_match_the_engine(tiny_model, tiny_ids):
    g = torch.Generator().manual_seed(0)
    biases = {f"layer_{i}_down_proj": torch.randn(64, generator=g) * 0.1 for i in range(2)}
    with torch.no_grad():
        dense = tiny_model(input_ids=tiny_ids).logits
        spon = SponBiases(tiny_model, "down_proj")
        spon.load_tensors({f"layers.{i}.down_proj": biases[f"layer_{i}_down_proj"] for i in range(2)})
        with SparseModel(tiny_model, MagnitudeSparsifier(0.5), "down_proj", biases=spon) as sm:
            engine = sm.model(input_ids=tiny_ids).logits
        assert compat.patch_model_for_sparse_forward(tiny_model, 0.5, ["down_proj"], biases) is tiny_model
        patched = tiny_model(input_ids=tiny_ids).logits
        compat.unpatch_model(tiny_model)
        assert torch.equal(tiny_model(input_ids=tiny_ids).logits, dense)
        # SparseLinear swapped in by hand, as the seed's patching did, gives the same model
        mlps = [layer.mlp for layer in tiny_model.model.layers]
        originals = [mlp.down_proj for mlp in mlps]
        for i, mlp in enumerate(mlps):
            mlp.down_proj = compat.SparseLinear(originals[i], 0.5, biases[f"layer_{i}_down_proj"])
        swapped = tiny_model(input_ids=tiny_ids).logits
        for mlp, orig in zip(mlps, originals, strict=True):
            mlp.down_proj = orig
    assert torch.allclose(patched, engine, atol=1e-6)
    assert torch.allclose(swapped, engine, atol=1e-5)
    assert not torch.allclose(engine, dense, atol=1e-3)


def test_activation_collector(tiny_model, tiny_ids):
    with compat.ActivationCollector() as col:
        col.register(tiny_model, layer_indices=[1], module_names=["down_proj", "o_proj", "nonsense"])
        with torch.no_grad():
            out = tiny_model(input_ids=tiny_ids)
        acts = col.get_activations()
        assert sorted(acts) == ["layer_1_down_proj", "layer_1_o_proj"]
        assert acts["layer_1_down_proj"]["input"].shape == (2, 16, 128)
        assert acts["layer_1_down_proj"]["output"].shape == (2, 16, 64)
    assert col.handles == [] and col.activations == {}
    assert out.logits.shape[-1] == 256


def test_reexports():
    from spon_toolkit.train import SPONConfig, SPONTrainer, TrainingArgs

    assert (compat.SPONConfig, compat.TrainingArgs, compat.SPONTrainer) == (SPONConfig, TrainingArgs, SPONTrainer)
    assert compat.get_device("cpu").type == "cpu"
    assert set(compat.__all__) <= set(dir(compat))
