"""The invertible blocks on CUDA device arrays (CuPy, or anything with ``__cuda_array_interface__``).

The blocks in irevnet.py and flows.py call into this module when their input is a device array; NumPy input
never reaches it. Device input is wrapped by CuPy without a copy, cast to float32 (float32 input) or float64
(anything else) and made C-contiguous on the device; the result is a CuPy array of that dtype on the input's
device. Every op runs the C++ CUDA kernels (cpp/src/cuda/invertible.cu) on CuPy's current stream; the only
host synchronisations are the finiteness checks of the input (as the CPU path: NaN/Inf is a ValueError) and of
the coupling network's output, and ActNorm's data-dependent initialisation (C means and deviations come back).

Weights are uploaded once per (dtype, device) and cached: IRevNetBlock keeps them in its weight cache (cleared
by load_state_dict / reset_parameters), the other blocks key theirs by the identity of the host arrays, which
load_state_dict replaces.

CuPy is imported lazily, on the first device array. Without CuPy, or with an arcflow built without CUDA, or
with no GPU, a device array raises RuntimeError saying which.

All kernels go through one "ops" object (:class:`_CudaOps`); the test suite swaps in a NumPy twin built on the
CPU ops to check this module's orchestration on machines without a GPU (tests/test_invertible_cuda.py).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np

from .. import _core, _cuda
from . import _ops

__all__ = ["is_device_array"]


def is_device_array(x) -> bool:
    """True for a GPU array, or a pair containing one."""
    if isinstance(x, (tuple, list)):
        return any(is_device_array(v) for v in x)
    return x is not None and hasattr(x, "__cuda_array_interface__")


# ---- the kernels ---------------------------------------------------------------------------------------------

def _suffix(dt) -> str:
    return "f32" if np.dtype(dt) == np.float32 else "f64"


class _CudaOps:
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

    def device_scope(self, a):
        return self.xp.cuda.Device(a.device.id)

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


# ---- input checks (the messages of the CPU path) ----------------------------------------------------------------

def _dev_array(ops, x, where: str, expected: str, channels: Optional[int] = None, even_hw: bool = False,
               block: Optional[int] = None, hw=None):
    """x as a C-contiguous float32/float64 (N, C, H, W) device array with finite entries, or ValueError/TypeError."""
    xp = ops.xp
    if not is_device_array(x) and not isinstance(x, xp.ndarray):
        raise TypeError(f"{where}: mixing host (NumPy) and GPU arrays; got a {type(x).__name__} next to a GPU array")
    xa = xp.asarray(x)
    _ops.check_nchw_shape(xa, where, expected, channels, block if block is not None else (2 if even_hw else None),
                          hw=hw)
    dt = np.float32 if xa.dtype == np.float32 else np.float64
    xa = xp.ascontiguousarray(xa, dtype=dt)
    if xa.size and not bool(xp.isfinite(xa).all()):
        raise ValueError(f"{where}: input contains NaN or Inf")
    return xa


def _gather(ops, parts, c0: int, c1: int):
    """Channels [c0, c1) of the channel concatenation of ``parts`` (N, C_i, H, W), channels past the end being
    zeros (injective padding), as a new C-contiguous array."""
    xp = ops.xp
    first = parts[0]
    n, _, h, w = first.shape
    total = sum(p.shape[1] for p in parts)
    out = (xp.zeros if c1 > total else xp.empty)((n, c1 - c0, h, w), dtype=first.dtype)
    start = 0
    for p in parts:
        lo, hi = max(c0, start), min(c1, start + p.shape[1])
        if hi > lo:
            ops.channel_copy(p, lo - start, hi - lo, out, lo - c0)
        start += p.shape[1]
    return out


def _scope(ops, x):
    first = x[0] if isinstance(x, (tuple, list)) else x
    if hasattr(ops, "device_scope") and hasattr(first, "__cuda_array_interface__"):
        return ops.device_scope(ops.xp.asarray(first))
    return contextlib.nullcontext()


def _cached(owner, attr: str, refs, build):
    """A per-owner cache of uploaded weights keyed by the identity of the host arrays ``refs`` (load_state_dict
    replaces them, so a weight change invalidates the entry)."""
    store = owner.__dict__.setdefault(attr, {})
    key, fresh = build
    hit = store.get(key)
    if hit is not None and len(hit[0]) == len(refs) and all(a is b for a, b in zip(hit[0], refs)):
        return hit[1]
    val = fresh()
    store[key] = (tuple(refs), val)
    return val


# ---- SpaceToDepth and InjectivePad ----------------------------------------------------------------------------

def psi_forward(blk, x):
    ops = _backend()
    b = blk.block
    with _scope(ops, x):
        xa = _dev_array(ops, x, repr(blk), f"(N, C, H, W) with H, W divisible by {b}", block=b)
        return ops.psi(xa, b)


def psi_inverse(blk, y):
    ops = _backend()
    b = blk.block
    with _scope(ops, y):
        ya = ops.xp.asarray(y)
        if ya.ndim != 4 or ya.shape[1] % (b * b):
            raise ValueError(f"{blk!r}.inverse: expected input of shape (N, C*{b * b}, H, W), got shape {ya.shape}")
        ya = _dev_array(ops, ya, f"{blk!r}.inverse", f"(N, C*{b * b}, H, W)")
        return ops.psi_inverse(ya, b)


def zeros_logdet(x):
    """0 per sample, on the device of x, in its compute dtype."""
    ops = _backend()
    with _scope(ops, x):
        xa = ops.xp.asarray(x[0] if isinstance(x, (tuple, list)) else x)
        return ops.xp.zeros(xa.shape[0], dtype=np.float32 if xa.dtype == np.float32 else np.float64)


def pad_forward(blk, x):
    ops = _backend()
    with _scope(ops, x):
        xa = _dev_array(ops, x, repr(blk), "(N, C, H, W)")
        return _gather(ops, [xa], 0, xa.shape[1] + blk.pad)


def pad_inverse(blk, y):
    ops = _backend()
    with _scope(ops, y):
        ya = ops.xp.asarray(y)
        if ya.ndim != 4 or ya.shape[1] < blk.pad:
            raise ValueError(f"{blk!r}.inverse: expected input of shape (N, C + {blk.pad}, H, W), got shape "
                             f"{ya.shape}")
        ya = _dev_array(ops, ya, f"{blk!r}.inverse", f"(N, C + {blk.pad}, H, W)")
        return _gather(ops, [ya], 0, ya.shape[1] - blk.pad)


# ---- IRevNetBlock ---------------------------------------------------------------------------------------------

def _block_weights(ops, blk, dt, dev_key):
    """[(bn (scale, shift) or None, conv weight)] on the device, cached in the block's weight cache."""
    key = ("cuda", np.dtype(dt).str, dev_key)
    c = blk._cache.get(key)
    if c is None:
        c = [(None if bn is None else (ops.upload(bn[0], dt), ops.upload(bn[1], dt)), ops.upload(w, dt))
             for bn, w in blk._compute(np.dtype(dt))]
        blk._cache[key] = c
    return c


def _residual(ops, blk, x2, out, alpha, addend=None):
    """out = addend + alpha * F(x2) (addend None: out += alpha * F(x2)), as IRevNetBlock._residual."""
    layers = _block_weights(ops, blk, x2.dtype, ops.device_key(x2))
    h = x2
    last = len(layers) - 1
    for i, (bn, w) in enumerate(layers):
        stride = blk.stride if i == 0 else 1
        kw = dict(in_scale=bn[0], in_shift=bn[1], in_relu=True) if bn is not None else {}
        if i < last:
            h = ops.conv2d(h, w, None, stride, 1, **kw)
        else:
            ops.conv2d(h, w, None, stride, 1, out=out, addend=out if addend is None else addend, alpha=alpha, **kw)


def block_forward_pair(ops, blk, x1, x2):
    xp = ops.xp
    if blk.injective:
        parts = [x1, x2]
        x1, x2 = _gather(ops, parts, 0, blk.out_ch), _gather(ops, parts, blk.out_ch, 2 * blk.out_ch)
    if blk.stride == 2:
        y1 = ops.psi(x1, 2)
        a = ops.psi(x2, 2)
        _residual(ops, blk, x2, y1, 1.0)
    else:
        y1 = xp.empty(x1.shape, x1.dtype)
        a = x2
        _residual(ops, blk, x2, y1, 1.0, addend=x1)
    return a, y1


def block_inverse_pair(ops, blk, a, b):
    xp = ops.xp
    x2 = ops.psi_inverse(a, 2) if blk.stride == 2 else a
    t = xp.empty(b.shape, b.dtype)
    _residual(ops, blk, x2, t, -1.0, addend=b)
    x1 = ops.psi_inverse(t, 2) if blk.stride == 2 else t
    if blk.injective:
        n1 = blk.in_ch // 2
        parts = [x1, x2]
        return _gather(ops, parts, 0, n1), _gather(ops, parts, n1, blk.in_ch)
    return x1, x2


def _block_input(ops, blk, x, where, inverse):
    """IRevNetBlock._input_pair on device arrays: (x1, x2, merged?)."""
    def check(a, where_, expected, channels, even):
        return _dev_array(ops, a, where_, expected, channels, even)

    def unify(x1, x2):
        if x1.dtype != x2.dtype:
            return x1.astype(np.float64), x2.astype(np.float64)
        return x1, x2

    def split(xa, c1):
        return _gather(ops, [xa], 0, c1), _gather(ops, [xa], c1, xa.shape[1])

    return blk._input_pair(x, where, inverse, check=check, unify=unify, split=split)


def block_forward(blk, x):
    ops = _backend()
    with _scope(ops, x):
        x1, x2, merged = _block_input(ops, blk, x, repr(blk), inverse=False)
        a, b = block_forward_pair(ops, blk, x1, x2)
        return _gather(ops, [a, b], 0, a.shape[1] + b.shape[1]) if merged else (a, b)


def block_inverse(blk, y):
    ops = _backend()
    with _scope(ops, y):
        a, b, merged = _block_input(ops, blk, y, f"{blk!r}.inverse", inverse=True)
        x1, x2 = block_inverse_pair(ops, blk, a, b)
        return _gather(ops, [x1, x2], 0, x1.shape[1] + x2.shape[1]) if merged else (x1, x2)


def block_bottleneck(blk, x2):
    ops = _backend()
    with _scope(ops, x2):
        x2 = _dev_array(ops, x2, f"{blk!r}.bottleneck", f"(N, {blk.f_in}, H, W)", blk.f_in, blk.stride == 2)
        n, _, h, w = x2.shape
        out = ops.xp.zeros((n, blk.out_ch, h // blk.stride, w // blk.stride), dtype=x2.dtype)
        _residual(ops, blk, x2, out, 1.0)
        return out


# ---- IRevNet ----------------------------------------------------------------------------------------------------

def irevnet_forward(net, x):
    ops = _backend()
    c, h, w = net.in_shape
    with _scope(ops, x):
        xa = _dev_array(ops, x, "IRevNet.forward", f"(N, {c}, {h}, {w})", c, hw=(h, w))
        if net.init_ds:
            xa = ops.psi(xa, net.init_ds)
        n = net.in_ch // 2
        pair = (_gather(ops, [xa], 0, n), _gather(ops, [xa], n, xa.shape[1]))
        for blk in net.stack:
            pair = block_forward_pair(ops, blk, *pair)
        return _gather(ops, list(pair), 0, pair[0].shape[1] + pair[1].shape[1])


def irevnet_inverse(net, z):
    ops = _backend()
    c, h, w = net.out_shape
    with _scope(ops, z):
        za = _dev_array(ops, z, "IRevNet.inverse", f"(N, {c}, {h}, {w})", c, hw=(h, w))
        half = za.shape[1] // 2
        pair = (_gather(ops, [za], 0, half), _gather(ops, [za], half, za.shape[1]))
        for blk in reversed(net.stack):
            pair = block_inverse_pair(ops, blk, *pair)
        x = _gather(ops, list(pair), 0, pair[0].shape[1] + pair[1].shape[1])
        if net.init_ds:
            x = ops.psi_inverse(x, net.init_ds)
        return x


def irevnet_classify(net, z):
    """Logits = linear(avg_pool(relu(bn1(z)))): BN+ReLU and the linear layer (a 1x1 convolution of the pooled
    features) run as arcflow kernels, the pooling as a CuPy mean; no cuBLAS needed."""
    from .irevnet import _BN_EPS

    ops = _backend()
    xp = ops.xp
    c, h, w = net.out_shape
    with _scope(ops, z):
        za = _dev_array(ops, z, "IRevNet.classify", f"(N, {c}, {h}, {w})", c)
        if za.shape[2:] != (h, w):
            raise ValueError(f"IRevNet.classify: expected input of shape (N, {c}, {h}, {w}), got shape {za.shape}")
        dt = za.dtype
        ds = net.ds
        hq, wq = h // ds, w // ds
        if hq < 1 or wq < 1:
            raise ValueError(f"IRevNet.classify: pooling window {ds} larger than the representation {h}x{w}")
        p = net._head
        nf = c * hq * wq
        if p["linear.weight"].shape[1] != nf:
            raise ValueError(f"IRevNet.classify: pooled features {nf} do not match linear.weight "
                             f"{p['linear.weight'].shape} (the reference needs the pooled map to be 1x1)")
        keys = ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "linear.weight", "linear.bias")

        def fresh():
            scale, shift = _ops.batchnorm_scale_shift(p["bn1.weight"], p["bn1.bias"], p["bn1.running_mean"],
                                                      p["bn1.running_var"], _BN_EPS, dtype=dt)
            wl = p["linear.weight"].astype(dt)
            return (ops.upload(scale, dt), ops.upload(shift, dt),
                    ops.upload(wl.reshape(wl.shape[0], wl.shape[1], 1, 1), dt), ops.upload(p["linear.bias"], dt))

        scale, shift, wl, bl = _cached(net, "_cuda_head", [p[k] for k in keys],
                                       (("head", np.dtype(dt).str, ops.device_key(za)), fresh))
        a = ops.channel_affine(za, scale, shift, True)
        n = a.shape[0]
        pooled = a[:, :, : hq * ds, : wq * ds].reshape(n, c, hq, ds, wq, ds).mean(axis=(3, 5)).reshape(n, -1, 1, 1)
        pooled = xp.ascontiguousarray(pooled, dtype=dt)
        return ops.conv2d(pooled, wl, bl, 1, 0).reshape(n, -1)


# ---- flows: ActNorm, InvertibleConv1x1, AffineCoupling, Sequential --------------------------------------------

def actnorm_initialize(blk, x):
    ops = _backend()
    xp = ops.xp
    with _scope(ops, x):
        xa = _dev_array(ops, x, "ActNorm.initialize", f"(N, {blk.channels}, H, W)", blk.channels)
        if xa.shape[0] * xa.shape[2] * xa.shape[3] == 0:
            raise ValueError(f"ActNorm.initialize: expected a non-empty batch of shape (N, {blk.channels}, H, W), "
                             f"got shape {xa.shape}")
        xd = xa.astype(np.float64)
        loc = xd.mean(axis=(0, 2, 3))
        scale = xp.sqrt(((xd - loc.reshape(1, -1, 1, 1)) ** 2).mean(axis=(0, 2, 3)))
        loc, scale = _to_host(loc), _to_host(scale)
        scale[~(scale > 0)] = 1.0
        blk.loc, blk.scale, blk.initialized = loc, scale, True


def _to_host(a) -> np.ndarray:
    return np.asarray(a.get() if hasattr(a, "get") else a, dtype=np.float64)


def _actnorm_coeffs(ops, blk, dt, dev_key):
    return _cached(blk, "_cuda_coeffs", [blk.loc, blk.scale],
                   (("actnorm", np.dtype(dt).str, dev_key),
                    lambda: (ops.upload(blk.loc, dt), ops.upload(blk.scale, dt))))


def actnorm_forward(blk, x, return_logdet):
    ops = _backend()
    with _scope(ops, x):
        xa = _dev_array(ops, x, "ActNorm", f"(N, {blk.channels}, H, W)", blk.channels)
        if not blk.initialized:
            actnorm_initialize(blk, xa)
        loc, scale = _actnorm_coeffs(ops, blk, xa.dtype, ops.device_key(xa))
        y = ops.actnorm(xa, loc, scale, False)
        if return_logdet:
            ld = -xa.shape[2] * xa.shape[3] * np.sum(np.log(np.abs(blk.scale)))
            return y, ops.xp.full(xa.shape[0], ld, dtype=xa.dtype)
        return y


def actnorm_inverse(blk, y):
    ops = _backend()
    if not blk.initialized:
        raise ValueError("ActNorm.inverse: the block is not initialised (run forward or initialize(x) on data, "
                         "or load_state_dict, first)")
    with _scope(ops, y):
        ya = _dev_array(ops, y, "ActNorm.inverse", f"(N, {blk.channels}, H, W)", blk.channels)
        loc, scale = _actnorm_coeffs(ops, blk, ya.dtype, ops.device_key(ya))
        return ops.actnorm(ya, loc, scale, True)


def _conv1x1_weights(ops, blk, dt, dev_key, where):
    blk._check_dtype(np.dtype(dt), where)  # W^-1 must be accurate in dt, as on the CPU
    mats = blk._matrices()  # (W, W^-1, log|det W|), a new tuple whenever the weights change
    c = blk.channels
    return _cached(blk, "_cuda_mats", [mats],
                   (("conv1x1", np.dtype(dt).str, dev_key),
                    lambda: (ops.upload(mats[0].reshape(c, c, 1, 1), dt), ops.upload(mats[1].reshape(c, c, 1, 1), dt),
                             mats[2])))


def conv1x1_forward(blk, x, return_logdet):
    ops = _backend()
    with _scope(ops, x):
        xa = _dev_array(ops, x, "InvertibleConv1x1", f"(N, {blk.channels}, H, W)", blk.channels)
        w, _, ld = _conv1x1_weights(ops, blk, xa.dtype, ops.device_key(xa), "InvertibleConv1x1")
        y = ops.conv2d(xa, w, None, 1, 0)
        if return_logdet:
            return y, ops.xp.full(xa.shape[0], xa.shape[2] * xa.shape[3] * ld, dtype=xa.dtype)
        return y


def conv1x1_inverse(blk, y):
    ops = _backend()
    with _scope(ops, y):
        ya = _dev_array(ops, y, "InvertibleConv1x1.inverse", f"(N, {blk.channels}, H, W)", blk.channels)
        _, w_inv, _ = _conv1x1_weights(ops, blk, ya.dtype, ops.device_key(ya), "InvertibleConv1x1.inverse")
        return ops.conv2d(ya, w_inv, None, 1, 0)


def _coupling_net(ops, blk, x1):
    """(N, 2*c2, H, W) = NN(x1) on the device: the default subnet with fused ReLUs, or the user's subnet."""
    xp = ops.xp
    n, _, h, w = x1.shape
    dt = x1.dtype
    if blk.subnet is None:
        p = blk._params
        keys = ("subnet.0.weight", "subnet.0.bias", "subnet.2.weight", "subnet.2.bias", "subnet.4.weight",
                "subnet.4.bias")
        w0, b0, w2, b2, w4, b4 = _cached(blk, "_cuda_params", [p[k] for k in keys],
                                         (("subnet", np.dtype(dt).str, ops.device_key(x1)),
                                          lambda: tuple(ops.upload(p[k], dt) for k in keys)))
        a = ops.conv2d(x1, w0, b0, 1, 1)
        a = ops.conv2d(a, w2, b2, 1, 0, in_relu=True)
        a = ops.conv2d(a, w4, b4, 1, 1, in_relu=True)
    else:
        a = xp.asarray(blk.subnet(x1))
        want = (n, 2 * blk.c2, h, w)
        if a.shape != want:
            raise ValueError(f"AffineCoupling: subnet returned shape {a.shape}, expected {want}")
        a = xp.ascontiguousarray(a, dtype=dt)
    if not bool(xp.isfinite(a).all()):
        raise ValueError("AffineCoupling: the coupling network returned NaN or Inf")
    return a


def coupling_forward(blk, x, return_logdet):
    ops = _backend()
    with _scope(ops, x):
        xa = _dev_array(ops, x, "AffineCoupling", f"(N, {blk.channels}, H, W)", blk.channels)
        a = _coupling_net(ops, blk, _gather(ops, [xa], 0, blk.c1))
        y, s = ops.affine_coupling(xa, a, blk.c1, blk.c2, blk.clamp, False, return_logdet)
        if return_logdet:
            return y, s.reshape(s.shape[0], -1).sum(axis=1)
        return y


def coupling_inverse(blk, y):
    ops = _backend()
    with _scope(ops, y):
        ya = _dev_array(ops, y, "AffineCoupling.inverse", f"(N, {blk.channels}, H, W)", blk.channels)
        a = _coupling_net(ops, blk, _gather(ops, [ya], 0, blk.c1))
        return ops.affine_coupling(ya, a, blk.c1, blk.c2, blk.clamp, True, False)[0]


def sequential_forward(seq, x, return_logdet):
    """Sequential.forward with the log-determinants kept on the device."""
    ops = _backend()
    with _scope(ops, x):
        return seq._forward(x, return_logdet, ops.xp)
