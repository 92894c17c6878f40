"""An installable spon-toolkit plugin: allocations that follow the residual-stream writers.

``pip install plugins/example_package`` and ``spon plugins`` lists it as an entry-point plugin.

- ``MIDDLE-50``: biases on the sparsified sites of the middle half of the layers (round half up, see
  ``spon_toolkit.allocation.layer_count``), a counterpart to TOP-50 and BOTTOM-50.
- ``OUTPUT-WRITERS``: biases on ``o_proj`` and ``down_proj`` (the modules that write into the residual
  stream) of the layers whose ``scores`` (an importance method in the context) are above the median; of
  every layer when the context has no such scores.
"""

from spon_toolkit import hookimpl
from spon_toolkit.allocation import layer_count, median_split


def middle(context, fraction=0.5):
    k = layer_count(fraction, context.n_layers)
    start = (context.n_layers - k) // 2
    return context.sites(layers=range(start, start + k))


def output_writers(context, scores="sensitivity"):
    layers = range(context.n_layers)
    if context.importance.get(scores):
        layers = median_split(context.layer_scores(scores))
    return context.sites(layers=layers, modules=["o_proj", "down_proj"], sparse_only=False)


@hookimpl
def spon_register_allocations(register):
    register("MIDDLE-50", middle, "biases on the middle half of the layers")
    register("OUTPUT-WRITERS", output_writers, "o_proj + down_proj biases on the important layers")
