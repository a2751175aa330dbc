"""Plain NumPy float64 oracle for the infinite-width kernels of docs/mathematics.md §1.

This module is deliberately simple: one vectorised layer recursion per call, float64 throughout,
no C++ (it never imports ``arcflow._core``). The tests use it as an oracle and the benchmarks as the
NumPy baseline.

Network (ntk parameterisation, as neural-tangents' ``stax.serial(Dense(w, W_std, b_std), phi, ...,
Dense(1, W_std, b_std))``), for layers l = 1 ... depth + 1::

    Sigma^1(x, y)   = W_std^2 <x, y> / d + b_std^2
    Sigma^{l+1}     = W_std^2 T(Sigma^l) + b_std^2         T    = E[phi(u) phi(v)]
    Theta^{l+1}     = Sigma^{l+1} + W_std^2 Tdot Theta^l   Tdot = E[phi'(u) phi'(v)]
    NNGP = Sigma^{depth+1},  NTK = Theta^{depth+1}

``fix_dep = k`` freezes the first k layers (as in the NumPy code of Arora et al., ICLR 2020):
Sigma^l is added to Theta only for layers l > k (1-based), so ``Theta^1 = 0`` when k >= 1.

Conventions
-----------
* Angle: ``c = Sigma(x,y) / sqrt(Sigma(x,x) Sigma(y,y))`` clipped to [-1, 1], ``theta = arccos c``.
* Zero rows: where ``Sigma(x,x) == 0`` or ``Sigma(y,y) == 0`` we use ``c = 0`` (``theta = pi/2``).
  This is what neural-tangents 0.6.5 does (its ``_arctan2(..., fill_zero=pi/2)`` in ABRelu and Sign;
  its Erf formula needs no convention), and it gives the same finite numbers as neural-tangents for
  every activation it can evaluate (checked in tests/kernels/test_vs_neural_tangents.py). For the
  continuous activations the value does not depend on the convention at all (every term carrying the
  angle is multiplied by a zero). It matters only for Step (order-0 arc-cosine), where a zero row has
  no limit; there ``T = 1/4`` off and on the diagonal.
* Diagonal: in the symmetric case (``x2 is None``) and for ``diag=True`` the cosine of a pair (x, x)
  is pinned to exactly 1. Off-diagonal collinear pairs (duplicate rows, multiples, d = 1) are computed
  naively: ``s12 / sqrt(s1 s2)`` rounds to 1 - eps, and the spurious angle ~1e-8 makes this oracle
  off by up to a few 1e-8 there (see docs/mathematics.md §1.3). The C++ engine is stable there;
  tests/kernels/test_mpmath_collinear.py checks it against a 50-digit evaluation instead of this module.
* Step and Sign have no NTK (phi' is a Dirac delta): asking for it is a ValueError.
  (neural-tangents 0.6.5 silently treats their derivative as 0 and returns Theta = NNGP-like values.)

Also here: :func:`kernel_value_batch_original` and :func:`kernel_value_original`, the NumPy
algorithm of Arora et al. (github.com/LeoYu/neural-tangent-kernel-UCI, ``NTK.py``) with its exact
operation order, so that their results are bit-identical to the published code.
"""
from __future__ import annotations

import math
from collections import namedtuple
from typing import Sequence, Union

import numpy as np

from .activations import ABReLU, Activation, Erf, RectifiedMonomial, Sign, resolve

__all__ = [
    "Kernels", "nngp", "ntk", "kernels", "arccos_j",
    "kernel_value_batch_original", "kernel_value_original",
]

Kernels = namedtuple("Kernels", ["nngp", "ntk"])

_TWO_PI = 2.0 * math.pi


# --------------------------------------------------------------------------------------------------
# Gaussian expectations T = E[phi(u) phi(v)] and Tdot = E[phi'(u) phi'(v)]
# --------------------------------------------------------------------------------------------------
def arccos_j(n: int, theta):
    """Cho & Saul's angular function J_n(theta) of the arc-cosine kernel of order n.

    ``J_0 = pi - theta``, ``J_1 = sin t + (pi - t) cos t`` and, for n >= 2, the recursion
    ``J_n = (2n - 1) cos t J_{n-1} + (n - 1)^2 sin^2 t J_{n-2}``, which equals Cho & Saul's
    ``(-1)^n sin^{2n+1} t ((1/sin t) d/dt)^n ((pi - t)/sin t)`` (tests/kernels/test_reference.py checks it).
    """
    theta = np.asarray(theta, dtype=np.float64)
    j_prev = np.pi - theta                                           # J_0
    if n == 0:
        return j_prev
    sin_t, cos_t = np.sin(theta), np.cos(theta)
    j_cur = sin_t + (np.pi - theta) * cos_t                          # J_1
    for k in range(2, n + 1):
        j_prev, j_cur = j_cur, (2 * k - 1) * cos_t * j_cur + (k - 1) ** 2 * sin_t ** 2 * j_prev
    return j_cur


def _angle(s1, s2, s12):
    """sqrt(s1 s2), c and theta, with c = 0 where s1 or s2 is zero."""
    root = np.sqrt(s1) * np.sqrt(s2)               # no overflow of s1 * s2 (deep monomials)
    root = np.where(s1 == s2, s1, root)            # exact, so identical pairs get c = 1 exactly
    zero = root == 0.0
    c = np.clip(s12 / np.where(zero, 1.0, root), -1.0, 1.0)
    c = np.where(zero, 0.0, c)
    return root, c, np.arccos(c)


def _expectations(act: Activation, s1, s2, s12, root, c, theta, need_dot: bool):
    """T and (if need_dot) Tdot for one layer; all arguments broadcast together."""
    if isinstance(act, ABReLU):
        a, b = act.a, act.b
        curv = (a - b) ** 2 / _TWO_PI
        t = curv * root * (np.sin(theta) - theta * c) + (a * a + b * b) / 2.0 * s12
        tdot = (a * a + b * b) / 2.0 - curv * theta if need_dot else None
        return t, tdot
    if isinstance(act, RectifiedMonomial):
        n = act.n
        t = root ** n / _TWO_PI * arccos_j(n, theta)
        tdot = None
        if need_dot:
            tdot = n * n * root ** (n - 1) / _TWO_PI * arccos_j(n - 1, theta)
        return t, tdot
    if isinstance(act, Sign):
        return 2.0 / np.pi * np.arcsin(c), None
    if isinstance(act, Erf):
        q = (1.0 + 2.0 * s1) * (1.0 + 2.0 * s2)
        t = 2.0 / np.pi * np.arcsin(np.clip(2.0 * s12 / np.sqrt(q), -1.0, 1.0))
        tdot = 4.0 / np.pi / np.sqrt(q - 4.0 * s12 * s12) if need_dot else None
        return t, tdot
    raise ValueError(f"reference: unsupported activation {act!r}")


# --------------------------------------------------------------------------------------------------
# The recursion
# --------------------------------------------------------------------------------------------------
def _as_2d(x, name):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {x.shape}")
    return x


def _diag_expectations(act, s, need_dot):
    """T and Tdot for pairs (x, x): c = 1 exactly (c = 0 for a zero variance, see module docstring)."""
    zero = s == 0.0
    c = np.where(zero, 0.0, 1.0)
    theta = np.where(zero, np.pi / 2, 0.0)
    return _expectations(act, s, s, s, np.abs(s), c, theta, need_dot)


def _recursion(x1, x2, depth, act, w_std, b_std, fix_dep, diag, want_nngp, want_ntk):
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    if not 0 <= fix_dep <= depth:
        raise ValueError(f"fix_dep must be in [0, depth], got fix_dep={fix_dep}, depth={depth}")
    if w_std < 0 or b_std < 0:
        raise ValueError("w_std and b_std must be >= 0")
    act = resolve(act)
    if want_ntk and not act.has_ntk:
        raise ValueError(f"{act!r} has no NTK: its derivative is a Dirac delta (ask for the NNGP only)")
    w2, b2 = float(w_std) ** 2, float(b_std) ** 2

    x1 = _as_2d(x1, "x1")
    d = x1.shape[1]
    sym = x2 is None
    if diag and not sym:
        raise ValueError("diag=True computes k(x, x) for the rows of x1; x2 must be None")
    if not sym:
        x2 = _as_2d(x2, "x2")
        if x2.shape[1] != d:
            raise ValueError(f"x1 has {d} features but x2 has {x2.shape[1]}")
    scale = w2 / d if d > 0 else 0.0

    # Layer 1: the input Dense layer.
    s1 = scale * np.einsum("ij,ij->i", x1, x1) + b2          # Sigma(x, x) for the rows of x1
    if diag:
        s12 = s1.copy()
    else:
        s2 = s1 if sym else scale * np.einsum("ij,ij->i", x2, x2) + b2
        s12 = scale * (x1 @ (x1 if sym else x2).T) + b2
        if sym:
            np.fill_diagonal(s12, s1)
    theta_ntk = s12.copy() if fix_dep < 1 else np.zeros_like(s12)

    # Layers 2 ... depth + 1: phi, then Dense.
    for layer in range(2, depth + 2):
        if diag:
            t, tdot = _diag_expectations(act, s12, want_ntk)
        else:
            root, c, theta = _angle(s1[:, None], s2[None, :], s12)
            if sym:
                np.fill_diagonal(c, np.where(s1 == 0.0, 0.0, 1.0))
                np.fill_diagonal(theta, np.where(s1 == 0.0, np.pi / 2, 0.0))
            t, tdot = _expectations(act, s1[:, None], s2[None, :], s12, root, c, theta, want_ntk)
            t1, _ = _diag_expectations(act, s1, False)
            s1_next = w2 * t1 + b2
            if sym:
                s2_next = s1_next
            else:
                t2, _ = _diag_expectations(act, s2, False)
                s2_next = w2 * t2 + b2
        s12 = w2 * t + b2
        if want_ntk:
            theta_ntk = w2 * tdot * theta_ntk
            if layer > fix_dep:
                theta_ntk = theta_ntk + s12
        if not diag:
            s1, s2 = s1_next, s2_next
            if sym:
                np.fill_diagonal(s12, s1)

    return Kernels(s12 if want_nngp else None, theta_ntk if want_ntk else None)


def kernels(x1, x2=None, *, depth: int = 1, activation: Union[str, Activation] = "relu",
            w_std: float = 1.0, b_std: float = 0.0, fix_dep: int = 0, diag: bool = False,
            get: Union[str, Sequence[str]] = ("nngp", "ntk")) -> Kernels:
    """NNGP and NTK of a depth-``depth`` fully-connected network, float64 (see module docstring).

    Returns ``Kernels(nngp, ntk)``: (n1, n2) matrices, (n1,) vectors for ``diag=True``, and None for
    a field not in ``get``.
    """
    if isinstance(get, str):
        get = (get,)
    get = tuple(get)
    bad = [g for g in get if g not in ("nngp", "ntk")]
    if bad or not get:
        raise ValueError(f"get must name 'nngp' and/or 'ntk', got {get!r}")
    return _recursion(x1, x2, int(depth), activation, w_std, b_std, int(fix_dep), bool(diag),
                      "nngp" in get, "ntk" in get)


def nngp(x1, x2=None, *, depth: int = 1, activation: Union[str, Activation] = "relu",
         w_std: float = 1.0, b_std: float = 0.0, diag: bool = False) -> np.ndarray:
    """The NNGP kernel Sigma^{depth+1}(x1, x2), float64."""
    return kernels(x1, x2, depth=depth, activation=activation, w_std=w_std, b_std=b_std,
                   diag=diag, get=("nngp",)).nngp


def ntk(x1, x2=None, *, depth: int = 1, activation: Union[str, Activation] = "relu",
        w_std: float = 1.0, b_std: float = 0.0, fix_dep: int = 0, diag: bool = False) -> np.ndarray:
    """The NTK Theta^{depth+1}(x1, x2) with the first ``fix_dep`` layers frozen, float64."""
    return kernels(x1, x2, depth=depth, activation=activation, w_std=w_std, b_std=b_std,
                   fix_dep=fix_dep, diag=diag, get=("ntk",)).ntk


# --------------------------------------------------------------------------------------------------
# The NumPy code of Arora et al. (ICLR 2020), same algorithm and operation order
# --------------------------------------------------------------------------------------------------
def _arora_layers(X, d_max, fix_dep, out):
    """Run the published recursion for one fix_dep, writing the NTK of depth dep+1 into out[dep]."""
    gram = np.matmul(X, X.T)
    acc = np.zeros_like(gram)
    for dep in range(d_max):
        if fix_dep <= dep:
            acc += gram
        out[dep] = acc
        norms = np.diag(gram)
        scale = np.clip(np.sqrt(np.outer(norms, norms)), a_min=1e-9, a_max=None)
        cosine = np.clip(gram / scale, a_min=-1, a_max=1)
        gram = (cosine * (math.pi - np.arccos(cosine)) + np.sqrt(1.0 - cosine * cosine)) \
            * scale / 2.0 / math.pi
        acc = acc * (math.pi - np.arccos(cosine)) / 2.0 / math.pi


def kernel_value_batch_original(X, d_max: int) -> np.ndarray:
    """Arora et al.'s ``kernel_value_batch``: K[dep][fix] = ReLU NTK with dep+1 layers, fix frozen.

    Shape (d_max, d_max, N, N). ReLU with c_sigma = 1 (no factor 2), Sigma^0 = X X^T (no 1/d, no bias),
    the cosine's denominator clipped at 1e-9; K[dep][fix] = 0 where fix > dep.
    """
    X = np.asarray(X)
    n = X.shape[0]
    K = np.zeros((d_max, d_max, n, n))
    for fix_dep in range(d_max):
        _arora_layers(X, d_max, fix_dep, K[:, fix_dep])
    return K


def kernel_value_original(X, d_max: int, fix_dep: int) -> np.ndarray:
    """Arora et al.'s ``kernel_value``: the (N, N) NTK with d_max layers, the first fix_dep frozen."""
    X = np.asarray(X)
    n = X.shape[0]
    K = np.zeros((d_max, n, n))
    _arora_layers(X, d_max, fix_dep, K)
    return K[d_max - 1]
