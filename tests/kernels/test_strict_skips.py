"""tests/strict_skips.py, the ARCFLOW_STRICT_SKIPS=1 check that CI runs with: pytest runs on small test files in
a subprocess and must fail exactly when a skip's reason is not an expected one."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


import strict_skips

TESTS = Path(__file__).resolve().parents[1]

CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import strict_skips

def pytest_configure(config):
    config.pluginmanager.register(strict_skips, "arcflow_strict_skips")
"""

EXPECTED_ONLY = """
import pytest

@pytest.mark.skipif(True, reason="arcflow was built without CUDA")
def test_gpu():
    pass

def test_live_nt():
    pytest.skip("could not import 'jax': No module named 'jax'")   # as importorskip says it

@pytest.mark.xfail(reason="an xfail is not a skip", strict=True)
def test_xfail():
    assert False

def test_runs():
    pass
"""

NO_GXX = """
import pytest

def test_emulation():
    pytest.skip("no g++ to build the host emulation")

@pytest.mark.skipif(True, reason="arcflow was built without CUDA")
def test_gpu():
    pass
"""

MODULE_SKIP = """
import pytest
pytest.skip("arcflow.kernels is not implemented yet", allow_module_level=True)

def test_never():
    pass
"""


def _run(tmp_path, files, strict=True, extra_allowed=None):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items()
           if k not in ("ARCFLOW_STRICT_SKIPS", "ARCFLOW_ALLOWED_SKIPS", "PYTEST_ADDOPTS")}
    if strict:
        env["ARCFLOW_STRICT_SKIPS"] = "1"
    if extra_allowed:
        env["ARCFLOW_ALLOWED_SKIPS"] = extra_allowed
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return run.returncode, run.stdout + run.stderr


def test_expected_skips_pass(tmp_path):
    rc, out = _run(tmp_path, {"test_a.py": EXPECTED_ONLY})
    assert rc == 0, out
    assert "all 2 skips have an expected reason" in out, out


def test_a_missing_compiler_fails_the_session(tmp_path):
    rc, out = _run(tmp_path, {"test_a.py": NO_GXX})
    assert rc == 1, out
    assert "no g++ to build the host emulation" in out and "1 skips with an unexpected reason" in out, out
    assert "1 passed" not in out          # the skip is the only cause: nothing failed


def test_a_module_level_skip_fails_the_session(tmp_path):
    rc, out = _run(tmp_path, {"test_a.py": EXPECTED_ONLY, "test_b.py": MODULE_SKIP})
    assert rc == 1, out
    assert "arcflow.kernels is not implemented yet" in out, out


def test_without_the_variable_skips_do_not_fail(tmp_path):
    rc, out = _run(tmp_path, {"test_a.py": NO_GXX}, strict=False)
    assert rc == 0, out
    assert "unexpected" not in out


def test_extra_allowed_reasons(tmp_path):
    rc, out = _run(tmp_path, {"test_a.py": NO_GXX}, extra_allowed="something else\nno g\\+\\+ to build .*")
    assert rc == 0, out


def test_the_suites_reasons_are_classified():
    """The reasons the suite's own skips give where there is no GPU, jax or torch are all allowed; the ones of
    a broken optional path are not."""
    allowed = [re.compile(p) for p in strict_skips.ALLOWED]
    for why in ("arcflow was built without CUDA", "no CUDA device usable (cudaErrorNoDevice)",
                "could not import 'jax': No module named 'jax'",
                "could not import 'torch': No module named 'torch'"):
        assert any(p.fullmatch(why) for p in allowed), why
    for why in ("no g++ to build the host emulation", "g++ has no C++20 <barrier>",
                "could not import 'mpmath': No module named 'mpmath'", "CuPy is not installed",
                "arcflow was built without the CUDA invertible ops", "the C++ sources are not in this checkout"):
        assert not any(p.fullmatch(why) for p in allowed), why
