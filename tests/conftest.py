"""Fixtures and hooks shared by every test module: the strict-skip plugin, the report header, the 50-digit
oracle (``mp_oracle``), the two layer-loop layouts of the fused kernel (``fc_layout``) and the conv2d
micro-kernel levels (``conv2d_isa``). Shared constants and oracles live in the ``_helpers`` package."""
from __future__ import annotations

import os

import pytest

import strict_skips
from _helpers.invertible import conv2d_levels
from _helpers.mp_oracle import mp_kernels


def pytest_configure(config):
    config.pluginmanager.register(strict_skips, "arcflow_strict_skips")


def pytest_report_header(config):
    """The build and the instruction-set level the compiled kernels run at (ARCFLOW_ISA caps it)."""
    import arcflow
    from arcflow import _core

    isa = _core._fc_isa() if hasattr(_core, "_fc_isa") else "not reported by this build"
    levels = _core._isa_levels() if hasattr(_core, "_isa_levels") else "not reported by this build"
    return [f"arcflow {arcflow.__version__} from {os.path.dirname(arcflow.__file__)}: {arcflow.build_info()}",
            f"arcflow kernels ISA: {isa} (ARCFLOW_ISA={os.environ.get('ARCFLOW_ISA', 'unset')}; "
            f"levels this CPU runs: {levels})"]


@pytest.fixture(scope="session")
def mp_oracle():
    """The 50-digit recursion :func:`mp_kernels` (mpmath is a test dependency: no skip without it)."""
    return mp_kernels


@pytest.fixture(params=[0, 1], ids=["three-loops", "fused"])
def fc_layout(request):
    """Runs a test with each layout of the CPU kernel's layer loops (fc_kernel.cpp, run_tile): three loops
    with the arctangent angle, and one fused loop with the division-free arcsine (the default on AVX-512
    CPUs). Both are compiled into every build, so both are tested on any CPU."""
    from arcflow import _core

    prev = _core._set_fc_layout(request.param)
    yield request.param
    _core._set_fc_layout(prev)


@pytest.fixture(params=conv2d_levels())
def conv2d_isa(request):
    """Run the test with conv2d forced to one micro-kernel level ("generic" always, "avx2" where the CPU has
    it), then restore the automatic choice: every conv2d kernel is compared with the oracle on any CPU."""
    from arcflow import _core

    _core._set_conv2d_isa(request.param)
    try:
        assert _core._conv2d_isa() == request.param
        yield request.param
    finally:
        _core._set_conv2d_isa("auto")
