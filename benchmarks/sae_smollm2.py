"""SAE decomposition of trained SPON biases on the real offline model (the numbers in the README).

    spon train --sparsity 0.5 --sites down_proj --dtype bfloat16 --train-blocks 32 --epochs 2 \
        --eval-blocks 16 --output runs/unif_all_s05.safetensors
    python benchmarks/sae_smollm2.py runs/unif_all_s05.safetensors --sites layers.4.down_proj,layers.25.down_proj \
        -o runs/sae_check

Loads the checkpoint's model (same dtype, fingerprint checked), its sparsifier and biases, and runs the
``sae_decomposition`` analyzer on the sotu calibration (SAE training, contexts), validation (SAE quality)
and eval (feature restoration) splits. Prints a summary; the full JSON and figures land in ``-o``.
A second run reuses the cached activations and SAEs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--sites", default="layers.4.down_proj,layers.25.down_proj")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=JSON", help="analyzer option")
    ap.add_argument("-o", "--output", default="runs/sae_check")
    args = ap.parse_args()

    from spon_toolkit.builtin.sae_analyzer import analyze, check_options
    from spon_toolkit.checkpoint import load_checkpoint
    from spon_toolkit.data import load_blocks
    from spon_toolkit.expdata import ExperimentData
    from spon_toolkit.models import load_model
    from spon_toolkit.plugins import Toolkit
    from spon_toolkit.runner import AnalysisRun
    from spon_toolkit.sites import SiteMap
    from spon_toolkit.sparse import SponBiases

    options = {"sites": [s for s in args.sites.split(",") if s]}
    for item in args.option:
        key, value = item.split("=", 1)
        options[key] = json.loads(value)
    check_options(options)
    t0 = time.perf_counter()
    toolkit = Toolkit()
    model, tok = load_model("smollm2-135m", dtype=args.dtype, toolkit=toolkit)
    ckpt = load_checkpoint(args.checkpoint)
    ckpt.validate(model)
    sitemap = SiteMap(model, toolkit.architectures)
    biases = SponBiases(model, ckpt.sites, parametrisation=ckpt.parametrisation, sitemap=sitemap)
    biases.load_tensors(ckpt.tensors)

    class Plan:
        sparse_sites = tuple(ckpt.sparse_sites)
        biased_sites = tuple(ckpt.sites)

    def blocks(split):
        return load_blocks(tok, "sotu", split, 128)

    cal = blocks("calibration")
    data = ExperimentData(cal, cal, blocks("validation"), blocks("eval"))
    out = Path(args.output)
    run = AnalysisRun(item=None, record={}, model=model, tokenizer=tok, sparsifier=ckpt.sparsifier(toolkit),
                      plan=Plan(), biases=biases, data=data, run_dir=out, figures_dir=out / "figures")
    result = analyze(run, **options)
    for site, e in result["sites"].items():
        q, d, r = e["quality"], e["decomposition"], e["restoration"]
        print(f"\n== {site} ({e['space']}, SAE width {e['sae']['width']}, cache hit {e['sae'].get('cache_hit')})")
        print(f"quality (validation, {q['n_tokens']} tokens): FVU {q['fvu']:.3f}  L0 {q['l0']:.1f}  "
              f"dead {q['dead_fraction']:.3f}  loss dense {q['loss_dense']:.4f} spliced {q['loss_spliced']:.4f} "
              f"(delta {q['delta_loss']:+.4f}, 95% CI {q['delta_loss_ci95'][0]:+.4f}..{q['delta_loss_ci95'][1]:+.4f}) "
              f"mean-ablated {q['loss_mean_ablated']:.4f}  loss recovered {q['loss_recovered']:.3f}")
        print(f"bias norm {d['norm']:.4f}; max |cos| with a decoder direction {d['max_abs_cosine']:.3f} "
              f"(isotropic null mean {d['max_abs_cosine_null_mean']:.3f}, p95 {d['max_abs_cosine_null_p95']:.3f})")
        for n, ex in d["explained"].items():
            print(f"  top {n:>2}: explained {ex['observed']:.3f} | isotropic null mean {ex['null_isotropic_mean']:.3f} "
                  f"p95 {ex['null_isotropic_p95']:.3f} p={ex['null_isotropic_p']:.3f} | activation-shaped null "
                  f"mean {ex['null_activation_covariance_mean']:.3f} p95 {ex['null_activation_covariance_p95']:.3f} "
                  f"p={ex['null_activation_covariance_p']:.3f}")
        for f in d["top_features"][:5]:
            ctx = e["contexts"].get(str(f["feature"])) or []
            shown = " | ".join(repr(c["context"]) for c in ctx[:3])
            print(f"  feature {f['feature']:>5} weight {f['weight']:+.4f} cos {f['cosine']:+.3f}: {shown}")
        print(f"restoration share {r['restoration_share']:.3f} (95% CI {r['restoration_share_ci95'][0]:.3f}.."
              f"{r['restoration_share_ci95'][1]:.3f}; random-bias null {r['restoration_share_null']:.3f}); "
              f"suppressed {r['n_suppressed']}, created {r['n_created']} of {r['n_features']} features")
        for row in (r["suppressed"][:3] + r["created"][:3]):
            print(f"  feature {row['feature']:>5}: dense {row['dense']:.4f} sparse {row['sparse']:.4f} "
                  f"spon {row['spon']:.4f} restored {row['restored']:+.2f}")
    print(f"\nJSON: {result['json']}\nwall time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
