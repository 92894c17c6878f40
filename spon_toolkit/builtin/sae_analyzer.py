"""The ``sae_decomposition`` analyzer and its report section.

For each analysed biased site: an SAE of the space the bias lives in (trained with sae-lens on the dense
model's calibration activations and cached, or loaded with the ``sae`` option), its quality on held-out
validation blocks, a sparse decomposition of the bias on the SAE's decoder directions against random
vectors of equal norm, feature restoration on eval blocks (dense / sparse / sparse+SPON, and sparse plus
random biases of equal norms as the null) and the calibration contexts that activate the top features most.
See :mod:`spon_toolkit.sae` for the definitions. Results: the returned dict (stored in the item's record),
``<run_dir>/analysis/sae_decomposition_<item>.json`` and figures in ``<run_dir>/figures/``.

Options (all checked before any model work)::

    sites: auto            # "auto": the first and the last biased site; or a site spec / list of sites
    sae: null              # an SAE directory or "release:sae_id" (one for all sites, or {site: source})
    architecture: topk     # topk | standard (ReLU + L1)
    width: null            # features (null: 2 x the space's dimension)
    k: 32                  # active features per token (topk)
    steps: 500             # SAE optimiser steps
    batch_size: 512        # tokens per SAE step
    lr: 0.001
    l1_coefficient: 5.0    # standard architecture only
    train_blocks: 128      # calibration blocks whose activations train the SAE (sampled, seed 0)
    validation_blocks: 16  # held-out blocks for the SAE quality
    eval_blocks: 16        # eval blocks for feature restoration
    skip_first: 1          # leading positions of each block left out (outsized first-token norms)
    ns: [1, 5, 20]         # numbers of decoder directions for the explained-norm fractions
    top_features: 10
    n_null: 200            # random vectors for the null of the explained fractions
    context_features: 5    # top features per bias that get contexts
    contexts: 5            # contexts per feature
    window: 8              # tokens before the activating token (window // 2 after)
    forward_batch_size: 8
    cache: true
    seed: 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spon_toolkit.errors import ConfigError
from spon_toolkit.hookspecs import hookimpl

NAME = "sae_decomposition"


@dataclass
class SaeOptions:
    sites: Any = "auto"
    sae: Any = None
    architecture: str = "topk"
    width: int | None = None
    k: int = 32
    steps: int = 500
    batch_size: int = 512
    lr: float = 1e-3
    l1_coefficient: float = 5.0
    train_blocks: int = 128
    validation_blocks: int = 16
    eval_blocks: int = 16
    skip_first: int = 1
    ns: list = field(default_factory=lambda: [1, 5, 20])
    top_features: int = 10
    n_null: int = 200
    context_features: int = 5
    contexts: int = 5
    window: int = 8
    forward_batch_size: int = 8
    cache: bool = True
    seed: int = 0
    progress: Any = None

    def settings(self):
        from spon_toolkit.sae import SaeSettings

        return SaeSettings(architecture=self.architecture, width=self.width, k=self.k, steps=self.steps,
                           batch_size=self.batch_size, lr=float(self.lr), l1_coefficient=float(self.l1_coefficient),
                           seed=self.seed)


def check_options(options: dict[str, Any]) -> SaeOptions:
    """Validate the analyzer's options; one-line :class:`ConfigError` on anything wrong."""
    known = SaeOptions.__dataclass_fields__
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"{NAME}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
    opts = SaeOptions(**options)
    for name in ("train_blocks", "validation_blocks", "eval_blocks", "top_features", "n_null",
                 "context_features", "contexts", "window", "forward_batch_size"):
        v = getattr(opts, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{NAME}: option '{name}' must be an integer >= 1, got {v!r}")
    if isinstance(opts.skip_first, bool) or not isinstance(opts.skip_first, int) or opts.skip_first < 0:
        raise ConfigError(f"{NAME}: option 'skip_first' must be an integer >= 0, got {opts.skip_first!r}")
    if (not isinstance(opts.ns, (list, tuple)) or not opts.ns
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in opts.ns)):
        raise ConfigError(f"{NAME}: option 'ns' must be a list of integers >= 1, got {opts.ns!r}")
    opts.ns = sorted(set(int(n) for n in opts.ns))
    if not (opts.sites == "auto" or isinstance(opts.sites, str)
            or (isinstance(opts.sites, list) and opts.sites and all(isinstance(s, str) for s in opts.sites))):
        raise ConfigError(f"{NAME}: option 'sites' must be 'auto', a site spec or a list of sites, got {opts.sites!r}")
    if opts.sae is not None and not isinstance(opts.sae, (str, dict)):
        raise ConfigError(f"{NAME}: option 'sae' must be an SAE directory, 'release:sae_id' or {{site: source}}")
    if not isinstance(opts.cache, bool):
        raise ConfigError(f"{NAME}: option 'cache' must be true or false, got {opts.cache!r}")
    try:
        opts.settings().check()
    except ConfigError as exc:
        raise ConfigError(f"{NAME}: {exc}") from None
    return opts


def _blocks(run, split: str, n: int):
    """``n`` blocks of ``split``: the run's own blocks when it has enough, else loaded from its text source
    (calibration: a seeded sample; validation and eval: the first ``n``)."""
    from spon_toolkit.data import load_blocks
    from spon_toolkit.models import context_length

    attr = {"calibration": "calibration", "validation": "validation", "eval": "eval"}[split]
    have = getattr(run.data, attr, None)
    pick = (lambda b: b.sample(n, seed=0)) if split == "calibration" else (lambda b: b.head(n))
    if have is not None and len(have) >= n:
        return pick(have)
    ref = have if have is not None else run.data.calibration
    try:
        return pick(load_blocks(run.tokenizer, ref.source, split, ref.block_size,
                                max_length=context_length(run.model)))
    except Exception as exc:
        if have is not None:
            return have
        raise ConfigError(f"{NAME}: no {split} blocks in this run and none could be loaded from "
                          f"'{ref.source}' ({exc}); give the experiment data.{split}_blocks") from None


def _sites(opts: SaeOptions, biases, sitemap) -> list[str]:
    from spon_toolkit.sae import check_bias_site

    biased = list(biases.sites)
    if opts.sites == "auto":
        return list(dict.fromkeys([biased[0], biased[-1]]))
    sites = sitemap.resolve(opts.sites)
    for site in sites:
        check_bias_site(site, biased)
    return sites


def _sae_source(opts: SaeOptions, site: str):
    if isinstance(opts.sae, dict):
        return opts.sae.get(site)
    return opts.sae


def analyze(run, **options) -> dict[str, Any]:
    """The ``sae_decomposition`` analyzer (see the module docstring)."""
    import torch

    from spon_toolkit import sae as S
    from spon_toolkit.sparse import SparseModel, SponBiases

    opts = check_options(options)
    S.require_sae_lens()
    if run.biases is None:
        return {"skipped": "this item has no SPON biases"}
    sitemap = run.biases.sitemap
    sites = _sites(opts, run.biases, sitemap)
    param = run.biases.parametrisation
    spaces = [S.bias_space(site, param) for site in sites]
    sources = {sp.site: _sae_source(opts, sp.site) for sp in spaces}
    for sp in spaces:  # an SAE of the wrong dimension fails before the long work
        if sources[sp.site] is not None:
            S.load_sae(sources[sp.site], d_in=sp.dim(sitemap), where=f"{NAME}: {sp.site}")
    settings = opts.settings()
    for sp in spaces:
        if sources[sp.site] is None:
            try:
                settings.check(sp.dim(sitemap))
            except ConfigError as exc:
                raise ConfigError(f"{NAME}: {sp.site}: {exc}") from None

    model, tok = run.model, run.tokenizer
    fb, skip = opts.forward_batch_size, opts.skip_first
    cal = _blocks(run, "calibration", opts.train_blocks)
    val = _blocks(run, "validation", opts.validation_blocks)
    ev = _blocks(run, "eval", opts.eval_blocks)
    cal_acts, _ = S.cached_activations(model, sitemap, spaces, cal.ids, skip_first=skip, batch_size=fb,
                                       cache=opts.cache, progress=opts.progress)
    val_acts, _ = S.cached_activations(model, sitemap, spaces, val.ids, skip_first=skip, batch_size=fb,
                                       cache=opts.cache, progress=opts.progress)

    sparse_sites = list(getattr(run.plan, "sparse_sites", None) or run.biases.sites)

    # eval activations under the four conditions, all spaces in one pass each
    def collect(sparse: bool, biases, desc: str):
        sm = SparseModel(model, run.sparsifier, sparse_sites, biases=biases, sitemap=sitemap) if sparse else None
        try:
            return S.collect_activations(model, sitemap, spaces, ev.ids, skip_first=skip, batch_size=fb,
                                         progress=opts.progress, desc=desc)
        finally:
            if sm is not None:
                sm.detach()

    g = torch.Generator().manual_seed(opts.seed)
    random_biases = SponBiases(model, run.biases.sites, parametrisation=param, sitemap=sitemap)
    rand = {}
    for site in run.biases.sites:
        t = run.biases.param(site).detach().to("cpu", torch.float32)
        r = torch.randn(t.shape, generator=g)
        rand[site] = r / r.norm().clamp_min(1e-30) * t.norm()
    random_biases.load_tensors(rand)
    conditions = {"dense": collect(False, None, "dense"), "sparse": collect(True, None, "sparse"),
                  "spon": collect(True, run.biases, "sparse+SPON"),
                  "random_bias": collect(True, random_biases, "sparse+random biases")}

    out_sites: dict[str, Any] = {}
    for sp in spaces:
        if sources[sp.site] is not None:
            sae = S.load_sae(sources[sp.site], d_in=sp.dim(sitemap), where=f"{NAME}: {sp.site}")
            sae_info = {"source": str(sources[sp.site]), "cache_hit": None}
        else:
            sae, info = S.trained_sae(model, sitemap, sp, cal.ids, settings, skip_first=skip, batch_size=fb,
                                      cache=opts.cache, progress=opts.progress, acts=cal_acts[sp.name])
            sae_info = {"source": "trained", **{k: info[k] for k in ("key", "cache_hit", "settings", "training")}}
        quality = S.sae_quality(sae, model, sitemap, sp, val.ids, skip_first=skip, batch_size=fb,
                                acts=val_acts[sp.name])
        directions = S.decoder_directions(sae).numpy()
        bias = run.biases.param(sp.site).detach().to("cpu", torch.float32).numpy()
        x = cal_acts[sp.name].reshape(-1, cal_acts[sp.name].shape[-1]).to(torch.float64)
        cov = torch.cov(x.T).numpy()
        decomposition = S.decompose_bias(directions, bias, ns=opts.ns, top=opts.top_features, n_null=opts.n_null,
                                         null_cov=cov, seed=opts.seed)
        means = {c: S.feature_means(sae, acts[sp.name]) for c, acts in conditions.items()}
        restoration = S.feature_restoration(means["dense"], means["sparse"], means["spon"],
                                            null=means["random_bias"], top=opts.top_features, seed=opts.seed)
        feats = [f["feature"] for f in decomposition.get("top_features", [])[:opts.context_features]]
        feats += [f["feature"] for f in restoration["suppressed"][:2] + restoration["created"][:2]]
        feats = list(dict.fromkeys(feats))
        contexts = S.top_contexts(sae, cal_acts[sp.name], cal.ids, tok, feats, skip_first=skip, n=opts.contexts,
                                  window=opts.window)
        out_sites[sp.site] = {
            "space": sp.kind, "d_in": sp.dim(sitemap), "sae": {**sae_info, "width": int(sae.cfg.d_sae),
                                                             "architecture": sae.cfg.architecture()},
            "quality": quality, "decomposition": decomposition, "restoration": restoration,
            "contexts": {str(k): v for k, v in contexts.items()},
        }

    result = {
        "sites": out_sites, "parametrisation": param,
        "protocol": {"calibration": cal.protocol(), "validation": val.protocol(), "eval": ev.protocol(),
                     "skip_first": skip, "options": {k: v for k, v in vars(opts).items() if k != "progress"}},
    }
    result["figures"] = _figures(run, result)
    result["json"] = _write_json(run, result)
    return result


def _slug(run) -> str:
    from spon_toolkit.runner import item_slug

    try:
        return item_slug(run.item)
    except Exception:
        return "item"


def _write_json(run, result) -> str | None:
    from spon_toolkit.fileio import atomic_write_json

    if run.run_dir is None:
        return None
    path = Path(run.run_dir) / "analysis" / f"{NAME}_{_slug(run)}.json"
    atomic_write_json(path, result)
    return str(path)


def _figures(run, result) -> list[str]:
    if run.figures_dir is None:
        return []
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    paths = []
    for site, entry in result["sites"].items():
        fig = plot_site(site, entry)
        path = Path(run.figures_dir) / f"{NAME}_{_slug(run)}_{site.replace('.', '_')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, metadata={"Software": None})
        plt.close(fig)
        paths.append(str(path))
    return paths


def plot_site(site: str, entry: dict[str, Any]):
    """Two panels: explained squared-norm fraction vs the nulls; per-feature mean change sparse vs SPON."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    ex = entry["decomposition"].get("explained", {})
    ns = list(ex)
    xs = range(len(ns))
    a.plot(xs, [ex[n]["observed"] for n in ns], "o-", label="SPON bias")
    for key, style in (("isotropic", "s--"), ("activation_covariance", "^:")):
        if ns and f"null_{key}_mean" in ex[ns[0]]:
            a.plot(xs, [ex[n][f"null_{key}_p95"] for n in ns], style, label=f"null {key} (95th pct)")
    a.set_xticks(list(xs), [str(n) for n in ns])
    a.set_xlabel("decoder directions (OMP)")
    a.set_ylabel("explained squared norm")
    a.set_ylim(0, 1)
    a.set_title(f"{site}: bias in the SAE basis")
    a.legend(fontsize=8)
    rows = entry["restoration"]["suppressed"] + entry["restoration"]["created"]
    if rows:
        b.scatter([r["change"] for r in rows], [r["spon"] - r["dense"] for r in rows], s=12)
        lim = max(abs(r["change"]) for r in rows) or 1.0
        b.plot([-lim, lim], [-lim, lim], "k:", lw=0.8, label="no restoration")
        b.axhline(0, color="grey", lw=0.8)
        b.legend(fontsize=8)
    b.set_xlabel("sparse - dense (mean activation)")
    b.set_ylabel("sparse+SPON - dense")
    share = entry["restoration"]["restoration_share"]
    b.set_title(f"features moved by sparsification (restored {share:.0%})" if math.isfinite(share)
                else "features moved by sparsification")
    fig.tight_layout()
    return fig


# --- report views ---------------------------------------------------------------------------------

def _entries(results):
    for r in results.records:
        a = (r.get("analyses") or {}).get(NAME)
        if a and "sites" in a:
            for site, entry in a["sites"].items():
                yield r, site, entry


def quality_table(results):
    import pandas as pd

    rows = [{"item": r["id"], "site": site, "space": e["space"], "width": e["sae"]["width"],
             "FVU": e["quality"]["fvu"], "L0": e["quality"]["l0"], "dead": e["quality"]["dead_fraction"],
             "Δloss (spliced)": e["quality"]["delta_loss"],
             "Δloss (mean-ablated)": e["quality"]["loss_mean_ablated"] - e["quality"]["loss_dense"],
             "loss recovered": e["quality"]["loss_recovered"]} for r, site, e in _entries(results)]
    return pd.DataFrame(rows)


def decomposition_table(results):
    import pandas as pd

    rows = []
    for r, site, e in _entries(results):
        for n, ex in e["decomposition"].get("explained", {}).items():
            rows.append({"item": r["id"], "site": site, "n features": int(n), "explained": ex["observed"],
                         "null iso mean": ex.get("null_isotropic_mean"), "null iso p95": ex.get("null_isotropic_p95"),
                         "p (iso)": ex.get("null_isotropic_p"),
                         "null act-cov mean": ex.get("null_activation_covariance_mean"),
                         "p (act-cov)": ex.get("null_activation_covariance_p")})
    return pd.DataFrame(rows)


def features_table(results):
    import pandas as pd

    rows = []
    for r, site, e in _entries(results):
        for f in e["decomposition"].get("top_features", []):
            ctx = e["contexts"].get(str(f["feature"])) or []
            rows.append({"item": r["id"], "site": site, "feature": f["feature"], "weight": f["weight"],
                         "cosine": f["cosine"], "top context": ctx[0]["context"] if ctx else ""})
    return pd.DataFrame(rows)


def restoration_table(results):
    import pandas as pd

    rows = [{"item": r["id"], "site": site, "restoration share": e["restoration"]["restoration_share"],
             "95% CI": e["restoration"]["restoration_share_ci95"],
             "random-bias null": e["restoration"].get("restoration_share_null"),
             "suppressed": e["restoration"]["n_suppressed"], "created": e["restoration"]["n_created"]}
            for r, site, e in _entries(results)]
    return pd.DataFrame(rows)


def plots(results):
    return [plot_site(f"{r['config']} {site}", e) for r, site, e in _entries(results)]


def report_section(results):
    if not any(True for _ in _entries(results)):
        return []
    from spon_toolkit.report import code, md

    return [
        md("## SAE decomposition of the biases\n\nPer analysed site: an SAE (sae-lens) of the space the bias "
           "is added to. *Quality* on held-out validation blocks: FVU, L0, dead features, and the change in "
           "next-token loss when the reconstruction is spliced in (mean ablation as the reference). "
           "*Decomposition*: share of the bias's squared norm explained by its best 1/5/20 decoder directions "
           "(orthogonal matching pursuit) against random vectors of equal norm (isotropic and shaped like the "
           "activations; p = empirical p-value). *Restoration*: how much of the change in mean feature "
           "activations caused by sparsification the SPON biases undo (random biases of equal norms as the null)."),
        code("from spon_toolkit.builtin import sae_analyzer as sae_view\n"
             "display(sae_view.quality_table(R))\ndisplay(sae_view.decomposition_table(R))\n"
             "display(sae_view.restoration_table(R))\ndisplay(sae_view.features_table(R))\n"
             "sae_view.plots(R);"),
    ]


@hookimpl
def spon_register_analyzers(register):
    register(NAME, analyze, "sparse decomposition of SPON biases in an SAE basis (sae-lens; extra 'sae')",
             check=_check)


def _check(options: dict[str, Any], context: dict[str, Any]) -> None:
    """The analyzer contract's ``check(options, context)``: the option values, before any model work (the
    caller prefixes the analyzer's name)."""
    try:
        check_options(options)
    except ConfigError as exc:
        raise ConfigError(str(exc).removeprefix(f"{NAME}: ")) from None


@hookimpl
def spon_register_report_sections(register):
    register("sae-decomposition", report_section, "SAE quality, bias decomposition and feature restoration",
             order=90)
