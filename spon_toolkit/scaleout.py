"""Helpers shared by the parallel executors (pytest-xdist workers, Ray actors): which GPU a worker takes.

A worker with index ``i`` takes CUDA device ``i mod n`` (``n`` visible devices), or the ``i``-th entry of
``SPON_DEVICES`` (a comma-separated list of device indices) when that variable is set. Without CUDA a
worker stays on the CPU.
"""

from __future__ import annotations

import os

from .errors import ConfigError


def worker_device(index: int, devices: str | None = None) -> int | None:
    """The CUDA device index worker ``index`` should use, or ``None`` without CUDA."""
    import torch

    spec = devices if devices is not None else os.environ.get("SPON_DEVICES")
    if spec:
        try:
            choices = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"SPON_DEVICES={spec!r}: give comma-separated CUDA device indices, e.g. 0,1") from None
        if not choices:
            raise ConfigError(f"SPON_DEVICES={spec!r} names no device")
        return choices[index % len(choices)]
    if not torch.cuda.is_available():
        return None
    return index % torch.cuda.device_count()


def use_worker_device(index: int, devices: str | None = None) -> str:
    """Make the worker's device the current CUDA device (models loaded with device ``auto`` go there);
    returns ``"cuda:<k>"`` or ``"cpu"``."""
    dev = worker_device(index, devices)
    if dev is None:
        return "cpu"
    import torch

    torch.cuda.set_device(dev)
    return f"cuda:{dev}"


__all__ = ["worker_device", "use_worker_device"]
