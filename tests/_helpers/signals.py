"""Ctrl-C in a test: a SIGINT sent to the main thread while a call runs."""
from __future__ import annotations

import signal
import threading

import pytest


def interrupted(call, after: float = 0.2):
    """Run call() while a timer thread sends SIGINT to the main thread after `after` seconds.

    Returns whether call raised KeyboardInterrupt. The SIGINT handler raises only while call runs, so a late
    signal (a call that could not be interrupted) cannot hit pytest itself.
    """
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        pytest.skip("signals go to the main thread")
    armed = {"on": True}

    def handler(signum, frame):
        if armed["on"]:
            raise KeyboardInterrupt

    done = threading.Event()
    main = threading.main_thread().ident

    def fire():
        if not done.wait(after):
            signal.pthread_kill(main, signal.SIGINT)

    old = signal.signal(signal.SIGINT, handler)
    t = threading.Thread(target=fire, daemon=True)
    try:
        t.start()
        try:
            call()
            raised = False
        except KeyboardInterrupt:
            raised = True
        finally:
            armed["on"] = False
        done.set()
        t.join()
    finally:
        signal.signal(signal.SIGINT, old)
    return raised
