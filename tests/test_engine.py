"""Sites, attach/detach, SPON biases and folding on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from spon_toolkit import (
    MagnitudeSparsifier,
    SiteMap,
    SparseModel,
    SponBiases,
    ThresholdSparsifier,
    register_sparsification_hooks,
    remove_hooks,
    sparsified,
)
from spon_toolkit.errors import ConfigError, SponError, UnknownNameError
from spon_toolkit.sparse import attach_sparsifier


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize(biases: SponBiases, scale: float = 0.5) -> None:
    with torch.no_grad():
        for p in biases.params.values():
            p.normal_(0, scale)


# --- sites -------------------------------------------------------------------------------------------

def test_sitemap_enumerates_seven_modules_per_layer(tiny_model):
    sm = SiteMap(tiny_model)
    assert sm.n_layers == 2 and len(sm.names) == 14
    assert sm.names[:7] == [f"layers.0.{m}" for m in
                            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    assert sm.shape("layers.1.down_proj") == (128, 64)
    assert sm.module("layers.1.down_proj") is tiny_model.model.layers[1].mlp.down_proj


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("down_proj", ["layers.0.down_proj", "layers.1.down_proj"]),
        ("layers.1.q_proj", ["layers.1.q_proj"]),
        (["layers.1.q_proj", "layers.0.o_proj", "layers.1.q_proj"], ["layers.0.o_proj", "layers.1.q_proj"]),
        ("layers.0-1.up_proj", ["layers.0.up_proj", "layers.1.up_proj"]),
    ],
)
def test_site_specs(tiny_model, spec, expected):
    assert SiteMap(tiny_model).resolve(spec) == expected


def test_site_groups(tiny_model):
    sm = SiteMap(tiny_model)
    assert len(sm.resolve("all")) == 14 and len(sm.resolve("attn")) == 8 and len(sm.resolve("mlp")) == 6
    assert sm.resolve("layers.1") == sm.names[7:]


@pytest.mark.parametrize(
    "spec,error,pattern",
    [
        ("down_prj", UnknownNameError, "Did you mean 'down_proj'"),
        ("layers.5.down_proj", ConfigError, "out of range: this model has layers 0-1"),
        ("layers.0.fc1", UnknownNameError, "unknown module 'fc1'"),
        ("layers.x.q_proj", ConfigError, "cannot parse site"),
    ],
)
def test_bad_site_specs_are_one_line_errors(tiny_model, spec, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        SiteMap(tiny_model).resolve(spec)
    assert "\n" not in str(info.value)


def test_unsupported_architecture_is_named(tiny_model):
    tiny_model.config.model_type = "gpt_neox_like"
    with pytest.raises(UnknownNameError, match="architecture 'gpt_neox_like' is not supported"):
        SiteMap(tiny_model)


# --- sparsification hooks --------------------------------------------------------------------------

def test_detach_restores_exact_dense_logits(tiny_model, tiny_ids):
    dense = logits(tiny_model, tiny_ids)
    with sparsified(tiny_model, MagnitudeSparsifier(0.5), "all"):
        sparse = logits(tiny_model, tiny_ids)
    assert not torch.allclose(sparse, dense)
    assert torch.equal(logits(tiny_model, tiny_ids), dense)
    hooks = attach_sparsifier(tiny_model, MagnitudeSparsifier(0.7), "mlp")
    hooks.remove()
    assert torch.equal(logits(tiny_model, tiny_ids), dense)


def test_layer_sees_sparse_input_and_runs_once(tiny_model, tiny_ids):
    """The hook replaces the input (pre-hook): the layer's forward runs once, on the sparse input."""
    lin = SiteMap(tiny_model).module("layers.0.down_proj")
    seen = []
    original_forward = lin.forward

    def counting_forward(x):
        seen.append(x.detach().clone())
        return original_forward(x)

    lin.forward = counting_forward
    with sparsified(tiny_model, MagnitudeSparsifier(0.75), "layers.0.down_proj"):
        logits(tiny_model, tiny_ids)
    assert len(seen) == 1
    zero_frac = float((seen[0] == 0).float().mean())
    assert zero_frac == pytest.approx(0.75)


def test_shared_input_cache_matches_per_site_sparsification(tiny_model, tiny_ids):
    """q/k/v (and gate/up) share their input; sparsifying it once must equal sparsifying it per site."""
    sp = MagnitudeSparsifier(0.5)
    with sparsified(tiny_model, sp, "all"):
        cached = logits(tiny_model, tiny_ids)
    sm = SiteMap(tiny_model)
    handles = []
    for site in sm.resolve("all"):
        def pre_hook(module, args):  # an independent, uncached reference
            return (sp.function("x")(args[0].clone()),)
        handles.append(sm.module(site).register_forward_pre_hook(pre_hook))
    reference = logits(tiny_model, tiny_ids)
    for h in handles:
        h.remove()
    assert torch.equal(cached, reference)


def test_per_site_sparsity_and_recording(tiny_model, tiny_ids):
    sp = MagnitudeSparsifier({"layers.0.down_proj": 0.25, "default": 0.75})
    with sparsified(tiny_model, sp, ["layers.0.down_proj", "layers.1.down_proj"], record=True) as sm:
        logits(tiny_model, tiny_ids)
        achieved = sm.achieved_sparsity_by_site()
    assert achieved == {"layers.0.down_proj": pytest.approx(0.25), "layers.1.down_proj": pytest.approx(0.75)}


def test_threshold_reports_achieved_sparsity_on_other_data(tiny_model, tiny_ids):
    sp = ThresholdSparsifier(0.5)
    sp.calibrate(tiny_model, "mlp", [tiny_ids])
    other = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(7))
    with sparsified(tiny_model, sp, "mlp", record=True) as sm:
        logits(tiny_model, other)
        achieved = sm.achieved_sparsity_by_site()
    assert set(achieved) == set(SiteMap(tiny_model).resolve("mlp"))
    assert all(0.3 < v < 0.7 for v in achieved.values())


def test_uncalibrated_threshold_fails_before_attaching(tiny_model, tiny_ids):
    dense = logits(tiny_model, tiny_ids)
    with pytest.raises(SponError, match="not calibrated"):
        attach_sparsifier(tiny_model, ThresholdSparsifier(0.5), "all")
    assert torch.equal(logits(tiny_model, tiny_ids), dense)


# --- SPON biases ------------------------------------------------------------------------------------

@pytest.mark.parametrize("parametrisation", ["output", "input"])
def test_fold_matches_hooked_biases_and_unfold_restores(tiny_model, tiny_ids, parametrisation):
    dense = logits(tiny_model, tiny_ids)
    biases = SponBiases(tiny_model, ["down_proj", "layers.1.o_proj"], parametrisation=parametrisation)
    randomize(biases)
    sm = SparseModel(tiny_model, MagnitudeSparsifier(0.5), "all", biases=biases)
    hooked = logits(tiny_model, tiny_ids)
    biases.fold()
    folded = logits(tiny_model, tiny_ids)
    torch.testing.assert_close(folded, hooked, rtol=1e-5, atol=1e-5)
    assert tiny_model.model.layers[0].mlp.down_proj.bias is not None
    biases.unfold()
    assert tiny_model.model.layers[0].mlp.down_proj.bias is None
    sm.detach()
    assert torch.equal(logits(tiny_model, tiny_ids), dense)


def test_fold_adds_to_an_existing_bias(tiny_model, tiny_ids):
    lin = SiteMap(tiny_model).module("layers.0.q_proj")
    lin.bias = torch.nn.Parameter(torch.full((lin.out_features,), 0.1))
    original = lin.bias.detach().clone()
    biases = SponBiases(tiny_model, "layers.0.q_proj")
    randomize(biases)
    biases.attach()
    hooked = logits(tiny_model, tiny_ids)
    biases.fold()
    torch.testing.assert_close(logits(tiny_model, tiny_ids), hooked, rtol=1e-5, atol=1e-5)
    biases.unfold()
    assert torch.equal(lin.bias.detach(), original)


def test_input_parametrisation_is_w_alpha(tiny_model):
    biases = SponBiases(tiny_model, "layers.0.down_proj", parametrisation="input")
    randomize(biases)
    w = SiteMap(tiny_model).module("layers.0.down_proj").weight
    alpha = biases.param("layers.0.down_proj")
    assert alpha.shape == (128,)
    torch.testing.assert_close(biases.beta("layers.0.down_proj"), w @ alpha)


def test_only_biases_receive_gradients(tiny_model, tiny_ids):
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    biases = SponBiases(tiny_model, "down_proj")
    with SparseModel(tiny_model, MagnitudeSparsifier(0.5), "down_proj", biases=biases):
        tiny_model(input_ids=tiny_ids).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in biases.params.values())


def test_dense_context_switches_biases_and_sparsity_off(tiny_model, tiny_ids):
    dense = logits(tiny_model, tiny_ids)
    biases = SponBiases(tiny_model, "down_proj")
    randomize(biases)
    with SparseModel(tiny_model, MagnitudeSparsifier(0.5), "all", biases=biases) as sm:
        with sm.dense():
            assert torch.equal(logits(tiny_model, tiny_ids), dense)
        assert not torch.allclose(logits(tiny_model, tiny_ids), dense)


def test_closed_form_init_is_mean_removed_contribution(tiny_model, tiny_ids):
    sp = MagnitudeSparsifier(0.5)
    site = "layers.1.down_proj"
    lin = SiteMap(tiny_model).module(site)
    captured = []
    h = lin.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    logits(tiny_model, tiny_ids)
    h.remove()
    x = captured[0]
    expected = ((x - sp.function(site)(x)) @ lin.weight.T).mean(0)
    for parametrisation in ("output", "input"):
        biases = SponBiases(tiny_model, site, parametrisation=parametrisation)
        biases.init_closed_form(tiny_model, sp, [tiny_ids])
        torch.testing.assert_close(biases.beta(site), expected, rtol=1e-4, atol=1e-5)


def test_bias_tensors_roundtrip(tiny_model):
    a = SponBiases(tiny_model, "down_proj")
    randomize(a)
    b = SponBiases(tiny_model, "down_proj")
    b.load_tensors(a.tensors())
    assert all(torch.equal(a.param(s), b.param(s)) for s in a.sites)
    with pytest.raises(SponError, match="lack sites"):
        SponBiases(tiny_model, "all").load_tensors(a.tensors())


# --- the seed repository's function API -----------------------------------------------------------

def test_seed_hook_api_matches_engine(tiny_model, tiny_ids):
    dense = logits(tiny_model, tiny_ids)
    biases = SponBiases(tiny_model, "down_proj")
    randomize(biases)
    with SparseModel(tiny_model, MagnitudeSparsifier(0.5), "down_proj", biases=biases):
        engine = logits(tiny_model, tiny_ids)
    handles = register_sparsification_hooks(
        tiny_model, 0.5, target_modules=["down_proj"], spon_biases=biases.seed_dict()
    )
    seed = logits(tiny_model, tiny_ids)
    remove_hooks(handles)
    torch.testing.assert_close(seed, engine)
    assert torch.equal(logits(tiny_model, tiny_ids), dense)


def test_seed_hook_api_rejects_bad_sparsity(tiny_model):
    with pytest.raises(ConfigError):
        register_sparsification_hooks(tiny_model, 1.5)


def test_sites_sharing_an_input_share_calibration_and_are_sparsified_once(tiny_model, tiny_ids, monkeypatch):
    """q/k/v get one sample (even when subsampled), hence one threshold and one sparsify call."""
    import spon_toolkit.sparsifiers as sparsifiers

    sp = ThresholdSparsifier(0.5, max_samples=100)
    sp.calibrate(tiny_model, "layers.0", [tiny_ids])
    t = sp.thresholds
    assert t["layers.0.q_proj"] == t["layers.0.k_proj"] == t["layers.0.v_proj"] != t["layers.0.o_proj"]
    assert t["layers.0.gate_proj"] == t["layers.0.up_proj"]
    calls = []
    real = sparsifiers.threshold_sparsify

    def counting(x, threshold):
        calls.append(threshold)
        return real(x, threshold)

    monkeypatch.setattr(sparsifiers, "threshold_sparsify", counting)
    with sparsified(tiny_model, sp, "layers.0"):
        logits(tiny_model, tiny_ids)
    assert len(calls) == 4  # one per distinct input: q/k/v, o, gate/up, down
