"""pytest-benchmark cases: ``python -m pytest bench --benchmark-only`` (never part of the default run).

Sizes are kept small enough for a 2-core machine; bench/compare.py does the large, one-run
comparison (arcflow vs NumPy vs neural-tangents, with the roofline).
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")

import arcflow  # noqa: E402
from arcflow import compat, reference  # noqa: E402

D, DEPTH = 64, 5


def _x(n, dtype=np.float64, d=D, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n", [500, 2000, 4000])
def test_kernels_symmetric(benchmark, n, dtype):
    x = _x(n, dtype)
    benchmark.group = f"kernels x2=None n={n}"
    out = benchmark(arcflow.kernels, x, depth=DEPTH, activation="relu")
    assert out.ntk.shape == (n, n) and out.ntk.dtype == dtype


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_kernels_rectangular(benchmark, dtype):
    x1, x2 = _x(2000, dtype), _x(1000, dtype, seed=1)
    benchmark.group = "kernels 2000 x 1000"
    out = benchmark(arcflow.kernels, x1, x2, depth=DEPTH, activation="relu")
    assert out.nngp.shape == (2000, 1000)


@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_threads(benchmark, threads):
    x = _x(2000)
    benchmark.group = "kernels n=2000 threads"
    benchmark(arcflow.kernels, x, depth=DEPTH, activation="relu", threads=threads)


@pytest.mark.parametrize("n", [1000])
def test_compat_kernel_value_batch(benchmark, n):
    x = _x(n)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    benchmark.group = f"kernel_value_batch n={n}"
    K = benchmark(compat.kernel_value_batch, x, DEPTH)
    assert K.shape == (DEPTH, DEPTH, n, n)


def test_original_kernel_value_batch(benchmark):
    x = _x(1000)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    benchmark.group = "kernel_value_batch n=1000"
    benchmark.pedantic(reference.kernel_value_batch_original, args=(x, DEPTH), rounds=3,
                       warmup_rounds=1)


def test_reference_kernels(benchmark):
    x = _x(500)
    benchmark.group = "kernels x2=None n=500"
    benchmark.pedantic(reference.kernels, args=(x,), kwargs={"depth": DEPTH, "activation": "relu"},
                       rounds=3, warmup_rounds=1)
