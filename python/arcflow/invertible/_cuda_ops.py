"""The CUDA provider of the invertible blocks' ops (see ``_backend``): the C++ CUDA launchers on CuPy arrays.

Device input (CuPy, or anything with ``__cuda_array_interface__``) is wrapped by CuPy without a copy, cast to
the compute dtype and made C-contiguous on the device; results are CuPy arrays on the input's device. Every op
runs a kernel of cpp/src/cuda/invertible.cu on CuPy's current stream; the host synchronisations are the
finiteness checks (the input's, as on the CPU: NaN/Inf is a ValueError; the outputs') and ActNorm's
data-dependent initialisation. The blocks' algorithms are in irevnet.py and flows.py, written once for every
provider; this module holds only the kernels.

CuPy is imported lazily, on the first device array. Without CuPy, or with an arcflow built without CUDA, or
with no GPU, a device array raises RuntimeError saying which.
"""
from __future__ import annotations

import numpy as np

from .. import _core, _cuda
from ._backend import DeviceOps, is_device_array

__all__ = ["is_device_array"]


# ---- the kernels ---------------------------------------------------------------------------------------------

def _suffix(dt) -> str:
    return "f32" if np.dtype(dt) == np.float32 else "f64"


class _CudaOps(DeviceOps):
    """The C++ CUDA launchers on CuPy arrays (C-contiguous, one dtype, one device), on CuPy's current stream."""

    def __init__(self, cp):
        self.xp = cp

    @staticmethod
    def _p(a) -> int:
        return 0 if a is None else int(a.data.ptr)

    def _ctx(self, a):
        return int(a.device.id), int(self.xp.cuda.get_current_stream().ptr)

    @staticmethod
    def _fn(name: str, dt):
        return getattr(_core, f"{name}_cuda_{_suffix(dt)}")

    def scope(self, x):
        """The device of the call's first array (the first of a pair)."""
        first = x[0] if isinstance(x, (tuple, list)) else x
        if not hasattr(first, "__cuda_array_interface__"):  # a host array next to a device one: input() says so
            return super().scope(x)
        return self.xp.cuda.Device(self.xp.asarray(first).device.id)

    def device_key(self, a):
        return int(a.device.id)

    def upload(self, host, dt):
        return self.xp.asarray(np.ascontiguousarray(host, dtype=dt))

    def conv2d(self, x, w, bias, stride, pad, *, in_scale=None, in_shift=None, in_relu=False, alpha=1.0,
               addend=None, out=None):
        """out = [addend +] (alpha * conv2d(act(x), w) + bias); addend may be out (accumulate)."""
        n, c, h, wd = x.shape
        m, _, kh, kw = w.shape
        ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
        if out is None:
            out = self.xp.empty((n, m, ho, wo), dtype=x.dtype)
        dev, st = self._ctx(x)
        p = self._p
        self._fn("conv2d", x.dtype)(p(x), p(w), p(bias), n, c, h, wd, m, kh, kw, int(stride), int(pad), p(in_scale),
                                    p(in_shift), bool(in_relu), float(alpha), p(addend), p(out), dev, st)
        return out

    def channel_affine(self, x, scale, shift, relu):
        y = self.xp.empty_like(x)
        n, c = x.shape[:2]
        dev, st = self._ctx(x)
        self._fn("channel_affine", x.dtype)(self._p(x), n, c, x.size // max(n * c, 1), self._p(scale), self._p(shift),
                                            bool(relu), self._p(y), dev, st)
        return y

    def psi(self, x, b):
        n, c, h, w = x.shape
        y = self.xp.empty((n, c * b * b, h // b, w // b), dtype=x.dtype)
        dev, st = self._ctx(x)
        self._fn("psi", x.dtype)(self._p(x), n, c, h, w, b, self._p(y), dev, st)
        return y

    def psi_inverse(self, y, b):
        n, cb, ho, wo = y.shape
        x = self.xp.empty((n, cb // (b * b), ho * b, wo * b), dtype=y.dtype)
        dev, st = self._ctx(y)
        self._fn("psi_inverse", y.dtype)(self._p(y), n, cb // (b * b), ho * b, wo * b, b, self._p(x), dev, st)
        return x

    def actnorm(self, x, loc, scale, inverse):
        y = self.xp.empty_like(x)
        n, c, h, w = x.shape
        dev, st = self._ctx(x)
        self._fn("actnorm", x.dtype)(self._p(x), n, c, h * w, self._p(loc), self._p(scale), bool(inverse), self._p(y),
                                     dev, st)
        return y

    def affine_coupling(self, x, net, c1, c2, clamp, inverse, want_s):
        n, c, h, w = x.shape
        y = self.xp.empty_like(x)
        s = self.xp.empty((n, c2, h, w), dtype=x.dtype) if want_s else None
        dev, st = self._ctx(x)
        self._fn("affine_coupling", x.dtype)(self._p(x), self._p(net), n, c1, c2, h * w, float(clamp), bool(inverse),
                                             self._p(y), self._p(s), dev, st)
        return y, s

    def channel_copy(self, src, s0, count, dst, d0):
        """dst[:, d0:d0+count] = src[:, s0:s0+count] (both (N, C, H, W) C-contiguous)."""
        n, cs, h, w = src.shape
        dev, st = self._ctx(src)
        self._fn("channel_copy", src.dtype)(self._p(src), n, cs, s0, self._p(dst), dst.shape[1], d0, count, h * w,
                                            dev, st)


_OPS = None


def _backend():
    """The ops object; RuntimeError when the GPU path cannot run (no CUDA build, no device, no CuPy)."""
    global _OPS
    if _OPS is not None:
        return _OPS
    if not _cuda.built() or not getattr(_core, "built_with_cuda_invertible", False):
        raise RuntimeError("arcflow: a GPU array was given, but arcflow was built without CUDA (rebuild with nvcc "
                           "on the PATH and ARCFLOW_CUDA=ON), so the invertible blocks run on NumPy arrays only")
    if _cuda.device_count() == 0:
        raise RuntimeError(f"arcflow: a GPU array was given, but no CUDA device is usable ({_cuda.status()})")
    try:
        import cupy
    except ImportError:
        raise RuntimeError("arcflow: GPU arrays in the invertible blocks need CuPy (pip install cupy-cuda13x or "
                           "the wheel for your CUDA); pass NumPy arrays to use the CPU") from None
    _OPS = _CudaOps(cupy)
    return _OPS
