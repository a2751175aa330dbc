"""psi (space-to-depth), injective padding, the i-RevNet block and the whole i-RevNet (NCHW NumPy arrays).

The architecture, the pair order and the parameter names follow the reference PyTorch code of
Jacobsen, Smeulders & Oyallon, "i-RevNet: Deep Invertible Networks", ICLR 2018
(github.com/jhjacobsen/pytorch-i-revnet, models/iRevNet.py): ``state_dict()`` has the same keys and
shapes as that module, so a trained checkpoint converted to NumPy arrays loads with
``load_state_dict(..., strict=True)`` (or through :func:`from_torch`). Batch-norm always runs in inference
form (running statistics); dropout is the identity. GPU arrays (CuPy, ``__cuda_array_interface__``) run on
their device through arcflow's CUDA kernels and come back as CuPy arrays of the same dtype: every method is
written once against an ops provider (``_backend``), chosen per call from its input (``_providers``).
Dtype: float16 and float32 input compute in float32, every other real type in float64 (the package's rule,
``_backend``); the result has the compute dtype.

Two places where this code deliberately differs from the reference, because the reference inverse is
wrong there (its forward is unchanged):
- the inverse of the injective padding drops the *appended* zero channels (the reference keeps the
  first ``pad`` channels, which is right only when ``pad`` equals half the padded width);
- with ``init_ds=0`` the inverse skips the initial psi (the reference calls psi with block size 0).

Errors: NaN/Inf input is a ValueError; a value that leaves the compute dtype's range (float32 overflow) is a
FloatingPointError naming the block (``stack.i``) and the layer. Both are found by tests fused into the
convolutions' own input passes (conv2d's Conv2dFinite), not by extra passes over every intermediate.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _ops
from ._backend import Ops, cached, compute_dtype
from ._providers import provider_for
from ._validate import as_int, load_checked, rng as _rng, to_numpy

__all__ = ["SpaceToDepth", "InjectivePad", "IRevNetBlock", "IRevNet", "from_torch"]

Pair = Tuple[np.ndarray, np.ndarray]

_BN_EPS = 1e-5  # torch.nn.BatchNorm2d default, used by the reference


def _param_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


class _Stopped(Exception):
    """A worker of IRevNet._run gave up because the main thread was interrupted or another worker failed."""


class _NonFiniteInput(ValueError):
    """NaN/Inf in a block's input, found by the convolutions' fused test. Inside an IRevNet, whose input
    was finite, it means the previous block overflowed: IRevNet turns it into a FloatingPointError."""


def _load_checked(where: str, expected: "OrderedDict[str, np.ndarray]", mapping: Mapping, strict: bool
                  ) -> "OrderedDict[str, np.ndarray]":
    """load_checked with the i-RevNet's torch-style keys (tensors allowed), cast to the expected dtypes."""
    return load_checked(where, expected, mapping, strict)


class SpaceToDepth:
    """psi: (N, C, H, W) -> (N, b*b*C, H/b, W/b) in the reference i-RevNet channel order,
    ``y[n, (dy*b + dx)*C + c, i, j] = x[n, c, i*b + dy, j*b + dx]``; a permutation, so ``inverse`` is exact.

    >>> SpaceToDepth(2).forward(np.zeros((1, 3, 4, 4), np.float32)).shape
    (1, 12, 2, 2)
    """

    #: a permutation: the Jacobian determinant is +-1 (Sequential counts its logdet as 0)
    volume_preserving = True

    def __init__(self, block: int = 2):
        self.block = as_int(block, "block", "SpaceToDepth", 1)

    def __repr__(self) -> str:
        return f"SpaceToDepth(block={self.block})"

    def forward(self, x) -> np.ndarray:
        b = self.block
        where = repr(self)
        with provider_for(x, where=where) as ops:
            xa = ops.as_array(x)
            if xa.ndim != 4 or xa.shape[2] % b or xa.shape[3] % b:
                raise ValueError(f"{where}: expected input of shape (N, C, H, W) with H and W divisible by {b}, "
                                 f"got shape {xa.shape}")
            return ops.psi(ops.input(xa, where, f"(N, C, H, W) with H, W divisible by {b}"), b)

    __call__ = forward

    def inverse(self, y) -> np.ndarray:
        b = self.block
        with provider_for(y, where=repr(self)) as ops:
            ya = ops.as_array(y)
            if ya.ndim != 4 or ya.shape[1] % (b * b):
                raise ValueError(f"{self!r}.inverse: expected input of shape (N, C*{b * b}, H, W), got shape "
                                 f"{ya.shape}")
            return ops.psi_inverse(ops.input(ya, f"{self!r}.inverse", f"(N, C*{b * b}, H, W)"), b)

    def logdet(self, x) -> np.ndarray:
        """0 for every sample (a permutation)."""
        with provider_for(x, where=repr(self)) as ops:
            xa = ops.as_array(x)
            return ops.zeros(xa.shape[0], compute_dtype(xa.dtype))

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        return OrderedDict()

    def load_state_dict(self, mapping: Mapping, strict: bool = True) -> None:
        _load_checked(repr(self), OrderedDict(), mapping, strict)


class InjectivePad:
    """Append ``pad`` zero channels: (N, C, H, W) -> (N, C + pad, H, W); ``inverse`` drops them again.

    Injective, not bijective: ``inverse(forward(x)) == x`` exactly, but ``forward(inverse(y)) == y`` only
    when the last ``pad`` channels of ``y`` are zero.
    """

    def __init__(self, pad: int):
        self.pad = as_int(pad, "pad", "InjectivePad", 0)

    def __repr__(self) -> str:
        return f"InjectivePad(pad={self.pad})"

    def forward(self, x) -> np.ndarray:
        with provider_for(x, where=repr(self)) as ops:
            xa = ops.input(x, repr(self), "(N, C, H, W)")
            return ops.gather([xa], 0, xa.shape[1] + self.pad)

    __call__ = forward

    def inverse(self, y) -> np.ndarray:
        with provider_for(y, where=repr(self)) as ops:
            ya = ops.as_array(y)
            if ya.ndim != 4 or ya.shape[1] < self.pad:
                raise ValueError(f"{self!r}.inverse: expected input of shape (N, C + {self.pad}, H, W), got shape "
                                 f"{ya.shape}")
            ya = ops.input(ya, f"{self!r}.inverse", f"(N, C + {self.pad}, H, W)")
            return ops.gather([ya], 0, ya.shape[1] - self.pad)

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        return OrderedDict()

    def load_state_dict(self, mapping: Mapping, strict: bool = True) -> None:
        _load_checked(repr(self), OrderedDict(), mapping, strict)


class IRevNetBlock:
    """The additive i-RevNet block (reference ``irevnet_block``), exact forward and inverse.

    ``forward((x1, x2)) = (psi_s(x2), psi_s(x1) + F(x2))`` and ``inverse((a, b)) = (psi_s^-1(b - F(x2)), x2)``
    with ``x2 = psi_s^-1(a)``; ``F`` = [BN, ReLU,] conv3x3(stride) , BN, ReLU, conv3x3, BN, ReLU, conv3x3 with
    hidden width ``out_ch // mult`` (no leading BN-ReLU when ``first``). ``in_ch`` is the total channel
    count of the input pair, ``out_ch`` the channel count of each half of the output pair. At stride 1
    with ``2*out_ch > in_ch`` the merged input is padded with zero channels first (injective block).

    Input/output: a pair ``(x1, x2)`` of (N, C, H, W) arrays (returns a pair), or one merged array
    (N, in_ch, H, W) split as the reference does (first ``in_ch // 2`` channels, returns a merged array).
    float16 and float32 input compute in float32, anything else in float64 (the package's dtype rule); the
    weights are cast once and cached.

    >>> blk = IRevNetBlock(32, 16, stride=1, rng=0)
    >>> x = np.random.default_rng(1).standard_normal((2, 32, 8, 8)).astype(np.float32)
    >>> float(np.abs(blk.inverse(blk.forward(x)) - x).max()) < 1e-5
    True
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, first: bool = False, mult: int = 4,
                 affine_bn: bool = True, *, rng=None, dtype=np.float32):
        in_ch, out_ch, stride, mult = (as_int(v, name, "IRevNetBlock") for v, name in
                                       ((in_ch, "in_ch"), (out_ch, "out_ch"), (stride, "stride"), (mult, "mult")))
        self.in_ch, self.out_ch, self.stride, self.first = in_ch, out_ch, stride, bool(first)
        self.mult, self.affine_bn = mult, bool(affine_bn)
        self.dtype = _param_dtype(dtype)
        where = repr(self)
        if stride not in (1, 2):
            raise ValueError(f"{where}: stride must be 1 or 2")
        if in_ch < 1 or out_ch < 1 or mult < 1:
            raise ValueError(f"{where}: in_ch, out_ch and mult must be positive")
        self.pad = 2 * out_ch - in_ch
        self.injective = self.pad != 0 and stride == 1
        if stride == 1 and self.pad < 0:
            raise ValueError(f"{where}: a stride-1 block cannot shrink the channels (needs 2*out_ch >= in_ch)")
        if stride == 2 and (in_ch % 2 or out_ch != 2 * in_ch):
            raise ValueError(f"{where}: a stride-2 block needs an even in_ch and out_ch == 2*in_ch "
                             f"(psi multiplies each half's channels by 4)")
        self.hidden = out_ch // mult
        if self.hidden < 1:
            raise ValueError(f"{where}: out_ch // mult must be >= 1")
        # channels of the bottleneck input x2 (after injective padding, if any)
        self.f_in = out_ch if self.injective else in_ch // 2
        self._layout = self._make_layout()
        self._params = OrderedDict()
        self.reset_parameters(rng)

    def __repr__(self) -> str:
        return (f"IRevNetBlock(in_ch={self.in_ch}, out_ch={self.out_ch}, stride={self.stride}, "
                f"first={self.first}, mult={self.mult}, affine_bn={self.affine_bn})")

    # ---- parameters ---------------------------------------------------------------------------
    def _make_layout(self):
        """[(kind, sequential index, channels / conv shape)] in the reference nn.Sequential order."""
        h = self.hidden
        s = []
        j = 0
        if not self.first:
            s.append(("bn", j, self.f_in))
            j += 2  # BN, ReLU
        s.append(("conv", j, (h, self.f_in, 3, 3)))
        j += 1
        s.append(("bn", j, h))
        j += 2
        s.append(("conv", j, (h, h, 3, 3)))
        j += 2  # conv, Dropout
        s.append(("bn", j, h))
        j += 2
        s.append(("conv", j, (self.out_ch, h, 3, 3)))
        return s

    def reset_parameters(self, rng=None) -> None:
        """PyTorch's default initialisation, seeded: conv weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        BN weight 1, bias 0, running mean 0, running variance 1."""
        g = _rng(rng)
        p = OrderedDict()
        for kind, j, spec in self._layout:
            pre = f"bottleneck_block.{j}."
            if kind == "conv":
                fan_in = spec[1] * spec[2] * spec[3]
                bound = 1.0 / np.sqrt(fan_in)
                p[pre + "weight"] = g.uniform(-bound, bound, size=spec).astype(self.dtype)
            else:
                if self.affine_bn:
                    p[pre + "weight"] = np.ones(spec, self.dtype)
                    p[pre + "bias"] = np.zeros(spec, self.dtype)
                p[pre + "running_mean"] = np.zeros(spec, self.dtype)
                p[pre + "running_var"] = np.ones(spec, self.dtype)
                p[pre + "num_batches_tracked"] = np.array(0, dtype=np.int64)
        self._params = p
        self._cache = {}

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Copies of the parameters and buffers, keyed as the reference ``irevnet_block`` module."""
        return OrderedDict((k, v.copy()) for k, v in self._params.items())

    def load_state_dict(self, mapping: Mapping, strict: bool = True) -> None:
        """Load weights (NumPy arrays or torch tensors). Missing, unexpected (strict) or wrongly shaped
        keys raise ValueError listing them, and the weights are left unchanged."""
        new = _load_checked(repr(self), self._params, mapping, strict)
        self._params.update(new)
        self._cache = {}

    def _compute(self, dt: np.dtype):
        """Weights in the compute dtype: [(bn scale, shift) or None, conv w] x 3, cached per dtype.
        FloatingPointError when a batch-norm's scale weight / sqrt(running_var + eps) or its shift does
        not fit dt (the weights themselves were checked in their own dtype by load_state_dict)."""
        c = self._cache.get(dt)
        if c is None:
            p = self._params
            convs, bns = [], []
            for kind, j, _ in self._layout:
                pre = f"bottleneck_block.{j}."
                if kind == "conv":
                    with np.errstate(over="ignore"):
                        w = np.ascontiguousarray(p[pre + "weight"], dtype=dt)
                    if not _ops.all_finite(w):
                        raise FloatingPointError(f"{self!r}: {pre}weight overflows {dt}")
                    convs.append(w)
                else:
                    with np.errstate(over="ignore", invalid="ignore"):
                        scale, shift = _ops.batchnorm_scale_shift(p.get(pre + "weight"), p.get(pre + "bias"),
                                                                  p[pre + "running_mean"], p[pre + "running_var"],
                                                                  _BN_EPS, dtype=dt)
                    if not (_ops.all_finite(scale) and _ops.all_finite(shift)):
                        raise FloatingPointError(f"{self!r}: the batch-norm {pre[:-1]} overflows {dt} (scale "
                                                 f"weight / sqrt(running_var + eps) or shift bias - mean * scale)")
                    bns.append((scale, shift))
            pre_bn = [None] + bns if self.first else bns
            c = list(zip(pre_bn, convs))
            self._cache[dt] = c
        return c

    def conv_keys(self):
        """The state_dict prefixes of the three convolutions of F, in order (for error messages)."""
        return [f"bottleneck_block.{j}" for kind, j, _ in self._layout if kind == "conv"]

    def layers(self, ops: Ops, like):
        """[(bn (scale, shift) or None, conv weight)] in like's dtype on ops' memory, cached until the weights
        change. Call it once before several threads share the block."""
        dt = np.dtype(like.dtype)
        key = (ops.device_key(like), dt.str)
        c = self._cache.get(key)
        if c is None:
            c = [(None if bn is None else (ops.upload(bn[0], dt), ops.upload(bn[1], dt)), ops.upload(w, dt))
                 for bn, w in self._compute(dt)]
            self._cache[key] = c
        return c

    # ---- the bottleneck and the coupling --------------------------------------------------------
    def _residual(self, ops: Ops, x2, out, alpha: float, addend=None, where: Optional[str] = None) -> None:
        """out = addend + alpha * F(x2) (addend None: out += alpha * F(x2)), F run with fused (BN, ReLU) -> conv.
        ``where``: NaN/Inf tests fused into the passes that read the values anyway (every conv's input pass
        reads its raw input once, the last conv's epilogue every addend value, ``out``'s old values when
        None). NaN/Inf in x2 or the addend raises _NonFiniteInput (a ValueError, f"{where}: input contains NaN
        or Inf") after that conv, so ``out`` must be the caller's own buffer; in a hidden layer's input (x2
        and the weights finite) it raises FloatingPointError naming the layer that overflowed."""
        layers = self.layers(ops, x2)
        h = x2
        last = len(layers) - 1
        for i, (bn, w) in enumerate(layers):
            stride = self.stride if i == 0 else 1
            kw = dict(in_scale=bn[0], in_shift=bn[1], in_relu=True) if bn is not None else {}
            fused = ()
            if where is not None:
                fused = ("x",) + (("addend",) if i == last else ())
            kw.update(fused=fused, where=where or "conv2d")
            if i < last:
                h, bad = ops.conv(h, w, None, stride, 1, **kw)
            else:
                _, bad = ops.conv(h, w, None, stride, 1, out=out, accumulate=addend is None, addend=addend,
                                  alpha=alpha, **kw)
            if bad & 1 and i > 0:
                raise FloatingPointError(f"{where}: the bottleneck F overflowed {x2.dtype} in "
                                         f"{self.conv_keys()[i - 1]} (a 3x3 convolution, with the batch-norm and "
                                         f"ReLU before it): its output holds NaN or Inf")
            if bad:
                raise _NonFiniteInput(f"{where}: input contains NaN or Inf")

    def bottleneck(self, x2) -> np.ndarray:
        """F(x2) alone (the non-invertible residual branch); FloatingPointError when it overflows."""
        where = f"{self!r}.bottleneck"
        with provider_for(x2, where=where) as ops:
            x2 = ops.input(x2, where, f"(N, {self.f_in}, H, W)", self.f_in, 2 if self.stride == 2 else None,
                           " (stride 2)", finite=False)
            n, _, h, w = x2.shape
            out = ops.zeros((n, self.out_ch, h // self.stride, w // self.stride), x2.dtype)
            self._residual(ops, x2, out, 1.0, where=where)
            return ops.check_finite_output(out, where, "F(x2)")

    def forward_pair(self, ops: Ops, x1, x2, where: Optional[str] = None):
        """(x1, x2) -> (a, b) on validated C-contiguous arrays of one dtype. ``where``: test x1 and x2 for NaN/Inf
        in the convolutions (see _residual): x2 (padded) is the first conv's input, x1 (padded; psi(x1) at
        stride 2) the last conv's addend, so every value is read."""
        if self.injective:
            parts = [x1, x2]
            x1, x2 = ops.gather(parts, 0, self.out_ch), ops.gather(parts, self.out_ch, 2 * self.out_ch)
        if self.stride == 2:
            y1 = ops.psi(x1, 2)
            a = ops.psi(x2, 2)
            self._residual(ops, x2, y1, 1.0, where=where)
        else:
            y1 = ops.empty(x1.shape, x1.dtype)
            a = x2
            self._residual(ops, x2, y1, 1.0, addend=x1, where=where)
        return a, y1

    def inverse_pair(self, ops: Ops, a, b, where: Optional[str] = None, check_out: bool = False):
        """(a, b) -> (x1, x2). ``where``: test a and b for NaN/Inf in the convolutions (see _residual):
        x2 = psi_s^-1(a) is the first conv's input, b the last conv's addend. ``check_out``: FloatingPointError
        when b - F(x2) overflows (x2 is a permutation of a, so it needs no test)."""
        x2 = ops.psi_inverse(a, 2) if self.stride == 2 else a
        t = ops.empty(b.shape, b.dtype)
        self._residual(ops, x2, t, -1.0, addend=b, where=where)
        if check_out:
            ops.check_finite_output(t, where, "x1 = b - F(x2)")
        x1 = ops.psi_inverse(t, 2) if self.stride == 2 else t
        if self.injective:
            n1 = self.in_ch // 2
            parts = [x1, x2]
            return ops.gather(parts, 0, n1), ops.gather(parts, n1, self.in_ch)
        return x1, x2

    def _input_pair(self, ops: Ops, x, where: str, inverse: bool, finite: bool = False):
        """Validate a pair or a merged array; returns (x1, x2, merged?)."""
        if inverse:
            c1 = c2 = self.out_ch
            hw = "H, W"
        else:
            c1, c2 = self.in_ch // 2, self.in_ch - self.in_ch // 2
            hw = "H, W" if self.stride == 1 else "H, W (even)"
        block = 2 if self.stride == 2 and not inverse else None

        def check(a, expected, channels):
            return ops.input(a, where, expected, channels, block, " (stride 2)", finite=finite)

        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError(f"{where}: expected a pair (x1, x2) of shapes (N, {c1}, {hw}) and "
                                 f"(N, {c2}, {hw}), got {len(x)} arrays")
            x1 = check(x[0], f"(N, {c1}, {hw}) for x1", c1)
            x2 = check(x[1], f"(N, {c2}, {hw}) for x2", c2)
            if x1.shape[0] != x2.shape[0] or x1.shape[2:] != x2.shape[2:]:
                raise ValueError(f"{where}: x1 {x1.shape} and x2 {x2.shape} must agree in N, H and W")
            x1, x2 = ops.unify(x1, x2)
            return x1, x2, False
        xa = check(x, f"(N, {c1 + c2}, {hw})", c1 + c2)
        return ops.gather([xa], 0, c1), ops.gather([xa], c1, xa.shape[1]), True

    def forward(self, x: Union[np.ndarray, Pair], threads: Optional[int] = None):
        """(x1, x2) -> (psi_s(x2), psi_s(x1) + F(x2)); a merged array gives a merged array.
        ``threads``: OpenMP threads of the ops (default arcflow.get_num_threads()). GPU arrays (CuPy) compute
        on their device and come back as GPU arrays (``threads`` is then ignored)."""
        where = repr(self)
        with provider_for(x, threads=threads, where=where) as ops:
            x1, x2, merged = self._input_pair(ops, x, where, inverse=False)
            a, b = self.forward_pair(ops, x1, x2, where=where)
            ops.check_finite_output(b, where, "the output psi(x1) + F(x2)" if self.stride == 2 else
                                    "the output x1 + F(x2)")
            return ops.gather([a, b], 0, a.shape[1] + b.shape[1]) if merged else (a, b)

    __call__ = forward

    def inverse(self, y: Union[np.ndarray, Pair], threads: Optional[int] = None):
        """(a, b) -> (psi_s^-1(b - F(x2)), x2) with x2 = psi_s^-1(a) (undoing the injective padding)."""
        where = f"{self!r}.inverse"
        with provider_for(y, threads=threads, where=repr(self)) as ops:
            a, b, merged = self._input_pair(ops, y, where, inverse=True)
            x1, x2 = self.inverse_pair(ops, a, b, where=where, check_out=True)
            return ops.gather([x1, x2], 0, x1.shape[1] + x2.shape[1]) if merged else (x1, x2)

    def logdet(self, x) -> np.ndarray:
        """0 for every sample: the additive coupling and psi preserve volume (bijective blocks only)."""
        if self.injective:
            raise ValueError(f"{self!r}: an injective (channel-padding) block has no log-determinant")
        with provider_for(x, where=repr(self)) as ops:
            x1, _, _ = self._input_pair(ops, x, repr(self), inverse=False, finite=True)
            return ops.zeros(x1.shape[0], x1.dtype)


class IRevNet:
    """The whole i-RevNet of the reference code: an optional initial psi, a stack of :class:`IRevNetBlock`
    and a non-invertible classifier head (BN, ReLU, average pool, linear).

    ``forward(x) -> z`` is the invertible representation (the reference's ``out_bij``, shape
    (N, 2*n_channels[-1], H', W')), ``inverse(z) -> x`` reconstructs the input, ``classify(z)`` gives the
    logits (the reference forward's first output). Parameters are named as in the reference module
    (``stack.{i}.bottleneck_block.{j}.weight``, ``bn1.*``, ``linear.*``).

    Paper configurations: :meth:`cifar10` (nBlocks 18-18-18, strides 1-2-2, channels 16-64-256,
    init_ds 0, 3x32x32, mult 4) and :meth:`imagenet` (6-16-72-6, strides 2-2-2-2, channels 24-96-384-1536,
    init_ds 2, 3x224x224).
    """

    def __init__(self, n_blocks: Sequence[int], n_strides: Sequence[int], n_channels: Optional[Sequence[int]] = None,
                 init_ds: int = 2, in_shape: Sequence[int] = (3, 224, 224), mult: int = 4, affine_bn: bool = True,
                 *, n_classes: int = 1000, rng=None, dtype=np.float32):
        self.n_blocks = [as_int(v, "n_blocks", "IRevNet", 0) for v in n_blocks]
        self.n_strides = [as_int(v, "n_strides", "IRevNet") for v in n_strides]
        self.init_ds = as_int(init_ds, "init_ds", "IRevNet", 0)
        self.in_shape = tuple(as_int(v, "in_shape", "IRevNet") for v in in_shape)
        self.mult, self.affine_bn = as_int(mult, "mult", "IRevNet", 1), bool(affine_bn)
        self.n_classes = as_int(n_classes, "n_classes", "IRevNet", 1)
        self.dtype = _param_dtype(dtype)
        if len(self.in_shape) != 3 or min(self.in_shape) < 1:
            raise ValueError(f"IRevNet: in_shape must be (C, H, W), got {in_shape}")
        if self.init_ds != 0 and self.init_ds ** 2 != 2 ** self.init_ds:
            # the reference uses psi(init_ds) (channels x init_ds**2) but counts channels as x 2**init_ds
            raise ValueError(f"IRevNet: init_ds must be 0, 2 or 4 (the reference's channel count "
                             f"in_shape[0] * 2**init_ds), got {init_ds}")
        if len(self.n_strides) != len(self.n_blocks):
            raise ValueError("IRevNet: n_blocks and n_strides must have the same length")
        self.in_ch = self.in_shape[0] * 2 ** self.init_ds
        if n_channels is None:
            n_channels = [self.in_ch // 2 * 4 ** i for i in range(4)]
        self.n_channels = [as_int(v, "n_channels", "IRevNet", 1) for v in n_channels][: len(self.n_blocks)]
        if len(self.n_channels) != len(self.n_blocks):
            raise ValueError("IRevNet: n_channels must have one entry per stage")
        b = max(self.init_ds, 1)
        self.ds = self.in_shape[2] // 2 ** (self.n_strides.count(2) + self.init_ds // 2)
        g = _rng(rng)
        self.stack = []
        in_ch, first = self.in_ch, True
        h, w = self.in_shape[1] // b, self.in_shape[2] // b
        if self.init_ds and (self.in_shape[1] % b or self.in_shape[2] % b):
            raise ValueError(f"IRevNet: in_shape {self.in_shape} not divisible by the initial psi block {b}")
        for channel, depth, stride in zip(self.n_channels, self.n_blocks, self.n_strides):
            for k in range(depth):
                s = stride if k == 0 else 1
                if s == 2:
                    if h % 2 or w % 2:
                        raise ValueError(f"IRevNet: a stride-2 stage needs even H and W, got {h}x{w} "
                                         f"(in_shape {self.in_shape})")
                    h, w = h // 2, w // 2
                self.stack.append(IRevNetBlock(in_ch, channel, s, first, self.mult, self.affine_bn, rng=g,
                                               dtype=self.dtype))
                in_ch, first = 2 * channel, False
        if not self.stack:
            raise ValueError("IRevNet: needs at least one block")
        self.out_shape = (2 * self.n_channels[-1], h, w)
        nf = 2 * self.n_channels[-1]
        self._head = OrderedDict()
        self._head_cache = {}
        self._head["bn1.weight"] = np.ones(nf, self.dtype)
        self._head["bn1.bias"] = np.zeros(nf, self.dtype)
        self._head["bn1.running_mean"] = np.zeros(nf, self.dtype)
        self._head["bn1.running_var"] = np.ones(nf, self.dtype)
        self._head["bn1.num_batches_tracked"] = np.array(0, dtype=np.int64)
        bound = 1.0 / np.sqrt(nf)
        self._head["linear.weight"] = g.uniform(-bound, bound, (self.n_classes, nf)).astype(self.dtype)
        self._head["linear.bias"] = g.uniform(-bound, bound, self.n_classes).astype(self.dtype)

    @classmethod
    def cifar10(cls, **kw) -> "IRevNet":
        """The CIFAR-10 i-RevNet of the paper (reference README: --nBlocks 18 18 18 --nStrides 1 2 2
        --nChannels 16 64 256, init_ds 0, in_shape 3x32x32, bottleneck_mult 4, 10 classes)."""
        args = dict(n_blocks=[18, 18, 18], n_strides=[1, 2, 2], n_channels=[16, 64, 256], init_ds=0,
                    in_shape=(3, 32, 32), mult=4, affine_bn=True, n_classes=10)
        args.update(kw)
        return cls(**args)

    @classmethod
    def imagenet(cls, **kw) -> "IRevNet":
        """The bijective ImageNet i-RevNet (a) of the paper (6 16 72 6, strides 2 2 2 2, channels
        24 96 384 1536, init_ds 2, 3x224x224, 1000 classes)."""
        args = dict(n_blocks=[6, 16, 72, 6], n_strides=[2, 2, 2, 2], n_channels=[24, 96, 384, 1536], init_ds=2,
                    in_shape=(3, 224, 224), mult=4, affine_bn=True, n_classes=1000)
        args.update(kw)
        return cls(**args)

    def __repr__(self) -> str:
        return (f"IRevNet(n_blocks={self.n_blocks}, n_strides={self.n_strides}, n_channels={self.n_channels}, "
                f"init_ds={self.init_ds}, in_shape={list(self.in_shape)}, mult={self.mult}, "
                f"affine_bn={self.affine_bn}, n_classes={self.n_classes})")

    # ---- the invertible part --------------------------------------------------------------------
    def _run(self, ops: Ops, fn, x):
        """fn(ops, chunk, stop) over the batch. With several CPU threads and images, the batch is split into one
        chunk per thread, each run through the whole network on one thread (the C++ ops release the GIL):
        no barrier per op, so a thread that the OS parks does not stall the others. Per-image results do not
        depend on the split (every op computes an image the same way whatever the thread count).
        Ctrl-C (or any error) reaches the waiting main thread at once; it sets ``stop``, which every worker
        tests between blocks, so the workers give up after their current block instead of finishing the batch."""
        nt = ops.threads
        n = x.shape[0]
        if nt == 1 or n < 2:
            return fn(ops, x, None)  # the main thread: Python checks for signals between the ops
        one = ops.with_threads(1)
        for blk in self.stack:
            blk.layers(one, x)  # fill the weight caches before the threads share them
        parts = np.array_split(np.arange(n), min(nt, n))
        stop = threading.Event()
        ex = ThreadPoolExecutor(max_workers=len(parts))
        try:
            futs = [ex.submit(lambda idx: fn(one, ops.xp.ascontiguousarray(x[idx[0]:idx[-1] + 1]), stop), p)
                    for p in parts]
            while True:  # a timed wait: Python runs a signal handler that another thread received within 50 ms
                done, pending = wait(futs, timeout=0.05, return_when=FIRST_EXCEPTION)
                if not pending or any(f.exception() is not None for f in done):
                    break
            if pending:  # a worker failed: stop the others, report the first real error
                stop.set()
                wait(pending)
                for f in futs:
                    err = f.exception()
                    if err is not None and not isinstance(err, _Stopped):
                        raise err
            outs = [f.result() for f in futs]
        except BaseException:
            stop.set()
            raise
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
        return ops.xp.concatenate(outs, axis=0)

    def _forward_chunk(self, ops: Ops, x, stop: Optional[threading.Event]):
        """The blocks in order, with the fused NaN/Inf tests: NaN/Inf in block i's input is the input's
        (i = 0, ValueError) or block i-1's overflow (FloatingPointError naming it); the last block's sum is
        tested once at the end."""
        if self.init_ds:
            x = ops.psi(x, self.init_ds)
        n = self.in_ch // 2
        pair = (ops.gather([x], 0, n), ops.gather([x], n, x.shape[1]))
        for i, blk in enumerate(self.stack):
            if stop is not None and stop.is_set():
                raise _Stopped()
            try:
                pair = blk.forward_pair(ops, *pair, where=f"IRevNet.forward: block {i} (stack.{i})")
            except _NonFiniteInput:
                if i == 0:
                    raise ValueError("IRevNet.forward: input contains NaN or Inf") from None
                last_conv = self.stack[i - 1].conv_keys()[-1]
                raise FloatingPointError(f"IRevNet.forward: block {i - 1} (stack.{i - 1}) overflowed {x.dtype}: its "
                                         f"output psi(x1) + F(x2) (the last convolution {last_conv} and the sum) "
                                         f"holds NaN or Inf") from None
        last = len(self.stack) - 1
        ops.check_finite_output(pair[1], f"IRevNet.forward: block {last} (stack.{last})",
                                f"its output psi(x1) + F(x2) (the last convolution "
                                f"{self.stack[last].conv_keys()[-1]} and the sum)")
        return ops.gather(list(pair), 0, pair[0].shape[1] + pair[1].shape[1])

    def _inverse_chunk(self, ops: Ops, z, stop: Optional[threading.Event]):
        half = z.shape[1] // 2
        pair = (ops.gather([z], 0, half), ops.gather([z], half, z.shape[1]))
        last = len(self.stack) - 1
        for i in range(last, -1, -1):
            if stop is not None and stop.is_set():
                raise _Stopped()
            try:
                pair = self.stack[i].inverse_pair(ops, *pair, check_out=i == 0,
                                                  where=f"IRevNet.inverse: block {i} (stack.{i})")
            except _NonFiniteInput:
                if i == last:
                    raise ValueError("IRevNet.inverse: input contains NaN or Inf") from None
                raise FloatingPointError(f"IRevNet.inverse: block {i + 1} (stack.{i + 1}) overflowed {z.dtype}: "
                                         f"its x1 = b - F(x2) (the last convolution "
                                         f"{self.stack[i + 1].conv_keys()[-1]} and the difference) holds NaN or "
                                         f"Inf") from None
        x = ops.gather(list(pair), 0, pair[0].shape[1] + pair[1].shape[1])
        if self.init_ds:
            x = ops.psi_inverse(x, self.init_ds)
        return x

    def forward(self, x, threads: Optional[int] = None) -> np.ndarray:
        """x (N, C, H, W) = (N, *in_shape) -> z (N, *out_shape). ``threads``: default arcflow.get_num_threads().
        A GPU array (CuPy, ``__cuda_array_interface__``) runs on its device and gives a CuPy array.
        NaN/Inf input: ValueError; a block whose output overflows the dtype: FloatingPointError naming it."""
        c, h, w = self.in_shape
        with provider_for(x, threads=threads, where="IRevNet.forward") as ops:
            x = ops.input(x, "IRevNet.forward", f"(N, {c}, {h}, {w})", c, hw=(h, w), finite=False)
            return self._run(ops, self._forward_chunk, x)

    __call__ = forward

    def inverse(self, z, threads: Optional[int] = None) -> np.ndarray:
        """z (N, *out_shape) -> x (N, *in_shape), exact up to rounding (on the GPU for a GPU array)."""
        c, h, w = self.out_shape
        with provider_for(z, threads=threads, where="IRevNet.inverse") as ops:
            z = ops.input(z, "IRevNet.inverse", f"(N, {c}, {h}, {w})", c, hw=(h, w), finite=False)
            return self._run(ops, self._inverse_chunk, z)

    def logdet(self, x) -> np.ndarray:
        """0 for every sample when every block is bijective (no injective padding). A block with injective
        padding maps D inputs to more than D outputs: the Jacobian is not square and has no determinant,
        so logdet raises ValueError for such a network (e.g. the CIFAR-10 configuration, whose first
        block pads 3 channels to 32)."""
        inj = [i for i, b in enumerate(self.stack) if b.injective]
        if inj:
            i = inj[0]
            blk = self.stack[i]
            raise ValueError(f"IRevNet.logdet: undefined for this network: block {i} (stack.{i}) pads "
                             f"{blk.in_ch} channels to {2 * blk.out_ch} (injective, not bijective), so the "
                             f"Jacobian is not square and has no determinant; logdet exists only when every "
                             f"block keeps the channel count (2 * out_ch == in_ch at stride 1)")
        c, h, w = self.in_shape
        with provider_for(x, where="IRevNet.logdet") as ops:
            xa = ops.input(x, "IRevNet.logdet", f"(N, {c}, {h}, {w})", c, hw=(h, w))
            return ops.zeros(xa.shape[0], xa.dtype)

    # ---- the classifier head (not invertible) ---------------------------------------------------
    def _head_weights(self, ops: Ops, like):
        """(bn1 scale, bn1 shift, linear weight, linear bias) in like's dtype on ops' memory, cached until the
        head's weights change."""
        dt = np.dtype(like.dtype)
        p = self._head
        keys = ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "linear.weight", "linear.bias")

        def build():
            scale, shift = _ops.batchnorm_scale_shift(p["bn1.weight"], p["bn1.bias"], p["bn1.running_mean"],
                                                      p["bn1.running_var"], _BN_EPS, dtype=dt)
            return (ops.upload(scale, dt), ops.upload(shift, dt), ops.upload(p["linear.weight"], dt),
                    ops.upload(p["linear.bias"], dt))

        return cached(self._head_cache, (ops.device_key(like), dt.str), [p[k] for k in keys], build)

    def classify(self, z) -> np.ndarray:
        """Logits (N, n_classes) = linear(avg_pool(relu(bn1(z)), ds)) as the reference forward (on the GPU for
        a GPU array)."""
        c, h, w = self.out_shape
        where = "IRevNet.classify"
        with provider_for(z, where=where) as ops:
            z = ops.input(z, where, f"(N, {c}, {h}, {w})", c)
            if z.shape[2:] != (h, w):
                raise ValueError(f"{where}: expected input of shape (N, {c}, {h}, {w}), got shape {z.shape}")
            ds = self.ds
            hq, wq = h // ds, w // ds
            if hq < 1 or wq < 1:
                raise ValueError(f"{where}: pooling window {ds} larger than the representation {h}x{w}")
            scale, shift, wl, bl = self._head_weights(ops, z)
            nf = c * hq * wq
            if wl.shape[1] != nf:
                raise ValueError(f"{where}: pooled features {nf} do not match linear.weight {wl.shape} (the "
                                 f"reference needs the pooled map to be 1x1)")
            a = ops.channel_affine(z, scale, shift, True)
            n = a.shape[0]
            pooled = a[:, :, : hq * ds, : wq * ds].reshape(n, c, hq, ds, wq, ds).mean(axis=(3, 5)).reshape(n, -1)
            logits = ops.linear(pooled, wl, bl)
            return ops.check_finite_output(logits, where, "the logits (bn1, pooling, linear)")

    def predict(self, x) -> np.ndarray:
        """classify(forward(x))."""
        return self.classify(self.forward(x))

    # ---- weights --------------------------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Copies of all parameters and buffers with the reference module's keys and shapes."""
        out = OrderedDict()
        for i, blk in enumerate(self.stack):
            for k, v in blk.state_dict().items():
                out[f"stack.{i}.{k}"] = v
        for k, v in self._head.items():
            out[k] = v.copy()
        return out

    def load_state_dict(self, mapping: Mapping, strict: bool = True) -> None:
        """Load weights (NumPy arrays or torch tensors) keyed as the reference module. Missing,
        unexpected (strict=True) or wrongly shaped keys raise ValueError listing them; then no weight
        changes."""
        expected = OrderedDict(self.state_dict())
        new = _load_checked("IRevNet", expected, mapping, strict)
        for i, blk in enumerate(self.stack):
            pre = f"stack.{i}."
            upd = {k[len(pre):]: v for k, v in new.items() if k.startswith(pre)}
            if upd:
                blk.load_state_dict(upd, strict=False)
        for k in self._head:
            if k in new:
                self._head[k] = new[k]

    def num_parameters(self) -> int:
        """Trainable parameters (conv, BN affine, linear), as sum(p.numel() for p in module.parameters())."""
        total = 0
        for k, v in self.state_dict().items():
            if not (k.endswith("running_mean") or k.endswith("running_var") or k.endswith("num_batches_tracked")):
                total += v.size
        return int(total)


def from_torch(state_dict, model: Optional[Union[IRevNet, IRevNetBlock]] = None, strict: bool = True, **config):
    """Convert a PyTorch i-RevNet state dict (tensors, or an ``nn.Module``) to NumPy arrays.

    - keys saved through ``nn.DataParallel`` lose their ``module.`` prefix;
    - BN layers of checkpoints older than PyTorch 0.4.1 get ``num_batches_tracked = 0``;
    - with ``model`` given, the weights are loaded into it (``strict`` as in load_state_dict) and the
      model is returned; with IRevNet keyword arguments (``n_blocks=..., n_strides=..., ...``) a new
      :class:`IRevNet` is built, loaded and returned; otherwise the dict of NumPy arrays is returned.
    torch is only needed to hold the tensors; it is never imported here.
    """
    if hasattr(state_dict, "state_dict") and callable(state_dict.state_dict):
        state_dict = state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"from_torch: expected a state dict (mapping) or a module, got {type(state_dict).__name__}")
    arrays = OrderedDict()
    for k, v in state_dict.items():
        key = k[len("module."):] if k.startswith("module.") else k
        arrays[key] = to_numpy(v, "from_torch", k)
    for k in list(arrays):
        if k.endswith(".running_var"):
            nbt = k[: -len("running_var")] + "num_batches_tracked"
            if nbt not in arrays:
                arrays[nbt] = np.array(0, dtype=np.int64)
    if model is None and config:
        model = IRevNet(**config)
    if model is None:
        return arrays
    model.load_state_dict(arrays, strict=strict)
    return model
