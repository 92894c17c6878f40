"""Perplexity: hand-computed NLLs, token weighting, sparse evaluation, biases, the protocol, ``spon eval``."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from spon_toolkit import compute_perplexity
from spon_toolkit.cli import main
from spon_toolkit.data import TextSource, make_blocks
from spon_toolkit.errors import ConfigError, SponError
from spon_toolkit.evaluate import evaluate_perplexity
from spon_toolkit.models import ENV_CACHE_DIR, byte_tokenizer, load_model
from spon_toolkit.sparse import SponBiases
from spon_toolkit.sparsifiers import MagnitudeSparsifier, ThresholdSparsifier


class FixedDistribution(nn.Module):
    """Predicts the same next-token distribution at every position: p = (1/2, 1/4, 1/4, 0, ...)."""

    def __init__(self, vocab: int = 8):
        super().__init__()
        probs = torch.zeros(vocab)
        probs[:3] = torch.tensor([0.5, 0.25, 0.25])
        self.register_buffer("log_probs", probs.log())
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=64, _name_or_path="fixed")

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.log_probs.expand(b, t, -1).clone())


def test_perplexity_matches_a_hand_computed_nll():
    model = FixedDistribution()
    # predicted tokens: 1, 2, 0 | 0, 0, 0  -> NLLs ln4, ln4, ln2 | ln2, ln2, ln2
    ids = torch.tensor([[0, 1, 2, 0], [1, 0, 0, 0]])
    result = compute_perplexity(model, [ids], "cpu")
    expected = (2 * math.log(4) + 4 * math.log(2)) / 6  # = 8 ln2 / 6
    assert result.mean_nll == pytest.approx(expected, rel=1e-6)  # logits are float32
    assert result.perplexity == pytest.approx(2 ** (8 / 6), rel=1e-6)
    assert result.n_tokens == 6
    assert result.block_nlls == pytest.approx([(2 * math.log(4) + math.log(2)) / 3, math.log(2)], rel=1e-6)
    assert result["perplexity"] == result.perplexity  # seed code reads results like dicts


def test_perplexity_is_token_weighted_not_block_weighted():
    model = FixedDistribution()
    ids = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # the second sequence predicts one token
    result = compute_perplexity(model, [{"input_ids": ids, "attention_mask": mask}], "cpu")
    assert result.block_tokens == [3, 1]
    token_weighted = (3 * math.log(4) + 1 * math.log(2)) / 4
    block_weighted = (math.log(4) + math.log(2)) / 2
    assert result.mean_nll == pytest.approx(token_weighted, rel=1e-6)
    assert result.mean_nll != pytest.approx(block_weighted)


def test_real_llama_matches_explicit_log_softmax(tiny_model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 12), generator=g)
    result = compute_perplexity(tiny_model, [ids[:2], ids[2:]], "cpu")
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(ids).logits.double(), dim=-1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert result.mean_nll == pytest.approx(float(nll.mean()), rel=1e-6)
    assert result.block_nlls == pytest.approx(nll.mean(dim=1).tolist(), rel=1e-6)


@pytest.fixture
def tiny_blocks(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "cache"))
    text = TextSource("demo.txt", None, "The union is strong and the text is long enough. " * 12)
    return make_blocks(byte_tokenizer(), text, 32)


def test_protocol_is_recorded(tiny_model, tiny_blocks):
    result = evaluate_perplexity(tiny_model, tiny_blocks, batch_size=4)
    p = result.protocol
    assert p["block_size"] == 32 and p["n_blocks"] == len(tiny_blocks) and p["text_source"] == "demo.txt"
    assert p["text_sha256"] == tiny_blocks.text_sha256 and p["dtype"] == "float32"
    assert p["model_fingerprint"].startswith("sha256:") and p["model"]
    assert result.n_tokens == len(tiny_blocks) * 31 == p["predicted_tokens"]
    assert len(result.block_nlls) == len(tiny_blocks)
    assert math.exp(sum(result.block_nlls) / len(result.block_nlls)) == pytest.approx(result.perplexity)
    assert evaluate_perplexity(tiny_model, tiny_blocks, max_blocks=3).protocol["n_blocks"] == 3


def test_sparse_evaluation_and_achieved_sparsity(tiny_model, tiny_blocks):
    dense = evaluate_perplexity(tiny_model, tiny_blocks)
    zero = evaluate_perplexity(tiny_model, tiny_blocks, sparsifier=MagnitudeSparsifier(0.0), sites="down_proj")
    assert zero.perplexity == pytest.approx(dense.perplexity, rel=1e-12)
    half = evaluate_perplexity(tiny_model, tiny_blocks, sparsifier=MagnitudeSparsifier(0.5), sites="down_proj")
    assert half.perplexity != pytest.approx(dense.perplexity, rel=1e-6)
    assert set(half.achieved_sparsity_by_site) == {"layers.0.down_proj", "layers.1.down_proj"}
    assert all(v == pytest.approx(0.5) for v in half.achieved_sparsity_by_site.values())  # d=128 keeps exactly 64
    assert half.achieved_sparsity_by_module == pytest.approx({"down_proj": 0.5}) and half.achieved_sparsity == pytest.approx(0.5)
    assert half.protocol["sparsifier"] == "magnitude(sparsity=0.5)" and half.protocol["n_sparse_sites"] == 2
    # the model is left dense: no hooks, same logits
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in tiny_model.modules())
    assert evaluate_perplexity(tiny_model, tiny_blocks).perplexity == dense.perplexity


def test_threshold_sparsifier_must_be_calibrated_and_reports_sparsity(tiny_model, tiny_blocks):
    with pytest.raises(SponError, match="not calibrated"):
        evaluate_perplexity(tiny_model, tiny_blocks, sparsifier=ThresholdSparsifier(0.5), sites="mlp")
    sparsifier = ThresholdSparsifier(0.5)
    sparsifier.calibrate(tiny_model, "mlp", tiny_blocks.batches(4))
    result = evaluate_perplexity(tiny_model, tiny_blocks, sparsifier=sparsifier, sites="mlp")
    assert set(result.achieved_sparsity_by_module) == {"gate_proj", "up_proj", "down_proj"}
    # Calibrated on this very text: layer 0's gate/up see the dense inputs they were calibrated on, so
    # they hit the target; later sites see inputs changed by upstream sparsification and drift.
    assert result.achieved_sparsity_by_site["layers.0.gate_proj"] == pytest.approx(0.5, abs=1e-3)
    assert result.achieved_sparsity_by_site["layers.0.up_proj"] == pytest.approx(0.5, abs=1e-3)
    assert all(0.2 < v < 0.8 for v in result.achieved_sparsity_by_site.values())
    down_only = ThresholdSparsifier(0.5)
    down_only.calibrate(tiny_model, "down_proj", tiny_blocks.batches(4))
    result = evaluate_perplexity(tiny_model, tiny_blocks, sparsifier=down_only, sites="down_proj")
    assert result.achieved_sparsity_by_site["layers.0.down_proj"] == pytest.approx(0.5, abs=1e-3)
    assert result.achieved_sparsity_by_site["layers.1.down_proj"] == pytest.approx(0.5, abs=0.02)


def test_biases_object_seed_dict_and_folded_agree(tiny_model, tiny_blocks):
    sparse = MagnitudeSparsifier(0.5)
    biases = SponBiases(tiny_model, "down_proj")
    with torch.no_grad():
        for i, p in enumerate(biases.params.values()):
            p.copy_(torch.linspace(-0.5, 0.5, p.numel()) * (i + 1))
    plain = evaluate_perplexity(tiny_model, tiny_blocks, sparsifier=sparse, sites="down_proj")
    hooked = evaluate_perplexity(tiny_model, tiny_blocks, sparsifier=sparse, sites="down_proj", biases=biases)
    assert hooked.perplexity != pytest.approx(plain.perplexity, rel=1e-6)
    assert hooked.protocol["biases"]["parameters"] == 2 * 64
    seed = compute_perplexity(tiny_model, tiny_blocks.dataloader(8), "cpu", use_sparse=True, sparsity=0.5,
                              spon_biases=biases.seed_dict())
    assert seed.perplexity == pytest.approx(hooked.perplexity, rel=1e-6)
    biases.fold()
    folded = evaluate_perplexity(tiny_model, tiny_blocks, sparsifier=sparse, sites="down_proj")
    biases.unfold()
    assert folded.perplexity == pytest.approx(hooked.perplexity, rel=1e-5)


def test_compute_perplexity_seed_signature_errors(tiny_model, tiny_blocks):
    with pytest.raises(ConfigError, match="needs a sparsity"):
        compute_perplexity(tiny_model, tiny_blocks, "cpu", use_sparse=True)
    with pytest.raises(ConfigError, match="must be in \\[0, 1\\]"):
        compute_perplexity(tiny_model, tiny_blocks, "cpu", use_sparse=True, sparsity=1.5)
    with pytest.raises(ConfigError, match="layer_<i>_<module>"):
        compute_perplexity(tiny_model, tiny_blocks, "cpu", spon_biases={"layer_x_down_proj": torch.zeros(64)})


def test_block_size_beyond_context_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path))
    model, tok = load_model("tiny-random", device="cpu", max_position_embeddings=16)
    blocks = make_blocks(tok, TextSource("t", None, "x" * 100), 32)
    with pytest.raises(ConfigError, match="larger than the model's context of 16 tokens"):
        evaluate_perplexity(model, blocks)


def test_spon_eval_cli_table_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "cache"))
    (tmp_path / "eval.txt").write_text("Evaluation text for the command line. " * 30, encoding="utf-8")
    (tmp_path / "calib.txt").write_text("Other words calibrate the thresholds here. " * 30, encoding="utf-8")
    out = tmp_path / "out" / "eval.json"
    code = main(["eval", "--model", "tiny-random", "--device", "cpu", "--data", str(tmp_path / "eval.txt"),
                 "--calib-data", str(tmp_path / "calib.txt"), "--calib-blocks", "8", "--block-size", "32",
                 "--sparsifier", "threshold", "--sparsity", "0.3", "0.6", "--sites", "mlp", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "threshold" in printed and "down=" in printed and "sha256" in printed
    payload = json.loads(out.read_text())
    rows = payload["results"]
    assert [r["sparsifier"] for r in rows] == ["dense", "threshold", "threshold"]
    assert [r["sparsity"] for r in rows] == [None, 0.3, 0.6]
    assert rows[2]["perplexity"] > rows[1]["perplexity"]
    assert set(rows[1]["achieved_sparsity_by_module"]) == {"gate_proj", "up_proj", "down_proj"}
    p = payload["protocol"]
    assert p["block_size"] == 32 and p["n_blocks"] == len(rows[0]["block_nlls"])
    assert p["calibration"]["text_source"].endswith("calib.txt")
    assert not list(out.parent.glob(".*.tmp"))


def test_spon_eval_refuses_calibrating_on_the_eval_text(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "cache"))
    (tmp_path / "eval.txt").write_text("Evaluation text. " * 30, encoding="utf-8")
    code = main(["eval", "--model", "tiny-random", "--device", "cpu", "--data", str(tmp_path / "eval.txt"),
                 "--calib-data", str(tmp_path / "eval.txt"), "--block-size", "32", "--sparsifier", "threshold"])
    assert code == 2
    assert "calibrate on other text" in capsys.readouterr().err


def test_spon_eval_validates_before_loading(capsys):
    assert main(["eval", "--sparsity", "1.5"]) == 2
    assert "--sparsity must be in [0, 1]" in capsys.readouterr().err
    assert main(["eval", "--sparsifier", "magnitud"]) == 2
    assert "Did you mean 'magnitude'" in capsys.readouterr().err
