"""Ctrl-C during IRevNet.forward / inverse: KeyboardInterrupt comes promptly, also while worker threads run.

A timer thread sends SIGINT at the third block call, and that call waits until the main thread has handled
the signal; every block call is counted. A run that goes on after the interrupt (the old thread pool
finished every started chunk, 600 block calls each) fails the count; no wall-clock assertion."""
import os
import signal
import threading
import time

import numpy as np
import pytest

from arcflow.invertible import IRevNet

N_BLOCKS = 600


@pytest.fixture(scope="module")
def long_net():
    return IRevNet([N_BLOCKS], [1], [8], init_ds=0, in_shape=(16, 8, 8), mult=2, n_classes=2, rng=0,
                   dtype=np.float64)


def _count_calls(net, monkeypatch, name, handled, target):
    """Wrap every block's forward_pair / inverse_pair and count the calls. The third call starts a timer
    thread that sends SIGINT (to the process, or to the thread of that call: a worker with threads=2, which
    Python's handler does not run in) and from then on every call waits (at most 30 s in all) until the main
    thread has handled it, so that however the OS schedules the threads, the workers cannot run on to the
    end of the batch before the interrupt is seen; what they run after it is the code under test."""
    calls = []
    lock = threading.Lock()
    caller = []
    gave_up = threading.Event()  # the 30 s ran out: the interrupt was not handled (stop waiting, let it fail)

    def send():
        if target == "process":
            os.kill(os.getpid(), signal.SIGINT)  # the kernel picks the thread (usually the main one)
        else:
            signal.pthread_kill(caller[0], signal.SIGINT)

    timer = threading.Timer(0.0, send)
    for blk in net.stack:
        orig = getattr(blk, name)

        def wrapped(*args, _orig=orig, **kw):
            with lock:
                calls.append(1)
                fire = len(calls) == 3
                gate = len(calls) >= 3
            if fire:
                caller.append(threading.get_ident())
                timer.start()
            if gate and not gave_up.is_set() and not handled.wait(30):
                gave_up.set()  # in the main thread, the handler's KeyboardInterrupt comes out of this wait
            return _orig(*args, **kw)

        monkeypatch.setattr(blk, name, wrapped)
    return calls, timer


def _settle(calls):
    """Wait until no block call is running any more (a pool that was left running in the background would
    go on counting), so that the count below is final."""
    for _ in range(300):
        before = len(calls)
        time.sleep(0.1)
        if len(calls) == before:
            return


@pytest.mark.parametrize("target", ["process", "caller"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_ctrl_c_stops_the_network_promptly(long_net, monkeypatch, threads, direction, target):
    n = 4
    if direction == "forward":
        arg = np.random.default_rng(0).standard_normal((n,) + long_net.in_shape)
        name, run = "forward_pair", long_net.forward
    else:
        arg = np.random.default_rng(0).standard_normal((n,) + long_net.out_shape) * 1e-3
        name, run = "inverse_pair", long_net.inverse
    handled = threading.Event()

    def on_sigint(signum, frame):  # what the default handler does, and a note that it ran
        handled.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        calls, timer = _count_calls(long_net, monkeypatch, name, handled, target)
        total = N_BLOCKS * min(threads, n)  # block calls of a finished run (one chain per worker)
        with pytest.raises(KeyboardInterrupt):
            try:
                run(arg, threads=threads)
            finally:
                timer.join()  # the signal is sent (and handled) inside pytest.raises in every case
    finally:
        signal.signal(signal.SIGINT, previous)
    assert handled.is_set()
    _settle(calls)
    # the workers stop at their next block: no chunk gets through the network (the old pool ran every
    # started chunk to its end, 600 block calls each)
    assert 3 <= len(calls) < N_BLOCKS, f"{len(calls)} of {total} block calls ran: the interrupt did not stop them"
    # the network still works after the interrupt
    monkeypatch.undo()
    out = run(arg[:1], threads=threads)
    assert np.isfinite(out).all()
