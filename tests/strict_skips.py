"""A pytest plugin (loaded by conftest.py): with ARCFLOW_STRICT_SKIPS=1 the session fails when a test skips
for a reason outside ALLOWED, listing those skips. CI (.ci/run) sets it, so a broken optional path (a missing
g++ that drops the emulation tests, a test dependency that stopped importing) cannot pass as skipped.

ARCFLOW_ALLOWED_SKIPS may add regexes (separated by newlines) for one run, e.g. a GPU machine without CuPy.
"""
from __future__ import annotations

import os
import re

import pytest

# Matched with re.fullmatch against the reason as pytest prints it (without "Skipped: ").
ALLOWED = (
    # No CUDA build or no device: the GPU tests skip, and on a GPU the tests of the no-device error paths.
    r"arcflow was built without CUDA",
    r"no CUDA device usable \(.*\)",
    r"needs a CUDA build on a machine without a device",
    r"needs the CUDA build without a GPU",
    r"a CUDA device is present: the error path is not reachable",
    r"a GPU and CuPy are available",
    r"a GPU is present \(the real launches are tested below\)",
    # The live neural-tangents comparison: jax is no test dependency (tests/data/nt_golden.npz stands in).
    r"could not import '(jax|neural_tangents)'.*",
    # The live PyTorch comparisons: torch is no test dependency (golden files stand in).
    r"could not import 'torch'.*",
    # scikit-learn's check_estimator: its array-API variant needs SCIPY_ARRAY_API=1 and an array-API library;
    # arcflow's estimators compute on NumPy arrays only.
    r"SCIPY_ARRAY_API is not set: not checking array_api input",
)

_skips: list = []


def _enabled(config) -> bool:
    return os.environ.get("ARCFLOW_STRICT_SKIPS", "") not in ("", "0")


def _patterns():
    extra = [p for p in os.environ.get("ARCFLOW_ALLOWED_SKIPS", "").splitlines() if p.strip()]
    return [re.compile(p, re.DOTALL) for p in (*ALLOWED, *extra)]


def _reason(report) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text[len("Skipped: "):] if text.startswith("Skipped: ") else text


def _record(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skips.append((report.nodeid, _reason(report)))


def pytest_sessionstart(session):
    _skips.clear()


def pytest_runtest_logreport(report):
    _record(report)


def pytest_collectreport(report):
    _record(report)


def unexpected_skips():
    """(node id, reason) of each recorded skip whose reason no allowed pattern matches."""
    patterns = _patterns()
    return [(node, why) for node, why in _skips if not any(p.fullmatch(why) for p in patterns)]


def pytest_sessionfinish(session, exitstatus):
    if _enabled(session.config) and unexpected_skips() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _enabled(config):
        return
    bad = unexpected_skips()
    if not bad:
        terminalreporter.write_line(f"ARCFLOW_STRICT_SKIPS: all {len(_skips)} skips have an expected reason")
        return
    terminalreporter.section("unexpected skips (ARCFLOW_STRICT_SKIPS=1)", red=True)
    counts: dict = {}
    for node, why in bad:
        counts.setdefault(why, []).append(node)
    for why, nodes in counts.items():
        terminalreporter.write_line(f"{len(nodes)} skipped: {why}  (first: {nodes[0]})", red=True)
    terminalreporter.write_line(f"ARCFLOW_STRICT_SKIPS: {len(bad)} skips with an unexpected reason: the session "
                                "fails (the allowed reasons are in tests/strict_skips.py)", red=True)
