"""The ops interface of the invertible blocks, and its CPU provider over ``_core``.

Every block (irevnet.py, flows.py) writes its forward, inverse and log-determinant once, against an ops
object; :func:`arcflow.invertible._providers.provider_for` picks that object once per public call from the
input arrays: :class:`CpuOps` for NumPy input, the CUDA provider (``_cuda_ops._CudaOps``, a
:class:`DeviceOps`) for GPU arrays. The tests add NumPy twins of the device provider.

The interface, all on C-contiguous (N, C, H, W) arrays of one compute dtype:

    xp                                  the array module (NumPy or CuPy)
    threads, with_threads(n)            CPU threads of one op (1 on a device); the same provider with n
    as_array(x), input(x, where, ...)   x as the provider's array; validated, contiguous, in the compute dtype
    unify(x1, x2), to_host(a)           a pair in one compute dtype; a float64 NumPy copy
    empty / zeros / full, gather        allocation; channel slices and concatenation (zero-filled past the end)
    conv(x, w, b, stride, pad, ...)     conv2d with the fused input BN/ReLU and addend epilogue -> (out, flags)
    channel_affine, psi, psi_inverse    batch-norm (scale, shift) [+ ReLU]; space-to-depth and its inverse
    actnorm, affine_coupling, conv1x1   the flow blocks' elementwise / per-pixel ops
    linear                              (N, F) @ W^T + b (the classifier head)
    all_finite, check_finite_output     the NaN/Inf tests
    upload, device_key, scope           weights on the provider's memory, their cache key, the device context

Dtype rule (one for the whole package, the kernels' rule of ``arcflow._dispatch.result_dtype``, applied by
``_ops.result_dtype`` and :func:`compute_dtype`): the blocks compute in float32 when every input is a float of
at most 4 bytes (float16, float32), else in float64 (float64, integers, bools); results come back in that
dtype, and the weights are cast to it.

``conv``'s flags: bit 0 when x held NaN/Inf, bit 1 when the addend did, tested inside the C++ passes that read
those values anyway. Providers whose kernels do not test (the device ones) test every input up front in
``input`` instead and return flags 0.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import numpy as np

from . import _ops
from ._validate import check_nchw

__all__ = ["compute_dtype", "is_device_array", "Ops", "CpuOps", "DeviceOps", "cached"]


def compute_dtype(*dtypes) -> np.dtype:
    """The blocks' compute dtype for inputs of these dtypes: float32 when every one is a float of at most 4
    bytes, else float64. TypeError for a non-real dtype."""
    return _ops.result_dtype(*(np.empty(0, d) for d in dtypes))


def is_device_array(x) -> bool:
    """True for a GPU array (``__cuda_array_interface__``), or a pair containing one."""
    if isinstance(x, (tuple, list)):
        return any(is_device_array(v) for v in x)
    return x is not None and hasattr(x, "__cuda_array_interface__")


def cached(store: dict, key, refs, build):
    """``build()`` cached in ``store[key]`` while the host arrays ``refs`` are the same objects (load_state_dict
    replaces them, so a weight change invalidates the entry)."""
    hit = store.get(key)
    if hit is not None and len(hit[0]) == len(refs) and all(a is b for a, b in zip(hit[0], refs)):
        return hit[1]
    val = build()
    store[key] = (tuple(refs), val)
    return val


class Ops:
    """What the providers share: allocation, channel gathering and the finite checks on ``xp`` arrays."""

    xp = np
    threads = 1

    def as_array(self, x):
        return self.xp.asarray(x)

    def empty(self, shape, dt):
        return self.xp.empty(shape, dtype=dt)

    def zeros(self, shape, dt):
        return self.xp.zeros(shape, dtype=dt)

    def full(self, n: int, value, dt):
        return self.xp.full(n, value, dtype=dt)

    def unify(self, x1, x2):
        """A pair in one compute dtype."""
        dt = compute_dtype(x1.dtype, x2.dtype)
        return self.xp.ascontiguousarray(x1, dtype=dt), self.xp.ascontiguousarray(x2, dtype=dt)

    def gather(self, parts, c0: int, c1: int):
        """Channels [c0, c1) of the channel concatenation of ``parts`` (N, C_i, H, W), channels past the end
        being zeros (injective padding), as a new C-contiguous array."""
        first = parts[0]
        n, _, h, w = first.shape
        total = sum(p.shape[1] for p in parts)
        out = (self.zeros if c1 > total else self.empty)((n, c1 - c0, h, w), first.dtype)
        start = 0
        for p in parts:
            lo, hi = max(c0, start), min(c1, start + p.shape[1])
            if hi > lo:
                self.channel_copy(p, lo - start, hi - lo, out, lo - c0)
            start += p.shape[1]
        return out

    def channel_copy(self, src, s0: int, count: int, dst, d0: int) -> None:
        dst[:, d0:d0 + count] = src[:, s0:s0 + count]

    def all_finite(self, a) -> bool:
        return a.size == 0 or bool(self.xp.isfinite(a).all())

    def check_finite_output(self, y, where: str, what: str):
        """FloatingPointError when y (computed from finite input) holds NaN or Inf: ``what`` overflowed."""
        if not self.all_finite(y):
            raise FloatingPointError(f"{where}: {what} overflowed {y.dtype} (NaN or Inf from finite input and "
                                     f"weights)")
        return y

    def scope(self, x):
        return contextlib.nullcontext()

    def to_host(self, a) -> np.ndarray:
        return np.asarray(a.get() if hasattr(a, "get") else a, dtype=np.float64)

    def with_threads(self, threads: int) -> "Ops":
        return self


class CpuOps(Ops):
    """The C++ CPU ops (``_ops``) on NumPy arrays, each with ``threads`` OpenMP threads."""

    def __init__(self, threads: int):
        self.threads = threads

    def with_threads(self, threads: int) -> "CpuOps":
        return CpuOps(threads)

    def device_key(self, a):
        return "cpu"

    def upload(self, host, dt):
        return np.ascontiguousarray(host, dtype=dt)

    def input(self, x, where: str, expected: str, channels: Optional[int] = None, block: Optional[int] = None,
              block_why: str = "", hw: Optional[Tuple[int, int]] = None, kinds: str = "fiub", finite: bool = True,
              what: str = "input"):
        return check_nchw(x, where, expected, channels, block, block_why, hw, kinds, finite, what)

    def gather(self, parts, c0: int, c1: int):
        if len(parts) == 1 and c1 <= parts[0].shape[1]:
            return np.ascontiguousarray(parts[0][:, c0:c1])
        return super().gather(parts, c0, c1)

    def all_finite(self, a) -> bool:
        return _ops.all_finite(a)

    def conv(self, x, w, b, stride: int, pad: int, *, out=None, addend=None, accumulate: bool = False,
             alpha: float = 1.0, in_scale=None, in_shift=None, in_relu: bool = False, fused: Tuple[str, ...] = (),
             where: str = "conv2d"):
        return _ops.conv2d_flags(x, w, b, stride, pad, out=out, accumulate=accumulate, addend=addend, alpha=alpha,
                                 in_scale=in_scale, in_shift=in_shift, in_relu=in_relu, check_finite=False,
                                 fused_finite=fused, where=where, threads=self.threads)

    def channel_affine(self, x, scale, shift, relu: bool):
        return _ops.batchnorm_inference(x, scale, shift, relu, threads=self.threads)

    def psi(self, x, b: int):
        return _ops.psi(x, b, threads=self.threads)

    def psi_inverse(self, y, b: int):
        return _ops.psi_inverse(y, b, threads=self.threads)

    def actnorm(self, x, loc, scale, inverse: bool):
        lo, sc = loc.reshape(1, -1, 1, 1), scale.reshape(1, -1, 1, 1)
        with np.errstate(over="ignore", invalid="ignore"):  # the callers test the result
            return x * sc + lo if inverse else (x - lo) / sc

    def affine_coupling(self, x, net, c1: int, c2: int, clamp: float, inverse: bool, want_s: bool):
        """y = (x1, x2 * exp(s) + t) (inverse: (x1, (x2 - t) * exp(-s))) with s = soft_clamp(net[:, :c2]),
        t = net[:, c2:]; returns (y, s if want_s)."""
        s, t = soft_clamp(net[:, :c2], clamp), net[:, c2:]
        y = np.empty_like(x)
        y[:, :c1] = x[:, :c1]
        with np.errstate(over="ignore", invalid="ignore"):
            y[:, c1:] = (x[:, c1:] - t) * np.exp(-s) if inverse else x[:, c1:] * np.exp(s) + t
        return y, (s if want_s else None)

    def conv1x1(self, x, w):
        # one BLAS GEMM (C, C) @ (C, H*W) per image: np.matmul with a broadcast (C, C) operand takes a slow
        # non-BLAS loop
        n, c, h, wd = x.shape
        xs = x.reshape(n, c, h * wd)
        out = np.empty_like(xs)
        with np.errstate(over="ignore", invalid="ignore"):  # the callers test the result
            for i in range(n):
                np.matmul(w, xs[i], out=out[i])
        return out.reshape(n, c, h, wd)

    def linear(self, x, w, b):
        with np.errstate(over="ignore", invalid="ignore"):  # the callers test the result
            return x @ w.T + b


class DeviceOps(Ops):
    """The orchestration half of a device provider. A subclass gives ``xp`` and the kernels (``conv2d``
    returning ``out``, ``channel_affine``, ``psi``, ``psi_inverse``, ``actnorm``, ``affine_coupling``,
    ``channel_copy``), ``upload`` and ``device_key``; its kernels test nothing, so :meth:`input` tests every
    input for NaN/Inf."""

    def input(self, x, where: str, expected: str, channels: Optional[int] = None, block: Optional[int] = None,
              block_why: str = "", hw: Optional[Tuple[int, int]] = None, kinds: str = "fiub", finite: bool = True,
              what: str = "input"):
        xp = self.xp
        if not is_device_array(x) and not isinstance(x, xp.ndarray):
            raise TypeError(f"{where}: mixing host (NumPy) and GPU arrays; got a {type(x).__name__} next to a GPU "
                            f"array")
        xa = xp.asarray(x)
        _ops.check_nchw_shape(xa, where, expected, channels, block, block_why, hw, kinds)
        xa = xp.ascontiguousarray(xa, dtype=compute_dtype(xa.dtype))
        if not self.all_finite(xa):
            raise ValueError(f"{where}: {what} contains NaN or Inf")
        return xa

    def conv(self, x, w, b, stride: int, pad: int, *, out=None, addend=None, accumulate: bool = False,
             alpha: float = 1.0, in_scale=None, in_shift=None, in_relu: bool = False, fused: Tuple[str, ...] = (),
             where: str = "conv2d"):
        if accumulate:
            addend = out
        return self.conv2d(x, w, b, stride, pad, in_scale=in_scale, in_shift=in_shift, in_relu=in_relu,
                           alpha=alpha, addend=addend, out=out), 0

    def conv1x1(self, x, w):
        c = w.shape[0]
        return self.conv2d(x, w.reshape(c, c, 1, 1), None, 1, 0)

    def linear(self, x, w, b):
        n = x.shape[0]
        x4 = self.xp.ascontiguousarray(x.reshape(n, -1, 1, 1), dtype=w.dtype)
        return self.conv2d(x4, w.reshape(w.shape[0], w.shape[1], 1, 1), b, 1, 0).reshape(n, -1)


def soft_clamp(s_raw, clamp: float):
    """s = clamp * 0.636 * arctan(s_raw / clamp): |s| < clamp, slope 0.636 at 0 (FrEIA's GLOWCouplingBlock)."""
    if clamp <= 0:
        return s_raw
    dt = s_raw.dtype.type
    return dt(clamp * 0.636) * np.arctan(s_raw / dt(clamp))
