"""Bad input gets a clear error, of the right type, before anything is written (issue 2, acceptance)."""
from __future__ import annotations

import re

import numpy as np
import pytest

import arcflow
from arcflow.activations import LeakyReLU, RectifiedMonomial, Sign, Step

SENTINEL = -12345.5

FUNCTIONS = {
    "nngp": arcflow.nngp,
    "ntk": arcflow.ntk,
    "kernels": arcflow.kernels,
}


def _x(n=6, d=3, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


def _names(msg: str, *words: str) -> bool:
    return all(re.search(rf"(?<![A-Za-z0-9_]){re.escape(w)}(?![A-Za-z0-9_])", msg) for w in words)


# --------------------------------------------------------------------------------------------------
# non-finite input


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_nonfinite_x1_names_array_and_first_row(fn, dtype, bad):
    x = _x(40, 4, dtype=dtype)
    x[17, 2] = bad
    x[23, 0] = bad
    for x2 in (None, _x(5, 4, seed=1, dtype=dtype)):
        with pytest.raises(ValueError) as e:
            FUNCTIONS[fn](x, x2)
        msg = str(e.value)
        assert _names(msg, "x1") and _names(msg, "17"), msg
        assert not _names(msg, "x2"), msg
    with pytest.raises(ValueError, match=r"x1") as e:
        FUNCTIONS[fn](x, diag=True)
    assert _names(str(e.value), "17")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_nonfinite_x2_names_array_and_first_row(fn, bad):
    x2 = _x(12, 3, seed=2)
    x2[9, 1] = bad
    x2[11, 2] = bad
    with pytest.raises(ValueError) as e:
        FUNCTIONS[fn](_x(5, 3), x2)
    msg = str(e.value)
    assert _names(msg, "x2") and _names(msg, "9"), msg


def test_nonfinite_in_first_row_and_in_a_list():
    with pytest.raises(ValueError) as e:
        arcflow.ntk([[1.0, float("nan")], [0.0, 1.0]])
    assert _names(str(e.value), "x1") and _names(str(e.value), "0"), str(e.value)


# --------------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_wrong_ndim(fn):
    f = FUNCTIONS[fn]
    for bad in (np.ones(5), np.ones((2, 3, 4)), np.float64(1.0)):
        with pytest.raises(ValueError) as e:
            f(bad)
        assert _names(str(e.value), "x1"), str(e.value)
        with pytest.raises(ValueError) as e:
            f(np.ones((3, 5)), bad)
        assert _names(str(e.value), "x2"), str(e.value)


@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_feature_count_mismatch(fn):
    with pytest.raises(ValueError) as e:
        FUNCTIONS[fn](np.ones((4, 3)), np.ones((5, 2)))
    msg = str(e.value)
    assert _names(msg, "x1") and _names(msg, "x2") and "3" in msg and "2" in msg, msg


# --------------------------------------------------------------------------------------------------
# hyper-parameters


@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_negative_depth(fn):
    with pytest.raises(ValueError, match="depth"):
        FUNCTIONS[fn](_x(), depth=-1)


@pytest.mark.parametrize("depth", [1.5, "2", None, 2.0 + 0j], ids=["float", "str", "none", "complex"])
@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_non_integer_depth(fn, depth):
    with pytest.raises((ValueError, TypeError), match="depth"):
        FUNCTIONS[fn](_x(), depth=depth)


def test_numpy_integer_depth_is_accepted():
    x = _x()
    assert np.array_equal(arcflow.ntk(x, depth=np.int64(3), fix_dep=np.int32(1)),
                          arcflow.ntk(x, depth=3, fix_dep=1))


@pytest.mark.parametrize("value", [-0.5, np.nan, np.inf, -np.inf], ids=["negative", "nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["w_std", "b_std"])
@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_bad_std(fn, name, value):
    with pytest.raises(ValueError, match=name):
        FUNCTIONS[fn](_x(), **{name: value})


@pytest.mark.parametrize("fn", ["ntk", "kernels"])
def test_fix_dep_out_of_range(fn):
    with pytest.raises(ValueError, match="fix_dep"):
        FUNCTIONS[fn](_x(), depth=2, fix_dep=3)
    with pytest.raises(ValueError, match="fix_dep"):
        FUNCTIONS[fn](_x(), depth=0, fix_dep=1)
    with pytest.raises(ValueError, match="fix_dep"):
        FUNCTIONS[fn](_x(), depth=2, fix_dep=-1)
    with pytest.raises((ValueError, TypeError), match="fix_dep"):
        FUNCTIONS[fn](_x(), depth=2, fix_dep=0.5)


@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_unknown_activation_lists_valid_ones(fn):
    with pytest.raises(ValueError) as e:
        FUNCTIONS[fn](_x(), activation="gelu")
    msg = str(e.value)
    assert "gelu" in msg
    for valid in ("relu", "leaky_relu", "abs", "step", "sign", "erf", "identity"):
        assert _names(msg, valid), f"{valid!r} not listed in: {msg}"
    with pytest.raises((ValueError, TypeError)):
        FUNCTIONS[fn](_x(), activation=42)


def test_bad_activation_parameters():
    with pytest.raises(ValueError):
        LeakyReLU(float("nan"))
    with pytest.raises(ValueError):
        RectifiedMonomial(-1)
    with pytest.raises(ValueError):
        RectifiedMonomial(1.5)


@pytest.mark.parametrize("act", [Step(), Sign(), RectifiedMonomial(0), "step", "sign"],
                         ids=["Step", "Sign", "Monomial0", "step", "sign"])
def test_step_and_sign_have_no_ntk(act):
    for call in (lambda: arcflow.ntk(_x(), activation=act),
                 lambda: arcflow.kernels(_x(), activation=act),
                 lambda: arcflow.kernels(_x(), activation=act, get=("ntk",)),
                 lambda: arcflow.ntk(_x(), activation=act, diag=True)):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert re.search(r"ntk", msg, re.I), msg
        assert re.search(r"derivative|delta|dirac|infinite", msg, re.I), f"the message does not say why: {msg}"
    # the NNGP alone is fine
    assert np.all(np.isfinite(arcflow.nngp(_x(), activation=act)))
    assert arcflow.kernels(_x(), activation=act, get=("nngp",)).ntk is None


@pytest.mark.parametrize("get", [("nngp", "ntk_"), ("foo",), (), "both", ("NNGP",)])
def test_unknown_get_entries(get):
    with pytest.raises(ValueError, match="get"):
        arcflow.kernels(_x(), get=get)


@pytest.mark.parametrize("threads", [0, -2, 1.5, True])
def test_bad_threads(threads):
    with pytest.raises((ValueError, TypeError), match="threads"):
        arcflow.ntk(_x(), threads=threads)


# --------------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_complex_is_a_type_error(fn, dtype):
    z = _x().astype(dtype)
    with pytest.raises(TypeError, match="x1"):
        FUNCTIONS[fn](z)
    with pytest.raises(TypeError, match="x2"):
        FUNCTIONS[fn](_x(), z)
    z_real_valued = np.ones((3, 3), dtype=dtype)          # complex dtype even with zero imaginary parts
    with pytest.raises(TypeError):
        FUNCTIONS[fn](z_real_valued)


@pytest.mark.parametrize("bad", [
    np.array([["a", "b"], ["c", "d"]]),
    [["a", "b"], ["c", "d"]],
    np.array([[1.0, None], [2.0, 3.0]], dtype=object),
    np.array([[1.0, 2.0], [2.0, 3.0]], dtype=object),
    np.array([[b"ab", b"cd"]]),
    np.zeros((2, 2), dtype="datetime64[s]"),
], ids=["str_array", "str_list", "object_none", "object_float", "bytes", "datetime"])
@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_non_numeric_is_a_type_error(fn, bad):
    with pytest.raises(TypeError):
        FUNCTIONS[fn](bad)
    with pytest.raises(TypeError):
        FUNCTIONS[fn](np.ones((3, 2)), bad)


# --------------------------------------------------------------------------------------------------
# outputs too large: MemoryError before any work, with the size in bytes


def _mentions_bytes(msg: str, nbytes: int) -> bool:
    return str(nbytes) in msg or f"{nbytes:,}" in msg or f"{nbytes:_}" in msg


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_output_too_large_is_a_memory_error(dtype):
    n = 10 ** 7
    x = np.zeros((n, 1), dtype=dtype)
    item = np.dtype(dtype).itemsize
    with pytest.raises(MemoryError) as e:
        arcflow.ntk(x)
    assert _mentions_bytes(str(e.value), n * n * item), str(e.value)
    with pytest.raises(MemoryError) as e:
        arcflow.nngp(x, x[: n // 2])
    assert _mentions_bytes(str(e.value), n * (n // 2) * item), str(e.value)
    with pytest.raises(MemoryError) as e:      # both kernels: twice the bytes
        arcflow.kernels(x)
    msg = str(e.value)
    assert _mentions_bytes(msg, 2 * n * n * item) or _mentions_bytes(msg, n * n * item), msg
    # the diagonal of the same input is small and fine
    assert arcflow.nngp(x[:1000], diag=True).shape == (1000,)


# --------------------------------------------------------------------------------------------------
# out=


@pytest.mark.parametrize("fn", ["nngp", "ntk"])
def test_bad_out(fn):
    f = FUNCTIONS[fn]
    x1, x2 = _x(6, 3), _x(4, 3, seed=3)
    bad_outs = {
        "wrong shape": np.zeros((4, 6)),
        "wrong shape (flat)": np.zeros(24),
        "wrong dtype": np.zeros((6, 4), dtype=np.float32),
        "int dtype": np.zeros((6, 4), dtype=np.int64),
        "non-contiguous": np.zeros((6, 8))[:, ::2],
        "fortran": np.asfortranarray(np.zeros((6, 4))),
    }
    for what, out in bad_outs.items():
        before = out.copy()
        with pytest.raises(ValueError, match="out"):
            f(x1, x2, out=out)
        assert np.array_equal(out, before), what
    ro = np.zeros((6, 4))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        f(x1, x2, out=ro)
    with pytest.raises(ValueError, match="out"):                 # float32 inputs want a float32 out
        f(x1.astype(np.float32), x2.astype(np.float32), out=np.zeros((6, 4)))
    with pytest.raises(ValueError, match="out"):                 # diag=True wants shape (n1,)
        f(x1, diag=True, out=np.zeros((6, 6)))
    with pytest.raises(ValueError, match="out"):
        f(x1, x2, out=[[0.0] * 4] * 6)


def _sentinel(shape, dtype=np.float64):
    return np.full(shape, SENTINEL, dtype=dtype)


@pytest.mark.parametrize("fn", ["nngp", "ntk"])
def test_nothing_half_written(fn):
    """When a call fails, the out= array it was given is left exactly as it was."""
    f = FUNCTIONS[fn]
    x1, x2 = _x(50, 3), _x(40, 3, seed=4)
    x2_nan = x2.copy()
    x2_nan[39, 2] = np.nan                  # found only when the last row of x2 is reached
    x1_inf = x1.copy()
    x1_inf[49, 0] = np.inf
    failing = {
        "nan in the last row of x2": (lambda out: f(x1, x2_nan, out=out), ValueError),
        "inf in the last row of x1": (lambda out: f(x1_inf, x2, out=out), ValueError),
        "negative depth": (lambda out: f(x1, x2, depth=-1, out=out), ValueError),
        "negative w_std": (lambda out: f(x1, x2, w_std=-1.0, out=out), ValueError),
        "unknown activation": (lambda out: f(x1, x2, activation="swish", out=out), ValueError),
        "feature mismatch": (lambda out: f(x1, x2[:, :2], out=out), ValueError),
        "complex x2": (lambda out: f(x1, x2.astype(complex), out=out), TypeError),
    }
    if fn == "ntk":
        failing["fix_dep > depth"] = (lambda out: f(x1, x2, depth=1, fix_dep=2, out=out), ValueError)
        failing["step has no ntk"] = (lambda out: f(x1, x2, activation="step", out=out), ValueError)
    for what, (call, exc) in failing.items():
        out = _sentinel((50, 40))
        with pytest.raises(exc):
            call(out)
        assert np.all(out == SENTINEL), f"{what}: out= was written to before the error"
    # and the symmetric case
    out = _sentinel((50, 50))
    with pytest.raises(ValueError):
        f(x1_inf, out=out)
    assert np.all(out == SENTINEL)


def test_nothing_half_written_kernels_dict_out():
    x1, x2 = _x(30, 3), _x(20, 3, seed=5)
    x2[19, 0] = np.nan
    outs = {"nngp": _sentinel((30, 20)), "ntk": _sentinel((30, 20))}
    with pytest.raises(ValueError, match="x2"):
        arcflow.kernels(x1, x2, out=outs)
    assert all(np.all(v == SENTINEL) for v in outs.values())
