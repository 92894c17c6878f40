"""Sparse autoencoders (sae-lens) for the spaces SPON biases live in: training, caching, loading, quality.

*Space of a bias.* An output-space bias on ``layers.i.down_proj`` is added to the residual stream after
decoder layer ``i`` (``resid_post``); one on ``layers.i.o_proj`` to the residual stream between attention and
MLP of layer ``i`` (``resid_mid``: the layer's input plus the attention output, exact for Llama-style
layers without a post-attention norm on the residual branch); one on any other module to that module's
output (``site_output``). An input-space bias (``beta = W alpha``) lives in the site's input (``site_input``).
:func:`bias_space` names the space; :func:`space_hooks` lets a function observe or replace it.

*Training* uses sae-lens' own classes: :class:`sae_lens.TopKTrainingSAE` (default) or
:class:`sae_lens.StandardTrainingSAE` with :class:`sae_lens.SAETrainer` fed by an in-memory data provider
(an iterator of activation batches; no TransformerLens model, no wandb, no hub). Activations are the dense
model's, collected with forward hooks on token blocks, without the first ``skip_first`` positions of each
block (the first position of a block carries an outsized residual norm; it would dominate the SAE).
Activation norms are scaled by sae-lens' ``expected_average_only_in`` normalisation (folded into the
weights after training); the decoder bias starts at the activation mean.

*Caching* (user cache dir, ``<cache>/sae/``): activations are keyed by the model fingerprint, the space and a
hash of the token ids; a trained SAE by that key plus the hyperparameters and the sae-lens major version.
An SAE directory is sae-lens' own format (``sae_weights.safetensors`` + ``cfg.json``) plus
``spon_sae.json`` (how it was trained), so :func:`load_sae` and ``sae_lens.SAE.load_from_disk`` both read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import ConfigError, SponError
from .fileio import json_text
from .sites import SiteMap, parse_site

EXTRA = "sae"
MISSING = ("sae-lens is not installed; the SAE analysis needs the optional extra: "
           "pip install 'spon-toolkit[sae]'")
KINDS = ("resid_post", "resid_mid", "site_output", "site_input")
ARCHITECTURES = ("topk", "standard")


def require_sae_lens():
    """Import sae-lens or raise a one-line :class:`ConfigError` naming the extra to install."""
    try:
        import sae_lens
    except ImportError:
        raise ConfigError(MISSING) from None
    return sae_lens


def sae_lens_available() -> bool:
    try:
        require_sae_lens()
    except ConfigError:
        return False
    return True


# --- spaces ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BiasSpace:
    """The activation space one bias is added to (see the module docstring)."""

    site: str
    kind: str

    @property
    def layer(self) -> int:
        return parse_site(self.site)[0]

    @property
    def module(self) -> str:
        return parse_site(self.site)[1]

    @property
    def name(self) -> str:
        return f"{self.site}:{self.kind}"

    def dim(self, sitemap: SiteMap) -> int:
        d_in, d_out = sitemap.shape(self.site)
        return d_in if self.kind == "site_input" else d_out


def bias_space(site: str, parametrisation: str = "output") -> BiasSpace:
    """The space a bias on ``site`` with ``parametrisation`` ("output" | "input") lives in."""
    _, module = parse_site(site)
    if parametrisation == "input":
        return BiasSpace(site, "site_input")
    if parametrisation != "output":
        raise ConfigError(f"parametrisation must be 'output' or 'input', got '{parametrisation}'")
    if module == "down_proj":
        return BiasSpace(site, "resid_post")
    if module == "o_proj":
        return BiasSpace(site, "resid_mid")
    return BiasSpace(site, "site_output")


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, new: torch.Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


@contextlib.contextmanager
def space_hooks(model: nn.Module, sitemap: SiteMap, spaces: Sequence[BiasSpace],
                fn: Callable[[BiasSpace, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Call ``fn(space, x)`` with each space's activation ``x`` ``[B, T, d]`` on every forward.

    When ``fn`` returns a tensor, it replaces the activation downstream (splicing). Hooks registered here
    run after hooks already on the same modules (sparsifiers, SPON biases), so they see what those produce.
    """
    handles = []
    try:
        for space in spaces:
            layer = sitemap.layers[space.layer]
            module = sitemap.module(space.site)
            if space.kind == "resid_post":
                def hook(mod, args, output, space=space):
                    new = fn(space, _first(output))
                    return None if new is None else _replace_first(output, new)
                handles.append(layer.register_forward_hook(hook))
            elif space.kind == "resid_mid":
                held: dict[str, torch.Tensor] = {}

                def pre(mod, args, kwargs, held=held):
                    held["h"] = args[0] if args else kwargs["hidden_states"]

                def post(mod, args, output, space=space, held=held):
                    h = held.pop("h")
                    new = fn(space, h + output)
                    return None if new is None else (new - h).to(output.dtype)
                handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(module.register_forward_hook(post))
            elif space.kind == "site_output":
                def out_hook(mod, args, output, space=space):
                    return fn(space, output)
                handles.append(module.register_forward_hook(out_hook))
            elif space.kind == "site_input":
                def in_hook(mod, args, space=space):
                    new = fn(space, args[0])
                    return None if new is None else (new, *args[1:])
                handles.append(module.register_forward_pre_hook(in_hook))
            else:
                raise ConfigError(f"unknown space kind '{space.kind}'; use one of {', '.join(KINDS)}")
        yield
    finally:
        for h in handles:
            h.remove()


def _progress(iterable, total: int, desc: str, progress: bool | None):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not progress if progress is not None else None)


@torch.no_grad()
def collect_activations(model: nn.Module, sitemap: SiteMap, spaces: Sequence[BiasSpace], ids: torch.Tensor, *,
                        skip_first: int = 1, batch_size: int = 8, progress: bool | None = None,
                        desc: str = "activations") -> dict[str, torch.Tensor]:
    """Activations of ``spaces`` over token blocks ``ids`` ``[N, T]``: ``{space.name: [N, T - skip_first, d]}``
    (float32, CPU). Whatever hooks are on the model (sparsifier, biases) act during the forward passes."""
    chunks: dict[str, list[torch.Tensor]] = {s.name: [] for s in spaces}

    def grab(space: BiasSpace, x: torch.Tensor) -> None:
        chunks[space.name].append(x[:, skip_first:].detach().to("cpu", torch.float32))
        return None

    device = next(model.parameters()).device
    batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
    with space_hooks(model, sitemap, spaces, grab):
        for batch in _progress(batches, len(batches), desc, progress):
            model(input_ids=batch.to(device))
    return {name: torch.cat(parts) for name, parts in chunks.items()}


# --- cache ----------------------------------------------------------------------------------------

def sae_cache_dir() -> Path:
    from .models import user_cache_dir

    return user_cache_dir() / "sae"


def ids_hash(ids: torch.Tensor) -> str:
    """sha256 (16 hex digits) of token ids: the data part of every cache key."""
    t = ids.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}|".encode() + t.numpy().tobytes()).hexdigest()[:16]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _fingerprint(model: nn.Module) -> str:
    from .models import model_fingerprint

    fp = getattr(model, "_spon_sae_fingerprint", None)
    if fp is None:
        fp = model_fingerprint(model)
        with contextlib.suppress(AttributeError):
            model._spon_sae_fingerprint = fp  # weights are frozen during an analysis
    return fp


def cached_activations(model: nn.Module, sitemap: SiteMap, spaces: Sequence[BiasSpace], ids: torch.Tensor, *,
                       skip_first: int = 1, batch_size: int = 8, cache: bool = True, progress: bool | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Dense activations of ``spaces`` on ``ids`` from the cache, collecting (in one pass) the missing ones.

    Returns ``({space.name: [N, T - skip_first, d]}, {space.name: cache key})``.
    """
    from safetensors.torch import load_file, save_file

    from .fileio import atomic_path

    fp, data = _fingerprint(model), ids_hash(ids)
    keys = {s.name: _key("acts", fp, s.name, data, skip_first) for s in spaces}
    out: dict[str, torch.Tensor] = {}
    root = sae_cache_dir() / "acts"
    if cache:
        for s in spaces:
            path = root / f"{keys[s.name]}.safetensors"
            if path.is_file():
                with contextlib.suppress(Exception):  # an unreadable cache file is recomputed
                    out[s.name] = load_file(str(path))["acts"]
    missing = [s for s in spaces if s.name not in out]
    if missing:
        got = collect_activations(model, sitemap, missing, ids, skip_first=skip_first, batch_size=batch_size,
                                  progress=progress, desc="SAE activations (dense)")
        for s in missing:
            out[s.name] = got[s.name]
            if cache:
                with atomic_path(root / f"{keys[s.name]}.safetensors") as tmp:
                    save_file({"acts": got[s.name].contiguous()}, tmp,
                              metadata={"model_fingerprint": fp, "space": s.name, "ids_sha256": data,
                                        "skip_first": str(skip_first)})
    return out, keys


# --- training -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SaeSettings:
    """Hyperparameters of one SAE training run (all enter the cache key).

    ``width``: number of features (``None``: 2 x the space's dimension); ``k``: active features per token
    (TopK); ``steps`` optimiser steps of ``batch_size`` tokens; ``l1_coefficient`` for the standard (ReLU +
    L1) architecture.
    """

    architecture: str = "topk"
    width: int | None = None
    k: int = 32
    steps: int = 500
    batch_size: int = 512
    lr: float = 1e-3
    l1_coefficient: float = 5.0
    seed: int = 0

    def check(self, d_in: int | None = None) -> None:
        """One-line errors for impossible settings (before any model work)."""
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"SAE architecture must be one of {', '.join(ARCHITECTURES)}, got '{self.architecture}'")
        for name in ("k", "steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"SAE option '{name}' must be an integer >= 1, got {v!r}")
        if self.width is not None and (isinstance(self.width, bool) or not isinstance(self.width, int)
                                       or self.width < 1):
            raise ConfigError(f"SAE option 'width' must be an integer >= 1 (number of features), got {self.width!r}")
        if self.architecture == "topk" and self.width is not None and self.k > self.width:
            raise ConfigError(f"SAE option 'k' ({self.k}) must not exceed 'width' ({self.width}); lower k or "
                              f"widen the SAE")
        for name in ("lr", "l1_coefficient"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"SAE option '{name}' must be a positive number, got {v!r}")
        if d_in is not None and self.architecture == "topk" and self.k > self.resolved_width(d_in):
            raise ConfigError(f"SAE option 'k' ({self.k}) exceeds the width ({self.resolved_width(d_in)})")

    def resolved_width(self, d_in: int) -> int:
        return int(self.width) if self.width is not None else 2 * int(d_in)


def _data_provider(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of rows of ``acts`` (a new permutation per epoch, seeded)."""
    g = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    while True:
        perm = torch.randperm(n, generator=g)
        for start in range(0, n - batch_size + 1, batch_size):
            yield acts[perm[start:start + batch_size]]


def train_sae(acts: torch.Tensor, settings: SaeSettings, *, metadata: dict[str, Any] | None = None,
              progress: bool | None = None):
    """Train an SAE with sae-lens on ``acts`` ``[n_tokens, d]``; returns ``(inference_sae, stats)``.

    The training SAE is converted to sae-lens' inference class by saving and reloading its inference form.
    """
    sae_lens = require_sae_lens()
    from sae_lens import SAE, SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    acts = acts.reshape(-1, acts.shape[-1]).to(torch.float32)
    d_in = int(acts.shape[1])
    settings.check(d_in)
    width = settings.resolved_width(d_in)
    batch = min(settings.batch_size, int(acts.shape[0]))
    if batch < 1:
        raise ConfigError("no activations to train the SAE on; give more or longer calibration blocks")
    meta = SAEMetadata(**{k: v for k, v in (metadata or {}).items() if k in ("model_name", "hook_name")})
    common = dict(d_in=d_in, d_sae=width, dtype="float32", device="cpu",
                  normalize_activations="expected_average_only_in", metadata=meta)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        if settings.architecture == "topk":
            cfg = sae_lens.TopKTrainingSAEConfig(k=settings.k, **common)
            sae = sae_lens.TopKTrainingSAE(cfg)
        else:
            cfg = sae_lens.StandardTrainingSAEConfig(l1_coefficient=settings.l1_coefficient,
                                                     l1_warm_up_steps=settings.steps // 10, **common)
            sae = sae_lens.StandardTrainingSAE(cfg)
        trainer_cfg = SAETrainerConfig(
            total_training_samples=settings.steps * batch, train_batch_size_samples=batch, lr=settings.lr,
            lr_end=settings.lr / 10, lr_scheduler_name="cosineannealing", lr_warm_up_steps=settings.steps // 20,
            lr_decay_steps=0, device="cpu", dead_feature_window=max(1, settings.steps // 5),
            feature_sampling_window=max(1, settings.steps), n_batches_for_norm_estimate=16)
        provider = _data_provider(acts, batch, settings.seed)
        trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider)
        # sae-lens' own norm estimate, done here so the decoder bias can start at the (scaled) mean
        t0 = time.perf_counter()
        with _quiet_tqdm(progress):
            trainer.activation_scaler.estimate_scaling_factor(d_in=d_in, data_provider=provider,
                                                              n_batches_for_norm_estimate=16)
            with torch.no_grad():
                sae.b_dec.copy_(acts.mean(0) * trainer.activation_scaler.scaling_factor)
            sae = trainer.fit()
        seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        inference = SAE.load_from_disk(tmp)
    stats = {"train_tokens": int(acts.shape[0]), "steps": settings.steps, "batch_size": batch,
             "samples_seen": settings.steps * batch, "seconds": round(seconds, 2), "width": width,
             "d_in": d_in, "sae_lens_version": str(sae_lens.__version__),
             "final_dead_features": int(trainer.dead_neurons.sum())}
    return inference, stats


@contextlib.contextmanager
def _quiet_tqdm(progress: bool | None) -> Iterator[None]:
    """sae-lens draws its own tqdm bars; with ``progress=False`` they are created disabled."""
    if progress is None or progress:
        yield
        return
    import functools
    from unittest import mock

    import sae_lens.training.activation_scaler as scaler_module
    import sae_lens.training.sae_trainer as trainer_module
    from tqdm.auto import tqdm

    quiet = functools.partial(tqdm, disable=True)
    with mock.patch.object(trainer_module, "tqdm", quiet), mock.patch.object(scaler_module, "tqdm", quiet):
        yield


def _save_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # the usual permissions, not mkdtemp's 0700
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process wrote it first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def trained_sae(model: nn.Module, sitemap: SiteMap, space: BiasSpace, ids: torch.Tensor, settings: SaeSettings, *,
                skip_first: int = 1, batch_size: int = 8, cache: bool = True, progress: bool | None = None,
                acts: torch.Tensor | None = None):
    """The SAE of ``space`` trained on the dense activations of ``ids``, from the cache when there.

    Returns ``(sae, info)``; ``info`` has the cache key, directory, whether it was a cache hit, the
    training statistics and the data hash.
    """
    sae_lens = require_sae_lens()
    d_in = space.dim(sitemap)
    settings.check(d_in)
    fp, data = _fingerprint(model), ids_hash(ids)
    major = str(sae_lens.__version__).split(".")[0]
    key = _key("sae", fp, space.name, data, skip_first, asdict(settings), major)
    directory = sae_cache_dir() / "saes" / key
    info_file = directory / "spon_sae.json"
    if cache and info_file.is_file():
        try:
            sae = sae_lens.SAE.load_from_disk(directory)
            info = json.loads(info_file.read_text())
            return sae, {**info, "cache_hit": True, "directory": str(directory)}
        except Exception:  # a broken cache entry is retrained
            pass
    if acts is None:
        got, _ = cached_activations(model, sitemap, [space], ids, skip_first=skip_first, batch_size=batch_size,
                                    cache=cache, progress=progress)
        acts = got[space.name]
    sae, stats = train_sae(acts, settings, metadata={"model_name": getattr(model, "name_or_path", None) or "",
                                                      "hook_name": space.name}, progress=progress)
    info = {"key": key, "space": space.name, "model_fingerprint": fp, "ids_sha256": data,
            "skip_first": skip_first, "settings": asdict(settings), "training": stats}
    if cache:
        def write(tmp: Path) -> None:
            sae.save_model(tmp)
            (tmp / "spon_sae.json").write_text(json_text(info))

        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
        _save_dir_atomically(directory, write)
    return sae, {**info, "cache_hit": False, "directory": str(directory) if cache else None}


def load_sae(source: str | os.PathLike, *, d_in: int | None = None, where: str = "sae"):
    """An SAE from a local directory (sae-lens format) or ``release:sae_id`` of a sae-lens release
    (needs the hub). ``d_in`` is checked against the SAE's input dimension."""
    sae_lens = require_sae_lens()
    path = Path(source)
    if path.is_dir():
        try:
            sae = sae_lens.SAE.load_from_disk(path)
        except Exception as exc:
            raise ConfigError(f"{where}: cannot load an SAE from '{path}' ({type(exc).__name__}: {exc}); "
                              f"give a directory with sae_weights.safetensors and cfg.json") from None
    elif ":" in str(source) and not str(source).startswith((".", "/")):
        release, sae_id = str(source).split(":", 1)
        try:
            sae = sae_lens.SAE.from_pretrained(release, sae_id)
        except Exception as exc:
            raise ConfigError(f"{where}: cannot load sae-lens release '{release}' id '{sae_id}' "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                              f"check the names or give a local SAE directory") from None
    else:
        raise ConfigError(f"{where}: '{source}' is neither an SAE directory nor 'release:sae_id'")
    if d_in is not None and int(sae.cfg.d_in) != int(d_in):
        raise ConfigError(f"{where}: the SAE at '{source}' reads {sae.cfg.d_in}-dimensional inputs, but the bias "
                          f"space has {d_in} dimensions; use an SAE trained on this site's space")
    return sae


def decoder_directions(sae) -> torch.Tensor:
    """Unit-norm decoder directions ``[width, d_in]`` (float32)."""
    w = sae.W_dec.detach().to(torch.float32)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def encode(sae, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Feature activations ``[..., width]`` of ``x`` ``[..., d]`` (float32), computed in chunks."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
    parts = [sae.encode(flat[i:i + chunk]) for i in range(0, flat.shape[0], chunk)]
    f = torch.cat(parts) if parts else flat.new_zeros(0, sae.cfg.d_sae)
    return f.reshape(*x.shape[:-1], f.shape[-1])


# --- quality --------------------------------------------------------------------------------------

@torch.no_grad()
def _nll(model: nn.Module, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-block mean next-token NLL ``[N]`` (float64)."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    out = []
    for i in range(0, len(ids), batch_size):
        batch = ids[i:i + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].to(torch.float32)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        out.append(loss.reshape(batch.shape[0], -1).mean(1).to("cpu", torch.float64))
    return torch.cat(out)


@torch.no_grad()
def sae_quality(sae, model: nn.Module, sitemap: SiteMap, space: BiasSpace, ids: torch.Tensor, *,
                skip_first: int = 1, batch_size: int = 8, acts: torch.Tensor | None = None,
                progress: bool | None = None) -> dict[str, Any]:
    """Quality of ``sae`` on held-out blocks ``ids``: FVU, L0, dead-feature fraction and the change in
    next-token loss when the reconstruction replaces the activation (positions >= ``skip_first``), with the
    same change for mean ablation (the activation replaced by its mean) as the reference.

    ``fvu = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``; ``l0`` = mean active features per token;
    ``dead_fraction`` = share of features never active on these tokens;
    ``loss_recovered = (loss_mean_ablated - loss_spliced) / (loss_mean_ablated - loss_dense)``.
    """
    if acts is None:
        acts = collect_activations(model, sitemap, [space], ids, skip_first=skip_first, batch_size=batch_size,
                                   progress=progress)[space.name]
    x = acts.reshape(-1, acts.shape[-1]).to(torch.float32)
    f = encode(sae, x)
    x_hat = torch.cat([sae.decode(f[i:i + 4096]) for i in range(0, f.shape[0], 4096)]).to(torch.float32)
    mean = x.mean(0)
    fvu = float(((x - x_hat) ** 2).sum() / ((x - mean) ** 2).sum().clamp_min(1e-30))
    active = f != 0
    l0 = float(active.sum(1).to(torch.float64).mean())
    fired = active.any(0)
    dead = float(1.0 - fired.to(torch.float64).mean())

    def splice(replacement: Callable[[torch.Tensor], torch.Tensor]):
        def fn(sp: BiasSpace, h: torch.Tensor) -> torch.Tensor:
            new = h.clone()
            new[:, skip_first:] = replacement(h[:, skip_first:].to(torch.float32)).to(h.dtype)
            return new
        return fn

    def reconstruct(h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        return sae.decode(sae.encode(h.reshape(-1, shape[-1]))).reshape(shape)

    dense = _nll(model, ids, batch_size)
    with space_hooks(model, sitemap, [space], splice(reconstruct)):
        spliced = _nll(model, ids, batch_size)
    with space_hooks(model, sitemap, [space], splice(lambda h: mean.to(h.device).expand_as(h))):
        ablated = _nll(model, ids, batch_size)
    d_dense, d_spliced, d_ablated = float(dense.mean()), float(spliced.mean()), float(ablated.mean())
    diff = (spliced - dense).numpy()
    gap = d_ablated - d_dense
    return {
        "fvu": fvu, "l0": l0, "dead_fraction": dead, "n_features": int(f.shape[1]), "n_tokens": int(x.shape[0]),
        "loss_dense": d_dense, "loss_spliced": d_spliced, "loss_mean_ablated": d_ablated,
        "delta_loss": d_spliced - d_dense, "delta_loss_ci95": _t_interval(diff),
        "loss_recovered": (d_ablated - d_spliced) / gap if gap > 0 else float("nan"),
        "n_blocks": int(len(ids)), "skip_first": skip_first,
    }


def _t_interval(values) -> list[float]:
    """95% Student-t interval of the mean of ``values`` (NaNs when fewer than two)."""
    import numpy as np
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return [float("nan"), float("nan")]
    half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return [float(v.mean() - half), float(v.mean() + half)]


# --- decomposition --------------------------------------------------------------------------------

def _omp(directions, targets, n: int):
    """Orthogonal matching pursuit (scikit-learn) of each column of ``targets`` ``[d, m]`` on
    ``directions`` ``[width, d]`` with ``n`` atoms: returns coefficients ``[m, width]``."""
    import numpy as np
    from sklearn.linear_model import OrthogonalMatchingPursuit

    X = np.asarray(directions, dtype=np.float64).T
    Y = np.asarray(targets, dtype=np.float64)
    n = min(n, X.shape[1], X.shape[0])
    omp = OrthogonalMatchingPursuit(n_nonzero_coefs=n, fit_intercept=False, precompute=True)
    omp.fit(X, Y)
    return np.atleast_2d(omp.coef_)


def explained_fractions(directions, vectors, ns: Sequence[int] = (1, 5, 20)) -> dict[int, Any]:
    """For each ``n``: ``1 - ||v - v_hat_n||^2 / ||v||^2`` per vector (rows of ``vectors`` ``[m, d]``), where
    ``v_hat_n`` is the OMP approximation with ``n`` decoder directions."""
    import numpy as np

    V = np.asarray(vectors, dtype=np.float64)
    D = np.asarray(directions, dtype=np.float64)
    out = {}
    for n in ns:
        coef = _omp(D, V.T, n)
        resid = V - coef @ D
        out[int(n)] = 1.0 - (resid ** 2).sum(1) / np.maximum((V ** 2).sum(1), 1e-300)
    return out


def decompose_bias(directions, bias, *, ns: Sequence[int] = (1, 5, 20), top: int = 10, n_null: int = 200,
                   null_cov=None, seed: int = 0) -> dict[str, Any]:
    """Sparse decomposition of ``bias`` on unit decoder directions ``[width, d]`` by OMP.

    Returns the ``top`` features of the ``max(ns)``-atom fit (index, weight, cosine with the bias, share of
    the squared norm of the weighted atom), the explained squared-norm fraction for each ``n`` and, as the
    null, the same fraction for ``n_null`` isotropic random vectors of equal norm (and for random vectors
    drawn from the activation covariance ``null_cov`` when given): mean, 95th percentile and the empirical
    p-value ``(1 + #null >= observed) / (1 + n_null)``.
    """
    import numpy as np

    D = np.asarray(directions, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(b))
    if norm == 0.0:
        return {"norm": 0.0, "top_features": [], "explained": {}, "note": "zero bias: nothing to decompose"}
    nmax = max(ns)
    coef = _omp(D, b[:, None], nmax)[0]
    order = [int(i) for i in np.argsort(-np.abs(coef)) if coef[i] != 0][:top]
    cos = D @ b / norm
    top_features = [{"feature": i, "weight": float(coef[i]), "cosine": float(cos[i]),
                     "share": float(coef[i] ** 2 / norm ** 2)} for i in order]
    observed = {n: float(v[0]) for n, v in explained_fractions(D, b[None, :], ns).items()}
    rng = np.random.default_rng([seed, 0x5AE])  # its own stream, never the caller's seed-0 stream
    nulls: dict[str, Any] = {}
    samples = {"isotropic": rng.standard_normal((n_null, b.size))}
    if null_cov is not None:
        C = np.asarray(null_cov, dtype=np.float64)
        w, U = np.linalg.eigh((C + C.T) / 2)
        samples["activation_covariance"] = rng.standard_normal((n_null, b.size)) @ (U * np.sqrt(np.clip(w, 0, None))).T
    explained: dict[str, Any] = {}
    for name, R in samples.items():
        R = R / np.linalg.norm(R, axis=1, keepdims=True) * norm
        fr = explained_fractions(D, R, ns)
        nulls[name] = {n: fr[n] for n in ns}
    for n in ns:
        row = {"observed": observed[n]}
        for name, fr in nulls.items():
            v = fr[n]
            row[f"null_{name}_mean"] = float(v.mean())
            row[f"null_{name}_p95"] = float(np.quantile(v, 0.95))
            row[f"null_{name}_p"] = float((1 + (v >= observed[n]).sum()) / (1 + v.size))
        explained[str(n)] = row
    max_cos = float(np.abs(cos).max())
    iso = np.abs(D @ (samples["isotropic"] / np.linalg.norm(samples["isotropic"], axis=1, keepdims=True)).T).max(0)
    return {"norm": norm, "n_atoms": nmax, "top_features": top_features, "explained": explained,
            "max_abs_cosine": max_cos, "max_abs_cosine_null_mean": float(iso.mean()),
            "max_abs_cosine_null_p95": float(np.quantile(iso, 0.95)), "n_null": int(n_null)}


# --- feature restoration --------------------------------------------------------------------------

def feature_restoration(dense, sparse, spon, *, null=None, top: int = 10, alpha: float = 0.05,
                        n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Which SAE features sparsification moves and how much of that the SPON biases undo.

    Inputs are per-block mean feature activations ``[n_blocks, width]`` under the dense, sparse and
    sparse+SPON models (and optionally sparse + random biases of equal norms, ``null``), on the same blocks.
    ``restoration_share = 1 - ||m_spon - m_dense|| / ||m_sparse - m_dense||`` over features (1 = SPON brings
    every feature's mean back to dense; 0 = no better than sparse; negative = further away), with a 95%
    bootstrap interval over blocks. A feature is *suppressed* / *created* when its sparse-minus-dense
    difference is significant in a paired t-test over blocks (Bonferroni over features at ``alpha``) and
    negative / positive; per feature ``restored = (m_sparse - m_spon) / (m_sparse - m_dense)``.
    """
    import numpy as np
    from scipy import stats

    D, S, B = (np.asarray(a, dtype=np.float64) for a in (dense, sparse, spon))
    md, ms, mb = D.mean(0), S.mean(0), B.mean(0)

    def share(idx=None):
        d, s, b = (D, S, B) if idx is None else (D[idx], S[idx], B[idx])
        gap = np.linalg.norm(s.mean(0) - d.mean(0))
        return 1.0 - np.linalg.norm(b.mean(0) - d.mean(0)) / gap if gap > 0 else float("nan")

    observed = share()
    rng = np.random.default_rng(seed)
    n = D.shape[0]
    boot = np.array([share(rng.integers(0, n, n)) for _ in range(n_boot)]) if n > 1 else np.array([np.nan])
    diff = S - D
    if n > 1:
        with np.errstate(invalid="ignore", divide="ignore"):
            _, p = stats.ttest_1samp(diff, 0.0, axis=0)
        p = np.where(np.isfinite(p), p, 1.0)
    else:
        p = np.ones(D.shape[1])
    sig = p < alpha / D.shape[1]
    change = ms - md
    with np.errstate(invalid="ignore", divide="ignore"):
        restored = np.where(change != 0, (ms - mb) / change, np.nan)

    def rows(idx):
        return [{"feature": int(i), "dense": float(md[i]), "sparse": float(ms[i]), "spon": float(mb[i]),
                 "change": float(change[i]), "restored": float(restored[i]), "p": float(p[i])} for i in idx]

    suppressed = [i for i in np.argsort(change) if sig[i] and change[i] < 0][:top]
    created = [i for i in np.argsort(-change) if sig[i] and change[i] > 0][:top]
    out = {
        "restoration_share": float(observed),
        "restoration_share_ci95": [float(np.nanquantile(boot, 0.025)), float(np.nanquantile(boot, 0.975))],
        "n_suppressed": int((sig & (change < 0)).sum()), "n_created": int((sig & (change > 0)).sum()),
        "n_features": int(D.shape[1]), "n_blocks": int(n),
        "sparse_change_norm": float(np.linalg.norm(change)), "spon_change_norm": float(np.linalg.norm(mb - md)),
        "suppressed": rows(suppressed), "created": rows(created),
    }
    if null is not None:
        N = np.asarray(null, dtype=np.float64)
        gap = np.linalg.norm(change)
        out["restoration_share_null"] = float(1.0 - np.linalg.norm(N.mean(0) - md) / gap) if gap > 0 else float("nan")
    return out


def feature_means(sae, acts: torch.Tensor) -> torch.Tensor:
    """Per-block mean activation of every feature: ``acts`` ``[N, T, d]`` -> ``[N, width]``."""
    return encode(sae, acts).mean(1)


# --- contexts -------------------------------------------------------------------------------------

def top_contexts(sae, acts: torch.Tensor, ids: torch.Tensor, tokenizer, features: Sequence[int], *,
                 skip_first: int = 1, n: int = 5, window: int = 8) -> dict[int, list[dict[str, Any]]]:
    """The ``n`` tokens of ``ids`` that activate each feature most, with ``window`` tokens before and
    ``window // 2`` after; ``acts`` ``[N, T - skip_first, d]`` are the activations of those blocks."""
    features = [int(f) for f in features]
    if not features:
        return {}
    N, T = acts.shape[0], acts.shape[1]
    f = encode(sae, acts)[..., features].reshape(N * T, len(features))
    out: dict[int, list[dict[str, Any]]] = {}
    for j, feat in enumerate(features):
        col = f[:, j]
        k = min(n, int((col > 0).sum()))
        rows = []
        for flat in torch.topk(col, k).indices.tolist() if k else []:
            b, t = divmod(flat, T)
            pos = t + skip_first
            before = ids[b, max(0, pos - window):pos].tolist()
            after = ids[b, pos + 1:pos + 1 + window // 2].tolist()
            token = tokenizer.decode([int(ids[b, pos])])
            rows.append({"activation": float(col[flat]), "block": int(b), "position": int(pos), "token": token,
                         "context": f"{tokenizer.decode(before)}[[{token}]]{tokenizer.decode(after)}"})
        out[feat] = rows
    return out


def check_bias_site(site: str, biased: Sequence[str]) -> None:
    if site not in biased:
        shown = ", ".join(list(biased)[:4]) + (" ..." if len(biased) > 4 else "")
        raise ConfigError(f"site '{site}' has no SPON bias in this run (biased: {shown or 'none'}); "
                          f"pick one of the biased sites")


__all__ = ["BiasSpace", "SaeSettings", "bias_space", "space_hooks", "collect_activations", "cached_activations",
           "train_sae", "trained_sae", "load_sae", "sae_quality", "decompose_bias", "explained_fractions",
           "feature_restoration", "feature_means", "top_contexts", "decoder_directions", "require_sae_lens",
           "sae_lens_available", "MISSING", "SponError"]
