"""Built-in architecture naming: the Llama family shares one layout."""

from spon_toolkit.hookspecs import hookimpl
from spon_toolkit.sites import LLAMA_NAMING


@hookimpl
def spon_register_architectures(register):
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"):
        register(model_type, LLAMA_NAMING, description="model.layers[i].self_attn.*_proj / .mlp.*_proj")
