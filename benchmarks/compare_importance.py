"""Layer rankings of the gradient-based importance methods (gradient_norm, ILA) against the ablation-based ones
(sensitivity, cornerstone, Shapley) on one model: Spearman correlations with a permutation null.

Protocol (printed with the numbers): the first BLOCKS sotu calibration blocks of 128 tokens (seeded sample,
seed 0), float32 on CPU; sensitivity and Shapley sparsify each layer's down_proj input with magnitude top-k at
SPARSITY (the toolkit's 'sparsify' ablation); cornerstone removes the layer. Shapley: permutation estimator with
a budget of BUDGET model evaluations (seed 0). ILA: STEPS Adam steps, lr 0.05, penalty 0.1, batches of 4 blocks,
run twice (seeds 0 and 1) to give a noise floor. Null: Spearman of the same scores with the layer labels shuffled
(10,000 permutations), its 95% two-sided band and a permutation p-value.

    python benchmarks/compare_importance.py --blocks 8 --budget 93 --steps 20
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy.stats import spearmanr


def _perm_null(a: np.ndarray, b: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    obs = spearmanr(a, b).statistic
    null = np.array([spearmanr(a, rng.permutation(b)).statistic for _ in range(n)])
    p = (1 + np.sum(np.abs(null) >= abs(obs))) / (1 + n)
    return float(np.quantile(null, 0.025)), float(np.quantile(null, 0.975)), float(p)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--budget", type=int, default=93)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from spon_toolkit.data import load_blocks
    from spon_toolkit.importance import compute_importance
    from spon_toolkit.models import load_model
    from spon_toolkit.plugins import Toolkit
    from spon_toolkit.sparsifiers import MagnitudeSparsifier

    toolkit = Toolkit()
    model, tok = load_model(args.model, device="cpu", toolkit=toolkit)
    blocks = load_blocks(tok, "sotu", "calibration", 128).sample(args.blocks, 0)
    batches = list(blocks.batches(4))
    sp = MagnitudeSparsifier(args.sparsity)
    runs = {
        "gradient_norm": ("gradient_norm", None, None, {"batch_size": 4}),
        "ila_seed0": ("ila", None, None, {"steps": args.steps, "seed": 0}),
        "ila_seed1": ("ila", None, None, {"steps": args.steps, "seed": 1}),
        "sensitivity": ("sensitivity", sp, "down_proj", {}),
        "cornerstone": ("cornerstone", None, None, {}),
        "shapley": ("shapley", sp, "down_proj", {"budget": args.budget, "seed": 0}),
    }
    scores, seconds = {}, {}
    for label, (method, sparsifier, sites, opts) in runs.items():
        t0 = time.perf_counter()
        res = compute_importance(method, model, batches, sparsifier, sites, toolkit=toolkit, use_cache=False,
                                 progress=False, **opts)
        seconds[label] = round(time.perf_counter() - t0, 1)
        layer = res.layer_scores()
        scores[label] = np.array([layer[i] for i in sorted(layer)])
        print(f"{label:<14} {seconds[label]:>6.1f} s  top-5 layers {list(np.argsort(-scores[label])[:5])}", flush=True)

    print(f"\nprotocol: {args.model}, {blocks.protocol()['blocks']} sotu calibration blocks x 128 tokens, float32 "
          f"CPU; sparsity {args.sparsity} magnitude on down_proj (sensitivity, shapley); shapley permutation "
          f"budget {args.budget}; ILA {args.steps} steps; null = shuffled layer labels (10,000)")
    pairs = [("gradient_norm", "sensitivity"), ("gradient_norm", "shapley"), ("gradient_norm", "cornerstone"),
             ("ila_seed0", "sensitivity"), ("ila_seed0", "shapley"), ("ila_seed0", "cornerstone"),
             ("gradient_norm", "ila_seed0"), ("ila_seed0", "ila_seed1"), ("sensitivity", "shapley")]
    rows = []
    print(f"{'pair':<32} {'Spearman':>9} {'null 95% band':>18} {'perm p':>8}")
    for a, b in pairs:
        rho = float(spearmanr(scores[a], scores[b]).statistic)
        lo, hi, p = _perm_null(scores[a], scores[b])
        rows.append({"a": a, "b": b, "spearman": rho, "null_lo": lo, "null_hi": hi, "p": p})
        print(f"{a + ' vs ' + b:<32} {rho:>9.3f} {f'[{lo:.3f}, {hi:.3f}]':>18} {p:>8.4f}")
    if args.json:
        from spon_toolkit.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps({"protocol": vars(args), "seconds": seconds, "pairs": rows,
                                                 "scores": {k: v.tolist() for k, v in scores.items()}}, indent=1))


if __name__ == "__main__":
    main()
