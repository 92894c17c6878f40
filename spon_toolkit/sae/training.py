"""Training SAEs with sae-lens' own trainer on in-memory activations, caching them, loading local or released ones."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..fileio import json_text
from ..sites import SiteMap
from .spaces import (
    ARCHITECTURES,
    BiasSpace,
    _fingerprint,
    _key,
    cached_activations,
    ids_hash,
    require_sae_lens,
    sae_cache_dir,
)


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
