"""The roofline's vectorised arccos (fast_math.hpp, acos_poly: one square root and the division-free arcsine
polynomial that the AVX-512 kernel layout uses) against 50-digit mpmath, and NumPy's arccos as a second
oracle: bench/compare.py divides by its throughput, so it must be a real arccos at full precision."""
import mpmath as mp
import numpy as np
import pytest

from arcflow import _core


def _grid(dtype):
    x = np.concatenate([np.linspace(-1, 1, 4001), [-1.0, -0.7071067811865476, -0.5, 0.0, 0.5, 0.7071067811865476, 1.0],
                        1 - np.logspace(-16, -1, 200), -1 + np.logspace(-16, -1, 200), np.logspace(-300, -1, 100)])
    return np.clip(x, -1, 1).astype(dtype)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 4.5e-16), (np.float32, 2.4e-7)], ids=["f64", "f32"])
def test_acos_poly_matches_mpmath(dtype, rtol):
    x = _grid(dtype)
    got = _core._acos_poly(x).astype(np.float64)
    dps = mp.mp.dps
    with mp.workdps(40):
        ref = np.array([float(mp.acos(mp.mpf(float(v)))) for v in x])
    # relative to the exact arccos of the rounded input: (1 - |x|)(1 + |x|) is exact near |x| = 1, so even
    # acos(1 - 1e-16) keeps its relative accuracy
    err = np.abs(got - ref)
    assert np.all(np.isfinite(got))
    assert np.max(err / np.maximum(ref, 1e-300)) <= rtol
    assert mp.mp.dps == dps   # the global precision is left as found, for the tests that run after
    np.testing.assert_allclose(got, np.arccos(x.astype(np.float64)), rtol=4 * rtol, atol=0)
