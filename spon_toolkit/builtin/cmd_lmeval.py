"""``spon lm-eval``: lm-evaluation-harness tasks on the dense, sparse (TEAL) and sparse+SPON model.

Examples::

    spon lm-eval --tasks sotu_ppl,sotu_continuation --sparsity 0.5 --limit 100 -o lmeval.json
    spon lm-eval --checkpoint runs/s05.safetensors --tasks sotu_continuation -o lmeval.json
    spon lm-eval --exported exported/ --tasks hellaswag,arc_easy --limit 500     # needs the hub for data

The model is wrapped in lm-eval's own ``HFLM`` with the toolkit's hooks attached, so lm-eval runs every
task unchanged; ``sotu_ppl`` and ``sotu_continuation`` are shipped with the toolkit and need no hub.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from spon_toolkit.hookspecs import hookimpl

EPILOG = """\
columns: dense (no hooks), sparse (the sparsifier, no biases), sparse+SPON (sparsifier + biases; needs
--checkpoint or --exported). The same documents are scored in every column, so paired differences with
their standard errors follow the table.

offline tasks (no hub): sotu_ppl (word/byte perplexity, bits per byte over sotu eval passages),
sotu_continuation (4-way choice of a passage's true next sentence). Any other lm-eval task name works where
its dataset can be downloaded or is cached (hellaswag, arc_easy, piqa, ...).

examples:
  spon lm-eval --checkpoint runs/s05.safetensors --tasks sotu_ppl,sotu_continuation --limit 100 -o lm.json
  spon lm-eval --sparsifier threshold --sparsity 0.5 --tasks sotu_continuation
  spon lm-eval --exported exported/ --tasks hellaswag,arc_easy --limit 500
"""


def configure(parser) -> None:
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--model", default=None, help="loader name, loader:spec, directory or hub id (default: the "
                        "checkpoint's / export's model, else smollm2-135m)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="SPON checkpoint (.safetensors): its sparsifier, sites and "
                     "biases give the sparse and sparse+SPON columns")
    src.add_argument("--exported", default=None, metavar="DIR", help="directory written by `spon export`: the "
                     "sparse+SPON column; dense/sparse come from the base model (--model, default: the recorded one)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. "
                        "sotu_ppl,sotu_continuation (offline) or hellaswag,arc_easy (hub)")
    parser.add_argument("--limit", type=float, default=None, help="documents per task: a count >= 1 or a fraction "
                        "in (0, 1) (default: all)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--sparsifier", default=None, help="registered sparsifier (default: magnitude; with a "
                        "checkpoint or export: the recorded one, which it must equal if given)")
    parser.add_argument("--sparsity", type=float, default=None, help="target sparsity in [0, 1] (default: 0.5; "
                        "with a checkpoint: the checkpoint's, which it must equal if given)")
    parser.add_argument("--sites", default=None, help="sparsified sites (default: down_proj; with a checkpoint or "
                        "export: the recorded ones; giving --sites then is an error)")
    parser.add_argument("--calib-data", default="sotu:calibration", help="text the threshold sparsifier is "
                        "calibrated on (default: sotu:calibration)")
    parser.add_argument("--calib-blocks", type=int, default=32, help="calibration blocks of 128 tokens (default: 32)")
    parser.add_argument("--conditions", default="dense,sparse,sparse+SPON",
                        help="which columns to run (default: all that apply)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the checkpoint's, else the loader's)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default: 8)")
    parser.add_argument("--max-length", type=int, default=None, help="lm-eval context length (default: the model's)")
    parser.add_argument("--prefix-token-id", type=int, default=None, help="token put before each document "
                        "(default: the tokenizer's BOS, else EOS)")
    parser.add_argument("--agreement-blocks", type=int, default=0, help="also check lm-eval's loglikelihoods "
                        "against evaluate_perplexity on the first N sotu eval blocks of 128 tokens (default: 0 = off)")
    parser.add_argument("--no-fingerprint-check", action="store_true", help="allow a model whose weights differ "
                        "from the checkpoint's")
    parser.add_argument("--verbose", action="store_true", help="show lm-eval's own log messages")
    parser.add_argument("--output", "-o", default=None, help="write table, paired differences, protocol and "
                        "lm-eval's results as JSON")


def _conditions_arg(text: str) -> list[str]:
    from spon_toolkit.errors import ConfigError
    from spon_toolkit.lmeval import CONDITIONS

    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CONDITIONS]
    if bad or not names:
        raise ConfigError(f"--conditions '{text}': allowed {', '.join(CONDITIONS)} (comma-separated)")
    return names


def run(args, toolkit) -> int:

    from spon_toolkit import lmeval as L
    from spon_toolkit.errors import ConfigError
    from spon_toolkit.sparsifiers import check_sparsity

    # --- everything that needs no model, first ---------------------------------------------------
    tasks = L.parse_tasks(args.tasks)
    limit = L.check_limit(args.limit)
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    for flag, value in (("--batch-size", args.batch_size), ("--calib-blocks", args.calib_blocks)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.agreement_blocks < 0:
        raise ConfigError(f"--agreement-blocks must be >= 0, got {args.agreement_blocks}")
    wanted = _conditions_arg(args.conditions)
    output = Path(args.output) if args.output else None
    if output is not None and output.is_dir():
        raise ConfigError(f"--output '{output}' is a directory; give a file name such as {output / 'lmeval.json'}")
    sparsity = None if args.sparsity is None else check_sparsity(args.sparsity, "--sparsity")
    L.require_lm_eval()
    tm = L.task_manager(tasks)
    data_protocol = L.preflight(tm, tasks, args.num_fewshot)

    ckpt = export_doc = None
    if args.checkpoint:
        from spon_toolkit.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint)
        if sparsity is not None and ckpt.sparsity is not None and sparsity != ckpt.sparsity:
            raise ConfigError(f"--sparsity {sparsity:g} differs from the checkpoint's {ckpt.sparsity}; biases do not "
                              f"transfer between sparsities: drop --sparsity or train for {sparsity:g}")
        if ckpt.metadata.get("sparsifier") is None:
            raise ConfigError(f"checkpoint '{ckpt.path}' records no sparsifier; it cannot give a sparse column")
        recorded_sp = ckpt.metadata["sparsifier"]["name"]
    elif args.exported:
        export_doc = _read_export(Path(args.exported))
        recorded_sp = (export_doc.get("sparsifier") or {}).get("name")
        if sparsity is not None:
            raise ConfigError("--sparsity cannot be combined with --exported: the export records its sparsity")
    else:
        args.sparsifier = args.sparsifier or "magnitude"
        toolkit.sparsifiers.get(args.sparsifier)  # unknown name: one line, before the model loads
        if sparsity is None:
            sparsity = 0.5
    if ckpt is not None or export_doc is not None:
        where = "checkpoint" if ckpt is not None else "export"
        if args.sparsifier is not None and args.sparsifier != recorded_sp:
            raise ConfigError(f"--sparsifier {args.sparsifier} differs from the {where}'s {recorded_sp}; drop it")
        if args.sites is not None:
            raise ConfigError(f"--sites cannot be combined with --{where if where == 'checkpoint' else 'exported'}: "
                              f"the {where} records its sparsified sites")

    # --- model and its states --------------------------------------------------------------------
    from spon_toolkit.models import load_model
    from spon_toolkit.sites import SiteMap

    recorded = (ckpt.metadata if ckpt else (export_doc or {}).get("metadata", {})).get("model", {})
    name = args.model or recorded.get("name") or "smollm2-135m"
    dtype = args.dtype or recorded.get("dtype")
    model, tokenizer = load_model(name, dtype=dtype, device=args.device, toolkit=toolkit)
    sitemap = SiteMap(model, toolkit.architectures)
    biases = spon_model = None
    source: dict[str, Any]
    if ckpt is not None:
        ckpt.validate(model, check_fingerprint=not args.no_fingerprint_check)
        sparsifier = ckpt.sparsifier(toolkit)
        sparse_sites = ckpt.sparse_sites
        biases = ckpt.biases(model)
        source = {"checkpoint": str(ckpt.path), "biased_sites": len(ckpt.sites)}
    elif export_doc is not None:
        spon_model, sparsifier, sparse_sites = _load_export(Path(args.exported), model, export_doc, args, toolkit)
        source = {"exported": str(args.exported), "biased_sites": len(export_doc.get("biased_sites") or [])}
    else:
        args.sites = args.sites or "down_proj"
        sparse_sites = sitemap.resolve([s.strip() for s in args.sites.split(",") if s.strip()])
        if not sparse_sites:
            raise ConfigError(f"--sites '{args.sites}' selects no site")
        sparsifier = toolkit.sparsifiers.get(args.sparsifier)(sparsity)
        if getattr(sparsifier, "needs_calibration", False):
            from spon_toolkit.data import load_blocks
            from spon_toolkit.models import context_length

            calib = load_blocks(tokenizer, args.calib_data, "calibration", 128, max_length=context_length(model))
            sparsifier.calibrate(model, sparse_sites, calib.sample(args.calib_blocks, 0).batches(8), sitemap=sitemap)
        source = {"biases": None}
    states = L.conditions(model, sparsifier=sparsifier, sparse_sites=sparse_sites, biases=biases, sitemap=sitemap,
                          spon_model=spon_model)
    missing = [c for c in wanted if c not in states]
    if missing and args.conditions != "dense,sparse,sparse+SPON":
        raise ConfigError(f"--conditions asks for {missing[0]}, which needs --checkpoint or --exported")
    states = {c: states[c] for c in wanted if c in states}

    lms: dict[int, Any] = {}
    outputs: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    agreement: dict[str, Any] = {}
    for cond, state in states.items():
        with state() as m:
            lm = lms.get(id(m))
            if lm is None:
                lm = lms[id(m)] = L.make_lm(m, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                                             prefix_token_id=args.prefix_token_id)
            print(f"[{cond}] lm-eval {', '.join(tasks)}" + (f" (limit {limit})" if limit else ""), flush=True)
            t0 = time.perf_counter()
            outputs[cond] = L.run_condition(lm, tasks, tm, limit=limit, num_fewshot=args.num_fewshot,
                                            verbose=args.verbose)
            seconds[cond] = round(time.perf_counter() - t0, 1)
            if args.agreement_blocks:
                agreement[cond] = _agreement(lm, m, tokenizer, args.agreement_blocks, args.batch_size)

    comparison = L.compare(outputs)
    protocol = _protocol(model, name, tasks, limit, args, sparsifier, sparse_sites, source, data_protocol, outputs,
                         seconds)
    _print(protocol, comparison, agreement)
    if output is not None:
        from spon_toolkit.fileio import atomic_write_json

        payload = {"protocol": protocol, **comparison, "agreement": agreement,
                   "lm_eval": {c: L.summarize_output(o) for c, o in outputs.items()}}
        atomic_write_json(output, payload)
        print(f"wrote {output}")
    return 0


def _read_export(path: Path) -> dict[str, Any]:
    import json

    from spon_toolkit.errors import ConfigError
    from spon_toolkit.export import SPARSIFIER_FILE

    spec = path / SPARSIFIER_FILE
    if not spec.is_file():
        raise ConfigError(f"'{path}' is not a spon export (no {SPARSIFIER_FILE}); write one with `spon export`")
    try:
        return json.loads(spec.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"'{spec}' is unreadable ({exc})") from None


def _load_export(path: Path, base, doc: dict[str, Any], args, toolkit):
    """The exported sparse+SPON model, checked against the base model it was trained on."""
    from spon_toolkit.checkpoint import CheckpointError
    from spon_toolkit.export import load_exported
    from spon_toolkit.models import dtype_name, model_fingerprint
    from spon_toolkit.sites import SiteMap

    dtype = next(base.parameters()).dtype
    sm, _ = load_exported(path, dtype=dtype, device=str(next(base.parameters()).device), toolkit=toolkit)
    recorded = doc.get("metadata", {}).get("model", {})
    mine, theirs = SiteMap(base, toolkit.architectures), SiteMap(sm.model, toolkit.architectures)
    if (mine.model_type, mine.n_layers) != (theirs.model_type, theirs.n_layers):
        raise CheckpointError(f"export '{path}' is a {theirs.model_type} model with {theirs.n_layers} layers, the base "
                              f"model is a {mine.model_type} model with {mine.n_layers}; pass the --model it was "
                              f"trained on")
    fp = recorded.get("fingerprint")
    if fp and not args.no_fingerprint_check and model_fingerprint(base) != fp:
        raise CheckpointError(
            f"export '{path}' was trained on '{recorded.get('name')}' ({recorded.get('dtype')}, fingerprint {fp}); "
            f"the base model ({dtype_name(dtype)}) has other weights: load that model in that dtype, or pass "
            f"--no-fingerprint-check")
    return sm.model, sm.sparsifier, sm.sparse_sites


def _agreement(lm, model, tokenizer, n_blocks: int, batch_size: int) -> dict[str, Any]:
    """lm-eval vs evaluate_perplexity on the same 128-token windows of the sotu eval split."""
    from spon_toolkit import lmeval as L
    from spon_toolkit.data import load_blocks
    from spon_toolkit.evaluate import block_nlls

    blocks = load_blocks(tokenizer, "sotu", "eval", 128).head(n_blocks)
    sums, _ = block_nlls(model, blocks.batches(batch_size), progress=False)
    out = L.loglikelihood_agreement(lm, blocks.ids, sums)
    out.pop("per_block_lm_eval")
    out["text"] = f"sotu:eval sha256 {blocks.text_sha256[:16]}, {blocks.selection}"
    return out


def _protocol(model, name, tasks, limit, args, sparsifier, sparse_sites, source, data_protocol, outputs, seconds):
    from spon_toolkit import lmeval as L
    from spon_toolkit.models import dtype_name, model_fingerprint, model_name

    first = next(iter(outputs.values()))
    return {
        "model": model_name(model) or name, "model_fingerprint": model_fingerprint(model),
        "dtype": dtype_name(next(model.parameters()).dtype), "device": str(next(model.parameters()).device),
        "sparsifier": None if sparsifier is None else sparsifier.describe(),
        "sparse_sites": f"{len(sparse_sites)} sites" if sparse_sites else None, **source,
        "tasks": list(tasks), "limit": limit, "num_fewshot": args.num_fewshot, "n_shot": first.get("n-shot"),
        "n_samples": first.get("n-samples"), "batch_size": args.batch_size, "lm_eval_version": L.lm_eval_version(),
        "task_versions": first.get("versions"), "data": data_protocol, "seconds": seconds,
    }


def _print(p: dict[str, Any], comparison: dict[str, Any], agreement: dict[str, Any]) -> None:
    from spon_toolkit import lmeval as L

    print(f"model {p['model']} ({p['model_fingerprint']}), {p['dtype']} on {p['device']}; lm-eval {p['lm_eval_version']}")
    print(f"sparsifier {p['sparsifier']} on {p['sparse_sites']}; "
          + (f"checkpoint {p['checkpoint']}" if "checkpoint" in p else f"export {p['exported']}" if "exported" in p
             else "no SPON biases (give --checkpoint or --exported for the sparse+SPON column)"))
    n = ", ".join(f"{t} {v.get('effective')}/{v.get('original')} docs" for t, v in (p["n_samples"] or {}).items())
    print(f"tasks: {n}; few-shot {p['n_shot']}; seconds per condition {p['seconds']}")
    print(L.format_table(comparison["table"], comparison["paired"]))
    for cond, a in agreement.items():
        print(f"agreement [{cond}]: lm-eval vs evaluate_perplexity on {a['blocks']} blocks of {a['block_size']} tokens "
              f"({a['text']}): summed NLL {a['lm_eval_nll']:.4f} vs {a['toolkit_nll']:.4f}, max |diff| per block "
              f"{a['max_abs_diff']:.2e} nats (relative {a['max_rel_diff']:.1e})")


@hookimpl
def spon_register_commands(register):
    register("lm-eval", run, "lm-evaluation-harness tasks on the dense, sparse and sparse+SPON model (one table)",
             configure=configure)
