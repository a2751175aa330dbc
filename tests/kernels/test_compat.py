"""arcflow.compat against the NumPy code of Arora et al. (ICLR 2020), as published (issue 2, acceptance).

``kernel_value_batch(X, d_max)`` must equal the original to 1e-12 (relative to the largest entry of each
K[dep][fix]) off the diagonal and 1e-8 on it: the original computes arccos(1 - eps) on the diagonal, about
1e-9 to 1e-8 off; arcflow pins the cosine of a pair (x, x) to exactly 1.
"""
from __future__ import annotations

import numpy as np
import pytest

import arcflow
from arcflow import compat, reference

# Every test here runs with both layouts of the CPU layer loops (conftest.fc_layout).
pytestmark = pytest.mark.usefixtures("fc_layout")

OFF_DIAG_RTOL = 1e-12
DIAG_RTOL = 1e-8

# (N, d, d_max). Random rows in d >= 2 are in general position; d = 1 only with N = 1 (with N >= 2 every
# pair would be collinear, where the original is off by ~1e-8 off the diagonal as well).
CASES = [(1, 1, 1), (1, 3, 4), (2, 2, 1), (5, 3, 1), (7, 4, 3), (20, 10, 5), (13, 2, 6), (9, 30, 8)]


def _x(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * rng.uniform(0.3, 2.0, (n, 1))


def _assert_block_close(got, want, what):
    """One N x N block: off-diagonal 1e-12 and diagonal 1e-8, relative to the block's largest entry."""
    assert got.shape == want.shape, what
    scale = np.abs(want).max()
    if scale == 0:
        assert np.all(got == 0), f"{what}: expected exact zeros"
        return
    err = np.abs(got - want) / scale
    n = got.shape[-1]
    off = ~np.eye(n, dtype=bool)
    assert err[off].max(initial=0.0) <= OFF_DIAG_RTOL, f"{what}: off-diagonal error {err[off].max():.3e}"
    assert np.diag(err).max() <= DIAG_RTOL, f"{what}: diagonal error {np.diag(err).max():.3e}"


@pytest.mark.parametrize("n,d,d_max", CASES)
def test_kernel_value_batch_equals_original(n, d, d_max):
    x = _x(n, d, seed=n * 100 + d)
    got = compat.kernel_value_batch(x, d_max)
    want = reference.kernel_value_batch_original(x, d_max)
    assert got.shape == (d_max, d_max, n, n) and got.dtype == np.float64
    for dep in range(d_max):
        for fix in range(d_max):
            if fix > dep:
                assert np.all(got[dep][fix] == 0), f"K[{dep}][{fix}] should be zero (fix > dep)"
            else:
                _assert_block_close(got[dep][fix], want[dep][fix], f"K[{dep}][{fix}]")
                assert np.array_equal(got[dep][fix], got[dep][fix].T)


@pytest.mark.parametrize("n,d,d_max", [(1, 3, 2), (7, 4, 3), (20, 10, 5), (9, 30, 8)])
def test_kernel_value_equals_original(n, d, d_max):
    x = _x(n, d, seed=7 * n + d)
    batch = compat.kernel_value_batch(x, d_max)
    for fix in range(d_max + 1):          # fix = d_max freezes everything: zeros, as in the original
        got = compat.kernel_value(x, d_max, fix)
        want = reference.kernel_value_original(x, d_max, fix)
        assert got.shape == (n, n) and got.dtype == np.float64
        _assert_block_close(got, want, f"kernel_value(d_max={d_max}, fix_dep={fix})")
        if fix < d_max:
            np.testing.assert_allclose(got, batch[d_max - 1][fix], rtol=1e-13, atol=0)


def test_original_relation_to_ntk():
    """The original is arcflow's ReLU NTK with w_std=1, b_std=0, times d (its Sigma^0 has no 1/d), and
    K[dep][fix] has depth dep (dep hidden ReLUs). Checked against the original first, then for compat."""
    n, d, d_max = 11, 6, 5
    x = _x(n, d, seed=3)
    original = reference.kernel_value_batch_original(x, d_max)
    ours = compat.kernel_value_batch(x, d_max)
    for dep in range(d_max):
        for fix in range(dep + 1):
            k = d * arcflow.ntk(x, depth=dep, activation="relu", w_std=1.0, b_std=0.0, fix_dep=fix)
            _assert_block_close(k, original[dep][fix], f"d * ntk vs original K[{dep}][{fix}]")
            # compat and ntk are both exact on the diagonal: they agree everywhere
            np.testing.assert_allclose(ours[dep][fix], k, rtol=0, atol=1e-12 * np.abs(k).max())
    # and the relation really depends on each convention: 1/d, depth and fix all matter
    want = original[2][1]
    _assert_differ(arcflow.ntk(x, depth=2, activation="relu", fix_dep=1), want, "without the factor d")
    _assert_differ(d * arcflow.ntk(x, depth=3, fix_dep=1), want, "depth 3")
    _assert_differ(d * arcflow.ntk(x, depth=2, fix_dep=0), want, "fix_dep 0")
    _assert_differ(d * arcflow.ntk(x, depth=2, fix_dep=1, w_std=np.sqrt(2)), want, "w_std sqrt(2)")


def _assert_differ(a, b, what, rtol=1e-3):
    """A negative control: both finite and apart by more than rtol of max |b| (np.allclose is False on NaN)."""
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)), f"{what}: non-finite entries"
    assert np.max(np.abs(a - b)) > rtol * np.max(np.abs(b)), f"{what}: no difference above {rtol:.0e}"


def test_duplicate_rows_are_exact():
    """Duplicate rows (c = 1 off the diagonal): compat is exact there, like the diagonal; the original's
    1e-8 error on such pairs is the reason for the diagonal tolerance."""
    x = _x(6, 4, seed=5)
    x[4] = x[1]
    d_max = 4
    got = compat.kernel_value_batch(x, d_max)
    for dep in range(d_max):
        for fix in range(dep + 1):
            k = 4 * arcflow.ntk(x, depth=dep, fix_dep=fix)
            np.testing.assert_allclose(got[dep][fix], k, rtol=0, atol=1e-12 * np.abs(k).max())
            assert got[dep][fix][1, 4] == got[dep][fix][1, 1] == got[dep][fix][4, 4]


def test_zero_rows_give_the_limit():
    """A zero row: finite values equal to the exact limit (the original clips sqrt(L L^T) at 1e-9, which
    compat deliberately does not copy); the other entries still equal the original."""
    x = _x(7, 3, seed=6)
    x[2] = 0.0
    d_max = 4
    got = compat.kernel_value_batch(x, d_max)
    want = reference.kernel_value_batch_original(x, d_max)
    assert np.all(np.isfinite(got))
    keep = np.array([i != 2 for i in range(7)])
    for dep in range(d_max):
        for fix in range(dep + 1):
            _assert_block_close(got[dep][fix][np.ix_(keep, keep)], want[dep][fix][np.ix_(keep, keep)],
                                f"K[{dep}][{fix}] without the zero row")
            limit = 3 * arcflow.ntk(x, depth=dep, fix_dep=fix)
            np.testing.assert_allclose(got[dep][fix], limit, rtol=0, atol=1e-12 * np.abs(limit).max())
            assert np.all(got[dep][fix][2] == 0) and np.all(got[dep][fix][:, 2] == 0)


def test_input_conversion():
    x = _x(6, 3, seed=8)
    want = compat.kernel_value_batch(x, 3)
    assert np.array_equal(compat.kernel_value_batch(x.tolist(), 3), want)
    assert np.array_equal(compat.kernel_value_batch(np.asfortranarray(x), 3), want)
    big = np.zeros((12, 6))
    big[::2, ::2] = x
    assert np.array_equal(compat.kernel_value_batch(big[::2, ::2], 3), want)
    got32 = compat.kernel_value_batch(x.astype(np.float32), 3)     # the original computes in float64
    assert got32.dtype == np.float64
    np.testing.assert_allclose(got32, compat.kernel_value_batch(x.astype(np.float32).astype(np.float64), 3),
                               rtol=1e-13, atol=0)
    assert compat.kernel_value_batch(np.zeros((0, 3)), 2).shape == (2, 2, 0, 0)


@pytest.mark.parametrize("d_max", [0, -1, 1.5, None])
def test_bad_d_max(d_max):
    with pytest.raises((ValueError, TypeError), match="d_max"):
        compat.kernel_value_batch(_x(4, 3), d_max)
    with pytest.raises((ValueError, TypeError), match="d_max"):
        compat.kernel_value(_x(4, 3), d_max, 0)


def test_bad_d_max_is_a_value_error():
    with pytest.raises(ValueError):
        compat.kernel_value_batch(_x(4, 3), 0)
    with pytest.raises(ValueError):
        compat.kernel_value(_x(4, 3), -2, 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_input(bad):
    x = _x(20, 3)
    x[17, 1] = bad
    x[19, 0] = bad
    with pytest.raises(ValueError, match=r"\b17\b"):
        compat.kernel_value_batch(x, 2)
    with pytest.raises(ValueError, match=r"\b17\b"):
        compat.kernel_value(x, 2, 0)


def test_other_bad_input():
    with pytest.raises(ValueError):
        compat.kernel_value_batch(np.ones(5), 2)
    with pytest.raises(ValueError):
        compat.kernel_value_batch(np.ones((2, 3, 4)), 2)
    with pytest.raises(TypeError):
        compat.kernel_value_batch(np.ones((3, 2), dtype=complex), 2)
    with pytest.raises(ValueError, match="fix_dep"):
        compat.kernel_value(_x(4, 3), 3, -1)
