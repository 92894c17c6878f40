"""SPON checkpoints: one safetensors file holding the bias tensors and a JSON metadata document.

Why one file: it is written to a temporary name and renamed into place, so a checkpoint is either
complete or absent, and tensors and metadata can never disagree. Nothing is pickled; the metadata is
JSON stored under the ``spon`` key of the safetensors header (``safetensors.safe_open(...).metadata()``).

Metadata (``format`` = :data:`FORMAT`):

- ``toolkit_version``; ``model``: name, fingerprint (:func:`spon_toolkit.models.model_fingerprint`, which
  covers names, shapes, dtypes and sampled values), dtype, model type, number of layers;
- ``sites`` (biased sites) with their ``shapes``; ``parametrisation`` (output / input);
- ``sparse_sites``; ``sparsifier``: name and its ``state_dict()`` (e.g. calibrated thresholds);
  ``sparsity``;
- ``training``: the trainer name and options; ``data``: e.g. the corpus hash and split; ``metrics``;
  ``extra``: anything else the caller adds.

:meth:`Checkpoint.validate` refuses a model, site set or sparsity other than the recorded ones with a
one-line :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .contracts import build_sparsifier
from .errors import ConfigError, SponError
from .fileio import NONFINITE, atomic_path, to_jsonable
from .sites import SiteMap

FORMAT = "spon-checkpoint/1"
METADATA_KEY = "spon"


class CheckpointError(SponError):
    """A checkpoint cannot be read, or does not fit the model / sites / sparsity it is applied to."""


def restore_sparsifier_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Undo the JSON policy (:func:`spon_toolkit.fileio.to_jsonable`) for a sparsifier state (thresholds
    may be +-inf)."""
    out = dict(state)
    for key in ("thresholds", "calibration_sparsity"):
        if isinstance(out.get(key), Mapping):
            out[key] = {k: float(NONFINITE.get(v, v) if isinstance(v, str) else v) for k, v in out[key].items()}
    return out


def model_metadata(model: nn.Module, sitemap: SiteMap | None = None) -> dict[str, Any]:
    """Name, fingerprint, dtype, type and depth of a model, as recorded in checkpoints."""
    from .models import model_fingerprint, model_name

    sitemap = sitemap or SiteMap(model)
    return {
        "name": model_name(model),
        "fingerprint": model_fingerprint(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "model_type": sitemap.model_type,
        "n_layers": sitemap.n_layers,
    }


def save_checkpoint(
    path: str | os.PathLike,
    biases,
    *,
    model: nn.Module,
    sparsifier=None,
    sparse_sites: Iterable[str] = (),
    training: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``biases`` (a :class:`spon_toolkit.sparse.SponBiases`) and their provenance to ``path``.

    ``path`` gets the suffix ``.safetensors`` if it has none. Returns the path written.
    """
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    if path.exists() and path.is_dir():
        raise ConfigError(f"checkpoint path '{path}' is a directory; give a file name")
    tensors = biases.tensors()
    sparsity = None
    if sparsifier is not None:
        sparsity = sparsifier.sparsity
    meta = {
        "format": FORMAT,
        "toolkit_version": __version__,
        "model": model_metadata(model, biases.sitemap),
        "sites": list(biases.sites),
        "shapes": {s: list(t.shape) for s, t in tensors.items()},
        "parametrisation": biases.parametrisation,
        "sparse_sites": list(sparse_sites),
        "sparsifier": None if sparsifier is None else {"name": sparsifier.name, "state": sparsifier.state_dict()},
        "sparsity": sparsity,
        "training": dict(training or {}),
        "data": dict(data or {}),
        "metrics": dict(metrics or {}),
        "extra": dict(extra or {}),
    }
    header = {METADATA_KEY: json.dumps(to_jsonable(meta), sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)
    return path


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``tensors`` (site -> bias parameter) and its ``metadata``."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        return list(self.metadata["sites"])

    @property
    def sparse_sites(self) -> list[str]:
        return list(self.metadata.get("sparse_sites") or [])

    @property
    def parametrisation(self) -> str:
        return self.metadata.get("parametrisation", "output")

    @property
    def sparsity(self) -> Any:
        return self.metadata.get("sparsity")

    def validate(
        self,
        model: nn.Module,
        *,
        sites: Iterable[str] | None = None,
        sparsity: Any = None,
        check_fingerprint: bool = True,
        sitemap: SiteMap | None = None,
    ) -> None:
        """Refuse to apply this checkpoint to another model, other bias sites or another sparsity.
        ``sitemap``: the model's sites (pass ``SiteMap(model, toolkit.architectures)`` for architectures
        registered by plugins; the default knows the built-in ones)."""
        where = f"checkpoint '{self.path}'"
        recorded = self.metadata.get("model", {})
        sitemap = sitemap or SiteMap(model)
        if recorded.get("model_type") not in (None, sitemap.model_type) or recorded.get("n_layers") not in (
            None, sitemap.n_layers
        ):
            raise CheckpointError(
                f"{where} is for a {recorded.get('model_type')} model with {recorded.get('n_layers')} layers "
                f"('{recorded.get('name')}'), not this {sitemap.model_type} model with {sitemap.n_layers} layers")
        for site in self.sites:
            try:
                shape = sitemap.shape(site)
            except SponError as exc:
                raise CheckpointError(f"{where} has a bias for '{site}' that this model lacks: {exc}") from None
            want = shape[1] if self.parametrisation == "output" else shape[0]
            got = tuple(self.tensors[site].shape)
            if got != (want,):
                raise CheckpointError(
                    f"{where} has a bias of shape {got} for '{site}', this model needs ({want},): "
                    f"it was trained on another model")
        if check_fingerprint and recorded.get("fingerprint"):
            from .models import model_fingerprint

            fp = model_fingerprint(model)
            if fp != recorded["fingerprint"]:
                raise CheckpointError(
                    f"{where} was trained on '{recorded.get('name')}' ({recorded.get('dtype')}, fingerprint "
                    f"{recorded['fingerprint']}), but this model's weights differ (fingerprint {fp}); load the "
                    f"same model in the same dtype, or pass check_fingerprint=False / --no-fingerprint-check")
        if sites is not None:
            wanted = sorted(sitemap.resolve(sites))
            if wanted != sorted(self.sites):
                missing = sorted(set(wanted) - set(self.sites))
                surplus = sorted(set(self.sites) - set(wanted))
                raise CheckpointError(
                    f"{where} has biases on other sites than requested "
                    f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                    f"extra {surplus[:3]}{'...' if len(surplus) > 3 else ''})")
        if sparsity is not None and self.sparsity is not None and to_jsonable(sparsity) != self.sparsity:
            raise CheckpointError(
                f"{where} was trained at sparsity {self.sparsity}, not {sparsity}; biases do not transfer "
                f"between sparsities -- train for {sparsity} or evaluate at {self.sparsity}")

    def sparsifier(self, toolkit):
        """Rebuild the recorded sparsifier (with its calibrated state) through ``toolkit``'s sparsifiers."""
        info = self.metadata.get("sparsifier")
        if not info:
            return None
        state = restore_sparsifier_state(info["state"])
        sp = build_sparsifier(toolkit, info["name"], state["sparsity"])
        sp.load_state_dict(state)
        return sp

    def biases(self, model: nn.Module, *, dtype: torch.dtype = torch.float32, sitemap: SiteMap | None = None):
        """A :class:`spon_toolkit.sparse.SponBiases` on ``model`` filled from this checkpoint."""
        from .sparse import SponBiases

        b = SponBiases(model, self.sites, parametrisation=self.parametrisation, dtype=dtype, sitemap=sitemap)
        b.load_tensors(self.tensors)
        return b

    def apply(self, model: nn.Module, toolkit, *, check_fingerprint: bool = True):
        """Validate, then attach the recorded sparsifier and the biases: returns a ``SparseModel``."""
        from .sparse import SparseModel

        sitemap = SiteMap(model, toolkit.architectures)
        self.validate(model, check_fingerprint=check_fingerprint, sitemap=sitemap)
        return SparseModel(model, self.sparsifier(toolkit), self.sparse_sites, sitemap=sitemap,
                           biases=self.biases(model, sitemap=sitemap))


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; a bad file gives a one-line error."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        alt = path.with_name(path.name + ".safetensors")
        if alt.is_file():
            path = alt
        else:
            raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for truncated / garbage files
        raise CheckpointError(
            f"checkpoint '{path}' is not a readable safetensors file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    if METADATA_KEY not in header:
        raise CheckpointError(f"checkpoint '{path}' has no SPON metadata; it was not written by spon-toolkit")
    try:
        meta = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint '{path}' has corrupt metadata JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint '{path}' has metadata of type {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint '{path}' has format {meta.get('format')!r}; this toolkit reads {FORMAT}")
    missing = [s for s in meta.get("sites", []) if s not in tensors]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' lacks tensors for sites {missing[:3]}")
    _check_consistent(path, tensors, meta)
    return Checkpoint(path, tensors, meta)


def _check_consistent(path: Path, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Refuse a checkpoint whose parts contradict each other: site names that are not sites, non-finite
    biases, or a recorded sparsity that is not the sparsifier state's."""
    from .sites import parse_site

    where = f"checkpoint '{path}'"
    sites = meta.get("sites", [])
    if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
        raise CheckpointError(f"{where}: metadata key 'sites' must be a list of site names")
    for site in sites:
        try:
            parse_site(site)
        except SponError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
    for site in sites:
        if not bool(torch.isfinite(tensors[site]).all()):
            raise CheckpointError(f"{where}: the bias of {site} holds NaN or inf values; retrain it")
    info = meta.get("sparsifier")
    if info is not None:
        if not isinstance(info, dict) or not isinstance(info.get("state"), dict):
            raise CheckpointError(f"{where}: metadata key 'sparsifier' must be an object with a 'state'")
        state = restore_sparsifier_state(info["state"])
        if meta.get("sparsity") is not None and to_jsonable(state.get("sparsity")) != meta.get("sparsity"):
            raise CheckpointError(
                f"{where}: its metadata says sparsity {meta.get('sparsity')}, but its sparsifier state was "
                f"calibrated for {to_jsonable(state.get('sparsity'))}; the file was edited or corrupted")
