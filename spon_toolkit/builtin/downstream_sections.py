"""Report section for downstream (lm-eval) results of experiments whose spec has ``downstream:``.

The section appears only when some item of the run carries a ``downstream`` table; its cells read the
saved results through :func:`spon_toolkit.report.downstream_views.downstream_frame` (no model, no lm-eval needed).
"""

from spon_toolkit.hookspecs import hookimpl


def downstream(results):
    from spon_toolkit.report import code, md

    if not any(r.get("downstream") for r in results.records):
        return []
    tasks = sorted({t for r in results.records for t in (r.get("downstream") or {}).get("tasks", [])})
    return [
        md("## Downstream tasks (lm-evaluation-harness)\n\n"
           f"Tasks {', '.join(f'`{t}`' for t in tasks)} run by lm-eval on the dense model, the TEAL model (same "
           "sparsified sites, no biases) and the SPON model of each config, with the toolkit's hooks attached to "
           "the model lm-eval evaluates. Standard errors: lm-eval's for accuracies (over documents); for "
           "perplexity metrics a delta-method standard error over documents computed from lm-eval's "
           "per-document loglikelihoods (column *stderr source*). The second table gives paired differences "
           "on the same documents with their standard errors."),
        code("from spon_toolkit.report.downstream_views import downstream_frame, downstream_paired_frame\n\n"
             "display(downstream_frame(results_dir))\n"
             "display(downstream_paired_frame(results_dir))"),
    ]


@hookimpl
def spon_register_report_sections(register):
    register("downstream", downstream, "lm-eval task results: dense / TEAL / SPON with stderr", order=75)
