"""Normalising-flow blocks on NCHW NumPy arrays: affine coupling, ActNorm, invertible 1x1 convolution, Sequential.

Every block maps an (N, C, H, W) array to an array of the same shape and has

    forward(x, return_logdet=False) -> y           (or (y, logdet) with return_logdet=True)
    inverse(y) -> x
    logdet(x) -> (N,)  log|det d forward(x)[n] / d x[n]|, one value per sample
    state_dict() -> {name: ndarray},  load_state_dict(mapping, strict=True)

float16 and float32 input compute in float32 (weights are kept in float64 and cast once per dtype); every
other real numeric input is computed in float64 (the package's dtype rule, ``_backend``). GPU arrays (CuPy,
``__cuda_array_interface__``) are computed on their device by
arcflow's CUDA kernels and come back as CuPy arrays: each block's forward and inverse is written once against an
ops provider (``_backend``) chosen per call from the input (``_providers``). Bad input raises ValueError naming the
block and the expected shape; a float32 result that overflows raises FloatingPointError naming the block and
the layer or formula.
Formulas: docs/mathematics.md §2; RealNVP (Dinh, Sohl-Dickstein & Bengio, ICLR 2017) and Glow (Kingma &
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

from . import _ops
from ._backend import Ops, cached, soft_clamp  # noqa: F401  (soft_clamp: part of this module's API)
from ._providers import provider_for
from ._validate import as_int, load_checked, rng as _rng

__all__ = ["AffineCoupling", "ActNorm", "InvertibleConv1x1", "Sequential"]

RngLike = Union[None, int, np.random.Generator]

#: InvertibleConv1x1 accepts W in a dtype when cond(W) * eps(dtype) is at most this: the relative error of
#: the computed W^-1 y is about that product (float32: cond(W) <= 8.4e3; float64: <= 4.5e12)
_MAX_COND_EPS = 1e-3


# ----------------------------------------------------------------------------------------------------------
# helpers

def _conv2d_numpy(x: np.ndarray, w: np.ndarray, b: Optional[np.ndarray], padding: int) -> np.ndarray:
    """Stride-1 cross-correlation (torch.nn.functional.conv2d convention), im2col + GEMM in NumPy: the
    oracle that tests compare the C++ convolution with."""
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


def _cast_weight(w: np.ndarray, dt: np.dtype, where: str, key: str) -> np.ndarray:
    """A float64 weight in the compute dtype; FloatingPointError when it does not fit (1e39 in float32)."""
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(w, dtype=dt)
    if not _ops.all_finite(out):
        raise FloatingPointError(f"{where}: the weight {key} (max |value| {float(np.max(np.abs(w))):.3g}) overflows "
                                 f"{dt}; compute in float64")
    return out


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
        channels, hidden = as_int(channels, "channels", "AffineCoupling"), as_int(hidden, "hidden", "AffineCoupling")
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
        self._device_cache: dict = {}
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
    def _layers(self, ops: Ops, like, where: str):
        """The default network's [(weight, bias)] in like's dtype on ops' memory, cached until they change;
        FloatingPointError when a weight does not fit the dtype."""
        dt = np.dtype(like.dtype)
        p = self._params
        keys = ("subnet.0", "subnet.2", "subnet.4")
        refs = [p[k + s] for k in keys for s in (".weight", ".bias")]
        return cached(self._device_cache, (ops.device_key(like), dt.str), refs,
                      lambda: [(ops.upload(_cast_weight(p[k + ".weight"], dt, where, k + ".weight"), dt),
                                ops.upload(_cast_weight(p[k + ".bias"], dt, where, k + ".bias"), dt)) for k in keys])

    def _net(self, ops: Ops, x1, where: str):
        """NN(x1), (N, 2 * c2, H, W): s_raw then t. x1 and the weights are finite, so NaN/Inf in a layer's output
        is an overflow of that layer: FloatingPointError naming it. The default network's ReLUs are fused into
        the next convolution, which also tests its raw input for NaN/Inf in the pass that reads it."""
        n, _, h, w = x1.shape
        dt = x1.dtype
        if self.subnet is None:
            a = x1
            for i, ((wk, bk), pad) in enumerate(zip(self._layers(ops, x1, where), (1, 0, 1))):
                a, bad = ops.conv(a, wk, bk, 1, pad, in_relu=i > 0, fused=("x",) if i > 0 else (), where=where)
                if bad:
                    prev = ("subnet.0", "subnet.2")[i - 1]
                    raise FloatingPointError(f"{where}: the coupling network overflowed {dt}: the output of {prev} "
                                             f"(a convolution) holds NaN or Inf")
            return ops.check_finite_output(a, where, "the coupling network's last layer subnet.4")
        a = ops.as_array(self.subnet(x1))
        want = (n, 2 * self.c2, h, w)
        if a.shape != want:
            raise ValueError(f"AffineCoupling: subnet returned shape {a.shape}, expected {want}")
        a = ops.xp.ascontiguousarray(a, dtype=dt)
        return ops.check_finite_output(a, where, "the user subnet's output")

    def forward(self, x, return_logdet: bool = False):
        """y = (x1, x2 * exp(s(x1)) + t(x1)); with return_logdet, also sum(s) per sample.
        FloatingPointError (naming the layer) when the network or y2 overflows the dtype."""
        where = "AffineCoupling"
        with provider_for(x, where=where) as ops:
            x = ops.input(x, where, f"(N, {self.channels}, H, W)", self.channels, what="x")
            a = self._net(ops, ops.gather([x], 0, self.c1), where)
            y, s = ops.affine_coupling(x, a, self.c1, self.c2, self.clamp, False, return_logdet)
            ops.check_finite_output(y, where, "y2 = x2 * exp(s) + t")
            if return_logdet:
                return y, s.reshape(s.shape[0], -1).sum(axis=1)
            return y

    def inverse(self, y) -> np.ndarray:
        """x = (y1, (y2 - t(y1)) * exp(-s(y1)))."""
        where = "AffineCoupling.inverse"
        with provider_for(y, where=where) as ops:
            y = ops.input(y, where, f"(N, {self.channels}, H, W)", self.channels, what="y")
            a = self._net(ops, ops.gather([y], 0, self.c1), where)
            x = ops.affine_coupling(y, a, self.c1, self.c2, self.clamp, True, False)[0]
            return ops.check_finite_output(x, where, "x2 = (y2 - t) * exp(-s)")

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
        new = load_checked("AffineCoupling", self._params, mapping, strict)
        self._params.update(new)


# ----------------------------------------------------------------------------------------------------------
# ActNorm

class ActNorm(_FlowBlock):
    """Per-channel affine normalisation y = (x - loc) / scale (Glow's ActNorm, written as in docs/mathematics.md §2).

    log|det J| = -H * W * sum_c log|scale_c| per sample.

    Data-dependent initialisation: the first ``forward`` (or ``logdet``) of an uninitialised block, or an
    explicit ``initialize(x)``, sets loc_c and scale_c to the mean and the (population) standard deviation of
    channel c over (N, H, W) of that batch, so that this batch comes out with zero mean and unit variance per
    channel (a channel with zero spread gets scale 1). ``initialized`` tells whether this has happened;
    ``load_state_dict`` also marks the block initialised. ``inverse`` of an uninitialised block is an error.
    state_dict keys: ``loc`` (C,) and ``scale`` (C,); scale must be non-zero.
    """

    def __init__(self, channels: int):
        channels = as_int(channels, "channels", "ActNorm", 1)
        self.channels = channels
        self.loc = np.zeros(channels)
        self.scale = np.ones(channels)
        self.initialized = False
        self._device_cache: dict = {}

    def __repr__(self) -> str:
        return f"ActNorm(channels={self.channels}, initialized={self.initialized})"

    def initialize(self, x) -> None:
        """Set loc, scale from the batch x (N, C, H, W): per-channel mean and standard deviation over N, H, W."""
        where = "ActNorm.initialize"
        with provider_for(x, where=where) as ops:
            x = ops.input(x, where, f"(N, {self.channels}, H, W)", self.channels, what="x")
            if x.shape[0] * x.shape[2] * x.shape[3] == 0:
                raise ValueError(f"{where}: expected a non-empty batch of shape (N, {self.channels}, H, W), "
                                 f"got shape {x.shape}")
            xd = x.astype(np.float64, copy=False)
            loc = xd.mean(axis=(0, 2, 3))
            scale = ops.xp.sqrt(((xd - loc.reshape(1, -1, 1, 1)) ** 2).mean(axis=(0, 2, 3)))
            loc, scale = ops.to_host(loc), ops.to_host(scale)
        scale[~(scale > 0)] = 1.0
        self.loc, self.scale, self.initialized = loc, scale, True

    def _coeffs(self, ops: Ops, like):
        """(loc, scale) in like's dtype on ops' memory, cached until they change."""
        dt = np.dtype(like.dtype)
        return cached(self._device_cache, (ops.device_key(like), dt.str), [self.loc, self.scale],
                      lambda: (ops.upload(_cast_weight(self.loc, dt, "ActNorm", "loc"), dt),
                               ops.upload(_cast_weight(self.scale, dt, "ActNorm", "scale"), dt)))

    def forward(self, x, return_logdet: bool = False):
        """y = (x - loc) / scale (initialising loc, scale from x first if not yet initialised)."""
        with provider_for(x, where="ActNorm") as ops:
            x = ops.input(x, "ActNorm", f"(N, {self.channels}, H, W)", self.channels, what="x")
            if not self.initialized:
                self.initialize(x)
            loc, scale = self._coeffs(ops, x)
            y = ops.check_finite_output(ops.actnorm(x, loc, scale, False), "ActNorm", "y = (x - loc) / scale")
            if return_logdet:
                ld = -x.shape[2] * x.shape[3] * np.sum(np.log(np.abs(self.scale)))
                return y, ops.full(x.shape[0], ld, x.dtype)
            return y

    def inverse(self, y) -> np.ndarray:
        """x = y * scale + loc."""
        if not self.initialized:
            raise ValueError("ActNorm.inverse: the block is not initialised (run forward or initialize(x) on data, "
                             "or load_state_dict, first)")
        with provider_for(y, where="ActNorm.inverse") as ops:
            y = ops.input(y, "ActNorm.inverse", f"(N, {self.channels}, H, W)", self.channels, what="y")
            loc, scale = self._coeffs(ops, y)
            return ops.check_finite_output(ops.actnorm(y, loc, scale, True), "ActNorm.inverse",
                                           "x = y * scale + loc")

    def state_dict(self) -> Dict[str, np.ndarray]:
        return {"loc": self.loc.copy(), "scale": self.scale.copy()}

    def load_state_dict(self, mapping: Mapping, strict: bool = True) -> None:
        """Load ``loc``, ``scale`` (each (C,)); marks the block initialised. ValueError, nothing changed, on a
        missing / unexpected / wrongly shaped key or a zero scale."""
        new = load_checked("ActNorm", self.state_dict(), mapping, strict,
                           lambda k, v: "scale (contains 0)" if k == "scale" and np.any(v == 0) else None)
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
        channels = as_int(channels, "channels", "InvertibleConv1x1", 1)
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
        self._device_cache: dict = {}

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

    @staticmethod
    def _build(p: Mapping[str, np.ndarray], lu: bool) -> Tuple[np.ndarray, np.ndarray, float, float]:
        """(W, W^-1, log|det W|, cond(W)) in float64 from the parameters; cond is inf for a singular W."""
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if lu:
                c = p["s"].shape[0]
                lower = np.tril(p["lower"], -1) + np.eye(c)
                upper = np.triu(p["upper"], 1) + np.diag(p["s"])
                w = p["perm"] @ lower @ upper
                # (U + diag s)^-1 = (((U + diag s)^T)^-1)^T, a lower-triangular inverse
                w_inv = _unit_lower_inverse(upper.T).T @ _unit_lower_inverse(lower) @ p["perm"].T
                ld = float(np.sum(np.log(np.abs(p["s"]))))
            else:
                w = p["weight"]
                sign, ld = np.linalg.slogdet(w)
                w_inv = np.linalg.inv(w) if sign != 0 else np.full_like(w, np.inf)
                ld = float(ld)
            finite = np.isfinite(w).all() and np.isfinite(w_inv).all()
            cond = float(np.linalg.cond(w)) if finite else np.inf
            if finite:
                # the computed inverse itself (triangular solves without pivoting) must be accurate
                resid = float(np.max(np.abs(w @ w_inv - np.eye(w.shape[0]))))
                cond = max(cond, resid / np.finfo(np.float64).eps)
        return w, w_inv, ld, cond if np.isfinite(cond) else np.inf

    def _matrices(self) -> Tuple[np.ndarray, np.ndarray, float]:
        """(W, W^-1, log|det W|) in float64, cached until the weights change."""
        if self._cache is None:
            w, w_inv, ld, self._cond = self._build(self._params, self.lu)
            self._cache = (w, w_inv, ld)
        return self._cache

    def _conditioning_problem(self, cond: float, dt) -> Optional[str]:
        """Why W cannot be inverted accurately in dt, or None: the relative error of W^-1 y is about
        cond(W) * eps, which must stay below _MAX_COND_EPS."""
        eps = float(np.finfo(dt).eps)
        if cond * eps <= _MAX_COND_EPS:
            return None
        key = "s" if self.lu else "weight"
        what = "W = P L (U + diag s)" if self.lu else "weight"
        return (f"{key} ({what} is singular or ill-conditioned: condition number {cond:.3g}, so its inverse is "
                f"not accurate in {np.dtype(dt)}, which needs a condition number below {_MAX_COND_EPS / eps:.3g})")

    def _check_dtype(self, dt, where: str) -> None:
        self._matrices()
        problem = self._conditioning_problem(self._cond, dt)
        if problem is not None:
            raise ValueError(f"{where}: {problem}; compute in float64" if dt == np.float32 else f"{where}: {problem}")

    @property
    def weight(self) -> np.ndarray:
        """The (C, C) matrix W (a copy, float64)."""
        return self._matrices()[0].copy()

    def _weights(self, ops: Ops, like, where: str):
        """(W, W^-1, log|det W|), the matrices in like's dtype on ops' memory; ValueError when W^-1 is not
        accurate in that dtype."""
        dt = np.dtype(like.dtype)
        self._check_dtype(dt, where)
        mats = self._matrices()  # a new tuple whenever the weights change
        return cached(self._device_cache, (ops.device_key(like), dt.str), [mats],
                      lambda: (ops.upload(_cast_weight(mats[0], dt, "InvertibleConv1x1", "W"), dt),
                               ops.upload(_cast_weight(mats[1], dt, "InvertibleConv1x1", "W"), dt), mats[2]))

    def forward(self, x, return_logdet: bool = False):
        """y = W x per pixel; with return_logdet, also H * W * log|det W| per sample."""
        where = "InvertibleConv1x1"
        with provider_for(x, where=where) as ops:
            x = ops.input(x, where, f"(N, {self.channels}, H, W)", self.channels, what="x")
            w, _, ld = self._weights(ops, x, where)
            y = ops.check_finite_output(ops.conv1x1(x, w), where, "y = W x")
            if return_logdet:
                return y, ops.full(x.shape[0], x.shape[2] * x.shape[3] * ld, x.dtype)
            return y

    def inverse(self, y) -> np.ndarray:
        """x = W^-1 y per pixel."""
        where = "InvertibleConv1x1.inverse"
        with provider_for(y, where=where) as ops:
            y = ops.input(y, where, f"(N, {self.channels}, H, W)", self.channels, what="y")
            _, w_inv, _ = self._weights(ops, y, where)
            return ops.check_finite_output(ops.conv1x1(y, w_inv), where, "x = W^-1 y")

    def state_dict(self) -> Dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._params.items()}

    def load_state_dict(self, mapping: Mapping, strict: bool = True) -> None:
        """Load the weights; ValueError, nothing changed, on missing / unexpected / wrongly shaped keys, a
        ``perm`` that is not a permutation matrix, a zero in ``s`` or a singular ``weight``."""
        def rules(k, v):
            if k == "perm" and not (np.all((v == 0) | (v == 1)) and np.all(v.sum(0) == 1) and np.all(v.sum(1) == 1)):
                return "perm (not a permutation matrix)"
            if k == "s" and np.any(v == 0):
                return "s (contains 0)"
            return None

        new = load_checked("InvertibleConv1x1", self._params, mapping, strict, rules)
        for k in ("lower",):
            if k in new:
                new[k] = np.tril(new[k], -1)
        for k in ("upper",):
            if k in new:
                new[k] = np.triu(new[k], 1)
        merged = dict(self._params, **new)
        problem = self._conditioning_problem(self._build(merged, self.lu)[3], np.float64)
        if problem is not None:
            raise ValueError(f"InvertibleConv1x1.load_state_dict: invalid values: {problem} (weights left unchanged)")
        self._params.update(new)
        self._cache = None


# ----------------------------------------------------------------------------------------------------------
# Sequential

def _is_volume_preserving(block) -> bool:
    # (SpaceToDepth, a permutation, says so; IRevNetBlock has its own logdet, 0, which refuses injective blocks;
    # InjectivePad, not a bijection, has no log-determinant at all.)
    return bool(getattr(block, "volume_preserving", False))


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
        with provider_for(x, where="Sequential") as ops:
            return self._forward(x, return_logdet, ops.xp)

    def _forward(self, x, return_logdet: bool, xp):
        """forward() with the array module of x (NumPy or CuPy), the log-determinants kept on its device."""
        at = [0]  # the block running, for the message (no state on self: blocks may run in several threads)
        try:
            return self._forward_blocks(x, return_logdet, xp, at)
        except FloatingPointError as err:
            raise FloatingPointError(f"Sequential: block {at[0]}: {err}") from None

    def _forward_blocks(self, x, return_logdet: bool, xp, at):
        total = None
        for i, b in enumerate(self.blocks):
            at[0] = i
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
        for i in range(len(self.blocks) - 1, -1, -1):
            try:
                y = self.blocks[i].inverse(y)
            except FloatingPointError as err:
                raise FloatingPointError(f"Sequential.inverse: block {i}: {err}") from None
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
        load_checked("Sequential", self.state_dict(), mapping, strict)  # keys, shapes, values; nothing changes
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
