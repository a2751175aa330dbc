"""Collinear inputs against the recursion evaluated at 50 digits (docs/mathematics.md §1.3).

Duplicate rows, positive and negative multiples, d = 1 and the diagonal of the symmetric case have
c = +-1 exactly; a naive float64 recursion turns the rounding of s12 / sqrt(s1 s2) into a spurious
angle of ~1e-8 and is off by ~1e-8 (ReLU family) up to O(1) (Step and Sign, whose layer map
c -> 1 - 2 theta / pi turns a gap g into sqrt(g) at every layer). arcflow must match to 1e-10.

Step and Sign are ill-conditioned at c = 1 even in exact arithmetic, so for them only exactly collinear
inputs are used (duplicates, power-of-two multiples, d = 1); rounded multiples such as 0.1 u are
checked for the other activations.
"""
from __future__ import annotations

import numpy as np
import pytest

import arcflow
from arcflow import activations as acts

from _helpers.numeric import rel_err

TOL = 1e-10

# Every test here runs with both layouts of the CPU layer loops (conftest.fc_layout).
pytestmark = pytest.mark.usefixtures("fc_layout")

ACTIVATIONS = [acts.ReLU(), acts.LeakyReLU(0.1), acts.Abs(), acts.RectifiedMonomial(2), acts.Step(),
               acts.Sign(), acts.Erf()]
ILL_CONDITIONED = (acts.Step(), acts.Sign())


def _inputs(kind):
    rng = np.random.default_rng(2026)
    u, v = rng.standard_normal(3), rng.standard_normal(3)
    z = np.zeros(3)
    if kind == "duplicates":
        return np.stack([u, u, v, z, u]), np.stack([u, v, z])
    if kind == "pow2_multiples":
        return np.stack([u, 2 * u, -u, 0.5 * u, v]), np.stack([-2 * u, u, 0.5 * v, -v])
    if kind == "rounded_multiples":
        return np.stack([u, 3 * u, 0.1 * u, -7 * u, v]), np.stack([-0.3 * u, 5 * u, 1.7 * v])
    if kind == "d1":
        return np.array([[1.0], [-0.75], [1.25], [-1.125], [0.875]]), np.array([[0.5], [-1.5], [1.0]])
    if kind == "symmetric":
        return rng.standard_normal((5, 3)), None
    raise AssertionError(kind)


KINDS = ["duplicates", "pow2_multiples", "rounded_multiples", "d1", "symmetric"]

def _cases():
    for act in ACTIVATIONS:
        for b_std in (0.0, 0.4):
            for kind in KINDS:
                if kind == "rounded_multiples" and act in ILL_CONDITIONED:
                    continue   # ill-conditioned at c = 1: only exactly collinear inputs are meaningful
                yield pytest.param(act, b_std, kind, id=f"{act!r}-b{b_std:g}-{kind}")


@pytest.mark.parametrize("act, b_std, kind", list(_cases()))
def test_collinear_inputs_match_50_digits(act, b_std, kind, mp_oracle):
    x1, x2 = _inputs(kind)
    # monomials square the variance per layer: stop before the numbers leave float64's range
    max_depth = 5 if isinstance(act, acts.RectifiedMonomial) else 8
    w_std = 1.2
    nngp_mp, ntk_mp = mp_oracle(x1, x2, depth=max_depth, activation=act, w_std=w_std, b_std=b_std,
                                need_ntk=act.has_ntk, all_depths=True)
    get = ("nngp", "ntk") if act.has_ntk else ("nngp",)
    for depth in range(1, max_depth + 1):
        kw = dict(depth=depth, activation=act, w_std=w_std, b_std=b_std, get=get)
        got = arcflow.kernels(x1, x2, **kw)
        checks = [("nngp", got.nngp, nngp_mp[depth])]
        if act.has_ntk:
            checks.append(("ntk", got.ntk, ntk_mp[depth]))
        if x2 is None:
            diag = arcflow.kernels(x1, diag=True, **kw)
            checks.append(("nngp diag=True", diag.nngp, np.diag(nngp_mp[depth])))
            if act.has_ntk:
                checks.append(("ntk diag=True", diag.ntk, np.diag(ntk_mp[depth])))
        for field, value, want in checks:
            err = rel_err(value, want)
            assert err <= TOL, f"{field} at depth {depth}: relative error {err:.2e}"
