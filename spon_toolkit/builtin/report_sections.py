"""Built-in report sections. Each ``build(results)`` returns notebook cells that draw from saved results.

Sections are ordered by ``order``; a third-party plugin can add its own between them (e.g. ``order=45``)
or block this module (``SPON_BLOCK_PLUGINS=spon.report_sections``) and provide a different report.
"""

from spon_toolkit.hookspecs import hookimpl


def _cells(title: str, text: str, source: str):
    from spon_toolkit.report import code, md

    return [md(f"## {title}\n\n{text}"), code(source)]


def protocol(results):
    return _cells(
        "Protocol and environment",
        "Model, data protocol (block size, number of blocks, text source and its hash), sparsifier, sites, "
        "trainer settings, seeds and software versions of this run.",
        "display(views.protocol(R))",
    )


def ppl_table(results):
    return _cells(
        "Perplexity",
        "Dense, TEAL (sparsified, no biases, same sparsified sites) and SPON perplexity per config; mean ± std "
        "over seeds with a 95% Student-t interval of the SPON PPL. *Damage recovered* = "
        "(PPL_TEAL − PPL_SPON) / (PPL_TEAL − PPL_dense), shown as '-' where sparsification did not raise "
        "the perplexity (nothing to recover). A config that sparsifies other sites (the seed's ATTN-ONLY "
        "sparsifies o_proj only) has its own TEAL column: compare it with that, not with BASELINE-TEAL.",
        "display(views.ppl_table(R))",
    )


def ppl_bars(results):
    return _cells("Perplexity per config", "Bars: SPON PPL, mean over seeds (error bars: std); red ticks: "
                  "TEAL PPL with the same sparsified sites and no biases; dashed: dense model.", "views.ppl_bars(R);")


def damage(results):
    return _cells("Damage recovered", "Share of the perplexity lost to sparsification that the SPON biases "
                  "win back (100% = dense quality, 0% = no better than TEAL).", "views.damage_recovered(R);")


def pareto(results):
    return _cells("Pareto frontier", "SPON parameter count against perplexity; the dashed line joins the "
                  "configs that no cheaper config beats. Configs that sparsify other sites are not directly "
                  "comparable (see the comparison table's last column).", "views.pareto(R);")


def training(results):
    return _cells("Training curves", "Training loss (divergence from the dense model) per step, from the "
                  "run's logs.", "views.training_curves(R);")


def per_sparsity(results):
    return _cells(
        "Per-sparsity comparison",
        "PPL against sparsity, and each config against BASELINE-TEAL paired by seed and by eval block "
        "(negative Δ = better than the baseline; p-value of a paired t-test over blocks; per-block "
        "differences are averaged over seeds first).",
        "views.per_sparsity(R);\ndisplay(views.comparisons_table(R))",
    )


def latex(results):
    return _cells("LaTeX table", "`aggregated/latex_tables/ppl.tex`, ready for `\\input{}` (needs booktabs).",
                  "print(views.latex_table(R))")


@hookimpl
def spon_register_report_sections(register):
    register("protocol", protocol, "protocol, data and environment of the run", order=10)
    register("ppl-table", ppl_table, "dense / TEAL / SPON perplexity table", order=20)
    register("ppl-bars", ppl_bars, "bar chart of perplexity per config", order=30)
    register("damage-recovered", damage, "damage recovered per config and sparsity", order=40)
    register("pareto", pareto, "SPON parameters vs perplexity frontier", order=50)
    register("training-curves", training, "training loss curves", order=60)
    register("per-sparsity", per_sparsity, "PPL vs sparsity and paired comparisons to BASELINE-TEAL", order=70)
    register("latex-table", latex, "the LaTeX table of aggregated results", order=80)
