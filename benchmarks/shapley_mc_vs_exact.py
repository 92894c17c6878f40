"""Exact Shapley values (all 64 coalitions) of a tiny random 6-layer Llama against the estimators.

Game: v(S) = -mean NLL on a few random-token blocks with the layers outside S ablated (``sparsify``:
magnitude top-k at --sparsity on every site of the layer; ``remove``: the layer is skipped). All 2^6
coalitions are evaluated once on the model; the estimators then draw from those memoised values, so many
seeds are cheap and every estimate uses exactly the model's numbers.

Columns: permutations m; model evaluations a walk costs without memoisation (m(n-1)+2, the cost on a
30-layer model where coalitions rarely repeat); distinct coalitions actually needed (mean over seeds);
Spearman rank correlation with the exact values; relative error sum|phi_hat - phi| / sum|phi|; coverage of
the +-2 standard-error bars. Means over --seeds seeds. Then the proximity estimator for every level.

    python benchmarks/shapley_mc_vs_exact.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from scipy.stats import spearmanr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from spon_toolkit.importance import (
        CoalitionValue,
        CountingValue,
        exact_shapley,
        make_players,
        permutation_shapley,
        proximity_shapley,
    )
    from spon_toolkit.sites import SiteMap
    from spon_toolkit.sparsifiers import MagnitudeSparsifier
    from spon_toolkit.testing.tiny import make_tiny_llama

    n = 6
    model = make_tiny_llama(seed=0, num_layers=n, hidden_size=64, intermediate_size=128)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (4, 64), generator=g)]
    sitemap = SiteMap(model)

    for ablation in ("sparsify", "remove"):
        players = make_players(sitemap, "layers", ablation, sitemap.resolve("all"))
        v = CoalitionValue(model, batches, players, ablation=ablation, sparsifier=MagnitudeSparsifier(args.sparsity),
                           sitemap=sitemap)
        t = time.perf_counter()
        exact = exact_shapley(v, n, progress=False)
        seconds = time.perf_counter() - t
        phi = exact.values
        scale = sum(abs(x) for x in phi)
        table = dict(v.cache)
        print(f"\n== ablation '{ablation}'" + (f" (magnitude {args.sparsity}, all 7 sites)" if ablation == "sparsify"
                                                else " (layer skipped)")
              + f": exact Shapley from {exact.evaluations} coalitions in {seconds:.1f}s")
        print("exact phi: " + " ".join(f"{x:+.5f}" for x in phi)
              + f"   (sum {sum(phi):+.5f} = v(N) - v(0) = {table[frozenset(range(n))] - table[frozenset()]:+.5f})")
        print(f"{'perms':>5} {'evals (walk)':>12} {'distinct':>9} {'spearman':>9} {'rel.err':>8} {'2SE cover':>9}")
        for m in (1, 2, 3, 5, 10, 20, 50, 100):
            rhos, errs, cover, distinct = [], [], [], []
            for seed in range(args.seeds):
                game = CountingValue(table.__getitem__)
                est = permutation_shapley(game, n, budget=10**9, max_permutations=m, seed=seed, progress=False)
                rho = spearmanr(est.values, phi).statistic
                rhos.append(0.0 if rho != rho else float(rho))  # constant estimate: no rank information
                errs.append(sum(abs(a - b) for a, b in zip(est.values, phi, strict=True)) / scale)
                if m >= 2:
                    cover += [abs(a - b) <= 2 * se for a, b, se in zip(est.values, phi, est.std_errors, strict=True)]
                distinct.append(est.evaluations)
            cov = f"{100 * sum(cover) / len(cover):8.0f}%" if cover else f"{'-':>9}"
            print(f"{m:>5} {m * (n - 1) + 2:>12} {statistics.mean(distinct):>9.1f} {statistics.mean(rhos):>9.3f} "
                  f"{statistics.mean(errs):>8.3f} {cov}")
        print(f"{'level':>5} {'evals':>12} {'':>9} {'spearman':>9} {'rel.err':>8}   (proximity estimator)")
        for level in range(1, n + 1):
            est = proximity_shapley(CountingValue(table.__getitem__), n, level, progress=False)
            rho = spearmanr(est.values, phi).statistic
            err = sum(abs(a - b) for a, b in zip(est.values, phi, strict=True)) / scale
            print(f"{level:>5} {est.evaluations:>12} {'':>9} {rho:>9.3f} {err:>8.3f}")


if __name__ == "__main__":
    main()
