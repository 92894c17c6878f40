"""Category prompt sets: the ones shipped with the toolkit (``spon_toolkit/prompts/*.txt``, CC0) and user files.

A ``.txt`` file holds one prompt per line and its stem is the category; a ``.jsonl`` file holds objects with a
``text`` (or ``prompt``) and a ``category`` field. A literal ``\\n`` in a line is a line break.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"


def builtin_categories() -> list[str]:
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.txt"))


def _read(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise ConfigError(f"prompt file '{path}' does not exist; give a .txt (one prompt per line) or .jsonl file")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ConfigError(f"prompt file '{path}' is empty; it needs at least one prompt")
    if path.suffix == ".jsonl":
        out = []
        for i, ln in enumerate(lines, 1):
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"prompt file '{path}' line {i}: not JSON ({exc.msg})") from None
            text = obj.get("text", obj.get("prompt")) if isinstance(obj, dict) else None
            if not isinstance(text, str) or not isinstance(obj.get("category"), str) or not text.strip():
                raise ConfigError(f"prompt file '{path}' line {i}: needs string fields 'text' and 'category'")
            out.append((obj["category"], text.replace("\\n", "\n")))
        return out
    return [(path.stem, ln.replace("\\n", "\n")) for ln in lines]


def load_prompts(files: Sequence[str | Path] | None = None, categories: Sequence[str] | None = None,
                 per_category: int | None = None) -> list[tuple[str, str]]:
    """``(category, prompt)`` pairs from ``files`` (default: the shipped sets), restricted to ``categories``
    and to the first ``per_category`` prompts of each."""
    paths = [Path(f) for f in files] if files else sorted(PROMPTS_DIR.glob("*.txt"))
    pairs = [p for path in paths for p in _read(path)]
    known = list(dict.fromkeys(c for c, _ in pairs))
    if categories:
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise ConfigError(f"unknown prompt category {unknown[0]!r}; known: {', '.join(known)}")
        pairs = [p for p in pairs if p[0] in set(categories)]
    if per_category is not None:
        seen: dict[str, int] = {}
        kept = []
        for c, t in pairs:
            seen[c] = seen.get(c, 0) + 1
            if seen[c] <= per_category:
                kept.append((c, t))
        pairs = kept
    cats = {c for c, _ in pairs}
    if len(cats) < 2:
        raise ConfigError(f"category probes need prompts of at least two categories, got {sorted(cats)}")
    return pairs
