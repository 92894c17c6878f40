"""SPON training: learn the attached biases so the sparse model's next-token distribution matches the dense one.

The trainer contract (hook ``spon_register_trainers``): ``factory(**options)`` returns an object with
``train(sparse_model, batches, *, calibration_batches=None) -> TrainResult``. The built-in trainers are
:class:`DistillationTrainer` subclasses that differ only in their objective:

- ``kl`` (default): ``KL(p_dense || p_sparse)`` per token, averaged (SPON's loss);
- ``reverse_kl``, ``js``: the same with ``KL(p_sparse || p_dense)`` / Jensen-Shannon;
- ``hidden_mse``: relative MSE between dense and sparse outputs of the sparsified sites;
- ``kl+logit_l2`` (KL plus a weighted L2 on the logit difference) and ``soft_ce`` (cross-entropy to the
  dense distribution): the seed repository's ``kl+logit_l2`` and ``ce``;
- ``ce``: next-token cross-entropy on the data (no teacher).

``gradient_accumulation_steps`` joins consecutive batches into one optimiser step whose gradient is the
joined batch's (token-weighted).

One training step: the teacher (``with sm.dense()``, no gradients) gives targets for the batch; those are
cached per batch when they fit in ``teacher_cache_mb`` (they usually do: for the logit losses the cache
holds the teacher's final hidden states, ``tokens x hidden``, and teacher logits are re-derived from them
chunk by chunk through the frozen head), so later epochs do not run the teacher again. The student (the
sparse model with biases) runs with gradients and the loss is computed in token chunks
(:mod:`spon_toolkit.losses`). Only the SPON parameters train: every model weight has
``requires_grad=False`` while training (restored afterwards). AdamW, linear warm-up then cosine (or linear /
constant) decay, gradient clipping, a length in epochs or in tokens, seeded. A non-finite loss or gradient
stops training with :class:`TrainingDivergedError` after restoring the last biases that gave a finite loss.

Precision: biases are float32 and added in float32 (see :class:`spon_toolkit.sparse.SponBiases`). On CUDA,
``autocast="auto"`` runs a float32 model under bf16 autocast; on CPU it does not autocast (casting every
weight on every forward costs more than it saves) -- load the model in bfloat16 instead for a ~2.5x faster
forward (measured in ``benchmarks/bench_train.py``).

Layout: :mod:`.options` (TrainOptions, schedule, TrainResult), :mod:`.surgery` (head split, sparsifier
view), :mod:`.trainers` (the loop and the built-in objectives), :mod:`.seed_api` (the seed repository's
``SPONConfig`` / ``TrainingArgs`` / ``SPONTrainer``, also importable from :mod:`spon_toolkit.compat`).
"""

from .options import (
                       DEFAULT_LR,
                       INITS,
                       METRIC_FIELDS,
                       SCHEDULES,
                       TrainingDivergedError,
                       TrainOptions,
                       TrainResult,
                       lr_factor,
)
from .seed_api import SPONConfig, SPONTrainer, TrainingArgs
from .surgery import HeadSplit, split_head
from .trainers import (
                       CETrainer,
                       DistillationTrainer,
                       HiddenMSETrainer,
                       JSTrainer,
                       KLLogitL2Options,
                       KLLogitL2Trainer,
                       KLTrainer,
                       LogitDistillationTrainer,
                       ReverseKLTrainer,
                       SoftCETrainer,
)

__all__ = [
    "DEFAULT_LR", "INITS", "METRIC_FIELDS", "SCHEDULES", "TrainOptions", "TrainResult", "TrainingDivergedError",
    "DistillationTrainer", "LogitDistillationTrainer", "KLTrainer", "ReverseKLTrainer", "JSTrainer",
    "HiddenMSETrainer", "KLLogitL2Trainer", "KLLogitL2Options", "SoftCETrainer", "CETrainer", "HeadSplit", "split_head", "lr_factor", "SPONConfig", "TrainingArgs", "SPONTrainer",
]
