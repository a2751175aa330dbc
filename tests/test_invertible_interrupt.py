"""Ctrl-C during IRevNet.forward / inverse: KeyboardInterrupt comes promptly, also while worker threads run.

The network is long enough (many blocks) that finishing the batch takes far longer than the time to the
signal; every block call is counted, so a KeyboardInterrupt that only arrives after the whole batch was
computed fails the test (no wall-clock assertion)."""
import os
import signal
import threading

import numpy as np
import pytest

from arcflow.invertible import IRevNet

N_BLOCKS = 600


@pytest.fixture(scope="module")
def long_net():
    return IRevNet([N_BLOCKS], [1], [8], init_ds=0, in_shape=(16, 8, 8), mult=2, n_classes=2, rng=0,
                   dtype=np.float64)


def _count_calls(net, monkeypatch, name):
    """Wrap every block's _forward_pair / _inverse_pair: count the calls, and at the first one start a timer
    thread that sends SIGINT to this process."""
    calls = []
    lock = threading.Lock()
    timer = threading.Timer(0.02, lambda: os.kill(os.getpid(), signal.SIGINT))
    for blk in net.stack:
        orig = getattr(blk, name)

        def wrapped(*args, _orig=orig, **kw):
            with lock:
                calls.append(1)
                if len(calls) == 1:
                    timer.start()
            return _orig(*args, **kw)

        monkeypatch.setattr(blk, name, wrapped)
    return calls, timer


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_ctrl_c_stops_the_network_promptly(long_net, monkeypatch, threads, direction):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    n = 4
    if direction == "forward":
        arg = np.random.default_rng(0).standard_normal((n,) + long_net.in_shape)
        name, run = "_forward_pair", long_net.forward
    else:
        arg = np.random.default_rng(0).standard_normal((n,) + long_net.out_shape) * 1e-3
        name, run = "_inverse_pair", long_net.inverse
    calls, timer = _count_calls(long_net, monkeypatch, name)
    total = N_BLOCKS * min(threads, n)  # block calls of a finished run (one chain per worker)
    with pytest.raises(KeyboardInterrupt):
        try:
            run(arg, threads=threads)
        finally:
            timer.join()  # the signal is sent (and handled) inside pytest.raises in every case
    assert 0 < len(calls) < total // 2, f"{len(calls)} of {total} block calls ran before the interrupt took effect"
    # the network still works after the interrupt
    monkeypatch.undo()
    small = arg[:1]
    out = run(small, threads=threads)
    assert np.isfinite(out).all()
