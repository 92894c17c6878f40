"""Downstream evaluation through lm-evaluation-harness, on the in-memory model with its hooks attached.

lm-eval's own Hugging Face model class (``lm_eval.models.huggingface.HFLM``) accepts a model *instance*;
the toolkit hands it the loaded model while a :class:`spon_toolkit.sparse.SparseModel` has put its
sparsifier pre-hooks and SPON bias hooks on that same instance. Every forward lm-eval makes therefore runs
sparse (or sparse+SPON), and every lm-eval task -- loglikelihood, rolling loglikelihood, multiple choice,
generation -- runs unchanged: request building, batching, scoring and metrics are lm-eval's.

- :func:`task_manager` builds lm-eval's ``TaskManager`` with the toolkit's offline tasks on its include path
  (``sotu_ppl``, ``sotu_continuation``; see :mod:`spon_toolkit.lmeval_data`), so ``--tasks`` finds them by
  name next to lm-eval's own (hellaswag, arc_easy, ... which need the hub for their data).
- :func:`run_condition` runs ``lm_eval.simple_evaluate`` on one model state.
- :func:`compare` turns the per-condition results into one table (task, metric, dense, sparse,
  sparse+SPON, stderr) and paired differences between conditions (same documents, so paired).
- :func:`loglikelihood_agreement` checks that lm-eval's loglikelihoods equal the toolkit's
  :func:`spon_toolkit.evaluate.evaluate_perplexity` on the same token windows.

Standard errors: lm-eval reports them for ``acc``/``acc_norm`` (standard error of the mean over documents);
for ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte`` it reports none (its weighted
aggregations are not bootstrapped), so the toolkit computes a delta-method standard error over documents
from lm-eval's per-document ``(loglikelihood, words or bytes)`` pairs and says so (``stderr_source``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, SponError, suggest

TASKS_DIR = Path(__file__).parent / "lmeval_tasks"
#: tasks shipped with the toolkit (their data is generated offline from the sotu package)
OFFLINE_TASKS = ("sotu_ppl", "sotu_continuation")
CONDITIONS = ("dense", "sparse", "sparse+SPON")
#: lm-eval metrics that are ratios sum(loglikelihood) / sum(units): stderr by the delta method
RATIO_METRICS = {"word_perplexity", "byte_perplexity", "bits_per_byte"}
#: lm-eval's bootstrap setting: its closed-form stderr of means (acc) needs it > 0; the toolkit's tasks
#: use no bootstrapped metric, lm-eval tasks with one (bleu, median ...) get this many resamples
BOOTSTRAP_ITERS = 1000
INSTALL_HINT = "pip install 'spon-toolkit[lmeval]' (or pip install lm-eval)"


def require_lm_eval():
    """Import lm-eval or fail with one line saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise SponError(f"downstream evaluation needs lm-evaluation-harness, which is not installed; {INSTALL_HINT}") from None
    return lm_eval


def lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


@contextlib.contextmanager
def quiet_lm_eval(verbose: bool = False) -> Iterator[None]:
    """lm-eval logs every step at INFO/WARNING; keep its loggers at ERROR unless ``verbose``."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    if not verbose:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# --- tasks -------------------------------------------------------------------------------------------

def parse_tasks(text: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t and t.strip()]
    if not names:
        raise ConfigError("--tasks is empty; give task names such as sotu_ppl,sotu_continuation")
    if len(set(names)) != len(names):
        raise ConfigError(f"--tasks names a task twice ({','.join(names)}); list each task once")
    return names


def task_manager(tasks: Sequence[str] = OFFLINE_TASKS):
    """lm-eval's ``TaskManager`` with the toolkit's task directory on its include path.

    lm-eval's own task index (about 15,000 names, ~5 s to build) is included only when a requested task
    is not one of the toolkit's; an unknown name is a one-line error listing the closest known names.
    """
    require_lm_eval()
    tm = _manager(False)
    if all(t in tm.all_tasks for t in tasks):
        return tm
    tm = _manager(True)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        import difflib

        name = missing[0]
        close = difflib.get_close_matches(name, tm.all_tasks, n=5, cutoff=0.6)
        listing = f" Close names: {', '.join(close)}." if close else ""
        raise ConfigError(
            f"unknown lm-eval task '{name}'.{listing} The toolkit's offline tasks: {', '.join(OFFLINE_TASKS)}; "
            f"`python -m lm_eval ls tasks` lists lm-eval's {len(tm.all_tasks)} names")
    return tm


@functools.lru_cache(maxsize=2)
def _manager(include_defaults: bool):
    """One ``TaskManager`` per process and setting (indexing lm-eval's own tasks takes seconds)."""
    from lm_eval.tasks import TaskManager

    with quiet_lm_eval():
        return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


def preflight(tm, tasks: Sequence[str], num_fewshot: int | None = None) -> dict[str, Any]:
    """Build every task once (loading or generating its data) before any model work, so a task whose data
    cannot be had here (a hub dataset offline) fails in seconds with one line. Returns data protocols."""
    out: dict[str, Any] = {}
    for name in tasks:
        try:
            with quiet_lm_eval():
                if hasattr(tm, "load"):  # lm-eval >= 0.4.10: flat {"tasks": {name: Task}}
                    leaves = dict(tm.load([name])["tasks"])
                else:
                    from lm_eval.tasks import get_task_dict

                    leaves = dict(_leaf_tasks(get_task_dict([name], tm)))
        except Exception as exc:  # datasets/network errors of hub tasks, broken YAML
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise SponError(
                f"lm-eval task '{name}' cannot be built here ({type(exc).__name__}: {first}); tasks other than "
                f"{', '.join(OFFLINE_TASKS)} need their dataset from the Hugging Face hub or its local cache") from None
        if num_fewshot:
            for tname, task in leaves.items():
                if task.OUTPUT_TYPE == "loglikelihood_rolling":
                    raise ConfigError(f"task '{tname}' is a rolling-loglikelihood (perplexity) task; it takes no "
                                      f"few-shot examples: use --num-fewshot 0 or run it separately")
        if name in OFFLINE_TASKS:
            from .lmeval_data import protocol

            out[name] = protocol(name)
        else:
            out[name] = {"source": "lm-eval", "subtasks": sorted(leaves)}
    return out


def _leaf_tasks(tree: Mapping[Any, Any]) -> Iterator[tuple[str, Any]]:
    """``(name, Task)`` of every leaf of lm-eval's (possibly nested, group-keyed) task dict."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaf_tasks(value)
        else:
            yield getattr(key, "group_name", None) or getattr(value, "task_name", None) or str(key), value


def check_limit(limit: float | int | None) -> float | int | None:
    """lm-eval's ``limit``: a number of documents per task (>= 1) or a fraction in (0, 1)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
        shown = f"{limit:g}" if isinstance(limit, (int, float)) and not isinstance(limit, bool) else repr(limit)
        raise ConfigError(f"--limit must be a number of documents >= 1 or a fraction in (0, 1), got {shown}")
    if limit >= 1:
        if float(limit) != int(limit):
            raise ConfigError(f"--limit {limit}: give a whole number of documents or a fraction below 1")
        return int(limit)
    return float(limit)


# --- the model ---------------------------------------------------------------------------------------

def make_lm(model, tokenizer, *, batch_size: int = 8, max_length: int | None = None,
            prefix_token_id: int | None = None):
    """lm-eval's ``HFLM`` around the model instance (hooks attached to ``model`` stay active).

    The tokenizer is copied, because lm-eval sets a padding token on the tokenizer it is given.
    ``prefix_token_id`` is the token lm-eval puts before a document to predict its first token (default:
    the tokenizer's BOS, else EOS); a tokenizer with neither needs it.
    """
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    tok = copy.deepcopy(tokenizer)
    if prefix_token_id is None and tok.bos_token_id is None and tok.eos_token_id is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token, which lm-eval puts before each "
                          "document; pass --prefix-token-id ID")
    with quiet_lm_eval():
        return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_length,
                    prefix_token_id=prefix_token_id)


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    """``simple_evaluate`` seeds python, numpy and torch globally; give the caller its RNG state back."""
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def run_condition(lm, tasks: Sequence[str], tm, *, limit: float | int | None = None,
                  num_fewshot: int | None = None, verbose: bool = False) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on the model's current state (dense, sparse, sparse+SPON)."""
    lm_eval = require_lm_eval()
    with quiet_lm_eval(verbose), _rng_untouched():
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=True,
                                      bootstrap_iters=BOOTSTRAP_ITERS)
    if out is None:  # only on non-zero ranks of a distributed run
        raise SponError("lm-eval returned no results (a distributed run on a non-zero rank?)")
    return out


def conditions(model, *, sparsifier=None, sparse_sites: Sequence[str] = (), biases=None, sitemap=None,
               spon_model=None) -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
    """Context managers that put ``model`` in each state: ``dense`` (no hooks), ``sparse`` (the sparsifier,
    no biases), ``sparse+SPON`` (sparsifier and biases). ``spon_model`` (an already sparse+SPON model,
    e.g. a loaded export) replaces the last one."""
    from .sparse import SparseModel

    @contextlib.contextmanager
    def state(with_sparsifier: bool, with_biases: bool):
        if not with_sparsifier and not with_biases:
            yield model  # dense: no hooks at all
            return
        sm = SparseModel(model, sparsifier if with_sparsifier else None, sparse_sites if with_sparsifier else (),
                         biases=biases if with_biases else None, sitemap=sitemap)
        try:
            yield model
        finally:
            sm.detach()

    out: dict[str, Callable] = {"dense": lambda: state(False, False)}
    if sparsifier is not None:
        out["sparse"] = lambda: state(True, False)
    if spon_model is not None:
        out["sparse+SPON"] = lambda: contextlib.nullcontext(spon_model)
    elif biases is not None:
        out["sparse+SPON"] = lambda: state(True, True)
    return out


# --- results -----------------------------------------------------------------------------------------

def _metric_keys(task_results: Mapping[str, Any]) -> list[tuple[str, str]]:
    keys = []
    for key, value in task_results.items():
        if "," not in key or "_stderr" in key.split(",")[0] or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        keys.append((metric, filt))
    return keys


def _ratio(samples: Sequence[Mapping[str, Any]], metric: str) -> tuple[list[float], list[float]]:
    ll = [float(s[metric][0]) for s in samples]
    units = [float(s[metric][1]) for s in samples]
    return ll, units


def ratio_value_and_stderr(ll: Sequence[float], units: Sequence[float], metric: str) -> tuple[float, float | None]:
    """Value of a ratio metric and its delta-method standard error over documents.

    ``r = -sum(ll) / sum(units)`` (nats per word or byte); ``se(r) = sqrt(n/(n-1) * sum((-ll_i - r u_i)^2))
    / sum(u)``. bits_per_byte = r / ln 2; word/byte perplexity = exp(r), se = exp(r) * se(r).
    """
    n = len(ll)
    total = sum(units)
    r = -math.fsum(ll) / total
    se = None
    if n > 1:
        se = math.sqrt(n / (n - 1) * math.fsum((-a - r * u) ** 2 for a, u in zip(ll, units, strict=True))) / total
    if metric == "bits_per_byte":
        return r / math.log(2), None if se is None else se / math.log(2)
    return math.exp(r), None if se is None else math.exp(r) * se


def task_rows(out: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """``(task, metric) -> {value, stderr, stderr_source, n}`` of one ``simple_evaluate`` output."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    samples = out.get("samples", {})
    for task, res in out["results"].items():
        n = (out.get("n-samples", {}).get(task) or {}).get("effective")
        for metric, filt in _metric_keys(res):
            value = float(res[f"{metric},{filt}"])
            stderr = res.get(f"{metric}_stderr,{filt}")
            source = "lm-eval"
            if metric in RATIO_METRICS and task in samples:
                ll, units = _ratio(samples[task], metric)
                value_check, stderr = ratio_value_and_stderr(ll, units, metric)
                if not math.isclose(value_check, value, rel_tol=1e-6):
                    raise SponError(f"{task} {metric}: per-document recomputation {value_check} differs from "
                                    f"lm-eval's {value}")
                source = "delta method over documents"
            elif not isinstance(stderr, (int, float)):
                stderr, source = None, "none"
            label = metric if filt == "none" else f"{metric},{filt}"
            rows[(task, label)] = {"value": value, "stderr": None if stderr is None else float(stderr),
                                   "stderr_source": source, "n": n}
    return rows


def _per_doc(out: Mapping[str, Any], task: str, metric: str) -> dict[int, Any]:
    return {int(s["doc_id"]): s[metric] for s in out.get("samples", {}).get(task, []) if metric in s}


def paired_difference(a: Mapping[str, Any], b: Mapping[str, Any], task: str, metric: str) -> dict[str, Any] | None:
    """``b - a`` on the documents both conditions scored, with its paired standard error.

    Mean metrics (acc): mean of per-document differences, se = sd / sqrt(n). Ratio metrics: the difference
    of the ratios (same denominators), se by the delta method on per-document loglikelihood differences.
    """
    da, db = _per_doc(a, task, metric), _per_doc(b, task, metric)
    ids = sorted(set(da) & set(db))
    n = len(ids)
    if n == 0:
        return None
    if metric in RATIO_METRICS:
        d = [float(db[i][0]) - float(da[i][0]) for i in ids]  # loglikelihood differences
        units = [float(da[i][1]) for i in ids]
        total = sum(units)
        r = -math.fsum(d) / total
        se = math.sqrt(n / (n - 1) * math.fsum((-x - r * u) ** 2 for x, u in zip(d, units, strict=True))) / total \
            if n > 1 else None
        if metric == "bits_per_byte":
            diff, se = r / math.log(2), None if se is None else se / math.log(2)
        else:  # report the change of log perplexity (nats per unit): additive, with a clean stderr
            diff = r
        return {"diff": diff, "stderr": se, "n": n, "scale": "bits per byte" if metric == "bits_per_byte"
                else f"log {metric} (nats per {'word' if metric.startswith('word') else 'byte'})"}
    d = [float(db[i]) - float(da[i]) for i in ids]
    mean = math.fsum(d) / n
    se = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else None
    return {"diff": mean, "stderr": se, "n": n, "scale": metric}


def compare(outputs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One row per (task, metric) with each condition's value and stderr, plus paired differences."""
    per = {cond: task_rows(out) for cond, out in outputs.items()}
    keys: list[tuple[str, str]] = []
    for rows in per.values():
        keys += [k for k in rows if k not in keys]
    table = []
    for task, metric in keys:
        row: dict[str, Any] = {"task": task, "metric": metric}
        for cond in CONDITIONS:
            r = per.get(cond, {}).get((task, metric))
            row[cond] = None if r is None else r["value"]
            row[f"{cond}_stderr"] = None if r is None else r["stderr"]
            if r is not None:
                row["n"], row["stderr_source"] = r["n"], r["stderr_source"]
        table.append(row)
    pairs = [("dense", "sparse"), ("sparse", "sparse+SPON"), ("dense", "sparse+SPON")]
    paired = []
    for task, metric in keys:
        base = metric.split(",")[0]
        if base not in ("acc", "acc_norm", "bits_per_byte"):
            continue
        for a, b in pairs:
            if a in outputs and b in outputs:
                diff = paired_difference(outputs[a], outputs[b], task, base)
                if diff is not None:
                    paired.append({"task": task, "metric": metric, "comparison": f"{b} - {a}", **diff})
    return {"table": table, "paired": paired}


def format_table(table: Sequence[Mapping[str, Any]], paired: Sequence[Mapping[str, Any]] = ()) -> str:
    """The table as text: task, metric, dense, sparse, sparse+SPON, stderr (of each, in that order)."""
    def num(v: Any) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "-"
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"

    header = f"{'task':<20} {'metric':<16} {'dense':>10} {'sparse':>10} {'sparse+SPON':>12}  stderr (dense / sparse / SPON)"
    lines = [header, "-" * len(header)]
    for r in table:
        errs = " / ".join(num(r.get(f"{c}_stderr")) for c in CONDITIONS)
        lines.append(f"{r['task']:<20} {r['metric']:<16} {num(r.get('dense')):>10} {num(r.get('sparse')):>10} "
                     f"{num(r.get('sparse+SPON')):>12}  {errs}")
    if paired:
        lines.append("")
        lines.append("paired differences on the same documents (diff +- stderr):")
        for p in paired:
            lines.append(f"  {p['task']:<20} {p['metric']:<14} {p['comparison']:<22} {p['diff']:+.4f} +- "
                         f"{num(p['stderr'])}  (n={p['n']}, {p['scale']})")
    return "\n".join(lines)


def summarize_output(out: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-friendly part of a ``simple_evaluate`` output (no per-document samples)."""
    return {key: out.get(key) for key in ("results", "n-samples", "n-shot", "versions", "higher_is_better")
            if key in out}


# --- experiments (`downstream:` in a spec) -----------------------------------------------------------

def downstream_for_item(runner, item, sparsifier, plan, biases) -> dict[str, Any]:
    """The downstream table of one experiment item, sharing lm-eval runs with the other items.

    Dense runs once per experiment, TEAL once per (sparsity, sparsified sites), SPON per item; an item
    without biases (BASELINE-TEAL) reuses its TEAL run. Stored in the item's record under ``downstream``.
    """
    spec = runner.experiment.spec.downstream
    cache = runner._downstream
    if "tm" not in cache:
        cache["tm"] = task_manager(spec.tasks)
        cache["data"] = preflight(cache["tm"], spec.tasks, spec.num_fewshot)
        cache["lm"] = make_lm(runner._model, runner._tokenizer, batch_size=spec.batch_size,
                              prefix_token_id=spec.prefix_token_id)
    limit = check_limit(spec.limit)
    states = conditions(runner._model, sparsifier=sparsifier, sparse_sites=list(plan.sparse_sites), biases=biases,
                        sitemap=runner._sitemap)

    def run(key, cond):
        if key not in cache:
            with states[cond]():
                cache[key] = run_condition(cache["lm"], spec.tasks, cache["tm"], limit=limit,
                                           num_fewshot=spec.num_fewshot)
        return cache[key]

    outputs = {"dense": run(("dense",), "dense"),
               "sparse": run(("sparse", item.sparsity, tuple(plan.sparse_sites)), "sparse")}
    outputs["sparse+SPON"] = run(("spon", item.id), "sparse+SPON") if biases is not None else outputs["sparse"]
    comparison = compare(outputs)
    first = outputs["dense"]
    return {"tasks": list(spec.tasks), "limit": limit, "num_fewshot": spec.num_fewshot,
            "n_samples": first.get("n-samples"), "n_shot": first.get("n-shot"), "versions": first.get("versions"),
            "lm_eval_version": lm_eval_version(), "data": cache["data"], **comparison}


# --- agreement with evaluate_perplexity -------------------------------------------------------------

def loglikelihood_agreement(lm, ids, reference_sums: Sequence[float]) -> dict[str, Any]:
    """lm-eval's loglikelihoods of the same token windows as :func:`evaluate_perplexity`'s blocks.

    For each block ``t_1..t_T`` lm-eval scores the continuation ``t_2..t_T`` given the context ``t_1`` with
    its own batching and scoring (``HFLM._loglikelihood_tokens``, which every loglikelihood task goes
    through); the token ids are given, so both sides see exactly the same windows. ``reference_sums`` are
    the toolkit's summed NLLs per block. Returns the largest absolute and relative differences.
    """
    rows = [list(map(int, row)) for row in ids.tolist()]
    requests = [(("", ""), row[:1], row[1:]) for row in rows]
    with quiet_lm_eval():
        out = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    lm_sums = [-float(ll) for ll, _ in out]
    diffs = [abs(a - b) for a, b in zip(lm_sums, reference_sums, strict=True)]
    rel = [d / abs(b) if b else d for d, b in zip(diffs, reference_sums, strict=True)]
    return {"blocks": len(rows), "block_size": len(rows[0]) if rows else 0,
            "lm_eval_nll": math.fsum(lm_sums), "toolkit_nll": math.fsum(reference_sums),
            "max_abs_diff": max(diffs) if diffs else 0.0, "max_rel_diff": max(rel) if rel else 0.0,
            "per_block_lm_eval": lm_sums}


__all__ = ["OFFLINE_TASKS", "CONDITIONS", "TASKS_DIR", "task_manager", "preflight", "make_lm", "run_condition",
           "conditions", "compare", "format_table", "loglikelihood_agreement", "check_limit", "parse_tasks",
           "require_lm_eval", "suggest"]
