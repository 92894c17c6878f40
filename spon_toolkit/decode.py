"""Real speed from sparsity: a sparse linear kernel for batch-1 decoding, and a decode mode that uses it.

At batch 1 a decoder's linear layers are memory-bound: each generated token reads every weight once. When
a layer's input ``x`` is threshold-sparsified (``x * (|x| > t)``), the output ``y = W x + b`` needs only
the weight *columns* of the kept inputs. :func:`sparse_linear` stores the weight transposed
(``W^T``, ``in_features x out_features``, C-contiguous), so a kept input ``i`` reads one contiguous row
``W^T[i]``; the threshold check, the gather of kept inputs and the row accumulation run in one compiled
loop (numba), and no gathered copy of the weight is ever made. Rows are accumulated eight at a time
(eight concurrent contiguous streams), which keeps the memory system busier than one row at a time, but
each output still sums the kept rows in input order with float32 rounding after every product and every
addition, then adds the bias: bit for bit ``S(x) @ W^T + b`` as a sequential float32 loop computes it,
whatever the thread count.

:class:`SparseDecoder` swaps the sparsified sites' ``nn.Linear`` layers of a model for
:class:`ThresholdSparseLinear` layers (threshold sparsifier, any of the seven modules) with the SPON
biases folded into the layer bias, and :meth:`SparseDecoder.restore` puts the original layer objects
back. Where the kernel does not apply the layer computes ``F.linear(threshold_sparsify(x, t), W, b)``,
exactly what the simulated (pre-hook) model computes:

- more than ``max_kernel_tokens`` token vectors in one call (prefill, scoring, training): the dense
  matmul on the sparsified input; reading each weight once for many tokens is cheaper than reading the
  kept rows once per token;
- a non-CPU device (CUDA and others), a dtype other than float32, or an input that requires grad: the
  same dense fallback. On CUDA decode mode therefore runs at the simulated model's speed (no gain, no
  extra memory: ``W^T`` is only built for float32 CPU layers).

The kernel needs numba (``pip install 'spon-toolkit[decode]'``); it is imported on first use only.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError, SponError
from .sites import SiteMap
from .sparsifiers import Sparsifier, ThresholdSparsifier, threshold_sparsify

KERNEL_DTYPES = (torch.float32,)
#: default largest number of token vectors per call that use the kernel; more go to the dense fallback
MAX_KERNEL_TOKENS = 4
_INSTALL_HINT = "pip install 'spon-toolkit[decode]' (or pip install numba)"

_kernels: dict[str, Any] | None = None
_kernels_lock = threading.Lock()


def kernel_available() -> bool:
    """Whether numba can be imported (the sparse kernel's one dependency)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def require_numba() -> None:
    """Raise a one-line :class:`ConfigError` naming the extra to install when numba is missing."""
    if not kernel_available():
        raise ConfigError(f"the sparse decode kernel needs numba, which is not installed; {_INSTALL_HINT}")


def _build_kernels() -> dict[str, Any]:
    import numba
    import numpy as np
    from numba import njit, prange

    opts = {"nogil": True, "boundscheck": False, "error_model": "numpy"}

    @njit(**opts)
    def select(x, t, idx, val):
        """Indices and values of the kept entries (``not |x| <= t``: NaN is kept, as 0 * NaN is NaN)."""
        nnz = 0
        for i in range(x.shape[0]):
            v = x[i]
            if not (abs(v) <= t):
                idx[nnz] = i
                val[nnz] = v
                nnz += 1
        return nnz

    @njit(**opts)
    def accumulate(idx, val, nnz, wt, lo, hi, acc):
        """``acc[o] = (((acc[o] + val[0] * wt[idx[0], o]) + val[1] * wt[idx[1], o]) + ...)`` for o in
        [lo, hi): kept rows in input order, each product and sum rounded to float32 (no fused multiply-add),
        the order in which ``S(x) @ W^T`` sums. Eight rows per pass: eight concurrent row streams."""
        n = hi - lo
        j = 0
        while j + 8 <= nnz:
            v0, v1, v2, v3 = val[j], val[j + 1], val[j + 2], val[j + 3]
            v4, v5, v6, v7 = val[j + 4], val[j + 5], val[j + 6], val[j + 7]
            r0, r1, r2, r3 = wt[idx[j], lo:hi], wt[idx[j + 1], lo:hi], wt[idx[j + 2], lo:hi], wt[idx[j + 3], lo:hi]
            r4, r5, r6, r7 = (wt[idx[j + 4], lo:hi], wt[idx[j + 5], lo:hi], wt[idx[j + 6], lo:hi],
                              wt[idx[j + 7], lo:hi])
            for o in range(n):
                a = acc[o]
                a += v0 * r0[o]
                a += v1 * r1[o]
                a += v2 * r2[o]
                a += v3 * r3[o]
                a += v4 * r4[o]
                a += v5 * r5[o]
                a += v6 * r6[o]
                a += v7 * r7[o]
                acc[o] = a
            j += 8
        while j < nnz:
            v = val[j]
            row = wt[idx[j], lo:hi]
            for o in range(n):
                acc[o] += v * row[o]
            j += 1

    @njit(**opts)
    def serial(x, t, wt, bias):
        n_tok, d_in = x.shape
        d_out = wt.shape[1]
        out = np.empty((n_tok, d_out), np.float32)
        idx = np.empty(d_in, np.int64)
        val = np.empty(d_in, np.float32)
        for r in range(n_tok):
            nnz = select(x[r], t, idx, val)
            acc = out[r]
            acc[:] = 0.0
            accumulate(idx, val, nnz, wt, 0, d_out, acc)
            for o in range(d_out):  # the bias last, as the simulated model adds it to the matmul's output
                acc[o] += bias[o]
        return out

    @njit(parallel=True, **opts)
    def parallel(x, t, wt, bias, n_chunks):
        # Threads own disjoint slices of the output (no reduction); each reads its slice of every kept row.
        n_tok, d_in = x.shape
        d_out = wt.shape[1]
        out = np.empty((n_tok, d_out), np.float32)
        idx = np.empty((n_tok, d_in), np.int64)
        val = np.empty((n_tok, d_in), np.float32)
        nnz = np.empty(n_tok, np.int64)
        for r in range(n_tok):
            nnz[r] = select(x[r], t, idx[r], val[r])
        step = (d_out + n_chunks - 1) // n_chunks
        step = (step + 15) // 16 * 16  # whole 64-byte lines per thread
        for c in prange(n_chunks):
            lo = min(d_out, c * step)
            hi = min(d_out, lo + step)
            for r in range(n_tok):
                acc = out[r, lo:hi]
                acc[:] = 0.0
                accumulate(idx[r], val[r], nnz[r], wt, lo, hi, acc)
                for o in range(hi - lo):
                    acc[o] += bias[lo + o]
        return out

    return {"serial": serial, "parallel": parallel, "numba": numba, "np": np}


def _get_kernels() -> dict[str, Any]:
    global _kernels
    if _kernels is None:
        require_numba()
        with _kernels_lock:
            if _kernels is None:
                _kernels = _build_kernels()
    return _kernels


def kernel_threads() -> int:
    """Threads the kernel splits the output over: numba's current thread count."""
    return int(_get_kernels()["numba"].get_num_threads())


def set_kernel_threads(n: int) -> None:
    """Set numba's thread count (at most ``numba.config.NUMBA_NUM_THREADS``)."""
    k = _get_kernels()["numba"]
    n = int(n)
    if not 1 <= n <= k.config.NUMBA_NUM_THREADS:
        raise ConfigError(f"kernel threads must be in 1..{k.config.NUMBA_NUM_THREADS}, got {n}")
    k.set_num_threads(n)


def _check_kernel_operands(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight_t.dim() != 2 or x.shape[-1] != weight_t.shape[0]:
        raise ConfigError(
            f"sparse_linear: input has {x.shape[-1]} features but weight_t is {tuple(weight_t.shape)} "
            "(in_features x out_features)")
    for name, t in (("input", x), ("weight_t", weight_t), ("bias", bias)):
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype not in KERNEL_DTYPES:
            raise ConfigError(f"sparse_linear: {name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    if bias is not None and tuple(bias.shape) != (weight_t.shape[1],):
        raise ConfigError(f"sparse_linear: bias has shape {tuple(bias.shape)}, expected ({weight_t.shape[1]},)")


def sparse_linear(x: torch.Tensor, threshold: float, weight_t: torch.Tensor, bias: torch.Tensor | None = None,
                  *, threads: int | None = None) -> torch.Tensor:
    """``F.linear(threshold_sparsify(x, threshold), weight_t.T, bias)``, reading only the kept rows of
    ``weight_t``.

    ``x``: ``(..., in_features)`` float32 on CPU; ``weight_t``: ``(in_features, out_features)`` (made
    C-contiguous if it is not); ``bias``: ``(out_features,)`` or ``None``. The threshold is compared in
    float32, as torch compares a float32 tensor with a Python float. Each token vector reads its own kept
    rows, so the kernel pays for few tokens only (see :class:`ThresholdSparseLinear`). ``threads``:
    output slices run in parallel (default: numba's thread count); 1 runs the serial loop.
    """
    _check_kernel_operands(x, weight_t, bias)
    k = _get_kernels()
    np = k["np"]
    d_out = weight_t.shape[1]
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, x.shape[-1]).contiguous()
    wt = weight_t.detach().contiguous()
    b = (bias.detach().contiguous() if bias is not None else torch.zeros(d_out, dtype=torch.float32))
    t = np.float32(threshold)
    n = kernel_threads() if threads is None else int(threads)
    if x2.shape[0] == 0:
        return x.new_empty((*lead, d_out))
    if n <= 1:
        out = k["serial"](x2.numpy(), t, wt.numpy(), b.numpy())
    else:
        out = k["parallel"](x2.numpy(), t, wt.numpy(), b.numpy(), n)
    return torch.from_numpy(out).reshape(*lead, d_out)


class ThresholdSparseLinear(nn.Module):
    """A linear layer whose input is threshold-sparsified, with the sparse kernel for few-token calls.

    Holds the original layer's ``weight`` (shared, not copied), a bias (the layer's bias plus the folded
    SPON bias, or ``None``), the threshold (``None``: no sparsification, a plain linear with the folded
    bias) and, for the kernel, ``weight_t`` (a transposed float32 CPU copy).
    """

    def __init__(self, linear: nn.Linear, threshold: float | None, bias: torch.Tensor | None, *,
                 use_kernel: bool, max_kernel_tokens: int = MAX_KERNEL_TOKENS):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.threshold = threshold
        self.max_kernel_tokens = int(max_kernel_tokens)
        self.weight = linear.weight  # the same Parameter object: no copy, and frozen state is the layer's
        self.register_buffer("bias", bias, persistent=False)
        weight_t = None
        self._np: tuple | None = None
        if use_kernel and threshold is not None:
            weight_t = linear.weight.detach().t().contiguous()
        self.register_buffer("weight_t", weight_t, persistent=False)
        if weight_t is not None:
            k = _get_kernels()
            b = bias.detach().to(torch.float32) if bias is not None else torch.zeros(self.out_features)
            self._kernel_bias = b.contiguous()
            self._np = (k["serial"], k["parallel"], k["np"].float32(threshold), weight_t.numpy(),
                        self._kernel_bias.numpy())

    @property
    def uses_kernel(self) -> bool:
        return self.weight_t is not None

    def extra_repr(self) -> str:
        t = "none" if self.threshold is None else f"{self.threshold:.4g}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, threshold={t}, "
                f"bias={self.bias is not None}, kernel={self.uses_kernel}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.threshold is None:
            return F.linear(x, self.weight, self.bias)
        np_ops = self._np
        if (np_ops is not None and x.device.type == "cpu" and x.dtype == torch.float32
                and not (x.requires_grad and torch.is_grad_enabled())
                and x.numel() <= self.max_kernel_tokens * self.in_features and x.numel() > 0):
            serial, parallel, t, wt, b = np_ops
            lead = x.shape[:-1]
            x2 = x.detach().reshape(-1, self.in_features)
            if not x2.is_contiguous():
                x2 = x2.contiguous()
            n = _threads()
            out = serial(x2.numpy(), t, wt, b) if n <= 1 else parallel(x2.numpy(), t, wt, b, n)
            return torch.from_numpy(out).view(*lead, self.out_features)
        return F.linear(threshold_sparsify(x, self.threshold), self.weight, self.bias)


_thread_count: list[int] = [1]


def _threads() -> int:
    return _thread_count[0]


def _sync_threads() -> None:
    """Read numba's thread count once per decode-mode switch, not on every call (it costs microseconds)."""
    _thread_count[0] = kernel_threads()


def _folded_bias(linear: nn.Linear, beta: torch.Tensor | None) -> torch.Tensor | None:
    """The layer's bias with ``beta`` added exactly as :meth:`SponBiases.fold` adds it."""
    with torch.no_grad():
        if beta is None:
            return None if linear.bias is None else linear.bias.detach().clone()
        beta = beta.detach().to(device=linear.weight.device, dtype=torch.float32)
        if linear.bias is None:
            return beta.to(linear.weight.dtype)
        return (linear.bias.detach().to(torch.float32) + beta).to(linear.bias.dtype)


class SparseDecoder:
    """Swap the sparsified sites' linear layers for :class:`ThresholdSparseLinear` layers.

    ``sparsifier`` must be a calibrated :class:`ThresholdSparsifier` for every site in ``sites``.
    ``biases``: a :class:`spon_toolkit.sparse.SponBiases` or a mapping ``site -> output-space beta``;
    each beta is folded into the bias of its site's new layer (biased sites that are not sparsified get
    a plain dense layer with the folded bias). A :class:`SponBiases` that is already folded into the model
    is not added again. Hooks on the original layers do not fire while they are swapped out, so a
    :class:`spon_toolkit.sparse.SparseModel` on the same model may stay attached: decode mode replaces it
    on the sites it covers.

    ``kernel``: ``"auto"`` (default) uses the kernel on float32 CPU layers (numba required) and the dense
    fallback elsewhere (e.g. CUDA); ``True`` insists on it (an error where it cannot run); ``False`` never
    uses it. The new layers are built once here (``W^T`` copies: the sparsified sites' weights once more
    in memory); :meth:`enable` and :meth:`restore` swap them in and out. Also a context manager.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsifier: Sparsifier,
        sites: Iterable[str] | str,
        *,
        sitemap: SiteMap,
        biases: Any = None,
        kernel: bool | str = "auto",
        max_kernel_tokens: int = MAX_KERNEL_TOKENS,
    ):
        if not isinstance(sparsifier, ThresholdSparsifier):
            name = getattr(sparsifier, "name", type(sparsifier).__name__)
            raise ConfigError(
                f"decode mode supports the threshold sparsifier only, got '{name}'; use --sparsifier threshold "
                "(per-token top-k needs a sort per token, which costs more than the weight reads it saves)")
        if kernel not in ("auto", True, False):
            raise ConfigError(f"kernel must be 'auto', True or False, got {kernel!r}")
        if isinstance(max_kernel_tokens, bool) or not isinstance(max_kernel_tokens, int) or max_kernel_tokens < 0:
            raise ConfigError(f"max_kernel_tokens must be an integer >= 0, got {max_kernel_tokens!r}")
        self.model = model
        self.sitemap = sitemap
        self.sites = sitemap.resolve(sites) if sites else []
        missing = [s for s in self.sites if s not in sparsifier.thresholds]
        if missing:
            raise SponError(
                f"threshold sparsifier is not calibrated for site '{missing[0]}' ({len(missing)} sites); "
                "call calibrate() on calibration data first")
        betas = self._betas(biases)
        weights = [sitemap.module(s).weight for s in self.sites]
        fits = [w.device.type == "cpu" and w.dtype in KERNEL_DTYPES for w in weights]
        if kernel is True:
            require_numba()
            if not all(fits):
                bad = weights[fits.index(False)]
                raise ConfigError(f"the sparse decode kernel needs float32 weights on CPU, got {bad.dtype} on "
                                  f"{bad.device}; use kernel='auto' to fall back to the dense matmul on the "
                                  "sparsified input there")
        if kernel == "auto" and any(fits):
            require_numba()
        self.kernel = kernel
        self.max_kernel_tokens = max_kernel_tokens
        self.thresholds = {s: float(sparsifier.thresholds[s]) for s in self.sites}
        self._originals: dict[str, nn.Linear] = {}
        self._layers: dict[str, ThresholdSparseLinear] = {}
        for site in [s for s in sitemap.names if s in set(self.sites) | set(betas)]:
            lin = sitemap.module(site)
            if not isinstance(lin, nn.Linear):
                raise ConfigError(f"site '{site}' is a {type(lin).__name__}, not nn.Linear; decode mode "
                                  "needs plain linear layers (is another decode mode or adapter active?)")
            use = (kernel is not False and lin.weight.device.type == "cpu" and lin.weight.dtype in KERNEL_DTYPES)
            self._originals[site] = lin
            self._layers[site] = ThresholdSparseLinear(
                lin, self.thresholds.get(site), _folded_bias(lin, betas.get(site)), use_kernel=use,
                max_kernel_tokens=max_kernel_tokens)
        self.enabled = False

    def _betas(self, biases: Any) -> dict[str, torch.Tensor]:
        if biases is None:
            return {}
        from .sparse import SponBiases

        if isinstance(biases, SponBiases):
            if biases.folded:
                return {}  # already in the layers' biases
            return {s: biases.beta(s).detach() for s in biases.sites}
        if isinstance(biases, Mapping):
            out = {}
            for site, beta in biases.items():
                if site not in self.sitemap.names:
                    self.sitemap.module(site)  # raises the one-line error for a bad name
                if not isinstance(beta, torch.Tensor) or tuple(beta.shape) != (self.sitemap.shape(site)[1],):
                    raise ConfigError(f"bias for '{site}' must be a tensor of shape ({self.sitemap.shape(site)[1]},)")
                out[site] = beta.detach()
            return out
        raise ConfigError(f"biases must be SponBiases or a mapping site -> tensor, got {type(biases).__name__}")

    @classmethod
    def from_sparse_model(cls, sparse_model, **kwargs: Any) -> SparseDecoder:
        """Decode mode for what a :class:`spon_toolkit.sparse.SparseModel` simulates (its sparsifier,
        sparsified sites and biases), e.g. one returned by :func:`spon_toolkit.export.load_exported`."""
        return cls(sparse_model.model, sparse_model.sparsifier, sparse_model.sparse_sites,
                   sitemap=sparse_model.sitemap, biases=sparse_model.biases, **kwargs)

    @property
    def layers(self) -> dict[str, ThresholdSparseLinear]:
        return dict(self._layers)

    @property
    def kernel_sites(self) -> list[str]:
        return [s for s, layer in self._layers.items() if layer.uses_kernel]

    def _set(self, site: str, module: nn.Module) -> None:
        layer, name = site.split(".")[1], self.sitemap.arch.module_path(site.rsplit(".", 1)[1])
        parent_path, _, attr = name.rpartition(".")
        parent = self.sitemap.layers[int(layer)]
        for part in parent_path.split(".") if parent_path else ():
            parent = getattr(parent, part)
        setattr(parent, attr, module)

    def enable(self) -> SparseDecoder:
        """Swap the sparse layers in (idempotent)."""
        if self.enabled:
            return self
        for site, lin in self._originals.items():
            if self.sitemap.module(site) is not lin:
                raise SponError(f"site '{site}' no longer holds the layer this decode mode was built for; "
                                "build a new SparseDecoder")
        if self.kernel_sites:
            _sync_threads()
        for site, layer in self._layers.items():
            self._set(site, layer)
        self.enabled = True
        return self

    def restore(self) -> None:
        """Put the original layer objects back (idempotent): the model is exactly as it was."""
        if not self.enabled:
            return
        for site, lin in self._originals.items():
            self._set(site, lin)
        self.enabled = False

    def __enter__(self) -> SparseDecoder:
        return self.enable()

    def __exit__(self, *exc: object) -> None:
        self.restore()


@contextlib.contextmanager
def decode_mode(model: nn.Module, sparsifier: Sparsifier, sites: Iterable[str] | str, *, biases: Any = None,
                toolkit=None, **kwargs: Any) -> Iterator[SparseDecoder]:
    """``with decode_mode(model, thr, "all", biases=b): model.generate(...)`` (see :class:`SparseDecoder`)."""
    sitemap = SiteMap(model, toolkit.architectures if toolkit is not None else None)
    decoder = SparseDecoder(model, sparsifier, sites, sitemap=sitemap,
                            biases=biases, **kwargs)
    with decoder:
        yield decoder


def weight_bytes_per_token(model: nn.Module, sitemap: SiteMap, sparsity_of: Mapping[str, float]) -> dict[str, float]:
    """Bytes of weights one decoded token reads: ``dense`` and ``sparse`` (sites in ``sparsity_of`` read a
    fraction ``1 - s`` of their weight), with the LM head counted dense and the embedding row ignored."""
    if any(math.isnan(v) for v in sparsity_of.values()):
        raise ConfigError("sparsity_of has NaN values; pass measured sparsities of sites that saw tokens")
    site_bytes = {s: sitemap.module(s).weight.numel() * sitemap.module(s).weight.element_size() for s in sitemap.names}
    head = model.get_output_embeddings()
    head_bytes = 0 if head is None else head.weight.numel() * head.weight.element_size()
    dense_sites = sum(site_bytes.values())
    sparse_sites = sum(b * (1 - sparsity_of.get(s, 0.0)) for s, b in site_bytes.items())
    return {"dense": float(dense_sites + head_bytes), "sparse": float(sparse_sites + head_bytes),
            "head": float(head_bytes), "sites_dense": float(dense_sites)}
