"""arcflow.kernel_grads: d/dw_std and d/db_std of the NNGP and NTK against independent oracles.

- 50-digit central finite differences of the recursion (_helpers.mp_grad, mpmath) for every activation,
  depths 0..4, fix_dep, b_std = 0 and > 0, symmetric, x1/x2 and diag=True, on inputs with a duplicated row,
  a zero row, a multiple of a row, an antiparallel row and a near-collinear pair: float64 within 1e-8 of the
  largest |derivative| of the matrix, float32 within 1e-4 (the inputs are float32 numbers, so one oracle
  serves both dtypes).
- jax.jacfwd of neural-tangents 0.6.5's kernel_fn (tests/data/nt_grad_golden.npz, tests/kernels/make_nt_grad_golden.py).
- value is arcflow.kernels' result, bit for bit; errors and dtypes as arcflow.kernels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import arcflow
from arcflow.activations import ABReLU, Abs, Erf, Identity, LeakyReLU, RectifiedMonomial, ReLU, Sign, Step

from _helpers.mp_grad import mp_kernel_grads
from _helpers.numeric import load_golden

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "nt_grad_golden.npz"
TOL = {np.float32: 1e-4, np.float64: 1e-8}

# (activation, w_std without a bias, w_std with a bias, b_std > 0): scales that keep every depth up to 4 of the
# test inputs within a few orders of magnitude of 1 (max(x, 0)^n with n >= 2 collapses or explodes otherwise).
ACTS = {
    "relu": (ReLU(), 1.3, 1.3, 0.4),
    "leaky_relu": (LeakyReLU(0.2), 1.2, 1.2, 0.3),
    "abrelu": (ABReLU(-0.3, 1.7), 0.9, 0.9, 0.2),
    "abs": (Abs(), 1.1, 1.1, 0.3),
    "identity": (Identity(), 1.1, 1.1, 0.3),
    "step": (Step(), 1.3, 1.3, 0.4),
    "monomial_1": (RectifiedMonomial(1), 1.3, 1.3, 0.4),
    "monomial_2": (RectifiedMonomial(2), 0.75, 0.7, 0.4),
    "monomial_3": (RectifiedMonomial(3), 0.55, 0.5, 0.4),
    "monomial_5": (RectifiedMonomial(5), 0.41, 0.3, 0.3),  # an order the engine takes at run time
    "sign": (Sign(), 1.3, 1.3, 0.4),
    "erf": (Erf(), 1.5, 1.5, 0.2),
}


def hard_inputs():
    """float32-exact rows: random ones, a duplicate, a zero row, a multiple, an antiparallel multiple and a pair
    2^-20 apart (near-collinear); x2 shares a row with x1 and has a zero row."""
    rng = np.random.default_rng(14)
    x = rng.uniform(-1.5, 1.5, size=(7, 3)).astype(np.float32).astype(np.float64)
    x[1] = x[0]
    x[2] = 0.0
    x[3] = 2.0 * x[0]
    x[4] = -0.5 * x[5]
    x[6] = x[5] + 2.0 ** -20 * np.array([1.0, -1.0, 1.0])
    x2 = rng.uniform(-1.5, 1.5, size=(4, 3)).astype(np.float32).astype(np.float64)
    x2[1] = x[5]
    x2[3] = 0.0
    return x, x2


def rel_err_matrix(got, want):
    """max |got - want| relative to the largest |want| (0 when the oracle is 0 throughout)."""
    want = np.asarray(want, np.float64)
    err = float(np.max(np.abs(np.asarray(got, np.float64) - want), initial=0.0))
    scale = float(np.max(np.abs(want), initial=0.0))
    return err / scale if scale > 0 else err


def check_against(g, ref, get, dtype, what):
    for k in get:
        for p, name in enumerate(("d_w_std", "d_b_std")):
            got = getattr(getattr(g, k), name)
            assert got.dtype == dtype, what
            assert np.isfinite(got).all(), f"{what} {k}.{name}: non-finite entries"
            e = rel_err_matrix(got, ref[k][p])
            assert e <= TOL[dtype], f"{what} {k}.{name}: relative error {e:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("with_bias", [False, True], ids=["b0", "b"])
@pytest.mark.parametrize("depth", range(0, 5))
@pytest.mark.parametrize("name", list(ACTS))
def test_matches_50_digit_finite_differences(name, depth, with_bias):
    act, w0, w1, b = ACTS[name]
    w, b = (w1, b) if with_bias else (w0, 0.0)
    fix = depth // 2 if act.has_ntk else 0
    get = ("nngp", "ntk") if act.has_ntk else ("nngp",)
    x, x2 = hard_inputs()
    kw = dict(depth=depth, activation=act, w_std=w, b_std=b, fix_dep=fix)
    mp_kw = dict(kw, need_ntk=act.has_ntk, dps=60, step="1e-25")
    refs = {"sym": mp_kernel_grads(x, **mp_kw), "x2": mp_kernel_grads(x, x2, **mp_kw),
            "diag": mp_kernel_grads(x, diag=True, **mp_kw)}
    for dtype in (np.float64, np.float32):
        xd, x2d = x.astype(dtype), x2.astype(dtype)
        check_against(arcflow.kernel_grads(xd, get=get, **kw), refs["sym"], get, dtype, f"{name} symmetric {dtype}")
        check_against(arcflow.kernel_grads(xd, x2d, get=get, **kw), refs["x2"], get, dtype, f"{name} x1/x2 {dtype}")
        check_against(arcflow.kernel_grads(xd, get=get, diag=True, **kw), refs["diag"], get, dtype,
                      f"{name} diag {dtype}")


@pytest.mark.parametrize("w_std,b_std", [(0.0, 0.7), (1.1, 0.0), (0.0, 0.0)])
def test_zero_parameters_match_finite_differences(w_std, b_std):
    # The derivatives at w_std = 0 or b_std = 0 (Sigma depends on their squares, so these are 0 there).
    x, x2 = hard_inputs()
    ref = mp_kernel_grads(x, x2, depth=2, activation="relu", w_std=w_std, b_std=b_std)
    g = arcflow.kernel_grads(x, x2, depth=2, activation="relu", w_std=w_std, b_std=b_std)
    check_against(g, ref, ("nngp", "ntk"), np.float64, f"w_std={w_std} b_std={b_std}")


def _golden_cases():
    if not GOLDEN.exists():
        return []
    meta, _ = load_golden(GOLDEN)
    return [pytest.param(c, id=f"{c['key']}-{c['activation'][0]}-d{c['depth']}-{c['kind']}") for c in meta["cases"]]


@pytest.fixture(scope="module")
def golden():
    return load_golden(GOLDEN)


@pytest.mark.parametrize("case", _golden_cases())
def test_matches_neural_tangents_jacobian(case, golden):
    _, arrays = golden
    name, args = case["activation"]
    act = getattr(arcflow.activations, name)(*args)
    key = case["key"]
    get = ("nngp", "ntk") if case["has_ntk"] else ("nngp",)
    g = arcflow.kernel_grads(arrays[key + "_x1"], arrays[key + "_x2"], depth=case["depth"], activation=act,
                             w_std=case["w_std"], b_std=case["b_std"], get=get)
    for k in get:
        for field, suffix in (("value", ""), ("d_w_std", "_dw"), ("d_b_std", "_db")):
            e = rel_err_matrix(getattr(getattr(g, k), field), arrays[f"{key}_{k}{suffix}"])
            assert e <= 1e-8, f"{key} {name}{args} {k}.{field}: relative error {e:.2e}"


def test_golden_file_is_small_and_complete(golden):
    meta, arrays = golden
    assert GOLDEN.stat().st_size < 300_000
    names = {c["activation"][0] for c in meta["cases"]}
    assert names == {"ReLU", "LeakyReLU", "ABReLU", "Abs", "Identity", "Erf", "Sign"}
    assert {c["depth"] for c in meta["cases"]} == set(range(0, 5))
    assert any(c["b_std"] == 0.0 for c in meta["cases"]) and any(c["b_std"] > 0 for c in meta["cases"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["sym", "same_object", "x2", "diag"])
def test_value_is_kernels_bit_for_bit(dtype, mode):
    rng = np.random.default_rng(5)
    x, x2 = rng.standard_normal((70, 6)).astype(dtype), rng.standard_normal((33, 6)).astype(dtype)
    kw = dict(depth=3, activation="erf", w_std=1.3, b_std=0.2, fix_dep=1)
    args = {"sym": (x,), "same_object": (x, x), "x2": (x, x2), "diag": (x,)}[mode]
    diag = mode == "diag"
    g = arcflow.kernel_grads(*args, diag=diag, **kw)
    k = arcflow.kernels(*args, diag=diag, **kw)
    for f in ("nngp", "ntk"):
        np.testing.assert_array_equal(getattr(g, f).value, getattr(k, f))
        assert getattr(g, f).value.dtype == dtype
        assert getattr(g, f).d_w_std.shape == getattr(k, f).shape == getattr(g, f).d_b_std.shape


def test_symmetric_is_exactly_symmetric_and_equals_the_full_computation():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((300, 5))  # more than one chunk of columns and several row blocks
    kw = dict(depth=2, activation="abs", w_std=1.2, b_std=0.3)
    g = arcflow.kernel_grads(x, **kw)
    full = arcflow.kernel_grads(x, x.copy(), **kw)  # a copy: the full, non-mirrored computation
    for f in ("nngp", "ntk"):
        for name in ("d_w_std", "d_b_std"):
            a = getattr(getattr(g, f), name)
            np.testing.assert_array_equal(a, a.T)
            np.testing.assert_allclose(a, getattr(getattr(full, f), name), rtol=1e-13, atol=1e-13 * np.abs(a).max())
    # the diagonal of the matrix is diag=True's result
    d = arcflow.kernel_grads(x, diag=True, **kw)
    np.testing.assert_allclose(np.diag(g.ntk.d_w_std), d.ntk.d_w_std, rtol=1e-13)


def test_threads_give_the_same_bits():
    x = np.random.default_rng(7).standard_normal((150, 4))
    a = arcflow.kernel_grads(x, depth=3, threads=1, b_std=0.2)
    b = arcflow.kernel_grads(x, depth=3, threads=3, b_std=0.2)
    for f in ("nngp", "ntk"):
        for name in ("d_w_std", "d_b_std"):
            np.testing.assert_array_equal(getattr(getattr(a, f), name), getattr(getattr(b, f), name))


@pytest.mark.parametrize("x_in,dtype", [
    (np.ones((3, 2), np.float16), np.float32),
    (np.ones((3, 2), np.float32), np.float32),
    (np.ones((3, 2), np.int64), np.float64),
    (np.ones((3, 2), bool), np.float64),
    ([[1.0, 2.0], [0.5, -1.0]], np.float64),
])
def test_dtype_rule(x_in, dtype):
    g = arcflow.kernel_grads(x_in, depth=1, b_std=0.1)
    for f in ("nngp", "ntk"):
        for name in arcflow.Grad._fields:
            assert getattr(getattr(g, f), name).dtype == dtype


def test_get_selects_fields_and_named_tuples():
    x = np.random.default_rng(8).standard_normal((5, 3))
    g = arcflow.kernel_grads(x, get="ntk")
    assert isinstance(g, arcflow.KernelGrads) and g.nngp is None and isinstance(g.ntk, arcflow.Grad)
    g = arcflow.kernel_grads(x, get=("nngp",), activation="sign")
    assert g.ntk is None and g.nngp.d_b_std.shape == (5, 5)
    assert arcflow.Grad._fields == ("value", "d_w_std", "d_b_std")
    assert {"kernel_grads", "KernelGrads", "Grad"} <= set(arcflow.__all__)


def test_non_contiguous_and_empty_inputs():
    rng = np.random.default_rng(9)
    big = rng.standard_normal((8, 6))
    a = arcflow.kernel_grads(big[:, ::2], depth=2, b_std=0.3)
    b = arcflow.kernel_grads(np.ascontiguousarray(big[:, ::2]), depth=2, b_std=0.3)
    np.testing.assert_array_equal(a.ntk.d_w_std, b.ntk.d_w_std)
    e = arcflow.kernel_grads(np.zeros((0, 3)), rng.standard_normal((4, 3)))
    assert e.nngp.d_w_std.shape == (0, 4) and e.ntk.d_b_std.shape == (0, 4)


@pytest.mark.parametrize("kwargs,exc,text", [
    (dict(get="both"), ValueError, "get"),
    (dict(get=()), ValueError, "get"),
    (dict(activation="sign"), ValueError, "has no NTK"),
    (dict(activation="step", get="ntk"), ValueError, "has no NTK"),
    (dict(threads=0), ValueError, "threads"),
    (dict(threads=1.5), ValueError, "threads"),
    (dict(depth=-1), ValueError, "depth"),
    (dict(depth=2, fix_dep=3), ValueError, "fix_dep"),
    (dict(w_std=-1.0), ValueError, "w_std"),
    (dict(b_std=float("nan")), ValueError, "b_std"),
    (dict(diag="yes"), TypeError, "diag"),
])
def test_errors_name_kernel_grads(kwargs, exc, text):
    x = np.ones((3, 2))
    with pytest.raises(exc, match=text) as info:
        arcflow.kernel_grads(x, **kwargs)
    assert "arcflow.kernel_grads" in str(info.value)


def test_input_errors_name_kernel_grads():
    x = np.ones((3, 2))
    cases = [((x, np.ones((2, 3))), ValueError), ((np.ones(3),), ValueError),
             ((np.array([[np.nan, 1.0]]),), ValueError), ((np.ones((2, 2), complex),), TypeError),
             ((np.zeros((3, 0)),), ValueError)]
    for args, exc in cases:
        with pytest.raises(exc) as info:
            arcflow.kernel_grads(*args)
        assert "arcflow.kernel_grads" in str(info.value)
    with pytest.raises(ValueError, match="diag=True") as info:
        arcflow.kernel_grads(x, np.ones((3, 2)), diag=True)
    assert "arcflow.kernel_grads" in str(info.value)


@pytest.mark.parametrize("with_bias", [False, True], ids=["b0", "b"])
@pytest.mark.parametrize("scale", [1e-150, 1e-120, 1e100])
def test_scale_of_the_inputs(scale, with_bias):
    # ReLU is homogeneous of degree 1, so with b_std scaled like x every kernel and derivative with respect to
    # w_std scales by scale^2 (the unscaled derivatives are checked against the 50-digit oracle above): no
    # product of three small numbers may underflow on the way (the bias gap's tangent did below ~1e-105).
    x, x2 = hard_inputs()
    kw = dict(depth=3, activation="relu", w_std=1.3)
    b = 0.4 if with_bias else 0.0
    g = arcflow.kernel_grads(x, x2, b_std=b, **kw)
    gs = arcflow.kernel_grads(x * scale, x2 * scale, b_std=b * scale, **kw)
    for f in ("nngp", "ntk"):
        want = scale * scale * getattr(g, f).d_w_std
        np.testing.assert_allclose(getattr(gs, f).d_w_std, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
        if not with_bias:
            assert not getattr(gs, f).d_b_std.any()


@pytest.mark.parametrize("name", ["relu", "abs", "abrelu", "monomial_1"])
def test_huge_inputs_with_a_bias_match_finite_differences(name):
    # Inputs and bias of order 1e100: the kernels are ~1e200, and a product of two gaps (or of the bias gap and
    # its denominator's tangent) would overflow float64. (Not Sign or Step: their outputs are O(1), so a bias of
    # 1e100 leaves correlations 1 - 1e-199 that 60 digits cannot resolve; nor Erf, saturated there.)
    act, _, w, _ = ACTS[name]
    x, x2 = hard_inputs()
    kw = dict(depth=3, activation=act, w_std=w, b_std=0.4e100)
    get = ("nngp", "ntk") if act.has_ntk else ("nngp",)
    ref = mp_kernel_grads(x * 1e100, x2 * 1e100, need_ntk=act.has_ntk, dps=60, step="1e-25", **kw)
    check_against(arcflow.kernel_grads(x * 1e100, x2 * 1e100, get=get, **kw), ref, get, np.float64, name)


@pytest.mark.parametrize("scale", [1e80, 1e140])
def test_erf_with_huge_variances_matches_finite_differences(scale):
    # Erf's Tdot = c / sqrt(u1 + u2 - 1 + 4 gm gp) formed gm gp, which overflows double for variances beyond
    # ~1e154: Tdot became 0 and the NTK's derivatives were off by 14-67% (inputs of 1e80), silently.
    rng = np.random.default_rng(11)
    x, x2 = rng.normal(size=(3, 4)) * scale, rng.normal(size=(2, 4)) * scale
    kw = dict(depth=2, activation=Erf(), w_std=1.3, b_std=0.4)
    ref = mp_kernel_grads(x, x2, need_ntk=True, dps=60, step="1e-25", **kw)
    check_against(arcflow.kernel_grads(x, x2, **kw), ref, ("nngp", "ntk"), np.float64, "erf")


def test_overflow_is_a_floating_point_error():
    x = np.full((2, 2), 1e150)
    with pytest.raises(FloatingPointError, match="arcflow.kernel_grads"):
        arcflow.kernel_grads(x, depth=3, activation=RectifiedMonomial(3), w_std=2.0)
