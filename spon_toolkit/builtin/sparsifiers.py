"""Built-in sparsifiers: ``magnitude`` (per-token top-k) and ``threshold`` (calibrated, TEAL)."""

from spon_toolkit.hookspecs import hookimpl


@hookimpl
def spon_register_sparsifiers(register):
    from spon_toolkit.sparsifiers import MagnitudeSparsifier, ThresholdSparsifier

    register("magnitude", MagnitudeSparsifier, description="keep the k = d - round(s*d) largest |x| per token")
    register("threshold", ThresholdSparsifier, description="per-site |x| thresholds calibrated to sparsity s (TEAL)")
