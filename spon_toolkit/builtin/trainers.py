"""Built-in SPON trainers: ``kl`` (the default, SPON's loss) and three loss ablations.

Each factory takes the options of :class:`spon_toolkit.train.TrainOptions` as keyword arguments and
returns an object with ``train(sparse_model, batches, *, calibration_batches=None) -> TrainResult``.
"""

from spon_toolkit.hookspecs import hookimpl


@hookimpl
def spon_register_trainers(register):
    from spon_toolkit.train import HiddenMSETrainer, JSTrainer, KLTrainer, ReverseKLTrainer

    register("kl", KLTrainer, description="KL(p_dense || p_sparse) per token, averaged (SPON; the default)")
    register("reverse_kl", ReverseKLTrainer, description="KL(p_sparse || p_dense) per token (loss ablation)")
    register("js", JSTrainer, description="Jensen-Shannon divergence per token (loss ablation)")
    register("hidden_mse", HiddenMSETrainer,
             description="relative MSE of the sparsified sites' outputs vs dense (loss ablation)")
