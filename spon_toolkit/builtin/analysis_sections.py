"""Report sections of the built-in analyzers: one per analyzer, shown only when its answers exist.

Each section's cells read ``analysis/<analyzer>.json`` through :mod:`spon_toolkit.report.analysis_views`; the same
cells serve the experiment report (``R`` a loaded results directory) and ``spon analyze`` (``R`` its output dir).
"""

from spon_toolkit.hookspecs import hookimpl

SECTIONS = {
    "pca_alignment": (
        "What the biases encode: PCA alignment",
        "Per biased site, |cos| between the bias and each of the top-k principal directions of the activations it "
        "is added to (the site output before the bias, every token of the text sample). **Null**: the max |cos| of "
        "an isotropic random direction with k orthonormal directions in the same dimension (exact distribution, "
        "sampled): its mean and 95th percentile. *Variance ratio*: activation variance along the bias relative to "
        "the average direction (1 for a random direction).",
        "display(aviews.pca_table(A))\naviews.pca_heatmap(A);"),
    "bias_statistics": (
        "Bias statistics",
        "Per site: L2 norm, moments, excess kurtosis (scipy's Fisher definition, never below -2) with the 95% band "
        "of Gaussian vectors of the same dimension, the share of positive values, and the cosine with the "
        "closed-form initialisation (how far training moved the bias).",
        "display(aviews.bias_summary(A))\naviews.bias_trend(A);"),
    "hidden_state_shift": (
        "Hidden-state shift and recovery",
        "Per layer, the token-averaged relative distance of the sparse and sparse+SPON residual stream from the "
        "dense one on eval blocks; recovery = 1 - shift(SPON) / shift(sparse) (0: the biases change nothing; "
        "negative: further from dense). At the output: KL(dense || model) and top-1 agreement with dense. "
        "Intervals: 95% Student-t over blocks.",
        "display(aviews.shift_table(A))\naviews.shift_plot(A);"),
    "category_probes": (
        "Prompt categories: CKA, perplexity, probes",
        "Per category (prompt sets shipped with the toolkit or given by the user): perplexity and KL to dense, "
        "linear CKA between dense and sparse / sparse+SPON token representations per layer (null: tokens of one "
        "side shuffled), a permutation test of whether the per-prompt KL recovery differs between categories, "
        "and cross-validated logistic-regression probes of the category (folds grouped by prompt; null: shuffled "
        "labels and the majority-class rate).",
        "display(aviews.category_table(A))\ndisplay(aviews.category_test(A))\ndisplay(aviews.probe_table(A))\n"
        "aviews.cka_plot(A);"),
    "cross_config": (
        "Bias similarity across configs",
        "Cosine and relative L2 difference of the biases on shared sites for every pair of items. A cross-config "
        "cosine means agreement only above the **noise floor**: the same config trained with another seed. "
        "*Updates* compare beta - beta0 (beta0 the closed-form initialisation, the same for every config at a "
        "site), which the shared initialisation cannot make similar.",
        "display(aviews.cross_table(A))"),
}


def _builder(name):
    title, text, source = SECTIONS[name]

    def build(results):
        from spon_toolkit.report import code, md
        from spon_toolkit.report.analysis_views import has

        if not has(results, name):
            return []
        return [md(f"## {title}\n\n{text}"),
                code("from spon_toolkit.report import analysis_views as aviews\nA = aviews.bundle(R)\n" + source)]

    build.__name__ = f"section_{name}"
    return build


@hookimpl
def spon_register_report_sections(register):
    for i, name in enumerate(SECTIONS):
        register(name, _builder(name), f"analyzer '{name}': tables and figures", order=90 + i)
