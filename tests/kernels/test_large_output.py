"""Long computations: a progress bar on stderr, and Ctrl-C (SIGINT) stops them (issue 2).

Sizes are modest (CI runs on 2 cores): the interrupted computation would take many seconds if it ran to
the end, but it is stopped within the first blocks; whether it stopped early is read from the output
(rows never written stay zero), not from a clock.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time

import numpy as np
import pytest

import arcflow



def _x(n, d, seed, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


@pytest.mark.parametrize("symmetric", [False, True], ids=["x2", "symmetric"])
def test_progress_bar_on_stderr(capsys, symmetric):
    n1 = 1200 if symmetric else 2000
    x1 = _x(n1, 8, seed=0)
    x2 = None if symmetric else _x(700, 8, seed=1)
    want = arcflow.kernels(x1, x2, depth=3, b_std=0.2)
    capsys.readouterr()
    got = arcflow.kernels(x1, x2, depth=3, b_std=0.2, progress=True)
    err = capsys.readouterr().err
    assert np.array_equal(got.nngp, want.nngp) and np.array_equal(got.ntk, want.ntk)
    assert err.strip(), "progress=True wrote nothing to stderr"
    assert re.search(rf"100%|\b{n1}/{n1}\b", err), err[-500:]
    # without progress nothing is written
    arcflow.ntk(x1, x2, depth=3)
    assert capsys.readouterr().err == ""


def test_progress_with_memmap_out(tmp_path, capsys):
    x1, x2 = _x(2500, 6, seed=2, dtype=np.float32), _x(900, 6, seed=3, dtype=np.float32)
    out = np.memmap(tmp_path / "k.f32", dtype=np.float32, mode="w+", shape=(2500, 900))
    res = arcflow.ntk(x1, x2, depth=4, w_std=1.3, b_std=0.1, out=out, progress=True)
    assert res is out
    assert capsys.readouterr().err.strip()
    assert np.array_equal(np.asarray(out), arcflow.ntk(x1, x2, depth=4, w_std=1.3, b_std=0.1))
    del res, out


def test_progress_on_compat(capsys):
    x = _x(800, 5, seed=4)
    k = arcflow.compat.kernel_value_batch(x, 3, progress=True)
    assert capsys.readouterr().err.strip()
    assert np.array_equal(k, arcflow.compat.kernel_value_batch(x, 3))


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name == "nt", reason="needs POSIX signals")
def test_keyboard_interrupt_stops_the_computation(tmp_path):
    """SIGINT during a long computation into an np.memmap raises KeyboardInterrupt in the caller, and the
    computation stops: the last rows of the output are never written (the full run takes several seconds:
    1.2e10 pair-layers, 4 s on 2 cores of a 2026 EPYC)."""
    assert threading.current_thread() is threading.main_thread()
    n1, n2, depth = 40_000, 500, 600
    x1, x2 = _x(n1, 8, seed=5, dtype=np.float32), _x(n2, 8, seed=6, dtype=np.float32)
    out = np.memmap(tmp_path / "big.f32", dtype=np.float32, mode="w+", shape=(n1, n2))   # zero-filled
    # Python's own Ctrl-C handler, also where the test process inherited SIGINT ignored (a job started with & by
    # a shell without job control: Python then leaves it ignored, and the signal would never arrive)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, os.kill, args=(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        start = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            # with b_std > 0 every NNGP entry is >= b_std^2 > 0, so a written row is never all zero
            arcflow.nngp(x1, x2, depth=depth, b_std=0.5, out=out)
            pytest.fail(f"the call returned after {time.perf_counter() - start:.2f} s without KeyboardInterrupt "
                        f"(the timer sends SIGINT at 0.5 s)")
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGINT, previous)
    written = np.asarray(out[:, 0]) != 0
    assert not written[-1000:].any(), "the computation ran on to the end despite SIGINT"
    del out
    # the engine is usable again afterwards
    small = arcflow.nngp(x1[:50], x2[:40], depth=3, b_std=0.5)
    assert small.shape == (50, 40) and np.all(np.isfinite(small))
