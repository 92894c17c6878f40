"""Hidden-state shift: how far sparse and sparse+SPON states move from the dense ones."""

from __future__ import annotations

import numpy as np
import torch


def relative_distance(h: torch.Tensor, ref: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``||h - ref|| / ||ref||`` per token (last dimension is the feature dimension)."""
    h = h.to(torch.float64)
    ref = ref.to(torch.float64)
    return (h - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(eps)


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref || p)`` per token, in nats."""
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    logq = torch.log_softmax(ref_logits.to(torch.float64), dim=-1)
    return (logq.exp() * (logq - logp)).sum(-1)


def top1_agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == ref_logits.argmax(-1)).to(torch.float64)


def recovery(shift_sparse: float, shift_spon: float) -> float:
    """``1 - shift(sparse+SPON) / shift(sparse)``: 1 = back at dense, 0 = no closer, < 0 = further away."""
    return 1.0 - shift_spon / shift_sparse if shift_sparse > 0 else float("nan")


def interval(values) -> dict[str, float | int | None]:
    """Mean with a two-sided 95% Student-t interval over independent units (e.g. eval blocks)."""
    from scipy import stats

    x = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    n = x.size
    if n == 0:
        return {"n": 0, "mean": None, "ci_low": None, "ci_high": None}
    m = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": m, "ci_low": None, "ci_high": None}
    h = float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / np.sqrt(n))
    return {"n": int(n), "mean": m, "ci_low": m - h, "ci_high": m + h}
