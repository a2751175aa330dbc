"""The C++ ops behind the invertible blocks (conv2d, inference batch-norm, ReLU, psi) against NumPy oracles.

The conv2d tests run under every micro-kernel level the CPU runs (fixture ``conv2d_isa``), forced through
``_core._set_conv2d_isa``; the ARCFLOW_ISA / _set_conv2d_isa contract itself is tested at the end."""
import os
import subprocess
import sys

import numpy as np
import pytest

from arcflow import _core
from arcflow.invertible import _ops

from _helpers.invertible import conv2d_oracle  # direct float64 cross-correlation (conv2d_isa: conftest.py)

TOL = {np.float32: 2e-5, np.float64: 1e-12}


def conv2d_loop(x, w, stride, padding):
    """The definition, one output element at a time (tiny inputs only)."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (wd + 2 * padding - kw) // stride + 1
    y = np.zeros((n, o, ho, wo))
    for a in range(n):
        for oc in range(o):
            for i in range(ho):
                for j in range(wo):
                    s = 0.0
                    for ci in range(c):
                        for u in range(kh):
                            for v in range(kw):
                                yy, xx = i * stride + u - padding, j * stride + v - padding
                                if 0 <= yy < h and 0 <= xx < wd:
                                    s += float(x[a, ci, yy, xx]) * float(w[oc, ci, u, v])
                    y[a, oc, i, j] = s
    return y


def psi_oracle(x, b):
    """docs/mathematics.md §2: psi(x)[n, (dy*b + dx)*C + c, i, j] = x[n, c, i*b + dy, j*b + dx], element by element."""
    n, c, h, w = x.shape
    y = np.empty((n, b * b * c, h // b, w // b), x.dtype)
    for dy in range(b):
        for dx in range(b):
            for ci in range(c):
                for i in range(h // b):
                    for j in range(w // b):
                        y[:, (dy * b + dx) * c + ci, i, j] = x[:, ci, i * b + dy, j * b + dx]
    return y


CONV_CASES = [
    # n, c, h, w, o, k, stride, padding
    (2, 3, 8, 8, 5, 3, 1, 1),
    (1, 1, 1, 1, 1, 1, 1, 0),
    (1, 2, 1, 1, 3, 3, 1, 1),
    (3, 7, 9, 11, 6, 3, 2, 1),
    (2, 4, 7, 5, 9, 1, 1, 0),
    (1, 5, 6, 6, 3, 3, 2, 0),
    (2, 2, 5, 7, 3, 2, 3, 2),
    (1, 16, 32, 32, 64, 3, 1, 1),
    (4, 12, 16, 16, 7, 3, 2, 1),
    (2, 6, 8, 8, 6, 1, 2, 0),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_oracle(case, dtype, conv2d_isa):
    n, c, h, w, o, k, s, p = case
    rng = np.random.default_rng(hash(case) % 2**32)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((o, c, k, k)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    ref = conv2d_oracle(x, wt, b, s, p)
    y = _ops.conv2d(x, wt, b, s, p)
    assert y.dtype == dtype and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=0, atol=TOL[dtype] * np.abs(ref).max() * 4)
    y0 = _ops.conv2d(x, wt, stride=s, padding=p)
    np.testing.assert_allclose(y0, ref - b[None, :, None, None], rtol=0, atol=TOL[dtype] * np.abs(ref).max() * 4)


def test_conv2d_matches_definition_loop(conv2d_isa):
    rng = np.random.default_rng(3)
    for (s, p, k) in [(1, 1, 3), (2, 1, 3), (2, 0, 1), (1, 0, 2)]:
        x = rng.standard_normal((2, 3, 5, 6))
        w = rng.standard_normal((4, 3, k, k))
        np.testing.assert_allclose(_ops.conv2d(x, w, None, s, p), conv2d_loop(x, w, s, p), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_fused_bn_relu_and_accumulate(dtype, stride, conv2d_isa):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 6, 10, 8)).astype(dtype)
    w = rng.standard_normal((5, 6, 3, 3)).astype(dtype)
    sc = rng.uniform(0.5, 2, 6).astype(dtype)
    sf = rng.standard_normal(6).astype(dtype)
    act = np.maximum(x.astype(np.float64) * sc[None, :, None, None] + sf[None, :, None, None], 0)
    ref = conv2d_oracle(act, w, None, stride, 1)  # zero padding of the *activated* tensor
    y = _ops.conv2d(x, w, None, stride, 1, in_scale=sc, in_shift=sf, in_relu=True)
    tol = TOL[dtype] * np.abs(ref).max() * 4
    np.testing.assert_allclose(y, ref, rtol=0, atol=tol)
    lin = conv2d_oracle(x.astype(np.float64) * sc[None, :, None, None] + sf[None, :, None, None], w, None, stride, 1)
    np.testing.assert_allclose(_ops.conv2d(x, w, None, stride, 1, in_scale=sc, in_shift=sf), lin, rtol=0, atol=tol)
    np.testing.assert_allclose(_ops.conv2d(x, w, None, stride, 1, in_relu=True),
                               conv2d_oracle(np.maximum(x, 0), w, None, stride, 1), rtol=0, atol=tol)
    base = rng.standard_normal(ref.shape).astype(dtype)
    out = base.copy()
    b = rng.standard_normal(5).astype(dtype)
    _ops.conv2d(x, w, b, stride, 1, out=out, accumulate=True, alpha=-0.5, in_scale=sc, in_shift=sf, in_relu=True)
    np.testing.assert_allclose(out, base - 0.5 * ref + b[None, :, None, None], rtol=0, atol=tol)
    out2 = np.empty_like(base)
    _ops.conv2d(x, w, b, stride, 1, out=out2, addend=base, alpha=-0.5, in_scale=sc, in_shift=sf, in_relu=True)
    np.testing.assert_array_equal(out2, out)  # addend= and accumulate= round the same sum
    with pytest.raises(ValueError, match="addend"):
        _ops.conv2d(x, w, b, stride, 1, out=out2, addend=base[:1])


def test_conv2d_noncontiguous_and_dtypes():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 8, 12, 14))[:, ::2, :, ::2]  # non-contiguous float64 view
    w = rng.standard_normal((3, 4, 3, 3))
    ref = conv2d_oracle(x, w, None, 1, 1)
    y = _ops.conv2d(x, w, padding=1)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    y32 = _ops.conv2d(x.astype(np.float32), w, padding=1)  # float32 input decides, weights are cast
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    xf = np.asfortranarray(x.astype(np.float32))
    np.testing.assert_allclose(_ops.conv2d(xf, w, padding=1), y32, rtol=0, atol=1e-6)
    yi = _ops.conv2d(np.ones((1, 1, 3, 3), np.int64), np.ones((1, 1, 3, 3)), padding=1)
    assert yi.dtype == np.float64 and yi[0, 0, 1, 1] == 9.0 and yi[0, 0, 0, 0] == 4.0


def test_conv2d_batch_not_multiple_of_threads():
    # n = 1, 3, 5 take the pixel-tile-parallel path or uneven image split; results must not depend on it
    rng = np.random.default_rng(11)
    w = rng.standard_normal((8, 32, 3, 3))
    x = rng.standard_normal((5, 32, 40, 40))
    full = _ops.conv2d(x, w, padding=1)
    for n in (1, 3):
        np.testing.assert_array_equal(_ops.conv2d(x[:n], w, padding=1), full[:n])
    for t in (1, 2, 3):  # the thread count changes the split, never the numbers
        np.testing.assert_array_equal(_ops.conv2d(x, w, padding=1, threads=t), full)
        np.testing.assert_array_equal(_ops.conv2d(x[:1], w, padding=1, threads=t), full[:1])
        np.testing.assert_array_equal(_ops.psi(x, 2, threads=t), _ops.psi(x, 2))
    with pytest.raises(ValueError, match="threads"):
        _ops.conv2d(x, w, threads=0)


def test_conv2d_errors():
    x = np.zeros((1, 3, 8, 8), np.float32)
    w = np.zeros((4, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="input channels"):
        _ops.conv2d(x, np.zeros((4, 2, 3, 3)))
    with pytest.raises(ValueError, match="4 dimensions"):
        _ops.conv2d(x[0], w)
    with pytest.raises(ValueError, match="4 dimensions"):
        _ops.conv2d(x, w[0])
    with pytest.raises(ValueError, match="NaN or Inf"):
        _ops.conv2d(np.full_like(x, np.nan), w)
    with pytest.raises(ValueError, match="NaN or Inf"):
        _ops.conv2d(x, np.full_like(w, np.inf))
    with pytest.raises(ValueError, match="larger than the padded input"):
        _ops.conv2d(np.zeros((1, 3, 2, 2)), w)
    with pytest.raises(ValueError, match="stride"):
        _ops.conv2d(x, w, stride=0)
    with pytest.raises(ValueError, match="bias"):
        _ops.conv2d(x, w, np.zeros(3))
    with pytest.raises(ValueError, match="out must"):
        _ops.conv2d(x, w, out=np.zeros((1, 4, 6, 5), np.float32))
    with pytest.raises(ValueError, match="accumulate"):
        _ops.conv2d(x, w, accumulate=True)
    with pytest.raises(TypeError):
        _ops.conv2d(x.astype(complex), w)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,b", [((2, 3, 4, 6), 2), ((1, 1, 2, 2), 2), ((3, 5, 6, 9), 3), ((2, 4, 8, 8), 4),
                                     ((1, 2, 3, 3), 1)])
def test_psi_matches_spec_formula_and_inverts_exactly(shape, b, dtype):
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    y = _ops.psi(x, b)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, psi_oracle(x, b))
    np.testing.assert_array_equal(_ops.psi_inverse(y, b), x)


def test_psi_is_not_pixel_unshuffle_order():
    x = np.arange(2 * 4 * 4, dtype=np.float64).reshape(1, 2, 4, 4)
    y = _ops.psi(x, 2)
    # pixel_unshuffle / FrEIA order: channel c*b*b + dy*b + dx
    unshuffle = x.reshape(1, 2, 2, 2, 2, 2).transpose(0, 1, 3, 5, 2, 4).reshape(1, 8, 2, 2)
    assert np.isfinite(y).all() and np.abs(y - unshuffle).max() >= 1  # integer-valued: 1 is a real difference
    reorder = [(dy * 2 + dx) * 2 + c for c in range(2) for dy in range(2) for dx in range(2)]
    np.testing.assert_array_equal(y[:, reorder], unshuffle)


def test_psi_noncontiguous_and_errors():
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 12))[:, :, :, ::2]
    np.testing.assert_array_equal(_ops.psi(x, 2), psi_oracle(np.ascontiguousarray(x), 2))
    with pytest.raises(ValueError, match="divisible by 2"):
        _ops.psi(np.zeros((1, 1, 3, 4)), 2)
    with pytest.raises(ValueError, match="divisible by 2"):
        _ops.psi(np.zeros((1, 4, 4)), 2)
    with pytest.raises(ValueError, match=r"C\*4"):
        _ops.psi_inverse(np.zeros((1, 6, 2, 2)), 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batchnorm_inference_and_relu(dtype):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 5, 7, 2)).astype(dtype)
    g, bb, mu, var = rng.uniform(0.5, 2, 5), rng.standard_normal(5), rng.standard_normal(5), rng.uniform(0.2, 3, 5)
    sc, sf = _ops.batchnorm_scale_shift(g, bb, mu, var, 1e-5)
    ref = (x.astype(np.float64) - mu[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5) \
        * g[None, :, None, None] + bb[None, :, None, None]
    y = _ops.batchnorm_inference(x, sc, sf)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, ref, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    np.testing.assert_allclose(_ops.batchnorm_inference(x, sc, sf, relu=True), np.maximum(ref, 0),
                               rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    sc0, sf0 = _ops.batchnorm_scale_shift(None, None, mu, var)
    np.testing.assert_allclose(sc0, 1 / np.sqrt(var + 1e-5))
    r = _ops.relu(np.array([-1.0, 0.0, 2.0, np.nan], dtype))
    assert r.dtype == dtype
    np.testing.assert_array_equal(r[:3], [0, 0, 2])
    assert np.isnan(r[3])
    with pytest.raises(ValueError, match="scale and shift"):
        _ops.batchnorm_inference(x, sc[:4], sf[:4])


# ---- the instruction-set switch: ARCFLOW_ISA and _core._set_conv2d_isa ----------------------------------------

def _cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (an oracle independent of arcflow's own checks)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_conv2d_isa_levels_follow_the_cpu():
    levels = _core._conv2d_isa_levels()
    assert levels[0] == "generic"
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to compare with")
    assert ("avx2" in levels) == ({"avx2", "fma"} <= flags)
    assert ("avx512" in levels) == ({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags)


def test_set_conv2d_isa_contract():
    levels = _core._conv2d_isa_levels()
    best = "avx2" if "avx2" in levels else "generic"
    # "auto" is the best level under the environment's cap (CI runs this module with ARCFLOW_ISA=generic too)
    auto = "generic" if os.environ.get("ARCFLOW_ISA") == "generic" else best
    try:
        for bad in ("sse2", "AVX2", "", "native"):
            with pytest.raises(ValueError, match="expected auto, generic, avx2 or avx512"):
                _core._set_conv2d_isa(bad)
        for name in ("avx2", "avx512"):
            if name in levels:
                _core._set_conv2d_isa(name)
                assert _core._conv2d_isa() == "avx2"  # avx512: conv2d's best is its avx2 kernel
            else:
                with pytest.raises(ValueError, match=f"this CPU cannot run {name}"):
                    _core._set_conv2d_isa(name)
        _core._set_conv2d_isa("generic")
        assert _core._conv2d_isa() == "generic"
    finally:
        _core._set_conv2d_isa("auto")
    assert _core._conv2d_isa() == auto


def _run_with_isa(value):
    env = dict(os.environ)
    env["ARCFLOW_ISA"] = value
    code = ("import numpy as np; from arcflow import _core; from arcflow.invertible import _ops\n"
            "try:\n    _ops.conv2d(np.ones((1, 2, 5, 5)), np.ones((3, 2, 3, 3)))\n"
            "except ValueError as e:\n    print('ValueError:', e)\nelse:\n    print(_core._conv2d_isa())\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_arcflow_isa_environment_variable_caps_the_level():
    best = "avx2" if "avx2" in _core._conv2d_isa_levels() else "generic"
    assert _run_with_isa("generic") == "generic"
    assert _run_with_isa("avx2") == best        # a cap: a CPU without AVX2 stays generic
    assert _run_with_isa("avx512") == best
    assert _run_with_isa("auto") == best
    assert _run_with_isa("") == best
    out = _run_with_isa("avx3")
    assert out.startswith("ValueError:") and "ARCFLOW_ISA must be auto, generic, avx2 or avx512, got 'avx3'" in out
