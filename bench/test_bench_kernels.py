"""pytest-benchmark cases: ``python -m pytest bench --benchmark-only`` (never part of the default run).

Sizes are kept small enough for a 2-core machine; bench/compare.py does the large, one-run
comparison (arcflow vs NumPy vs neural-tangents, with the roofline). Every case warms up first, runs arcflow
with an explicit thread count (THREADS, default 2: ``ARCFLOW_BENCH_THREADS``), keeps one dtype per group (the
group says which) and checks its result against the NumPy reference on a corner of the output.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")

import arcflow  # noqa: E402
from arcflow import compat, reference  # noqa: E402

D, DEPTH = 64, 5
THREADS = int(os.environ.get("ARCFLOW_BENCH_THREADS", "2"))
RTOL = {np.float32: 1e-4, np.float64: 1e-10}


def _x(n, dtype=np.float64, d=D, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


def _run(benchmark, fn, *args, **kwargs):
    return benchmark.pedantic(fn, args=args, kwargs=kwargs, rounds=5, warmup_rounds=1)


def _check_corner(got, x1, x2, dtype):
    """The 40 x 40 corner of the NTK against arcflow.reference (float64)."""
    want = reference.ntk(x1[:40].astype(np.float64), None if x2 is None else x2[:40].astype(np.float64),
                         depth=DEPTH, activation="relu")
    err = np.abs(got[:40, :40].astype(np.float64) - want).max() / np.abs(want).max()
    assert err <= RTOL[dtype], err


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n", [500, 2000, 4000])
def test_kernels_symmetric(benchmark, n, dtype):
    x = _x(n, dtype)
    benchmark.group = f"kernels x2=None n={n} {np.dtype(dtype).name}"
    out = _run(benchmark, arcflow.kernels, x, depth=DEPTH, activation="relu", threads=THREADS)
    assert out.ntk.shape == (n, n) and out.ntk.dtype == dtype
    _check_corner(out.ntk, x, None, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_kernels_rectangular(benchmark, dtype):
    x1, x2 = _x(2000, dtype), _x(1000, dtype, seed=1)
    benchmark.group = f"kernels 2000 x 1000 {np.dtype(dtype).name}"
    out = _run(benchmark, arcflow.kernels, x1, x2, depth=DEPTH, activation="relu", threads=THREADS)
    assert out.nngp.shape == (2000, 1000)
    _check_corner(out.ntk, x1, x2, dtype)


@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_threads(benchmark, threads):
    x = _x(2000)
    benchmark.group = "kernels n=2000 float64 threads"
    out = _run(benchmark, arcflow.kernels, x, depth=DEPTH, activation="relu", threads=threads)
    _check_corner(out.ntk, x, None, np.float64)


@pytest.mark.parametrize("n", [1000])
def test_compat_kernel_value_batch(benchmark, n):
    x = _x(n)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    benchmark.group = f"kernel_value_batch n={n} float64"
    K = _run(benchmark, compat.kernel_value_batch, x, DEPTH, threads=THREADS)
    assert K.shape == (DEPTH, DEPTH, n, n)
    want = reference.kernel_value_batch_original(x[:40], DEPTH)
    assert np.abs(K[:, :, :40, :40] - want).max() <= 1e-7 * np.abs(want).max()


def test_original_kernel_value_batch(benchmark):
    x = _x(1000)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    benchmark.group = "kernel_value_batch n=1000 float64"
    _run(benchmark, reference.kernel_value_batch_original, x, DEPTH)


def test_reference_kernels(benchmark):
    x = _x(500)
    benchmark.group = "kernels x2=None n=500 float64"
    _run(benchmark, reference.kernels, x, depth=DEPTH, activation="relu")
