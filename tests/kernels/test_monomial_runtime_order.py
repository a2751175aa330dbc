"""RectifiedMonomial of a run-time order (n >= 5) in the fused engine.

The engine compiles orders 0 ... 4 with the order fixed at compile time (the J_n recursion unrolls); any
higher order runs one generic instance that takes n at run time (fc_kernel.cpp's activation dispatch,
``monomial_act<T>``). These tests run that instance for n = 5, 6, 8 against the float64 NumPy reference
and the 50-digit mpmath recursion, in float64 and float32, symmetric and not, with diag=True and fix_dep,
under both layouts of the layer loops (conftest.fc_layout).

Scales: relu(x)^n maps the variance s -> w^2 (2n-1)!!/2 s^n + b^2. The weight scale puts that map's fixed
point at s = 1 and the rows start within 0.5% of it, so every depth stays finite in float32, and the rows
are strongly correlated, so the kernels keep a real dependence on the angle between rows.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import arcflow
from arcflow import reference
from arcflow.activations import RectifiedMonomial

from _helpers.kernels import DTYPES, assert_close
from _helpers.mp_oracle import mp_kernels
from _helpers.numeric import assert_differs, rel_err

pytestmark = pytest.mark.usefixtures("fc_layout")

ORDERS = (5, 6, 8)
DEPTHS = (1, 2, 3)
B_STD = 0.3


def _w_std(n):
    """w with w^2 (2n-1)!!/2 + b^2 = 1: the variance map s -> w^2 (2n-1)!!/2 s^n + b^2 fixes s = 1."""
    double_factorial = math.prod(range(1, 2 * n, 2))
    return math.sqrt((1 - B_STD ** 2) * 2 / double_factorial)


def _rows(count, d, n, seed):
    """Rows whose first-layer variance w^2 |x|^2 / d + b^2 is within 0.5% of the fixed point 1 (so that
    s^(n^depth) stays in range), around one common direction with noise of each row's own weight: pair
    cosines from 1 - 5e-5 to about 0.9, so that some pairs stay correlated through three layers of a
    high order and the kernels are more than their bias."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(d)
    x = common + rng.uniform(0.01, 0.3, (count, 1)) * rng.standard_normal((count, d))
    target = d * (1 - B_STD ** 2) / _w_std(n) ** 2 * rng.uniform(0.995, 1.005, (count, 1))
    return x * np.sqrt(target / np.sum(x * x, axis=1, keepdims=True))


SHAPES = {
    "1x1_d1": (1, 1, 1),
    "5x3_d4": (5, 3, 4),
    "2x7_d9": (2, 7, 9),
    "symmetric_6_d5": (6, None, 5),
}


def _data(shape, n, dtype):
    """x1 and x2 around one common direction: a high order shrinks the kernel of wide angles towards b^2,
    so unrelated rows would test little more than the bias."""
    n1, n2, d = SHAPES[shape]
    x = _rows(n1 + (n2 or 0), d, n, seed=n).astype(dtype)
    return x[:n1], (None if n2 is None else x[n1:])


def _as64(x):
    # The float32 input's exact values go to the oracle.
    return None if x is None else np.asarray(x, dtype=np.float64)


def _kw(n, depth):
    return dict(depth=depth, activation=RectifiedMonomial(n), w_std=_w_std(n), b_std=B_STD)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("n", ORDERS)
def test_matches_reference(n, shape, depth, dtype):
    x1, x2 = _data(shape, n, dtype)
    kw = _kw(n, depth)
    got = arcflow.kernels(x1, x2, get=("nngp", "ntk"), **kw)
    want = reference.kernels(_as64(x1), _as64(x2), get=("nngp", "ntk"), **kw)
    assert got.nngp.dtype == dtype and got.ntk.dtype == dtype
    assert_close(got.nngp, want.nngp, dtype, f"n={n} nngp")
    assert_close(got.ntk, want.ntk, dtype, f"n={n} ntk")
    for fix in sorted({1, depth}):
        assert_close(arcflow.ntk(x1, x2, fix_dep=fix, **kw),
                     reference.ntk(_as64(x1), _as64(x2), fix_dep=fix, **kw), dtype, f"n={n} ntk fix_dep={fix}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "x1-x2"])
@pytest.mark.parametrize("n", ORDERS)
def test_matches_50_digits(n, symmetric, dtype):
    """Against the independent 50-digit recursion at every depth, the off-diagonal entries also relative
    to their own largest value: a high order shrinks them far below the diagonal, where an error relative
    to the whole matrix would hide."""
    x = _rows(7, 3, n, seed=10 + n).astype(dtype)
    x1, x2 = (x[:4], None) if symmetric else (x[:4], x[4:])
    depth = 3
    nngp_mp, ntk_mp = mp_kernels(_as64(x1), _as64(x2), all_depths=True, **_kw(n, depth))
    tol = {np.float32: 1e-5, np.float64: 1e-10}[dtype]
    off = ~np.eye(4, dtype=bool) if symmetric else np.ones((4, 3), dtype=bool)
    for dep in range(1, depth + 1):
        got = arcflow.kernels(x1, x2, get=("nngp", "ntk"), **_kw(n, dep))
        for field, want in (("nngp", nngp_mp[dep]), ("ntk", ntk_mp[dep])):
            value = getattr(got, field)
            assert rel_err(value, want) <= tol, (field, dep)
            assert rel_err(value[off], want[off]) <= 10 * tol, (field, dep, "off-diagonal")
        if symmetric:
            assert np.array_equal(got.nngp, got.nngp.T) and np.array_equal(got.ntk, got.ntk.T)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("n", ORDERS)
def test_diag(n, dtype):
    """diag=True against the reference's diagonal and the 50-digit one (a zero row included: its variance
    is b^2 at every layer input, and T(0) = 0 for n >= 1), and equal to the full matrix's diagonal."""
    x = _rows(6, 4, n, seed=30 + n)
    x[2] = 0.0
    x = x.astype(dtype)
    for depth in DEPTHS:
        kw = _kw(n, depth)
        dg = arcflow.kernels(x, diag=True, get=("nngp", "ntk"), **kw)
        full = arcflow.kernels(x, get=("nngp", "ntk"), **kw)
        want = reference.kernels(_as64(x), diag=True, get=("nngp", "ntk"), **kw)
        nngp_mp, ntk_mp = mp_kernels(_as64(x), **kw)
        for field, truth in (("nngp", np.diag(nngp_mp)), ("ntk", np.diag(ntk_mp))):
            v = getattr(dg, field)
            assert v.shape == (6,) and v.dtype == dtype
            assert_close(v, getattr(want, field), dtype, f"n={n} {field} depth {depth}")
            assert_close(v, truth, dtype, f"n={n} {field} depth {depth} (50 digits)")
            assert_close(v, np.diag(getattr(full, field)), dtype, f"n={n} {field} depth {depth} (full)")


@pytest.mark.parametrize("n", ORDERS)
def test_order_is_not_a_neighbour(n):
    """The run-time order is the order asked for: orders n - 1 and n + 1 of the same inputs and scales give
    different kernels (a dispatch that clamped or shifted the order could not pass the oracle tests either;
    this says which way such a failure went)."""
    x1, x2 = _data("5x3_d4", n, np.float64)
    kw = _kw(n, 2)
    got = arcflow.kernels(x1, x2, get=("nngp", "ntk"), **kw)
    for other in (n - 1, n + 1):
        kw_other = dict(kw, activation=RectifiedMonomial(other))
        k_other = arcflow.kernels(x1, x2, get=("nngp", "ntk"), **kw_other)
        assert_differs(got.nngp, k_other.nngp, 1e-3, f"n={n} vs {other} nngp")
        assert_differs(got.ntk, k_other.ntk, 1e-3, f"n={n} vs {other} ntk")
