"""The invertible blocks on the GPU (CuPy arrays) against the CPU backend and NumPy oracles.

Layers, so that most of it runs without a GPU:
1. host emulation: tests/invertible/invertible_cuda_emulation.cpp runs the CUDA kernels' tile and element logic
   (cpp/src/cuda/invertible_tile.cuh) on the CPU against the CPU ops (g++; runs everywhere);
2. orchestration: the blocks' algorithms (irevnet.py, flows.py) on a device provider (what they do with device
   arrays), with NumPy twins of the CUDA provider _cuda_ops._CudaOps
   runs with a NumPy twin of its kernel launcher built on the CPU ops, against the CPU path of the blocks;
3a. on a GPU without CuPy: the real kernels on host copies (cuda_buffer_* bindings), as the blocks' provider;
3b. on a GPU with CuPy: every op, block and the full CIFAR-10 i-RevNet on CuPy arrays against the CPU NumPy path;
3c/3d. without a GPU, the tests of 3a and 3b themselves run on the emulated kernels (the emulation built as a
   shared library in place of the _core CUDA launchers) and, for 3b, on a NumPy stand-in for CuPy: so the hooks,
   _CudaOps's calls and the tests' own logic are exercised here, and only CuPy, the bindings' lambdas and the
   kernels' launch lines are left to a real GPU.
Tolerances: float32 1e-5, float64 1e-12, relative (GPU tests skip with the reason where they cannot run).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from arcflow import _core, _cuda
from arcflow.invertible import (ActNorm, AffineCoupling, InjectivePad, IRevNet, IRevNetBlock, InvertibleConv1x1,
                                Sequential, SpaceToDepth, _cuda_ops, _ops, _providers)
from arcflow.invertible._backend import DeviceOps
from arcflow.invertible.flows import soft_clamp
from _helpers.invertible import BLOCK_CASES, assert_differs, randomize_bn  # the CPU tests' block cases and helpers


def _gpu_skip_reason() -> str:
    if not _cuda.built():
        return "arcflow was built without CUDA"
    if not getattr(_core, "built_with_cuda_invertible", False):
        return "arcflow was built without the CUDA invertible ops"
    if not _cuda.available():
        return f"no CUDA device usable ({_cuda.status()})"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed"
    return ""


_WHY = _gpu_skip_reason()
gpu = pytest.mark.skipif(bool(_WHY), reason=_WHY or "GPU available")
REL = {np.float32: 1e-5, np.float64: 1e-12}
DTYPES = (np.float32, np.float64)


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def max_rel(a, b) -> float:
    """Largest error relative to the largest |entry| of b (the CPU-vs-CUDA measure of test_cuda.py)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def random_block(case, dtype):
    """An IRevNetBlock of one BLOCK_CASES case with randomized BN, and an input batch of 2 for it."""
    in_ch, out_ch, stride, first, mult, affine, h = case
    rng = np.random.default_rng(sum(case[:3]) + h)
    blk = IRevNetBlock(in_ch, out_ch, stride, first, mult, affine, rng=rng, dtype=dtype)
    randomize_bn(blk, rng)
    return blk, rng.standard_normal((2, in_ch, h, h)).astype(dtype)


def small_net(dtype, rng=0):
    return IRevNet([2, 2, 2], [1, 2, 2], [16, 64, 256], init_ds=0, in_shape=(3, 16, 16), mult=4, n_classes=10,
                   rng=rng, dtype=dtype)


def flow_blocks(c=6, seed=0):
    return {
        "actnorm": ActNorm(c),
        "conv1x1_lu": InvertibleConv1x1(c, rng=seed),
        "conv1x1_free": InvertibleConv1x1(c, lu=False, rng=seed + 1),
        "coupling": AffineCoupling(c, hidden=12, rng=seed + 2, zero_init=False),
        "coupling_noclamp": AffineCoupling(c + 1, hidden=8, clamp=0.0, rng=seed + 3, zero_init=False),
    }


# ---- 1. the kernels' logic in a host emulation (no GPU needed) -------------------------------------------------

def test_invertible_kernels_in_host_emulation(tmp_path):
    """tests/invertible/invertible_cuda_emulation.cpp: the convolution tile (load | sync | multiply-add | sync |
    store, every
    thread of every block), psi, channel affine, ActNorm, affine coupling and channel copy, against conv2d_cpu
    (every fused option, 3x3 / 1x1, stride 1 / 2, ragged tiles), channel_affine_cpu, psi_*_cpu and the flow
    formulas. Tolerance 1e-5 (float32) and 1e-12 (float64) relative to the largest entry for the convolution
    (it sums in the CPU op's tap order, so today it even matches bit for bit); the rest is exact or 1e-5 / 1e-12."""
    root = Path(__file__).resolve().parents[2]
    src = root / "tests" / "invertible" / "invertible_cuda_emulation.cpp"
    cpu = [root / "cpp" / "src" / "cpu" / f for f in ("conv2d.cpp", "batchnorm.cpp", "psi.cpp")]
    if not (root / "cpp" / "src" / "cuda" / "invertible_tile.cuh").exists() or not all(p.exists() for p in cpu):
        pytest.skip("the C++ sources are not in this checkout")
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the host emulation")
    exe = tmp_path / "invertible_cuda_emulation"
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-Wno-unknown-pragmas",
                            f"-I{root / 'cpp' / 'include'}", str(src), *map(str, cpu), "-o", str(exe)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1].startswith("worst conv"), run.stdout


# ---- 2. the device orchestration with a NumPy twin of the kernels (no GPU needed) ------------------------------

class _HostOps(DeviceOps):
    """_cuda_ops._CudaOps's kernels on NumPy arrays, each replaced by the CPU op (or NumPy formula) it must
    match. With it as the provider, the blocks' algorithms take the device path (no fused NaN/Inf tests, every
    input tested up front) and must give the CPU path's numbers exactly."""

    xp = np

    def device_key(self, a):
        return -1

    def upload(self, host, dt):
        return np.ascontiguousarray(host, dtype=dt)

    def conv2d(self, x, w, bias, stride, pad, *, in_scale=None, in_shift=None, in_relu=False, alpha=1.0,
               addend=None, out=None):
        assert x.flags.c_contiguous and w.flags.c_contiguous and x.dtype == w.dtype
        acc = addend is not None and addend is out
        return _ops.conv2d(x, w, bias, stride, pad, out=out, accumulate=acc, addend=None if acc else addend,
                           alpha=alpha, in_scale=in_scale, in_shift=in_shift, in_relu=in_relu, check_finite=False,
                           threads=1)

    def channel_affine(self, x, scale, shift, relu):
        return _ops.batchnorm_inference(x, scale, shift, relu)

    def psi(self, x, b):
        assert x.flags.c_contiguous
        return _ops.psi(x, b)

    def psi_inverse(self, y, b):
        assert y.flags.c_contiguous
        return _ops.psi_inverse(y, b)

    def actnorm(self, x, loc, scale, inverse):
        lo, sc = loc.reshape(1, -1, 1, 1), scale.reshape(1, -1, 1, 1)
        return x * sc + lo if inverse else (x - lo) / sc

    def affine_coupling(self, x, net, c1, c2, clamp, inverse, want_s):
        assert x.flags.c_contiguous and net.flags.c_contiguous and net.shape[1] == 2 * c2
        s, t = soft_clamp(net[:, :c2], clamp), net[:, c2:]
        y = x.copy()
        y[:, c1:] = (x[:, c1:] - t) * np.exp(-s) if inverse else x[:, c1:] * np.exp(s) + t
        return y, (s.copy() if want_s else None)

    def channel_copy(self, src, s0, count, dst, d0):
        assert src.flags.c_contiguous and dst.flags.c_contiguous and src.dtype == dst.dtype
        assert 0 <= s0 and s0 + count <= src.shape[1] and 0 <= d0 and d0 + count <= dst.shape[1]
        dst[:, d0:d0 + count] = src[:, s0:s0 + count]


class _Twin:
    """The old per-block entry points of the device path, as the public methods run on a forced provider."""

    _METHODS = {"block_forward": "forward", "block_inverse": "inverse", "block_bottleneck": "bottleneck",
                "irevnet_forward": "forward", "irevnet_inverse": "inverse", "irevnet_classify": "classify",
                "psi_forward": "forward", "psi_inverse": "inverse", "pad_forward": "forward",
                "pad_inverse": "inverse", "actnorm_initialize": "initialize", "actnorm_forward": "forward",
                "actnorm_inverse": "inverse", "coupling_forward": "forward", "coupling_inverse": "inverse",
                "conv1x1_forward": "forward", "conv1x1_inverse": "inverse", "sequential_forward": "forward"}

    def __init__(self, ops):
        self.ops = ops

    def __getattr__(self, name):
        method = self._METHODS[name]

        def call(obj, *args):
            with _providers.forced(self.ops):
                return getattr(obj, method)(*args)
        return call


@pytest.fixture
def host_twin():
    return _Twin(_HostOps())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("case", BLOCK_CASES)
def test_orchestration_blocks_match_cpu_path(host_twin, case, dtype):
    blk, x = random_block(case, dtype)
    y = host_twin.block_forward(blk, x)
    np.testing.assert_array_equal(y, blk.forward(x))
    np.testing.assert_array_equal(host_twin.block_inverse(blk, y), blk.inverse(y))
    pair = (x[:, : blk.in_ch // 2], x[:, blk.in_ch // 2:])
    for got, want in zip(host_twin.block_forward(blk, pair), blk.forward(pair)):
        np.testing.assert_array_equal(got, want)
    if not blk.injective:
        f_in = x[:, blk.in_ch // 2:]
        np.testing.assert_array_equal(host_twin.block_bottleneck(blk, f_in), blk.bottleneck(f_in))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
def test_orchestration_irevnet_matches_cpu_path(host_twin, dtype):
    net = small_net(dtype)
    randomize_bn(net, np.random.default_rng(1))
    x = np.random.default_rng(2).standard_normal((3, 3, 16, 16)).astype(dtype)
    z = host_twin.irevnet_forward(net, x)
    np.testing.assert_array_equal(z, net.forward(x))
    np.testing.assert_array_equal(host_twin.irevnet_inverse(net, z), net.inverse(z))
    assert rel_err(host_twin.irevnet_inverse(net, z), x) <= REL[dtype]
    np.testing.assert_allclose(host_twin.irevnet_classify(net, z), net.classify(z), rtol=REL[dtype] * 10,
                               atol=REL[dtype] * 10)
    net2 = IRevNet([1, 2], [2, 2], [24, 96], init_ds=2, in_shape=(3, 16, 16), n_classes=5, rng=0, dtype=dtype)
    z2 = host_twin.irevnet_forward(net2, x)
    np.testing.assert_array_equal(z2, net2.forward(x))
    np.testing.assert_array_equal(host_twin.irevnet_inverse(net2, z2), net2.inverse(z2))


def test_orchestration_weight_cache_follows_load_state_dict(host_twin):
    net = small_net(np.float64)
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16))
    z0 = host_twin.irevnet_forward(net, x)
    logits0 = host_twin.irevnet_classify(net, z0)
    randomize_bn(net, np.random.default_rng(4))  # load_state_dict: the cached device weights must go
    z1 = host_twin.irevnet_forward(net, x)
    assert_differs(z1, z0)
    np.testing.assert_array_equal(z1, net.forward(x))
    np.testing.assert_allclose(host_twin.irevnet_classify(net, z1), net.classify(z1), rtol=1e-12, atol=1e-12)
    assert_differs(host_twin.irevnet_classify(net, z1), logits0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
def test_orchestration_flows_match_cpu_path(host_twin, dtype):
    rng = np.random.default_rng(5)
    for name, blk in flow_blocks().items():
        c = getattr(blk, "channels")
        x = rng.standard_normal((3, c, 5, 4)).astype(dtype)
        fwd = {"actnorm": host_twin.actnorm_forward, "coupling": host_twin.coupling_forward,
               "coupling_noclamp": host_twin.coupling_forward}.get(name, host_twin.conv1x1_forward)
        inv = {"actnorm": host_twin.actnorm_inverse, "coupling": host_twin.coupling_inverse,
               "coupling_noclamp": host_twin.coupling_inverse}.get(name, host_twin.conv1x1_inverse)
        y, ld = fwd(blk, x, True)  # ActNorm initialises itself here, on the "device" path
        y_cpu, ld_cpu = blk.forward(x, return_logdet=True)
        tol = REL[dtype]
        assert y.dtype == dtype and ld.dtype == dtype, name
        assert max_rel(y, y_cpu) <= tol and max_rel(ld, ld_cpu) <= tol, name
        assert max_rel(inv(blk, y), blk.inverse(y)) <= tol, name
        assert rel_err(inv(blk, y), x) <= 10 * tol, name
    seq = Sequential(ActNorm(4), InvertibleConv1x1(4, rng=0), AffineCoupling(4, hidden=8, rng=1, zero_init=False),
                     SpaceToDepth(2))
    x = rng.standard_normal((2, 4, 6, 6)).astype(dtype)
    z, ld = host_twin.sequential_forward(seq, x, True)
    z_cpu, ld_cpu = seq.forward(x, return_logdet=True)
    assert max_rel(z, z_cpu) <= REL[dtype] and max_rel(ld, ld_cpu) <= REL[dtype]


def test_orchestration_actnorm_init_and_pad_and_psi(host_twin):
    x = np.random.default_rng(6).standard_normal((4, 3, 6, 6)) * 3 + 1
    a, b = ActNorm(3), ActNorm(3)
    host_twin.actnorm_initialize(a, x)
    b.initialize(x)
    np.testing.assert_allclose(a.loc, b.loc, rtol=1e-13)
    np.testing.assert_allclose(a.scale, b.scale, rtol=1e-13)
    pad = InjectivePad(5)
    np.testing.assert_array_equal(host_twin.pad_forward(pad, x), pad.forward(x))
    np.testing.assert_array_equal(host_twin.pad_inverse(pad, pad.forward(x)), x)
    s2d = SpaceToDepth(2)
    np.testing.assert_array_equal(host_twin.psi_forward(s2d, x), s2d.forward(x))
    np.testing.assert_array_equal(host_twin.psi_inverse(s2d, s2d.forward(x)), x)
    with pytest.raises(ValueError, match="divisible by 2"):
        host_twin.psi_forward(s2d, x[:, :, :5])
    with pytest.raises(ValueError, match="NaN or Inf"):
        host_twin.block_forward(IRevNetBlock(4, 2, mult=1, rng=0, dtype=np.float64), np.full((1, 4, 4, 4), np.nan))


# ---- errors where the GPU path cannot run --------------------------------------------------------------------

class _FakeDeviceArray:
    """Looks like a GPU array (has __cuda_array_interface__) but is none."""
    __cuda_array_interface__ = {"shape": (1, 3, 4, 4), "typestr": "<f4", "data": (0, False), "version": 3}
    shape = (1, 3, 4, 4)


@pytest.mark.skipif(not bool(_WHY), reason="a GPU and CuPy are available")
def test_device_array_without_gpu_path_is_a_clear_runtime_error(monkeypatch):
    monkeypatch.setattr(_cuda_ops, "_OPS", None)
    fake = _FakeDeviceArray()
    for call in (lambda: SpaceToDepth(2).forward(fake), lambda: InjectivePad(1).forward(fake),
                 lambda: IRevNetBlock(4, 2, mult=1, rng=0).forward((fake, fake)),
                 lambda: small_net(np.float32).forward(fake),
                 lambda: ActNorm(3).forward(fake), lambda: InvertibleConv1x1(3, rng=0).inverse(fake),
                 lambda: AffineCoupling(3, hidden=4, rng=0).forward(fake)):
        with pytest.raises(RuntimeError, match="GPU array|CuPy|CUDA"):
            call()


def test_numpy_input_never_touches_the_device_path(monkeypatch):
    def boom():
        raise AssertionError("the device path was taken for NumPy input")
    monkeypatch.setattr(_cuda_ops, "_backend", boom)
    net = small_net(np.float32)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert isinstance(net.inverse(net.forward(x)), np.ndarray)
    assert not _cuda_ops.is_device_array(x) and not _cuda_ops.is_device_array((x, x))
    assert _cuda_ops.is_device_array((x, _FakeDeviceArray()))


class _FakeDev:
    """A stand-in for a CuPy array: a shape, a dtype and a non-null (never dereferenced) device pointer."""

    class _Ptr:
        ptr = 4096

    class _Dev:
        id = 0

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.size = int(np.prod(self.shape))
        self.data, self.device = self._Ptr(), self._Dev()


class _FakeCupy:
    class cuda:
        class _Stream:
            ptr = 0

        @staticmethod
        def get_current_stream():
            return _FakeCupy.cuda._Stream()

    @staticmethod
    def empty(shape, dtype):
        return _FakeDev(shape, dtype)

    @staticmethod
    def empty_like(a):
        return _FakeDev(a.shape, a.dtype)


@pytest.mark.skipif(not _cuda.built() or not getattr(_core, "built_with_cuda_invertible", False),
                    reason="arcflow was built without CUDA")
@pytest.mark.skipif(_cuda.available(), reason="a GPU is present (the real launches are tested below)")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
def test_cuda_launchers_accept_the_arguments_cuda_ops_passes(dtype):
    """Without a GPU every launcher must get past pybind11's argument conversion and its size checks and stop
    at the device guard ("no CUDA device"): _CudaOps calls each binding with the right arguments."""
    ops = _cuda_ops._CudaOps(_FakeCupy)
    f = lambda *shape: _FakeDev(shape, dtype)  # noqa: E731
    calls = {
        "conv2d": lambda: ops.conv2d(f(2, 3, 8, 8), f(5, 3, 3, 3), f(5), 2, 1, in_scale=f(3), in_shift=f(3),
                                     in_relu=True, alpha=-1.0, addend=f(2, 5, 4, 4), out=f(2, 5, 4, 4)),
        "channel_affine": lambda: ops.channel_affine(f(2, 3, 4, 4), f(3), f(3), True),
        "psi": lambda: ops.psi(f(2, 3, 4, 4), 2),
        "psi_inverse": lambda: ops.psi_inverse(f(2, 12, 2, 2), 2),
        "actnorm": lambda: ops.actnorm(f(2, 3, 4, 4), f(3), f(3), True),
        "affine_coupling": lambda: ops.affine_coupling(f(2, 5, 4, 4), f(2, 6, 4, 4), 2, 3, 2.0, False, True),
        "channel_copy": lambda: ops.channel_copy(f(2, 5, 4, 4), 1, 3, f(2, 4, 4, 4), 0),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            call()


# ---- 3a. on a GPU without CuPy: the kernels through host copies ----------------------------------------------

if not _cuda.built() or not hasattr(_core, "cuda_buffer_alloc"):
    _NO_GPU = "arcflow was built without CUDA"
elif not _cuda.available():
    _NO_GPU = f"no CUDA device usable ({_cuda.status()})"
else:
    _NO_GPU = ""
gpu_nocupy = pytest.mark.skipif(bool(_NO_GPU), reason=_NO_GPU or "GPU available")


class _DeviceScratch:
    """Device buffers for one op: host arrays copied in, results copied back, everything freed on exit."""

    def __init__(self):
        self.bufs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.bufs:
            _core.cuda_buffer_free(p)

    def alloc(self, nbytes: int) -> int:
        p = int(_core.cuda_buffer_alloc(max(int(nbytes), 1)))
        self.bufs.append(p)
        return p

    def up(self, a) -> int:
        if a is None:
            return 0
        a = np.ascontiguousarray(a)
        p = self.alloc(a.nbytes)
        _core.cuda_copy_to_device(p, a.reshape(-1).view(np.uint8))
        return p

    @staticmethod
    def down(p: int, out: np.ndarray) -> np.ndarray:
        assert out.flags.c_contiguous
        _core.cuda_copy_to_host(out.reshape(-1).view(np.uint8), p)
        return out


class _GpuViaHostOps(_HostOps):
    """The real CUDA kernels (the launchers _CudaOps calls, with its arguments) on NumPy arrays copied to and
    from the device: the blocks' device path on GPU kernels where CuPy is not installed."""

    @staticmethod
    def _fn(name, dt):
        return getattr(_core, f"{name}_cuda_{'f32' if np.dtype(dt) == np.float32 else 'f64'}")

    def conv2d(self, x, w, bias, stride, pad, *, in_scale=None, in_shift=None, in_relu=False, alpha=1.0,
               addend=None, out=None):
        n, c, h, wd = x.shape
        m, _, kh, kw = w.shape
        ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
        if out is None:
            out = np.empty((n, m, ho, wo), x.dtype)
        with _DeviceScratch() as d:
            po = d.up(out) if addend is out else d.alloc(out.nbytes)
            pa = po if addend is out else d.up(addend)
            self._fn("conv2d", x.dtype)(d.up(x), d.up(w), d.up(bias), n, c, h, wd, m, kh, kw, stride, pad,
                                        d.up(in_scale), d.up(in_shift), bool(in_relu), float(alpha), pa, po, -1, 0)
            return d.down(po, out)

    def channel_affine(self, x, scale, shift, relu):
        y = np.empty_like(x)
        n, c = x.shape[:2]
        with _DeviceScratch() as d:
            py = d.alloc(y.nbytes)
            self._fn("channel_affine", x.dtype)(d.up(x), n, c, x.size // (n * c), d.up(scale), d.up(shift),
                                                bool(relu), py, -1, 0)
            return d.down(py, y)

    def psi(self, x, b):
        n, c, h, w = x.shape
        y = np.empty((n, c * b * b, h // b, w // b), x.dtype)
        with _DeviceScratch() as d:
            py = d.alloc(y.nbytes)
            self._fn("psi", x.dtype)(d.up(x), n, c, h, w, b, py, -1, 0)
            return d.down(py, y)

    def psi_inverse(self, y, b):
        n, cb, ho, wo = y.shape
        x = np.empty((n, cb // (b * b), ho * b, wo * b), y.dtype)
        with _DeviceScratch() as d:
            px = d.alloc(x.nbytes)
            self._fn("psi_inverse", y.dtype)(d.up(y), *x.shape, b, px, -1, 0)
            return d.down(px, x)

    def actnorm(self, x, loc, scale, inverse):
        y = np.empty_like(x)
        n, c, h, w = x.shape
        with _DeviceScratch() as d:
            py = d.alloc(y.nbytes)
            self._fn("actnorm", x.dtype)(d.up(x), n, c, h * w, d.up(loc), d.up(scale), bool(inverse), py, -1, 0)
            return d.down(py, y)

    def affine_coupling(self, x, net, c1, c2, clamp, inverse, want_s):
        n, c, h, w = x.shape
        y = np.empty_like(x)
        s = np.empty((n, c2, h, w), x.dtype) if want_s else None
        with _DeviceScratch() as d:
            py = d.alloc(y.nbytes)
            ps = d.alloc(s.nbytes) if want_s else 0
            self._fn("affine_coupling", x.dtype)(d.up(x), d.up(net), n, c1, c2, h * w, float(clamp), bool(inverse),
                                                 py, ps, -1, 0)
            return d.down(py, y), (d.down(ps, s) if want_s else None)

    def channel_copy(self, src, s0, count, dst, d0):
        n, cs, h, w = src.shape
        with _DeviceScratch() as d:
            pd = d.up(dst)
            self._fn("channel_copy", src.dtype)(d.up(src), n, cs, s0, pd, dst.shape[1], d0, count, h * w, -1, 0)
            d.down(pd, dst)


@pytest.fixture
def gpu_twin():
    return _Twin(_GpuViaHostOps())


@pytest.mark.skipif(_NO_GPU != f"no CUDA device usable ({_cuda.status()})", reason="needs the CUDA build without a GPU")
def test_gpu_via_host_ops_pass_the_launchers_their_arguments(monkeypatch):
    """Without a GPU: with the device buffers faked, every _GpuViaHostOps kernel call gets past pybind11's argument
    conversion and the size checks and stops at the device guard (so the GPU tests above call them right)."""
    monkeypatch.setattr(_DeviceScratch, "alloc", lambda self, nbytes: 4096)
    monkeypatch.setattr(_DeviceScratch, "up", lambda self, a: 0 if a is None else 4096)
    monkeypatch.setattr(_DeviceScratch, "__exit__", lambda self, *exc: None)
    ops = _GpuViaHostOps()
    x = np.zeros((2, 4, 4, 4), np.float32)
    calls = [lambda: ops.conv2d(x, np.zeros((3, 4, 3, 3), np.float32), None, 2, 1, in_scale=x[0, 0, 0],
                                in_shift=x[0, 0, 0], in_relu=True, alpha=-1.0),
             lambda: ops.conv2d(x, np.zeros((3, 4, 1, 1), np.float32), None, 1, 0, addend=np.zeros((2, 3, 4, 4),
                                np.float32), out=np.zeros((2, 3, 4, 4), np.float32)),
             lambda: ops.channel_affine(x, x[0, 0, 0], x[0, 0, 0], True), lambda: ops.psi(x, 2),
             lambda: ops.psi_inverse(x, 2), lambda: ops.actnorm(x, x[0, 0, 0], x[0, 0, 0], False),
             lambda: ops.affine_coupling(x, np.zeros((2, 4, 4, 4), np.float32), 2, 2, 2.0, False, True),
             lambda: ops.channel_copy(x, 1, 2, np.zeros((2, 3, 4, 4), np.float32), 0)]
    for call in calls:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            call()


@gpu_nocupy
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("case", BLOCK_CASES)
def test_gpu_kernels_blocks_match_cpu(gpu_twin, case, dtype):
    blk, x = random_block(case, dtype)
    y = gpu_twin.block_forward(blk, x)
    assert y.dtype == dtype and max_rel(y, blk.forward(x)) <= REL[dtype]
    assert rel_err(gpu_twin.block_inverse(blk, y), x) <= REL[dtype]


@gpu_nocupy
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
def test_gpu_kernels_full_cifar10_irevnet_inverts_and_matches_cpu(gpu_twin, dtype):
    net = IRevNet.cifar10(rng=3, dtype=dtype)
    randomize_bn(net, np.random.default_rng(4))
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(dtype)
    z = gpu_twin.irevnet_forward(net, x)
    z_cpu = net.forward(x)
    assert z.dtype == dtype and rel_err(z, z_cpu) <= REL[dtype]
    assert rel_err(gpu_twin.irevnet_inverse(net, z), x) <= REL[dtype]
    assert max_rel(gpu_twin.irevnet_classify(net, z), net.classify(z_cpu)) <= 10 * REL[dtype]


@gpu_nocupy
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("case", [(2, 3, 8, 8, 5, 3, 1, 1), (1, 1, 1, 1, 1, 1, 1, 0), (3, 7, 9, 11, 6, 3, 2, 1),
                                  (2, 4, 7, 5, 9, 1, 1, 0), (1, 16, 32, 32, 64, 3, 1, 1), (4, 12, 16, 16, 70, 3, 2, 1)])
def test_gpu_kernels_conv2d_and_elementwise_match_cpu(case, dtype):
    ops, ref = _GpuViaHostOps(), _HostOps()
    n, c, h, w, o, k, stride, pad = case
    rng = np.random.default_rng(sum(case))
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = (rng.standard_normal((o, c, k, k)) / np.sqrt(c * k * k)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    sc, sf = rng.uniform(0.5, 1.5, c).astype(dtype), rng.standard_normal(c).astype(dtype)
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    add = rng.standard_normal((n, o, ho, wo)).astype(dtype)
    for kw in (dict(), dict(in_relu=True), dict(in_scale=sc, in_shift=sf, in_relu=True, alpha=-1.0)):
        assert max_rel(ops.conv2d(x, wt, b, stride, pad, **kw), ref.conv2d(x, wt, b, stride, pad, **kw)) \
            <= 2 * REL[dtype], kw
        got, want = add.copy(), add.copy()
        ops.conv2d(x, wt, None, stride, pad, addend=got, out=got, **kw)
        ref.conv2d(x, wt, None, stride, pad, addend=want, out=want, **kw)
        assert max_rel(got, want) <= 2 * REL[dtype], kw
    if h % 2 == 0 and w % 2 == 0:
        np.testing.assert_array_equal(ops.psi(x, 2), _ops.psi(x, 2))
        np.testing.assert_array_equal(ops.psi_inverse(ops.psi(x, 2), 2), x)
    np.testing.assert_array_equal(ops.channel_affine(x, sc, sf, True), _ops.batchnorm_inference(x, sc, sf, True))
    assert max_rel(ops.actnorm(x, sf, sc, False), ref.actnorm(x, sf, sc, False)) <= REL[dtype]
    if c >= 2:
        c1, c2 = c // 2, c - c // 2
        net = rng.standard_normal((n, 2 * c2, h, w)).astype(dtype)
        y, s = ops.affine_coupling(x, net, c1, c2, 2.0, False, True)
        y_ref, s_ref = ref.affine_coupling(x, net, c1, c2, 2.0, False, True)
        assert max_rel(y, y_ref) <= 10 * REL[dtype] and max_rel(s, s_ref) <= 10 * REL[dtype]


@gpu_nocupy
@pytest.mark.cuda
def test_gpu_kernels_flows_match_cpu(gpu_twin):
    rng = np.random.default_rng(9)
    for dtype in DTYPES:
        for name, blk in flow_blocks().items():
            x = rng.standard_normal((3, blk.channels, 5, 4)).astype(dtype)
            fwd = {"actnorm": gpu_twin.actnorm_forward, "coupling": gpu_twin.coupling_forward,
                   "coupling_noclamp": gpu_twin.coupling_forward}.get(name, gpu_twin.conv1x1_forward)
            inv = {"actnorm": gpu_twin.actnorm_inverse, "coupling": gpu_twin.coupling_inverse,
                   "coupling_noclamp": gpu_twin.coupling_inverse}.get(name, gpu_twin.conv1x1_inverse)
            y, ld = fwd(blk, x, True)
            y_cpu, ld_cpu = blk.forward(x, return_logdet=True)
            assert max_rel(y, y_cpu) <= 10 * REL[dtype] and max_rel(ld, ld_cpu) <= 10 * REL[dtype], name
            assert rel_err(inv(blk, y), x) <= 10 * REL[dtype], name


# ---- 3c. no GPU: the same GPU tests on the kernels' emulation ---------------------------------------------------
# tests/invertible/invertible_cuda_emulation.cpp built as a shared library provides the launchers of
# invertible_cuda.hpp on
# host pointers (every kernel emulated from invertible_tile.cuh, make_conv_args and the tile choice included);
# ctypes puts them in place of the _core CUDA bindings, with host memory as the "device" buffers. The GPU tests
# above then run unchanged: the kernels' logic, called with the arguments the real bindings get, end to end
# through the device provider (IRevNet, the blocks, the flows).

def _build_emulation_library(out_dir: Path) -> Path:
    root = Path(__file__).resolve().parents[2]
    src = root / "tests" / "invertible" / "invertible_cuda_emulation.cpp"
    if not (root / "cpp" / "src" / "cuda" / "invertible_tile.cuh").exists():
        pytest.skip("the C++ sources are not in this checkout")
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the kernel emulation")
    lib = out_dir / "libinvertible_cuda_emulation.so"
    build = subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-DARCFLOW_EMU_SHARED",
                            "-Wno-unknown-pragmas", f"-I{root / 'cpp' / 'include'}", str(src), "-o", str(lib)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    return lib


@pytest.fixture(scope="module")
def emulation_library(tmp_path_factory):
    import ctypes

    lib = ctypes.CDLL(str(_build_emulation_library(tmp_path_factory.mktemp("emu"))))
    vp, ll, ci, cd = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_double
    lib.emu_conv2d.argtypes = [ci, vp, vp, vp] + [ll] * 9 + [vp, vp, ci, cd, vp, vp]
    lib.emu_channel_affine.argtypes = [ci, vp, ll, ll, ll, vp, vp, ci, vp]
    lib.emu_psi.argtypes = [ci, ci, vp, ll, ll, ll, ll, ll, vp]
    lib.emu_actnorm.argtypes = [ci, vp, ll, ll, ll, vp, vp, ci, vp]
    lib.emu_affine_coupling.argtypes = [ci, vp, vp, ll, ll, ll, ll, cd, ci, vp, vp]
    lib.emu_channel_copy.argtypes = [ci, vp, ll, ll, ll, vp, ll, ll, ll, ll]
    return lib


def _patch_emulated_core(lib, monkeypatch) -> dict:
    """_core's CUDA launchers and buffer calls replaced by the emulation on host memory; returns the live buffers."""
    import ctypes

    buffers = {}

    def alloc(nbytes, device=-1):
        buf = np.empty(int(nbytes) + 64, np.uint8)
        buffers[buf.ctypes.data] = buf
        return buf.ctypes.data

    fns = {
        "cuda_buffer_alloc": alloc,
        "cuda_buffer_free": lambda p: buffers.pop(p),
        "cuda_copy_to_device": lambda dst, src: ctypes.memmove(dst, src.ctypes.data, src.nbytes),
        "cuda_copy_to_host": lambda dst, src: ctypes.memmove(dst.ctypes.data, src, dst.nbytes),
    }
    for sfx, dbl in (("f32", 0), ("f64", 1)):
        fns[f"conv2d_cuda_{sfx}"] = (lambda *a, dbl=dbl: lib.emu_conv2d(dbl, *a[:18]))
        fns[f"channel_affine_cuda_{sfx}"] = (lambda *a, dbl=dbl: lib.emu_channel_affine(dbl, *a[:8]))
        fns[f"psi_cuda_{sfx}"] = (lambda *a, dbl=dbl: lib.emu_psi(dbl, 0, *a[:7]))
        fns[f"psi_inverse_cuda_{sfx}"] = (lambda *a, dbl=dbl: lib.emu_psi(dbl, 1, *a[:7]))
        fns[f"actnorm_cuda_{sfx}"] = (lambda *a, dbl=dbl: lib.emu_actnorm(dbl, *a[:8]))
        fns[f"affine_coupling_cuda_{sfx}"] = (lambda *a, dbl=dbl: lib.emu_affine_coupling(dbl, *a[:10]))
        fns[f"channel_copy_cuda_{sfx}"] = (lambda *a, dbl=dbl: lib.emu_channel_copy(dbl, *a[:9]))
    for name, fn in fns.items():
        monkeypatch.setattr(_core, name, fn, raising=False)
    return buffers


@pytest.fixture
def emulated_gpu(emulation_library, monkeypatch):
    """The emulated _core launchers, and the host-copy twin (_GpuViaHostOps) as the blocks' provider."""
    buffers = _patch_emulated_core(emulation_library, monkeypatch)
    yield _Twin(_GpuViaHostOps())
    assert not buffers, "device buffers leaked"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("case", BLOCK_CASES)
def test_emulated_gpu_blocks_match_cpu(emulated_gpu, case, dtype):
    test_gpu_kernels_blocks_match_cpu(emulated_gpu, case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("case", [(2, 3, 8, 8, 5, 3, 1, 1), (1, 1, 1, 1, 1, 1, 1, 0), (3, 7, 9, 11, 6, 3, 2, 1),
                                  (2, 4, 7, 5, 9, 1, 1, 0), (2, 12, 8, 8, 70, 3, 2, 1)])
def test_emulated_gpu_conv2d_and_elementwise_match_cpu(emulated_gpu, case, dtype):
    test_gpu_kernels_conv2d_and_elementwise_match_cpu(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
def test_emulated_gpu_irevnet_matches_cpu(emulated_gpu, dtype):
    """The whole network through the emulated kernels: the CPU path's numbers up to rounding (the CPU build may
    contract to FMA, the emulation does not) and exact inversion."""
    for net in (small_net(dtype), IRevNet([1, 2], [2, 2], [24, 96], init_ds=2, in_shape=(3, 16, 16), n_classes=5,
                                          rng=0, dtype=dtype)):
        randomize_bn(net, np.random.default_rng(1))
        x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(dtype)
        z = emulated_gpu.irevnet_forward(net, x)
        assert z.dtype == dtype and rel_err(z, net.forward(x)) <= REL[dtype]
        back = emulated_gpu.irevnet_inverse(net, z)
        assert rel_err(back, net.inverse(z)) <= REL[dtype] and rel_err(back, x) <= REL[dtype]
        assert max_rel(emulated_gpu.irevnet_classify(net, z), net.classify(z)) <= 10 * REL[dtype]


def test_emulated_gpu_flows_match_cpu(emulated_gpu):
    test_gpu_kernels_flows_match_cpu(emulated_gpu)


# ---- 3d. no GPU: the CuPy path itself, on a NumPy stand-in for CuPy and the kernels' emulation -------------------

class _FakeCupyArray(np.ndarray):
    """A NumPy array posing as a CuPy array: __cuda_array_interface__, .data.ptr (its host address, which the
    emulated launchers read and write), .device.id and .get()."""

    class _Ptr:
        def __init__(self, ptr):
            self.ptr = ptr

    class _Device:
        id = 0

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ctypes.data, False), "version": 3}

    @property
    def data(self):
        return self._Ptr(self.ctypes.data)

    @property
    def device(self):
        return self._Device()

    def get(self):
        return np.array(self)


class _FakeCupy:
    """The part of CuPy's API that _cuda_ops and the GPU tests use, on _FakeCupyArray."""
    ndarray = _FakeCupyArray
    float32, float64, nan = np.float32, np.float64, np.nan

    class cuda:
        class _Stream:
            ptr = 0

            def synchronize(self):
                pass

        @staticmethod
        def get_current_stream():
            return _FakeCupy.cuda._Stream()

        class Device:
            def __init__(self, device_id=0):
                self.id = device_id

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def synchronize(self):
                pass

    @staticmethod
    def _wrap(a):
        return np.asarray(a).view(_FakeCupyArray)

    @classmethod
    def asarray(cls, a, dtype=None):
        return cls._wrap(np.array(a, dtype=dtype, copy=not isinstance(a, _FakeCupyArray)))

    @classmethod
    def ascontiguousarray(cls, a, dtype=None):
        return cls._wrap(np.ascontiguousarray(a, dtype=dtype))

    @classmethod
    def asnumpy(cls, a):
        return np.array(a)

    @classmethod
    def empty(cls, shape, dtype):
        return cls._wrap(np.empty(shape, dtype))

    @classmethod
    def empty_like(cls, a):
        return cls._wrap(np.empty(a.shape, a.dtype))

    @classmethod
    def zeros(cls, shape, dtype):
        return cls._wrap(np.zeros(shape, dtype))

    @classmethod
    def full(cls, shape, value, dtype):
        return cls._wrap(np.full(shape, value, dtype))

    isfinite, sqrt = staticmethod(np.isfinite), staticmethod(np.sqrt)


@pytest.fixture
def fake_cupy(emulation_library, monkeypatch):
    """_cuda_ops's real CuPy provider (_CudaOps) on _FakeCupy, the _core launchers emulated: provider_for's
    choice, _CudaOps's calls and the GPU tests of section 3b run as they would on a GPU."""
    _patch_emulated_core(emulation_library, monkeypatch)
    ops = _cuda_ops._CudaOps(_FakeCupy)
    monkeypatch.setattr(_cuda_ops, "_backend", lambda: ops)
    monkeypatch.setitem(globals(), "_cp", lambda: _FakeCupy)
    return _FakeCupy


def test_fake_cupy_public_api_returns_device_arrays(fake_cupy):
    cp = fake_cupy
    net = small_net(np.float32)
    randomize_bn(net, np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    z = net.forward(cp.asarray(x))
    assert type(z) is _FakeCupyArray and z.dtype == np.float32 and rel_err(z, net.forward(x)) <= 1e-5
    back = net.inverse(z)
    assert type(back) is _FakeCupyArray and rel_err(back, x) <= 1e-5
    assert type(net.classify(z)) is _FakeCupyArray and type(net.predict(cp.asarray(x))) is _FakeCupyArray
    blk = net.stack[0]  # injective, 3 -> 32 channels
    merged = blk.forward(cp.asarray(x))
    a, b = blk.forward((cp.asarray(x[:, :1]), cp.asarray(x[:, 1:])))
    assert type(merged) is _FakeCupyArray and type(a) is _FakeCupyArray and type(b) is _FakeCupyArray
    assert rel_err(merged, blk.forward(x)) <= 1e-5 and rel_err(blk.inverse(merged), x) <= 1e-5
    half = np.zeros((2, 16, 16, 16), np.float32)
    with pytest.raises(TypeError, match="mixing"):
        net.stack[1].forward((cp.asarray(half), half))
    with pytest.raises(TypeError, match="mixing"):  # the host array first: the device scope comes from the pair
        net.stack[1].forward((half, cp.asarray(half)))
    seq = Sequential(SpaceToDepth(2), InjectivePad(4), ActNorm(16), InvertibleConv1x1(16, rng=0),
                     AffineCoupling(16, hidden=8, rng=1, zero_init=False))
    xs = np.random.default_rng(2).standard_normal((2, 3, 8, 8))
    y = seq.forward(cp.asarray(xs))
    assert type(y) is _FakeCupyArray and y.dtype == np.float64
    assert rel_err(y, seq.forward(xs)) <= 1e-12 and rel_err(seq.inverse(y), xs) <= 1e-12
    seq2 = Sequential(SpaceToDepth(2), ActNorm(12), InvertibleConv1x1(12, rng=0), IRevNetBlock(12, 6, mult=2, rng=0))
    y2, ld = seq2.forward(cp.asarray(xs), return_logdet=True)
    y2_cpu, ld_cpu = seq2.forward(xs, return_logdet=True)
    assert type(ld) is _FakeCupyArray and max_rel(ld, ld_cpu) <= 1e-12
    assert type(y2) is _FakeCupyArray and rel_err(y2, y2_cpu) <= 1e-12


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("case", BLOCK_CASES[:4])
def test_fake_cupy_gpu_block_tests(fake_cupy, case, dtype):
    test_gpu_blocks_match_cpu_and_invert(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("variant", ["plain", "bias_relu", "bn_relu_addend", "accumulate_alpha"])
def test_fake_cupy_gpu_conv2d_tests(fake_cupy, variant, dtype):
    for case in [(2, 3, 8, 8, 5, 3, 1, 1), (3, 7, 9, 11, 6, 3, 2, 1), (2, 6, 8, 8, 6, 1, 2, 0)]:
        test_gpu_conv2d_matches_cpu_op(case, dtype, variant)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
def test_fake_cupy_gpu_psi_flows_and_errors(fake_cupy, dtype):
    test_gpu_psi_and_batchnorm_are_exact(dtype)
    test_gpu_flows_match_cpu(dtype)
    if dtype == np.float32:
        test_gpu_irevnet_noncontiguous_and_integer_input_and_weight_changes()


# ---- 3b. on a GPU with CuPy: device arrays in and out, the same numbers as the CPU backend -------------------

def _cp():
    import cupy
    return cupy


CONV_CASES = [
    # n, c, h, w, o, k, stride, padding
    (2, 3, 8, 8, 5, 3, 1, 1), (1, 1, 1, 1, 1, 1, 1, 0), (3, 7, 9, 11, 6, 3, 2, 1), (2, 4, 7, 5, 9, 1, 1, 0),
    (1, 5, 6, 6, 3, 3, 2, 0), (1, 16, 32, 32, 64, 3, 1, 1), (4, 12, 16, 16, 70, 3, 2, 1), (2, 6, 8, 8, 6, 1, 2, 0),
]


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("variant", ["plain", "bias_relu", "bn_relu_addend", "accumulate_alpha"])
def test_gpu_conv2d_matches_cpu_op(case, dtype, variant):
    cp = _cp()
    ops = _cuda_ops._backend()
    n, c, h, w, o, k, stride, pad = case
    rng = np.random.default_rng(sum(case))
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = (rng.standard_normal((o, c, k, k)) / np.sqrt(c * k * k)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype) if variant == "bias_relu" else None
    sc = rng.uniform(0.5, 1.5, c).astype(dtype) if variant == "bn_relu_addend" else None
    sf = rng.standard_normal(c).astype(dtype) if variant == "bn_relu_addend" else None
    relu = variant in ("bias_relu", "bn_relu_addend")
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    add = rng.standard_normal((n, o, ho, wo)).astype(dtype)
    alpha = -1.0 if variant == "accumulate_alpha" else 1.0
    ref = add.copy()
    kw = dict(in_scale=sc, in_shift=sf, in_relu=relu, alpha=alpha)
    if variant == "accumulate_alpha":
        _ops.conv2d(x, wt, b, stride, pad, out=ref, accumulate=True, **kw)
    elif variant == "bn_relu_addend":
        ref = _ops.conv2d(x, wt, b, stride, pad, addend=add, out=np.empty_like(add), **kw)
    else:
        ref = _ops.conv2d(x, wt, b, stride, pad, **kw)
    d = lambda a: None if a is None else cp.asarray(a)  # noqa: E731
    out = cp.asarray(add)
    addend = out if variant == "accumulate_alpha" else (cp.asarray(add) if variant == "bn_relu_addend" else None)
    got = ops.conv2d(d(x), d(wt), d(b), stride, pad, in_scale=d(sc), in_shift=d(sf), in_relu=relu, alpha=alpha,
                     addend=addend, out=out if addend is not None else None)
    cp.cuda.get_current_stream().synchronize()
    assert got.dtype == dtype
    assert max_rel(cp.asnumpy(got), ref) <= 2 * REL[dtype], variant


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
def test_gpu_psi_and_batchnorm_are_exact(dtype):
    cp = _cp()
    x = np.random.default_rng(0).standard_normal((3, 5, 8, 6)).astype(dtype)
    s2d = SpaceToDepth(2)
    y = s2d.forward(cp.asarray(x))
    assert isinstance(y, cp.ndarray) and y.dtype == dtype
    np.testing.assert_array_equal(cp.asnumpy(y), _ops.psi(x, 2))
    np.testing.assert_array_equal(cp.asnumpy(s2d.inverse(y)), x)
    ops = _cuda_ops._backend()
    sc, sf = np.random.default_rng(1).standard_normal((2, 5)).astype(dtype)
    got = ops.channel_affine(cp.asarray(x), cp.asarray(sc), cp.asarray(sf), True)
    np.testing.assert_array_equal(cp.asnumpy(got), _ops.batchnorm_inference(x, sc, sf, relu=True))
    pad = InjectivePad(3)
    np.testing.assert_array_equal(cp.asnumpy(pad.forward(cp.asarray(x))), pad.forward(x))
    np.testing.assert_array_equal(cp.asnumpy(pad.inverse(pad.forward(cp.asarray(x)))), x)


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("case", BLOCK_CASES)
def test_gpu_blocks_match_cpu_and_invert(case, dtype):
    cp = _cp()
    blk, x = random_block(case, dtype)
    y = blk.forward(cp.asarray(x))
    assert isinstance(y, cp.ndarray) and y.dtype == dtype
    assert max_rel(cp.asnumpy(y), blk.forward(x)) <= REL[dtype]
    back = blk.inverse(y)
    assert rel_err(cp.asnumpy(back), x) <= REL[dtype]
    a, b = blk.forward((cp.asarray(x[:, : blk.in_ch // 2]), cp.asarray(x[:, blk.in_ch // 2:])))
    a_cpu, b_cpu = blk.forward((x[:, : blk.in_ch // 2], x[:, blk.in_ch // 2:]))
    assert max_rel(cp.asnumpy(a), a_cpu) <= REL[dtype] and max_rel(cp.asnumpy(b), b_cpu) <= REL[dtype]


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
def test_gpu_full_cifar10_irevnet_inverts_and_matches_cpu(dtype):
    cp = _cp()
    net = IRevNet.cifar10(rng=3, dtype=dtype)
    randomize_bn(net, np.random.default_rng(4))
    x = np.random.default_rng(5).standard_normal((4, 3, 32, 32)).astype(dtype)
    z = net.forward(cp.asarray(x))
    assert isinstance(z, cp.ndarray) and z.dtype == dtype and z.shape == (4, 512, 8, 8)
    z_cpu = net.forward(x)
    assert rel_err(cp.asnumpy(z), z_cpu) <= REL[dtype]
    back = net.inverse(z)
    assert rel_err(cp.asnumpy(back), x) <= REL[dtype]
    assert rel_err(cp.asnumpy(back), net.inverse(z_cpu)) <= REL[dtype]
    logits = net.classify(z)
    assert isinstance(logits, cp.ndarray) and logits.shape == (4, 10)
    assert max_rel(cp.asnumpy(logits), net.classify(z_cpu)) <= 10 * REL[dtype]


@gpu
@pytest.mark.cuda
def test_gpu_irevnet_noncontiguous_and_integer_input_and_weight_changes():
    cp = _cp()
    net = small_net(np.float32)
    x_wide = np.random.default_rng(6).standard_normal((3, 3, 16, 32)).astype(np.float32)
    x = x_wide[:, :, :, ::2]
    xv = cp.asarray(x_wide)[:, :, :, ::2]  # a strided CuPy view
    assert not xv.flags.c_contiguous
    z = net.forward(xv)
    assert max_rel(cp.asnumpy(z), net.forward(x)) <= 1e-5
    xi = (x * 10).astype(np.int32)
    zi = net.forward(cp.asarray(xi))
    assert zi.dtype == np.float64 and max_rel(cp.asnumpy(zi), net.forward(xi)) <= 1e-12
    randomize_bn(net, np.random.default_rng(7))  # load_state_dict: the uploaded weights must be refreshed
    assert max_rel(cp.asnumpy(net.forward(cp.asarray(x))), net.forward(x)) <= 1e-5
    with pytest.raises(ValueError, match="NaN or Inf"):
        net.forward(cp.full((1, 3, 16, 16), cp.nan, dtype=cp.float32))
    with pytest.raises(ValueError, match="shape"):
        net.forward(cp.zeros((1, 4, 16, 16), dtype=cp.float32))


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
def test_gpu_flows_match_cpu(dtype):
    cp = _cp()
    rng = np.random.default_rng(8)
    for name, blk in flow_blocks().items():
        x = rng.standard_normal((3, blk.channels, 5, 4)).astype(dtype)
        y, ld = blk.forward(cp.asarray(x), return_logdet=True)
        assert isinstance(y, cp.ndarray) and y.dtype == dtype and isinstance(ld, cp.ndarray), name
        y_cpu, ld_cpu = blk.forward(x, return_logdet=True)
        assert max_rel(cp.asnumpy(y), y_cpu) <= 10 * REL[dtype], name
        assert max_rel(cp.asnumpy(ld), ld_cpu) <= 10 * REL[dtype], name
        assert rel_err(cp.asnumpy(blk.inverse(y)), x) <= 10 * REL[dtype], name
    seq = Sequential(ActNorm(4), InvertibleConv1x1(4, rng=0), AffineCoupling(4, hidden=8, rng=1, zero_init=False),
                     IRevNetBlock(4, 2, mult=1, rng=2, dtype=dtype))
    x = rng.standard_normal((2, 4, 6, 6)).astype(dtype)
    z, ld = seq.forward(cp.asarray(x), return_logdet=True)
    z_cpu, ld_cpu = seq.forward(x, return_logdet=True)
    assert max_rel(cp.asnumpy(z), z_cpu) <= 10 * REL[dtype] and max_rel(cp.asnumpy(ld), ld_cpu) <= 10 * REL[dtype]
    assert rel_err(cp.asnumpy(seq.inverse(z)), x) <= 10 * REL[dtype]
