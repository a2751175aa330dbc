"""arcflow: infinite-width network kernels (NNGP, NTK) and invertible-network blocks, C++ core, NumPy API.

>>> import numpy as np, arcflow
>>> x = np.random.default_rng(0).normal(size=(50, 8))
>>> k = arcflow.kernels(x, depth=3, activation="relu", w_std=1.4, b_std=0.1)   # k.nngp, k.ntk: (50, 50)
"""
from __future__ import annotations

import os as _os

# Idle OpenMP threads sleep instead of spinning between arcflow's row blocks: on a shared or oversubscribed
# machine spinning threads steal the cores the working ones need. Set before libgomp starts; an explicit
# OMP_WAIT_POLICY in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import _core  # noqa: E402
from . import activations  # noqa: E402
from . import compat  # noqa: E402
from ._dispatch import get_num_threads, set_num_threads  # noqa: E402
from ._kernels import Kernels, kernels, nngp, ntk  # noqa: E402
from ._grads import Grad, KernelGrads, kernel_grads  # noqa: E402
from ._kernel_fn import KernelFn, kernel_fn  # noqa: E402

__version__ = "0.1.0"


def build_info() -> dict:
    """How this copy of arcflow was built: OpenMP, CUDA, the visible CUDA devices, and the SIMD level the CPU
    kernels run at (the best this CPU runs, or the cap of the environment variable ARCFLOW_ISA)."""
    try:
        simd = {"levels": list(_core._isa_levels()), "kernels": _core._fc_isa(), "conv2d": _core._conv2d_isa()}
    except ValueError as e:  # an invalid ARCFLOW_ISA: say so here rather than fail
        simd = {"error": str(e)}
    return {
        "version": __version__,
        "openmp": bool(_core.built_with_openmp),
        "max_threads": int(_core.omp_max_threads()),
        "cuda_built": bool(_core.built_with_cuda),
        "cuda_devices": int(_core.cuda_device_count()),
        "simd": simd,
    }


def __getattr__(name):
    # arcflow.reference (the NumPy oracle), arcflow.invertible, arcflow.predict and arcflow.sklearn (which needs
    # scikit-learn) load on first use.
    if name in ("reference", "invertible", "predict", "sklearn", "stax"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'arcflow' has no attribute {name!r}")


__all__ = [
    "nngp", "ntk", "kernels", "Kernels", "kernel_fn", "KernelFn", "kernel_grads", "KernelGrads", "Grad",
    "set_num_threads", "get_num_threads",
    "activations", "compat", "build_info", "__version__",
]
