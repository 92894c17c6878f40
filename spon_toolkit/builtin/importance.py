"""Built-in layer-importance methods: sensitivity, Shapley values and cornerstone layers.

See :mod:`spon_toolkit.importance` for the value function, the estimators and the cache.
"""

from spon_toolkit.hookspecs import hookimpl


@hookimpl
def spon_register_importance_methods(register):
    from spon_toolkit import importance

    register("sensitivity", importance.sensitivity,
             "relative PPL increase when only one layer (or sublayer) is sparsified / removed",
             feeds="CRITICAL-ONLY")
    register("shapley", importance.shapley,
             "Shapley values of layers for -NLL (permutation Monte Carlo, proximity or exact estimator)",
             feeds="SHAPLEY-GUIDED")
    register("cornerstone", importance.cornerstone,
             "layers whose removal alone raises PPL by more than a threshold (default 50%)",
             feeds="CORNERSTONE")
