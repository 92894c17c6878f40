"""Sites: the linear layers of a decoder whose *input* can be sparsified.

A site is named ``layers.{i}.{module}`` with ``module`` one of :data:`MODULES`. Architectures map these
canonical names onto their own attribute paths through :class:`ArchSpec` entries registered by plugins
(hook ``spon_register_architectures``).

Site specifications accepted by :meth:`SiteMap.resolve` (a string or a list of them):

- ``"all"``: every site; ``"attn"``: q/k/v/o of every layer; ``"mlp"``: gate/up/down of every layer;
- ``"down_proj"``: that module in every layer;
- ``"layers.3"``: all seven modules of layer 3; ``"layers.3.down_proj"``: one site;
- ``"layers.0-9.down_proj"`` / ``"layers.0-9"``: an inclusive layer range.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch.nn as nn

from .errors import ConfigError, UnknownNameError, suggest, unknown

MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_MODULES: tuple[str, ...] = MODULES[:4]
MLP_MODULES: tuple[str, ...] = MODULES[4:]
GROUPS: dict[str, tuple[str, ...]] = {"all": MODULES, "attn": ATTN_MODULES, "mlp": MLP_MODULES}

_SITE_RE = re.compile(r"^layers\.(\d+)(?:-(\d+))?(?:\.([A-Za-z_]\w*))?$")


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture names things: the path of the decoder-layer list and of each module."""

    layers: str = "model.layers"
    modules: tuple[tuple[str, str], ...] = (
        ("q_proj", "self_attn.q_proj"),
        ("k_proj", "self_attn.k_proj"),
        ("v_proj", "self_attn.v_proj"),
        ("o_proj", "self_attn.o_proj"),
        ("gate_proj", "mlp.gate_proj"),
        ("up_proj", "mlp.up_proj"),
        ("down_proj", "mlp.down_proj"),
    )

    def module_path(self, module: str) -> str:
        return dict(self.modules)[module]


#: The naming shared by Llama, Mistral, Qwen2/Qwen3, Gemma and SmolLM2.
LLAMA_NAMING = ArchSpec()

#: The architectures every toolkit knows (registered by the ``spon.architectures`` built-in plugin, which
#: cannot be blocked). A :class:`SiteMap` built without a toolkit's registry knows these and no others.
BUILTIN_ARCHITECTURES: dict[str, ArchSpec] = {
    t: LLAMA_NAMING for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
}


def site_name(layer: int, module: str) -> str:
    return f"layers.{layer}.{module}"


def parse_site(site: str) -> tuple[int, str]:
    """``"layers.3.down_proj"`` -> ``(3, "down_proj")``; raises a one-line error otherwise."""
    m = _SITE_RE.match(site)
    if not m or m.group(2) is not None or m.group(3) is None:
        raise ConfigError(f"'{site}' is not a site name; use layers.<index>.<module>, e.g. layers.3.down_proj")
    return int(m.group(1)), m.group(3)


def _get_attr_path(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class SiteMap:
    """The sites of one loaded model and the modules behind them."""

    def __init__(self, model: nn.Module, architectures=None):
        """``architectures``: a toolkit's registry (``toolkit.architectures``) or a ``{model_type: ArchSpec}``
        mapping; without it only :data:`BUILTIN_ARCHITECTURES` are known (pass the toolkit's registry for
        architectures registered by plugins)."""
        if architectures is None:
            architectures = BUILTIN_ARCHITECTURES
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        known = architectures.names() if hasattr(architectures, "names") else architectures.keys()
        if model_type not in architectures:
            raise UnknownNameError(
                f"architecture '{model_type}' is not supported (known: {', '.join(sorted(known))}); "
                f"register an ArchSpec for it with the spon_register_architectures hook and pass that toolkit"
            )
        self.model_type: str = model_type
        self.arch: ArchSpec = architectures.get(model_type)
        try:
            self.layers = _get_attr_path(model, self.arch.layers)
        except AttributeError:
            raise UnknownNameError(
                f"model of type '{model_type}' has no attribute path '{self.arch.layers}' for its layers; "
                f"fix the ArchSpec registered for '{model_type}'"
            ) from None
        self.n_layers = len(self.layers)
        self.names: list[str] = [site_name(i, m) for i in range(self.n_layers) for m in MODULES]
        self._modules: dict[str, nn.Linear] = {}

    def module(self, site: str) -> nn.Linear:
        """The ``nn.Linear`` behind a site name."""
        if site not in self._modules:
            layer, module = self._check(site)
            self._modules[site] = _get_attr_path(self.layers[layer], self.arch.module_path(module))
        return self._modules[site]

    def _check(self, site: str) -> tuple[int, str]:
        layer, module = parse_site(site)
        self._check_module(module)
        self._check_layer(layer, site)
        return layer, module

    def _check_module(self, module: str) -> None:
        if module not in MODULES:
            raise UnknownNameError(
                f"unknown module '{module}'.{suggest(module, MODULES)} Modules: {', '.join(MODULES)}."
            )

    def _check_layer(self, layer: int, where: str) -> None:
        if not 0 <= layer < self.n_layers:
            raise ConfigError(
                f"layer {layer} in '{where}' is out of range: this model has layers 0-{self.n_layers - 1}"
            )

    def resolve(self, spec: str | Iterable[str]) -> list[str]:
        """Expand a site specification (see module docstring) into site names, in model order."""
        items = [spec] if isinstance(spec, str) else list(spec)
        chosen: set[str] = set()
        for item in items:
            chosen.update(self._resolve_one(str(item).strip()))
        return [s for s in self.names if s in chosen]

    def _resolve_one(self, item: str) -> list[str]:
        if item in GROUPS:
            return [site_name(i, m) for i in range(self.n_layers) for m in GROUPS[item]]
        if item in MODULES:
            return [site_name(i, item) for i in range(self.n_layers)]
        m = _SITE_RE.match(item)
        if not m:
            if item.startswith("layers"):
                raise ConfigError(
                    f"cannot parse site '{item}'; use layers.<i>.<module>, layers.<i>, or layers.<a>-<b>.<module>"
                )
            raise unknown("site or module", item, list(GROUPS) + list(MODULES))
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        modules = (m.group(3),) if m.group(3) else MODULES
        for module in modules:
            self._check_module(module)
        self._check_layer(first, item)
        self._check_layer(last, item)
        if last < first:
            raise ConfigError(f"layer range in '{item}' is empty ({first} > {last}); write it as low-high")
        return [site_name(i, mod) for i in range(first, last + 1) for mod in modules]

    def shape(self, site: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of a site."""
        lin = self.module(site)
        return lin.in_features, lin.out_features
