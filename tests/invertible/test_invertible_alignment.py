"""Arrays at addresses that are not a multiple of their element size: the C++ ops load and store whole
elements and vectors (undefined behaviour on such a buffer), so the bindings refuse them and the Python
wrappers copy them first; results equal those of the aligned copy. Also: conv2d.cpp compiles without
-Warray-bounds warnings in the sanitizer configuration (-O2 -fsanitize=undefined)."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from arcflow import _core
from arcflow.invertible import ActNorm, AffineCoupling, IRevNet, IRevNetBlock, InvertibleConv1x1, SpaceToDepth
from arcflow.invertible import _ops
from _helpers.invertible import conv2d_oracle, psi_np

ROOT = Path(__file__).resolve().parents[2]


def misaligned(a):
    """A copy of a whose data starts one byte past an aligned address (flags.aligned is False)."""
    a = np.asarray(a)
    buf = np.zeros(a.nbytes + a.itemsize, np.uint8)
    out = np.ndarray(a.shape, a.dtype, buffer=buf, offset=1)
    out[...] = a
    assert not out.flags.aligned and out.flags.c_contiguous
    return out


@pytest.mark.parametrize("sfx,dt", [("f32", np.float32), ("f64", np.float64)])
def test_bindings_refuse_misaligned_arrays(sfx, dt):
    x = np.arange(2 * 3 * 4 * 4, dtype=dt).reshape(2, 3, 4, 4)
    out = np.empty((2, 12, 2, 2), dt)
    with pytest.raises(ValueError, match="psi input is not aligned"):
        getattr(_core, "psi_cpu_" + sfx)(misaligned(x), 2, out, 1)
    with pytest.raises(ValueError, match="psi output is not aligned"):
        getattr(_core, "psi_cpu_" + sfx)(x, 2, misaligned(out), 1)
    with pytest.raises(ValueError, match="psi_inverse input is not aligned"):
        getattr(_core, "psi_inverse_cpu_" + sfx)(misaligned(out), 2, np.empty_like(x), 1)
    w = np.ones((5, 3, 3, 3), dt)
    y = np.empty((2, 5, 4, 4), dt)
    conv = getattr(_core, "conv2d_cpu_" + sfx)
    with pytest.raises(ValueError, match="conv2d input is not aligned"):
        conv(misaligned(x), w, None, 1, 1, None, None, False, 1.0, False, None, y, 1)
    with pytest.raises(ValueError, match="conv2d weight is not aligned"):
        conv(x, misaligned(w), None, 1, 1, None, None, False, 1.0, False, None, y, 1)
    with pytest.raises(ValueError, match="conv2d bias is not aligned"):
        conv(x, w, misaligned(np.ones(5, dt)), 1, 1, None, None, False, 1.0, False, None, y, 1)
    with pytest.raises(ValueError, match="conv2d addend is not aligned"):
        conv(x, w, None, 1, 1, None, None, False, 1.0, False, misaligned(y), y, 1)
    with pytest.raises(ValueError, match="conv2d output is not aligned"):
        conv(x, w, None, 1, 1, None, None, False, 1.0, False, None, misaligned(y), 1)
    with pytest.raises(ValueError, match="channel_affine input is not aligned"):
        getattr(_core, "channel_affine_cpu_" + sfx)(misaligned(x), np.ones(3, dt), np.zeros(3, dt), False,
                                                   np.empty_like(x), 1)
    with pytest.raises(ValueError, match="relu output is not aligned"):
        getattr(_core, "relu_cpu_" + sfx)(x.reshape(-1), misaligned(x.reshape(-1)), 1)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_wrappers_copy_misaligned_inputs(dt):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 6, 6)).astype(dt)
    w = rng.standard_normal((3, 4, 3, 3)).astype(dt)
    b = rng.standard_normal(3).astype(dt)
    np.testing.assert_array_equal(_ops.psi(misaligned(x)), psi_np(x))
    np.testing.assert_array_equal(_ops.psi_inverse(misaligned(psi_np(x))), x)
    np.testing.assert_array_equal(SpaceToDepth(2).forward(misaligned(x)), psi_np(x))
    got = _ops.conv2d(misaligned(x), misaligned(w), misaligned(b), 1, 1)
    np.testing.assert_allclose(got, conv2d_oracle(x.astype(np.float64), w.astype(np.float64),
                                                  b.astype(np.float64), 1, 1), rtol=1e-5, atol=1e-5)
    add = rng.standard_normal(got.shape).astype(dt)
    np.testing.assert_array_equal(_ops.conv2d(x, w, b, 1, 1, addend=misaligned(add)),
                                  _ops.conv2d(x, w, b, 1, 1, addend=add))
    with pytest.raises(ValueError, match="out must be a writeable, aligned"):
        _ops.conv2d(x, w, b, 1, 1, out=misaligned(np.empty_like(got)))
    s = np.ones(4, dt)
    np.testing.assert_array_equal(_ops.batchnorm_inference(misaligned(x), misaligned(s), misaligned(s)),
                                  x * s[:, None, None] + s[:, None, None])
    np.testing.assert_array_equal(_ops.relu(misaligned(x)), np.maximum(x, 0))


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_blocks_accept_misaligned_inputs(dt):
    rng = np.random.default_rng(1)
    blk = IRevNetBlock(8, 16, stride=2, rng=0, dtype=dt)
    x = rng.standard_normal((2, 8, 6, 6)).astype(dt)
    y = blk.forward(x)
    np.testing.assert_array_equal(blk.forward(misaligned(x)), y)
    np.testing.assert_array_equal(blk.forward((misaligned(x[:, :4]), misaligned(x[:, 4:])))[1], y[:, 16:])
    np.testing.assert_array_equal(blk.inverse(misaligned(y)), blk.inverse(y))
    net = IRevNet([1, 1], [1, 2], [8, 32], init_ds=0, in_shape=(4, 8, 8), n_classes=3, rng=0, dtype=dt)
    xn = rng.standard_normal((3, 4, 8, 8)).astype(dt)
    z = net.forward(xn)
    np.testing.assert_array_equal(net.forward(misaligned(xn), threads=2), z)
    np.testing.assert_array_equal(net.inverse(misaligned(z)), net.inverse(z))
    for flow in (AffineCoupling(4, hidden=5, rng=0, zero_init=False), InvertibleConv1x1(4, rng=0), ActNorm(4)):
        xf = rng.standard_normal((2, 4, 3, 3)).astype(dt)
        yf = flow.forward(xf)
        np.testing.assert_array_equal(flow.forward(misaligned(xf)), yf)
        np.testing.assert_array_equal(flow.inverse(misaligned(yf)), flow.inverse(yf))


def test_conv2d_compiles_without_array_bounds_warnings(tmp_path):
    """GCC's -Warray-bounds, which the sanitizer build (-O2 -fsanitize=undefined) turns on through its
    middle-end, once flagged the micro-kernel's reload of its partial sums (conv2d_kernel.inc)."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to compile conv2d.cpp")
    cmd = [cxx, "-std=c++17", "-O2", "-fsanitize=undefined", "-fPIC", "-Wall", "-Warray-bounds",
           "-Werror=array-bounds", "-Wno-unknown-pragmas", "-fopenmp", "-DARCFLOW_HAVE_OPENMP=1",
           f"-I{ROOT / 'cpp' / 'include'}", "-c", str(ROOT / "cpp" / "src" / "cpu" / "conv2d.cpp"),
           "-o", str(tmp_path / "conv2d.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr[-4000:]
