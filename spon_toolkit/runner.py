"""Running experiment items: load -> calibrate -> allocate -> train -> evaluate -> analyze.

One :class:`ExperimentRunner` serves all items of one experiment file, so what items have in common is
computed once: the model and the token blocks are loaded once, the dense perplexity once, the sparsifier
calibration once per sparsity, the TEAL perplexity (sparsified, no biases) once per (sparsity, sparsified
sites) and layer-importance scores once per (sparsity, method). Each item then allocates its biased
sites, trains them (seeded with the item's seed), evaluates, runs the analyzers, checks the expectations
that belong to it and records itself in the results directory (see :mod:`spon_toolkit.results`).

A failure inside a stage becomes a :class:`StageError` that names the item and the stage; an expectation
that does not hold is an :class:`ExpectationFailed`. ``spon run`` and the pytest plugin both go through
:meth:`ExperimentRunner.run_item`, so they run the same code.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .contracts import build_sparsifier, build_trainer, run_analyzer, run_trainer
from .errors import ConfigError, SponError
from .expdata import ExperimentData, data_sample_seeds, load_experiment_data, seeded_data
from .experiment import Experiment, Item, keyword_matcher, load_experiment
from .results import ExperimentManager

STAGES = ("load", "calibrate", "allocate", "train", "evaluate", "analyze", "expectations")


class StageError(SponError):
    """A stage of an item failed; ``stage`` is one of :data:`STAGES`."""

    def __init__(self, item_id: str, stage: str, cause: BaseException | str):
        self.item_id, self.stage, self.cause = item_id, stage, cause
        text = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        if isinstance(cause, SponError):
            text = str(cause)
        super().__init__(f"{item_id}: stage '{stage}' failed: {text}")


class ItemClaimed(SponError):
    """Another process of the same run directory is computing the item (see ``run_item(wait=False)``)."""

    def __init__(self, item_id: str):
        self.item_id = item_id
        super().__init__(f"{item_id}: being computed by another process of this run directory")


class ExpectationFailed(StageError):
    """An expectation of the spec did not hold (the item's numbers are still recorded)."""

    def __init__(self, item_id: str, failures: list[str]):
        self.failures = failures
        self.outcome: ItemOutcome | None = None
        super().__init__(item_id, "expectations", "; ".join(failures))


@dataclass
class ItemOutcome:
    """What running (or resuming) one item gave."""

    item: Item
    record: dict[str, Any]
    reused: bool = False
    checks: list[tuple[bool, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(ok for ok, _ in self.checks)


def item_slug(item: Item) -> str:
    """A file-name-safe form of the item's name: ``TOP-50_s0.5_seed0``."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{item.config}_s{item.sparsity:g}_seed{item.seed}")


@dataclass
class EvalResult:
    """Perplexity of one model state with its per-block NLLs and the protocol."""

    ppl: float
    block_nll: list[float]
    protocol: dict[str, Any]
    achieved_sparsity: float | None = None


class ExperimentRunner:
    """Runs the items of one experiment, sharing the model, data, calibration and baselines between them.

    ``output_dir``: where ``<experiment>/...`` results go. ``resume``: continue the latest run of the same
    spec and skip its finished items. ``progress``: tqdm bars of the stages (``None``: only on a terminal).
    """

    def __init__(self, experiment: Experiment, *, toolkit, output_dir: str | Path = "results",
                 resume: bool = True, progress: bool | None = None, run_name: str | None = None,
                 run_tag: str | None = None):
        self.experiment = experiment
        self.toolkit = toolkit
        self.progress = progress
        self.manager = ExperimentManager(output_dir, experiment.name)
        self.resume = resume
        self.run_name = run_name  # join this run directory (cooperating workers of one sweep)
        self.run_tag = run_tag  # workers of one session share the run carrying this tag
        self.compute_missing = True  # expectations run the items they compare with (False: a Ray driver)
        self.share_teacher = True  # False: each item computes its own teacher targets (as before)
        self.started = False
        self._model = self._tokenizer = self._data = None
        self._sitemap = None
        self._dense: EvalResult | None = None
        self._sparsifiers: dict[tuple, Any] = {}
        self._seeded: dict[tuple[int, int], ExperimentData] = {}  # per-seed samples (seed scope 'data')
        self._calibration: dict[tuple, Any] = {}  # collected calibration statistics, shared by sparsity levels
        self._teal: dict[tuple, EvalResult] = {}
        self._importance: dict[tuple, Any] = {}
        self._overrides = None
        self._records: dict[str, dict[str, Any]] = {}
        self.teacher = None  # SharedTeacher: the dense teacher's targets, computed once for all items
        self._downstream: dict[Any, Any] = {}  # lm-eval outputs shared by items (see lmeval.downstream_for_item)
        self.timings: dict[str, float] = {}

    @classmethod
    def from_path(cls, path: str | Path, *, toolkit, **kwargs: Any) -> ExperimentRunner:
        return cls(load_experiment(path, toolkit), toolkit=toolkit, **kwargs)

    # --- bookkeeping -------------------------------------------------------------------------------
    def start(self) -> None:
        """Open (or resume) the run directory; idempotent."""
        if self.started:
            return
        exp = self.experiment
        self.manager.start_run(
            exp.spec_hash, {"spec_file": str(exp.path), "spec": exp.spec.model_dump(mode="json")},
            [it.id for it in exp.items()], resume=self.resume,
            metadata={"spec_file": str(exp.path), "spec_hash": exp.spec_hash, "description": exp.spec.description},
            run_name=self.run_name, run_tag=self.run_tag,
        )
        self._records = self.manager.finished()
        self.started = True

    def is_finished(self, item: Item) -> bool:
        self.start()
        rec = self._records.get(item.id)
        if rec is None and self.manager.is_finished(item.id):  # finished by another writer of the run
            rec = self._records[item.id] = self.manager.finished()[item.id]
        return rec is not None and rec.get("item_hash") == item.item_hash

    @contextlib.contextmanager
    def _stage(self, item_id: str, stage: str, timings: dict[str, float]) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        except StageError:
            raise
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            raise StageError(item_id, stage, exc) from exc
        finally:
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0

    # --- shared, computed once ---------------------------------------------------------------------
    def prepare(self) -> None:
        """Load the model and the token blocks, before any run directory is written.

        A failure here concerns every item, so it is raised once as a one-line :class:`SponError`
        naming the spec instead of being recorded per item."""
        from .errors import SponError

        try:
            self._load()
        except SponError as exc:
            message = str(exc)
            raise type(exc)(message if message.startswith(str(self.experiment.path)) else
                            f"{self.experiment.path}: {message}") from exc
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:
            raise SponError(f"{self.experiment.path}: the model or its data could not be loaded: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc

    def _load(self) -> None:
        if self._model is not None:
            return
        from .models import load_model
        from .sites import SiteMap

        spec = self.experiment.spec
        name = spec.model.loader if spec.model.path is None else f"{spec.model.loader}:{spec.model.path}"
        model, tokenizer = load_model(name, dtype=spec.model.dtype, toolkit=self.toolkit, **spec.model.options)
        sitemap = SiteMap(model, self.toolkit.architectures)
        if sitemap.n_layers == 0:
            raise ConfigError("the model has no decoder layers, so there is nothing to sparsify")
        if not sitemap.resolve(spec.sites):
            raise ConfigError(f"key 'sites': {spec.sites!r} selects no site of this model")
        from .models import context_length

        self._data = load_experiment_data(self.experiment, tokenizer, context_length(model))
        self._model, self._tokenizer, self._sitemap = model, tokenizer, sitemap

    def _item_data(self, item: Item) -> ExperimentData:
        """The item's blocks: its own calibration and training samples under seed scope ``data``."""
        seeds = data_sample_seeds(item.seed, self.experiment.spec.seed_scope)
        if seeds not in self._seeded:  # sampled once per seed, not once per call
            self._seeded[seeds] = seeded_data(self._data, self.experiment, item.seed)
        return self._seeded[seeds]

    def _batches(self, blocks) -> list:
        """Token blocks [N, T] as batches of ``data.batch_size`` rows."""
        return list(blocks.batches(self.experiment.spec.data.batch_size))

    def _evaluate(self, sparsifier=None, sites: Sequence[str] = (), biases=None, desc: str = "") -> EvalResult:
        from .evaluate import evaluate_perplexity

        r = evaluate_perplexity(self._model, self._data.eval, sparsifier=sparsifier,
                                sites=None if sparsifier is None else list(sites),
                                biases=biases, batch_size=self.experiment.spec.data.batch_size,
                                progress=self.progress, sitemap=self._sitemap, desc=desc or None)
        return EvalResult(float(r.perplexity), [float(x) for x in r.block_nlls], dict(r.protocol),
                          r.achieved_sparsity)

    def dense(self) -> EvalResult:
        if self._dense is None:
            self._dense = self._evaluate(desc="dense")
        return self._dense

    def sparsifier(self, sparsity: float, data: ExperimentData | None = None):
        """The experiment's sparsifier at ``sparsity``, calibrated once on the calibration blocks."""
        data = data or self._data
        if (sparsity, data.calibration_key) not in self._sparsifiers:
            spec = self.experiment.spec
            sp = build_sparsifier(self.toolkit, spec.sparsifier.name, sparsity, spec.sparsifier.options)
            sites = self._sitemap.resolve(spec.sites)
            batches = self._batches(data.calibration)
            if all(callable(getattr(sp, m, None)) for m in ("calibration_key", "collect_calibration",
                                                            "fit_calibration")):
                # calibration statistics collected once, every sparsity level fitted from them
                key = (sp.calibration_key(), tuple(sites), data.calibration_key)
                if key not in self._calibration:
                    self._calibration[key] = sp.collect_calibration(self._model, sites, batches,
                                                                    sitemap=self._sitemap)
                sp.fit_calibration(self._calibration[key])
            else:
                sp.calibrate(self._model, sites, batches, sitemap=self._sitemap)
            self._sparsifiers[sparsity, data.calibration_key] = sp
        return self._sparsifiers[sparsity, data.calibration_key]

    def teal(self, sparsity: float, sparse_sites: Sequence[str], data: ExperimentData | None = None) -> EvalResult:
        """Perplexity with ``sparse_sites`` sparsified and no biases (the TEAL baseline of those sites)."""
        sp = self.sparsifier(sparsity, data)
        key = (sparsity, tuple(sparse_sites), (data or self._data).calibration_key if sp.needs_calibration else 0)
        if key not in self._teal:
            self._teal[key] = self._evaluate(sp, sparse_sites, desc=f"TEAL s={sparsity:g}")
        return self._teal[key]

    def importance(self, sparsity: float, method: str, data: ExperimentData | None = None) -> dict[str, float]:
        """Layer-importance scores of ``method`` (cached on disk by :func:`compute_importance` too)."""
        from .importance import compute_importance

        data = data or self._data
        key = (sparsity, method, data.calibration_key)
        if key not in self._importance:
            spec = self.experiment.spec
            result = compute_importance(method, self._model, self._batches(data.calibration),
                                        self.sparsifier(sparsity, data), spec.sites, toolkit=self.toolkit,
                                        **spec.importance.get(method, {}))
            self._importance[key] = result.scores
        return self._importance[key]

    # --- one item ----------------------------------------------------------------------------------
    def run_item(self, item: Item, *, check: bool = True, wait: bool = True) -> ItemOutcome:
        """Run ``item`` (or reuse its finished record) and check its expectations.

        The item is claimed first (an OS lock per item), so several processes on one run directory never
        compute it twice; when another process holds it, ``wait=True`` waits for it (then reuses its
        record, or computes the item if that process died) and ``wait=False`` raises :class:`ItemClaimed`.
        Raises :class:`StageError` when a stage fails and :class:`ExpectationFailed` when an expectation
        does not hold (after recording the item).
        """
        self.start()
        t0 = time.perf_counter()
        if self.is_finished(item):
            outcome = ItemOutcome(item, self._records[item.id], reused=True)
        else:
            claim = self.manager.claim(item.id, wait=wait)
            if claim is None:
                raise ItemClaimed(item.id)
            try:
                if self.is_finished(item):  # finished by the process that held the claim
                    outcome = ItemOutcome(item, self._records[item.id], reused=True)
                else:
                    try:
                        record, logs = self._compute(item)
                    except StageError as exc:
                        self.manager.record_failure(item.id, exc.stage, str(exc))
                        raise
                    self.manager.record(item.id, record, logs=logs)
                    self._records[item.id] = record
                    outcome = ItemOutcome(item, record)
            finally:
                claim.release()
        outcome.seconds = time.perf_counter() - t0
        if check and item.expectations:
            outcome.checks = self.check_expectations(item)
            failed = [msg for ok, msg in outcome.checks if not ok]
            if failed:
                exc = ExpectationFailed(item.id, failed)
                exc.outcome = outcome
                raise exc
        return outcome

    def _compute(self, item: Item) -> tuple[dict[str, Any], dict[str, Any]]:
        import torch

        from .allocation import AllocationContext, allocate
        from .sparse import SparseModel, SponBiases

        spec = self.experiment.spec
        timings: dict[str, float] = {}
        with self._stage(item.id, "load", timings):
            self._load()
        model, sitemap, data = self._model, self._sitemap, self._item_data(item)
        with self._stage(item.id, "calibrate", timings):
            sparsifier = self.sparsifier(item.sparsity, data)
        with self._stage(item.id, "allocate", timings):
            entry = self.toolkit.allocations.entry(item.allocation.name)
            importance = {m: self.importance(item.sparsity, m, data) for m in self._needs(entry, item)}
            ctx = AllocationContext.from_model(model, spec.sites, importance=importance, sitemap=sitemap)
            plan = allocate(self.toolkit, item.allocation.name, ctx, **self._allocation_options(item))
            self._check_analyzers(plan)  # before training: a bad option must not cost a training run
        with self._stage(item.id, "evaluate", timings):
            dense = self.dense()
            teal = self.teal(item.sparsity, plan.sparse_sites, data)

        train_info: dict[str, Any] = {}
        history: list[dict[str, float]] = []
        biases = None
        sm = None
        try:
            if plan.biased_sites and spec.checkpoints is not None:  # evaluate-only (see eval_only.py)
                from .eval_only import checkpoint_dir, load_item_biases

                with self._stage(item.id, "train", timings):
                    biases = SponBiases(model, list(plan.biased_sites), sitemap=sitemap)
                    train_info = load_item_biases(checkpoint_dir(self.experiment.path, spec.checkpoints),
                                                  item_slug(item), biases, model=model, sparsity=item.sparsity)
            if plan.biased_sites:
                with self._stage(item.id, "train", timings):
                    biases = biases or SponBiases(model, list(plan.biased_sites), sitemap=sitemap)
                    sm = SparseModel(model, sparsifier, list(plan.sparse_sites), biases=biases, sitemap=sitemap)
                    options = {"progress": bool(self.progress) if self.progress is not None else True,
                               **spec.trainer.options, "seed": item.seed}
                    trainer = build_trainer(self.toolkit, spec.trainer.name, options)
                    if hasattr(trainer, "shared_teacher") and self.share_teacher:
                        if self.teacher is None:
                            from .teacher import SharedTeacher

                            self.teacher = SharedTeacher(getattr(getattr(trainer, "options", None),
                                                                 "teacher_cache_mb", 4096))
                        trainer.shared_teacher = self.teacher
                    torch.manual_seed(item.seed)
                    if not train_info:
                        result = run_trainer(trainer, sm, self._batches(data.train),
                                             calibration_batches=self._batches(data.calibration))
                        history = [{k: float(v) for k, v in m.items()} for m in result.metrics]
                        train_info = {"steps": result.steps, "tokens": result.tokens,
                                      "final_loss": result.final_loss, "mean_loss": result.mean_loss,
                                      "objective": result.objective, "seconds": result.seconds,
                                      "options": result.options}
                    sm.detach()  # the evaluation attaches its own hooks
                with self._stage(item.id, "evaluate", timings):
                    spon = self._evaluate(sparsifier, plan.sparse_sites, biases, desc=f"{item.config} s={item.sparsity:g}")
                with self._stage(item.id, "train", timings):
                    from .checkpoint import save_checkpoint

                    ckpt = save_checkpoint(
                        self.manager.checkpoint_path(item_slug(item)), biases, model=model, sparsifier=sparsifier,
                        sparse_sites=plan.sparse_sites,
                        # no wall-clock times in the checkpoint: a re-run gives a byte-identical file
                        training={"trainer": spec.trainer.name,
                                  **{k: v for k, v in train_info.items() if k != "seconds"}},
                        data=data.protocol("train"),
                        metrics={"ppl": spon.ppl, "dense_ppl": dense.ppl, "sparse_ppl": teal.ppl},
                        extra={"item": item.id, "allocation": plan.as_dict()})
            else:
                spon = teal
                ckpt = None

            record = self._record(item, plan, dense, teal, spon, train_info, ckpt, timings)
            if spec.downstream is not None:
                with self._stage(item.id, "evaluate", timings):
                    from .lmeval import downstream_for_item

                    record["downstream"] = downstream_for_item(self, item, sparsifier, plan, biases)
            with self._stage(item.id, "analyze", timings):
                record["analyses"] = self._analyze(item, record, sparsifier, plan, biases)
        finally:
            if sm is not None:
                sm.detach()
        record["timings"] = {k: round(v, 3) for k, v in timings.items()}
        return record, {"train_history": history, "timings": record["timings"]}

    def _record(self, item, plan, dense, teal, spon, train_info, ckpt, timings) -> dict[str, Any]:
        gap = teal.ppl - dense.ppl
        recovered = (teal.ppl - spon.ppl) / gap if gap > 0 else math.nan
        return {
            "id": item.id, "item_hash": item.item_hash, "config": item.config, "allocation": item.allocation.name,
            "allocation_options": dict(item.allocation.options), "sparsity": item.sparsity, "seed": item.seed,
            "seed_scope": self.experiment.spec.seed_scope, "dense_ppl": dense.ppl, "sparse_ppl": teal.ppl, "ppl": spon.ppl, "damage_recovered": recovered,
            "spon_params": plan.n_params, "n_biased_sites": len(plan.biased_sites),
            "n_sparse_sites": len(plan.sparse_sites), "achieved_sparsity": spon.achieved_sparsity,
            "train_steps": train_info.get("steps", 0), "train_final_loss": train_info.get("final_loss"),
            "plan": plan.as_dict(), "train": train_info,
            "block_nll": {"dense": dense.block_nll, "sparse": teal.block_nll, "spon": spon.block_nll},
            "protocol": spon.protocol,
            "checkpoint": None if ckpt is None else str(Path(ckpt).relative_to(self.manager.run_dir)),
        }

    def _analyzer_specs(self, scope: str) -> list:
        from .analysis.runs import scope_of

        return [a for a in self.experiment.spec.analyzers if scope_of(self.toolkit.analyzers.entry(a.name)) == scope]

    def _check_analyzers(self, plan) -> None:
        from .analysis.runs import check_analyzer

        context = {"biased_sites": list(plan.biased_sites), "n_layers": self._sitemap.n_layers,
                   "dims": {s: self._sitemap.shape(s)[1] for s in plan.biased_sites}}
        for i, a in enumerate(self.experiment.spec.analyzers):
            check_analyzer(self.toolkit, a.name, a.options, context, where=f"{self.experiment.path}: analyzers[{i}]")

    def _analyze(self, item: Item, record: dict[str, Any], sparsifier, plan, biases) -> dict[str, Any]:
        out = {}
        for spec in self._analyzer_specs("item"):
            run = AnalysisRun(item=item, record=record, model=self._model, tokenizer=self._tokenizer,
                              sparsifier=sparsifier, plan=plan, biases=biases, data=self._item_data(item),
                              run_dir=self.manager.run_dir,
                              figures_dir=self.manager.run_dir / "figures", sitemap=self._sitemap,
                              toolkit=self.toolkit)
            out[spec.name] = run_analyzer(self.toolkit, spec.name, run, spec.options)
        return out

    def analyze_sweep(self) -> dict[str, Any]:
        """Write ``analysis/<analyzer>.json`` of every analyzer: the per-item answers collected from the
        records, and the answers of the ``scope="sweep"`` analyzers run once over the finished items."""
        from .analysis.runs import SweepEntry, SweepRun
        from .checkpoint import load_checkpoint
        from .fileio import atomic_write_json

        records = self.manager._ordered()
        out: dict[str, Any] = {}
        for spec in self._analyzer_specs("item"):
            out[spec.name] = {"scope": "item", "options": spec.options,
                              "items": {r["id"]: r["analyses"][spec.name] for r in records
                                        if spec.name in r.get("analyses", {})}}
        sweep_specs = self._analyzer_specs("sweep")
        if sweep_specs and records:
            self._load()
            entries = [SweepEntry(r["id"], r["config"], r["seed"], r["sparsity"],
                                  load_checkpoint(self.manager.run_dir / r["checkpoint"]), r)
                       for r in records if r.get("checkpoint")]
            run = SweepRun(entries, self._model, self._tokenizer, self._sitemap, self.toolkit, self._data.calibration,
                           self.manager.run_dir, self.manager.run_dir / "figures")
            for spec in sweep_specs:
                try:
                    answer = run_analyzer(self.toolkit, spec.name, run, spec.options)
                except SponError:
                    raise
                except Exception as exc:
                    raise StageError("sweep", "analyze", exc) from exc
                out[spec.name] = {"scope": "sweep", "options": spec.options, "result": answer}
        for name, payload in out.items():
            atomic_write_json(self.manager.analysis_dir / f"{name}.json", payload)
        return out

    def _needs(self, entry, item: Item) -> list[str]:
        """Importance methods an allocation needs: its declared ``requires`` and a ``scores=`` option,
        unless explicit ``layers`` make scores unnecessary."""
        options = self._allocation_options(item)
        if "layers" in options:
            return []
        wanted = [entry.meta.get("requires"), options.get("scores")]
        return [m for m in dict.fromkeys(wanted) if isinstance(m, str) and m in self.toolkit.importance_methods]

    def _allocation_options(self, item: Item) -> dict[str, Any]:
        """The item's allocation options over those of the spec's ``data_driven_overrides`` file."""
        path = self.experiment.spec.data_driven_overrides
        if path is None:
            return dict(item.allocation.options)
        if self._overrides is None:
            from .allocation import load_overrides

            local = self.experiment.path.parent / path  # relative to the spec file, like data sources
            self._overrides = load_overrides(local if local.exists() else path, self._sitemap.n_layers)
        return {**self._overrides.options_for(item.allocation.name), **item.allocation.options}

    # --- expectations ------------------------------------------------------------------------------
    def metrics(self, config: str, sparsity: float, seed: int) -> dict[str, float]:
        """The metrics of one item, running it first if needed (expectations compare items)."""
        other = self.experiment.item(config, sparsity, seed)
        record = self._records.get(other.id) if self.is_finished(other) else None
        if record is None and not self.compute_missing:
            raise StageError(other.id, "expectations", "the item has no record (it failed or was not selected)")
        if record is None:
            record = self.run_item(other, check=False).record
        return {"ppl": record["ppl"], "dense_ppl": record["dense_ppl"], "sparse_ppl": record["sparse_ppl"],
                "damage_recovered": record["damage_recovered"], "spon_params": record["spon_params"],
                "achieved_sparsity": record.get("achieved_sparsity")}

    def check_expectations(self, item: Item) -> list[tuple[bool, str]]:
        checks = []
        for exp in item.expectations:
            try:
                values = {c: self.metrics(c, item.sparsity, item.seed) for c in exp.configs()}
            except StageError as exc:
                checks.append((False, f"{exp.text}: cannot compare, {exc}"))
                continue
            ok, msg = exp.check(values)
            checks.append((ok, f"[s={item.sparsity:g},seed={item.seed}] {msg}"))
        return checks

    def finish(self) -> dict[str, Any]:
        """Rebuild the aggregated files and analysis from everything this run has finished."""
        self.start()
        out = self.manager.aggregate()
        if self.experiment.spec.analyzers:
            out["analyzers"] = self.analyze_sweep()
        return out


@dataclass
class AnalysisRun:
    """What an analyzer plugin receives for one item (``analyze(run, **options)``).

    ``record`` holds the item's numbers; ``model`` is the dense model with no hooks attached; rebuild the
    sparse model with ``SparseModel(run.model, run.sparsifier, run.plan.sparse_sites, biases=run.biases)``.
    Figures go to ``figures_dir``; the returned dict must be JSON-serialisable (checked, see
    :func:`spon_toolkit.contracts.run_analyzer`).
    """

    item: Item
    record: dict[str, Any]
    model: Any
    tokenizer: Any
    sparsifier: Any
    plan: Any
    biases: Any  # SponBiases (detached) or None for items without biases
    data: Any
    run_dir: Path
    figures_dir: Path
    sitemap: Any = None  # SiteMap of ``model`` built with the toolkit's architectures
    toolkit: Any = None


# --- the whole job (shared by `spon run`) ---------------------------------------------------------

@dataclass
class SweepResult:
    experiment: Experiment
    runner: ExperimentRunner
    outcomes: list[ItemOutcome] = field(default_factory=list)
    errors: list[StageError] = field(default_factory=list)
    report: dict[str, Any] | None = None


def select_items(experiment: Experiment, keyword: str | None) -> list[Item]:
    match = keyword_matcher(keyword)
    return [it for it in experiment.items() if match(it.id)]


def run_experiment(experiment: Experiment, *, toolkit, output_dir: str | Path = "results", keyword: str | None = None,
                   resume: bool = True, progress: bool | None = None,
                   on_item: Callable[[Item, ItemOutcome | None, StageError | None], None] | None = None,
                   share_teacher: bool = True) -> SweepResult:
    """Run the selected items of one experiment, then aggregate. Failures are collected, not raised.
    ``share_teacher=False`` makes each item compute its own teacher targets (for benchmarks)."""
    runner = ExperimentRunner(experiment, toolkit=toolkit, output_dir=output_dir, resume=resume, progress=progress)
    runner.share_teacher = share_teacher
    sweep = SweepResult(experiment, runner)
    items = select_items(experiment, keyword)
    runner.prepare()  # a model or data problem is one error before any item, not one per item
    runner.start()
    # items that another process of this run directory is computing are put last and then waited for
    # (a process that died releases its claim, and the item is computed here)
    queue, claimed = list(items), set()
    while queue:
        item = queue.pop(0)
        try:
            outcome = runner.run_item(item, wait=item.id in claimed)
            sweep.outcomes.append(outcome)
            err = None
        except ExpectationFailed as exc:
            outcome = exc.outcome
            sweep.outcomes.append(outcome)
            sweep.errors.append(exc)
            err = exc
        except ItemClaimed:
            claimed.add(item.id)
            queue.append(item)
            continue
        except StageError as exc:
            outcome, err = None, exc
            sweep.errors.append(exc)
        if on_item is not None:
            on_item(item, outcome, err)
    try:
        runner.finish()
    finally:
        runner.manager.release()
    return sweep


__all__ = ["ExperimentRunner", "StageError", "ExpectationFailed", "ItemClaimed", "ItemOutcome", "run_experiment", "select_items",
           "STAGES"]
