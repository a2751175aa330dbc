"""Normalising-flow blocks on NCHW NumPy arrays: affine coupling, ActNorm, invertible 1x1 convolution, Sequential.

Every block maps an (N, C, H, W) array to an array of the same shape and has

    forward(x, return_logdet=False) -> y           (or (y, logdet) with return_logdet=True)
    inverse(y) -> x
    logdet(x) -> (N,)  log|det d forward(x)[n] / d x[n]|, one value per sample
    state_dict() -> {name: ndarray},  load_state_dict(mapping, strict=True)

float32 input stays float32 (weights are kept in float64 and cast per call); every other real numeric
input is computed in float64. GPU arrays (CuPy, ``__cuda_array_interface__``) are computed on their device by
arcflow's CUDA kernels and come back as CuPy arrays (see ``_cuda_ops``). Bad input raises ValueError naming the block and the expected shape.
Formulas: SPEC.md section 2; RealNVP (Dinh, Sohl-Dickstein & Bengio, ICLR 2017) and Glow (Kingma &
Dhariwal, NeurIPS 2018).

>>> import numpy as np
>>> from arcflow.invertible import ActNorm, InvertibleConv1x1, AffineCoupling, Sequential
>>> flow = Sequential(ActNorm(4), InvertibleConv1x1(4, rng=0), AffineCoupling(4, hidden=16, rng=1))
>>> x = np.random.default_rng(2).normal(size=(8, 4, 6, 6))
>>> z, ld = flow.forward(x, return_logdet=True)          # ActNorm initialises itself on this batch
>>> bool(np.allclose(flow.inverse(z), x)), ld.shape
(True, (8,))
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import numpy as np

from . import _cuda_ops

__all__ = ["AffineCoupling", "ActNorm", "InvertibleConv1x1", "Sequential"]

RngLike = Union[None, int, np.random.Generator]


# ----------------------------------------------------------------------------------------------------------
# helpers

def _rng(rng: RngLike) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _compute_dtype(arr: np.ndarray) -> np.dtype:
    return np.dtype(np.float32) if arr.dtype == np.float32 else np.dtype(np.float64)


def _check_nchw(x, where: str, channels: Optional[int], what: str = "x") -> np.ndarray:
    """x as a C-contiguous float32/float64 (N, channels, H, W) array with finite entries, or ValueError/TypeError."""
    arr = np.asarray(x)
    expected = f"(N, {channels}, H, W)" if channels is not None else "(N, C, H, W)"
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{where}: {what} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 4:
        raise ValueError(f"{where}: expected {what} of shape {expected} (4-D NCHW), got shape {arr.shape}")
    if channels is not None and arr.shape[1] != channels:
        raise ValueError(f"{where}: expected {what} of shape {expected}, got shape {arr.shape} "
                         f"({arr.shape[1]} channels instead of {channels})")
    arr = np.ascontiguousarray(arr, dtype=_compute_dtype(arr))
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: {what} of shape {arr.shape} contains NaN or Inf")
    return arr


def _conv2d_numpy(x: np.ndarray, w: np.ndarray, b: Optional[np.ndarray], padding: int) -> np.ndarray:
    """Stride-1 cross-correlation (torch.nn.functional.conv2d convention), im2col + GEMM in NumPy."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho, wo = x.shape[2] - kh + 1, x.shape[3] - kw + 1
    if kh == 1 and kw == 1:
        w2, xs = w.reshape(o, c), x.reshape(n, c, ho * wo)
        y = np.empty((n, o, ho * wo), dtype=x.dtype)
        for i in range(n):                      # per-image GEMM (a broadcast np.matmul skips BLAS)
            np.matmul(w2, xs[i], out=y[i])
        y = y.reshape(n, o, ho, wo)
    else:
        cols = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))   # (n, c, ho, wo, kh, kw)
        y = np.tensordot(cols, w, axes=([1, 4, 5], [1, 2, 3]))                      # (n, ho, wo, o)
        y = np.ascontiguousarray(y.transpose(0, 3, 1, 2))
    if b is not None:
        y += b.reshape(1, o, 1, 1)
    return y


def _conv2d(x: np.ndarray, w: np.ndarray, b: Optional[np.ndarray], padding: int) -> np.ndarray:
    """conv2d in x's dtype: the C++ op (arcflow.invertible._ops) when it is available, else NumPy."""
    dt = x.dtype
    w = np.ascontiguousarray(w, dtype=dt)
    b = None if b is None else np.ascontiguousarray(b, dtype=dt)
    global _ops_conv2d
    if _ops_conv2d is not None:
        try:
            return _ops_conv2d(x, w, b, stride=1, padding=padding)
        except (AttributeError, ImportError):  # pragma: no cover - the wrapper exists, the C++ op is not built
            _ops_conv2d = None
    return _conv2d_numpy(x, w, b, padding)


try:  # the C++ conv2d of the invertible package; NumPy fallback where it is not built
    from ._ops import conv2d as _ops_conv2d
except (ImportError, AttributeError):  # pragma: no cover - depends on the build
    _ops_conv2d = None


def _load_checked(where: str, current: Dict[str, np.ndarray], mapping: Mapping, strict: bool
                  ) -> Dict[str, np.ndarray]:
    """The new values for the keys of ``current`` taken from ``mapping`` (float64 copies), or ValueError listing
    missing / unexpected / wrongly shaped / non-numeric keys. Nothing is modified here."""
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{where}.load_state_dict: expected a mapping of name -> array, got {type(mapping).__name__}")
    missing = [k for k in current if k not in mapping]
    unexpected = [k for k in mapping if k not in current]
    bad_shape, bad_value = [], []
    new = {}
    for k, ref in current.items():
        if k not in mapping:
            continue
        v = mapping[k]
        if hasattr(v, "detach") and hasattr(v, "cpu"):        # a torch tensor
            v = v.detach().cpu().numpy()
        v = np.asarray(v)
        if v.dtype.kind not in "fiub":
            bad_value.append(f"{k} (dtype {v.dtype})")
            continue
        if v.shape != ref.shape:
            bad_shape.append(f"{k} (expected {ref.shape}, got {v.shape})")
            continue
        v = np.array(v, dtype=np.float64)
        if not np.isfinite(v).all():
            bad_value.append(f"{k} (NaN or Inf)")
            continue
        new[k] = v
    problems = []
    if strict and missing:
        problems.append(f"missing keys: {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if bad_shape:
        problems.append(f"wrongly shaped keys: {bad_shape}")
    if bad_value:
        problems.append(f"invalid values: {bad_value}")
    if problems:
        raise ValueError(f"{where}.load_state_dict: " + "; ".join(problems) + " (weights left unchanged)")
    return new


class _FlowBlock:
    """Shared plumbing: ``__call__`` is ``forward``; subclasses define _forward(x) -> (y, logdet)."""

    #: the Jacobian determinant is 1 everywhere (logdet is identically 0)
    volume_preserving = False

    def __call__(self, x, return_logdet: bool = False):
        return self.forward(x, return_logdet=return_logdet)

    def logdet(self, x) -> np.ndarray:
        """log|det J| of forward at x, one value per sample: shape (N,), in x's compute dtype."""
        return self.forward(x, return_logdet=True)[1]


# ----------------------------------------------------------------------------------------------------------
# affine coupling

def soft_clamp(s_raw: np.ndarray, clamp: float) -> np.ndarray:
    """s = clamp * 0.636 * arctan(s_raw / clamp): |s| < clamp, slope 0.636 at 0 (FrEIA's GLOWCouplingBlock)."""
    if clamp <= 0:
        return s_raw
    dt = s_raw.dtype.type
    return dt(clamp * 0.636) * np.arctan(s_raw / dt(clamp))


class AffineCoupling(_FlowBlock):
    """RealNVP / Glow affine coupling on the channel axis.

    With x1 = the first ``channels // 2`` channels and x2 the rest, (s_raw, t) = NN(x1) and

        y1 = x1,   y2 = x2 * exp(s) + t,   s = clamp * 0.636 * arctan(s_raw / clamp),
        log|det J| = sum over (C, H, W) of s.

    The soft clamp is the one of FrEIA's GLOWCouplingBlock (its ``log_e``): |s| < clamp, so one coupling scales
    a value by at most exp(±clamp); ``clamp=0`` (or negative) switches it off (s = s_raw).
    NN(x1) has ``2 * (channels - channels // 2)`` output channels: the first half is s_raw, the second t.
    The default NN is conv3x3(pad 1) -> ReLU -> conv1x1 -> ReLU -> conv3x3(pad 1) with ``hidden`` channels,
    state_dict keys ``subnet.0.weight/bias``, ``subnet.2.weight/bias``, ``subnet.4.weight/bias`` (OIHW), the
    keys of ``torch.nn.Sequential(Conv2d, ReLU, Conv2d, ReLU, Conv2d)``. Its first two layers are drawn from
    N(0, 1/fan_in) with zero biases; the last layer is zero (the coupling starts as the identity, as in
    Glow) unless ``zero_init=False``, which draws it like the others (for tests).

    ``subnet``: any callable taking x1 (N, channels//2, H, W, in x's dtype) and returning
    (N, 2*(channels - channels//2), H, W); its ``state_dict``/``load_state_dict``, if it has them, appear under
    the prefix ``subnet.``. An odd channel count is allowed (x2 has one channel more than x1).
    """

    def __init__(self, channels: int, hidden: int = 64, clamp: float = 2.0, rng: RngLike = None,
                 subnet: Optional[Callable[[np.ndarray], np.ndarray]] = None, zero_init: bool = True):
        channels, hidden = int(channels), int(hidden)
        if channels < 2:
            raise ValueError(f"AffineCoupling: channels must be >= 2 to split, got {channels}")
        if subnet is None and hidden < 1:
            raise ValueError(f"AffineCoupling: hidden must be >= 1, got {hidden}")
        if not np.isfinite(clamp):
            raise ValueError(f"AffineCoupling: clamp must be finite, got {clamp}")
        self.channels = channels
        self.c1 = channels // 2
        self.c2 = channels - self.c1
        self.hidden = hidden
        self.clamp = float(clamp)
        self.subnet = subnet
        self._params: Dict[str, np.ndarray] = {}
        if subnet is None:
            g = _rng(rng)
            c1, c2 = self.c1, self.c2

            def draw(o, i, k):
                return g.normal(0.0, 1.0 / np.sqrt(i * k * k), size=(o, i, k, k))

            self._params = {
                "subnet.0.weight": draw(hidden, c1, 3), "subnet.0.bias": np.zeros(hidden),
                "subnet.2.weight": draw(hidden, hidden, 1), "subnet.2.bias": np.zeros(hidden),
                "subnet.4.weight": np.zeros((2 * c2, hidden, 3, 3)) if zero_init else draw(2 * c2, hidden, 3),
                "subnet.4.bias": np.zeros(2 * c2),
            }

    def __repr__(self) -> str:
        net = "default" if self.subnet is None else repr(self.subnet)
        return f"AffineCoupling(channels={self.channels}, hidden={self.hidden}, clamp={self.clamp}, subnet={net})"

    # -- the network
    def _net(self, x1: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        n, _, h, w = x1.shape
        if self.subnet is None:
            p = self._params
            a = _conv2d(x1, p["subnet.0.weight"], p["subnet.0.bias"], 1)
            np.maximum(a, 0, out=a)
            a = _conv2d(a, p["subnet.2.weight"], p["subnet.2.bias"], 0)
            np.maximum(a, 0, out=a)
            a = _conv2d(a, p["subnet.4.weight"], p["subnet.4.bias"], 1)
        else:
            a = np.asarray(self.subnet(x1))
            want = (n, 2 * self.c2, h, w)
            if a.shape != want:
                raise ValueError(f"AffineCoupling: subnet returned shape {a.shape}, expected {want}")
            a = a.astype(x1.dtype, copy=False)
        if not np.isfinite(a).all():
            raise ValueError("AffineCoupling: the coupling network returned NaN or Inf")
        return soft_clamp(a[:, :self.c2], self.clamp), a[:, self.c2:]

    def forward(self, x, return_logdet: bool = False):
        """y = (x1, x2 * exp(s(x1)) + t(x1)); with return_logdet, also sum(s) per sample."""
        if _cuda_ops.is_device_array(x):
            return _cuda_ops.coupling_forward(self, x, return_logdet)
        x = _check_nchw(x, "AffineCoupling", self.channels)
        x1, x2 = x[:, :self.c1], x[:, self.c1:]
        s, t = self._net(x1)
        y = np.empty_like(x)
        y[:, :self.c1] = x1
        y[:, self.c1:] = x2 * np.exp(s) + t
        if return_logdet:
            return y, s.reshape(s.shape[0], -1).sum(axis=1)
        return y

    def inverse(self, y) -> np.ndarray:
        """x = (y1, (y2 - t(y1)) * exp(-s(y1)))."""
        if _cuda_ops.is_device_array(y):
            return _cuda_ops.coupling_inverse(self, y)
        y = _check_nchw(y, "AffineCoupling.inverse", self.channels, "y")
        y1, y2 = y[:, :self.c1], y[:, self.c1:]
        s, t = self._net(y1)
        x = np.empty_like(y)
        x[:, :self.c1] = y1
        x[:, self.c1:] = (y2 - t) * np.exp(-s)
        return x

    # -- weights
    def state_dict(self) -> Dict[str, np.ndarray]:
        """Copies of the weights (float64, OIHW convolution kernels)."""
        out = {k: v.copy() for k, v in self._params.items()}
        if self.subnet is not None and hasattr(self.subnet, "state_dict"):
            out.update({f"subnet.{k}": np.array(v) for k, v in self.subnet.state_dict().items()})
        return out

    def load_state_dict(self, mapping: Mapping, strict: bool = True) -> None:
        """Load weights with the keys and shapes of state_dict(); ValueError (weights unchanged) on a mismatch."""
        if self.subnet is not None:
            if not hasattr(self.subnet, "load_state_dict"):
                if strict and len(mapping):
                    raise ValueError(f"AffineCoupling.load_state_dict: unexpected keys: {list(mapping)} "
                                     "(the user subnet has no load_state_dict; weights left unchanged)")
                return
            bad = [k for k in mapping if not str(k).startswith("subnet.")]
            if strict and bad:
                raise ValueError(f"AffineCoupling.load_state_dict: unexpected keys: {bad} (weights left unchanged)")
            inner = {k[len("subnet."):]: v for k, v in mapping.items() if str(k).startswith("subnet.")}
            self.subnet.load_state_dict(inner, strict=strict)
            return
        new = _load_checked("AffineCoupling", self._params, mapping, strict)
        self._params.update(new)


# ----------------------------------------------------------------------------------------------------------
# ActNorm

class ActNorm(_FlowBlock):
    """Per-channel affine normalisation y = (x - loc) / scale (Glow's ActNorm, written as in SPEC.md).

    log|det J| = -H * W * sum_c log|scale_c| per sample.

    Data-dependent initialisation: the first ``forward`` (or ``logdet``) of an uninitialised block, or an
    explicit ``initialize(x)``, sets loc_c and scale_c to the mean and the (population) standard deviation of
    channel c over (N, H, W) of that batch, so that this batch comes out with zero mean and unit variance per
    channel (a channel with zero spread gets scale 1). ``initialized`` tells whether this has happened;
    ``load_state_dict`` also marks the block initialised. ``inverse`` of an uninitialised block is an error.
    state_dict keys: ``loc`` (C,) and ``scale`` (C,); scale must be non-zero.
    """

    def __init__(self, channels: int):
        channels = int(channels)
        if channels < 1:
            raise ValueError(f"ActNorm: channels must be >= 1, got {channels}")
        self.channels = channels
        self.loc = np.zeros(channels)
        self.scale = np.ones(channels)
        self.initialized = False

    def __repr__(self) -> str:
        return f"ActNorm(channels={self.channels}, initialized={self.initialized})"

    def initialize(self, x) -> None:
        """Set loc, scale from the batch x (N, C, H, W): per-channel mean and standard deviation over N, H, W."""
        if _cuda_ops.is_device_array(x):
            return _cuda_ops.actnorm_initialize(self, x)
        x = _check_nchw(x, "ActNorm.initialize", self.channels)
        if x.shape[0] * x.shape[2] * x.shape[3] == 0:
            raise ValueError(f"ActNorm.initialize: expected a non-empty batch of shape (N, {self.channels}, H, W), "
                             f"got shape {x.shape}")
        xd = x.astype(np.float64, copy=False)
        loc = xd.mean(axis=(0, 2, 3))
        scale = np.sqrt(((xd - loc.reshape(1, -1, 1, 1)) ** 2).mean(axis=(0, 2, 3)))
        scale[~(scale > 0)] = 1.0
        self.loc, self.scale, self.initialized = loc, scale, True

    def _coeffs(self, dt) -> Tuple[np.ndarray, np.ndarray]:
        return (self.loc.astype(dt).reshape(1, -1, 1, 1), self.scale.astype(dt).reshape(1, -1, 1, 1))

    def forward(self, x, return_logdet: bool = False):
        """y = (x - loc) / scale (initialising loc, scale from x first if not yet initialised)."""
        if _cuda_ops.is_device_array(x):
            return _cuda_ops.actnorm_forward(self, x, return_logdet)
        x = _check_nchw(x, "ActNorm", self.channels)
        if not self.initialized:
            self.initialize(x)
        loc, scale = self._coeffs(x.dtype)
        y = (x - loc) / scale
        if return_logdet:
            ld = -x.shape[2] * x.shape[3] * np.sum(np.log(np.abs(self.scale)))
            return y, np.full(x.shape[0], ld, dtype=x.dtype)
        return y

    def inverse(self, y) -> np.ndarray:
        """x = y * scale + loc."""
        if _cuda_ops.is_device_array(y):
            return _cuda_ops.actnorm_inverse(self, y)
        if not self.initialized:
            raise ValueError("ActNorm.inverse: the block is not initialised (run forward or initialize(x) on data, "
                             "or load_state_dict, first)")
        y = _check_nchw(y, "ActNorm.inverse", self.channels, "y")
        loc, scale = self._coeffs(y.dtype)
        return y * scale + loc

    def state_dict(self) -> Dict[str, np.ndarray]:
        return {"loc": self.loc.copy(), "scale": self.scale.copy()}

    def load_state_dict(self, mapping: Mapping, strict: bool = True) -> None:
        """Load ``loc``, ``scale`` (each (C,)); marks the block initialised. ValueError, nothing changed, on a
        missing / unexpected / wrongly shaped key or a zero scale."""
        new = _load_checked("ActNorm", self.state_dict(), mapping, strict)
        if "scale" in new and np.any(new["scale"] == 0):
            raise ValueError("ActNorm.load_state_dict: invalid values: ['scale (contains 0)'] (weights left unchanged)")
        if "loc" in new:
            self.loc = new["loc"]
        if "scale" in new:
            self.scale = new["scale"]
        self.initialized = True


# ----------------------------------------------------------------------------------------------------------
# invertible 1x1 convolution

def _unit_lower_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by forward substitution, row by row (C is small)."""
    c = lower.shape[0]
    inv = np.zeros_like(lower)
    for i in range(c):
        # row i of L^-1: (e_i - sum_{k<i} L[i, k] * inv[k]) / L[i, i]
        row = -lower[i, :i] @ inv[:i]
        row[i] += 1.0
        inv[i] = row / lower[i, i]
    return inv


class InvertibleConv1x1(_FlowBlock):
    """Glow's invertible 1x1 convolution: y[n, :, i, j] = W @ x[n, :, i, j] for every pixel.

    With ``lu=True`` (default) W = P @ L @ (U + diag(s)): P a fixed permutation, L unit lower-triangular, U
    strictly upper-triangular, s the diagonal; log|det J| = H * W * sum log|s|, and W^-1 = (U + diag s)^-1 L^-1 P^T
    comes from triangular inverses. With ``lu=False`` W is one free matrix and log|det W| comes from slogdet.
    Initialised (seeded by ``rng``) from a random rotation: the Q factor of the QR decomposition of a Gaussian
    matrix (sign-corrected so that it is Haar-distributed), then LU-factorised with partial pivoting.
    state_dict keys: ``perm`` (C, C, a permutation matrix, fixed), ``lower``, ``upper`` (C, C; only the strictly
    lower / strictly upper parts are used) and ``s`` (C,, non-zero); or ``weight`` (C, C) with lu=False.
    """

    def __init__(self, channels: int, lu: bool = True, rng: RngLike = None):
        channels = int(channels)
        if channels < 1:
            raise ValueError(f"InvertibleConv1x1: channels must be >= 1, got {channels}")
        self.channels = channels
        self.lu = bool(lu)
        g = _rng(rng)
        q, r = np.linalg.qr(g.normal(size=(channels, channels)))
        q = q * np.where(np.diag(r) < 0, -1.0, 1.0)
        if self.lu:
            p, lower, upper = self._plu(q)
            self._params = {"perm": p, "lower": np.tril(lower, -1), "upper": np.triu(upper, 1),
                            "s": np.diag(upper).copy()}
        else:
            self._params = {"weight": q}
        self._cache: Optional[Tuple[np.ndarray, np.ndarray, float]] = None

    def __repr__(self) -> str:
        return f"InvertibleConv1x1(channels={self.channels}, lu={self.lu})"

    @staticmethod
    def _plu(a: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """a = P @ L @ U by Gaussian elimination with partial pivoting (L unit lower, U upper)."""
        c = a.shape[0]
        u = a.astype(np.float64).copy()
        lower = np.eye(c)
        order = np.arange(c)
        for k in range(c - 1):
            piv = k + int(np.argmax(np.abs(u[k:, k])))
            if piv != k:
                u[[k, piv]] = u[[piv, k]]
                order[[k, piv]] = order[[piv, k]]
                lower[[k, piv], :k] = lower[[piv, k], :k]
            f = u[k + 1:, k] / u[k, k]
            lower[k + 1:, k] = f
            u[k + 1:] -= np.outer(f, u[k])
            u[k + 1:, k] = 0.0
        # rows of P^T a are a[order], so P = I[:, order]^T^T: P[order[i], i] = 1
        perm = np.zeros((c, c))
        perm[order, np.arange(c)] = 1.0
        return perm, lower, np.triu(u)

    def _matrices(self) -> Tuple[np.ndarray, np.ndarray, float]:
        """(W, W^-1, log|det W|) in float64, cached until the weights change."""
        if self._cache is None:
            p = self._params
            if self.lu:
                c = self.channels
                lower = np.tril(p["lower"], -1) + np.eye(c)
                upper = np.triu(p["upper"], 1) + np.diag(p["s"])
                w = p["perm"] @ lower @ upper
                # (U + diag s)^-1 = (((U + diag s)^T)^-1)^T, a lower-triangular inverse
                w_inv = _unit_lower_inverse(upper.T).T @ _unit_lower_inverse(lower) @ p["perm"].T
                ld = float(np.sum(np.log(np.abs(p["s"]))))
            else:
                w = p["weight"]
                sign, ld = np.linalg.slogdet(w)
                if sign == 0:
                    raise ValueError("InvertibleConv1x1: the weight matrix is singular")
                w_inv = np.linalg.inv(w)
                ld = float(ld)
            self._cache = (w, w_inv, ld)
        return self._cache

    @property
    def weight(self) -> np.ndarray:
        """The (C, C) matrix W (a copy, float64)."""
        return self._matrices()[0].copy()

    @staticmethod
    def _apply(m: np.ndarray, x: np.ndarray) -> np.ndarray:
        # one BLAS GEMM (C, C) @ (C, H*W) per image: np.matmul with a broadcast (C, C) operand takes a slow
        # non-BLAS loop (30x slower at C=64, 32x32)
        n, c, h, w = x.shape
        m = m.astype(x.dtype)
        xs = x.reshape(n, c, h * w)
        out = np.empty_like(xs)
        for i in range(n):
            np.matmul(m, xs[i], out=out[i])
        return out.reshape(n, c, h, w)

    def forward(self, x, return_logdet: bool = False):
        """y = W x per pixel; with return_logdet, also H * W * log|det W| per sample."""
        if _cuda_ops.is_device_array(x):
            return _cuda_ops.conv1x1_forward(self, x, return_logdet)
        x = _check_nchw(x, "InvertibleConv1x1", self.channels)
        w, _, ld = self._matrices()
        y = self._apply(w, x)
        if return_logdet:
            return y, np.full(x.shape[0], x.shape[2] * x.shape[3] * ld, dtype=x.dtype)
        return y

    def inverse(self, y) -> np.ndarray:
        """x = W^-1 y per pixel."""
        if _cuda_ops.is_device_array(y):
            return _cuda_ops.conv1x1_inverse(self, y)
        y = _check_nchw(y, "InvertibleConv1x1.inverse", self.channels, "y")
        return self._apply(self._matrices()[1], y)

    def state_dict(self) -> Dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._params.items()}

    def load_state_dict(self, mapping: Mapping, strict: bool = True) -> None:
        """Load the weights; ValueError, nothing changed, on missing / unexpected / wrongly shaped keys, a
        ``perm`` that is not a permutation matrix, a zero in ``s`` or a singular ``weight``."""
        new = _load_checked("InvertibleConv1x1", self._params, mapping, strict)
        bad = []
        if "perm" in new:
            pm = new["perm"]
            if not (np.all((pm == 0) | (pm == 1)) and np.all(pm.sum(0) == 1) and np.all(pm.sum(1) == 1)):
                bad.append("perm (not a permutation matrix)")
        if "s" in new and np.any(new["s"] == 0):
            bad.append("s (contains 0)")
        if "weight" in new and np.linalg.matrix_rank(new["weight"]) < self.channels:
            bad.append("weight (singular)")
        if bad:
            raise ValueError(f"InvertibleConv1x1.load_state_dict: invalid values: {bad} (weights left unchanged)")
        for k in ("lower",):
            if k in new:
                new[k] = np.tril(new[k], -1)
        for k in ("upper",):
            if k in new:
                new[k] = np.triu(new[k], 1)
        self._params.update(new)
        self._cache = None


# ----------------------------------------------------------------------------------------------------------
# Sequential

def _is_volume_preserving(block) -> bool:
    if getattr(block, "volume_preserving", False):
        return True
    # psi is a permutation. (IRevNetBlock has its own logdet, 0, which refuses injective blocks; InjectivePad,
    # not a bijection, has no log-determinant at all.)
    try:
        from .irevnet import SpaceToDepth
    except ImportError:  # pragma: no cover
        return False
    return isinstance(block, SpaceToDepth)


class Sequential(_FlowBlock):
    """Composition of invertible blocks: forward in order, inverse in reverse order, log-determinants summed.

    Any block with ``forward`` and ``inverse`` is accepted (the flow blocks here, the i-RevNet blocks, another
    Sequential); what one block returns (an array, or an i-RevNet pair) goes to the next as it is. A block
    without ``logdet`` counts 0 only if it is volume-preserving (``volume_preserving = True``, or SpaceToDepth);
    otherwise ``logdet`` raises ValueError (so does a Sequential containing InjectivePad, which is not a
    bijection). state_dict keys are ``"<index>.<key>"``, as in torch.nn.Sequential.
    """

    def __init__(self, *blocks):
        if len(blocks) == 1 and isinstance(blocks[0], (list, tuple)):
            blocks = tuple(blocks[0])
        for i, b in enumerate(blocks):
            if not (callable(getattr(b, "forward", None)) and callable(getattr(b, "inverse", None))):
                raise TypeError(f"Sequential: block {i} ({type(b).__name__}) has no forward/inverse")
        self.blocks = list(blocks)

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(b) for b in self.blocks)
        return f"Sequential(\n  {inner}\n)" if self.blocks else "Sequential()"

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i):
        return self.blocks[i]

    def __iter__(self) -> Iterator:
        return iter(self.blocks)

    @property
    def volume_preserving(self) -> bool:  # type: ignore[override]
        return all(_is_volume_preserving(b) for b in self.blocks)

    def forward(self, x, return_logdet: bool = False):
        """y = f_k(... f_1(x)); with return_logdet, also the summed log|det J| per sample."""
        if return_logdet and _cuda_ops.is_device_array(x):
            return _cuda_ops.sequential_forward(self, x, return_logdet)
        return self._forward(x, return_logdet, np)

    def _forward(self, x, return_logdet: bool, xp):
        """forward() with the array module of x (NumPy, or CuPy from the CUDA path)."""
        total = None
        for i, b in enumerate(self.blocks):
            if not return_logdet:
                x = b.forward(x)
                continue
            if isinstance(b, _FlowBlock):
                x, ld = b.forward(x, return_logdet=True)
            elif callable(getattr(b, "logdet", None)):
                ld = xp.asarray(b.logdet(x))
                x = b.forward(x)
            elif _is_volume_preserving(b):
                x = b.forward(x)
                ld = None
            else:
                raise ValueError(f"Sequential: block {i} ({type(b).__name__}) has no logdet and is not "
                                 "volume-preserving")
            if ld is not None:
                total = ld if total is None else total + ld
        if not return_logdet:
            return x
        if total is None:
            first = xp.asarray(x[0] if isinstance(x, tuple) else x)
            total = xp.zeros(first.shape[0], dtype=np.float32 if first.dtype == np.float32 else np.float64)
        return x, total

    def inverse(self, y):
        """x = f_1^-1(... f_k^-1(y))."""
        for b in reversed(self.blocks):
            y = b.inverse(y)
        return y

    def state_dict(self) -> Dict[str, np.ndarray]:
        out = {}
        for i, b in enumerate(self.blocks):
            if callable(getattr(b, "state_dict", None)):
                out.update({f"{i}.{k}": np.array(v) for k, v in b.state_dict().items()})
        return out

    def load_state_dict(self, mapping: Mapping, strict: bool = True) -> None:
        """Load every block's weights from ``"<index>.<key>"`` entries. All blocks are checked (against a copy)
        before any is changed, so on ValueError no weights change."""
        if not isinstance(mapping, Mapping):
            raise TypeError(f"Sequential.load_state_dict: expected a mapping, got {type(mapping).__name__}")
        current = self.state_dict()
        unexpected = [k for k in mapping if k not in current]
        missing = [k for k in current if k not in mapping]
        problems = []
        if strict and missing:
            problems.append(f"missing keys: {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys: {unexpected}")
        wrong, bad_value = [], []
        for k, ref in current.items():
            if k in mapping:
                v = mapping[k]
                if hasattr(v, "detach") and hasattr(v, "cpu"):        # a torch tensor
                    v = v.detach().cpu().numpy()
                v = np.asarray(v)
                if v.shape != ref.shape:
                    wrong.append(f"{k} (expected {ref.shape}, got {v.shape})")
                elif v.dtype.kind not in "fiub":
                    bad_value.append(f"{k} (dtype {v.dtype})")
                elif not np.isfinite(v).all():
                    bad_value.append(f"{k} (NaN or Inf)")
        if wrong:
            problems.append(f"wrongly shaped keys: {wrong}")
        if bad_value:
            problems.append(f"invalid values: {bad_value}")
        if problems:
            raise ValueError("Sequential.load_state_dict: " + "; ".join(problems) + " (weights left unchanged)")
        parts = []
        for i, b in enumerate(self.blocks):
            if not callable(getattr(b, "load_state_dict", None)):
                continue
            pre = f"{i}."
            sub = {k[len(pre):]: v for k, v in mapping.items() if str(k).startswith(pre)}
            if sub or strict:
                parts.append((b, sub))
        # value checks (NaN, zero scales, ...) are per block: try on the blocks, restoring on failure
        saved = [(b, b.state_dict(), getattr(b, "initialized", None)) for b, _ in parts]
        i = 0
        try:
            for i, (b, sub) in enumerate(parts):
                b.load_state_dict(sub, strict=strict)
        except ValueError as err:
            for b, sd, init in saved:
                b.load_state_dict(sd, strict=False)
                if init is not None:
                    b.initialized = init
            raise ValueError(f"Sequential.load_state_dict: block {self.blocks.index(parts[i][0])}: {err}") from None
