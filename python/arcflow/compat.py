"""Drop-in replacements for the NumPy NTK code of Arora et al. (ICLR 2020, the 90-dataset UCI study).

``kernel_value_batch(X, d_max)`` returns what the published ``kernel_value_batch`` returns: an array K of
shape (d_max, d_max, N, N) where K[dep][fix] is the NTK of depth dep + 1 with the first fix layers frozen
(zero where fix > dep), for ReLU with c_sigma = 1 and Sigma^0 = X X^T (no 1/d, no bias). The original runs
d_max^2 layer updates over N x N temporaries; this runs ONE fused recursion that carries every fix at once.

Differences from the original, both deliberate: collinear pairs (the diagonal, duplicate rows) are exact here,
where the original's arccos(1 - eps) is off by about 1e-8; rows with |x|^2 < 1e-9 (the original clips
sqrt(L L^T) at 1e-9) give the exact limit here.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from . import _core
from . import _dispatch as dp
from ._kernels import _choose_device, _engine_call, _run_rows, fc_params, kernels
from .activations import ReLU

__all__ = ["kernel_value_batch", "kernel_value"]


def _prepare(X, d_max, where):
    d_max = dp.check_depth(d_max, where, "d_max", minimum=1)
    a = dp.as_matrix(X, "X", where)
    dp.check_finite(a, "X", where)
    return dp.as_engine_input(a, np.float64), d_max


def _relu_params(depth, fix_dep):
    # The reference code's recursion: ReLU, w_std = 1, no bias, Sigma^0 = X X^T (gram_scale 1, no 1/d).
    return fc_params(ReLU(), depth, w_var=1.0, b_var=0.0, gram_scale=1.0, fix_dep=fix_dep)


def _ntk_gpu(a, depth, fix_dep):
    # Sigma^0 = X X^T: w_std = sqrt(d) undoes the 1/d of the ntk parameterization in the first layer, and
    # the ReLU kernel is homogeneous, so the whole recursion with w_std = 1 is the same up to that factor d.
    d = a.shape[1]
    return d * kernels(a, None, depth=depth, activation="relu", w_std=1.0, b_std=0.0, fix_dep=fix_dep,
                       get=("ntk",), device="cuda").ntk


def kernel_value_batch(X, d_max: int, *, threads: Optional[int] = None, progress: bool = False,
                       device: str = "cpu") -> np.ndarray:
    """All NTKs K[dep][fix] of depth 1..d_max with 0..d_max-1 frozen layers, shape (d_max, d_max, N, N).

    device="cuda" runs one GPU pass per (dep, fix) instead of the single fused CPU pass.
    """
    where = "arcflow.compat.kernel_value_batch"
    a, d_max = _prepare(X, d_max, where)
    if _choose_device(device, a, None, where) is True:
        K = dp.allocate((d_max, d_max) + (a.shape[0],) * 2, np.float64, where, zero=True)
        for dep in range(d_max):
            for fix in range(dep + 1):
                K[dep, fix] = _ntk_gpu(a, dep, fix)
        return K
    threads = dp.check_threads(threads, where)
    progress = dp.check_bool(progress, "progress", where)
    n = a.shape[0]
    shape = (d_max, d_max, n, n)
    nbytes = int(np.prod(shape, dtype=object)) * 8 + dp.engine_bytes(n, None, a.shape[1], d_max - 1, 8, threads,
                                                                       False, n_all=d_max)
    dp.check_allocation(nbytes, where, f"the output (shape {shape}, float64) with the kernel engine's buffers",
                        hint="use fewer rows of X or a smaller d_max (the output grows as d_max^2 N^2)")
    K = dp.allocate(shape, np.float64, where, zero=True)
    if n:
        eng = _engine_call(where, _core.FcEngineF64, a, None, _relu_params(d_max - 1, 0))
        _run_rows(eng, n, n, d_max * d_max, True, (None, None, K), threads, progress, where, a.shape[1])
    return K


def kernel_value(X, d_max: int, fix_dep: int, *, threads: Optional[int] = None,
                 device: str = "cpu") -> np.ndarray:
    """The NTK of depth d_max with the first fix_dep layers frozen, shape (N, N) (=
    kernel_value_batch[d_max-1][fix_dep])."""
    where = "arcflow.compat.kernel_value"
    a, d_max = _prepare(X, d_max, where)
    fix_dep = dp.check_depth(fix_dep, where, "fix_dep")
    if _choose_device(device, a, None, where) is True:
        if fix_dep >= d_max:
            return np.zeros((a.shape[0],) * 2)
        return _ntk_gpu(a, d_max - 1, fix_dep)
    threads = dp.check_threads(threads, where)
    n = a.shape[0]
    nbytes = n * n * 8 + dp.engine_bytes(n, None, a.shape[1], d_max - 1, 8, threads, False)
    dp.check_allocation(nbytes, where, f"the output (shape ({n}, {n}), float64) with the kernel engine's buffers",
                        hint="use fewer rows of X")
    K = dp.allocate((n, n), np.float64, where)
    if n:
        eng = _engine_call(where, _core.FcEngineF64, a, None, _relu_params(d_max - 1, min(fix_dep, d_max)))
        _run_rows(eng, n, n, d_max, True, (None, K, None), threads, False, where, a.shape[1])
    return K
