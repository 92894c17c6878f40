"""Sparse autoencoders (sae-lens) for the spaces SPON biases live in: training, caching, loading, quality.

*Space of a bias.* An output-space bias on ``layers.i.down_proj`` is added to the residual stream after
decoder layer ``i`` (``resid_post``); one on ``layers.i.o_proj`` to the residual stream between attention and
MLP of layer ``i`` (``resid_mid``: the layer's input plus the attention output, exact for Llama-style
layers without a post-attention norm on the residual branch); one on any other module to that module's
output (``site_output``). An input-space bias (``beta = W alpha``) lives in the site's input (``site_input``).
:func:`bias_space` names the space; :func:`space_hooks` lets a function observe or replace it.

*Training* uses sae-lens' own classes: :class:`sae_lens.TopKTrainingSAE` (default) or
:class:`sae_lens.StandardTrainingSAE` with :class:`sae_lens.SAETrainer` fed by an in-memory data provider
(an iterator of activation batches; no TransformerLens model, no wandb, no hub). Activations are the dense
model's, collected with forward hooks on token blocks, without the first ``skip_first`` positions of each
block (the first position of a block carries an outsized residual norm; it would dominate the SAE).
Activation norms are scaled by sae-lens' ``expected_average_only_in`` normalisation (folded into the
weights after training); the decoder bias starts at the activation mean.

*Caching* (user cache dir, ``<cache>/sae/``): activations are keyed by the model fingerprint, the space and a
hash of the token ids; a trained SAE by that key plus the hyperparameters and the sae-lens major version.
An SAE directory is sae-lens' own format (``sae_weights.safetensors`` + ``cfg.json``) plus
``spon_sae.json`` (how it was trained), so :func:`load_sae` and ``sae_lens.SAE.load_from_disk`` both read it.

Layout: :mod:`.spaces` (bias spaces, hooks, cached activations), :mod:`.training` (sae-lens training,
cache, loading), :mod:`.measures` (quality, decomposition, restoration, contexts).
"""

from ..errors import SponError
from .measures import (
    decompose_bias,
    explained_fractions,
    feature_means,
    feature_restoration,
    sae_quality,
    top_contexts,
)
from .spaces import (
    ARCHITECTURES,
    EXTRA,
    KINDS,
    MISSING,
    BiasSpace,
    bias_space,
    cached_activations,
    check_bias_site,
    collect_activations,
    ids_hash,
    require_sae_lens,
    sae_cache_dir,
    sae_lens_available,
    space_hooks,
)
from .training import SaeSettings, decoder_directions, encode, load_sae, train_sae, trained_sae

__all__ = [
    "SponError",
    "ARCHITECTURES",
    "BiasSpace",
    "EXTRA",
    "KINDS",
    "MISSING",
    "bias_space",
    "cached_activations",
    "check_bias_site",
    "collect_activations",
    "ids_hash",
    "require_sae_lens",
    "sae_cache_dir",
    "sae_lens_available",
    "space_hooks",
    "SaeSettings",
    "decoder_directions",
    "encode",
    "load_sae",
    "train_sae",
    "trained_sae",
    "decompose_bias",
    "explained_fractions",
    "feature_means",
    "feature_restoration",
    "sae_quality",
    "top_contexts",
]
