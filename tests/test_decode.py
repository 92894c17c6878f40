"""The sparse decode kernel and decode mode: same numbers as the dense matmul on the sparsified input, same
generated tokens as the simulated (pre-hook) sparse model, and the dense layers restored exactly."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spon_toolkit import decode
from spon_toolkit.decode import SparseDecoder, ThresholdSparseLinear, decode_mode, sparse_linear
from spon_toolkit.errors import ConfigError, SponError
from spon_toolkit.export import export_model, load_exported
from spon_toolkit.plugins import Toolkit
from spon_toolkit.sites import SiteMap
from spon_toolkit.sparse import SparseModel, SponBiases
from spon_toolkit.sparsifiers import MagnitudeSparsifier, ThresholdSparsifier, threshold_sparsify
from spon_toolkit.testing.tiny import make_tiny_llama

pytest.importorskip("numba")

TOOLKIT = Toolkit()
NEW_TOKENS = 24


def _reference(x, t, weight, bias):
    """The simulated model's computation, and a bound on float32 rounding of either summation order."""
    xs = threshold_sparsify(x, t)
    ref = F.linear(xs, weight, bias)
    scale = F.linear(xs.abs(), weight.abs()) + (0 if bias is None else bias.abs())
    return ref, 1e-5 * scale + 1e-6


@settings(deadline=None)  # the first example compiles the kernel
@given(
    n_tok=st.integers(1, 5),
    d_in=st.integers(1, 200),
    d_out=st.integers(1, 150),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9, 1.0]),
    with_bias=st.booleans(),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_dense_matmul_on_sparsified_input(n_tok, d_in, d_out, sparsity, with_bias, threads, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tok, d_in, generator=g)
    weight = torch.randn(d_out, d_in, generator=g)
    bias = torch.randn(d_out, generator=g) if with_bias else None
    # sparsity 0 keeps every entry (threshold -inf), 1 drops every entry (+inf); otherwise a quantile
    t = -math.inf if sparsity == 0 else math.inf if sparsity == 1 else float(x.abs().quantile(sparsity))
    got = sparse_linear(x, t, weight.t(), bias, threads=threads)
    ref, tol = _reference(x, t, weight, bias)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert bool(((got - ref).abs() <= tol).all())
    if sparsity == 1:  # nothing kept: exactly the bias (or zeros)
        assert torch.equal(got, torch.zeros_like(got) if bias is None else bias.expand_as(got))


def _sequential(x, t, weight, bias):
    """Kept rows of W^T added in input order in float32 (numpy rounds every product and every sum)."""
    wt = weight.t().contiguous().numpy()
    out = np.zeros((x.shape[0], wt.shape[1]), np.float32)
    for r, row in enumerate(x.numpy()):
        for i in np.flatnonzero(~(np.abs(row) <= np.float32(t))):
            out[r] = out[r] + row[i] * wt[i]
    if bias is not None:
        out = out + bias.numpy()
    return torch.from_numpy(out)


@settings(deadline=None, max_examples=40)
@given(n_tok=st.integers(1, 3), d_in=st.integers(1, 40), d_out=st.integers(1, 70),
       sparsity=st.sampled_from([0.0, 0.5, 0.8]), with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_sums_in_input_order_bit_for_bit_whatever_the_threads(n_tok, d_in, d_out, sparsity, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(n_tok, d_in, generator=g), torch.randn(d_out, d_in, generator=g)
    bias = torch.randn(d_out, generator=g) if with_bias else None
    t = -math.inf if sparsity == 0 else float(x.abs().quantile(sparsity))
    ref = _sequential(x, t, weight, bias)
    assert torch.equal(sparse_linear(x, t, weight.t(), bias, threads=1), ref)
    assert torch.equal(sparse_linear(x, t, weight.t(), bias, threads=2), ref)


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_all_zero_and_all_nonzero_inputs(threads):
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(37, 53, generator=g), torch.randn(37, generator=g)
    zeros = torch.zeros(2, 53)
    assert torch.equal(sparse_linear(zeros, 0.0, weight.t(), bias, threads=threads), bias.expand(2, 37))
    dense = torch.randn(3, 53, generator=g).abs() + 0.5  # every entry above the threshold
    ref, tol = _reference(dense, 0.1, weight, bias)
    assert bool(((sparse_linear(dense, 0.1, weight.t(), bias, threads=threads) - ref).abs() <= tol).all())


def test_kernel_threshold_rule_matches_torch_exactly():
    # |x| == t is dropped; t is rounded to float32 as torch rounds a Python float against a float32 tensor
    one, next_up = np.float32(1.0), np.nextafter(np.float32(1.0), np.float32(2.0))
    t = 1.0 + (float(next_up) - 1.0) * 0.75  # rounds to next_up in float32
    x = torch.tensor([[1.0, float(next_up), -float(next_up) * 2, 0.5, float(one)]])
    weight = torch.eye(5)
    assert torch.equal(sparse_linear(x, t, weight.t(), threads=1), threshold_sparsify(x, t))
    assert torch.equal(sparse_linear(x, 1.0, weight.t(), threads=1), threshold_sparsify(x, 1.0))
    nan = torch.tensor([[float("nan"), 3.0]])  # NaN propagates as 0 * NaN does in the simulated model
    assert torch.isnan(sparse_linear(nan, 1.0, torch.eye(2), threads=1)).all()


def test_kernel_leading_dims_and_bad_operands():
    x = torch.randn(2, 1, 8)
    w = torch.randn(4, 8)
    assert sparse_linear(x, 0.5, w.t(), threads=1).shape == (2, 1, 4)
    assert sparse_linear(torch.zeros(0, 8), 0.5, w.t(), threads=1).shape == (0, 4)
    with pytest.raises(ConfigError, match="8 features"):
        sparse_linear(torch.randn(1, 8), 0.5, torch.randn(4, 8))
    with pytest.raises(ConfigError, match="float32 CPU"):
        sparse_linear(x.double(), 0.5, w.t().double())


def test_layer_uses_kernel_for_few_tokens_and_dense_fallback_for_many():
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(48, 24)
    beta = torch.randn(24, generator=g)
    t = 0.6
    layer = ThresholdSparseLinear(lin, t, decode._folded_bias(lin, beta), use_kernel=True, max_kernel_tokens=2)
    assert layer.uses_kernel and layer.weight is lin.weight and layer.weight_t.is_contiguous()
    decode._sync_threads()
    few, many = torch.randn(1, 2, 48, generator=g), torch.randn(1, 5, 48, generator=g)
    with torch.no_grad():
        ref, tol = _reference(few, t, lin.weight, layer.bias)
        assert bool(((layer(few) - ref).abs() <= tol).all())
        # more tokens than max_kernel_tokens: the simulated model's computation, bit for bit
        assert torch.equal(layer(many), F.linear(threshold_sparsify(many, t), lin.weight, layer.bias))
    # an input that needs a gradient takes the differentiable fallback
    xg = few.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert xg.grad is not None
    # non-float32 layers build no W^T copy when the decoder asks for none, and compute the fallback
    lin16 = torch.nn.Linear(48, 24).to(torch.bfloat16)
    layer16 = ThresholdSparseLinear(lin16, t, decode._folded_bias(lin16, None), use_kernel=False)
    x16 = few.to(torch.bfloat16)
    assert layer16.weight_t is None
    assert torch.equal(layer16(x16), F.linear(threshold_sparsify(x16, t), lin16.weight, lin16.bias))


# --- decode mode on the tiny model --------------------------------------------------------------------

def _varied_tiny():
    """A tiny random Llama with larger embeddings and head, so greedy decoding does not repeat one token."""
    model = make_tiny_llama(seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(40)
        model.lm_head.weight.mul_(20)
    return model


def _setup(sites="all", sparsity=0.5):
    model = _varied_tiny()
    sitemap = SiteMap(model, TOOLKIT.architectures)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 256, (4, 32), generator=g)]
    thr = ThresholdSparsifier(sparsity)
    thr.calibrate(model, sites, calib, sitemap=sitemap)
    biases = SponBiases(model, sites, sitemap=sitemap)
    with torch.no_grad():
        for p in biases.params.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    prompt = torch.randint(0, 256, (1, 8), generator=g)
    return model, sitemap, thr, biases, prompt


def _greedy(model, prompt, n=NEW_TOKENS):
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones_like(prompt))
    return out[0, prompt.shape[1]:]


def _count_kernel_calls(decoder):
    calls = [0]

    def count(module, args):
        if module.uses_kernel and args[0].numel() <= module.max_kernel_tokens * module.in_features:
            calls[0] += 1

    handles = [layer.register_forward_pre_hook(count) for layer in decoder.layers.values()]
    return calls, handles


@pytest.mark.parametrize("sites", ["all", "mlp", "layers.1.o_proj"])
def test_decode_mode_generates_the_simulated_models_tokens(sites):
    model, sitemap, thr, biases, prompt = _setup(sites)
    dense = _greedy(model, prompt)
    with SparseModel(model, thr, sites, biases=biases, sitemap=sitemap):
        simulated = _greedy(model, prompt)
    decoder = SparseDecoder(model, thr, sites, sitemap=sitemap, biases=biases)
    calls, handles = _count_kernel_calls(decoder)
    with decoder:
        got = _greedy(model, prompt)
    for h in handles:
        h.remove()
    assert torch.equal(got, simulated)
    assert calls[0] >= (NEW_TOKENS - 1) * len(sitemap.resolve(sites))  # every decode step ran the kernel
    if sites == "all":
        assert not torch.equal(simulated, dense)  # sparsification changes the output: the check can fail
    assert torch.equal(_greedy(model, prompt), dense)  # restored


def test_decode_mode_over_an_attached_sparse_model_and_parallel_kernel():
    model, sitemap, thr, biases, prompt = _setup("all")
    decode.set_kernel_threads(2)
    try:
        with SparseModel(model, thr, "all", biases=biases, sitemap=sitemap) as sm:
            simulated = _greedy(model, prompt)
            with SparseDecoder.from_sparse_model(sm) as decoder:
                assert decode._threads() == 2 and len(decoder.kernel_sites) == 14
                got = _greedy(model, prompt)
            assert torch.equal(_greedy(model, prompt), simulated)  # hooks fire again after restore
    finally:
        decode.set_kernel_threads(1)
    assert torch.equal(got, simulated)


def test_decode_mode_on_an_exported_model(tmp_path):
    model, sitemap, thr, biases, prompt = _setup("mlp")
    with SparseModel(model, thr, "mlp", biases=biases, sitemap=sitemap) as sm:
        simulated = _greedy(model, prompt)
        out = export_model(model, biases, tmp_path / "exp", sparsifier=thr, sparse_sites=sm.sparse_sites)
    sm2, _ = load_exported(out, toolkit=TOOLKIT)
    assert sm2.biases is None  # the biases are ordinary layer biases now
    with SparseDecoder.from_sparse_model(sm2) as decoder:
        assert decoder.layers["layers.0.down_proj"].bias is not None
        got = _greedy(sm2.model, prompt)
    assert torch.equal(got, simulated)


def test_restore_gives_back_the_dense_layers_exactly():
    model, sitemap, thr, biases, prompt = _setup("all")
    before_modules = {s: sitemap.module(s) for s in sitemap.names}
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = {s: (len(m._forward_pre_hooks), len(m._forward_hooks)) for s, m in before_modules.items()}
    ids = prompt.repeat(1, 3)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    decoder = SparseDecoder(model, thr, "all", sitemap=SiteMap(model, TOOLKIT.architectures), biases=biases)
    with decoder:
        swapped = SiteMap(model, TOOLKIT.architectures)
        assert all(isinstance(swapped.module(s), ThresholdSparseLinear) for s in sitemap.names)
        with torch.no_grad():
            assert not torch.equal(model(input_ids=ids).logits, ref)
    assert not decoder.enabled
    after = SiteMap(model, TOOLKIT.architectures)
    assert all(after.module(s) is before_modules[s] for s in sitemap.names)
    state = model.state_dict()
    assert state.keys() == before_state.keys() and all(torch.equal(state[k], before_state[k]) for k in state)
    assert {s: (len(m._forward_pre_hooks), len(m._forward_hooks)) for s, m in before_modules.items()} == hooks_before
    assert all(sitemap.module(s).bias is None for s in sitemap.names)  # biases folded into the new layers only
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)
    decoder.restore()  # idempotent
    decoder.enable()  # and re-enterable
    assert isinstance(after.layers[0].mlp.down_proj, ThresholdSparseLinear)
    decoder.restore()
    assert after.layers[0].mlp.down_proj is before_modules["layers.0.down_proj"]


def test_biases_already_folded_are_not_added_twice_and_mapping_biases():
    model, sitemap, thr, biases, prompt = _setup("down_proj")
    with SparseModel(model, thr, "down_proj", biases=biases, sitemap=sitemap):
        simulated = _greedy(model, prompt)
    biases.fold()
    try:
        with SparseDecoder(model, thr, "down_proj", sitemap=sitemap, biases=biases):
            folded = _greedy(model, prompt)
    finally:
        biases.unfold()
    betas = {s: biases.beta(s).detach() for s in biases.sites}
    with SparseDecoder(model, thr, "down_proj", sitemap=sitemap, biases=betas):
        mapped = _greedy(model, prompt)
    assert torch.equal(folded, simulated) and torch.equal(mapped, simulated)


def test_biased_sites_outside_the_sparse_sites_get_a_dense_layer_with_the_bias():
    model, sitemap, thr, _, prompt = _setup("all")
    biases = SponBiases(model, ["layers.0.o_proj", "layers.1.down_proj"], sitemap=sitemap)
    with torch.no_grad():
        for p in biases.params.values():
            p.normal_(0, 0.3)
    with SparseModel(model, thr, "mlp", biases=biases, sitemap=sitemap):
        simulated = _greedy(model, prompt)
    with SparseDecoder(model, thr, "mlp", sitemap=sitemap, biases=biases) as decoder:
        assert decoder.layers["layers.0.o_proj"].threshold is None
        got = _greedy(model, prompt)
    assert torch.equal(got, simulated)


def test_decode_mode_refuses_what_it_cannot_do():
    model, sitemap, thr, biases, _ = _setup("mlp")
    with pytest.raises(ConfigError, match="threshold sparsifier only"):
        SparseDecoder(model, MagnitudeSparsifier(0.5), "mlp", sitemap=sitemap)
    with pytest.raises(SponError, match="not calibrated for site 'layers.0.q_proj'"):
        SparseDecoder(model, thr, "all", sitemap=sitemap)
    with pytest.raises(ConfigError, match="kernel must be"):
        SparseDecoder(model, thr, "mlp", sitemap=sitemap, kernel="yes")
    with pytest.raises(ConfigError, match="shape"):
        SparseDecoder(model, thr, "mlp", sitemap=sitemap, biases={"layers.0.down_proj": torch.zeros(3)})
    with pytest.raises(ConfigError, match="kernel threads"):
        decode.set_kernel_threads(0)
    with decode_mode(model, thr, "mlp", toolkit=TOOLKIT), pytest.raises(ConfigError, match="not nn.Linear"):
        SparseDecoder(model, thr, "mlp", sitemap=SiteMap(model, TOOLKIT.architectures))


def test_missing_numba_is_a_one_line_error_naming_the_extra(monkeypatch):
    model, sitemap, thr, _, prompt = _setup("mlp")
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    monkeypatch.setattr(decode, "_kernels", None)
    assert not decode.kernel_available()
    for call in (lambda: SparseDecoder(model, thr, "mlp", sitemap=sitemap),
                 lambda: sparse_linear(torch.randn(1, 4), 0.1, torch.randn(4, 2))):
        with pytest.raises(ConfigError) as info:
            call()
        msg = str(info.value)
        assert "\n" not in msg and "numba" in msg and "spon-toolkit[decode]" in msg
    # kernel=False needs no numba: the dense fallback on the sparsified input, same tokens as simulated
    with SparseModel(model, thr, "mlp", sitemap=sitemap):
        simulated = _greedy(model, prompt)
    with SparseDecoder(model, thr, "mlp", sitemap=sitemap, kernel=False) as decoder:
        assert decoder.kernel_sites == []
        assert torch.equal(_greedy(model, prompt), simulated)


@pytest.mark.cuda
def test_on_cuda_decode_mode_falls_back_and_matches_the_simulated_model():
    model, sitemap, thr, biases, prompt = _setup("all")
    model.cuda()
    biases.cuda()
    prompt = prompt.cuda()
    with SparseModel(model, thr, "all", biases=biases, sitemap=sitemap):
        simulated = _greedy(model, prompt)
    with SparseDecoder(model, thr, "all", sitemap=sitemap, biases=biases) as decoder:
        assert decoder.kernel_sites == []
        got = _greedy(model, prompt)
    assert torch.equal(got, simulated)
    with pytest.raises(ConfigError, match="float32 weights on CPU"):
        SparseDecoder(model, thr, "all", sitemap=sitemap, kernel=True)
