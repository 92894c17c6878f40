"""The dense teacher's targets shared by every item and epoch of one experiment.

All items of an experiment train on the same token blocks against the same dense model, so the targets a
trainer derives from the dense model (final hidden states for the logit divergences) are the same for
every item. :class:`SharedTeacher` keeps them once per experiment, keyed by what they depend on: the
trainer's teacher kind (:meth:`DistillationTrainer.teacher_key`), the autocast mode and the batch's token
ids. Targets stay on the model's device; the memory bound is ``budget_mb``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def batch_fingerprint(ids: torch.Tensor) -> str:
    """A content hash of one batch of token ids (shape and values)."""
    h = hashlib.sha256(str(tuple(ids.shape)).encode())
    h.update(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    return 0


class SharedTeacher:
    """Teacher targets computed once and reused by every item of an experiment (while within budget)."""

    def __init__(self, budget_mb: float = 4096):
        self.budget = float(budget_mb) * 2**20
        self.store: dict[tuple, Any] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> Any:
        value = self.store.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: tuple, value: Any) -> bool:
        size = nbytes(value)
        if key in self.store or self.bytes + size > self.budget:
            return False
        self.store[key] = value
        self.bytes += size
        return True


__all__ = ["SharedTeacher", "batch_fingerprint", "nbytes"]
