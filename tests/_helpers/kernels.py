"""Activations, tolerances and the closeness assertion of the fused-kernel tests (test_properties, test_cuda)."""
from __future__ import annotations

import numpy as np

from arcflow.activations import (
    ABReLU, Abs, Erf, Identity, LeakyReLU, RectifiedMonomial, ReLU, Sign, Step)

# Relative to the largest |entry| of the oracle, the diagonal included.
RTOL = {np.float32: 1e-5, np.float64: 1e-12}
DTYPES = (np.float32, np.float64)

# (activation, w_std, b_std): the weight scale keeps every depth up to 8 finite and well conditioned
# (relu(x)^n with n >= 2 maps the variance s -> w^2 (2n-1)!!/2 s^n + b^2: with these scales every input
# row starts below the map's unstable fixed point, so nothing overflows by depth 8).
ACTIVATIONS = {
    "relu": (ReLU(), 1.3, 0.4),
    "leaky_relu_0.2": (LeakyReLU(0.2), 1.3, 0.4),
    "abrelu_-0.3_1.7": (ABReLU(-0.3, 1.7), 0.9, 0.2),
    "abs": (Abs(), 1.1, 0.3),
    "monomial_0": (RectifiedMonomial(0), 1.3, 0.4),
    "monomial_1": (RectifiedMonomial(1), 1.3, 0.4),
    "monomial_2": (RectifiedMonomial(2), 0.5, 0.4),
    "monomial_3": (RectifiedMonomial(3), 0.3, 0.4),
    "step": (Step(), 1.3, 0.4),
    "sign": (Sign(), 1.3, 0.4),
    "erf": (Erf(), 1.5, 0.2),
    "identity": (Identity(), 1.1, 0.3),
}


def assert_close(actual, expected, dtype, what=""):
    """Relative error, relative to the largest |entry| of the oracle, the diagonal included."""
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, what
    assert np.all(np.isfinite(actual)), f"{what}: non-finite entries"
    scale = float(np.max(np.abs(expected))) if expected.size else 1.0
    err = float(np.max(np.abs(actual.astype(np.float64) - expected))) if expected.size else 0.0
    assert err <= RTOL[dtype] * max(scale, np.finfo(np.float64).tiny), (
        f"{what}: max abs error {err:.3e} = {err / scale if scale else err:.3e} of the largest entry "
        f"{scale:.3e} (tolerance {RTOL[dtype]:.0e})")
