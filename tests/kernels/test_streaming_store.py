"""Outputs larger than 8 MB are written with non-temporal (streaming) stores, in rows that may start anywhere
relative to a 16-byte boundary: check such outputs against the NumPy reference, including outputs whose base
address is deliberately misaligned (the store's scalar prologue) and ragged last tiles."""
import functools

import numpy as np
import pytest

import arcflow
from arcflow import compat, reference

# Every test here runs with both layouts of the CPU layer loops (conftest.fc_layout).
pytestmark = pytest.mark.usefixtures("fc_layout")

N = 1100  # 1100^2 float64 = 9.7 MB per matrix: above the streaming threshold; 1100 = 17 tiles + 12 rows
N32 = 1612  # float32: 1612^2 * 4 = 10.4 MB; 1612 = 25 tiles + 12 rows


def _x(n, d, seed, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


def _at_line_offset(shape, dtype, k):
    """A C-contiguous array whose data starts k elements past a 64-byte (cache-line) boundary."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    per_line = 64 // dt.itemsize
    raw = np.empty(n + 2 * per_line, dtype=dt)
    start = (-(raw.ctypes.data % 64) // dt.itemsize) % per_line + k
    out = raw[start:start + n].reshape(shape)
    assert out.ctypes.data % 64 == k * dt.itemsize and out.flags.c_contiguous
    return out


@functools.lru_cache(maxsize=4)
def _reference(dtype, symmetric, d, seeds, depth, w_std=1.0, b_std=0.0):
    """Inputs and the float64 oracle on the whole output (1100^2 or 1612^2 pairs: about a second and 300 MB).
    In the symmetric case the oracle pins the diagonal's cosine to 1, so every entry is compared."""
    n = N if dtype == np.float64 else N32
    x1 = _x(n, d, seed=seeds[0], dtype=dtype)
    x2 = None if symmetric else _x(n + seeds[2], d, seed=seeds[1], dtype=dtype)
    ref = reference.kernels(x1.astype(np.float64), None if x2 is None else x2.astype(np.float64), depth=depth,
                            w_std=w_std, b_std=b_std)
    return x1, x2, ref


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "x2"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
def test_streamed_output_matches_reference(dtype, tol, symmetric, aligned):
    x1, x2, ref = _reference(dtype, symmetric, 7, (1, 2, 37), 3, 1.2, 0.3)
    n = x1.shape[0]
    shape = (n, n if symmetric else n + 37)
    assert np.dtype(dtype).itemsize * shape[0] * shape[1] > 8 << 20  # the streaming path
    out = _at_line_offset(shape, dtype, 1) if not aligned else np.empty(shape, dtype)
    assert aligned or out.ctypes.data % 16 != 0  # the store's scalar prologue
    out.fill(np.nan)
    got = arcflow.ntk(x1, x2, depth=3, w_std=1.2, b_std=0.3, out=out)
    assert got is out
    assert np.isfinite(got).all()
    if symmetric:
        assert np.array_equal(got, got.T)
    assert np.abs(got - ref.ntk).max() <= tol * np.abs(ref.ntk).max()


# Only whole cache lines are streamed; a row's first and last line take plain stores (stream_row). Every
# offset of the output within a line, for both outputs, both paths (the mirror writes rows too): a lost or
# doubled value at a line's edge shows as a NaN left from the fill or as a mismatch with the reference.
@pytest.mark.parametrize("dtype,tol,k", [(np.float64, 1e-12, k) for k in range(8)]
                         + [(np.float32, 2e-5, k) for k in (1, 4, 9, 15)],
                         ids=[f"f64-{k}" for k in range(8)] + [f"f32-{k}" for k in (1, 4, 9, 15)])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "x2"])
def test_streamed_rows_at_every_offset_in_a_cache_line(dtype, tol, k, symmetric):
    x1, x2, ref = _reference(dtype, symmetric, 5, (4, 5, 3), 2)
    n = x1.shape[0]
    shape = (n, n if symmetric else n + 3)
    outs = [_at_line_offset(shape, dtype, k), _at_line_offset(shape, dtype, (k + 3) % (64 // np.dtype(dtype).itemsize))]
    for o in outs:
        o.fill(np.nan)
    got = arcflow.kernels(x1, x2, depth=2, out=outs)
    assert got.nngp is outs[0] and got.ntk is outs[1]
    for name, o in (("nngp", outs[0]), ("ntk", outs[1])):
        assert np.isfinite(o).all(), name
        want = getattr(ref, name)
        if symmetric:
            assert np.array_equal(o, o.T), name
        assert np.abs(o - want).max() <= tol * np.abs(want).max(), name


def test_streamed_kernel_value_batch_matches_original():
    x = _x(N, 6, seed=3)
    K = compat.kernel_value_batch(x, 3)
    orig = reference.kernel_value_batch_original(x, 3)
    # The original computes arccos(1 - eps) on the diagonal (off by ~1e-8): every other entry to 1e-12.
    off = ~np.eye(N, dtype=bool)
    for dep in range(3):
        for fix in range(3):
            want = orig[dep][fix]
            got = K[dep, fix]
            assert np.isfinite(got).all()
            assert np.abs(got[off] - want[off]).max() <= 1e-12 * np.abs(want).max() + 1e-300
            np.testing.assert_allclose(np.diagonal(got), np.diagonal(want), rtol=1e-8, atol=0)
            if fix > dep:
                assert not got.any()
