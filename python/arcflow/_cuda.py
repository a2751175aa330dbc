"""The CUDA backend of the kernel recursions: availability and the entry point the dispatcher calls.

Two-level check (as faiss does): the extension was built with CUDA (``_core.built_with_cuda``) and a
device is present (``_core.cuda_device_count() > 0``). NumPy input is copied to the device and the result
comes back as NumPy; arrays exposing ``__cuda_array_interface__`` (CuPy, PyTorch, Numba) stay on the device
and the result is a pair of CuPy arrays, computed on CuPy's current stream without host copies.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from . import _core


def _ptr(x) -> int:
    """A CuPy array's device pointer, 0 for None (the launchers' 'no output')."""
    return 0 if x is None else int(x.data.ptr)


def built() -> bool:
    """True when this copy of arcflow was compiled with the CUDA backend."""
    return bool(getattr(_core, "built_with_cuda", False))


def device_count() -> int:
    """Number of visible CUDA devices (0 without a driver, a device, or the CUDA backend)."""
    return int(_core.cuda_device_count()) if built() else 0


def available() -> bool:
    """True when the CUDA backend can run: built with CUDA and at least one device present."""
    return built() and device_count() > 0


def status() -> str:
    """One line: CUDA runtime and driver versions and the device count, or why no device is usable."""
    return str(_core.cuda_status()) if built() else "built without CUDA"


def _require() -> None:
    if not built():
        raise RuntimeError("arcflow was built without CUDA (rebuild with nvcc on the PATH and ARCFLOW_CUDA=ON)")
    if device_count() == 0:
        raise RuntimeError(f"arcflow: no CUDA device (the CUDA backend is built, but no GPU is usable: {status()})")


def is_device_array(x) -> bool:
    """True for arrays in GPU memory (anything with ``__cuda_array_interface__``)."""
    return x is not None and hasattr(x, "__cuda_array_interface__")


def _result_dtype(a1, a2) -> np.dtype:
    dts = [np.dtype(a.dtype) for a in (a1, a2) if a is not None]
    if all(dt == np.float32 or dt == np.float16 for dt in dts):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _device_matrix(cp, x, name: str, dtype):
    x = cp.asarray(x)  # wraps __cuda_array_interface__ without a copy
    if x.ndim != 2:
        raise ValueError(f"arcflow (CUDA): {name} must be a 2-D array of shape (n, d), got shape {x.shape}")
    if x.dtype.kind not in "biuf":
        raise TypeError(f"arcflow (CUDA): {name} must be a real numeric array, got dtype {x.dtype}")
    x = cp.ascontiguousarray(x, dtype=dtype)
    if x.size and not bool(cp.isfinite(x).all()):  # as the CPU path: no NaN/inf rows (one small sync)
        raise ValueError(f"arcflow (CUDA): {name} contains NaN or infinite values")
    return x


def kernels_cuda(a1, a2, params, want_nngp: bool = True, want_ntk: bool = True, *,
                 diag: bool = False, device: Optional[int] = None) -> Tuple[Optional[object], Optional[object]]:
    """NNGP and NTK on the GPU with the CPU engine's arguments; returns ``(nngp or None, ntk or None)``.

    ``a1`` is (n1, d), ``a2`` is None (the symmetric kernel of a1: one triangle computed, mirrored) or
    (n2, d). NumPy input must already be C-contiguous float32/float64 of one dtype (the dispatcher's
    ``_prepare`` does that); the result is NumPy of that dtype. Device arrays (``__cuda_array_interface__``)
    are taken as they are (cast to the common dtype, float32 if both are float32, else float64, and made
    contiguous by CuPy) and the result is CuPy arrays allocated on the input's device, written
    asynchronously on CuPy's current stream. ``params`` is the ``_core.FcParams`` that the CPU engine
    takes (``arcflow._kernels.fc_params`` builds it). With ``diag=True``
    (``a2`` must be None) the results are the n1-vectors k(x, x), as ``engine.diag``.

    Raises RuntimeError without CUDA or without a device, and for failed CUDA calls (the message names the
    call and CUDA's error string); ValueError / TypeError for bad shapes or dtypes.
    """
    _require()
    if diag and a2 is not None:
        raise ValueError("arcflow (CUDA): diag=True computes k(x, x) for the rows of x1; x2 must be None")
    if not isinstance(params, _core.FcParams):
        raise TypeError(f"arcflow (CUDA): params must be an arcflow._core.FcParams, got {type(params).__name__}")
    if is_device_array(a1) or is_device_array(a2):
        try:
            import cupy as cp
        except ImportError:
            raise TypeError("arcflow (CUDA): GPU arrays as input need CuPy installed for the GPU result; "
                            "pass NumPy arrays to get NumPy back") from None
        if not is_device_array(a1) or (a2 is not None and not is_device_array(a2)):
            raise TypeError("arcflow (CUDA): x1 and x2 must both be GPU arrays or both host arrays")
        dtype = _result_dtype(a1, a2)
        with cp.cuda.Device(cp.asarray(a1).device.id) as dev:
            x1 = _device_matrix(cp, a1, "x1", dtype)
            x2 = None if a2 is None else _device_matrix(cp, a2, "x2", dtype)
            if x2 is not None and x2.shape[1] != x1.shape[1]:
                raise ValueError(f"arcflow (CUDA): x1 and x2 must have the same number of columns, "
                                 f"got {x1.shape} and {x2.shape}")
            n1, d = x1.shape
            n2 = n1 if x2 is None else x2.shape[0]
            shape = (n1,) if diag else (n1, n2)
            out_n = cp.empty(shape, dtype=dtype) if want_nngp else None
            out_t = cp.empty(shape, dtype=dtype) if want_ntk else None
            f32 = dtype == np.float32
            stream = int(cp.cuda.get_current_stream().ptr)
            if n1 > 0 and n2 > 0 and (want_nngp or want_ntk):
                if diag:
                    fn = _core.fc_diag_cuda_f32 if f32 else _core.fc_diag_cuda_f64
                    fn(_ptr(x1), n1, d, params, _ptr(out_n), _ptr(out_t), int(dev.id), stream)
                else:
                    fn = _core.fc_kernels_cuda_f32 if f32 else _core.fc_kernels_cuda_f64
                    fn(_ptr(x1), _ptr(x2), n1, n2, d, params, _ptr(out_n), _ptr(out_t), int(dev.id), stream)
        return out_n, out_t

    a1 = np.asarray(a1)
    dtype = _result_dtype(a1, a2)
    if a1.dtype != dtype or not a1.flags.c_contiguous:
        a1 = np.ascontiguousarray(a1, dtype=dtype)
    if a2 is not None:
        a2 = np.asarray(a2)
        if a2.dtype != dtype or not a2.flags.c_contiguous:
            a2 = np.ascontiguousarray(a2, dtype=dtype)
    if a1.ndim != 2 or (a2 is not None and (a2.ndim != 2 or a2.shape[1] != a1.shape[1])):
        raise ValueError("arcflow (CUDA): x1 and x2 must be 2-D with the same number of columns")
    n1 = a1.shape[0]
    n2 = n1 if a2 is None else a2.shape[0]
    dev = -1 if device is None else int(device)
    if n1 == 0 or n2 == 0:
        shape = (n1,) if diag else (n1, n2)
        return (np.empty(shape, dtype) if want_nngp else None, np.empty(shape, dtype) if want_ntk else None)
    f32 = dtype == np.float32
    if diag:
        fn = _core.fc_diag_cuda_host_f32 if f32 else _core.fc_diag_cuda_host_f64
        return tuple(fn(a1, params, bool(want_nngp), bool(want_ntk), dev))
    fn = _core.fc_kernels_cuda_host_f32 if f32 else _core.fc_kernels_cuda_host_f64
    return tuple(fn(a1, a2, params, bool(want_nngp), bool(want_ntk), dev))


def device_info(device: int = 0) -> dict:
    """Name, memory, compute capability and multiprocessors of a CUDA device."""
    _require()
    return dict(_core.cuda_device_info(int(device)))


def asin_throughput(single_precision: bool = True, device: int = 0) -> float:
    """Arcsine throughput of the whole device (elements per second), for the roofline of bench/gpu_compare.py."""
    _require()
    return float(_core._bench.asin_throughput(bool(single_precision), int(device)))
