"""Sanity of the oracle itself: arcflow.reference against definitions, identities and 50-digit values."""
from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import scipy.special

from arcflow import activations as acts
from arcflow import reference

from _helpers.numeric import rel_err

ALL_ACTIVATIONS = [
    acts.ReLU(), acts.LeakyReLU(0.2), acts.ABReLU(-0.4, 1.3), acts.Abs(), acts.Identity(),
    acts.RectifiedMonomial(2), acts.RectifiedMonomial(3), acts.Step(), acts.Sign(), acts.Erf(),
]


def _id(act):
    return repr(act)


def _get(act):
    return ("nngp", "ntk") if act.has_ntk else ("nngp",)


# --------------------------------------------------------------------------------------------------
# J_n: the recursion against Cho & Saul's two definitions
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_j_recursion_matches_cho_saul_derivative_form(n):
    """J_n = (-1)^n sin^{2n+1} t ((1/sin t) d/dt)^n ((pi - t)/sin t), derivatives by mpmath."""
    with mp.workdps(30):
        def g(k, t):
            if k == 0:
                return (mp.pi - t) / mp.sin(t)
            return mp.diff(lambda s: g(k - 1, s), t) / mp.sin(t)

        for t in (0.3, 1.1, 2.0, 2.9):
            want = (-1) ** n * mp.sin(t) ** (2 * n + 1) * g(n, mp.mpf(t))
            got = reference.arccos_j(n, t)
            assert abs(got - float(want)) <= 1e-11 * max(1.0, abs(float(want)))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 6])
def test_j_recursion_matches_gaussian_integral(n):
    """E[relu(u)^n relu(v)^n] for unit variances at angle t equals J_n(t) / (2 pi) (Cho & Saul)."""
    with mp.workdps(25):
        for t in (0.0, 0.2, 1.0, 1.7, 2.6, math.pi):
            t_mp = mp.mpf(t)
            # polar coordinates: u = r cos a, v = r cos(a - t); E[r^{2n}] = 2^n n! in two dimensions
            lo, hi = t_mp - mp.pi / 2, mp.pi / 2
            angular = mp.quad(lambda a: mp.cos(a) ** n * mp.cos(a - t_mp) ** n, [lo, hi]) if hi > lo else 0
            want = 2 ** n * math.factorial(n) * angular / (2 * mp.pi)
            got = reference.arccos_j(n, t) / (2 * math.pi)
            assert abs(got - float(want)) <= 1e-12 * max(1.0, float(want))


# --------------------------------------------------------------------------------------------------
# One layer: T and Tdot against the Gaussian expectations they stand for
# --------------------------------------------------------------------------------------------------
def _phi(act):
    """phi, phi' (mpmath-friendly) and their degree of positive homogeneity (None for erf)."""
    if isinstance(act, acts.ABReLU):
        a, b = act.a, act.b
        return (lambda x: a * min(x, 0) + b * max(x, 0)), (lambda x: a if x < 0 else b), 1
    if isinstance(act, acts.RectifiedMonomial):
        n = act.n
        return ((lambda x: x ** n if x > 0 else 0),
                (lambda x: n * x ** (n - 1) if x > 0 else 0), n)
    if isinstance(act, acts.Sign):
        return (lambda x: mp.sign(x)), None, 0
    if isinstance(act, acts.Erf):
        return None, None, None
    raise AssertionError(act)


def _homogeneous_expectation(f, degree, s1, s2, s12):
    """E[f(u) f(v)] for (u, v) ~ N(0, [[s1, s12], [s12, s2]]) and f positively homogeneous.

    In polar coordinates u = sqrt(s1) r cos a, v = sqrt(s2) r cos(a - theta): the radius gives
    E[r^{2 degree}] = 2^degree degree!, the angle a one-dimensional integral.
    """
    theta = mp.acos(s12 / mp.sqrt(s1 * s2))
    r1, r2 = mp.sqrt(s1), mp.sqrt(s2)
    breaks = sorted({float((x % (2 * mp.pi))) for x in (mp.pi / 2, 3 * mp.pi / 2,
                                                        theta + mp.pi / 2, theta + 3 * mp.pi / 2)}
                    | {0.0, 2 * math.pi})
    angular = mp.quad(lambda a: f(r1 * mp.cos(a)) * f(r2 * mp.cos(a - theta)), breaks)
    return 2 ** degree * math.factorial(degree) * angular / (2 * mp.pi)


def _erf_expectations(s1, s2, s12):
    """E[erf(u) erf(v)] and E[erf'(u) erf'(v)] by a 120 x 120 Gauss-Hermite rule (smooth integrands)."""
    z, w = np.polynomial.hermite_e.hermegauss(120)
    w = w / math.sqrt(2 * math.pi)
    c = s12 / math.sqrt(s1 * s2)
    u = math.sqrt(s1) * z[:, None]
    v = math.sqrt(s2) * (c * z[:, None] + math.sqrt(1 - c * c) * z[None, :])
    ww = w[:, None] * w[None, :]
    dot = 2 / math.sqrt(math.pi)
    t = np.sum(ww * scipy.special.erf(u) * scipy.special.erf(v))
    tdot = np.sum(ww * dot * np.exp(-u * u) * dot * np.exp(-v * v))
    return t, tdot


@pytest.mark.parametrize("act", [acts.ReLU(), acts.ABReLU(-0.4, 1.3), acts.RectifiedMonomial(2),
                                 acts.Step(), acts.Sign(), acts.Erf()], ids=_id)
@pytest.mark.parametrize("s12", [0.55, -0.9])
def test_one_layer_equals_gaussian_expectation(act, s12):
    s1, s2 = 0.7, 1.9
    # a depth-1 network with w_std = 1, b_std = 0 and inputs whose Sigma^1 is (s1, s2, s12)
    y2 = s12 / math.sqrt(s1)
    x1 = np.array([[math.sqrt(s1), 0.0]]) * math.sqrt(2)
    x2 = np.array([[y2, math.sqrt(s2 - y2 * y2)]]) * math.sqrt(2)
    k = reference.kernels(x1, x2, depth=1, activation=act, get=_get(act))
    if isinstance(act, acts.Erf):
        t, tdot = _erf_expectations(s1, s2, s12)
    else:
        f, fdot, degree = _phi(act)
        with mp.workdps(20):
            t = float(_homogeneous_expectation(f, degree, mp.mpf(s1), mp.mpf(s2), mp.mpf(s12)))
            if act.has_ntk:
                tdot = float(_homogeneous_expectation(fdot, degree - 1, mp.mpf(s1), mp.mpf(s2),
                                                      mp.mpf(s12)))
    assert abs(k.nngp[0, 0] - t) <= 1e-10
    if act.has_ntk:
        assert abs((k.ntk[0, 0] - k.nngp[0, 0]) / s12 - tdot) <= 1e-10


# --------------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0, 1, 3, 8])
@pytest.mark.parametrize("b_std", [0.0, 0.7])
def test_rectified_monomial_one_is_relu(depth, b_std):
    rng = np.random.default_rng(depth)
    x1, x2 = rng.standard_normal((6, 3)), rng.standard_normal((4, 3))
    for fix_dep in range(depth + 1):
        kw = dict(depth=depth, w_std=1.4, b_std=b_std, fix_dep=fix_dep)
        a = reference.kernels(x1, x2, activation=acts.RectifiedMonomial(1), **kw)
        b = reference.kernels(x1, x2, activation="relu", **kw)
        assert rel_err(a.nngp, b.nngp) <= 1e-13 and rel_err(a.ntk, b.ntk) <= 1e-13


@pytest.mark.parametrize("depth", [0, 1, 2, 5, 8])
def test_identity_gives_the_linear_network_kernel(depth):
    rng = np.random.default_rng(depth)
    x1, x2 = rng.standard_normal((5, 4)), rng.standard_normal((3, 4))
    w2, b2 = 1.3 ** 2, 0.4 ** 2
    gram = x1 @ x2.T / 4
    sigma = [w2 * gram + b2]                            # Sigma^l = w2 Sigma^{l-1} + b2
    for _ in range(depth):
        sigma.append(w2 * sigma[-1] + b2)
    theta = sum(w2 ** (depth - i) * sigma[i] for i in range(depth + 1))   # Theta = sum w2^k Sigma
    k = reference.kernels(x1, x2, depth=depth, activation="identity", w_std=1.3, b_std=0.4)
    assert rel_err(k.nngp, sigma[-1]) <= 1e-13
    assert rel_err(k.ntk, theta) <= 1e-13


@pytest.mark.parametrize("act", ALL_ACTIVATIONS, ids=_id)
def test_depth_zero_is_the_input_layer(act):
    rng = np.random.default_rng(0)
    x1, x2 = rng.standard_normal((5, 3)), rng.standard_normal((2, 3))
    k = reference.kernels(x1, x2, depth=0, activation=act, w_std=0.9, b_std=0.3, get=("nngp",))
    np.testing.assert_allclose(k.nngp, 0.81 * x1 @ x2.T / 3 + 0.09, rtol=1e-14, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# Against the 50-digit recursion (generic inputs), fix_dep included
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ALL_ACTIVATIONS + [acts.RectifiedMonomial(5)], ids=_id)
def test_reference_matches_50_digits_on_generic_inputs(act, mp_oracle):
    rng = np.random.default_rng(7)
    x1, x2 = rng.standard_normal((4, 3)), rng.standard_normal((3, 3))
    x1[3] = 0.0                                         # a zero row too
    deep = 3 if isinstance(act, acts.RectifiedMonomial) and act.n >= 3 else 6   # no overflow
    for depth, w_std, b_std, fix_dep in ((1, 1.2, 0.0, 0), (3, 0.8, 0.5, 1), (deep, 1.5, 0.1, deep)):
        kw = dict(depth=depth, activation=act, w_std=w_std, b_std=b_std)
        if act.has_ntk:
            got = reference.kernels(x1, x2, fix_dep=fix_dep, **kw)
            want = mp_oracle(x1, x2, fix_dep=fix_dep, **kw)
            assert rel_err(got.nngp, want[0]) <= 1e-10 and rel_err(got.ntk, want[1]) <= 1e-10
        else:
            got = reference.nngp(x1, x2, **kw)
            assert rel_err(got, mp_oracle(x1, x2, need_ntk=False, **kw)[0]) <= 1e-10


# --------------------------------------------------------------------------------------------------
# fix_dep and the original NumPy code of Arora et al.
# --------------------------------------------------------------------------------------------------
def test_fix_dep_and_scaling_match_the_original_uci_code():
    rng = np.random.default_rng(3)
    n, d, d_max = 9, 5, 5
    X = rng.standard_normal((n, d))
    K = reference.kernel_value_batch_original(X, d_max)
    assert K.shape == (d_max, d_max, n, n)
    off = ~np.eye(n, dtype=bool)
    for dep in range(d_max):
        for fix in range(d_max):
            np.testing.assert_array_equal(K[dep][fix] if fix <= dep else 0.0, K[dep][fix])
            if fix > dep:
                continue
            # c_sigma = 1 (w_std = 1, no factor 2), Sigma^0 = X X^T (undo the 1/d), no bias
            ours = reference.ntk(X * math.sqrt(d), depth=dep, fix_dep=fix)
            assert rel_err(K[dep][fix][off], ours[off]) <= 1e-12
            assert rel_err(np.diag(K[dep][fix]), np.diag(ours)) <= 1e-7   # its diagonal is naive
    for fix in range(d_max):
        np.testing.assert_array_equal(reference.kernel_value_original(X, d_max, fix), K[d_max - 1][fix])


# --------------------------------------------------------------------------------------------------
# Shapes, symmetry, diag, PSD, zero rows, errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ALL_ACTIVATIONS, ids=_id)
def test_symmetric_diag_and_psd(act):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((12, 4))
    kw = dict(depth=4, activation=act, w_std=1.1, b_std=0.2)
    full = reference.kernels(x, get=_get(act), **kw)
    diag = reference.kernels(x, diag=True, get=_get(act), **kw)
    explicit = reference.kernels(x, x.copy(), get=_get(act), **kw)
    off = ~np.eye(len(x), dtype=bool)
    for field in _get(act):
        m = getattr(full, field)
        assert m.shape == (12, 12) and getattr(diag, field).shape == (12,)
        assert rel_err(m, m.T) <= 1e-15
        assert rel_err(getattr(diag, field), np.diag(m)) <= 1e-14
        assert rel_err(getattr(explicit, field)[off], m[off]) <= 1e-12
        eig = np.linalg.eigvalsh((m + m.T) / 2)
        assert eig[0] >= -1e-10 * eig[-1]


@pytest.mark.parametrize("act", ALL_ACTIVATIONS, ids=_id)
@pytest.mark.parametrize("b_std", [0.0, 0.5])
def test_zero_rows_are_finite(act, b_std):
    x = np.zeros((3, 2))
    x[1] = [1.0, -2.0]
    k = reference.kernels(x, depth=3, activation=act, b_std=b_std, get=_get(act))
    d = reference.kernels(x, depth=3, activation=act, b_std=b_std, get=_get(act), diag=True)
    for field in _get(act):
        assert np.all(np.isfinite(getattr(k, field))) and np.all(np.isfinite(getattr(d, field)))
    if b_std == 0.0 and isinstance(act, acts.ABReLU):
        assert np.all(k.nngp[0] == 0.0) and np.all(k.ntk[0] == 0.0)


def test_api_shapes_and_errors():
    x1, x2 = np.ones((3, 2)), np.ones((4, 2))
    k = reference.kernels(x1, x2, get="nngp")
    assert k.ntk is None and k.nngp.shape == (3, 4)
    np.testing.assert_array_equal(reference.ntk(x1, x2, depth=2),
                                  reference.kernels(x1, x2, depth=2).ntk)
    np.testing.assert_array_equal(reference.nngp(x1, depth=2), reference.kernels(x1, depth=2).nngp)
    assert reference.kernels(np.zeros((0, 2)), x2).ntk.shape == (0, 4)
    for act in ("step", "sign"):
        with pytest.raises(ValueError, match="no NTK"):
            reference.ntk(x1, activation=act)
    with pytest.raises(ValueError):
        reference.ntk(x1, depth=1, fix_dep=2)
    with pytest.raises(ValueError):
        reference.nngp(x1, np.ones((2, 3)))
