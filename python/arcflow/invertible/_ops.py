"""Validated NumPy wrappers around the C++ ops of the invertible blocks (NCHW / OIHW).

Each function checks its input, picks the compute dtype from the data input ``x`` (:func:`result_dtype`:
float16 and float32 compute in float32, float64 and every other real type in float64, the rule of the
kernels; ``dtype=`` overrides), casts the other
arrays (weights, scale, ...) to it, makes everything C-contiguous and calls the C++ op, which runs
without the GIL. ``threads=None`` uses arcflow's default (``arcflow.set_num_threads`` / OMP_NUM_THREADS).

    conv2d(x, w, b=None, stride=1, padding=0)      -> (N, O, Ho, Wo)
    batchnorm_inference(x, scale, shift, relu=False)
    batchnorm_scale_shift(weight, bias, running_mean, running_var, eps=1e-5) -> (scale, shift)
    relu(x)
    psi(x, block=2), psi_inverse(y, block=2)
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import numpy as np

from .. import _core, _dispatch
from .._dispatch import check_threads

__all__ = ["conv2d", "batchnorm_inference", "batchnorm_scale_shift", "relu", "psi", "psi_inverse",
           "result_dtype"]


def check_nchw_shape(xa, where: str, expected: str, channels: Optional[int] = None, block: Optional[int] = None,
                     block_why: str = "", hw: Optional[Tuple[int, int]] = None, kinds: str = "fiub") -> None:
    """The dtype kind and (N, C, H, W) shape checks of the blocks' inputs, on any array type (NumPy or CuPy):
    TypeError / ValueError naming ``where`` and the ``expected`` shape. ``block``: H and W must be divisible
    by it (``block_why`` is appended to that message); ``hw``: H and W must equal it."""
    if xa.dtype.kind not in kinds:
        raise TypeError(f"{where}: expected a real array, got dtype {xa.dtype}")
    if xa.ndim != 4:
        raise ValueError(f"{where}: expected input of shape {expected}, got shape {xa.shape} (ndim {xa.ndim})")
    if channels is not None and xa.shape[1] != channels:
        raise ValueError(f"{where}: expected input of shape {expected}, got shape {xa.shape} "
                         f"({xa.shape[1]} channels instead of {channels})")
    if block is not None and (xa.shape[2] % block or xa.shape[3] % block):
        raise ValueError(f"{where}: expected input of shape {expected} with H and W divisible by {block}"
                         f"{block_why}, got shape {xa.shape}")
    if xa.shape[2] == 0 or xa.shape[3] == 0:
        raise ValueError(f"{where}: expected input of shape {expected}, got an empty image {xa.shape}")
    if hw is not None and tuple(xa.shape[2:]) != tuple(hw):
        raise ValueError(f"{where}: expected input of shape {expected}, got shape {xa.shape}")


def as_int(value, name: str, where: str, minimum: Optional[int] = None) -> int:
    """``value`` as a Python int: ints and NumPy integers only (``int(2.7)`` would silently truncate a
    float, and a bool is almost certainly a mistake); ValueError below ``minimum``."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: {name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{where}: {name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}, got {v}")
    return v


def result_dtype(*arrays, dtype=None) -> np.dtype:
    """``dtype`` if given (float32 or float64), else the package's rule (``arcflow._dispatch.result_dtype``):
    float32 when every array is a float of at most 4 bytes (float16, float32), else float64."""
    if dtype is not None:
        dt = np.dtype(dtype)
        if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype must be float32 or float64, got {dt}")
        return dt
    dts = [np.asarray(a).dtype for a in arrays if a is not None]
    for dt in dts:
        if dt.kind not in "fiub":
            raise TypeError(f"expected a real numeric array, got dtype {dt}")
    return _dispatch.result_dtype(*(np.empty(0, dt) for dt in dts))


def _suffix(dt: np.dtype) -> str:
    return "f32" if dt == np.float32 else "f64"


def all_finite(a: np.ndarray) -> bool:
    """True when no entry is NaN or Inf. One reading pass, no temporary: for contiguous float32/float64
    the BLAS dot product a.a (a sum of non-negative squares, so NaN or Inf anywhere makes it NaN or Inf;
    about 1.4x faster than np.add.reduce, which is pairwise), else a summation. Only when that result
    is not finite (NaN/Inf present, or an overflow of huge finite values) the elementwise test decides."""
    if a.size == 0 or a.dtype.kind in "iub":
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        if a.dtype in (np.float32, np.float64) and a.flags.c_contiguous:
            flat = a.reshape(-1)
            s = np.dot(flat, flat)
        else:
            s = np.add.reduce(a, axis=None)
        if np.isfinite(s):
            return True
    return bool(np.isfinite(a).all())


def aligned(a, dt=None) -> np.ndarray:
    """a (in dtype dt) as a C-contiguous array aligned to its element size: the C++ ops load and store
    whole elements (and vectors), which a misaligned buffer (np.ndarray(..., buffer=b, offset=1)) breaks;
    np.ascontiguousarray keeps such a buffer as it is, so it is copied here."""
    arr = np.asarray(a, dtype=dt)
    if arr.flags.c_contiguous and arr.flags.aligned:
        return arr
    return np.require(arr, dtype=arr.dtype, requirements=("C", "A"))


def _as(a, dt, name: str, where: str, ndim: Optional[int] = None, check_finite: bool = True) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{where}: {name} must be a real numeric array, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{where}: {name} must have {ndim} dimensions, got shape {arr.shape}")
    arr = aligned(arr, dt)
    if check_finite and not all_finite(arr):
        raise ValueError(f"{where}: {name} contains NaN or Inf")
    return arr


def conv2d(x, w, b=None, stride: int = 1, padding: int = 0, *, dtype=None, out: Optional[np.ndarray] = None,
           accumulate: bool = False, addend: Optional[np.ndarray] = None, alpha: float = 1.0, in_scale=None,
           in_shift=None, in_relu: bool = False, check_finite: bool = True, fused_finite: Tuple[str, ...] = (),
           where: str = "conv2d", threads: Optional[int] = None) -> np.ndarray:
    """2-D cross-correlation, as ``torch.nn.functional.conv2d``: NCHW input, OIHW weight, symmetric zero padding.

    ``y[n, o, i, j] = b[o] + sum_{c, u, v} w[o, c, u, v] * xp[n, c, i*stride + u, j*stride + v]``
    where ``xp`` is ``act(x)`` zero-padded by ``padding`` on each side.

    Keyword-only extras (fused, used by the i-RevNet blocks):
      ``in_scale``, ``in_shift`` (per input channel) and ``in_relu``: ``act(x) = [relu](x*in_scale + in_shift)``
      applied before the padding (Conv2d(ReLU(BatchNorm(x)))).
      ``out``: write into this C-contiguous array of the right shape and dtype; with ``accumulate=True``
      the result is added to it: ``out += alpha * conv + b``; with ``addend=a`` (same shape):
      ``out = a + (alpha * conv + b)`` (``a`` may be ``out``).
      ``fused_finite``: inputs among ``"x"`` and ``"addend"`` to test for NaN/Inf inside the C++ passes that
      read them anyway (``x``: its raw values, before ``in_scale``/``in_shift``/``in_relu``, while the
      padded input is built; ``addend``: in the output epilogue, ``out``'s old values with
      ``accumulate=True``), instead of the separate pass of ``check_finite``. A hit raises
      ``ValueError(f"{where}: input contains NaN or Inf")`` after the convolution ran: ``out`` then holds
      the result computed from those values (with ``accumulate`` or ``addend=out``, its old content is gone).
      ``where`` starts every error message.

    Example: ``conv2d(np.ones((1, 3, 8, 8), np.float32), np.ones((4, 3, 3, 3), np.float32), padding=1)``.
    """
    out, bad = conv2d_flags(x, w, b, stride, padding, dtype=dtype, out=out, accumulate=accumulate, addend=addend,
                            alpha=alpha, in_scale=in_scale, in_shift=in_shift, in_relu=in_relu,
                            check_finite=check_finite, fused_finite=fused_finite, where=where, threads=threads)
    if bad:
        raise ValueError(f"{where}: input contains NaN or Inf")
    return out


def conv2d_flags(x, w, b=None, stride: int = 1, padding: int = 0, *, dtype=None, out: Optional[np.ndarray] = None,
                 accumulate: bool = False, addend: Optional[np.ndarray] = None, alpha: float = 1.0, in_scale=None,
                 in_shift=None, in_relu: bool = False, check_finite: bool = True, fused_finite: Tuple[str, ...] = (),
                 where: str = "conv2d", threads: Optional[int] = None) -> Tuple[np.ndarray, int]:
    """:func:`conv2d` returning ``(out, flags)`` instead of raising for the ``fused_finite`` inputs:
    bit 0 set when x holds NaN/Inf, bit 1 when the addend does (so that a caller can tell an input's
    NaN from an overflow of its own earlier layer)."""
    fused = set(fused_finite)
    if not fused <= {"x", "addend"}:
        raise ValueError(f"{where}: fused_finite names inputs among 'x' and 'addend', got {tuple(fused_finite)}")
    dt = result_dtype(x, dtype=dtype if dtype is not None else (out.dtype if out is not None else None))
    x = _as(x, dt, "x", where, 4, check_finite)
    w = _as(w, dt, "w", where, 4, check_finite)
    n, c, h, wd = x.shape
    o, ci, kh, kw = w.shape
    if ci != c:
        raise ValueError(f"{where}: weight expects {ci} input channels (shape (O, {ci}, kh, kw)), "
                         f"input has {c} (shape {x.shape})")
    if o == 0 or kh == 0 or kw == 0 or c == 0 or h == 0 or wd == 0:
        raise ValueError(f"{where}: empty input {x.shape} or weight {w.shape}")
    stride = as_int(stride, "stride", where)
    padding = as_int(padding, "padding", where)
    if stride < 1 or padding < 0:
        raise ValueError(f"{where}: stride must be >= 1 and padding >= 0 (got {stride}, {padding})")
    if h + 2 * padding < kh or wd + 2 * padding < kw:
        raise ValueError(f"{where}: kernel {kh}x{kw} larger than the padded input {h + 2 * padding}x{wd + 2 * padding}")
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (wd + 2 * padding - kw) // stride + 1
    if b is not None:
        b = _as(b, dt, "b", where, None, check_finite).reshape(-1)
        if b.shape[0] != o:
            raise ValueError(f"{where}: bias must have shape ({o},), got {b.shape}")
    if (in_scale is None) != (in_shift is None):
        raise ValueError(f"{where}: in_scale and in_shift go together")
    if in_scale is not None:
        in_scale = _as(in_scale, dt, "in_scale", where, None, check_finite).reshape(-1)
        in_shift = _as(in_shift, dt, "in_shift", where, None, check_finite).reshape(-1)
        if in_scale.shape[0] != c or in_shift.shape[0] != c:
            raise ValueError(f"{where}: in_scale and in_shift must have shape ({c},)")
    if out is None:
        if accumulate:
            raise ValueError(f"{where}: accumulate=True needs out=")
        out = np.empty((n, o, ho, wo), dtype=dt)
    else:
        if not isinstance(out, np.ndarray) or out.dtype != dt or out.shape != (n, o, ho, wo) \
                or not out.flags.c_contiguous or not out.flags.writeable or not out.flags.aligned:
            raise ValueError(f"{where}: out must be a writeable, aligned, C-contiguous {dt} array of shape "
                             f"{(n, o, ho, wo)}")
        if np.may_share_memory(out, x):
            raise ValueError(f"{where}: out must not overlap x")
    if addend is not None:
        if accumulate:
            raise ValueError(f"{where}: give accumulate=True or addend=, not both")
        if not isinstance(addend, np.ndarray) or addend.dtype != dt or addend.shape != (n, o, ho, wo) \
                or not addend.flags.c_contiguous:
            raise ValueError(f"{where}: addend must be a C-contiguous {dt} array of shape {(n, o, ho, wo)}")
        addend = aligned(addend)
        if np.may_share_memory(addend, x):
            raise ValueError(f"{where}: addend must not overlap x")
    bad = getattr(_core, "conv2d_cpu_" + _suffix(dt))(x, w, b, stride, padding, in_scale, in_shift,
                                                       bool(in_relu), float(alpha), bool(accumulate), addend, out,
                                                       check_threads(threads, where), check_x="x" in fused,
                                                       check_addend="addend" in fused)
    return out, int(bad)


def batchnorm_scale_shift(weight, bias, running_mean, running_var, eps: float = 1e-5,
                          dtype=np.float64) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, shift) of an inference batch-norm: ``scale = weight / sqrt(var + eps)``,
    ``shift = bias - mean * scale`` (``weight``/``bias`` None means affine=False: 1 and 0)."""
    mean = np.asarray(running_mean, dtype=np.float64).reshape(-1)
    var = np.asarray(running_var, dtype=np.float64).reshape(-1)
    g = np.ones_like(mean) if weight is None else np.asarray(weight, dtype=np.float64).reshape(-1)
    bb = np.zeros_like(mean) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    scale = g / np.sqrt(var + eps)
    shift = bb - mean * scale
    return scale.astype(dtype), shift.astype(dtype)


def batchnorm_inference(x, scale, shift, relu: bool = False, *, dtype=None, out: Optional[np.ndarray] = None,
                        threads: Optional[int] = None) -> np.ndarray:
    """``y[n, c, ...] = x[n, c, ...] * scale[c] + shift[c]`` (then ``max(0, .)`` if ``relu``): an inference
    batch-norm with (scale, shift) from :func:`batchnorm_scale_shift`. ``out`` may be ``x`` (in place)."""
    where = "batchnorm_inference"
    dt = result_dtype(x, dtype=dtype)
    x = _as(x, dt, "x", where, None, False)
    if x.ndim < 2:
        raise ValueError(f"{where}: x must be (N, C, ...), got shape {x.shape}")
    c = x.shape[1]
    scale = _as(scale, dt, "scale", where, None).reshape(-1)
    shift = _as(shift, dt, "shift", where, None).reshape(-1)
    if scale.shape[0] != c or shift.shape[0] != c:
        raise ValueError(f"{where}: scale and shift must have shape ({c},), got {scale.shape}, {shift.shape}")
    if out is None:
        out = np.empty_like(x)
    elif out.dtype != dt or out.shape != x.shape or not out.flags.c_contiguous or not out.flags.aligned \
            or not out.flags.writeable:
        raise ValueError(f"{where}: out must be a writeable, aligned, C-contiguous {dt} array of shape {x.shape}")
    getattr(_core, "channel_affine_cpu_" + _suffix(dt))(x, scale, shift, bool(relu), out, check_threads(threads, where))
    return out


def relu(x, *, dtype=None, threads: Optional[int] = None) -> np.ndarray:
    """``max(0, x)`` elementwise (NaN stays NaN); float32 stays float32."""
    xa = np.asarray(x)
    dt = result_dtype(xa, dtype=dtype)
    xa = _as(xa, dt, "x", "relu", None, False)
    out = np.empty_like(xa)
    getattr(_core, "relu_cpu_" + _suffix(dt))(xa.reshape(-1), out.reshape(-1), check_threads(threads, "relu"))
    return out


def psi(x, block: int = 2, *, dtype=None, threads: Optional[int] = None) -> np.ndarray:
    """Space-to-depth in the reference i-RevNet channel order (docs/mathematics.md §2):
    ``psi(x)[n, (dy*b + dx)*C + c, i, j] = x[n, c, i*b + dy, j*b + dx]``, shape (N, b*b*C, H/b, W/b)."""
    where = f"psi(block={block!r})"
    block = as_int(block, "block", where, 1)
    xa = np.asarray(x)
    dt = result_dtype(xa, dtype=dtype)
    xa = _as(xa, dt, "x", where, None, False)
    if xa.ndim != 4:
        raise ValueError(f"{where}: expected x of shape (N, C, H, W) with H, W divisible by {block}, got {xa.shape}")
    n, c, h, w = xa.shape
    if h % block or w % block:
        raise ValueError(f"{where}: expected x of shape (N, C, H, W) with H, W divisible by {block}, got {xa.shape}")
    out = np.empty((n, c * block * block, h // block, w // block), dtype=dt)
    getattr(_core, "psi_cpu_" + _suffix(dt))(xa, block, out, check_threads(threads, where))
    return out


def psi_inverse(y, block: int = 2, *, dtype=None, threads: Optional[int] = None) -> np.ndarray:
    """The inverse of :func:`psi`: (N, b*b*C, H, W) -> (N, C, H*b, W*b); ``psi_inverse(psi(x)) == x`` exactly."""
    where = f"psi_inverse(block={block!r})"
    block = as_int(block, "block", where, 1)
    ya = np.asarray(y)
    dt = result_dtype(ya, dtype=dtype)
    ya = _as(ya, dt, "y", where, None, False)
    if ya.ndim != 4 or ya.shape[1] % (block * block):
        raise ValueError(f"{where}: expected y of shape (N, C*{block * block}, H, W), got {ya.shape}")
    n, cb, h, w = ya.shape
    out = np.empty((n, cb // (block * block), h * block, w * block), dtype=dt)
    getattr(_core, "psi_inverse_cpu_" + _suffix(dt))(ya, block, out, check_threads(threads, where))
    return out
