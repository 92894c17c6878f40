"""A one-file allocation plugin, loaded from the plugins directory (``./plugins`` or ``--plugins-dir``).

EVERY-OTHER puts a SPON bias on the sparsified sites of every ``step``-th layer, starting at ``offset``:
half of UNIF-ALL's parameters spread evenly over depth, a counterpart to TOP-50 and BOTTOM-50.
"""

from spon_toolkit import hookimpl


def every_other(context, step=2, offset=0):
    if not isinstance(step, int) or step < 1:
        from spon_toolkit.errors import ConfigError

        raise ConfigError(f"step must be a positive integer, got {step!r}")
    return context.sites(layers=range(offset, context.n_layers, step))


@hookimpl
def spon_register_allocations(register):
    register("EVERY-OTHER", every_other, "biases on every step-th layer (default 2), spread over depth")
