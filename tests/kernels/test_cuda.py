"""The CUDA backend against the CPU backend (the same recursion, so the same numbers up to rounding).

Accuracy is relative to the largest |entry| of the CPU result: at most 1e-12 in float64 and 1e-5 in
float32. Every activation, symmetric and not, depth 0..8, shapes that cross tile borders (128 x 128 pairs
per block in float32, 64 x 64 in float64) and collinear rows (duplicates, multiples, a zero row: the
first-layer refinement). Without a GPU (or without the CUDA build) the GPU tests skip with the reason; the
error paths are checked instead, and the kernels' logic runs in a host emulation (tests/kernels/cuda_emulation.cpp,
built with g++) against the CPU engine.
"""
from __future__ import annotations

import inspect
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import arcflow
from arcflow import _core, _cuda, reference
from arcflow import activations as acts
from arcflow._kernels import fc_params  # the FcParams the bindings take, as the public API builds them
from arcflow.activations import ReLU
from _helpers.kernels import ACTIVATIONS as PROPERTY_ACTIVATIONS
from _helpers.kernels import assert_close as shared_assert_close

HAVE_GPU = _cuda.available()
if not _cuda.built():
    _WHY = "arcflow was built without CUDA"
elif not HAVE_GPU:
    _WHY = f"no CUDA device usable ({_cuda.status()})"
else:
    _WHY = ""

DTYPES = (np.float32, np.float64)
# The CPU property tests' activations (test_properties.py) and ReLU without bias (the kernels' Bias = false path).
ACTIVATIONS = {"relu_nobias": (ReLU(), 1.4, 0.0), **PROPERTY_ACTIVATIONS}
# (n1, n2 or None for the symmetric case, d): several tiles, ragged edges, d not a multiple of 8.
SHAPES = {"1x1_d1": (1, 1, 1), "130x70_d21": (130, 70, 21), "sym_150_d13": (150, None, 13),
          "sym_5_d3": (5, None, 3)}



def _data(n1, n2, d, seed=0):
    """Rows of mixed norm with collinear pairs: a duplicate, a multiple, a zero row, shared rows of x1, x2."""
    rng = np.random.default_rng(seed)
    x1 = rng.standard_normal((n1, d)) * rng.uniform(0.5, 1.5, (n1, 1))
    if n1 >= 4:
        x1[1] = x1[0]
        x1[2] = -0.6 * x1[0]
        x1[3] = 0.0
    if n2 is None:
        return x1, None
    x2 = rng.standard_normal((n2, d)) * rng.uniform(0.5, 1.5, (n2, 1))
    if n2 >= 2 and n1 >= 2:
        x2[0] = x1[0]
        x2[1] = 0.7 * x1[1]
    return x1, x2


def _cpu(x1, x2, act, depth, w, b, fix_dep, get, diag=False):
    kw = {"diag": True} if diag else {}
    if "device" in inspect.signature(arcflow.kernels).parameters:
        kw["device"] = "cpu"
    return arcflow.kernels(x1, x2, depth=depth, activation=act, w_std=w, b_std=b, fix_dep=fix_dep, get=get, **kw)


def _gpu(x1, x2, act, depth, w, b, fix_dep, want_nngp=True, want_ntk=True, diag=False):
    d = x1.shape[1]
    params = fc_params(act, depth, w * w, b * b, (w * w) / max(d, 1), fix_dep)
    return _cuda.kernels_cuda(x1, x2, params, want_nngp, want_ntk, diag=diag)


def assert_close(actual, expected, dtype, what=""):
    """The shared relative-error check (_helpers.kernels.assert_close), and the dtype kept."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {np.dtype(dtype)}"
    shared_assert_close(actual, expected, dtype, what)


# ---- without a GPU: availability and clear errors ---------------------------------------------------------

def test_available_is_built_and_device():
    assert isinstance(_cuda.available(), bool)
    assert _cuda.available() == (bool(_core.built_with_cuda) and int(_core.cuda_device_count()) > 0)
    assert _cuda.device_count() >= 0


@pytest.mark.skipif(HAVE_GPU, reason="a CUDA device is present: the error path is not reachable")
def test_unavailable_raises_runtime_error():
    x = np.ones((3, 2))
    with pytest.raises(RuntimeError, match="built without CUDA|no CUDA device"):
        _cuda.kernels_cuda(x, None, fc_params(ReLU(), 2, 1.0, 0.0, 0.5, 0))


@pytest.mark.skipif(not _cuda.built() or HAVE_GPU, reason="needs a CUDA build on a machine without a device")
def test_binding_without_device_raises_runtime_error():
    x = np.ones((3, 2))
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _core.fc_kernels_cuda_host_f64(x, None, fc_params(ReLU(), 2, 1.0, 0.0, 0.5, 0), True, True)


def test_binding_parameters_are_typed():
    """The engines and the CUDA launchers take one FcParams built by keyword; the activation codes are
    _core.ActKind (defined once, in C++), named as the Python activations' kinds."""
    assert set(_core.ActKind.__members__) == {"abrelu", "monomial", "sign", "erf"}
    for act in (ReLU(), acts.LeakyReLU(0.2), acts.RectifiedMonomial(3), acts.Sign(), acts.Erf()):
        p = fc_params(act, 3, 2.0, 0.25, 0.5, 1)
        assert p.act.kind == _core.ActKind.__members__[act.kind]
        if act.kind == "abrelu":
            assert (p.act.a, p.act.b) == tuple(float(v) for v in act.params())
        if act.kind == "monomial":
            assert p.act.n == act.params()[0]
        assert (p.depth, p.w_var, p.b_var, p.gram_scale, p.fix_dep) == (3, 2.0, 0.25, 0.5, 1)
        assert repr(p).startswith(f"FcParams(act=ActParams(kind=ActKind.{act.kind}, ")
    relu = _core.ActParams(kind=_core.ActKind.abrelu)
    with pytest.raises(TypeError):
        _core.FcParams(relu, 2)  # keywords only
    with pytest.raises(TypeError):
        _core.FcEngineF64(np.ones((2, 2)), None, 0, 0.0, 1.0, 1, 2, 1.0, 0.0, 1.0, 0)  # no positional numbers
    x = np.random.default_rng(0).standard_normal((5, 3))
    out = np.empty((5, 5))
    _core.FcEngineF64(x, None, _core.FcParams(act=relu, depth=2, gram_scale=1 / 3)).rows(0, 5, out, None, None, 1)
    np.testing.assert_allclose(out, reference.nngp(x, depth=2), rtol=1e-12, atol=1e-14)


# ---- without a GPU: the kernels' logic in a host emulation -------------------------------------------------

@pytest.fixture(scope="module")
def host_emulation(tmp_path_factory):
    """Builds tests/kernels/cuda_emulation.cpp with g++ and runs it once: (the completed run, the directory where it
    wrote
    its cases for the reference). It runs the CUDA tile and diag kernels on the CPU (one OS thread per CUDA
    thread, a barrier for __syncthreads)."""
    root = Path(__file__).resolve().parents[2]
    src, engine = root / "tests" / "kernels" / "cuda_emulation.cpp", root / "cpp" / "src" / "cpu" / "fc_kernel.cpp"
    if not (root / "cpp" / "src" / "cuda" / "fc_tile.cuh").exists() or not engine.exists():
        pytest.skip("the C++ sources are not in this checkout")
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the host emulation")
    tmp_path = tmp_path_factory.mktemp("cuda_emulation")
    probe = tmp_path / "probe.cpp"
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    if subprocess.run([cxx, "-std=c++20", str(probe), "-o", str(tmp_path / "probe"), "-lpthread"],
                      capture_output=True).returncode != 0:
        pytest.skip("g++ has no C++20 <barrier>")
    exe = tmp_path / "cuda_emulation"
    build = subprocess.run([cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-Wno-unknown-pragmas",
                            f"-I{root / 'cpp' / 'include'}", str(src), str(engine), "-o", str(exe), "-lpthread"],
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-4000:]
    cases = tmp_path / "cases"
    cases.mkdir()
    run = subprocess.run([str(exe), str(cases)], capture_output=True, text=True, timeout=900)
    return run, cases


@pytest.mark.slow
def test_kernel_logic_in_host_emulation(host_emulation):
    """The emulated CUDA kernels against the CPU engine, for every activation family, symmetric and not, ragged
    tiles, depth 0..8: indexing, mirroring and bounds are checked where no GPU is present."""
    run, _ = host_emulation
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert run.stdout.strip().startswith("worst f64"), run.stdout


# The emulation's manifest writes int(act_kind); _core.ActKind is the one definition of those codes.
_EMULATED_ACTIVATIONS = {_core.ActKind.abrelu: lambda a, b, n: acts.ABReLU(a, b),
                         _core.ActKind.monomial: lambda a, b, n: acts.RectifiedMonomial(n),
                         _core.ActKind.sign: lambda a, b, n: acts.Sign(), _core.ActKind.erf: lambda a, b, n: acts.Erf()}


@pytest.mark.slow
def test_host_emulation_matches_reference(host_emulation):
    """The emulated CUDA kernels against arcflow.reference (NumPy, float64): every activation, float32 and
    float64, with and without bias, a ragged 70 x 40 case and a symmetric 70 x 70 one with its diag kernel."""
    run, cases = host_emulation
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    rows = [line.split() for line in (cases / "manifest.txt").read_text().splitlines()]
    assert len(rows) == 9 * 2 * 2 * 2, "activations x bias x shapes x dtypes"
    seen, failures = set(), []
    for file, dtype, kind, a, b, n, wv, bv, depth, fix, n1, n2, d, sym in rows:
        dtype = np.dtype(dtype).type
        n1, n2, d, sym, depth, fix = int(n1), int(n2), int(d), sym == "1", int(depth), int(fix)
        act = _EMULATED_ACTIVATIONS[_core.ActKind(int(kind))](float(a), float(b), int(n))
        seen.add((repr(act), dtype, float(bv) > 0))
        v = np.fromfile(cases / file, dtype=np.float64)
        x1, v = v[:n1 * d].reshape(n1, d), v[n1 * d:]
        x2 = None
        if not sym:
            x2, v = v[:n2 * d].reshape(n2, d), v[n2 * d:]
        m = n1 * n2 + (n1 if sym else 0)          # the matrix, then (symmetric) the diag kernel's values
        gn, gt = v[:m], v[m:]
        assert gt.size == m, file
        kw = dict(depth=depth, activation=act, w_std=np.sqrt(float(wv)), b_std=np.sqrt(float(bv)), fix_dep=fix,
                  get=("nngp", "ntk") if act.has_ntk else ("nngp",))
        want = reference.kernels(x1, x2, **kw)
        wanted = {"nngp": want.nngp.ravel()}
        if act.has_ntk:
            wanted["ntk"] = want.ntk.ravel()
        if sym:
            dg = reference.kernels(x1, diag=True, **kw)
            wanted["nngp"] = np.concatenate([wanted["nngp"], dg.nngp])
            if act.has_ntk:
                wanted["ntk"] = np.concatenate([wanted["ntk"], dg.ntk])
        for field, got in (("nngp", gn), ("ntk", gt)):
            if field in wanted:
                try:
                    assert_close(got.astype(dtype), wanted[field], dtype, f"{file} {field}")
                except AssertionError as e:
                    failures.append(str(e).splitlines()[0])
    assert not failures, "\n".join(failures)
    assert len(seen) == 9 * 2 * 2


# ---- on a GPU: the same numbers as the CPU backend --------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("depth", range(9))
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_GPU, reason=_WHY or "CUDA available")
def test_matches_cpu(name, shape, depth, dtype):
    act, w, b = ACTIVATIONS[name]
    n1, n2, d = shape
    x1, x2 = _data(n1, n2, d, seed=depth)
    x1 = x1.astype(dtype)
    x2 = None if x2 is None else x2.astype(dtype)
    fix_dep = min(depth, 1 + depth // 3)
    get = ("nngp", "ntk") if act.has_ntk else ("nngp",)
    ref = _cpu(x1, x2, act, depth, w, b, fix_dep, get)
    gn, gt = _gpu(x1, x2, act, depth, w, b, fix_dep, True, act.has_ntk)
    assert_close(gn, ref.nngp, dtype, f"nngp {name} depth {depth}")
    if act.has_ntk:
        assert_close(gt, ref.ntk, dtype, f"ntk {name} depth {depth}")
    else:
        assert gt is None
    if x2 is None:  # one triangle computed and mirrored: exactly symmetric
        assert np.array_equal(gn, gn.T)
        if gt is not None:
            assert np.array_equal(gt, gt.T)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("depth", [0, 1, 4, 8])
@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_GPU, reason=_WHY or "CUDA available")
def test_diag_matches_cpu(name, depth, dtype):
    act, w, b = ACTIVATIONS[name]
    x1, _ = _data(300, None, 9, seed=depth)  # zero row and collinear rows included
    x1 = x1.astype(dtype)
    fix_dep = min(depth, 1)
    get = ("nngp", "ntk") if act.has_ntk else ("nngp",)
    ref = _cpu(x1, None, act, depth, w, b, fix_dep, get, diag=True)
    gn, gt = _gpu(x1, None, act, depth, w, b, fix_dep, True, act.has_ntk, diag=True)
    assert_close(gn, ref.nngp, dtype, f"diag nngp {name}")
    if act.has_ntk:
        assert_close(gt, ref.ntk, dtype, f"diag ntk {name}")
    with pytest.raises(ValueError, match="x2 must be None"):
        _gpu(x1, x1, act, depth, w, b, fix_dep, diag=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_GPU, reason=_WHY or "CUDA available")
def test_one_output_and_big_tiles(dtype):
    x1, x2 = _data(300, 260, 300, seed=3)  # d > the shared-memory slice, several tiles each way
    x1, x2 = x1.astype(dtype), x2.astype(dtype)
    act, w, b = ACTIVATIONS["relu"]
    ref = _cpu(x1, x2, act, 5, w, b, 0, ("nngp", "ntk"))
    gn, gt = _gpu(x1, x2, act, 5, w, b, 0, True, False)
    assert gt is None
    assert_close(gn, ref.nngp, dtype, "nngp only")
    gn, gt = _gpu(x1, x2, act, 5, w, b, 0, False, True)
    assert gn is None
    assert_close(gt, ref.ntk, dtype, "ntk only")
    gn, gt = _gpu(x1, None, act, 5, w, b, 0)
    ref = _cpu(x1, None, act, 5, w, b, 0, ("nngp", "ntk"))
    assert_close(gn, ref.nngp, dtype, "symmetric nngp")
    assert_close(gt, ref.ntk, dtype, "symmetric ntk")


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_GPU, reason=_WHY or "CUDA available")
def test_empty_and_dtype_promotion():
    act, w, b = ACTIVATIONS["erf"]
    gn, gt = _gpu(np.zeros((0, 3)), None, act, 2, w, b, 0)
    assert gn.shape == (0, 0) and gt.shape == (0, 0)
    x1, x2 = _data(9, 7, 4)
    gn, gt = _gpu(x1.astype(np.float32), x2, act, 2, w, b, 0)  # float32 with float64 -> float64
    assert gn.dtype == np.float64
    ref = _cpu(x1.astype(np.float32).astype(np.float64), x2, act, 2, w, b, 0, ("nngp", "ntk"))
    assert_close(gn, ref.nngp, np.float64, "promoted nngp")


# ---- CuPy arrays in and out --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("symmetric", [False, True], ids=["general", "symmetric"])
@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_GPU, reason=_WHY or "CUDA available")
def test_cupy_in_cupy_out(dtype, symmetric):
    cp = pytest.importorskip("cupy")
    x1, x2 = _data(140, None if symmetric else 90, 17, seed=5)
    x1 = x1.astype(dtype)
    x2 = None if x2 is None else x2.astype(dtype)
    act, w, b = ACTIVATIONS["relu"]
    ref = _cpu(x1, x2, act, 4, w, b, 1, ("nngp", "ntk"))
    # A non-contiguous device view: the backend makes it contiguous on the device.
    d1 = cp.asfortranarray(cp.asarray(x1))
    d2 = None if x2 is None else cp.asarray(x2)[:, :]
    gn, gt = _gpu(d1, d2, act, 4, w, b, 1)
    assert isinstance(gn, cp.ndarray) and isinstance(gt, cp.ndarray)
    assert gn.dtype == dtype and gt.dtype == dtype
    cp.cuda.get_current_stream().synchronize()
    assert_close(cp.asnumpy(gn), ref.nngp, dtype, "cupy nngp")
    assert_close(cp.asnumpy(gt), ref.ntk, dtype, "cupy ntk")
    if symmetric:
        dn, dt = _gpu(d1, None, act, 4, w, b, 1, diag=True)
        assert isinstance(dn, cp.ndarray) and dn.shape == (x1.shape[0],)
        rd = _cpu(x1, None, act, 4, w, b, 1, ("nngp", "ntk"), diag=True)
        assert_close(cp.asnumpy(dn), rd.nngp, dtype, "cupy diag nngp")
        assert_close(cp.asnumpy(dt), rd.ntk, dtype, "cupy diag ntk")


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_GPU, reason=_WHY or "CUDA available")
def test_cupy_bad_input():
    cp = pytest.importorskip("cupy")
    act, w, b = ACTIVATIONS["relu"]
    x1, x2 = _data(5, 4, 3)
    with pytest.raises(TypeError, match="both"):
        _gpu(cp.asarray(x1), x2, act, 1, w, b, 0)
    with pytest.raises(ValueError, match="2-D"):
        _gpu(cp.ones(5), None, act, 1, w, b, 0)
    bad = cp.asarray(x1)
    bad[2, 1] = cp.nan
    with pytest.raises(ValueError, match="NaN"):
        _gpu(bad, None, act, 1, w, b, 0)


# ---- the public API, once it takes device= -----------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_GPU, reason=_WHY or "CUDA available")
@pytest.mark.skipif("device" not in inspect.signature(arcflow.kernels).parameters,
                    reason="arcflow.kernels has no device= argument yet")
def test_public_api_device_cuda():
    x1, x2 = _data(70, 50, 6)
    for x2_ in (None, x2):
        cpu = arcflow.kernels(x1, x2_, depth=3, activation="relu", w_std=1.3, b_std=0.2, device="cpu")
        gpu = arcflow.kernels(x1, x2_, depth=3, activation="relu", w_std=1.3, b_std=0.2, device="cuda")
        assert_close(np.asarray(gpu.nngp), cpu.nngp, np.float64, "public nngp")
        assert_close(np.asarray(gpu.ntk), cpu.ntk, np.float64, "public ntk")
