"""Error measures and the negative-control assertion shared by the kernel and the invertible tests."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest


def rel_err(got, want) -> float:
    """max |got - want| relative to max |want| (the convention of the 1e-10 bar of the kernel tests)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return float(np.max(np.abs(got - want), initial=0.0)) / (scale if scale > 0 else 1.0)


def assert_differs(a, b, rel=1e-3, what=""):
    """A negative control that cannot pass on NaN (``not np.allclose`` and ``not np.array_equal`` do): both
    arrays finite, of one shape, and max|a - b| above ``rel`` times max|b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} and {b.shape}"
    assert np.isfinite(a).all() and np.isfinite(b).all(), f"{what}: non-finite entries"
    assert np.abs(a - b).max() > rel * np.abs(b).max(), f"{what}: no difference above {rel:.0e}"


def load_golden(path):
    """A golden .npz (tests/make_*_golden.py): its JSON 'meta' and every other array by name."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        arrays = {k: z[k] for k in z.files if k != "meta"}
    return meta, arrays


def import_nt():
    """jax with neural-tangents importable (their import warnings silenced), for the live comparisons; the
    test is skipped (never passed) where either does not import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jax = pytest.importorskip("jax")
        pytest.importorskip("neural_tangents")
    return jax
