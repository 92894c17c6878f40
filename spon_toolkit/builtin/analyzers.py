"""Built-in analyzers: what the trained SPON biases encode.

- ``pca_alignment``: |cos| of each bias with the top-k principal directions of the activations it is added to,
  against the exact random-direction null, and the variance ratio along the bias;
- ``bias_statistics``: norm, moments, excess kurtosis (with the Gaussian band) and the distance from the
  closed-form initialisation, per site;
- ``hidden_state_shift``: per-layer relative distance of sparse and sparse+SPON hidden states from dense, the
  recovery, and KL to dense / top-1 agreement at the output;
- ``category_probes``: per prompt category, representation shift and linear CKA, perplexity and KL changes,
  logistic-regression probes of the category, and a permutation test across categories;
- ``cross_config`` (``scope="sweep"``): bias similarity across configs on shared sites, read against the
  same-config other-seed noise floor.

The numbers are computed by :mod:`spon_toolkit.analysis`; this module feeds it activations.
"""

from __future__ import annotations

import re
from typing import Any

from spon_toolkit.errors import ConfigError
from spon_toolkit.hookspecs import hookimpl

# --- shared helpers ------------------------------------------------------------------------------------

def _int(options: dict, key: str, low: int, default: Any = None) -> None:
    v = options.get(key, default)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"option '{key}' must be an integer >= {low}, got {v!r}")


def _check_sites(options: dict, context: dict) -> None:
    sites = options.get("sites")
    if sites is None:
        return
    if isinstance(sites, str):
        sites = [sites]
    if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
        raise ConfigError(f"option 'sites' must be a site name or a list of them, got {sites!r}")
    biased = context.get("biased_sites")
    if biased is not None:
        missing = [s for s in sites if s not in biased]
        if missing:
            raise ConfigError(f"needs a bias on '{missing[0]}', which this checkpoint/config does not have "
                              f"(biased sites: {len(biased)}, e.g. {', '.join(list(biased)[:2]) or 'none'})")


def _layer(site: str) -> int:
    m = re.match(r"layers\.(\d+)\.", site)
    return int(m.group(1)) if m else -1


def _sitemap(run):
    if getattr(run, "sitemap", None) is not None:
        return run.sitemap
    from spon_toolkit.sites import SiteMap

    return SiteMap(run.model, run.toolkit.architectures if getattr(run, "toolkit", None) else None)


def _sites(run, sites) -> list[str]:
    biased = list(run.biases.sites)
    if sites is None:
        return biased
    return [sites] if isinstance(sites, str) else list(sites)


def _blocks(run, n: int, split: str = "eval"):
    blocks = getattr(run.data, split)
    if blocks is None:
        raise ConfigError(f"the run has no '{split}' blocks")
    return blocks.head(min(n, len(blocks)))


def _batches(blocks, batch_size: int = 8) -> list:
    return list(blocks.batches(batch_size))


def closed_form_betas(model, sparsifier, sites, batches, sitemap, parametrisation="output") -> dict:
    """The closed-form initial biases ``beta0`` (output space, float32 CPU) of ``sites``."""
    import torch

    from spon_toolkit.sparse import SponBiases

    b0 = SponBiases(model, list(sites), parametrisation=parametrisation, sitemap=sitemap)
    b0.init_closed_form(model, sparsifier, batches)
    with torch.no_grad():
        return {s: b0.beta(s).detach().float().cpu() for s in sites}


# --- pca_alignment ---------------------------------------------------------------------------------------

def check_pca(options, context):
    _int(options, "k", 1)
    _int(options, "blocks", 1)
    _int(options, "n_null", 100)
    _check_sites(options, context)
    k = options.get("k", 10)
    dims = context.get("dims") or {}
    sites = options.get("sites") or list(dims)
    sites = [sites] if isinstance(sites, str) else sites
    for s in sites:
        if s in dims and k > dims[s]:
            raise ConfigError(f"k={k} principal components exceed the dimension {dims[s]} of '{s}'; use k <= {dims[s]}")
    if options.get("split", "eval") not in ("eval", "calibration"):
        raise ConfigError(f"option 'split' must be 'eval' or 'calibration', got {options.get('split')!r}")


def pca_alignment(run, k: int = 10, blocks: int = 8, split: str = "eval", sites=None, n_null: int = 20000,
                  seed: int = 0):
    """Alignment of each bias with the top-k principal directions of the activations it is added to (the site
    module's output in the sparse+SPON model, before the bias), token-level on ``blocks`` blocks of ``split``."""
    import numpy as np
    import torch

    from spon_toolkit.analysis.pca import alignment
    from spon_toolkit.sparse import SparseModel

    if run.biases is None:
        return {"skipped": "no biases"}
    sitemap = _sitemap(run)
    sites = _sites(run, sites)
    data = _blocks(run, blocks, split)
    acts: dict[str, list] = {s: [] for s in sites}

    def make_hook(site):
        def hook(module, args, output):
            acts[site].append(output.detach().reshape(-1, output.shape[-1]).float().cpu())
        return hook

    sm = SparseModel(run.model, run.sparsifier, list(run.plan.sparse_sites), biases=run.biases, sitemap=sitemap)
    handles = [sitemap.module(s).register_forward_hook(make_hook(s), prepend=True) for s in sites]
    try:
        with torch.no_grad():
            for ids in _batches(data):
                run.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
        sm.detach()
    out = {}
    with torch.no_grad():
        for s in sites:
            x = torch.cat(acts[s]).numpy()
            if k > min(x.shape):
                raise ConfigError(f"k={k} exceeds min(tokens, dimension) = {min(x.shape)} at '{s}'")
            out[s] = {"layer": _layer(s), **alignment(run.biases.beta(s).detach().float().cpu().numpy(), x, k,
                                                     n_null=n_null, seed=seed)}
    cos = np.array([v["max_abs_cos"] for v in out.values()])
    above = np.array([v["max_abs_cos"] > v["null_max_abs_cos_p95"] for v in out.values()])
    return {"sites": out, "summary": {
        "mean_max_abs_cos": float(cos.mean()), "max_max_abs_cos": float(cos.max()),
        "null_max_abs_cos_mean": float(np.mean([v["null_max_abs_cos_mean"] for v in out.values()])),
        "null_max_abs_cos_p95": float(np.mean([v["null_max_abs_cos_p95"] for v in out.values()])),
        "fraction_above_null_p95": float(above.mean()),
        "mean_variance_ratio": float(np.mean([v["variance_ratio"] for v in out.values()]))},
        "protocol": {"k": k, "split": split, "blocks": len(data), "block_size": data.block_size,
                     "tokens": len(data) * data.block_size, "activations": "site output before the bias, "
                     "sparse+SPON model", "null": "exact: max |cos| of an isotropic random direction with k "
                     "orthonormal directions, sampled", "n_null": n_null, "seed": seed}}


# --- bias_statistics -------------------------------------------------------------------------------------

def check_bias_statistics(options, context):
    _int(options, "init_blocks", 0)
    _check_sites(options, context)


def bias_statistics(run, init_blocks: int = 16, sites=None):
    """Per-site statistics of the trained biases; ``init_blocks`` calibration blocks recompute the closed-form
    initialisation to measure how far training moved each bias (0 = skip)."""
    import numpy as np

    from spon_toolkit.analysis.stats import bias_statistics as stats
    from spon_toolkit.analysis.stats import gaussian_kurtosis_band

    if run.biases is None:
        return {"skipped": "no biases"}
    sitemap = _sitemap(run)
    sites = _sites(run, sites)
    init = {}
    if init_blocks and run.sparsifier is not None:
        init = closed_form_betas(run.model, run.sparsifier, sites, _batches(_blocks(run, init_blocks, "calibration")),
                                 sitemap, run.biases.parametrisation)
    out, bands = {}, {}
    for s in sites:
        b = run.biases.beta(s).detach().float().cpu().numpy()
        if b.size not in bands:
            bands[b.size] = gaussian_kurtosis_band(b.size)
        lo, hi = bands[b.size]
        out[s] = {"layer": _layer(s), **stats(b, init[s].numpy() if s in init else None),
                  "null_kurtosis_gaussian_p025": lo, "null_kurtosis_gaussian_p975": hi}
    kurt = np.array([v["excess_kurtosis"] for v in out.values()])
    summary = {"mean_l2_norm": float(np.mean([v["l2_norm"] for v in out.values()])),
               "mean_excess_kurtosis": float(kurt.mean()),
               "fraction_kurtosis_above_gaussian_band": float(np.mean([v["excess_kurtosis"] >
                                                                       v["null_kurtosis_gaussian_p975"]
                                                                       for v in out.values()]))}
    if init:
        summary["mean_cos_to_init"] = float(np.mean([v["cos_to_init"] for v in out.values()]))
    return {"sites": out, "summary": summary,
            "protocol": {"kurtosis": "scipy.stats.kurtosis(fisher=True, bias=True)", "init": "closed form "
                         f"(mean of W (x - S(x))) on {init_blocks} calibration blocks" if init else None,
                         "null": "2.5/97.5 percentiles of the sample excess kurtosis of Gaussian vectors of the "
                                 "same dimension (2000 draws)"}}


# --- hidden_state_shift ----------------------------------------------------------------------------------

def check_shift(options, context):
    _int(options, "blocks", 1)


def _states(run, sm, ids, mode: str):
    """Hidden states and logits of one batch: mode = dense | sparse | spon."""
    import contextlib

    biases = run.biases
    ctx = sm.dense() if mode == "dense" else contextlib.nullcontext()
    prev = None
    if biases is not None and mode == "sparse":
        prev, biases.hooks.enabled = biases.hooks.enabled, False
    try:
        with ctx:
            out = run.model(input_ids=ids, output_hidden_states=True)
    finally:
        if prev is not None:
            biases.hooks.enabled = prev
    return out.hidden_states, out.logits


def hidden_state_shift(run, blocks: int = 8):
    """Per layer, ``||h - h_dense|| / ||h_dense||`` per token (averaged per block, then over blocks) for the
    sparse and the sparse+SPON model, the recovery ``1 - shift_spon / shift_sparse``, and at the output
    KL(dense || model) and top-1 agreement with dense. Intervals: 95% Student-t over blocks."""
    import numpy as np
    import torch

    from spon_toolkit.analysis.shift import (
        interval,
        kl_to_reference,
        recovery,
        relative_distance,
        top1_agreement,
    )
    from spon_toolkit.sparse import SparseModel

    sitemap = _sitemap(run)
    data = _blocks(run, blocks)
    sm = SparseModel(run.model, run.sparsifier, list(run.plan.sparse_sites) if run.sparsifier else [],
                     biases=run.biases, sitemap=sitemap)
    per_block: dict[str, list] = {"sparse": [], "spon": []}
    out_metrics: dict[str, list] = {"kl_sparse": [], "kl_spon": [], "top1_sparse": [], "top1_spon": []}
    try:
        with torch.no_grad():
            # two blocks at a time: three models' hidden states and logits of 8 blocks peaked at 2.3 GB
            for ids in _batches(data, 2):
                hd, ld = _states(run, sm, ids, "dense")
                for mode in ("sparse", "spon"):
                    hs, ls = _states(run, sm, ids, mode)
                    # [layers, batch]: mean over tokens of each block; index 0 (embeddings) is never changed
                    per_block[mode].append(torch.stack([relative_distance(h, r).mean(-1)
                                                        for h, r in zip(hs[1:], hd[1:], strict=True)]))
                    out_metrics[f"kl_{mode}"] += kl_to_reference(ls, ld).mean(-1).tolist()
                    out_metrics[f"top1_{mode}"] += top1_agreement(ls, ld).mean(-1).tolist()
    finally:
        sm.detach()
    sp = torch.cat(per_block["sparse"], dim=1).numpy()  # [layers, blocks]
    po = torch.cat(per_block["spon"], dim=1).numpy()
    layers = []
    for i in range(sp.shape[0]):
        rec_blocks = [recovery(a, b) for a, b in zip(sp[i], po[i], strict=True)]
        layers.append({"layer": i, "shift_sparse": interval(sp[i]), "shift_spon": interval(po[i]),
                       "recovery": recovery(float(sp[i].mean()), float(po[i].mean())),
                       "recovery_ci": interval(rec_blocks)})
    kl_s, kl_p = np.array(out_metrics["kl_sparse"]), np.array(out_metrics["kl_spon"])
    output = {k: interval(v) for k, v in out_metrics.items()}
    output["kl_recovery"] = recovery(float(kl_s.mean()), float(kl_p.mean()))
    output["kl_recovery_ci"] = interval([recovery(a, b) for a, b in zip(kl_s, kl_p, strict=True)])
    rec = np.array([lay["recovery"] for lay in layers], dtype=float)
    return {"layers": layers, "output": output, "summary": {
        "mean_recovery": float(np.nanmean(rec)) if np.isfinite(rec).any() else None, "n_layers_further_from_dense": int(np.sum(rec < 0)),
        "last_layer_shift_sparse": layers[-1]["shift_sparse"]["mean"],
        "last_layer_shift_spon": layers[-1]["shift_spon"]["mean"],
        "kl_sparse": output["kl_sparse"]["mean"], "kl_spon": output["kl_spon"]["mean"],
        "kl_recovery": output["kl_recovery"]},
        "protocol": {"blocks": len(data), "block_size": data.block_size, "split": "eval",
                     "states": "residual stream after each layer (the last one after the final norm)",
                     "interval": "95% Student-t over blocks", "null": "recovery 0 = biases change nothing"}}


# --- category_probes -------------------------------------------------------------------------------------

def check_probes(options, context):
    from spon_toolkit.analysis.prompts import load_prompts

    for key, low in (("per_category", 2), ("folds", 2), ("n_shuffles", 0), ("max_tokens_per_prompt", 1),
                     ("n_resamples", 100), ("probe_layers", 1)):
        _int(options, key, low)
    files = options.get("files")
    if files is not None and (not isinstance(files, list) or not files):
        raise ConfigError(f"option 'files' must be a non-empty list of prompt files, got {files!r}")
    cats = options.get("categories")
    if cats is not None and (not isinstance(cats, list) or not all(isinstance(c, str) for c in cats)):
        raise ConfigError(f"option 'categories' must be a list of category names, got {cats!r}")
    pairs = load_prompts(files, cats, options.get("per_category"))
    folds = options.get("folds", 5)
    n_min = min(sum(1 for c, _ in pairs if c == cat) for cat in {c for c, _ in pairs})
    if n_min < folds:
        raise ConfigError(f"a category has {n_min} prompts, fewer than folds={folds}; add prompts or lower 'folds'")
    layers = options.get("layers")
    n_layers = context.get("n_layers")
    if layers is not None:
        if not isinstance(layers, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
            raise ConfigError(f"option 'layers' must be a list of layer indices, got {layers!r}")
        if n_layers is not None and any(not 0 <= v < n_layers for v in layers):
            raise ConfigError(f"option 'layers' {layers} is outside 0..{n_layers - 1}")


def category_probes(run, files=None, categories=None, per_category: int | None = None, layers=None,
                    probe_layers: int = 4, folds: int = 5, n_shuffles: int = 2, max_tokens_per_prompt: int = 8,
                    n_resamples: int = 2000, seed: int = 0):
    """Per prompt category: representation shift and linear CKA (dense vs sparse / sparse+SPON) per layer,
    PPL and KL per category, linear probes of the category, and a permutation test of per-prompt KL recovery."""
    import numpy as np
    import torch

    from spon_toolkit.analysis.cka import linear_cka, shuffled_cka
    from spon_toolkit.analysis.probes import probe_accuracy
    from spon_toolkit.analysis.prompts import load_prompts
    from spon_toolkit.analysis.shift import kl_to_reference, recovery
    from spon_toolkit.analysis.stats import permutation_test
    from spon_toolkit.sparse import SparseModel

    pairs = load_prompts(files, categories, per_category)
    sitemap = _sitemap(run)
    n_layers = sitemap.n_layers
    if layers is None:
        layers = sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, min(probe_layers, n_layers))})
    modes = ("dense", "sparse", "spon")
    reps = {m: [[] for _ in range(n_layers)] for m in modes}  # per layer: list of [tokens, d] arrays
    per_prompt = []
    sm = SparseModel(run.model, run.sparsifier, list(run.plan.sparse_sites) if run.sparsifier else [],
                     biases=run.biases, sitemap=sitemap)
    from tqdm.auto import tqdm

    try:
        with torch.no_grad():
            for cat, text in tqdm(pairs, desc="category prompts", disable=None, leave=False):
                ids = torch.tensor([run.tokenizer(text, add_special_tokens=False)["input_ids"]])
                if ids.shape[1] < 2:
                    continue
                res = {m: _states(run, sm, ids, m) for m in modes}
                for m in modes:
                    for i in range(n_layers):
                        reps[m][i].append(res[m][0][i + 1][0].float().numpy())
                targets = ids[0, 1:]
                nll = {m: float(torch.nn.functional.cross_entropy(res[m][1][0, :-1].float(), targets,
                                                                  reduction="sum")) for m in modes}
                kl_s = float(kl_to_reference(res["sparse"][1][0], res["dense"][1][0]).mean())
                kl_p = float(kl_to_reference(res["spon"][1][0], res["dense"][1][0]).mean())
                per_prompt.append({"category": cat, "tokens": int(ids.shape[1]), "n_pred": int(targets.numel()),
                                   **{f"nll_{m}": v for m, v in nll.items()}, "kl_sparse": kl_s, "kl_spon": kl_p,
                                   "kl_recovery": recovery(kl_s, kl_p)})
    finally:
        sm.detach()
    cats = list(dict.fromkeys(p["category"] for p in per_prompt))
    labels = np.array([p["category"] for p in per_prompt])
    per_category = {}
    for c in cats:
        idx = np.where(labels == c)[0]
        rows = [per_prompt[i] for i in idx]
        n_pred = sum(r["n_pred"] for r in rows)
        ppl = {m: float(np.exp(sum(r[f"nll_{m}"] for r in rows) / n_pred)) for m in modes}
        layer_rows = []
        for i in range(n_layers):
            d = np.concatenate([reps["dense"][i][j] for j in idx])
            row = {"layer": i}
            for m in ("sparse", "spon"):
                x = np.concatenate([reps[m][i][j] for j in idx])
                row[f"l2_shift_{m}"] = float(np.mean(np.linalg.norm(x - d, axis=1) / np.linalg.norm(d, axis=1)))
                row[f"cka_{m}"] = linear_cka(d, x)
            row["cka_null"] = shuffled_cka(d, np.concatenate([reps["sparse"][i][j] for j in idx]), seed)
            layer_rows.append(row)
        per_category[c] = {"n_prompts": len(rows), "n_tokens": int(sum(r["tokens"] for r in rows)),
                           **{f"ppl_{m}": v for m, v in ppl.items()},
                           "kl_sparse": float(np.mean([r["kl_sparse"] for r in rows])),
                           "kl_spon": float(np.mean([r["kl_spon"] for r in rows])),
                           "min_cka_sparse": float(min(r["cka_sparse"] for r in layer_rows)),
                           "min_cka_spon": float(min(r["cka_spon"] for r in layer_rows)), "layers": layer_rows}
    # probes: token-level, at most max_tokens_per_prompt tokens per prompt, grouped by prompt in the folds
    rng = np.random.default_rng(seed)
    keep = [np.sort(rng.choice(len(reps["dense"][0][j]), min(max_tokens_per_prompt, len(reps["dense"][0][j])),
                               replace=False)) for j in range(len(per_prompt))]
    groups = np.concatenate([np.full(len(k), j) for j, k in enumerate(keep)])
    y = np.concatenate([np.full(len(k), per_prompt[j]["category"]) for j, k in enumerate(keep)])
    probes = []
    for i in tqdm(layers, desc="probes", disable=None, leave=False):
        row = {"layer": int(i)}
        for m in modes:
            x = np.concatenate([reps[m][i][j][k] for j, k in enumerate(keep)])
            row[m] = probe_accuracy(x, y, groups, folds=folds, n_shuffles=n_shuffles, seed=seed)
        probes.append(row)
    test = permutation_test([p["kl_recovery"] for p in per_prompt], labels, n_resamples, seed)
    return {"categories": per_category, "probes": probes, "kl_recovery_test": test,
            "per_prompt": per_prompt,
            "protocol": {"prompts": len(per_prompt), "categories": cats, "files": files or "builtin",
                         "representations": "residual stream after each layer, every token of each prompt",
                         "cka": "linear CKA, tokens of a category as rows; null: rows of one side shuffled",
                         "probe": f"standardised logistic regression, {folds}-fold stratified group CV by prompt, "
                                  f"<= {max_tokens_per_prompt} tokens per prompt; null: labels shuffled across "
                                  f"prompts ({n_shuffles}x)", "probe_layers": [int(v) for v in layers],
                         "test": "permutation test (ANOVA F) on per-prompt KL recovery 1 - KL_spon / KL_sparse"}}


# --- cross_config (sweep) ---------------------------------------------------------------------------------

def check_cross(options, context):
    _int(options, "init_blocks", 0)


def cross_config(sweep, init_blocks: int = 16):
    """Cosine and relative L2 difference of biases on shared sites for every pair of items at the same sparsity.
    Pairs of the same config with another seed give the noise floor each cross-config pair is read against.
    With ``init_blocks`` > 0 the same is done for the learned updates ``beta - beta0`` (``beta0`` the closed-form
    initialisation, identical for every config at a site), which the initialisation cannot make similar."""
    import itertools

    import numpy as np
    import torch

    from spon_toolkit.analysis.stats import cosine

    betas, inits = {}, {}
    for e in sweep.entries:
        with torch.no_grad():
            b = e.checkpoint.biases(sweep.model)
            betas[e.id] = {s: b.beta(s).detach().float().cpu().numpy() for s in b.sites}
        if init_blocks and sweep.calibration is not None and e.checkpoint.metadata.get("sparsifier"):
            key = str(e.sparsity)
            need = [s for s in betas[e.id] if s not in inits.get(key, {})]
            if need:
                sp = e.checkpoint.sparsifier(sweep.toolkit)
                calib = _batches(sweep.calibration.head(min(init_blocks, len(sweep.calibration))))
                got = closed_form_betas(sweep.model, sp, need, calib, sweep.sitemap, e.checkpoint.parametrisation)
                inits.setdefault(key, {}).update({s: v.numpy() for s, v in got.items()})
    pairs = []
    for a, b in itertools.combinations(sweep.entries, 2):
        if str(a.sparsity) != str(b.sparsity):
            continue
        shared = [s for s in betas[a.id] if s in betas[b.id]]
        if not shared:
            continue
        init = inits.get(str(a.sparsity), {})
        per_site = {}
        for s in shared:
            x, y = betas[a.id][s], betas[b.id][s]
            row = {"cos": cosine(x, y), "rel_l2_diff": float(np.linalg.norm(x - y) /
                                                            (0.5 * (np.linalg.norm(x) + np.linalg.norm(y))))}
            if s in init:
                row["cos_update"] = cosine(x - init[s], y - init[s])
            per_site[s] = row
        pairs.append({"a": a.id, "b": b.id, "config_a": a.config, "config_b": b.config, "seed_a": a.seed,
                      "seed_b": b.seed, "sparsity": a.sparsity,
                      "kind": "seed" if a.config == b.config else "config", "n_shared_sites": len(shared),
                      "mean_cos": float(np.mean([r["cos"] for r in per_site.values()])),
                      "mean_rel_l2_diff": float(np.mean([r["rel_l2_diff"] for r in per_site.values()])),
                      "mean_cos_update": float(np.mean([r["cos_update"] for r in per_site.values()]))
                      if all("cos_update" in r for r in per_site.values()) else None,
                      "sites": per_site})
    # noise floor per (config, sparsity, site): same config, other seeds
    floor: dict[tuple, dict[str, list]] = {}
    for p in pairs:
        if p["kind"] == "seed":
            for s, r in p["sites"].items():
                f = floor.setdefault((p["config_a"], str(p["sparsity"]), s), {"cos": [], "cos_update": []})
                f["cos"].append(r["cos"])
                if "cos_update" in r:
                    f["cos_update"].append(r["cos_update"])
    for p in pairs:
        if p["kind"] != "config":
            continue
        for metric in ("cos", "cos_update"):
            floors, below = [], []
            for s, r in p["sites"].items():
                vals = [v for c in (p["config_a"], p["config_b"])
                        for v in floor.get((c, str(p["sparsity"]), s), {}).get(metric, [])]
                if vals and metric in r:
                    floors.append(float(np.mean(vals)))
                    below.append(r[metric] < np.mean(vals))
            p[f"noise_floor_{metric}"] = float(np.mean(floors)) if floors else None
            p[f"fraction_sites_below_floor_{metric}"] = float(np.mean(below)) if below else None
    return {"pairs": pairs, "protocol": {
        "cos": "cosine of the output-space biases on each shared site, averaged over sites",
        "rel_l2_diff": "||a - b|| / mean(||a||, ||b||)",
        "cos_update": "cosine of beta - beta0 (closed-form init on the calibration blocks)" if inits else None,
        "noise_floor": "mean over shared sites of the same-config other-seed similarity of both configs; "
                       "None when no config of the pair has two seeds"}}


@hookimpl
def spon_register_analyzers(register):
    register("pca_alignment", pca_alignment, "bias |cos| with the top-k activation principal components, with "
             "the random-direction null and the variance ratio", check=check_pca)
    register("bias_statistics", bias_statistics, "norm, moments, excess kurtosis and distance from the closed-form "
             "initialisation per biased site", check=check_bias_statistics)
    register("hidden_state_shift", hidden_state_shift, "per-layer distance of sparse and sparse+SPON hidden states "
             "from dense, recovery, KL and top-1 agreement at the output", check=check_shift)
    register("category_probes", category_probes, "per prompt category: shift, CKA, PPL/KL, linear probes and a "
             "permutation test", check=check_probes)
    register("cross_config", cross_config, "bias similarity across configs on shared sites against the other-seed "
             "noise floor", scope="sweep", check=check_cross)
