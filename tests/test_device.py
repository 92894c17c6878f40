"""Everything on the model's device: the same checks on the CPU (always) and on CUDA (marked ``cuda``,
skipped without it). On CUDA the model defaults to bfloat16 and the SPON biases stay float32."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_runner import write_spec

from spon_toolkit.experiment import load_experiment
from spon_toolkit.plugins import Toolkit
from spon_toolkit.runner import ExperimentRunner

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


@pytest.mark.parametrize("device", DEVICES)
def test_runner_keeps_model_teacher_and_biases_on_the_models_device(tmp_path, device):
    toolkit = Toolkit(load_entrypoints=False)
    exp = load_experiment(write_spec(tmp_path, expect="  []", replace={
        "model: tiny-random": f"model: {{loader: tiny-random, options: {{device: {device}}}}}",
        "seeds: [0, 1]": "seeds: [0]"}), toolkit)
    runner = ExperimentRunner(exp, toolkit=toolkit, output_dir=tmp_path / "out", progress=False)
    records = [runner.run_item(it, check=False).record for it in exp.items()]
    want = torch.device(device).type
    assert {p.device.type for p in runner._model.parameters()} == {want}
    # the default dtype: float32 on the CPU, bfloat16 on a GPU
    assert next(runner._model.parameters()).dtype == (torch.float32 if want == "cpu" else torch.bfloat16)
    stored = [t for v in runner.teacher.store.values() for t in _tensors(v)]
    assert stored and {t.device.type for t in stored} == {want}
    trained = [r for r in records if r["checkpoint"]]
    assert len(trained) == 2
    for r in records:
        assert torch.isfinite(torch.tensor(r["ppl"])) and r["ppl"] > 1
    for r in trained:
        biases = load_file(str(runner.manager.run_dir / r["checkpoint"]))
        assert biases and all(b.dtype == torch.float32 for b in biases.values())
        assert any(bool(b.abs().sum() > 0) for b in biases.values())  # training moved them


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_forward_and_training_step_on_the_device_match_cpu_float32(device):
    from spon_toolkit import MagnitudeSparsifier, SparseModel, SponBiases
    from spon_toolkit.models import load_tiny_random
    from spon_toolkit.train import KLTrainer

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    losses, logits = {}, {}
    for dev in ("cpu", device):
        model, _ = load_tiny_random(device=dev, dtype="float32")
        sm = SparseModel(model, MagnitudeSparsifier(0.5), "down_proj", biases=SponBiases(model, "down_proj"))
        result = KLTrainer(epochs=2, learning_rate=1e-2, progress=False).train(sm, [ids])
        assert {p.device.type for p in sm.biases.params.values()} == {torch.device(dev).type}
        with torch.no_grad():
            logits[dev] = sm.model(input_ids=ids.to(dev)).logits.float().cpu()
        losses[dev] = result.training_loss
        sm.detach()
    torch.testing.assert_close(torch.tensor(losses[device]), torch.tensor(losses["cpu"]), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(logits[device], logits["cpu"], rtol=1e-3, atol=1e-4)
