"""The one place where the invertible blocks choose their ops provider (see ``_backend``)."""
from __future__ import annotations

import contextlib
from typing import Optional

from .._dispatch import check_threads
from . import _cuda_ops
from ._backend import CpuOps, Ops, is_device_array

__all__ = ["provider_for", "forced"]

_FORCED: Optional[Ops] = None


@contextlib.contextmanager
def provider_for(*arrays, threads: Optional[int] = None, where: str = "arcflow"):
    """The provider for one public call, inside its device scope: the CUDA provider when an input is a GPU array
    (RuntimeError when the GPU path cannot run), else the CPU ops with ``threads`` (default
    arcflow.get_num_threads(); ignored on a device)."""
    if _FORCED is not None:
        ops = _FORCED
    elif any(is_device_array(a) for a in arrays):
        ops = _cuda_ops._backend()
    else:
        ops = CpuOps(check_threads(threads, where))
    with ops.scope(arrays[0] if arrays else None):
        yield ops


@contextlib.contextmanager
def forced(ops: Ops):
    """Every call inside runs on ``ops`` whatever its input (the tests' NumPy twins of the device provider)."""
    global _FORCED
    saved, _FORCED = _FORCED, ops
    try:
        yield ops
    finally:
        _FORCED = saved
