"""Smoke test of bench/bench_conv.py's arcflow side at a tiny size: the benchmark's network builds, runs, and its
result agrees with the exact float64 NumPy evaluation (arcflow.reference_conv) through the script's own check."""
import importlib.util
import os
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "bench")


@pytest.fixture(scope="module")
def bench_conv():
    sys.path.insert(0, os.path.abspath(BENCH))  # bench_conv imports bench/compare.py
    try:
        spec = importlib.util.spec_from_file_location("bench_conv", os.path.join(BENCH, "bench_conv.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(os.path.abspath(BENCH))


@pytest.mark.parametrize("readout", ["gap", "flatten"])
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-10), ("float32", 1e-5)])
def test_bench_conv_network_matches_the_numpy_evaluation(bench_conv, readout, dtype, tol):
    x = bench_conv._images(3, 5, dtype)
    assert x.shape == (3, 5, 5, bench_conv.CHANNELS) and x.dtype == np.dtype(dtype)
    kfn = bench_conv._arcflow_net(readout)
    k = kfn(x, None, ("nngp", "ntk"))
    assert k.nngp.shape == k.ntk.shape == (3, 3) and k.ntk.dtype == np.dtype(dtype)
    err = bench_conv._corner_check(kfn, x, k, m=3)
    assert err is not None and set(err) == {"nngp", "ntk"}
    assert max(err.values()) < tol, err
    # the check is not vacuous: a wrong kernel is caught
    wrong = type(k)(k.nngp * 1.01, k.ntk)
    assert bench_conv._corner_check(kfn, x, wrong, m=3)["nngp"] > 1e-3


def test_bench_conv_floor_work_per_pair(bench_conv):
    # GAP: every pair of the H W positions; Flatten: the same-position pairs; 9 taps, 5 conv layers
    assert bench_conv._pair_work("gap", 16) == (5 * 256 ** 2 * 9, 5 * 256 ** 2)
    assert bench_conv._pair_work("flatten", 16) == (5 * 256 * 9, 5 * 256)
