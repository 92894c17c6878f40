"""The seed repository's gradient-based importance methods (``gradient_norm``, ``ila``) and an allocation
that applies its selection rules (``top_k``, ``threshold``, ``elbow``) to any importance method's scores.

See :mod:`spon_toolkit.importance.learned`.
"""

from spon_toolkit.hookspecs import hookimpl


def importance_select(context, scores="gradient_norm", rule="elbow", k=None, fraction=0.5, threshold=0.5,
                      layers=None, modules=None, sparsify="context"):
    """Biases on the layers that ``rule`` picks from the ``scores`` importance method's per-layer scores."""
    from spon_toolkit.builtin.allocations import _explicit_layers, _layer_mask
    from spon_toolkit.importance.learned import select_layers

    chosen = _explicit_layers(context, layers)
    if chosen is None:
        chosen = select_layers(context.layer_scores(scores), rule, k=k, fraction=fraction, threshold=threshold)
    return _layer_mask(context, chosen, modules, sparsify)


@hookimpl
def spon_register_importance_methods(register):
    from spon_toolkit.importance import learned

    register("gradient_norm", learned.gradient_norm,
             "norm of the next-token loss gradient at each layer's output (the seed's fast sensitivity)")
    register("ila", learned.ila,
             "learned scale of each layer's residual contribution (ILA; starts at 1 = unchanged model)")


@hookimpl
def spon_register_allocations(register):
    register("IMPORTANCE-SELECT", importance_select,
             "layers picked from an importance method's scores by top_k, threshold or elbow (default: "
             "gradient_norm, elbow)", requires="gradient_norm", kind="data-driven")
