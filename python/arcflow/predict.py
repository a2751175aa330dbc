"""Predictions of infinitely wide networks from their kernels, with neural-tangents' ``predict`` names and semantics.

A neural-tangents user changes only the import (``from arcflow import predict``). With K the training kernel
(n x n), k_* the test-train kernel (m x n), y the targets (n, k), eta the learning rate and N = y.size:

* NNGP (the Bayesian posterior of the infinitely wide network)::

      mean = k_* K^-1 y,      cov = K_** - k_* K^-1 k_*^T

* NTK (the infinite ensemble of networks trained by continuous gradient descent on the MSE for a time t)::

      mean_t = k_* K^-1 (I - exp(-eta K t / N)) y
      cov_t  = K_** + A_t K_nngp A_t^T - (A_t k_*nngp^T + transpose),   A_t = k_* K^-1 (I - exp(-eta K t / N))

  with K, k_* the NTK and K_**, K_nngp, k_*nngp the NNGP; t = infinity (``t=None``) drops the exponential
  (Lee et al. 2019, "Wide neural networks of any depth evolve as linear models under gradient descent").

``diag_reg`` adds ``diag_reg * I`` to K, scaled by the mean of K's diagonal unless ``diag_reg_absolute_scale``.

Each predictor factorises a training kernel once, on first use, and keeps the factor for every later ``t`` and
test set: a Cholesky factor for ``t=None`` (infinite time), an eigendecomposition for finite times. The factor
is the one n x n work array: a training kernel computed by an arcflow ``kernel_fn`` is factorised in place (and
computed again if a later call needs it unfactorised); a caller's kernel is copied first, and is never modified
(an eigendecomposition also holds that copy while LAPACK writes the eigenvectors). The factorisation and every
product run in float64 (kernel matrices are often ill-conditioned; a float32 Cholesky fails where the float64
one does not); float32 kernels and targets give float32 results. scipy.linalg is used when it imports (in-place
LAPACK, triangular solves), else NumPy (with more temporaries).

A training kernel that is not positive definite is a ValueError that names ``diag_reg`` at t=None (and t=inf);
at a finite t a positive semi-definite kernel suffices: a zero eigenvalue lam contributes the limit tau of
(1 - exp(-lam tau)) / lam (tau = eta t / N), where neural-tangents gives NaN.

Example
-------
>>> import numpy as np, arcflow
>>> from arcflow import predict
>>> rng = np.random.default_rng(0)
>>> x_train, x_test = rng.normal(size=(50, 4)), rng.normal(size=(10, 4))
>>> y_train = np.sin(x_train[:, :1])
>>> kfn = arcflow.kernel_fn(depth=2, activation="relu", w_std=1.5, b_std=0.1)
>>> predict_fn = predict.gradient_descent_mse_ensemble(kfn, x_train, y_train, diag_reg=1e-4)
>>> predict_fn(x_test=x_test, get="nngp").shape          # t=None: infinite time
(10, 1)
>>> out = predict_fn(t=[1.0, 10.0], x_test=x_test, get="ntk", compute_cov=True)
>>> out.mean.shape, out.covariance.shape
((2, 10, 1), (2, 10, 10))
"""
from __future__ import annotations

import numbers
from collections import namedtuple
from typing import Callable, NamedTuple, Optional, Sequence, Union

import numpy as np

__all__ = ["Gaussian", "gradient_descent_mse_ensemble", "gradient_descent_mse", "gp_inference",
           "max_learning_rate"]

Get = Union[None, str, Sequence[str]]


class Gaussian(NamedTuple):
    """A ``(mean, covariance)`` pair: the mean has the outputs' shape, the covariance the kernel's (m, m)."""

    mean: np.ndarray
    covariance: np.ndarray


_TUPLES: dict = {}


def _gaussians(fields: tuple):
    """The result type for several ``get`` names: a named tuple 'Gaussians' with the fields in that order."""
    if fields not in _TUPLES:
        _TUPLES[fields] = namedtuple("Gaussians", fields)
    return _TUPLES[fields]


# ----------------------------------------------------------------------------------------------------------
# Linear algebra: scipy.linalg when it imports (in place, triangular solves), else NumPy.
def _scipy_linalg():
    try:
        import scipy.linalg
    except ImportError:  # scipy is optional
        return None
    return scipy.linalg


class _NotPositiveDefinite(Exception):
    pass


def _cholesky(a: np.ndarray):
    """The lower Cholesky factor L of the symmetric positive definite float64 matrix ``a`` (which it may
    overwrite), as two functions: ``solve(b) = a^-1 b`` and ``half(b) = L^-1 b``."""
    sl = _scipy_linalg()
    if sl is not None:
        try:
            # a.T is a's memory in Fortran order (a is symmetric): LAPACK factorises it in place, no copy.
            c, lower = sl.cho_factor(a.T, lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:
            raise _NotPositiveDefinite from None
        if not np.all(np.isfinite(np.diagonal(c))):
            raise _NotPositiveDefinite
        return (lambda b: sl.cho_solve((c, lower), b, check_finite=False),
                lambda b: sl.solve_triangular(c, b, lower=True, check_finite=False))
    try:
        low = np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        raise _NotPositiveDefinite from None
    del a
    # NumPy has no triangular solve: invert the triangular factor once, then each solve is two products.
    inv = np.linalg.inv(low)
    del low
    return (lambda b: inv.T @ (inv @ b)), (lambda b: inv @ b)


def _eigh(a: np.ndarray):
    """Eigenvalues (ascending) and eigenvectors of the symmetric float64 matrix ``a`` (which it may overwrite)."""
    sl = _scipy_linalg()
    if sl is not None:
        # evr (MRRR) needs O(n) workspace besides the eigenvectors; evd (NumPy's) needs 2 n^2 more.
        return sl.eigh(a.T, overwrite_a=True, check_finite=False, driver="evr")
    return np.linalg.eigh(a)


# ----------------------------------------------------------------------------------------------------------
# Validation
def _real_scalar(v, name, where, minimum=None, strict=False):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(float(v)):
        raise ValueError(f"{where}: {name} must be a finite real number, got {v!r}")
    v = float(v)
    if minimum is not None and (v < minimum or (strict and v == minimum)):
        raise ValueError(f"{where}: {name} must be {'>' if strict else '>='} {minimum}, got {v!r}")
    return v


def _as_float_array(a, name, where) -> np.ndarray:
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where}: {name} could not be converted to a numeric array: {e}") from None
    if np.iscomplexobj(arr) or arr.dtype.kind not in "biuf":
        raise TypeError(f"{where}: {name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: {name} contains NaN or Inf")
    return arr


def _kernel_matrix(k, name, where, shape) -> np.ndarray:
    arr = _as_float_array(k, name, where)
    if arr.ndim != 2 or arr.shape != tuple(shape):
        raise ValueError(f"{where}: {name} must have shape {tuple(shape)}, got {arr.shape}")
    return arr


def _targets(y, where):
    """y as (n, k) and whether it was 1-D (n,): the results of a 1-D y are 1-D as well."""
    arr = _as_float_array(y, "y_train", where)
    if arr.ndim not in (1, 2):
        raise ValueError(f"{where}: y_train must have shape (n,) or (n, k), got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{where}: y_train is empty (shape {arr.shape}); there is nothing to fit")
    return (arr[:, None] if arr.ndim == 1 else arr), arr.ndim == 1


def _check_trace_axes(trace_axes, y_ndim, where):
    axes = (trace_axes,) if isinstance(trace_axes, numbers.Integral) else tuple(trace_axes)
    if axes not in ((-1,), (y_ndim - 1,)):
        raise ValueError(f"{where}: only trace_axes=(-1,) is supported (the kernel is the same for every "
                         f"output of y_train), got {trace_axes!r}")


def _dtype(*arrays) -> np.dtype:
    """float32 when every floating input is at most float32 (integer targets do not count), else float64."""
    floats = [a.dtype for a in arrays if a is not None and a.dtype.kind == "f"]
    if floats and all(d.itemsize <= 4 for d in floats):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _check_get(get, where, valid=("nngp", "ntk")):
    """(names, single): get=None is ('nngp', 'ntk'); one string gives single=True (one result, not a tuple)."""
    if get is None:
        return ("nngp", "ntk"), False
    single = isinstance(get, str)
    names = (get,) if single else get
    try:
        names = tuple(names)
    except TypeError:
        raise ValueError(f"{where}: get must be one of {valid} or a tuple of them, got {get!r}") from None
    if not names or not all(isinstance(g, str) for g in names):
        raise ValueError(f"{where}: get must be one of {valid} or a non-empty tuple of them, got {get!r}")
    names = tuple(g.lower() for g in names)
    bad = [g for g in names if g not in valid]
    if bad:
        raise ValueError(f"{where}: get must name {' / '.join(valid)}, got {get!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: every name in get must appear once, got {get!r}")
    return names, single


def _times(t, learning_rate, n_outputs, where):
    """(tau, shape): tau = t * learning_rate / y_train.size, flattened, and the shape of t."""
    try:
        arr = np.asarray(t, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: t must be None, a real number or an array of them, got {t!r}") from None
    if np.any(np.isnan(arr)):
        raise ValueError(f"{where}: t contains NaN")
    if np.any(arr < 0):
        raise ValueError(f"{where}: t must be >= 0 (a training time), got {t!r}")
    return arr.reshape(-1) * learning_rate / n_outputs, arr.shape


def _not_pd(where, what, diag_reg, absolute):
    scale = "absolute" if absolute else "relative to the mean of its diagonal"
    return ValueError(
        f"{where}: the training kernel{what} is not positive definite (with diag_reg = {diag_reg!r}, {scale}); "
        f"pass diag_reg > 0 (e.g. diag_reg=1e-6) to regularise it, or remove duplicate training inputs")


# ----------------------------------------------------------------------------------------------------------
# The factorisations of one training kernel (each computed once, on first use).
def _phi(lam, tau):
    """(1 - exp(-lam tau)) / lam, elementwise over tau (T, 1) x lam (1, n), with lam = max(lam, 0) and its limit
    tau at lam = 0. For lam > 0 it is neural-tangents' -expm1(-lam tau) / |lam|."""
    lam = np.maximum(lam, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = -np.expm1(-lam * tau) / lam
    return np.where(lam > 0, out, tau + 0.0 * lam)


class _Factors:
    """The Cholesky factor and the eigendecomposition of ``K + reg I`` for one training kernel."""

    def __init__(self, name, get_kernel, diag_reg, absolute, eps, where):
        self.name, self._get_kernel = name, get_kernel
        self.diag_reg, self.absolute, self.eps, self.where = diag_reg, absolute, eps, where
        self.reg = None
        self._solve = None
        self._eig = None
        self.cache = {}

    def _work(self, keep: bool) -> np.ndarray:
        """The regularised kernel in float64, in an array this object may overwrite."""
        k, owned = self._get_kernel(self.name, keep)
        if self.reg is None:
            n = k.shape[0]
            scale = 1.0 if self.absolute else float(np.trace(k, dtype=np.float64)) / n
            self.reg = self.diag_reg * scale
        a = k if (owned and k.dtype == np.float64 and k.flags.c_contiguous and k.flags.writeable) else \
            np.array(k, dtype=np.float64, order="C")
        del k
        if self.reg:
            a[np.diag_indices_from(a)] += self.reg
        return a

    def solve(self, b: np.ndarray, keep: bool = True, half: bool = False) -> np.ndarray:
        """(K + reg I)^-1 b for b of shape (n, r) by the cached Cholesky factor L, or L^-1 b with half=True."""
        if self._solve is None:
            try:
                self._solve = _cholesky(self._work(keep))
            except _NotPositiveDefinite:
                raise _not_pd(self.where, f" ({self.name})", self.diag_reg, self.absolute) from None
        return self._solve[1 if half else 0](np.asarray(b, dtype=np.float64))

    def eig(self, keep: bool = True):
        """Eigenvalues (1, n) and eigenvectors (n, n) of K + reg I, cached."""
        if self._eig is None:
            w, v = _eigh(self._work(keep))
            lmax = float(np.max(np.abs(w))) if w.size else 0.0
            # Beyond rounding a negative eigenvalue is a kernel that is not positive semi-definite.
            if w.size and w[0] < -w.size * self.eps * lmax:
                raise ValueError(
                    f"{self.where}: the training kernel ({self.name}) is not positive semi-definite: its smallest "
                    f"eigenvalue is {w[0]:.3g} (the largest {lmax:.3g}) with diag_reg = {self.diag_reg!r}; "
                    f"check the kernel, or pass diag_reg > 0")
            self._eig = (w[None, :], v)
        return self._eig

    def check_invertible(self, tau):
        """The test-set predictions divide by the eigenvalues: at t = infinity a zero one is infinite."""
        w, _ = self._eig
        if np.any(np.isinf(tau)) and w.size and w[0, 0] <= 0:
            raise _not_pd(self.where, f" ({self.name})", self.diag_reg, self.absolute)


def _eps(dtype) -> float:
    return float(np.finfo(np.float32 if dtype == np.float32 else np.float64).eps)


def _finish(out: dict, names, single, dtype, squeeze: bool, has_cov: bool):
    """Cast, drop the output axis of a 1-D y_train, and pack as neural-tangents does."""
    res = {}
    for g in names:
        v = out[g]
        if has_cov:
            mean, cov = v
            mean = mean[..., 0] if squeeze else mean
            res[g] = Gaussian(mean.astype(dtype, copy=False), cov.astype(dtype, copy=False))
        else:
            res[g] = (v[..., 0] if squeeze else v).astype(dtype, copy=False)
    if single:
        return res[names[0]]
    return _gaussians(names)(*(res[g] for g in names))


# ----------------------------------------------------------------------------------------------------------
def _eval_kernel_fn(kernel_fn, x1, x2, names, where, shape):
    """{name: array} from an arcflow KernelFn (one fused pass) or any neural-tangents-like kernel_fn."""
    from ._kernel_fn import KernelFn

    if isinstance(kernel_fn, KernelFn):
        k = kernel_fn(x1, x2, tuple(names))
        got = {g: getattr(k, g) for g in names}
    else:
        got = {}
        if len(names) > 1:
            k = kernel_fn(x1, x2, tuple(names))
            if all(getattr(k, g, None) is not None for g in names):
                got = {g: getattr(k, g) for g in names}
        for g in names:
            if g not in got:
                k = kernel_fn(x1, x2, g)
                got[g] = getattr(k, g) if hasattr(k, g) else k
    return {g: _kernel_matrix(v, f"kernel_fn(...) ({g})", where, shape) for g, v in got.items()}


def _n_rows(x, name, where) -> Optional[int]:
    shape = getattr(x, "shape", None)
    if shape is None:
        try:
            return len(x)
        except TypeError:
            return None
    if len(shape) == 0:
        raise ValueError(f"{where}: {name} must be an array of inputs (n, ...), got a scalar")
    return int(shape[0])


def _dependency(names, compute_cov):
    """The kernels a prediction needs: the NTK covariance needs the NNGP too."""
    dep = ()
    if "nngp" in names or ("ntk" in names and compute_cov):
        dep += ("nngp",)
    if "ntk" in names:
        dep += ("ntk",)
    return dep


def gradient_descent_mse_ensemble(kernel_fn: Callable, x_train, y_train, learning_rate: float = 1.0,
                                  diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False,
                                  trace_axes=(-1,)) -> Callable:
    """The infinite ensemble of infinitely wide networks: the NNGP posterior, or the networks trained by
    continuous gradient descent on the MSE (NTK) for a time t, as a Gaussian over the test outputs.

    kernel_fn : an :func:`arcflow.kernel_fn` object, or any callable ``kernel_fn(x1, x2, get)`` that returns
        an (n1, n2) array for one name (as neural-tangents' ``kernel_fn``).
    x_train, y_train : training inputs (n, ...) and targets (n,) or (n, k).
    learning_rate : eta (> 0); the time enters as ``eta * t / y_train.size``.
    diag_reg : adds ``diag_reg * I`` to the training kernel, times the mean of its diagonal unless
        ``diag_reg_absolute_scale``.
    trace_axes : only ``(-1,)``, the outputs axis of y_train (the kernel is the same for every output).

    Returns ``predict_fn(t=None, x_test=None, get=None, compute_cov=False)``:

    * ``t`` : None (infinite time, by a Cholesky solve), a time >= 0 or an array of times (by the
      eigendecomposition; the results gain the leading axes of t).
    * ``x_test`` : test inputs (m, ...); None gives the predictions on the training inputs (as neural-tangents:
      at t=None y_train itself with zero covariance; pass x_test=x_train for the regularised ones).
    * ``get`` : "nngp", "ntk", or a tuple of them (a named tuple 'Gaussians' with those fields); None is both.
    * ``compute_cov`` : True gives :class:`Gaussian` (mean (..., m, k), covariance (..., m, m)), else the mean.

    The mean of the NTK ensemble at time t is ``k_* K^-1 (I - exp(-eta K t / N)) y`` (N = y_train.size), its
    covariance ``K_** + A K_nngp A^T - (A k_*nngp^T + transpose)`` with ``A = k_* K^-1 (I - exp(-eta K t / N))``
    (K, k_* the NTK; K_**, K_nngp, k_*nngp the NNGP); the NNGP's is the posterior ``k_* K^-1 y`` and
    ``K_** - k_* K^-1 k_*^T`` at t = infinity. The training kernels, their factorisations (one per kernel and
    kind, on first use) and K^-1 y are kept for every later call.

    >>> import numpy as np, arcflow
    >>> from arcflow import predict
    >>> x = np.random.default_rng(0).normal(size=(30, 3)); y = x[:, :1] ** 2
    >>> predict_fn = predict.gradient_descent_mse_ensemble(arcflow.kernel_fn(depth=2), x, y, diag_reg=1e-6)
    >>> predict_fn(t=None, x_test=x[:5], get="ntk").shape
    (5, 1)
    """
    where = "arcflow.predict.gradient_descent_mse_ensemble"
    if not callable(kernel_fn):
        raise TypeError(f"{where}: kernel_fn must be callable (an arcflow.kernel_fn object), "
                        f"got {type(kernel_fn).__name__}")
    y2, squeeze = _targets(y_train, where)
    _check_trace_axes(trace_axes, 1 if squeeze else 2, where)
    lr = _real_scalar(learning_rate, "learning_rate", where, 0.0, strict=True)
    reg = _real_scalar(diag_reg, "diag_reg", where, 0.0)
    absolute = _check_bool(diag_reg_absolute_scale, "diag_reg_absolute_scale", where)
    n, n_out = y2.shape[0], y2.size
    rows = _n_rows(x_train, "x_train", where)
    if rows is not None and rows != n:
        raise ValueError(f"{where}: x_train has {rows} rows but y_train has {n} (shape {np.shape(y_train)})")
    from ._kernel_fn import KernelFn
    owned = isinstance(kernel_fn, KernelFn)  # its arrays are fresh: they may be factorised in place
    y64 = np.asarray(y2, dtype=np.float64)
    cache: dict = {}          # training kernels not yet handed to a factorisation
    dtypes: list = []         # the dtypes of the training kernels computed

    def compute(names):
        got = _eval_kernel_fn(kernel_fn, x_train, None, tuple(names), where, (n, n))
        cache.update(got)
        dtypes.extend(v.dtype for v in got.values())

    def train_kernel(g, keep=True):
        """(array, may_overwrite): keep=False hands an owned kernel over (it is computed again when needed)."""
        if g not in cache:
            compute((g,))
        k = cache[g]
        if not keep and owned:
            del cache[g]
        return k, owned and not keep

    factors = {g: _Factors(g, train_kernel, reg, absolute, 0.0, where) for g in ("nngp", "ntk")}

    def predict_fn(t=None, x_test=None, get: Get = None, compute_cov: bool = False):
        names, single = _check_get(get, where)
        compute_cov = _check_bool(compute_cov, "compute_cov", where)
        if t is not None:
            tau, t_shape = _times(t, lr, n_out, where)
        dep = _dependency(names, compute_cov)
        # The raw NNGP stays while an NTK covariance needs it; the others may be factorised in place.
        keep_nngp = compute_cov and "ntk" in names
        kind = "_solve" if t is None else "_eig"
        needed = [g for g in dep if g not in cache and g in names and getattr(factors[g], kind) is None]
        if keep_nngp and "nngp" not in cache and "nngp" not in needed:
            needed.insert(0, "nngp")
        if needed:  # this call's training kernels in one fused pass
            compute(needed)
        dtype = _dtype(*(np.empty(0, d) for d in dtypes), y2)
        for g in dep:
            factors[g].eps = _eps(dtypes[0] if dtypes else np.float64)
        out = {}
        if x_test is None:
            for g in names:
                if t is None:
                    out[g] = (y64, np.zeros((n, n))) if compute_cov else y64
                    continue
                w, v = factors[g].eig(keep=g == "nngp" and keep_nngp)
                z = _cached(factors[g].cache, "vty", lambda: v.T @ y64)
                lam = np.maximum(w, 0.0)
                decay = -np.expm1(-lam * tau[:, None])                    # (T, n)
                mean = np.einsum("ji,ti,ik->tjk", v, decay, z, optimize=True)
                mean = mean.reshape(t_shape + (n, y2.shape[1]))
                if not compute_cov:
                    out[g] = mean
                    continue
                if g == "nngp":
                    cov = _stack([(v * (lam * np.exp(-2.0 * lam * s))) @ v.T for s in tau], n)
                else:
                    nngp_dd = np.asarray(train_kernel("nngp")[0], dtype=np.float64)
                    cov = _stack([_sandwich(v * np.exp(-lam * s), v, nngp_dd) for s in tau], n)
                out[g] = (mean, cov.reshape(t_shape + (n, n)))
            return _finish(out, names, single, dtype, squeeze, compute_cov)

        m = _n_rows(x_test, "x_test", where)
        if m is None:
            raise TypeError(f"{where}: x_test must be an array of inputs (m, ...), got {type(x_test).__name__}")
        k_td = _eval_kernel_fn(kernel_fn, x_test, x_train, dep, where, (m, n))
        nngp_tt = None
        if compute_cov:
            nngp_tt = _eval_kernel_fn(kernel_fn, x_test, None, ("nngp",), where, (m, m))["nngp"]
            dtype = _dtype(np.empty(0, dtype), nngp_tt)
            nngp_tt = np.asarray(nngp_tt, dtype=np.float64)
        dtype = _dtype(np.empty(0, dtype), *k_td.values())
        k_td = {g: np.asarray(v, dtype=np.float64) for g, v in k_td.items()}
        for g in names:
            ktd = k_td[g]
            if t is None:
                f = factors[g]
                alpha = _cached(f.cache, "k_inv_y", lambda: f.solve(y64, keep=g == "nngp" and keep_nngp))
                mean = ktd @ alpha
                if not compute_cov:
                    out[g] = mean
                    continue
                out[g] = (mean, _cov_inf(g, f, ktd, k_td.get("nngp"), nngp_tt,
                                         lambda: np.asarray(train_kernel("nngp")[0], dtype=np.float64)))
                continue
            f = factors[g]
            w, v = f.eig(keep=g == "nngp" and keep_nngp)
            f.check_invertible(tau)
            z = _cached(f.cache, "vty", lambda: v.T @ y64)
            phi = _phi(w, tau[:, None])                                   # (T, n)
            # k_* (V diag(phi) V^T y): n^2 k + m n k per time, not the m n^2 of k_* V
            coef = np.einsum("ji,ti,ik->tjk", v, phi, z, optimize=True)   # (T, n, k)
            mean = np.matmul(ktd, coef).reshape(t_shape + (m, y2.shape[1]))
            if not compute_cov:
                out[g] = mean
                continue
            kv = ktd @ v                                                  # (m, n), shared by every t
            if g == "nngp":
                phi2 = _phi(w, 2.0 * tau[:, None])
                cov = _stack([nngp_tt - (kv * p) @ kv.T for p in phi2], m)
            else:
                nngp_dd = np.asarray(train_kernel("nngp")[0], dtype=np.float64)
                q = k_td["nngp"] @ v                                      # (m, n)
                covs = []
                for p in phi:
                    term1 = v @ (p[:, None] * kv.T)                        # (n, m): K^-1 (I - e^{-K tau}) k_*^T
                    b = (kv * p) @ q.T
                    covs.append(term1.T @ (nngp_dd @ term1) - b - b.T + nngp_tt)
                cov = _stack(covs, m)
            out[g] = (mean, cov.reshape(t_shape + (m, m)))
        return _finish(out, names, single, dtype, squeeze, compute_cov)

    return predict_fn


def _stack(covs, size):
    """The covariances of every time, (T, size, size); T may be 0 (an empty array of times)."""
    return np.stack(covs) if covs else np.zeros((0, size, size))


def _sandwich(a, v, mid):
    """(a v^T) mid (a v^T)^T for a = V diag(d): E K E^T with E = V diag(d) V^T."""
    e = a @ v.T
    return e @ mid @ e.T


def _cached(cache, key, make):
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _cov_inf(g, f, ktd, ktd_nngp, k_tt, nngp_dd):
    """The posterior covariance at t = infinity (gp_inference): g in nngp / ntkgp (K_** - k_* K^-1 k_*^T with
    the same kernel) or ntk (the gradient-flow ensemble)."""
    if g != "ntk":
        w = f.solve(ktd.T, half=True)                                     # L^-1 k_*^T: one triangular solve
        return k_tt - w.T @ w
    term1 = f.solve(ktd.T)                                                # (n, m): K^-1 k_*^T
    b = ktd_nngp @ term1                                                  # (m, m): k_*nngp K^-1 k_*^T
    return term1.T @ (nngp_dd() @ term1) - b - b.T + k_tt


def _check_bool(v, name, where) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    raise TypeError(f"{where}: {name} must be True or False, got {v!r}")


# ----------------------------------------------------------------------------------------------------------
def gradient_descent_mse(k_train_train, y_train, learning_rate: float = 1.0, diag_reg: float = 0.0,
                         diag_reg_absolute_scale: bool = False, trace_axes=(-1,)) -> Callable:
    """A network trained by continuous gradient descent on the MSE in its linearised regime, from precomputed
    kernels: ``f_t = f_0 - (I - exp(-eta K t / N)) (f_0 - y)`` on the training set and
    ``f*_t = f*_0 + k_* K^-1 (I - exp(-eta K t / N)) (y - f_0)`` on a test set (N = y_train.size).

    k_train_train : (n, n) kernel (an NTK, e.g. ``arcflow.ntk(x_train)``); y_train : (n,) or (n, k).
    Returns ``predict_fn(t=None, fx_train_0=0.0, fx_test_0=None, k_test_train=None)``: the training outputs
    at time(s) t, or ``(fx_train_t, fx_test_t)`` when fx_test_0 is given (with k_test_train (m, n)), or only
    fx_test_t when fx_train_0 is None. t=None is infinite time (a Cholesky solve; fx_train_t = y_train);
    an array of t adds its leading axes.

    >>> import numpy as np, arcflow
    >>> from arcflow import predict
    >>> x = np.random.default_rng(0).normal(size=(20, 3)); y = np.cos(x[:, :2])
    >>> predict_fn = predict.gradient_descent_mse(arcflow.ntk(x, depth=2), y)
    >>> fx_train, fx_test = predict_fn(t=[0.5, 2.0], fx_train_0=0.0, fx_test_0=np.zeros((4, 2)),
    ...                                k_test_train=arcflow.ntk(x[:4], x, depth=2))
    >>> fx_train.shape, fx_test.shape
    ((2, 20, 2), (2, 4, 2))
    """
    where = "arcflow.predict.gradient_descent_mse"
    y2, squeeze = _targets(y_train, where)
    _check_trace_axes(trace_axes, 1 if squeeze else 2, where)
    n, n_out = y2.shape[0], y2.size
    k_dd = _kernel_matrix(k_train_train, "k_train_train", where, (n, n))
    lr = _real_scalar(learning_rate, "learning_rate", where, 0.0, strict=True)
    reg = _real_scalar(diag_reg, "diag_reg", where, 0.0)
    absolute = _check_bool(diag_reg_absolute_scale, "diag_reg_absolute_scale", where)
    dtype = _dtype(k_dd, y2)
    y64 = np.asarray(y2, dtype=np.float64)
    f = _Factors("k_train_train", lambda g, keep: (k_dd, False), reg, absolute, _eps(k_dd.dtype), where)
    y_train_shape = np.shape(y_train)

    def outputs(v, name, rows):
        if v is None:
            return None
        arr = _as_float_array(v, name, where)
        shape = (rows,) + y_train_shape[1:]
        try:
            arr = np.broadcast_to(arr, shape)
        except ValueError:
            raise ValueError(f"{where}: {name} has shape {arr.shape}, which does not broadcast to {shape}") from None
        return np.asarray(arr, dtype=np.float64).reshape(rows, y2.shape[1])

    def predict_fn(t=None, fx_train_0=0.0, fx_test_0=None, k_test_train=None):
        if fx_train_0 is None and fx_test_0 is None:
            raise ValueError(f"{where}: fx_train_0 and fx_test_0 are both None: there is nothing to predict")
        if fx_test_0 is not None and k_test_train is None:
            raise ValueError(f"{where}: predictions on the test set (fx_test_0) need k_test_train")
        ktd = ktd_in = None
        if fx_test_0 is not None:
            ktd_in = k_arr = _as_float_array(k_test_train, "k_test_train", where)
            if k_arr.ndim != 2 or k_arr.shape[1] != n:
                raise ValueError(f"{where}: k_test_train must have shape (m, {n}), got {k_arr.shape}")
            ktd = np.asarray(k_arr, dtype=np.float64)
        f0 = outputs(fx_train_0, "fx_train_0", n)
        ft0 = outputs(fx_test_0, "fx_test_0", ktd.shape[0] if ktd is not None else 0)
        # Initial outputs given as float64 arrays make a float64 result; Python numbers do not count.
        res_dtype = _dtype(np.empty(0, dtype), *(v for v in (fx_train_0, fx_test_0, ktd_in)
                                                 if isinstance(v, np.ndarray)))
        if t is None:
            fx_train = y64
            if ft0 is None:
                return _shape(fx_train, squeeze, res_dtype)
            rhs = y64 if f0 is None else y64 - f0
            fx_test = ft0 + ktd @ f.solve(rhs)
            if f0 is None:
                return _shape(fx_test, squeeze, res_dtype)
            return _shape(fx_train, squeeze, res_dtype), _shape(fx_test, squeeze, res_dtype)
        tau, t_shape = _times(t, lr, n_out, where)
        w, v = f.eig()
        rhs = -y64 if f0 is None else f0 - y64
        z = v.T @ rhs
        lam = np.maximum(w, 0.0)
        res = []
        if f0 is not None:
            dfx = np.einsum("ji,ti,ik->tjk", v, np.expm1(-lam * tau[:, None]), z, optimize=True)
            res.append(_shape((f0 + dfx).reshape(t_shape + f0.shape), squeeze, res_dtype))
        if ft0 is not None:
            f.check_invertible(tau)
            dfx = np.matmul(ktd, np.einsum("ji,ti,ik->tjk", v, -_phi(w, tau[:, None]), z, optimize=True))
            res.append(_shape((ft0 + dfx).reshape(t_shape + ft0.shape), squeeze, res_dtype))
        return res[0] if len(res) == 1 else tuple(res)

    return predict_fn


def _shape(a, squeeze, dtype):
    return (a[..., 0] if squeeze else a).astype(dtype, copy=False)


# ----------------------------------------------------------------------------------------------------------
def _field(k, g, name, where, required=True):
    """k itself when it is an array, else its attribute g (a Kernels / neural-tangents Kernel named tuple)."""
    if isinstance(k, np.ndarray) or not hasattr(k, "_fields") and not hasattr(k, "nngp") and not hasattr(k, "ntk"):
        return k
    v = getattr(k, g, None)
    if v is None and required:
        raise ValueError(f"{where}: {name} has no {g!r} kernel (it is {type(k).__name__} without a {g} field); "
                         f"pass the kernels with both fields, e.g. arcflow.kernels(..., get=('nngp', 'ntk'))")
    return v


def _has_field(k, g) -> bool:
    return not isinstance(k, np.ndarray) and getattr(k, g, None) is not None


def gp_inference(k_train_train, y_train, diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False,
                 trace_axes=(-1,)) -> Callable:
    """The Gaussian process posterior (NNGP), the infinite-time NTK ensemble, or the NTK-GP, from precomputed
    kernels, at t = infinity (Cholesky solves).

    k_train_train : an (n, n) array (used for every ``get``), or the kernels as :class:`arcflow.Kernels` (or
        neural-tangents' Kernel): the NTK covariance needs both the NNGP and the NTK.
    Returns ``predict_fn(get=None, k_test_train=None, k_test_test=None)``:

    * ``get`` : "nngp", "ntk", "ntkgp" (a GP with the NTK as covariance) or a tuple (a named tuple
      'Gaussians'); None is ("nngp", "ntk").
    * ``k_test_train`` : (m, n) (array or named tuple as above); None gives the training set, N(y_train, 0).
    * ``k_test_test`` : (m, m) NNGP (or NTK for ntkgp) of the test set; given, the result is a
      :class:`Gaussian` with the covariance, else the mean. With k_test_train None any non-None value asks for
      the (zero) training covariance.

    NNGP: mean ``k_* K^-1 y``, covariance ``K_** - k_* K^-1 k_*^T``; NTK: mean ``k_* K^-1 y`` (K, k_* the
    NTK), covariance ``K_** + k_* K^-1 K_nngp K^-1 k_*^T - (k_* K^-1 k_*nngp^T + transpose)``.

    >>> import numpy as np, arcflow
    >>> from arcflow import predict
    >>> x = np.random.default_rng(0).normal(size=(20, 3)); y = x[:, :1]
    >>> kfn = arcflow.kernel_fn(depth=2, b_std=0.1)
    >>> predict_fn = predict.gp_inference(kfn(x), y, diag_reg=1e-6)
    >>> out = predict_fn("nngp", kfn(x[:4], x), kfn(x[:4], get="nngp"))
    >>> out.mean.shape, out.covariance.shape
    ((4, 1), (4, 4))
    """
    where = "arcflow.predict.gp_inference"
    y2, squeeze = _targets(y_train, where)
    _check_trace_axes(trace_axes, 1 if squeeze else 2, where)
    n = y2.shape[0]
    reg = _real_scalar(diag_reg, "diag_reg", where, 0.0)
    absolute = _check_bool(diag_reg_absolute_scale, "diag_reg_absolute_scale", where)
    y64 = np.asarray(y2, dtype=np.float64)
    checked: dict = {}

    def train(g):
        if g not in checked:
            checked[g] = _kernel_matrix(_field(k_train_train, g, "k_train_train", where),
                                        f"k_train_train ({g})", where, (n, n))
        return checked[g]

    factors = {g: _Factors(g, lambda g_, keep: (train(g_), False), reg, absolute, 0.0, where)
               for g in ("nngp", "ntk")}

    def predict_fn(get: Get = None, k_test_train=None, k_test_test=None):
        names, single = _check_get(get, where, ("nngp", "ntk", "ntkgp"))
        out = {}
        cov_wanted = k_test_test is not None
        dtype = None
        for g in names:
            kname = "ntk" if g == "ntkgp" else g
            k_dd = train(kname)
            dtype = _dtype(k_dd, y2) if dtype is None else dtype
            f = factors[kname]
            f.eps = _eps(k_dd.dtype)
            if k_test_train is None:
                out[g] = (y64, np.zeros((n, n))) if cov_wanted else y64
                continue
            ktd_raw = _field(k_test_train, kname, "k_test_train", where)
            ktd_arr = _as_float_array(ktd_raw, f"k_test_train ({kname})", where)
            if ktd_arr.ndim != 2 or ktd_arr.shape[1] != n:
                raise ValueError(f"{where}: k_test_train ({kname}) must have shape (m, {n}), got {ktd_arr.shape}")
            m = ktd_arr.shape[0]
            ktd = np.asarray(ktd_arr, dtype=np.float64)
            alpha = _cached(f.cache, "k_inv_y", lambda: f.solve(y64))
            mean = ktd @ alpha
            if not cov_wanted:
                out[g] = mean
                continue
            g_init = "ntk" if g == "ntkgp" else "nngp"
            if g == "ntk" and not (_has_field(k_train_train, "nngp") and _has_field(k_test_train, "nngp")):
                raise ValueError(f"{where}: the NTK covariance on a test set needs the NNGP as well as the NTK in "
                                 f"k_train_train and k_test_train: pass Kernels(nngp, ntk) named tuples "
                                 f"(e.g. arcflow.kernels(..., get=('nngp', 'ntk')))")
            k_tt = np.asarray(_kernel_matrix(_field(k_test_test, g_init, "k_test_test", where),
                                             f"k_test_test ({g_init})", where, (m, m)), dtype=np.float64)
            ktd_nngp = None
            if g == "ntk":
                ktd_nngp = _as_float_array(_field(k_test_train, "nngp", "k_test_train", where),
                                           "k_test_train (nngp)", where)
                if ktd_nngp.shape != (m, n):
                    raise ValueError(f"{where}: k_test_train (nngp) must have shape ({m}, {n}), "
                                     f"got {ktd_nngp.shape}")
                ktd_nngp = np.asarray(ktd_nngp, dtype=np.float64)
            cov = _cov_inf(g, f, ktd, ktd_nngp, k_tt, lambda: np.asarray(train("nngp"), dtype=np.float64))
            out[g] = (mean, cov)
        return _finish(out, names, single, dtype, squeeze, cov_wanted)

    return predict_fn


# ----------------------------------------------------------------------------------------------------------
def max_learning_rate(ntk_train_train, y_train_size: Optional[int] = None, momentum: float = 0.0,
                      eps: float = 1e-12) -> float:
    """The largest learning rate for which gradient descent (with momentum) on the MSE
    ``1 / (2 N) |f(x) - y|^2`` is stable for an infinitely wide network:
    ``2 (1 + momentum) N / (lambda_max(NTK) + eps)``, N = y_train_size (default: the NTK's number of rows).

    >>> import numpy as np, arcflow
    >>> from arcflow import predict
    >>> lr = predict.max_learning_rate(arcflow.ntk(np.eye(5), depth=2))
    """
    where = "arcflow.predict.max_learning_rate"
    k = _as_float_array(ntk_train_train, "ntk_train_train", where)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] == 0:
        raise ValueError(f"{where}: ntk_train_train must be a non-empty square (n, n) matrix, got {k.shape}")
    if y_train_size is None:
        factor = k.shape[0]
    else:
        if isinstance(y_train_size, bool) or not isinstance(y_train_size, numbers.Integral) or y_train_size < 1:
            raise ValueError(f"{where}: y_train_size must be an integer >= 1, got {y_train_size!r}")
        factor = int(y_train_size)
    momentum = _real_scalar(momentum, "momentum", where, 0.0)
    eps = _real_scalar(eps, "eps", where, 0.0)
    k = np.asarray(k, dtype=np.float64)
    sl = _scipy_linalg()
    n = k.shape[0]
    if sl is not None:
        top = float(sl.eigvalsh(k, subset_by_index=[n - 1, n - 1], check_finite=False)[-1])
    else:
        top = float(np.linalg.eigvalsh(k)[-1])
    return 2.0 * (1.0 + momentum) * factor / (top + eps)

