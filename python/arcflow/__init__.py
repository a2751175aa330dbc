"""arcflow: infinite-width network kernels (NNGP, NTK) and invertible-network blocks, C++ core, NumPy API."""
from __future__ import annotations

from . import _core
from . import activations

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


__all__ = ["activations", "build_info", "__version__"]
