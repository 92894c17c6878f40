"""Experiment specs: one YAML file describes a sweep (sparsity x allocation x seed) and its expectations.

A spec is validated by pydantic; every problem becomes one line naming the file, the key and what is
allowed, e.g. ``experiments/exp_x.yaml: key 'sparsity[1]': must be <= 1 (got 1.5)``. Plugin names
(model loader, sparsifier, allocations, trainer, analyzers) are checked against a :class:`Toolkit` in
:meth:`Experiment.check_names`, because only the loaded plugins know which names exist.

The matrix expands into :class:`Item` objects whose ids are stable strings built from the file name and
the item's coordinates only: ``exp_allocation.yaml::TOP-50[s=0.5,seed=0]``.

Minimal spec::

    model: smollm2-135m
    data: {source: sotu, block_size: 128, calibration_blocks: 16, eval_blocks: 32}
    sparsifier: magnitude
    sites: down_proj
    sparsity: [0.5]
    allocations: [BASELINE-TEAL, UNIF-ALL, TOP-50]
    trainer: {name: kl, options: {lr: 1.0e-3, steps: 40}}
    seeds: [0]
    expect:
      - ppl[UNIF-ALL] < ppl[BASELINE-TEAL]
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, SponError, UnknownNameError, suggest

BASELINE = "BASELINE-TEAL"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Named(_Strict):
    """A plugin reference: ``name`` plus keyword ``options``; a bare string means ``{name: <string>}``."""

    name: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class ModelSpec(_Strict):
    """Which model to load: a registered loader, optionally with a path or hub id for it."""

    loader: str = Field(min_length=1)
    path: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"loader": value} if isinstance(value, str) else value

    @field_validator("options")
    @classmethod
    def _remote_code_is_a_real_boolean(cls, value: dict[str, Any]) -> dict[str, Any]:
        flag = value.get("trust_remote_code", False)
        if not isinstance(flag, bool):
            raise ValueError(f"options.trust_remote_code must be the boolean true or false, got {flag!r}; "
                             f"the model's own code runs only for a real true")
        return value


class DataSpec(_Strict):
    """Text source and how it is cut into token blocks (calibration/training, validation, evaluation).

    ``source`` serves every split (sotu and ``datasets`` names have their own fixed splits); a local file
    has none, so give ``calibration_source`` and ``eval_source`` separately for local text. Blocks are a
    seeded sample of each split: calibration (seed 0), training (seed 1, default: the calibration
    blocks), validation and eval (seed 0).
    """

    source: str = "sotu"
    calibration_source: str | None = None
    validation_source: str | None = None
    eval_source: str | None = None
    block_size: int = Field(128, ge=8, le=8192)
    calibration_blocks: int = Field(16, ge=1)
    train_blocks: int | None = Field(None, ge=1)
    validation_blocks: int = Field(0, ge=0)
    eval_blocks: int = Field(32, ge=1)
    batch_size: int = Field(8, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)


class SparsifierSpec(_Named):
    name: str = "magnitude"


class AllocationSpec(_Named):
    """One allocation config of the sweep; ``label`` (default: ``name``) names it in ids and tables."""

    label: str | None = None

    @property
    def key(self) -> str:
        return self.label or self.name

    @field_validator("label")
    @classmethod
    def _label_chars(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.+-]+", value):
            raise ValueError("may contain only letters, digits and _ . + - (it becomes part of test ids)")
        return value


class TrainerSpec(_Named):
    name: str = "kl"


class AnalyzerSpec(_Named):
    pass


class DownstreamSpec(_Strict):
    """lm-eval tasks run on every item: dense once, TEAL per sparsity and sparsified sites, SPON per item
    (see :mod:`spon_toolkit.lmeval`). A bare list or string means ``{tasks: ...}``."""

    tasks: list[str] = Field(min_length=1)
    limit: float | None = Field(None, gt=0)
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(8, ge=1)
    prefix_token_id: int | None = Field(None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [t.strip() for t in value.split(",") if t.strip()]
        return {"tasks": value} if isinstance(value, list) else value


class ExperimentSpec(_Strict):
    """The validated content of one experiment YAML file."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    sparsifier: SparsifierSpec = Field(default_factory=SparsifierSpec)
    sites: str | list[str] = "down_proj"
    sparsity: list[Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False, strict=True)]] = Field(min_length=1)
    allocations: list[AllocationSpec] = Field(min_length=1)
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    seeds: list[Annotated[int, Field(strict=True)]] = Field(default_factory=lambda: [0], min_length=1)
    #: what a seed changes: `training` (batch order, trainer randomness) or `data` (also the training and
    #: calibration samples; eval blocks fixed). See spon_toolkit.expdata.
    seed_scope: Literal["training", "data"] = "training"
    analyzers: list[AnalyzerSpec] = Field(default_factory=list)
    importance: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: an override file written by `spon importance -o` (relative to the spec file): layers for the
    #: data-driven allocations, used unless an allocation's own options give `layers`
    data_driven_overrides: str | None = None
    #: evaluate the checkpoints in this directory (a run's checkpoints/, relative to the spec file) instead
    #: of training: the seed's --skip_training --checkpoint_dir
    checkpoints: str | None = Field(None, min_length=1)
    report: bool = True
    expect: list[str] = Field(default_factory=list)
    downstream: DownstreamSpec | None = None

    @field_validator("sites")
    @classmethod
    def _sites_not_empty(cls, value: str | list[str]) -> str | list[str]:
        if not value or (isinstance(value, list) and not all(v.strip() for v in value)):
            raise ValueError("names no site, so nothing would be sparsified; give a site spec such as "
                             "down_proj, mlp, all or layers.0-9.down_proj")
        return value

    @field_validator("sparsity", mode="before")
    @classmethod
    def _sparsity_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("sparsity")
    @classmethod
    def _sparsity_values(cls, values: list[float]) -> list[float]:
        if len(set(values)) != len(values):
            raise ValueError(f"repeats a value in {values}; list each sparsity once")
        return values

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, values: list[int]) -> list[int]:
        if len(set(values)) != len(values) or any(v < 0 for v in values):
            raise ValueError(f"must be distinct non-negative integers, got {values}")
        return values

    @field_validator("allocations")
    @classmethod
    def _unique_labels(cls, values: list[AllocationSpec]) -> list[AllocationSpec]:
        seen: set[str] = set()
        for a in values:
            if a.key in seen:
                raise ValueError(f"config '{a.key}' appears twice; give one of them a distinct 'label'")
            seen.add(a.key)
        return values

    @field_validator("expect")
    @classmethod
    def _parse_expectations(cls, values: list[str]) -> list[str]:
        for v in values:
            Expectation.parse(v)  # raises ValueError with the grammar
        return values

    @model_validator(mode="after")
    def _expect_refers_to_configs(self) -> ExperimentSpec:
        keys = {a.key for a in self.allocations}
        for text in self.expect:
            for config in Expectation.parse(text).configs():
                if config not in keys:
                    raise ValueError(
                        f"expectation '{text}' names config '{config}', which is not in 'allocations' "
                        f"({', '.join(sorted(keys))})"
                    )
        return self


# --- expectations -------------------------------------------------------------------------------------

METRICS = ("ppl", "dense_ppl", "sparse_ppl", "damage_recovered", "spon_params", "achieved_sparsity")
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_TERM = r"\s*(?:(?P<{p}num>[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*(?:\*\s*)?)?(?:(?P<{p}metric>[a-z_]+)\[(?P<{p}config>[^\]]+)\])?\s*"
_EXPR = re.compile("^" + _TERM.format(p="l") + r"(?P<op><=|>=|<|>)" + _TERM.format(p="r") + "$")


@dataclass(frozen=True)
class Term:
    """``factor * metric[config]`` or a plain number (``metric`` is None)."""

    factor: float
    metric: str | None = None
    config: str | None = None

    def value(self, results: dict[str, dict[str, float]]) -> float:
        if self.metric is None:
            return self.factor
        return self.factor * results[self.config][self.metric]

    def __str__(self) -> str:
        if self.metric is None:
            return f"{self.factor:g}"
        prefix = "" if self.factor == 1 else f"{self.factor:g} * "
        return f"{prefix}{self.metric}[{self.config}]"


@dataclass(frozen=True)
class Expectation:
    """A comparison such as ``ppl[UNIF-ALL] < ppl[BASELINE-TEAL]`` checked per (sparsity, seed).

    Grammar: ``TERM OP TERM`` with OP one of ``< <= > >=`` and TERM either a number, ``metric[CONFIG]``
    or ``number * metric[CONFIG]``; metrics are those of :data:`METRICS`.
    """

    text: str
    left: Term
    op: str
    right: Term

    @classmethod
    def parse(cls, text: str) -> Expectation:
        m = _EXPR.match(text or "")
        grammar = (
            "write 'TERM OP TERM' with OP in < <= > >= and TERM a number, metric[CONFIG] or "
            f"number * metric[CONFIG]; metrics: {', '.join(METRICS)}"
        )
        if not m:
            raise ValueError(f"cannot parse expectation '{text}': {grammar}")
        terms = []
        for p in "lr":
            num, metric, config = m.group(f"{p}num"), m.group(f"{p}metric"), m.group(f"{p}config")
            if metric is None and num is None:
                raise ValueError(f"cannot parse expectation '{text}': {grammar}")
            if metric is not None and metric not in METRICS:
                raise ValueError(f"expectation '{text}' uses unknown metric '{metric}'; metrics: {', '.join(METRICS)}")
            terms.append(Term(float(num) if num is not None else 1.0, metric, config.strip() if config else None))
        if terms[0].metric is None and terms[1].metric is None:
            raise ValueError(f"expectation '{text}' compares two numbers; name at least one metric[CONFIG]")
        return cls(text, terms[0], m.group("op"), terms[1])

    def configs(self) -> list[str]:
        return [t.config for t in (self.left, self.right) if t.config is not None]

    @property
    def subject(self) -> str:
        """The config whose items check this expectation (the first one named)."""
        return self.configs()[0]

    def check(self, results: dict[str, dict[str, float]]) -> tuple[bool, str]:
        """Evaluate on ``{config: {metric: value}}``; returns (passed, one-line explanation with values)."""
        lv, rv = self.left.value(results), self.right.value(results)
        ok = bool(_OPS[self.op](lv, rv))
        return ok, f"{self.text}: {self.left} = {lv:.6g} {self.op} {self.right} = {rv:.6g} is {ok}"


# --- loading and validation ---------------------------------------------------------------------------

def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _clean_loc(loc: tuple) -> tuple:
    # pydantic adds validator/union-branch names (e.g. 'str', 'list[str]', 'function-...') to locations.
    return tuple(p for p in loc if isinstance(p, int) or not (
        str(p).startswith(("function-", "list[", "dict[")) or p in ("str", "int", "float", "bool")))


def _format_validation_error(path: str, exc: ValidationError, model: type[BaseModel]) -> str:
    parts = []
    seen = set()
    for err in exc.errors():
        loc = _clean_loc(err["loc"])
        key = _format_loc(loc)
        if key in seen:
            continue
        seen.add(key)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            owner = model
            for p in loc[:-1]:
                if isinstance(p, int):
                    continue
                field = owner.model_fields.get(p) if owner else None
                ann = getattr(field, "annotation", None)
                inner = getattr(ann, "__args__", (ann,))
                owner = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
            allowed = ", ".join(owner.model_fields) if owner else "?"
            msg = f"unknown key; allowed keys: {allowed}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and err["type"] not in ("value_error",):
            msg = f"{msg} (got {err['input']!r})"
        parts.append(f"key '{key}': {msg}")
    return f"{path}: " + "; ".join(parts)


def _spec_hash(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Item:
    """One cell of the matrix: an allocation config at one sparsity with one seed."""

    experiment: Experiment
    allocation: AllocationSpec
    sparsity: float
    seed: int

    @property
    def config(self) -> str:
        return self.allocation.key

    @property
    def name(self) -> str:
        """The id within its file: ``TOP-50[s=0.5,seed=0]``."""
        return f"{self.config}[s={self.sparsity:g},seed={self.seed}]"

    @property
    def id(self) -> str:
        return f"{self.experiment.path.name}::{self.name}"

    @property
    def item_hash(self) -> str:
        """Hash of everything that determines this item's numbers (not of the rest of the matrix)."""
        spec = self.experiment.spec
        shared = spec.model_dump(include={"model", "data", "sparsifier", "sites", "trainer", "analyzers",
                                          "importance"})
        if spec.downstream is not None:  # absent from the hash when unset, so older results still resume
            shared["downstream"] = spec.downstream.model_dump()
        if spec.seed_scope != "training":  # likewise
            shared["seed_scope"] = spec.seed_scope
        return _spec_hash({**shared, "allocation": self.allocation.model_dump(), "sparsity": self.sparsity,
                           "seed": self.seed})

    @property
    def expectations(self) -> list[Expectation]:
        """Expectations this item checks (those whose first named config is this item's config)."""
        return [e for e in self.experiment.expectations if e.subject == self.config]

    def __repr__(self) -> str:
        return f"<Item {self.id}>"


@dataclass(frozen=True, eq=False)
class Experiment:
    """A validated experiment file: its spec, path and expanded items."""

    path: Path
    spec: ExperimentSpec

    @property
    def name(self) -> str:
        """The experiment's name: ``name:`` in the file, else the file stem without ``exp_``."""
        return self.spec.name or self.path.stem.removeprefix("exp_")

    @property
    def spec_hash(self) -> str:
        exclude = {k for k, default in (("downstream", None), ("seed_scope", "training"))
                   if getattr(self.spec, k) == default}  # unset keys leave older hashes as they were
        return _spec_hash(self.spec.model_dump(exclude=exclude or None))

    @property
    def expectations(self) -> list[Expectation]:
        return [Expectation.parse(t) for t in self.spec.expect]

    def items(self) -> list[Item]:
        """The matrix in run order: sparsity, then allocation, then seed (calibration is shared per sparsity)."""
        return [
            Item(self, alloc, s, seed)
            for s in self.spec.sparsity
            for alloc in self.spec.allocations
            for seed in self.spec.seeds
        ]

    def item(self, config: str, sparsity: float, seed: int) -> Item:
        for it in self.items():
            if it.config == config and it.sparsity == sparsity and it.seed == seed:
                return it
        raise KeyError((config, sparsity, seed))

    def check(self, toolkit) -> None:
        """Everything that can be checked before any model work: plugin names, then the options of the
        sparsifier (at every sparsity), the trainer, each allocation and each analyzer, bound against
        what the plugins accept. Raises a one-line error naming the file and key."""
        self.check_names(toolkit)
        self.check_options(toolkit)
        if self.spec.checkpoints is not None:  # evaluate-only: the directory must exist before any model work
            from .eval_only import checkpoint_dir

            checkpoint_dir(self.path, self.spec.checkpoints)

    def check_options(self, toolkit) -> None:
        from .allocation import check_allocation_options
        from .analysis.runs import check_analyzer
        from .contracts import build_sparsifier, build_trainer
        from .errors import SponError

        spec = self.spec

        def at(key: str, fn, *args) -> None:
            try:
                fn(*args)
            except SponError as exc:
                raise type(exc)(f"{self.path}: key '{key}': {exc}") from exc

        for s in spec.sparsity:
            at("sparsifier", build_sparsifier, toolkit, spec.sparsifier.name, s, spec.sparsifier.options)
        for seed in spec.seeds:
            at("trainer", build_trainer, toolkit, spec.trainer.name,
               {"progress": False, **spec.trainer.options, "seed": seed})
        for i, a in enumerate(spec.allocations):
            at(f"allocations[{i}]", check_allocation_options, toolkit, a.name, a.options)
        for i, a in enumerate(spec.analyzers):
            at(f"analyzers[{i}]", check_analyzer, toolkit, a.name, a.options)

    def check_names(self, toolkit) -> None:
        """Check plugin names against ``toolkit``; raises a one-line error naming file and key."""
        spec = self.spec
        checks = [("model.loader", spec.model.loader, toolkit.model_loaders),
                  ("sparsifier.name", spec.sparsifier.name, toolkit.sparsifiers),
                  ("trainer.name", spec.trainer.name, toolkit.trainers)]
        checks += [(f"allocations[{i}].name", a.name, toolkit.allocations) for i, a in enumerate(spec.allocations)]
        checks += [(f"analyzers[{i}].name", a.name, toolkit.analyzers) for i, a in enumerate(spec.analyzers)]
        if spec.downstream is not None:
            from .lmeval import task_manager

            try:
                task_manager(spec.downstream.tasks)
            except SponError as exc:
                raise ConfigError(f"{self.path}: key 'downstream.tasks': {exc}") from None
        for key, name, registry in checks:
            if name not in registry:
                known = sorted(registry.names())
                listing = ", ".join(known) if known else "(none registered)"
                raise UnknownNameError(
                    f"{self.path}: key '{key}': unknown {registry.kind} '{name}'.{suggest(name, known)} "
                    f"Allowed: {listing}."
                )


def load_experiment(path: str | Path, toolkit=None) -> Experiment:
    """Read and validate an experiment YAML file (``yaml.safe_load``); with ``toolkit``, check names too."""
    from .fileio import load_yaml

    path = Path(path)
    data = load_yaml(path, "experiment file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an experiment file must be a YAML mapping with keys such as model, sparsity, "
                          f"allocations; got {type(data).__name__}")
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(str(path), exc, ExperimentSpec)) from None
    experiment = Experiment(path, spec)
    if toolkit is not None:
        experiment.check(toolkit)
    return experiment


# --- -k selection (pytest's keyword-expression language, on item ids) -----------------------------------

_KTOKEN = re.compile(r"\s*(\(|\)|[^\s()]+)")


def keyword_matcher(expr: str | None):
    """Compile a ``-k`` expression (``and``/``or``/``not``/parentheses over case-insensitive substrings of
    the item id) into a predicate on ids. ``None`` or ``""`` selects everything."""
    if not expr or not expr.strip():
        return lambda _id: True
    tokens = _KTOKEN.findall(expr)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def parse_or():
        left = parse_and()
        while peek() == "or":
            take()
            right = parse_and()
            left = (lambda a, b: lambda s: a(s) or b(s))(left, right)
        return left

    def parse_and():
        left = parse_not()
        while peek() == "and":
            take()
            right = parse_not()
            left = (lambda a, b: lambda s: a(s) and b(s))(left, right)
        return left

    def parse_not():
        if peek() == "not":
            take()
            inner = parse_not()
            return lambda s: not inner(s)
        if peek() == "(":
            take()
            inner = parse_or()
            if peek() != ")":
                raise ConfigError(f"-k expression '{expr}': missing ')'")
            take()
            return inner
        tok = peek()
        if tok is None or tok in (")", "and", "or"):
            raise ConfigError(f"-k expression '{expr}': expected a keyword at '{tok or 'end'}'")
        word = take().lower()
        return lambda s: word in s.lower()

    predicate = parse_or()
    if pos != len(tokens):
        raise ConfigError(f"-k expression '{expr}': unexpected '{tokens[pos]}'")
    return predicate
