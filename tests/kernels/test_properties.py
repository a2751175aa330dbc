"""arcflow's kernels against the float64 NumPy oracle, and the properties issue 2 promises.

Accuracy is measured relative to the largest |entry| of the oracle, the diagonal included:
at most 1e-12 in float64 and 1e-5 in float32 (the float32 input's exact values go to the oracle).
"""
from __future__ import annotations

import numpy as np
import pytest

import arcflow
from arcflow import reference
from arcflow.activations import ABReLU, Erf, LeakyReLU, RectifiedMonomial

from _helpers.kernels import ACTIVATIONS, DTYPES, assert_close
from _helpers.numeric import assert_differs

# Every test here runs with both layouts of the CPU layer loops (conftest.fc_layout).
pytestmark = pytest.mark.usefixtures("fc_layout")

DEPTHS = (0, 1, 3, 8)


def _data(n1, n2, d, seed=0, collinear=False):
    """Rows of mixed norm. With ``collinear``, x2 repeats a row of x1 and holds an exact multiple of another.

    The oracle computes off-diagonal collinear pairs naively (off by up to a few 1e-8, as its docstring
    says), so comparisons with it use general-position rows; tests/kernels/test_mpmath_collinear.py holds the
    collinear pairs to a 50-digit evaluation instead.
    """
    rng = np.random.default_rng(seed)
    x1 = rng.standard_normal((n1, d)) * rng.uniform(0.5, 1.5, (n1, 1))
    if n2 is None:
        return x1, None
    x2 = rng.standard_normal((n2, d)) * rng.uniform(0.5, 1.5, (n2, 1))
    if collinear and n1 >= 2 and n2 >= 2:
        x2[0] = x1[0]
        x2[1] = -2.0 * x1[1]
    return x1, x2


SHAPES = {
    "1x1_d1": (1, 1, 1),
    "7x5_d3": (7, 5, 3),
    "4x9_d11": (4, 9, 11),
    "symmetric_6_d4": (6, None, 4),
}


def _cast(x, dtype):
    return None if x is None else np.asarray(x, dtype=dtype)


def _as64(x):
    return None if x is None else np.asarray(x, dtype=np.float64)


def _get(act):
    return ("nngp", "ntk") if act.has_ntk else ("nngp",)


# --------------------------------------------------------------------------------------------------
# accuracy against the oracle


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_matches_reference(name, shape, depth, dtype):
    act, w_std, b_std = ACTIVATIONS[name]
    x1, x2 = _data(*SHAPES[shape])
    x1, x2 = _cast(x1, dtype), _cast(x2, dtype)
    kw = dict(depth=depth, activation=act, w_std=w_std, b_std=b_std)
    got = arcflow.kernels(x1, x2, get=_get(act), **kw)
    want = reference.kernels(_as64(x1), _as64(x2), get=_get(act), **kw)
    assert got.nngp.dtype == dtype
    assert_close(got.nngp, want.nngp, dtype, "nngp")
    if act.has_ntk:
        assert got.ntk.dtype == dtype
        assert_close(got.ntk, want.ntk, dtype, "ntk")
        for fix in sorted({1, depth}):
            if fix <= depth:
                assert_close(arcflow.ntk(x1, x2, fix_dep=fix, **kw),
                             reference.ntk(_as64(x1), _as64(x2), fix_dep=fix, **kw), dtype, f"ntk fix_dep={fix}")
    else:
        assert got.ntk is None


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["relu", "erf", "identity", "step"])
def test_default_stds_match_reference(name, dtype):
    act = ACTIVATIONS[name][0]
    x1, x2 = _data(5, 3, 2, seed=1)
    for depth in (0, 2):
        got = arcflow.kernels(x1.astype(dtype), x2.astype(dtype), depth=depth, activation=act, get=_get(act))
        want = reference.kernels(x1.astype(dtype).astype(np.float64), x2.astype(dtype).astype(np.float64),
                                 depth=depth, activation=act, get=_get(act))
        assert_close(got.nngp, want.nngp, dtype, "nngp")
        if act.has_ntk:
            assert_close(got.ntk, want.ntk, dtype, "ntk")


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "abs", "step", "sign", "erf", "identity"])
def test_string_shorthands(name):
    x1, x2 = _data(4, 3, 5, seed=2)
    get = ("nngp",) if name in ("step", "sign") else ("nngp", "ntk")
    got = arcflow.kernels(x1, x2, depth=2, activation=name, w_std=1.2, b_std=0.1, get=get)
    want = reference.kernels(x1, x2, depth=2, activation=name, w_std=1.2, b_std=0.1, get=get)
    for field in get:
        assert_close(getattr(got, field), getattr(want, field), np.float64, field)


# --------------------------------------------------------------------------------------------------
# identities


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("depth", (0, 1, 4))
def test_abrelu_0_1_and_monomial_1_equal_relu(depth, dtype):
    x1, x2 = _data(7, 5, 3, seed=3)
    x1, x2 = x1.astype(dtype), x2.astype(dtype)
    kw = dict(depth=depth, w_std=1.4, b_std=0.3)
    relu = arcflow.kernels(x1, x2, activation="relu", **kw)
    for other in (ABReLU(0.0, 1.0), RectifiedMonomial(1)):
        k = arcflow.kernels(x1, x2, activation=other, **kw)
        assert_close(k.nngp, relu.nngp, dtype, f"nngp {other}")
        assert_close(k.ntk, relu.ntk, dtype, f"ntk {other}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["relu", "erf", "step", "monomial_3"])
def test_depth_zero_is_the_linear_kernel(name, dtype):
    act = ACTIVATIONS[name][0]
    x1, x2 = _data(6, 4, 3, seed=4)
    x1, x2 = x1.astype(dtype), x2.astype(dtype)
    w_std, b_std = 1.7, 0.6
    lin = w_std ** 2 * (x1.astype(np.float64) @ x2.astype(np.float64).T) / 3 + b_std ** 2
    k = arcflow.kernels(x1, x2, depth=0, activation=act, w_std=w_std, b_std=b_std, get=_get(act))
    assert_close(k.nngp, lin, dtype, "nngp")
    if act.has_ntk:
        assert_close(k.ntk, lin, dtype, "ntk")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_symmetric_output_is_exactly_symmetric(name, dtype):
    act, w_std, b_std = ACTIVATIONS[name]
    x, _ = _data(9, None, 4, seed=5)
    x[3] = x[0]                                  # a duplicate row: c = 1 off the diagonal
    k = arcflow.kernels(x.astype(dtype), depth=3, activation=act, w_std=w_std, b_std=b_std, get=_get(act))
    for field in _get(act):
        m = getattr(k, field)
        assert m.shape == (9, 9)
        assert np.array_equal(m, m.T), f"{field} is not exactly symmetric"


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_positive_semidefinite(name):
    act, w_std, b_std = ACTIVATIONS[name]
    x, _ = _data(40, None, 10, seed=6)
    x[7] = x[2]
    x[11] = 3.0 * x[5]
    for depth in (1, 3):
        k = arcflow.kernels(x, depth=depth, activation=act, w_std=w_std, b_std=b_std, get=_get(act))
        for field in _get(act):
            ev = np.linalg.eigvalsh(getattr(k, field))
            assert ev[0] >= -1e-10 * ev[-1], f"{field} depth {depth}: eigenvalues {ev[0]:.3e} .. {ev[-1]:.3e}"


# --------------------------------------------------------------------------------------------------
# the API: diag, get, nngp/ntk vs kernels, fix_dep


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_diag_equals_diagonal_of_full_matrix(name, dtype):
    act, w_std, b_std = ACTIVATIONS[name]
    x, _ = _data(7, None, 3, seed=7)
    x[4] = 0.0
    x = x.astype(dtype)
    for depth in (0, 3):
        kw = dict(depth=depth, activation=act, w_std=w_std, b_std=b_std, get=_get(act))
        full = arcflow.kernels(x, **kw)
        dg = arcflow.kernels(x, diag=True, **kw)
        for field in _get(act):
            v = getattr(dg, field)
            assert v.shape == (7,) and v.dtype == dtype
            assert_close(v, np.diag(getattr(full, field)), dtype, f"{field} depth {depth}")
        assert arcflow.nngp(x, diag=True, **{k: v for k, v in kw.items() if k != "get"}).shape == (7,)


def test_get_selects_outputs():
    x1, x2 = _data(5, 4, 3, seed=8)
    both = arcflow.kernels(x1, x2, depth=2)
    only_nngp = arcflow.kernels(x1, x2, depth=2, get=("nngp",))
    only_ntk = arcflow.kernels(x1, x2, depth=2, get=("ntk",))
    assert only_nngp.ntk is None and only_ntk.nngp is None
    assert np.array_equal(only_nngp.nngp, both.nngp)
    assert np.array_equal(only_ntk.ntk, both.ntk)
    assert both._fields == ("nngp", "ntk")
    nngp, ntk = both                      # a named tuple unpacks
    assert nngp is both.nngp and ntk is both.ntk


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_nngp_and_ntk_equal_kernels(dtype):
    x1, x2 = _data(7, 5, 3, seed=9)
    for x2_ in (x2.astype(dtype), None):
        kw = dict(depth=3, activation=LeakyReLU(0.2), w_std=1.3, b_std=0.2)
        k = arcflow.kernels(x1.astype(dtype), x2_, fix_dep=1, **kw)
        assert np.array_equal(arcflow.nngp(x1.astype(dtype), x2_, **kw), k.nngp)
        assert np.array_equal(arcflow.ntk(x1.astype(dtype), x2_, fix_dep=1, **kw), k.ntk)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("depth", (0, 1, 4))
def test_fix_dep_equal_depth_gives_nngp(depth, dtype):
    x1, x2 = _data(6, 5, 4, seed=10)
    k = arcflow.kernels(x1.astype(dtype), x2.astype(dtype), depth=depth, fix_dep=depth, w_std=1.3, b_std=0.5)
    assert_close(k.ntk, k.nngp, dtype, "ntk with fix_dep = depth")
    if depth > 0:
        k0 = arcflow.kernels(x1, x2, depth=depth, fix_dep=0, w_std=1.3, b_std=0.5)
        assert_differs(k0.ntk, k.ntk, 1e-3, "fix_dep=0 vs fix_dep=depth")   # the frozen layers' share is gone


# --------------------------------------------------------------------------------------------------
# input conversion: dtypes and layouts


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_dtype_is_preserved(dtype):
    x1, x2 = _data(4, 3, 2, seed=11)
    for fn in (arcflow.nngp, arcflow.ntk):
        assert fn(x1.astype(dtype), x2.astype(dtype)).dtype == dtype
        assert fn(x1.astype(dtype)).dtype == dtype
        assert fn(x1.astype(dtype), diag=True).dtype == dtype
    k = arcflow.kernels(x1.astype(dtype))
    assert k.nngp.dtype == dtype and k.ntk.dtype == dtype


@pytest.mark.parametrize("kind", ["int64", "int32", "uint8", "bool", "list"])
def test_other_inputs_are_computed_in_float64(kind):
    rng = np.random.default_rng(12)
    ints = rng.integers(-3, 4, size=(5, 3))
    if kind == "bool":
        x = ints > 0
    elif kind == "uint8":
        x = np.abs(ints).astype(np.uint8)
    elif kind == "list":
        x = ints.tolist()
    else:
        x = ints.astype(kind)
    x64 = np.asarray(x, dtype=np.float64)
    y = rng.standard_normal((4, 3))
    kw = dict(depth=2, w_std=1.2, b_std=0.1)
    for a, b in ((x, None), (x, y), (y, x), (x, x)):
        got = arcflow.kernels(a, b, **kw)
        want = arcflow.kernels(np.asarray(a, dtype=np.float64),
                               None if b is None else np.asarray(b, dtype=np.float64), **kw)
        assert got.nngp.dtype == np.float64 and got.ntk.dtype == np.float64
        assert np.array_equal(got.nngp, want.nngp) and np.array_equal(got.ntk, want.ntk)
    assert arcflow.nngp(x).dtype == np.float64 and arcflow.ntk(x, diag=True).dtype == np.float64
    ref = reference.kernels(x64, **kw)           # symmetric: the oracle pins the diagonal
    k = arcflow.kernels(x, **kw)
    assert_close(k.nngp, ref.nngp, np.float64, "nngp")
    assert_close(k.ntk, ref.ntk, np.float64, "ntk")


def test_float16_input_is_accepted():
    x = np.random.default_rng(19).standard_normal((4, 3)).astype(np.float16)
    k = arcflow.kernels(x, depth=2)
    assert k.nngp.dtype in (np.float32, np.float64)
    ref = reference.kernels(x.astype(np.float64), depth=2)
    assert_close(k.ntk, ref.ntk, k.ntk.dtype.type, "ntk")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_noncontiguous_and_fortran_inputs(dtype):
    rng = np.random.default_rng(13)
    big = rng.standard_normal((14, 10)).astype(dtype)
    x2 = rng.standard_normal((6, 5)).astype(dtype)
    kw = dict(depth=3, activation=Erf(), w_std=1.4, b_std=0.3)
    for x1 in (big[:, ::2], big[::2, :5], big[::-2, 1::2], np.asfortranarray(big[:, :5]), big.T.T[:, 3:8]):
        contiguous = np.ascontiguousarray(x1)
        for y in (x2, None):
            want = arcflow.kernels(contiguous, y, **kw)
            got = arcflow.kernels(x1, y, **kw)
            assert np.array_equal(got.nngp, want.nngp) and np.array_equal(got.ntk, want.ntk)
            assert got.nngp.flags.c_contiguous
        got = arcflow.kernels(contiguous, np.asfortranarray(x2), **kw)
        assert np.array_equal(got.ntk, arcflow.kernels(contiguous, x2, **kw).ntk)
        got = arcflow.kernels(contiguous, big[:12:2, ::2], **kw)
        assert np.array_equal(got.ntk, arcflow.kernels(contiguous, np.ascontiguousarray(big[:12:2, ::2]), **kw).ntk)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_empty_inputs(dtype):
    d = 3
    x = np.ones((4, d), dtype=dtype)
    e = np.zeros((0, d), dtype=dtype)
    for fn in (arcflow.nngp, arcflow.ntk):
        for a, b, shape in ((e, x, (0, 4)), (x, e, (4, 0)), (e, e, (0, 0)), (e, None, (0, 0))):
            r = fn(a, b, depth=2)
            assert r.shape == shape and r.dtype == dtype
        r = fn(e, diag=True, depth=2)
        assert r.shape == (0,) and r.dtype == dtype
    k = arcflow.kernels(e, x, depth=3)
    assert k.nngp.shape == (0, 4) and k.ntk.shape == (0, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_zero_rows_are_finite_and_match_reference(name, dtype):
    act, w_std, b_std = ACTIVATIONS[name]
    x1, x2 = _data(5, 4, 3, seed=14)
    x1[1] = 0.0
    x1, x2 = x1.astype(dtype), x2.astype(dtype)
    for b in (b_std, 0.0):                       # without bias a zero row stays exactly zero in every layer
        if b == 0.0:
            x2[2] = 0.0                          # (with a bias, two zero rows would be a collinear pair)
        for depth in (1, 3):
            kw = dict(depth=depth, activation=act, w_std=w_std, b_std=b, get=_get(act))
            for y in (x2, None):
                got = arcflow.kernels(x1, y, **kw)
                want = reference.kernels(_as64(x1), _as64(y), **kw)
                for field in _get(act):
                    assert_close(getattr(got, field), getattr(want, field), dtype,
                                 f"{field} b_std={b} depth={depth} x2={'None' if y is None else 'given'}")
            dg = arcflow.kernels(x1, diag=True, **kw)
            for field in _get(act):
                assert np.all(np.isfinite(getattr(dg, field)))


# --------------------------------------------------------------------------------------------------
# threads and out=


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_thread_count_does_not_change_results(dtype):
    # Tiles are 64 x 64: 300 x 230 is 5 x 4 tiles, the symmetric 260 has 15 on or above the diagonal, so
    # threads=2 really splits the work (one tile would run on one thread whatever the count).
    x1, x2 = _data(300, 230, 6, seed=15)
    x1, x2 = x1.astype(dtype), x2.astype(dtype)
    kw = dict(depth=4, w_std=1.3, b_std=0.2)
    for a, y in ((x1, x2), (x1[:260], None)):
        one = arcflow.kernels(a, y, threads=1, **kw)
        two = arcflow.kernels(a, y, threads=2, **kw)
        assert np.array_equal(two.nngp, one.nngp) and np.array_equal(two.ntk, one.ntk)
        want = reference.kernels(_as64(a), _as64(y), **kw)
        assert_close(two.nngp, want.nngp, dtype, "nngp")
        assert_close(two.ntk, want.ntk, dtype, "ntk")


def test_set_num_threads_round_trip():
    old = arcflow.get_num_threads()
    assert isinstance(old, int) and old >= 1
    try:
        arcflow.set_num_threads(1)
        assert arcflow.get_num_threads() == 1
        arcflow.set_num_threads(2)
        assert arcflow.get_num_threads() == 2
        x1, x2 = _data(200, 150, 3, seed=16)     # 4 x 3 tiles: two threads share them
        arcflow.set_num_threads(1)
        a = arcflow.ntk(x1, x2, depth=2)
        arcflow.set_num_threads(2)
        assert np.array_equal(arcflow.ntk(x1, x2, depth=2), a)
        assert_close(a, reference.ntk(x1, x2, depth=2), np.float64, "ntk")
    finally:
        arcflow.set_num_threads(old)
    assert arcflow.get_num_threads() == old


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_out_array_is_filled_and_returned(dtype):
    x1, x2 = _data(7, 5, 3, seed=17)
    x1, x2 = x1.astype(dtype), x2.astype(dtype)
    kw = dict(depth=3, w_std=1.3, b_std=0.2)
    for fn in (arcflow.nngp, arcflow.ntk):
        for y, shape in ((x2, (7, 5)), (None, (7, 7))):
            want = fn(x1, y, **kw)
            out = np.full(shape, np.nan, dtype=dtype)
            res = fn(x1, y, out=out, **kw)
            assert res is out
            assert np.array_equal(out, want)
        out = np.full((7,), np.nan, dtype=dtype)
        assert fn(x1, diag=True, out=out, **kw) is out
        assert np.array_equal(out, fn(x1, diag=True, **kw))


def test_out_memmap(tmp_path):
    x1, x2 = _data(33, 21, 4, seed=18)
    path = tmp_path / "k.dat"
    out = np.memmap(path, dtype=np.float64, mode="w+", shape=(33, 21))
    res = arcflow.ntk(x1, x2, depth=2, out=out)
    assert res is out
    want = arcflow.ntk(x1, x2, depth=2)
    assert np.array_equal(np.asarray(out), want)
    out.flush()
    del res, out
    back = np.fromfile(path, dtype=np.float64).reshape(33, 21)
    assert np.array_equal(back, want)
    out32 = np.memmap(tmp_path / "k32.dat", dtype=np.float32, mode="w+", shape=(33, 33))
    assert arcflow.nngp(x1.astype(np.float32), out=out32) is out32
    assert np.array_equal(np.asarray(out32), arcflow.nngp(x1.astype(np.float32)))
    del out32


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_x2_equal_to_x1_matches_the_symmetric_oracle(name, dtype):
    """kernels(x, x): every diagonal pair is collinear but goes through the general (n1 x n2) path; the
    float32 diagonal, too, must be within 1e-5 (the cosine of x with itself is 1)."""
    act, w_std, b_std = ACTIVATIONS[name]
    x, _ = _data(8, None, 5, seed=20)
    x = x.astype(dtype)
    for depth in (1, 3, 8):
        kw = dict(depth=depth, activation=act, w_std=w_std, b_std=b_std, get=_get(act))
        got = arcflow.kernels(x, x.copy(), **kw)
        want = reference.kernels(_as64(x), **kw)
        for field in _get(act):
            assert_close(getattr(got, field), getattr(want, field), dtype, f"{field} depth {depth}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_same_object_as_x2_takes_the_symmetric_path_with_the_same_bits(name, dtype):
    """kernels(x, x) runs the symmetric path (one triangle, mirrored); the oracle is the full n1 x n2
    computation of a copy, which computes (i, j) and (j, i) separately: they must agree bit for bit, over
    several tiles (n > 64, a mirrored off-diagonal tile) and with duplicate rows."""
    act, w_std, b_std = ACTIVATIONS[name]
    x, _ = _data(150, None, 6, seed=21)
    x[100] = x[3]
    x = x.astype(dtype)
    kw = dict(depth=3, activation=act, w_std=w_std, b_std=b_std, get=_get(act))
    same = arcflow.kernels(x, x, **kw)
    full = arcflow.kernels(x, x.copy(), **kw)
    for field in _get(act):
        assert np.array_equal(getattr(same, field), getattr(full, field)), field


def test_kernels_out_dict_and_sequence():
    x1, x2 = _data(6, 5, 3, seed=21)
    want = arcflow.kernels(x1, x2, depth=2)
    outs = {"nngp": np.empty((6, 5)), "ntk": np.empty((6, 5))}
    got = arcflow.kernels(x1, x2, depth=2, out=outs)
    assert got.nngp is outs["nngp"] and got.ntk is outs["ntk"]
    assert np.array_equal(got.nngp, want.nngp) and np.array_equal(got.ntk, want.ntk)
    seq = [np.empty((6, 5)), np.empty((6, 5))]
    got = arcflow.kernels(x1, x2, depth=2, get=("ntk", "nngp"), out=seq)
    assert got.ntk is seq[0] and got.nngp is seq[1]
    assert np.array_equal(seq[0], want.ntk) and np.array_equal(seq[1], want.nngp)
