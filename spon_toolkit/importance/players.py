"""Players of the importance game (layers or sublayers), how one is ablated (sparsified or removed), and the
value of a coalition on calibration blocks (with prefix reuse across coalitions)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..activations import iter_input_ids
from ..errors import ConfigError
from ..sites import SiteMap, parse_site, site_name
from ..sparse import attach_sparsifier
from ..sparsifiers import Sparsifier
from .shapley import _exp

ABLATIONS = ("sparsify", "remove")


PLAYER_KINDS = ("layers", "sublayers")


VALUES = ("neg_nll", "neg_ppl")


@dataclass(frozen=True)
class Player:
    """A layer (``part="layer"``) or a sublayer (``"attn"``/``"mlp"``) and the sparsified sites it owns."""

    name: str
    layer: int
    part: str
    sites: tuple[str, ...] = ()


def make_players(sitemap: SiteMap, kind: str = "layers", ablation: str = "sparsify",
                 sparse_sites: Iterable[str] = ()) -> list[Player]:
    """The players of a game. Under ``"sparsify"`` a player without sparsified sites is left out."""
    if kind not in PLAYER_KINDS:
        raise ConfigError(f"players must be one of {PLAYER_KINDS}, got '{kind}'")
    if ablation not in ABLATIONS:
        raise ConfigError(f"ablation must be one of {ABLATIONS}, got '{ablation}'")
    sparse = sitemap.resolve(sparse_sites) if sparse_sites else []
    parts = ("layer",) if kind == "layers" else ("attn", "mlp")
    players = []
    for i in range(sitemap.n_layers):
        for part in parts:
            name = f"layers.{i}" if part == "layer" else f"layers.{i}.{part}"
            owned = tuple(s for s in sparse if parse_site(s)[0] == i and
                          (part == "layer" or _sublayer(parse_site(s)[1]) == part))
            if ablation == "sparsify" and not owned:
                continue
            players.append(Player(name, i, part, owned))
    if not players:
        raise ConfigError("no players: ablation 'sparsify' needs sparsified sites (e.g. sites='down_proj')")
    return players


def _sublayer(module: str) -> str:
    return "attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def _skip_layer_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def _zero_output_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(output)


@contextlib.contextmanager
def removed(model: nn.Module, players: Iterable[Player], *, sitemap: SiteMap | None = None) -> Iterator[None]:
    """Skip these players while the context is open (hooks removed on exit, even on error).

    A layer returns its input hidden states; a sublayer's output projection returns zeros, so the residual
    stream passes through it unchanged.
    """
    sitemap = sitemap or SiteMap(model)
    handles = []
    try:
        for p in players:
            if p.part == "layer":
                handles.append(sitemap.layers[p.layer].register_forward_hook(_skip_layer_hook, with_kwargs=True))
            else:
                proj = "o_proj" if p.part == "attn" else "down_proj"
                handles.append(sitemap.module(site_name(p.layer, proj)).register_forward_hook(_zero_output_hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def removed_layers(model: nn.Module, layers: Iterable[int], *, sitemap: SiteMap | None = None) -> Iterator[None]:
    """``with removed_layers(model, [3, 7]): ...`` runs the model with decoder layers 3 and 7 skipped."""
    with removed(model, [Player(f"layers.{i}", int(i), "layer") for i in layers], sitemap=sitemap):
        yield


@contextlib.contextmanager
def ablated(model: nn.Module, players: Sequence[Player], *, ablation: str, sparsifier: Sparsifier | None,
            sitemap: SiteMap) -> Iterator[None]:
    """Ablate ``players`` (sparsify their sites, or remove them) while the context is open."""
    if ablation == "remove":
        with removed(model, players, sitemap=sitemap):
            yield
        return
    sites = [s for p in players for s in p.sites]
    if not sites:
        yield
        return
    hooks = attach_sparsifier(model, sparsifier, sites, sitemap=sitemap)
    try:
        yield
    finally:
        hooks.remove()


def mean_nll(model: nn.Module, batches: Sequence[torch.Tensor]) -> tuple[float, int]:
    """Token-weighted mean next-token NLL over ``batches`` (each block scored on its own) and the token count."""
    from ..evaluate import block_nlls

    sums, counts = block_nlls(model, batches, progress=False)
    total = sum(counts)
    return sum(sums) / max(total, 1), total


class _PrefixReuse:
    """Reuse the decoder-layer outputs of the previous evaluation for the layers it shares.

    Layer ``k``'s output depends only on which players of layers ``<= k`` are ablated. When the next
    coalition ablates the same players up to layer ``j - 1`` (a permutation walk adds one layer at a time;
    a sensitivity sweep ablates one layer of an otherwise intact model), layers ``0..j-1`` are not run:
    their ``forward`` returns the stored output, and the model's own forward does the rest (embeddings,
    masks, final norm, head), so nothing architecture-specific is re-implemented. Exact: the same
    operations run on the same inputs. Memory: one hidden-state tensor per layer and batch.
    """

    def __init__(self, layers: nn.ModuleList, n_batches: int):
        self.layers = layers
        self.signature: list[frozenset[str]] | None = None
        self.outputs: list[dict[int, Any]] = [{} for _ in range(n_batches)]
        self.layers_run = 0
        self.layers_skipped = 0

    def first_changed(self, signature: list[frozenset[str]]) -> int:
        if self.signature is None:
            return 0
        for k, (old, new) in enumerate(zip(self.signature, signature, strict=True)):
            if old != new:
                return k
        return len(signature)

    @contextlib.contextmanager
    def run(self, batch: int, start: int) -> Iterator[None]:
        """Skip layers ``< start`` (stored outputs) and record the outputs of the others for ``batch``."""
        stored = self.outputs[batch]
        handles = []

        def record(k: int):
            def hook(module, args, output):
                stored[k] = output
            return hook

        try:
            for k, layer in enumerate(self.layers):
                if k < start:
                    layer.forward = (lambda out: (lambda *a, **kw: out))(stored[k])
                else:
                    handles.append(layer.register_forward_hook(record(k)))
            yield
        finally:
            for k, layer in enumerate(self.layers):
                if k < start:
                    del layer.forward
            for h in handles:
                h.remove()
        self.layers_run += len(self.layers) - start
        self.layers_skipped += start


class CoalitionValue:
    """``v(S)`` for a coalition of player indices (the intact players), memoised by coalition.

    ``evaluations`` counts the distinct coalitions evaluated: each costs one pass over the calibration
    blocks, the unit in which Shapley budgets are given. ``reuse_prefix`` (default) skips the layers an
    evaluation shares with the previous one (see :class:`_PrefixReuse`); it changes cost, not values.
    """

    def __init__(self, model: nn.Module, batches: Iterable, players: Sequence[Player], *, ablation: str,
                 sparsifier: Sparsifier | None, sitemap: SiteMap, value: str = "neg_nll",
                 reuse_prefix: bool = True):
        if value not in VALUES:
            raise ConfigError(f"value must be one of {VALUES}, got '{value}'")
        self.model, self.players, self.ablation = model, list(players), ablation
        self.sparsifier, self.sitemap, self.value = sparsifier, sitemap, value
        self.batches = [b.cpu() for b in iter_input_ids(batches)]
        if not self.batches:
            raise ConfigError("importance needs at least one calibration block")
        if ablation == "sparsify" and sparsifier is None:
            raise ConfigError("ablation 'sparsify' needs a sparsifier; pass one or use ablation='remove'")
        self.cache: dict[frozenset[int], float] = {}
        self.nlls: dict[frozenset[int], float] = {}
        self.tokens = 0
        self.prefix = _PrefixReuse(sitemap.layers, len(self.batches)) if reuse_prefix else None

    @property
    def n(self) -> int:
        return len(self.players)

    @property
    def evaluations(self) -> int:
        return len(self.cache)

    def _signature(self, off: Sequence[Player]) -> list[frozenset[str]]:
        return [frozenset(p.name for p in off if p.layer <= k) for k in range(self.sitemap.n_layers)]

    def _evaluate(self, off: list[Player]) -> float:
        if self.prefix is None:
            with ablated(self.model, off, ablation=self.ablation, sparsifier=self.sparsifier, sitemap=self.sitemap):
                nll, self.tokens = mean_nll(self.model, self.batches)
            return nll
        from ..evaluate import block_nlls

        signature = self._signature(off)
        start = self.prefix.first_changed(signature)
        active = [p for p in off if p.layer >= start]  # ablations inside skipped layers are baked in
        sums, counts = [], []
        with ablated(self.model, active, ablation=self.ablation, sparsifier=self.sparsifier, sitemap=self.sitemap):
            for b, ids in enumerate(self.batches):
                with self.prefix.run(b, start):
                    s, c = block_nlls(self.model, [ids], progress=False)
                sums += s
                counts += c
        self.prefix.signature = signature
        self.tokens = sum(counts)
        return sum(sums) / max(self.tokens, 1)

    def nll(self, coalition: Iterable[int]) -> float:
        key = frozenset(coalition)
        if key not in self.nlls:
            off = [p for i, p in enumerate(self.players) if i not in key]
            was_training = self.model.training
            self.model.eval()
            try:
                self.nlls[key] = self._evaluate(off)
            except BaseException:
                if self.prefix is not None:  # an interrupted pass leaves partial outputs: start afresh
                    self.prefix.signature = None
                raise
            finally:
                self.model.train(was_training)
            nll = self.nlls[key]
            self.cache[key] = -nll if self.value == "neg_nll" else -_exp(nll)
        return self.nlls[key]

    def __call__(self, coalition: Iterable[int]) -> float:
        key = frozenset(coalition)
        if key not in self.cache:
            self.nll(key)
        return self.cache[key]
