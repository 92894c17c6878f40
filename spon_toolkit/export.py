"""Export: fold SPON biases into the model and save a directory that plain transformers loads.

``y = W S(x) + b + beta`` becomes ``y = W S(x) + (b + beta)``: the learned biases are written into the
layers' ``bias`` (see :meth:`spon_toolkit.sparse.SponBiases.fold`). transformers only creates biases
where the config asks for them (Llama: ``attention_bias`` for q/k/v/o, ``mlp_bias`` for gate/up/down), so
the exporter switches on only the flags that the biased sites need, gives every *other* linear layer
the flag creates a zero bias (the function is unchanged), and checks against a model built from the new
config (on the meta device, no memory) that the saved tensors are exactly what it expects. Architectures
that cannot hold a bias where one was learned are refused with a one-line error.

The directory also holds ``spon_sparsifier.json``: the sparsifier's name and state (e.g. calibrated
thresholds) and the sparsified sites, so :func:`load_exported` re-attaches the same sparsification.
Plain ``AutoModelForCausalLM.from_pretrained(dir)`` gives the *dense* model with the biases folded in.
The directory is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoint import restore_sparsifier_state
from .contracts import build_sparsifier
from .errors import ConfigError, SponError
from .fileio import json_text
from .sites import ATTN_MODULES, MLP_MODULES, parse_site

SPARSIFIER_FILE = "spon_sparsifier.json"
EXPORT_FORMAT = "spon-export/1"
#: config flag -> modules whose bias it creates (Llama family)
BIAS_FLAGS: dict[str, tuple[str, ...]] = {"attention_bias": ATTN_MODULES, "mlp_bias": MLP_MODULES}


def _needed_flags(config, sites: Iterable[str]) -> dict[str, bool]:
    modules = {parse_site(s)[1] for s in sites}
    flags = {}
    for flag, family in BIAS_FLAGS.items():
        if hasattr(config, flag) and modules & set(family) and not getattr(config, flag):
            flags[flag] = True
    return flags


def _expected_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of a fresh model built from ``model.config`` (meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(model.config)
    return set(fresh.state_dict().keys())


def _get_module(model: nn.Module, dotted: str) -> nn.Module:
    mod = model
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


def _write_dir_atomic(out_dir: Path, overwrite: bool, fill) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ConfigError(f"export directory '{out_dir}' exists and is not empty; choose another or pass --force")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_model(
    model: nn.Module,
    biases,
    out_dir: str | os.PathLike,
    *,
    sparsifier=None,
    sparse_sites: Iterable[str] = (),
    tokenizer=None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Fold ``biases`` into ``model``, ``save_pretrained`` it to ``out_dir``, then restore ``model``.

    ``model`` is left exactly as it was (biases unfolded, re-attached as hooks if they were attached).
    """
    out_dir = Path(out_dir)
    config = model.config
    flags = _needed_flags(config, biases.sites)
    saved_flags = {f: getattr(config, f) for f in flags}
    was_attached = biases.hooks.attached
    added: list[nn.Module] = []
    try:
        biases.fold()
        for flag, value in flags.items():
            setattr(config, flag, value)
        expected = _expected_state_keys(model)
        have = set(model.state_dict().keys())
        for key in sorted(expected - have):
            if not key.endswith(".bias"):
                raise SponError(f"cannot export: the exported config expects '{key}', which this model lacks")
            mod = _get_module(model, key[: -len(".bias")])
            if not isinstance(mod, nn.Linear) or mod.bias is not None:
                raise SponError(f"cannot export: unexpected parameter '{key}' in the exported config")
            mod.bias = nn.Parameter(torch.zeros(mod.out_features, dtype=mod.weight.dtype,
                                                device=mod.weight.device), requires_grad=False)
            added.append(mod)
        surplus = sorted(k for k in set(model.state_dict().keys()) - expected if k.endswith(".bias"))
        if surplus:
            raise ConfigError(
                f"cannot export: {config.model_type} models in transformers have no bias at '{surplus[0]}' "
                f"(and {len(surplus) - 1} more); put SPON biases on other modules or keep them as a checkpoint")

        def fill(tmp: Path) -> None:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            doc = {
                "format": EXPORT_FORMAT,
                "sparsifier": None if sparsifier is None else {"name": sparsifier.name,
                                                               "state": sparsifier.state_dict()},
                "sparse_sites": list(sparse_sites),
                "biased_sites": list(biases.sites),
                "parametrisation": biases.parametrisation,
                "bias_flags": flags,
                "metadata": dict(metadata or {}),
            }
            (tmp / SPARSIFIER_FILE).write_text(json_text(doc, sort_keys=True).rstrip("\n"))

        _write_dir_atomic(out_dir, overwrite, fill)
    finally:
        for mod in added:
            mod.bias = None
        for flag, value in saved_flags.items():
            setattr(config, flag, value)
        biases.unfold()
        if was_attached:
            biases.attach()
    return out_dir


def export_checkpoint(checkpoint, model: nn.Module, out_dir: str | os.PathLike, *, toolkit, tokenizer=None,
                      check_fingerprint: bool = True, overwrite: bool = False) -> Path:
    """Export a :class:`spon_toolkit.checkpoint.Checkpoint` (or its path) applied to ``model``."""
    from .checkpoint import Checkpoint, load_checkpoint

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    from .sites import SiteMap

    sitemap = SiteMap(model, toolkit.architectures)
    ckpt.validate(model, check_fingerprint=check_fingerprint, sitemap=sitemap)
    biases = ckpt.biases(model, sitemap=sitemap)
    return export_model(
        model, biases, out_dir, sparsifier=ckpt.sparsifier(toolkit), sparse_sites=ckpt.sparse_sites,
        tokenizer=tokenizer, metadata={"checkpoint": str(ckpt.path), **ckpt.metadata}, overwrite=overwrite,
    )


def load_exported(path: str | os.PathLike, *, toolkit, dtype: torch.dtype | str | None = None,
                  device: str = "cpu"):
    """Load an exported directory and re-attach its sparsification: returns ``(SparseModel, tokenizer)``.

    The tokenizer is ``None`` when the directory has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .sparse import SparseModel

    path = Path(path)
    spec_file = path / SPARSIFIER_FILE
    if not spec_file.is_file():
        raise ConfigError(f"'{path}' is not a spon export (no {SPARSIFIER_FILE}); export one with `spon export`")
    try:
        doc = json.loads(spec_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"'{spec_file}' is unreadable ({exc})") from None
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs).to(device).eval()
    tokenizer = None
    with contextlib.suppress(Exception):
        tokenizer = AutoTokenizer.from_pretrained(path)
    sparsifier = None
    if doc.get("sparsifier"):
        state = restore_sparsifier_state(doc["sparsifier"]["state"])
        sparsifier = build_sparsifier(toolkit, doc["sparsifier"]["name"], state["sparsity"])
        sparsifier.load_state_dict(state)
    from .sites import SiteMap

    sm = SparseModel(model, sparsifier, doc.get("sparse_sites") or (), sitemap=SiteMap(model, toolkit.architectures))
    return sm, tokenizer
