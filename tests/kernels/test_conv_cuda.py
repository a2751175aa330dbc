"""The CUDA engine of the convolutional kernels (cpp/src/cuda/conv_kernel.cu) against the CPU engine.

Without a GPU the kernel's logic runs in a host emulation (tests/kernels/conv_cuda_emulation.cpp, built with
g++: one OS thread per CUDA thread, blocks one after another) against the CPU engine, and the public API's
device='cuda' error paths are checked; with a GPU the public API on both devices is compared (1e-12 relative in
float64, 1e-5 in float32, relative to the largest |entry|), the GPU tests skipping with the reason otherwise.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from arcflow import _core, _cuda, stax
from _helpers.kernels import assert_close

HAVE_GPU = _cuda.available()
_WHY = "" if HAVE_GPU else ("arcflow was built without CUDA" if not _cuda.built()
                            else f"no CUDA device usable ({_cuda.status()})")
ROOT = Path(__file__).resolve().parents[2]


# ---- without a GPU: the kernel's logic in a host emulation ----------------------------------------------------

@pytest.mark.slow
def test_conv_kernel_logic_in_host_emulation(tmp_path):
    """Every activation, SAME / VALID / CIRCULAR convs, AvgPool with strides, both readouts, a fully-connected
    network, symmetric and not, float32 and float64, grids and blocks smaller than the work, images with identical
    patches, and the overflow report of the self pass: the emulated CUDA engine equals the CPU engine."""
    src = ROOT / "tests" / "kernels" / "conv_cuda_emulation.cpp"
    engines = [ROOT / "cpp" / "src" / "cpu" / f for f in ("conv_kernel.cpp", "fc_kernel.cpp")]
    if not (ROOT / "cpp" / "src" / "cuda" / "conv_tile.cuh").exists() or not all(e.exists() for e in engines):
        pytest.skip("the C++ sources are not in this checkout")
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the host emulation")
    probe = tmp_path / "probe.cpp"
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    if subprocess.run([cxx, "-std=c++20", str(probe), "-o", str(tmp_path / "probe"), "-lpthread"],
                      capture_output=True).returncode != 0:
        pytest.skip("g++ has no C++20 <barrier>")
    flags = ["-std=c++20", "-O1", "-ffp-contract=off", "-Wno-unknown-pragmas", f"-I{ROOT / 'cpp' / 'include'}"]
    objs, procs = [], []
    for f in [src, *engines]:  # three translation units compiled in parallel
        obj = tmp_path / (f.stem + ".o")
        objs.append(str(obj))
        procs.append(subprocess.Popen([cxx, *flags, "-c", str(f), "-o", str(obj)], stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-4000:]
    exe = tmp_path / "conv_cuda_emulation"
    link = subprocess.run([cxx, *objs, "-o", str(exe), "-lpthread"], capture_output=True, text=True)
    assert link.returncode == 0, link.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert run.stdout.strip().startswith("worst f64"), run.stdout


def _net(readout):
    return stax.serial(stax.Conv(4, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), stax.Relu(),
                       stax.Conv(4, (3, 3), padding="CIRCULAR", W_std=1.2), stax.Erf(),
                       *([stax.AvgPool((2, 2), padding="SAME")] if readout == "pool" else []),
                       stax.GlobalAvgPool() if readout == "gap" else stax.Flatten(),
                       stax.Dense(1, W_std=1.5, b_std=0.2))


@pytest.mark.skipif(HAVE_GPU, reason="a CUDA device is present: the error path is not reachable")
def test_device_cuda_without_gpu_is_a_clear_error():
    x = np.random.default_rng(0).normal(size=(3, 5, 5, 2))
    with pytest.raises(RuntimeError, match="device='cuda' but"):
        _net("gap")(x, device="cuda")
    with pytest.raises(RuntimeError, match="device='cuda' but"):
        _net("gap").diag(x, device="cuda")
    # "auto" stays on the CPU and equals device="cpu" there
    np.testing.assert_array_equal(_net("gap")(x, get="ntk"), _net("gap")(x, get="ntk", device="cpu"))


def test_bad_device_is_a_value_error():
    x = np.random.default_rng(0).normal(size=(3, 5, 5, 2))
    with pytest.raises(ValueError, match="device must be one of"):
        _net("gap")(x, device="gpu")


def test_cuda_engine_classes_exist_only_in_cuda_builds():
    assert hasattr(_core, "ConvEngineCudaF64") == _cuda.built()
    assert hasattr(_core, "ConvEngineCudaF32") == _cuda.built()


# ---- on a GPU: the same numbers as the CPU engine -------------------------------------------------------------

def _images(n, h, w, c, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, h, w, c))
    if n >= 3:
        x[1] = x[0]                       # identical images: every patch pair identical
        x[2] = np.roll(x[0], 1, axis=2)   # shifted: identical patches at different positions
    return x


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_GPU, reason=_WHY or "CUDA available")
@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=("float32", "float64"))
@pytest.mark.parametrize("readout", ("gap", "flatten", "pool"))
@pytest.mark.parametrize("symmetric", (True, False), ids=("sym", "x1x2"))
def test_gpu_matches_cpu(readout, symmetric, dtype):
    x1 = _images(37, 8, 7, 3, 1).astype(dtype)
    x2 = None if symmetric else _images(29, 8, 7, 3, 2).astype(dtype)
    kfn = _net(readout)
    cpu = kfn(x1, x2, device="cpu")
    gpu = kfn(x1, x2, device="cuda")
    for f in ("nngp", "ntk"):
        assert_close(getattr(gpu, f), getattr(cpu, f), dtype, f"{readout} {f}")
    if symmetric:
        np.testing.assert_array_equal(gpu.nngp, gpu.nngp.T)
    d_cpu, d_gpu = kfn.diag(x1, device="cpu"), kfn.diag(x1, device="cuda")
    for f in ("nngp", "ntk"):
        assert_close(getattr(d_gpu, f), getattr(d_cpu, f), dtype, f"{readout} diag {f}")


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_GPU, reason=_WHY or "CUDA available")
def test_gpu_out_memmap_and_overflow(tmp_path):
    x = _images(20, 6, 6, 2, 3)
    kfn = _net("gap")
    out = np.lib.format.open_memmap(tmp_path / "k.npy", mode="w+", dtype=np.float64, shape=(20, 20))
    kfn(x, get="nngp", out=out, device="cuda")
    assert_close(np.asarray(out), kfn(x, get="nngp", device="cpu"), np.float64, "out=")
    big = stax.serial(stax.Conv(1, (3, 3), padding="SAME"), stax.RectifiedMonomial(3),
                      stax.Conv(1, (3, 3), padding="SAME"), stax.RectifiedMonomial(3), stax.GlobalAvgPool())
    with pytest.raises(FloatingPointError) as on_cpu:
        big(x * 1e110, device="cpu")
    with pytest.raises(FloatingPointError) as on_gpu:
        big(x * 1e110, device="cuda")
    assert str(on_gpu.value) == str(on_cpu.value)
