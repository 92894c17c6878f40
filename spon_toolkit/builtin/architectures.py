"""Built-in architecture naming: the Llama family shares one layout."""

from spon_toolkit.hookspecs import hookimpl
from spon_toolkit.sites import BUILTIN_ARCHITECTURES


@hookimpl
def spon_register_architectures(register):
    for model_type, arch in BUILTIN_ARCHITECTURES.items():
        register(model_type, arch, description=f"{arch.layers}[i].self_attn.*_proj / .mlp.*_proj")
