"""Inputs and weights far from 1: tiny rows, huge rows, kernels that underflow or overflow, nearly
(anti)collinear float32 pairs, and the instruction-set variants of the fused kernel.

Oracles: arcflow.reference (NumPy float64), the 50-digit mpmath recursion (_helpers.mp_oracle), and exact
scaling laws (ReLU-family kernels without bias are homogeneous of degree 2 in the inputs, Sign and Erf-free
angle kernels of degree 0), which hold whatever the scale and need no second implementation.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import arcflow
from arcflow import _core, compat
from arcflow.activations import ABReLU, Erf, LeakyReLU, RectifiedMonomial, Sign
from arcflow.reference import kernels as ref_kernels

from _helpers.mp_oracle import mp_kernels

ALL_ACTS = [ABReLU(0.0, 1.0), LeakyReLU(0.1), ABReLU(-1.0, 1.0), ABReLU(0.3, -0.7), RectifiedMonomial(0),
            RectifiedMonomial(1), RectifiedMonomial(2), RectifiedMonomial(3), Sign(), Erf()]
TINY32 = np.finfo(np.float32).tiny


def _rel(a, b):
    """max |a - b| relative to the largest |b| (NaN anywhere: inf)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return np.inf
    scale = np.abs(b).max()
    return np.abs(a - b).max() / scale if scale > 0 else np.abs(a - b).max()


# ---------------------------------------------------------------------------------------------------------
# 1. Tiny but normal inputs: finite, and right.

def test_single_tiny_value_float32_and_float64():
    k32 = arcflow.nngp(np.array([[1e-20]], np.float32))
    k64 = arcflow.nngp(np.array([[1e-156]]))
    assert np.isfinite(k32).all() and np.isfinite(k64).all()
    # ReLU without bias: K(a x) = a^2 K(x).
    assert k32[0, 0] == pytest.approx(np.float32(1e-20) ** 2 * arcflow.nngp(np.array([[1.0]]))[0, 0], rel=1e-6)
    assert k64[0, 0] == pytest.approx(1e-312 * arcflow.nngp(np.array([[1.0]]))[0, 0], rel=1e-3)  # a denormal


@pytest.mark.parametrize("act", ALL_ACTS, ids=repr)
def test_one_tiny_row_in_a_float32_matrix(act):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(9, 4)).astype(np.float32)
    x[4] *= np.float32(1e-25)
    get = ("nngp", "ntk") if act.has_ntk else ("nngp",)
    kw = dict(depth=3, activation=act, w_std=1.2, get=get)
    k = arcflow.kernels(x, **kw)
    r = ref_kernels(x.astype(np.float64), **kw)
    dg = arcflow.kernels(x, diag=True, **kw)
    for g in get:
        got, want = getattr(k, g), getattr(r, g)
        assert np.isfinite(got).all(), g
        assert _rel(got, want) < 1e-4, g
        assert _rel(getattr(dg, g), np.diag(want)) < 1e-4, g
        # The tiny row's own entries, relative to themselves (they may be far below the matrix's largest).
        row_scale = np.abs(want[4]).max()
        if row_scale > 1e3 * TINY32:
            assert np.abs(got[4] - want[4]).max() <= 1e-4 * row_scale + TINY32, g


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1e-30, 1e-18, 1e-9, 1.0, 1e9, 1e15])
def test_relu_homogeneous_over_scales(dtype, scale):
    if dtype == np.float64:
        scale = scale ** 4  # 1e-120 ... 1e60 in float64
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 3))
    kw = dict(depth=4, activation="relu", w_std=1.1)
    base = arcflow.kernels(x, **kw)
    xs = (x * scale).astype(dtype)
    got = arcflow.kernels(xs, **kw)
    # Exact homogeneity in the inputs as stored (float32 rounding of x * scale is part of the input).
    want = arcflow.kernels(xs.astype(np.float64) / scale, **kw)
    for g in ("nngp", "ntk"):
        v = getattr(got, g).astype(np.float64)
        assert np.isfinite(v).all()
        if dtype == np.float32 and scale ** 2 * np.abs(getattr(base, g)).max() < 1e4 * TINY32:
            continue  # the kernel itself underflows float32; finite is all that is asked
        tol = 1e-5 if dtype == np.float32 else 1e-12
        assert _rel(v / scale ** 2, getattr(want, g)) < tol, g


@pytest.mark.parametrize("dtype,scale", [(np.float64, s) for s in (1e-140, 1e-100, 1e-90, 1e-77, 1e-60, 1e60)]
                         + [(np.float32, s) for s in (1e-15, 1e-12, 1e-9, 1e9)])
def test_relu_with_bias_homogeneous_over_scales(dtype, scale):
    """ReLU is homogeneous of degree 1, so scaling the inputs and b_std by s scales both kernels by s^2. The
    bias's share of the first-layer gap once underflowed (b dq^2 formed before dividing) near 1e-90 in float64
    and was off by a few percent."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((3, 3))
    kw = dict(depth=2, activation="relu", w_std=1.3)
    want = arcflow.kernels(x, y, b_std=0.4, **kw)
    xs, ys = (x * scale).astype(dtype), (y * scale).astype(dtype)
    got = arcflow.kernels(xs, ys, b_std=0.4 * scale, **kw)
    exact = arcflow.kernels(xs.astype(np.float64) / scale, ys.astype(np.float64) / scale, b_std=0.4, **kw)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for g in ("nngp", "ntk"):
        assert _rel(getattr(got, g).astype(np.float64) / scale ** 2, getattr(exact, g)) < tol, (g, scale)
        assert _rel(getattr(exact, g), getattr(want, g)) < tol


def test_monomial_that_underflows_is_zero_not_nan():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 6)).astype(np.float32)
    kw = dict(depth=4, activation=RectifiedMonomial(4), w_std=0.3)
    k = arcflow.nngp(x, **kw)
    r = ref_kernels(x.astype(np.float64), get=("nngp",), **kw).nngp
    assert np.isfinite(k).all()
    assert np.abs(k - r.astype(np.float32)).max() <= 1e-4 * np.abs(r).max() + TINY32
    assert np.isfinite(arcflow.nngp(x, diag=True, **kw)).all()
    k64 = arcflow.nngp(x.astype(np.float64), **kw)
    assert np.isfinite(k64).all() and _rel(k64, r) < 1e-10


def test_kernel_value_batch_with_a_tiny_row():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(6, 5))
    X[2] *= 1e-160  # its own kernel entries (~1e-320) underflow to denormals; its pairs with others do not
    K = compat.kernel_value_batch(X, 4)
    assert np.isfinite(K).all()
    R = compat.kernel_value_batch(X * [[1], [1], [1e160], [1], [1], [1]], 4)  # ReLU: homogeneous
    others = [0, 1, 3, 4, 5]
    assert np.allclose(K[:, :, 2, others] * 1e160, R[:, :, 2, others], rtol=1e-9, atol=0)
    assert np.allclose(K[:, :, 2, 2], R[:, :, 2, 2] * 1e-160 * 1e-160, rtol=0, atol=1e-322)
    assert np.array_equal(K[:, :, others][:, :, :, others], compat.kernel_value_batch(X[others], 4))


def test_intermediate_overflow_with_a_finite_result():
    # Sign and Step depend only on angles after the first layer: inputs near float64's limit give the
    # kernel of the unscaled inputs.
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 3))
    for act in (Sign(), RectifiedMonomial(0)):
        want = arcflow.nngp(x, depth=3, activation=act)
        assert _rel(arcflow.nngp(x * 1e160, depth=3, activation=act), want) < 1e-12
        assert _rel(arcflow.nngp((x * 1e30).astype(np.float32), depth=3, activation=act), want) < 1e-4
    # RectifiedMonomial(2) with a small weight: Sigma^1 = 1e20 is fine, P^2 = 1e40 overflows float32 inside a
    # layer, but Sigma^2 is about w^2 1e40 = 1e30.
    x32 = (x * np.float32(1e10)).astype(np.float32)
    kw = dict(depth=1, activation=RectifiedMonomial(2), w_std=1e-5)
    got = arcflow.kernels(x32, **kw)
    want = ref_kernels(x32.astype(np.float64), **kw)
    assert _rel(got.nngp, want.nngp) < 1e-4 and _rel(got.ntk, want.ntk) < 1e-4


def test_erf_at_extreme_scales_against_mpmath():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 2))
    for scale in (1e-150, 1e150):
        xs = x * scale
        got = arcflow.kernels(xs, depth=2, activation="erf", w_std=0.9, b_std=0.2)
        # 1 + 2s against 2s at s = 1e300 needs 300 digits: the cancellation is in the oracle, not here.
        mn, mt = mp_kernels(xs, depth=2, activation="erf", w_std=0.9, b_std=0.2, dps=700)
        assert _rel(got.nngp, mn) < 1e-10 and _rel(got.ntk, mt) < 1e-10


# ---------------------------------------------------------------------------------------------------------
# 2. Overflow: FloatingPointError naming the cause, never inf or NaN.

def _x(dtype=np.float64):
    return np.random.default_rng(6).normal(size=(6, 4)).astype(dtype)


@pytest.mark.parametrize("call", [
    lambda: arcflow.nngp(_x(), w_std=1e200),
    lambda: arcflow.ntk(_x(), b_std=1e200),
    lambda: arcflow.kernels(_x(), diag=True, w_std=1e200),
])
def test_weight_variance_overflow_names_the_parameter(call):
    with pytest.raises(FloatingPointError, match=r"arcflow\.\w+: .*w_std\*\*2"):
        call()


@pytest.mark.parametrize("dtype,scale,w_std,depth", [
    (np.float64, 1e160, 1.0, 1), (np.float64, 1.0, 1e100, 3), (np.float32, 1.0, 1e20, 3),
    (np.float32, 1e25, 1.0, 0), (np.float32, 1.0, 1e3, 12)])
@pytest.mark.parametrize("how", ["sym", "nonsym", "diag", "ntk"])
def test_overflow_raises(dtype, scale, w_std, depth, how):
    x = (_x() * scale).astype(dtype)
    name = "float32" if dtype == np.float32 else "float64"
    with pytest.raises(FloatingPointError, match=rf"arcflow\.\w+: the N\w+ overflows {name} at layer \d+"):
        if how == "sym":
            arcflow.nngp(x, depth=depth, w_std=w_std)
        elif how == "nonsym":
            arcflow.nngp(x, x[:3].copy(), depth=depth, w_std=w_std)
        elif how == "diag":
            arcflow.nngp(x, depth=depth, w_std=w_std, diag=True)
        else:
            arcflow.ntk(x, depth=depth, w_std=w_std)


def test_overflow_layer_is_the_first_beyond_range():
    x = _x(np.float32)
    # Sigma^l(x,x) grows by w^2 / 2 per ReLU layer: with w = 1e3, 5e5 per layer from about 1e6.
    s1 = float((1e6 * (x.astype(np.float64) ** 2).sum(1) / 4).max())
    layer = 1 + int(np.ceil(np.log(np.finfo(np.float32).max / s1) / np.log(5e5)))
    with pytest.raises(FloatingPointError, match=f"at layer {layer} "):
        arcflow.nngp(x, depth=12, w_std=1e3, diag=True)


def test_compat_overflow():
    with pytest.raises(FloatingPointError, match="arcflow.compat.kernel_value_batch"):
        compat.kernel_value_batch(_x() * 1e160, 3)


def test_no_overflow_just_below_the_limit():
    # The largest entry of the exact kernel is just below float32's maximum: no exception, no inf.
    x = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    k1 = float(arcflow.nngp(x.astype(np.float64), depth=2)[0, 0])
    a = np.sqrt(float(np.finfo(np.float32).max) / k1) * 0.5
    k = arcflow.nngp((x * a).astype(np.float32), depth=2)
    assert np.isfinite(k).all()
    assert _rel(k, arcflow.nngp((x * a).astype(np.float32).astype(np.float64), depth=2)) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# 3. Nearly (anti)collinear pairs in float32 against the float64 result of the same float32 inputs.

def test_sign_antiparallel_float32_regression():
    x1 = np.array([[-0.7191556096076965, 1.4956367015838623]], np.float32)
    x2 = np.array([[0.9349055886268616, -1.9443351030349731]], np.float32)
    got = arcflow.nngp(x1, x2, depth=5, activation=Sign(), w_std=1.3)
    mp, _ = mp_kernels(x1, x2, depth=5, activation=Sign(), w_std=1.3, need_ntk=False)
    assert abs(float(got[0, 0]) - mp[0, 0]) < 1e-5 * 1.69
    assert abs(float(arcflow.nngp(x1.astype(np.float64), x2.astype(np.float64), depth=5, activation=Sign(),
                                  w_std=1.3)[0, 0]) - mp[0, 0]) < 1e-10


@pytest.mark.parametrize("act", [Sign(), RectifiedMonomial(0)], ids=repr)
@pytest.mark.parametrize("eps", [1e-6, 1e-9, 1e-12])
def test_near_collinear_float64_deep_sign_step(act, eps):
    # A first-layer gap of eps^2 carried with only its first 7 digits (the unit vectors' rounding) gave
    # errors of 1e-10 by depth 4: Sign and Step turn the gap into its square root at every layer.
    rng = np.random.default_rng(11)
    x = rng.normal(size=(1, 3))
    y = -1.7 * x + eps * rng.normal(size=(1, 3))
    for depth in (2, 4, 6):
        got = arcflow.nngp(x, y, depth=depth, activation=act, w_std=0.7)
        want, _ = mp_kernels(x, y, depth=depth, activation=act, w_std=0.7, need_ntk=False, dps=80)
        assert abs(got[0, 0] - want[0, 0]) <= 1e-10 * 0.49, (depth, got, want)


@pytest.mark.parametrize("act", [Sign(), RectifiedMonomial(0), ABReLU(0.0, 1.0), Erf()], ids=repr)
def test_near_collinear_tiny_float32_rows(act):
    # Norms 1e-16: P ~ 1e-32 is a normal float32, but the pair's gap P sig2 ~ 1e-42 was a denormal (the angle
    # lost its digits; Sign was 3e-4 off).
    x = np.array([[1.2573022e-16, -1.3210486e-16]], np.float32)
    y = np.array([[5.1595879e-16, -5.4211813e-16]], np.float32)
    for depth in (1, 2, 4):
        got = arcflow.nngp(x, y, depth=depth, activation=act, w_std=0.5)
        want = arcflow.nngp(x.astype(np.float64), y.astype(np.float64), depth=depth, activation=act, w_std=0.5)
        scale = np.sqrt(arcflow.nngp(x.astype(np.float64), depth=depth, activation=act, w_std=0.5, diag=True)[0]
                        * arcflow.nngp(y.astype(np.float64), depth=depth, activation=act, w_std=0.5, diag=True)[0])
        assert abs(float(got[0, 0]) - want[0, 0]) <= 1e-4 * scale, (depth, got, want)


def _near_pairs(rng, d, sign):
    """float32 rows x and y = sign * c * x + a perturbation of relative size 1e-7 ... 1e-2."""
    xs, ys = [], []
    for eps in 10.0 ** -np.arange(2, 8):
        x = rng.normal(size=d)
        y = sign * rng.uniform(0.3, 3.0) * x + eps * np.linalg.norm(x) * rng.normal(size=d)
        xs.append(x)
        ys.append(y)
    return np.array(xs, np.float32), np.array(ys, np.float32)


@pytest.mark.parametrize("act", ALL_ACTS, ids=repr)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["collinear", "anticollinear"])
@pytest.mark.parametrize("b_std", [0.0, 0.3])
def test_near_collinear_float32_matches_float64(act, sign, b_std):
    rng = np.random.default_rng(7)
    x, y = _near_pairs(rng, 3, sign)
    get = ("nngp", "ntk") if act.has_ntk else ("nngp",)
    for depth in (1, 3, 5):
        kw = dict(depth=depth, activation=act, w_std=1.3, b_std=b_std, get=get)
        k64 = arcflow.kernels(x.astype(np.float64), y.astype(np.float64), **kw)
        if max(np.abs(getattr(k64, g)).max() for g in get) > np.finfo(np.float32).max:
            with pytest.raises(FloatingPointError, match="overflows float32"):
                arcflow.kernels(x, y, **kw)
            continue
        k32 = arcflow.kernels(x, y, **kw)
        for g in get:
            a, b = getattr(k32, g), getattr(k64, g)
            assert _rel(a, b) < 1e-4, (g, depth)
            # pair by pair: each diagonal entry x_i vs y_i relative to its own size
            assert np.all(np.abs(np.diag(a) - np.diag(b)) <= 1e-4 * np.abs(b).max()), (g, depth)


# ---------------------------------------------------------------------------------------------------------
# 4. Instruction-set variants.

def test_isa_levels_and_switch():
    levels = _core._isa_levels()
    order = ["generic", "avx2", "avx512"]
    assert levels == order[:len(levels)] and levels[0] == "generic"
    prev = _core._fc_isa()
    try:
        results = []
        x = np.random.default_rng(8).normal(size=(70, 9))
        for lv in levels:
            _core._set_fc_isa(lv)
            assert _core._fc_isa() == lv
            results.append(arcflow.kernels(x, depth=3, b_std=0.2))
        want = ref_kernels(x, depth=3, b_std=0.2)
        for r in results:
            assert _rel(r.nngp, want.nngp) < 1e-12 and _rel(r.ntk, want.ntk) < 1e-12
        with pytest.raises(ValueError, match="unknown"):
            _core._set_fc_isa("sse9")
        if len(levels) < 3:
            with pytest.raises(ValueError, match="cannot run"):
                _core._set_fc_isa("avx512")
        _core._set_fc_isa("auto")
        assert _core._fc_isa() == levels[-1] or "ARCFLOW_ISA" in os.environ
    finally:
        _core._set_fc_isa("auto")
        assert _core._fc_isa() == prev or "ARCFLOW_ISA" not in os.environ


def _run_py(code, env_isa):
    env = dict(os.environ, ARCFLOW_ISA=env_isa)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_env_var_caps_the_level():
    code = ("import numpy as np, arcflow; from arcflow import _core; "
            "arcflow.nngp(np.ones((2, 2))); print(_core._fc_isa())")
    r = _run_py(code, "generic")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "generic"
    r = _run_py(code, "avx512")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == _core._isa_levels()[-1]
    r = _run_py(code, "pentium")
    assert r.returncode != 0 and "ARCFLOW_ISA" in r.stderr and "ValueError" in r.stderr
