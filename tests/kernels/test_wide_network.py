"""The analytic kernels against a wide finite network (issue 2, acceptance: "wide finite network").

A NumPy MLP of width 2048 in the ntk parameterization (docs/mathematics.md §1),
``h1 = w_std * x W1 / sqrt(d) + b_std * b1``, ``h(l+1) = w_std * phi(h(l)) W(l+1) / sqrt(n) + b_std * b(l+1)``,
read-out ``Dense(1)`` the same way, all weights and biases i.i.d. N(0, 1). For several independent
seeds we measure

* the empirical NNGP: the covariance carried by the widest layer,
  ``w_std^2 <phi(h_D(x)), phi(h_D(y))> / n + b_std^2`` (the pre-activation covariance of the read-out,
  averaged over the width: far lower variance than the product of two network outputs);
* the empirical NTK: the sum over layers of the inner products of the gradients of f with respect to that
  layer's weights and bias, computed with an explicit NumPy backward pass (``fix_dep = k`` drops the
  first k layers).

Both must agree with arcflow's analytic kernels within sampling error: per entry,
``|mean - analytic| <= 5 * sd / sqrt(seeds) + floor`` (sd the spread across seeds, the floor
covering the O(1/width) bias). The same check must reject a wrong depth and a wrong w_std, so the test
can fail.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import arcflow
from arcflow.activations import Erf, LeakyReLU, ReLU

WIDTH = 2048
SEEDS = 12
DEPTHS = (1, 2, 3)
W_STD, B_STD = 1.2, 0.3
N_POINTS, D_IN = 6, 5
Z = 5.0            # standard errors of the mean an entry may be off (about 21 entries x 27 matrices)
FLOOR = 2e-3       # relative to the largest entry: the finite-width bias is O(1/width) = 5e-4


def _erf(h):
    from scipy.special import erf
    return erf(h)


ACTIVATIONS = {
    "relu": (ReLU(), lambda h: np.maximum(h, 0.0), lambda h: (h > 0).astype(h.dtype)),
    "leaky_relu_0.1": (LeakyReLU(0.1), lambda h: np.where(h > 0, h, 0.1 * h),
                       lambda h: np.where(h > 0, 1.0, 0.1)),
    "erf": (Erf(), _erf, lambda h: 2.0 / math.sqrt(math.pi) * np.exp(-h * h)),
}


def _inputs() -> np.ndarray:
    rng = np.random.default_rng(20240601)
    x = rng.standard_normal((N_POINTS, D_IN))
    # varied norms, and one pair at a small angle, where the kernels are most curved
    x *= np.array([0.5, 1.0, 1.5, 0.8, 1.2, 1.0])[:, None]
    x[5] = x[4] + 0.2 * rng.standard_normal(D_IN)
    return x


def _matvecs(w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``a @ w.T`` for a few rows a, in the operand order BLAS runs fast (matrix times thin matrix)."""
    return (w @ a.T.astype(np.float32)).T.astype(np.float64)


def _one_network(seed: int, x: np.ndarray) -> dict:
    """Empirical kernels of one random network, for every activation, depth and fix_dep."""
    rng = np.random.default_rng(seed)
    n, d = WIDTH, x.shape[1]
    w1 = rng.standard_normal((d, n))
    # hidden weights in float32 (their sampling noise dwarfs float32 rounding); stored (fan_out, fan_in)
    hidden = [rng.standard_normal((n, n), dtype=np.float32) for _ in range(max(DEPTHS) - 1)]
    biases = [rng.standard_normal(n) for _ in range(max(DEPTHS))]
    readout = {depth: rng.standard_normal(n) for depth in DEPTHS}

    out = {}
    for name, (_, phi, dphi) in ACTIVATIONS.items():
        # forward: pre-activations h[l] (l = 1..max depth) and post-activations a[l], a[0] = x
        acts, pres = [x], []
        h = W_STD * x @ w1 / math.sqrt(d) + B_STD * biases[0]
        for layer in range(max(DEPTHS)):
            if layer > 0:
                h = W_STD * _matvecs(hidden[layer - 1], acts[-1]) / math.sqrt(n) + B_STD * biases[layer]
            pres.append(h)
            acts.append(phi(h))
        # the kernel of a layer's input: w^2 <a, a'> / fan_in + b^2
        grams = [W_STD ** 2 * a @ a.T / a.shape[1] + B_STD ** 2 for a in acts]
        for depth in DEPTHS:
            out[name, "nngp", depth] = grams[depth]
            # backward: delta[l] = df/dh[l]; the read-out layer (index depth + 1) has delta = 1
            contrib = {depth + 1: grams[depth]}
            delta = dphi(pres[depth - 1]) * readout[depth] * (W_STD / math.sqrt(n))
            for layer in range(depth, 0, -1):
                contrib[layer] = grams[layer - 1] * (delta @ delta.T)
                if layer > 1:
                    delta = dphi(pres[layer - 2]) * _matvecs(hidden[layer - 2].T, delta) * (W_STD / math.sqrt(n))
            for fix in range(depth + 1):
                out[name, "ntk", depth, fix] = sum(contrib[layer] for layer in range(fix + 1, depth + 2))
    return out


@pytest.fixture(scope="module")
def empirical():
    x = _inputs()
    runs = [_one_network(1000 + s, x) for s in range(SEEDS)]
    return x, {key: np.stack([r[key] for r in runs]) for key in runs[0]}


def _excess(samples: np.ndarray, analytic: np.ndarray) -> float:
    """max over entries of |mean - analytic| / tolerance; <= 1 means 'agrees within sampling error'."""
    mean = samples.mean(axis=0)
    sem = samples.std(axis=0, ddof=1) / math.sqrt(samples.shape[0])
    tol = Z * sem + FLOOR * np.abs(analytic).max()
    return float(np.max(np.abs(mean - analytic) / tol))


def _analytic(x, act, depth, *, w_std=W_STD, fix_dep=0):
    return arcflow.kernels(x, depth=depth, activation=act, w_std=w_std, b_std=B_STD, fix_dep=fix_dep)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("depth", DEPTHS)
def test_nngp_matches_wide_network(empirical, name, depth):
    x, emp = empirical
    act = ACTIVATIONS[name][0]
    samples = emp[name, "nngp", depth]
    assert _excess(samples, _analytic(x, act, depth).nngp) <= 1.0
    # the same check has the power to reject a wrong depth or a wrong weight scale
    assert _excess(samples, _analytic(x, act, depth + 1).nngp) > 1.0
    assert _excess(samples, _analytic(x, act, depth - 1).nngp) > 1.0
    assert _excess(samples, _analytic(x, act, depth, w_std=1.1 * W_STD).nngp) > 1.0


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("depth", DEPTHS)
def test_ntk_matches_wide_network(empirical, name, depth):
    x, emp = empirical
    act = ACTIVATIONS[name][0]
    for fix in range(depth + 1):
        samples = emp[name, "ntk", depth, fix]
        assert _excess(samples, _analytic(x, act, depth, fix_dep=fix).ntk) <= 1.0, f"fix_dep={fix}"
    samples = emp[name, "ntk", depth, 0]
    assert _excess(samples, _analytic(x, act, depth + 1).ntk) > 1.0
    assert _excess(samples, _analytic(x, act, depth - 1).ntk) > 1.0
    assert _excess(samples, _analytic(x, act, depth, w_std=1.1 * W_STD).ntk) > 1.0
    assert _excess(samples, _analytic(x, act, depth, fix_dep=1).ntk) > 1.0
