"""``spon run PATH... [-k EXPR] [--output-dir DIR]`` and ``spon report RESULTS_DIR``.

``spon run`` runs the same items as ``pytest experiments/`` (both call
:class:`spon_toolkit.runner.ExperimentRunner`), with a progress bar over items instead of pytest's
output, a summary table at the end and, when the spec says ``report: true``, an executed notebook report.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from spon_toolkit.hookspecs import hookimpl

DEFAULT_OUTPUT = "results"
DEFAULT_REPORTS = "reports"


def collect_paths(paths: list[str]) -> list[Path]:
    """Experiment files named on the command line; a directory contributes its ``exp_*.yaml`` files."""
    from spon_toolkit.errors import ConfigError

    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted([*p.rglob("exp_*.yaml"), *p.rglob("exp_*.yml")])
            if not found:
                raise ConfigError(f"{p}: no exp_*.yaml experiment files in this directory")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"{p}: no such experiment file or directory")
    return list(dict.fromkeys(files))


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def summary_table(rows: list[dict]) -> str:
    """A plain-text table of finished items (one line each)."""
    headers = ["item", "dense", "TEAL", "SPON", "recovered", "params", "time", "status"]
    lines = [[r["item"], _fmt(r.get("dense_ppl")), _fmt(r.get("sparse_ppl")), _fmt(r.get("ppl")),
              _fmt(r.get("damage_recovered"), pct=True), str(r.get("spon_params", "-")), r.get("time", "-"),
              r["status"]] for r in rows]
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) for x in lines]
    return "\n".join(out)


def configure_run(parser):
    parser.add_argument("paths", nargs="+", metavar="PATH", help="experiment YAML files or directories of exp_*.yaml")
    parser.add_argument("-k", dest="keyword", metavar="EXPR", default=None,
                        help="only items whose id matches EXPR (pytest -k syntax: and/or/not, substrings)")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT, metavar="DIR",
                        help=f"results directory (default: {DEFAULT_OUTPUT}/)")
    parser.add_argument("--reports-dir", default=DEFAULT_REPORTS, metavar="DIR",
                        help=f"where executed notebook reports go (default: {DEFAULT_REPORTS}/)")
    parser.add_argument("--no-report", action="store_true", help="skip the notebook report")
    parser.add_argument("--fresh", action="store_true",
                        help="start a new run instead of resuming the latest run of the same spec")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: items one after another in this process (default); ray: items on a Ray "
                             "cluster, one actor per device (needs the extra 'ray')")
    parser.add_argument("--address", default=None, metavar="ADDR",
                        help="with --executor ray: the cluster to join ('auto', 'ray://host:10001'); default: "
                             "start a local one")
    parser.add_argument("--gpus-per-item", type=float, default=1.0, metavar="N",
                        help="with --executor ray: GPUs per actor when the cluster has GPUs (default 1)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="with --executor ray: number of actors (default: one per GPU, or per CPU without GPUs)")


def run(args, toolkit) -> int:
    from tqdm.auto import tqdm

    from spon_toolkit.errors import ConfigError
    from spon_toolkit.experiment import load_experiment
    from spon_toolkit.results import check_output_dir
    from spon_toolkit.runner import run_experiment, select_items

    executor = getattr(args, "executor", "local")
    if executor == "ray":
        from spon_toolkit.ray_executor import import_ray

        import_ray()  # a missing extra is one line before any work
        if args.workers is not None and args.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {args.workers}")
        if args.gpus_per_item < 0:
            raise ConfigError(f"--gpus-per-item must be >= 0, got {args.gpus_per_item}")
    experiments = [load_experiment(p, toolkit) for p in collect_paths(args.paths)]  # validate all first
    names: dict[str, Path] = {}
    for e in experiments:
        if e.name in names:
            raise ConfigError(f"{e.path} and {names[e.name]} both name the experiment '{e.name}', so their results "
                              f"would overwrite each other; give one of them another 'name:'")
        names[e.name] = e.path
    check_output_dir(args.output_dir, create=False)
    if not args.no_report and any(e.spec.report for e in experiments):
        check_output_dir(args.reports_dir, key="--reports-dir", create=False)  # fail now, not after hours
    selected = {e.path: select_items(e, args.keyword) for e in experiments}
    total = sum(len(v) for v in selected.values())
    if total == 0:
        print(f"no items selected (-k {args.keyword!r})", file=sys.stderr)
        return 5
    rows: list[dict] = []
    failures: list[str] = []
    reports: list[str] = []
    bar = tqdm(total=total, desc="items", unit="item", disable=None, file=sys.stderr)

    def on_item(item, outcome, error):
        row = {"item": item.id, "status": "ok"}
        if outcome is not None:
            row.update({k: outcome.record.get(k) for k in
                        ("dense_ppl", "sparse_ppl", "ppl", "damage_recovered", "spon_params")})
            row["time"] = "resumed" if outcome.reused else f"{outcome.seconds:.0f}s"
        if error is not None:
            row["status"] = f"FAILED ({error.stage})"
            failures.append(str(error))
        rows.append(row)
        bar.update(1)
        bar.write(f"{row['status']:<8} {item.id}  SPON PPL {_fmt(row.get('ppl'))}  (TEAL {_fmt(row.get('sparse_ppl'))}, "
                  f"dense {_fmt(row.get('dense_ppl'))})  {row.get('time', '')}  [{len(rows)}/{total}]", file=sys.stderr)

    try:
        for exp in experiments:
            bar.set_description(exp.name)
            if executor == "ray":
                from spon_toolkit.ray_executor import run_experiment_ray

                sweep = run_experiment_ray(exp, toolkit=toolkit, output_dir=args.output_dir, keyword=args.keyword,
                                           resume=not args.fresh, address=args.address,
                                           gpus_per_item=args.gpus_per_item, workers=args.workers, on_item=on_item)
            else:
                sweep = run_experiment(exp, toolkit=toolkit, output_dir=args.output_dir, keyword=args.keyword,
                                       resume=not args.fresh, on_item=on_item)
            exp_dir = sweep.runner.manager.experiment_dir
            reports.append(f"results: {exp_dir}")
            if exp.spec.report and not args.no_report and sweep.outcomes:
                from spon_toolkit.report import write_report

                bar.write(f"building the report of '{exp.name}' ...", file=sys.stderr)
                paths = write_report(exp_dir, args.reports_dir, toolkit)
                reports.append(f"report: {paths['html']} (executed notebook: {paths['ipynb']})")
    finally:
        bar.close()
    print(summary_table(rows))
    for line in failures:
        print(f"FAILED {line}")
    print(f"{len(rows) - len(failures)} passed, {len(failures)} failed")
    for line in reports:
        print(line)
    return 1 if failures else 0


def configure_report(parser):
    parser.add_argument("results_dir", metavar="RESULTS_DIR",
                        help="an experiment's results directory (<output-dir>/<experiment>) or a directory of them")
    parser.add_argument("--reports-dir", default=DEFAULT_REPORTS, metavar="DIR",
                        help=f"where the notebook and HTML go (default: {DEFAULT_REPORTS}/)")
    parser.add_argument("--no-execute", action="store_true", help="write the notebook without executing it")


def report(args, toolkit) -> int:
    from spon_toolkit.report import write_report
    from spon_toolkit.results import find_experiment_dirs, load_results

    dirs = find_experiment_dirs(args.results_dir)
    for d in dirs:
        load_results(d)  # every directory complete before anything is written
    for d in dirs:
        paths = write_report(d, args.reports_dir, toolkit, execute=not args.no_execute)
        print(f"report: {paths['html']} (notebook: {paths['ipynb']})")
    return 0


@hookimpl
def spon_register_commands(register):
    register("run", run, "run experiment files (sparsity x allocation x seed), write results and a report",
             configure=configure_run)
    register("report", report, "rebuild the executed notebook report of a results directory",
             configure=configure_report)
