"""Property-based comparison of the fused kernels with the oracles over random configurations.

Random activation, depth 0..6, w_std, b_std, fix_dep, get, diag, symmetric or not; inputs whose rows are
scaled over many orders of magnitude (1e-30 ... 1e30 in float64, 1e-18 ... 1e15 in float32), with nearly
collinear and anti-collinear pairs. float64 must be within 1e-10 (relative to the largest entry) of the
truth: the NumPy reference where it agrees, else the 50-digit recursion (_helpers.mp_oracle) decides.
float32 must be within 1e-4 of the float64 result of the same float32 inputs. Where the exact kernel
overflows the dtype, FloatingPointError; NaN or inf never.

Deterministic (derandomize, no example database), sized to run in well under a minute on one core.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import arcflow  # noqa: E402
from arcflow.activations import ABReLU, Erf, LeakyReLU, RectifiedMonomial, Sign  # noqa: E402
from arcflow.reference import kernels as ref_kernels  # noqa: E402

from _helpers.mp_oracle import mp_kernels  # noqa: E402

ACTS = [ABReLU(0.0, 1.0), LeakyReLU(0.2), ABReLU(-1.0, 1.0), ABReLU(0.5, -1.5), ABReLU(1.0, 1.0),
        RectifiedMonomial(0), RectifiedMonomial(1), RectifiedMonomial(2), RectifiedMonomial(3), Sign(), Erf()]
F64_MAX = np.finfo(np.float64).max
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)

SETTINGS = settings(max_examples=600, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def configs(draw, float32: bool):
    act = draw(st.sampled_from(ACTS))
    depth = draw(st.integers(0, 6))
    if isinstance(act, RectifiedMonomial) and act.n >= 2:
        depth = min(depth, 3)  # Sigma grows like Sigma^(n^depth): deeper is an overflow test only
    w_std = draw(st.sampled_from([0.05, 0.5, 1.0, 1.3, 2.0, 5.0]))
    if float32 and isinstance(act, Erf):
        w_std = min(w_std, 2.0)  # see test_float32_erf_large_weight_limitation
    b_std = draw(st.sampled_from([0.0, 0.0, 1e-3, 0.1, 1.0]))
    fix_dep = draw(st.integers(0, depth))
    get = ("nngp", "ntk") if act.has_ntk and draw(st.booleans()) else ("nngp",)
    if act.has_ntk and get == ("nngp",) and draw(st.booleans()):
        get = ("ntk",)
    diag = draw(st.booleans())
    symmetric = diag or draw(st.booleans())
    n1 = draw(st.integers(1, 4))
    n2 = draw(st.integers(1, 4))
    d = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    lo, hi = (-18, 15) if float32 else (-30, 30)
    scales1 = draw(st.lists(st.integers(lo, hi), min_size=n1, max_size=n1))
    near = draw(st.sampled_from(["none", "collinear", "anticollinear"]))
    eps_exp = draw(st.integers(2, 12))
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=(n1, d)) * (10.0 ** np.array(scales1, float))[:, None]
    if symmetric:
        x2 = None
        if near != "none" and n1 >= 2:  # row 1 next to +-c row 0
            c = (1.0 if near == "collinear" else -1.0) * rng.uniform(0.2, 5.0)
            x1[1] = c * x1[0] + 10.0 ** -eps_exp * np.linalg.norm(x1[0]) * rng.normal(size=d)
    else:
        scales2 = draw(st.lists(st.integers(lo, hi), min_size=n2, max_size=n2))
        x2 = rng.normal(size=(n2, d)) * (10.0 ** np.array(scales2, float))[:, None]
        if near != "none":
            c = (1.0 if near == "collinear" else -1.0) * rng.uniform(0.2, 5.0)
            x2[0] = c * x1[0] + 10.0 ** -eps_exp * np.linalg.norm(x1[0]) * rng.normal(size=d)
    dtype = np.float32 if float32 else np.float64
    x1 = x1.astype(dtype)
    x2 = None if x2 is None else x2.astype(dtype)
    kw = dict(depth=depth, activation=act, w_std=w_std, b_std=b_std, fix_dep=fix_dep, get=get, diag=diag)
    return x1, x2, kw


def _run(x1, x2, kw):
    """arcflow's result as a dict of float64 arrays, or the FloatingPointError."""
    try:
        k = arcflow.kernels(x1, x2, **kw)
    except FloatingPointError as e:
        return e
    return {g: np.asarray(getattr(k, g), np.float64) for g in kw["get"]}


def _truth(x1, x2, kw):
    """The 50-digit value (more digits where the inputs are huge: erf's 1 + 2s against 2s)."""
    xa = np.asarray(x1, np.float64)
    xb = xa if x2 is None else np.asarray(x2, np.float64)
    big = max(np.abs(xa).max(), np.abs(xb).max(), 1.0)
    dps = 50 + 2 * int(math.log10(big)) + 10 * kw["depth"]
    mn, mt = mp_kernels(xa, None if x2 is None else xb, depth=kw["depth"], activation=kw["activation"],
                        w_std=kw["w_std"], b_std=kw["b_std"], fix_dep=kw["fix_dep"],
                        need_ntk="ntk" in kw["get"], dps=dps)
    out = {"nngp": mn, "ntk": mt}
    return {g: (np.diag(out[g]) if kw["diag"] else out[g]) for g in kw["get"]}


def _scale(b, x1, x2, kw, limit):
    """The largest entry; for x2 given (the diagonal not in the output), at least the Cauchy-Schwarz scale
    max sqrt(K(x,x) K(y,y)), the size every entry is resolved to (both kernels are positive semi-definite). With
    rows of very different norms an entry can be 1e-10 of that scale (an exactly antiparallel pair through ReLU
    is 0) while the largest entry of a small x1 x x2 block is tiny: relative to that entry alone the tolerance
    would ask for 1e-20 of the pair's own scale. Near theta = pi the recursion's T (ReLU's k1 S(theta) + k2
    cos(theta), the monomials' J_n) cancels to an absolute error of the dtype's epsilon times that scale, a
    known limitation. For symmetric inputs the two scales are the same."""
    scale = float(np.abs(b).max())
    if x2 is not None and not kw["diag"]:
        # The diagonals from arcflow's float64 diag=True (checked against the oracles by the symmetric draws):
        # the NumPy reference under- or overflows at these scales.
        dkw = dict(kw, diag=True)
        try:
            d1 = arcflow.kernels(np.asarray(x1, np.float64), **dkw)
            d2 = arcflow.kernels(np.asarray(x2, np.float64), **dkw)
        except FloatingPointError:
            return scale
        for g in kw["get"]:
            cs = math.sqrt(float(np.abs(getattr(d1, g)).max()) * float(np.abs(getattr(d2, g)).max()))
            # A diagonal beyond the dtype's range (the entries x-y still within it) caps the scale at the range.
            scale = max(scale, min(cs, limit))
    return scale


def _err(a, b, x1, x2, kw, g):
    scale = _scale(b, x1, x2, dict(kw, get=(g,)), F64_MAX)
    return np.abs(a - b).max() / scale if scale > 0 else np.abs(a - b).max()


def _check_f64(x1, x2, kw):
    got = _run(x1, x2, kw)
    if isinstance(got, dict):
        for g, v in got.items():
            assert np.isfinite(v).all(), f"{g}: NaN or inf"
        try:
            with np.errstate(all="ignore"):
                r = ref_kernels(x1, x2, **kw)
            ref = {g: np.asarray(getattr(r, g), np.float64) for g in kw["get"]}
            if all(np.isfinite(ref[g]).all() and _err(got[g], ref[g], x1, x2, kw, g) < 1e-10 for g in kw["get"]):
                return got
        except (FloatingPointError, ValueError, OverflowError):
            pass
    truth = _truth(x1, x2, kw)
    overflows = any(not np.isfinite(truth[g]).all() or np.abs(truth[g]).max() > F64_MAX for g in kw["get"])
    if isinstance(got, FloatingPointError):
        assert overflows, f"FloatingPointError but the exact kernel is finite: {got}"
        return got
    assert not overflows, "the exact kernel overflows float64 but no FloatingPointError"
    for g in kw["get"]:
        assert _err(got[g], truth[g], x1, x2, kw, g) < 1e-10, (g, _err(got[g], truth[g], x1, x2, kw, g))
    return got


@SETTINGS
@given(configs(float32=False))
def test_float64_against_reference_and_mpmath(cfg):
    x1, x2, kw = cfg
    _check_f64(x1, x2, kw)


@SETTINGS
@given(configs(float32=True))
def test_float32_against_float64_of_the_same_inputs(cfg):
    x1, x2, kw = cfg
    want = _check_f64(x1.astype(np.float64), None if x2 is None else x2.astype(np.float64), kw)
    got = _run(x1, x2, kw)
    if isinstance(want, FloatingPointError):
        assert isinstance(got, FloatingPointError), "float64 overflows, float32 does not raise"
        return
    over = any(np.abs(want[g]).max() > F32_MAX for g in kw["get"])
    if isinstance(got, FloatingPointError):
        assert over, f"float32 raised but its exact kernel is below float32's maximum: {got}"
        return
    assert not over, "the kernel overflows float32 but no FloatingPointError"
    truth = None
    for g in kw["get"]:
        a, b = got[g], want[g]
        assert np.isfinite(a).all(), f"{g}: NaN or inf"
        scale = _scale(b, x1, x2, dict(kw, get=(g,)), F32_MAX)
        if np.abs(a - b).max() <= 1e-4 * scale + 2 * F32_TINY:
            continue
        # A dispute: float64 itself is only resolved to 1e-16 of sqrt(K(x,x) K(y,y)), which can be far above
        # float32's range while the entry is not (a near-antiparallel pair through a monomial: 1e-20 of it).
        # The 50-digit value decides.
        if truth is None:
            truth = _truth(x1, x2, kw)
        err = np.abs(a - truth[g]).max()
        assert err <= 1e-4 * _scale(truth[g], x1, x2, dict(kw, get=(g,)), F32_MAX) + 2 * F32_TINY, (g, err, scale)


@pytest.mark.xfail(strict=True, reason="known limitation: float32 erf with a large weight near the diagonal")
def test_float32_erf_large_weight_limitation():
    """Erf's gaps sqrt(T11 T22) -/+ T are differences (activations.hpp, erf_act), so they carry an absolute
    error of T's rounding; with w_std = 5 the recursion amplifies a gap about 3.3x per layer near collinear
    pairs, and at depth 6 a float32 entry on the diagonal of the full matrix is 4e-4 off its float64 value."""
    x = np.array([[2.040919]], np.float32)
    kw = dict(depth=6, activation=Erf(), w_std=5.0)
    a = arcflow.ntk(x, **kw).astype(np.float64)
    b = arcflow.ntk(x.astype(np.float64), **kw)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
