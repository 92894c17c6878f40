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


def cpu_threads(workers: int, cores: int | None = None) -> int:
    """Torch threads per worker when ``workers`` processes share the CPU: the cores split evenly (at least
    one each). Without it every worker starts one thread per core and they oversubscribe the CPU (two
    workers on 2 cores ran the quickstart 5x slower than one process)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers))


def use_worker_device(index: int, devices: str | None = None, workers: int = 1) -> str:
    """Make the worker's device the current CUDA device (models loaded with device ``auto`` go there);
    returns ``"cuda:<k>"`` or ``"cpu"``. On the CPU, the worker takes its share of the cores
    (:func:`cpu_threads` of ``workers``)."""
    import torch

    dev = worker_device(index, devices)
    if dev is None:
        torch.set_num_threads(cpu_threads(workers))
        return "cpu"

    torch.cuda.set_device(dev)
    return f"cuda:{dev}"


__all__ = ["cpu_threads", "worker_device", "use_worker_device"]
