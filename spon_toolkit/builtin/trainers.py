"""Built-in SPON trainers: ``kl`` (the default, SPON's loss), loss ablations, and the seed repository's
``ce`` / ``kl+logit_l2`` variants.

Each factory takes the options of :class:`spon_toolkit.train.TrainOptions` as keyword arguments and
returns an object with ``train(sparse_model, batches, *, calibration_batches=None) -> TrainResult``.
"""

from spon_toolkit.hookspecs import hookimpl


@hookimpl
def spon_register_trainers(register):
    from spon_toolkit.train import (
        CETrainer,
        HiddenMSETrainer,
        JSTrainer,
        KLLogitL2Trainer,
        KLTrainer,
        ReverseKLTrainer,
        SoftCETrainer,
    )

    register("kl", KLTrainer, description="KL(p_dense || p_sparse) per token, averaged (SPON; the default)")
    register("reverse_kl", ReverseKLTrainer, description="KL(p_sparse || p_dense) per token (loss ablation)")
    register("js", JSTrainer, description="Jensen-Shannon divergence per token (loss ablation)")
    register("hidden_mse", HiddenMSETrainer,
             description="relative MSE of the sparsified sites' outputs vs dense (loss ablation)")
    register("kl+logit_l2", KLLogitL2Trainer,
             description="KL plus logit_l2_weight x mean squared logit difference (the seed's kl+logit_l2)")
    register("soft_ce", SoftCETrainer,
             description="cross-entropy to the dense distribution = KL + teacher entropy (the seed's 'ce')")
    register("ce", CETrainer, description="next-token cross-entropy on the data, no teacher (loss ablation)")
