"""Cost of a sparse forward relative to the dense forward, measured in one run.

Model: smollm2-135m when its converted cache is available (``--model smollm2-135m``), otherwise a random
Llama of its exact shape (30 layers, hidden 576, MLP 1536, 9 heads / 3 KV heads, vocab 49152).
Batch 4 x 256 tokens on CPU. Configurations are timed in interleaved rounds and the median per
configuration is reported, so load from other processes affects all of them alike.

    python benchmarks/bench_sparse.py [--rounds 7] [--model random|smollm2-135m] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spon_toolkit.sparse import SparseModel
from spon_toolkit.sparsifiers import MagnitudeSparsifier, ThresholdSparsifier, magnitude_sparsify


def smollm2_shaped_random_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def load(name: str):
    if name == "random":
        return smollm2_shaped_random_model(), "random Llama, SmolLM2-135M shape"
    from spon_toolkit.models import load_model

    model, _ = load_model(name, dtype=torch.float32, device="cpu")
    return model, name


class PostHookTopK:
    """The seed repository's approach, for reference: dense matmul, then a second one on S(x)."""

    def __init__(self, model, sites, sparsity):
        from spon_toolkit.sites import SiteMap

        sm = SiteMap(model)
        self.handles = []
        for site in sm.resolve(sites):
            def hook(module, args, output, s=sparsity):
                return torch.nn.functional.linear(magnitude_sparsify(args[0], s), module.weight, module.bias)
            self.handles.append(sm.module(site).register_forward_hook(hook))

    def detach(self):
        for h in self.handles:
            h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random", help="'random' (default) or a loader name such as smollm2-135m")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice); 1 gives steadier ratios on a busy machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, label = load(args.model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    calib = [torch.randint(0, model.config.vocab_size, (2, args.seq), generator=g)]
    threshold = ThresholdSparsifier(args.sparsity)
    threshold.calibrate(model, "all", calib)
    magnitude = MagnitudeSparsifier(args.sparsity)

    configs = {
        "dense": lambda: None,
        "threshold, all 7 sites": lambda: SparseModel(model, threshold, "all"),
        "magnitude, all 7 sites": lambda: SparseModel(model, magnitude, "all"),
        "magnitude, down_proj": lambda: SparseModel(model, magnitude, "down_proj"),
        "seed post-hook top-k, down_proj": lambda: PostHookTopK(model, "down_proj", args.sparsity),
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    with torch.inference_mode():
        model(input_ids=ids)  # warm-up
        for _ in range(args.rounds):
            for name, make in configs.items():
                attached = make()
                t0 = time.perf_counter()
                model(input_ids=ids)
                times[name].append(time.perf_counter() - t0)
                if attached is not None:
                    attached.detach()

    dense = statistics.median(times["dense"])
    print(f"model: {label}; batch {args.batch} x {args.seq} tokens; sparsity {args.sparsity}; "
          f"{torch.get_num_threads()} threads; median of {args.rounds} interleaved rounds")
    print(f"{'configuration':34s} {'median s':>9s} {'vs dense':>9s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:34s} {med:9.3f} {med / dense:8.2f}x")


if __name__ == "__main__":
    main()
