"""Distillation losses between the dense teacher and the sparse student, computed in token chunks.

Every divergence here is a per-token function of two rows of logits (teacher, student) over the
vocabulary, averaged over tokens. With a large vocabulary (SmolLM2: 49 152) the naive computation holds
several float32 ``tokens x vocab`` tensors at once (softmaxes, their logs, products, and the autograd
buffers for all of them). :func:`chunked_divergence` bounds that: it walks the tokens ``chunk_size`` at a
time and, when the student needs a gradient, differentiates each chunk *immediately* and keeps only the
gradient with respect to its input (``tokens x hidden`` when a head is given, the idea behind "fused
linear cross-entropy" kernels). The backward pass then only multiplies by the incoming scalar, so peak
memory is ``chunk_size x vocab`` floats for the loss, whatever the number of tokens, and no part of the
head is recomputed.

Divergences (``p`` = teacher distribution, ``q`` = student distribution, per token):

- ``kl``: ``KL(p || q) = sum p (log p - log q)`` (SPON's loss);
- ``reverse_kl``: ``KL(q || p)``;
- ``js``: Jensen-Shannon, ``(KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2``;
- ``soft_ce``: cross-entropy to the teacher's distribution, ``-sum p log q = KL(p || q) + H(p)`` (the seed
  repository's ``ce``; its gradient is the KL's, its value is larger by the teacher's entropy);
- :func:`kl_logit_l2_rows` ``(w)``: ``KL(p || q) + w * mean_v (z_q - z_p)^2`` on the logits ``z`` (the seed's
  ``kl+logit_l2``).

:func:`chunked_cross_entropy` is the next-token cross-entropy of the student on the data's own next tokens
(no teacher), chunked the same way.

``temperature`` ``T`` divides both logits and multiplies the result by ``T**2`` (the usual distillation
scaling, so gradient magnitudes do not shrink with ``T``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError, unknown

#: tokens per chunk by default: 256 x 49 152 float32 = 48 MiB per temporary.
DEFAULT_CHUNK_SIZE = 256


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum_v p (log p - log q)`` per row; exact zero where ``p`` underflows to 0."""
    return torch.sum(log_p.exp() * (log_p - log_q), dim=-1)


def kl_rows(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-token ``KL(p_teacher || p_student)`` from logits (float32)."""
    return _kl_rows(F.log_softmax(teacher.float(), -1), F.log_softmax(student.float(), -1))


def reverse_kl_rows(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-token ``KL(p_student || p_teacher)`` from logits (float32)."""
    return _kl_rows(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1))


def js_rows(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-token Jensen-Shannon divergence (natural log, in [0, log 2]) from logits (float32)."""
    log_p = F.log_softmax(teacher.float(), -1)
    log_q = F.log_softmax(student.float(), -1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    return 0.5 * (_kl_rows(log_p, log_m) + _kl_rows(log_q, log_m))


def soft_ce_rows(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy ``-sum p_teacher log p_student`` from logits (float32)."""
    log_p = F.log_softmax(teacher.float(), -1)
    return -torch.sum(log_p.exp() * F.log_softmax(student.float(), -1), dim=-1)


def kl_logit_l2_rows(weight: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-token ``KL(p || q) + weight * mean over the vocabulary of (student - teacher logits)^2``.

    Summed over tokens and divided by their number this is the seed's ``kl + w * mse_loss(logits)``. Under a
    distillation temperature ``T`` the rows receive logits divided by ``T`` and are multiplied by ``T**2``,
    so the L2 term stays the one of the raw logits.
    """
    w = float(weight)

    def rows(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        kl = kl_rows(teacher, student)
        if w == 0.0:
            return kl
        return kl + w * (student.float() - teacher.float()).pow(2).mean(dim=-1)

    return rows


#: name -> per-token divergence of (teacher logits, student logits) rows
DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "kl": kl_rows,
    "reverse_kl": reverse_kl_rows,
    "js": js_rows,
    "soft_ce": soft_ce_rows,
}


def get_divergence(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise unknown("divergence", name, DIVERGENCES) from None


def _check_chunk(chunk_size: int | None, n: int) -> int:
    if chunk_size is None:
        return max(n, 1)
    if int(chunk_size) < 1:
        raise ConfigError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    return int(chunk_size)


class _EagerChunkedLoss(torch.autograd.Function):
    """Mean per-token divergence whose gradient is computed chunk by chunk during the forward pass.

    ``inputs`` is the student's pre-head activation (``tokens x hidden``) or its logits (with the
    identity head). The gradient w.r.t. ``inputs`` is stored (same size as ``inputs``) and the backward
    only scales it by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, inputs, head, teacher_chunk, row_fn, chunk, scale, need_grad):  # noqa: D401
        n = inputs.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=inputs.device)
        grad = torch.empty_like(inputs) if need_grad else None
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            with torch.enable_grad():
                x = inputs[sl].detach().requires_grad_(need_grad)
                student = head(x)
                value = row_fn(teacher_chunk(sl), student).sum() * scale
            if need_grad:
                (g,) = torch.autograd.grad(value, x)
                grad[sl] = g / n
            total += value.detach()
        ctx.save_for_backward(grad if need_grad else torch.empty(0))
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        if float(grad_out) != 1.0:  # the usual case (loss.backward()) needs no copy of the gradient
            grad = grad * grad_out.to(grad.dtype)
        return grad, None, None, None, None, None, None


def chunked_divergence(
    teacher: torch.Tensor | Callable[[slice], torch.Tensor],
    student: torch.Tensor,
    *,
    divergence: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "kl",
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean over tokens of a divergence between teacher and student next-token distributions.

    ``student``: student logits ``[..., vocab]``, or, with ``head``, the activations ``[..., hidden]``
    that ``head`` (e.g. the model's ``lm_head``) maps to logits, so that full logits never exist at once.
    ``teacher``: teacher logits with the same leading shape, or a callable ``slice -> logits`` over the
    flattened tokens (lets the caller derive teacher logits chunk-wise from cached hidden states).
    ``chunk_size=None`` processes all tokens in one chunk (the unchunked reference).
    ``divergence``: a name of :data:`DIVERGENCES` or a per-token function of (teacher, student) logits.
    Returns a float32 scalar; differentiable w.r.t. ``student``.
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    row_fn = divergence if callable(divergence) else get_divergence(divergence)
    flat = student.reshape(-1, student.shape[-1])
    n = flat.shape[0]
    if n == 0:
        raise ConfigError("no tokens to compute a loss on; give at least one non-empty batch")
    chunk = _check_chunk(chunk_size, n)
    if callable(teacher) and not isinstance(teacher, torch.Tensor):
        teacher_chunk = teacher
    else:
        t_flat = teacher.reshape(-1, teacher.shape[-1])
        if t_flat.shape[0] != n:
            raise ConfigError(f"teacher has {t_flat.shape[0]} tokens, student {n}; they must match")
        teacher_chunk = t_flat.__getitem__
    base_head = head if head is not None else (lambda x: x)
    if temperature != 1.0:
        t = float(temperature)

        def scaled_head(x):
            return base_head(x) / t

        def scaled_teacher(sl):
            return teacher_chunk(sl) / t

        fn_head, fn_teacher, scale = scaled_head, scaled_teacher, t * t
    else:
        fn_head, fn_teacher, scale = base_head, teacher_chunk, 1.0
    need_grad = torch.is_grad_enabled() and flat.requires_grad
    return _EagerChunkedLoss.apply(flat, fn_head, fn_teacher, row_fn, chunk, scale, need_grad)


def _ce_rows(labels: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student.float(), labels, reduction="none")


def chunked_cross_entropy(
    labels: torch.Tensor,
    student: torch.Tensor,
    *,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Mean next-token cross-entropy (NLL) of ``student`` logits (or activations, with ``head``) against
    integer ``labels`` with the same leading shape; the language-modelling loss, chunked like
    :func:`chunked_divergence` (peak memory ``chunk_size x vocab``)."""
    flat = student.reshape(-1, student.shape[-1])
    flat_labels = labels.reshape(-1)
    n = flat.shape[0]
    if n == 0:
        raise ConfigError("no tokens to compute a loss on; give blocks of at least two tokens")
    if flat_labels.shape[0] != n:
        raise ConfigError(f"labels have {flat_labels.shape[0]} tokens, the student {n}; they must match")
    chunk = _check_chunk(chunk_size, n)
    fn_head = head if head is not None else (lambda x: x)
    need_grad = torch.is_grad_enabled() and flat.requires_grad
    return _EagerChunkedLoss.apply(flat, fn_head, flat_labels.__getitem__, _ce_rows, chunk, 1.0, need_grad)


def kl_divergence(teacher_logits, student_logits, *, chunk_size: int | None = DEFAULT_CHUNK_SIZE, temperature=1.0):
    """``KL(p_teacher || p_student)`` per token, averaged over tokens (see :func:`chunked_divergence`)."""
    return chunked_divergence(teacher_logits, student_logits, divergence="kl", chunk_size=chunk_size,
                              temperature=temperature)


def reverse_kl_divergence(teacher_logits, student_logits, *, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
                          temperature=1.0):
    """``KL(p_student || p_teacher)`` per token, averaged over tokens."""
    return chunked_divergence(teacher_logits, student_logits, divergence="reverse_kl", chunk_size=chunk_size,
                              temperature=temperature)


def js_divergence(teacher_logits, student_logits, *, chunk_size: int | None = DEFAULT_CHUNK_SIZE, temperature=1.0):
    """Jensen-Shannon divergence per token, averaged over tokens."""
    return chunked_divergence(teacher_logits, student_logits, divergence="js", chunk_size=chunk_size,
                              temperature=temperature)


def hidden_mse(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over sites of the mean squared difference of site outputs (float32).

    Each site's MSE is divided by the teacher output's mean square, so sites with large activations do
    not dominate the sum (a relative error; 1.0 means "as far off as predicting zeros").
    """
    if not teacher:
        raise ConfigError("hidden-state MSE needs at least one site whose output is compared")
    if set(teacher) != set(student):
        raise ConfigError("teacher and student outputs cover different sites")
    terms = []
    for site, t in teacher.items():
        t = t.float()
        s = student[site].float()
        terms.append(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()
