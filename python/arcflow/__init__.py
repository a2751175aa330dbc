"""arcflow: infinite-width network kernels (NNGP, NTK) and invertible-network blocks, C++ core, NumPy API.

>>> import numpy as np, arcflow
>>> x = np.random.default_rng(0).normal(size=(50, 8))
>>> k = arcflow.kernels(x, depth=3, activation="relu", w_std=1.4, b_std=0.1)   # k.nngp, k.ntk: (50, 50)
"""
from __future__ import annotations

from . import _core
from . import activations
from . import compat
from ._dispatch import get_num_threads, set_num_threads
from ._kernels import Kernels, kernels, nngp, ntk

__version__ = "0.1.0"


def build_info() -> dict:
    """How this copy of arcflow was built: OpenMP, CUDA, and the visible CUDA devices."""
    return {
        "version": __version__,
        "openmp": bool(_core.built_with_openmp),
        "max_threads": int(_core.omp_max_threads()),
        "cuda_built": bool(_core.built_with_cuda),
        "cuda_devices": int(_core.cuda_device_count()),
    }


def __getattr__(name):
    # arcflow.reference (the NumPy oracle) and arcflow.invertible load on first use.
    if name in ("reference", "invertible"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'arcflow' has no attribute {name!r}")


__all__ = [
    "nngp", "ntk", "kernels", "Kernels", "set_num_threads", "get_num_threads", "activations", "compat",
    "build_info", "__version__",
]
