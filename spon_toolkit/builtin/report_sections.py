"""Built-in report sections. Each ``build(results)`` returns notebook cells that draw from saved results.

Sections are ordered by ``order``: the summary comes first (5), results sections follow (20-80), and
sections with ``order >= 1000`` form the appendix (protocol and environment 1000, LaTeX 1010). A
third-party plugin can add its own between them (e.g. ``order=45``, or ``order=1020`` for an appendix)
or block this module (``SPON_BLOCK_PLUGINS=spon.report_sections``) and provide a different report.
"""

from spon_toolkit.hookspecs import hookimpl


def _cells(title: str, text: str, *sources: str):
    """A Markdown heading and text, then one code cell per source (a figure and the table under it go in
    separate cells: an inline figure is drawn at the end of its cell, after anything the cell displays)."""
    from spon_toolkit.report import code, md

    return [md(f"## {title}\n\n{text}"), *(code(source) for source in sources)]


def summary(results):
    return _cells(
        "Summary",
        "What this run shows, generated from its results: per sparsity and set of sparsified sites, the dense "
        "and TEAL perplexity (sparsified, no biases) and the config with biases that reaches the lowest "
        "perplexity, with the share of the damage it recovers and a paired test against TEAL on the same "
        "sites. The protocol line under the table says how each number was measured.",
        "display(Markdown(views.summary_markdown(R)))\ndisplay(views.headline_table(R))",
    )


def protocol(results):
    return _cells(
        "Appendix A: protocol and environment",
        "Model, data protocol (block size, number of blocks, text source and its hash), sparsifier, sites, "
        "trainer settings, seeds and software versions of this run.",
        "display(views.protocol(R))",
    )


def ppl_table(results):
    return _cells(
        "Perplexity",
        "Dense, TEAL (sparsified, no biases, same sparsified sites) and SPON perplexity per config; mean ± std "
        "over seeds with a 95% Student-t interval of the SPON PPL ('-' with one seed). *Damage recovered* = "
        "(PPL_TEAL − PPL_SPON) / (PPL_TEAL − PPL_dense), mean ± std over seeds with a 95% percentile bootstrap "
        "interval over eval blocks (and seeds), shown as '-' where sparsification did not raise the "
        "perplexity (nothing to recover). *p vs TEAL*: paired t-test over eval blocks of the SPON against "
        "the TEAL NLL on the same sparsified sites. A config that sparsifies other sites (the seed's "
        "ATTN-ONLY sparsifies o_proj only) is compared with TEAL on its own sites, never with BASELINE-TEAL.",
        "display(views.ppl_table(R))",
    )


def ppl_bars(results):
    return _cells("Perplexity per config", "Bars: SPON PPL, mean over seeds (error bars: std); red ticks: "
                  "TEAL PPL with the same sparsified sites and no biases; dashed: dense model.", "views.ppl_bars(R);")


def damage(results):
    return _cells("Damage recovered", "Share of the perplexity lost to sparsification that the SPON biases "
                  "win back (100% = dense quality, 0% = no better than TEAL), each config against TEAL on its "
                  "own sparsified sites; error bars: 95% percentile bootstrap interval over eval blocks (and "
                  "seeds), as in the tables.", "views.damage_recovered(R);")


def pareto(results):
    return _cells("Pareto frontier", "SPON parameter count against perplexity, one panel per sparsity and "
                  "set of sparsified sites: configs that sparsify other sites have their own panel, with TEAL "
                  "on those sites as the zero-parameter point. The dashed line joins the configs that no "
                  "cheaper config of the same panel beats; the dotted line is the dense model.",
                  "views.pareto(R);", "display(views.pareto_table(R))")


def training(results):
    return _cells("Training curves", "Training loss (divergence from the dense model) per step, from the "
                  "run's logs.", "views.training_curves(R);")


def per_sparsity(results):
    return _cells(
        "Per-sparsity comparison",
        "Per eval block, each config's NLL difference to TEAL on the same sparsified sites (averaged over "
        "seeds; below 0 = the biases help), with PPL against sparsity when the run has two or more levels. "
        "The table compares the configs that sparsify the same sites as BASELINE-TEAL with it, paired by "
        "seed and by eval block (negative Δ = better than the baseline; p-value of a paired t-test over "
        "blocks; per-block differences are averaged over seeds first).",
        "views.per_sparsity(R);", "display(views.comparisons_table(R))",
    )


def latex(results):
    return _cells("Appendix B: LaTeX table", "`aggregated/latex_tables/ppl.tex`, ready for `\\input{}` (needs booktabs).",
                  "print(views.latex_table(R))")


@hookimpl
def spon_register_report_sections(register):
    register("summary", summary, "headline table and generated sentences: what the run shows", order=5)
    register("ppl-table", ppl_table, "dense / TEAL / SPON perplexity table", order=20)
    register("ppl-bars", ppl_bars, "bar chart of perplexity per config", order=30)
    register("damage-recovered", damage, "damage recovered per config and sparsity", order=40)
    register("pareto", pareto, "SPON parameters vs perplexity frontier", order=50)
    register("training-curves", training, "training loss curves", order=60)
    register("per-sparsity", per_sparsity, "PPL vs sparsity and paired comparisons to BASELINE-TEAL", order=70)
    register("protocol", protocol, "appendix: protocol, data and environment of the run", order=1000)
    register("latex-table", latex, "appendix: the LaTeX table of aggregated results", order=1010)
