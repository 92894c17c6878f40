"""Tiny random Llama models for tests (the model itself lives in :mod:`spon_toolkit.tiny`, which the
``tiny-random`` loader uses; production code never imports from :mod:`spon_toolkit.testing`)."""

from spon_toolkit.tiny import make_tiny_llama

__all__ = ["make_tiny_llama"]
