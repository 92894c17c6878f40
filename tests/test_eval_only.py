"""Evaluate-only sweeps (spec key ``checkpoints``): the numbers of the sweep that trained the checkpoints."""

from __future__ import annotations

import pytest
from test_runner import write_spec

from spon_toolkit.checkpoint import CheckpointError
from spon_toolkit.errors import ConfigError, SponError
from spon_toolkit.eval_only import checkpoint_dir
from spon_toolkit.experiment import load_experiment
from spon_toolkit.plugins import Toolkit
from spon_toolkit.runner import StageError, run_experiment

KEYS = ("ppl", "dense_ppl", "sparse_ppl", "damage_recovered", "spon_params")


def test_evaluate_only_sweep_reproduces_the_trained_sweep(tmp_path):
    toolkit = Toolkit(load_entrypoints=False)
    one_seed = {"seeds: [0, 1]": "seeds: [0]", "[BASELINE-TEAL, UNIF-ALL, TOP-50]": "[BASELINE-TEAL, TOP-50]"}
    trained = run_experiment(load_experiment(write_spec(tmp_path, expect="  []", replace=one_seed), toolkit),
                             toolkit=toolkit, output_dir=tmp_path / "out", progress=False)
    assert not trained.errors
    ckpt_dir = trained.runner.manager.run_dir / "checkpoints"
    assert list(ckpt_dir.glob("*.safetensors"))
    experiment_dir = ckpt_dir.parent.parent.parent  # <output-dir>/<experiment>: its latest run's checkpoints
    assert checkpoint_dir(None, str(experiment_dir)) == ckpt_dir
    replay_spec = write_spec(tmp_path, expect="  []", name="exp_replay.yaml",
                             replace={**one_seed, "report: false": f"report: false\ncheckpoints: {experiment_dir}"})
    replay = run_experiment(load_experiment(replay_spec, toolkit), toolkit=toolkit, output_dir=tmp_path / "out",
                            progress=False)
    assert not replay.errors
    a = {o.item.name: o.record for o in trained.outcomes}
    b = {o.item.name: o.record for o in replay.outcomes}
    assert a.keys() == b.keys()
    for name in a:
        for key in KEYS:
            assert b[name][key] == pytest.approx(a[name][key], rel=1e-9, abs=1e-12, nan_ok=True), (name, key)
        assert b[name]["block_nll"] == a[name]["block_nll"]
    top = next(n for n in b if n.startswith("TOP-50"))
    assert b[top]["train"]["from_checkpoint"].endswith(".safetensors")
    assert b[top]["train"]["steps"] == a[top]["train"]["steps"]  # the training record comes along


def test_missing_checkpoint_is_one_line(tmp_path):
    toolkit = Toolkit(load_entrypoints=False)
    (tmp_path / "empty").mkdir()
    spec = write_spec(tmp_path, expect="  []", replace={"report: false": "report: false\ncheckpoints: empty"})
    exp = load_experiment(spec, toolkit)
    result = run_experiment(exp, toolkit=toolkit, output_dir=tmp_path / "out", progress=False,
                            keyword="TOP-50 and seed=0")
    assert result.errors and isinstance(result.errors[0], StageError)
    msg = str(result.errors[0])
    assert "no 'TOP-50_s0.5_seed0.safetensors'" in msg and "\n" not in msg
    spec2 = write_spec(tmp_path, expect="  []", name="exp_b.yaml",
                       replace={"report: false": "report: false\ncheckpoints: nowhere"})
    with pytest.raises(SponError, match="checkpoints: 'nowhere' is not a directory"):
        load_experiment(spec2, toolkit)  # before the model loads


def test_checkpoints_from_a_results_directory_refuse_a_hostile_or_missing_latest_run(tmp_path):
    (tmp_path / "metadata.json").write_text('{"latest_run": "../../etc"}')
    with pytest.raises(ConfigError, match="not a safe file name"):
        checkpoint_dir(None, str(tmp_path))
    (tmp_path / "metadata.json").write_text('{"latest_run": "run_1"}')
    with pytest.raises(CheckpointError, match="the latest run has no checkpoints folder"):
        checkpoint_dir(None, str(tmp_path))
    (tmp_path / "metadata.json").write_text('{"runs": []}')
    with pytest.raises(CheckpointError, match="names no latest run"):
        checkpoint_dir(None, str(tmp_path))


def test_spon_eval_checkpoint(tmp_path):
    import json

    import torch

    from spon_toolkit import cli
    from spon_toolkit.data import load_blocks
    from spon_toolkit.evaluate import evaluate_perplexity
    from spon_toolkit.models import load_model
    from spon_toolkit.sparsifiers import MagnitudeSparsifier

    model, tok = load_model("tiny-random", device="cpu")
    g = torch.Generator().manual_seed(0)
    biases = {f"layer_{i}_down_proj": torch.randn(model.config.hidden_size, generator=g) * 0.3
              for i in range(model.config.num_hidden_layers)}
    torch.save({"sparsity": 0.5, "biases": biases}, tmp_path / "seed.pt")
    ck = tmp_path / "ck.safetensors"
    assert cli.main(["import-seed", str(tmp_path / "seed.pt"), "--model", "tiny-random", "-o", str(ck)]) == 0
    (tmp_path / "t.txt").write_text(" ".join(["the state of the union is strong and we are"] * 100))
    assert cli.main(["eval", "--model", "tiny-random", "--data", str(tmp_path / "t.txt"), "--max-blocks", "3",
                     "--block-size", "16", "--batch-size", "2", "--checkpoint", str(ck),
                     "--output", str(tmp_path / "e.json")]) == 0
    rows = {r["sparsifier"]: r for r in json.loads((tmp_path / "e.json").read_text())["results"]}
    assert set(rows) == {"dense", "magnitude+teal", "magnitude+spon"}
    blocks = load_blocks(tok, str(tmp_path / "t.txt"), "eval", 16).head(3)
    from spon_toolkit.checkpoint import load_checkpoint

    want = evaluate_perplexity(model, blocks, sparsifier=MagnitudeSparsifier(0.5), sites="down_proj",
                               biases=load_checkpoint(ck).biases(model), batch_size=2, progress=False)
    assert rows["magnitude+spon"]["perplexity"] == pytest.approx(want.perplexity, rel=1e-9)
    assert rows["magnitude+spon"]["perplexity"] != rows["magnitude+teal"]["perplexity"]
