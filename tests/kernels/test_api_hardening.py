"""Hardening of the kernel API (issue 12): no crash and no silently wrong answer for inputs a user can type.

Threads, aliased outputs, diag / bool / dtype handling, Ctrl-C and the GIL, the engine's memory, unaligned
arrays and the messages a user meets. Numbers are compared with the NumPy reference (arcflow.reference).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import arcflow
from arcflow import _core, compat, reference
from arcflow import _dispatch as dp
from _helpers.signals import interrupted as _interrupted
from arcflow.activations import ABReLU, Abs, Identity, LeakyReLU, RectifiedMonomial, ReLU, Step

MAX = dp.MAX_THREADS


def _x(n=6, d=3, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


def _run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """code in a fresh interpreter: a crash (signal, abort) there is a failed test here, not a dead session."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------------------------------
# 1. threads


@pytest.mark.parametrize("threads", [MAX + 1, 10**5, 10**6, 2**31 - 1, 2**31, 2**63])
def test_too_many_threads_is_a_clear_error(threads):
    for call, where in ((lambda: arcflow.kernels(np.ones((50, 7)), threads=threads), "arcflow.kernels"),
                        (lambda: arcflow.ntk(np.ones((50, 7)), threads=threads), "arcflow.ntk"),
                        (lambda: compat.kernel_value(np.ones((5, 3)), 2, 0, threads=threads),
                         "arcflow.compat.kernel_value"),
                        (lambda: arcflow.set_num_threads(threads), "set_num_threads")):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert where in msg and "threads" in msg and str(MAX) in msg, msg
    assert arcflow.get_num_threads() <= MAX


def test_largest_thread_count_runs_and_matches_the_reference():
    x = _x(50, 7)
    k = arcflow.kernels(x, depth=2, threads=MAX)
    ref = reference.kernels(x, depth=2)
    np.testing.assert_allclose(k.nngp, ref.nngp, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(k.ntk, ref.ntk, rtol=1e-12, atol=1e-14)


def test_engine_never_starts_more_threads_than_tiles():
    # The C++ engine itself, below the Python checks: 10**6 threads for one tile crashed the process
    # (segfault in engine.rows); now it runs on at most as many threads as tiles.
    r = _run_python("""
        import numpy as np
        from arcflow import _core, reference
        x = np.random.default_rng(0).standard_normal((50, 7))
        relu = _core.ActParams(kind=_core.ActKind.abrelu, a=0.0, b=1.0)
        e = _core.FcEngineF64(x, None, _core.FcParams(act=relu, depth=2, w_var=1.0, gram_scale=1.0 / 7))
        out = np.full((50, 50), np.nan)
        e.rows(0, 50, out, None, None, 10**6)
        ref = reference.nngp(x, depth=2)
        print("maxerr", float(np.max(np.abs(out - ref))))
    """)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert float(r.stdout.split()[-1]) < 1e-12, r.stdout


# --------------------------------------------------------------------------------------------------
# 2. outputs that alias the inputs or each other


def test_out_aliasing_the_input_is_refused():
    z = _x(8, 8)
    keep = z.copy()
    with pytest.raises(ValueError, match=r"arcflow\.ntk: out\['ntk'\] shares memory with the input x1"):
        arcflow.ntk(z, out=z)
    np.testing.assert_array_equal(z, keep)
    x1, x2 = _x(8, 8, seed=1), _x(8, 8, seed=2)
    with pytest.raises(ValueError, match=r"arcflow\.nngp: out\['nngp'\] shares memory with the input x2"):
        arcflow.nngp(x1, x2, out=x2)
    # a view of the input's buffer counts too
    big = np.zeros(200)
    x = big[:64].reshape(8, 8)
    x[...] = _x(8, 8, seed=3)
    with pytest.raises(ValueError, match="x1"):
        arcflow.ntk(x, out=big[32:96].reshape(8, 8))


def test_two_outputs_sharing_memory_are_refused():
    x = _x(10, 4)
    o = np.zeros((10, 10))
    with pytest.raises(ValueError, match=r"out\['nngp'\] and out\['ntk'\] share memory"):
        arcflow.kernels(x, out={"nngp": o, "ntk": o})
    buf = np.zeros(150)
    a, b = buf[:100].reshape(10, 10), buf[50:150].reshape(10, 10)  # overlapping views
    with pytest.raises(ValueError, match="share memory"):
        arcflow.kernels(x, out=(a, b))
    assert not buf.any()  # nothing written before the error
    # separate halves of one buffer are fine, and right
    a, b = buf[:100].reshape(10, 10), np.zeros((10, 10))
    k = arcflow.kernels(x, depth=2, out={"nngp": a, "ntk": b})
    ref = reference.kernels(x, depth=2)
    np.testing.assert_allclose(a, ref.nngp, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b, ref.ntk, rtol=1e-12, atol=1e-14)
    assert k.nngp is a and k.ntk is b


# --------------------------------------------------------------------------------------------------
# 3. diag, bools, dtypes


def test_diag_with_x2_is_refused():
    x, y = _x(6, 3), _x(6, 3, seed=1)
    for f, where in ((arcflow.kernels, "arcflow.kernels"), (arcflow.nngp, "arcflow.nngp"),
                     (arcflow.ntk, "arcflow.ntk")):
        with pytest.raises(ValueError, match=rf"{where}: diag=True .* takes no x2"):
            f(x, y, diag=True)
    # the same object twice is the symmetric case: k(x_i, x_i)
    np.testing.assert_allclose(arcflow.nngp(x, x, diag=True, depth=2), reference.nngp(x, diag=True, depth=2),
                               rtol=1e-12)


@pytest.mark.parametrize("bad", ["no", "False", 0, 1, None, 1.0, np.array([True, False])])
def test_diag_and_progress_must_be_bools(bad):
    with pytest.raises(TypeError, match="diag must be True or False"):
        arcflow.nngp(_x(), diag=bad)
    with pytest.raises(TypeError, match="progress must be True or False"):
        arcflow.ntk(_x(), progress=bad)
    with pytest.raises(TypeError, match="progress must be True or False"):
        compat.kernel_value_batch(_x(), 2, progress=bad)


def test_numpy_bools_are_accepted():
    x = _x(5, 3)
    np.testing.assert_allclose(arcflow.ntk(x, diag=np.bool_(True), progress=np.bool_(False), depth=2),
                               reference.ntk(x, diag=True, depth=2), rtol=1e-12)
    assert arcflow.ntk(x, diag=np.bool_(False)).shape == (5, 5)


@pytest.mark.parametrize("dtype, expected", [
    (">f4", np.float32), ("<f4", np.float32), (">f8", np.float64), ("<f8", np.float64), (np.float16, np.float32),
    (np.int32, np.float64), (">i8", np.float64), (np.uint8, np.float64), (np.bool_, np.float64)])
def test_every_input_dtype_gives_the_documented_result_dtype(dtype, expected):
    x = (np.abs(_x(7, 3)) * 3).astype(dtype)
    y = (np.abs(_x(4, 3, seed=1)) * 3).astype(dtype)
    ref = reference.kernels(x.astype(np.float64), y.astype(np.float64), depth=2, b_std=0.1)
    k = arcflow.kernels(x, y, depth=2, b_std=0.1)
    kd = arcflow.kernels(x, depth=2, b_std=0.1, diag=True)
    tol = 1e-4 if expected == np.float32 else 1e-12
    for got, want in ((k.nngp, ref.nngp), (k.ntk, ref.ntk)):
        assert got.dtype == np.dtype(expected) and got.dtype.isnative
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.max(np.abs(want)))
    assert kd.nngp.dtype == np.dtype(expected)
    np.testing.assert_allclose(kd.ntk, reference.ntk(x.astype(np.float64), depth=2, b_std=0.1, diag=True),
                               rtol=tol)


def test_mixed_float32_and_big_endian_float32_stay_float32():
    x = _x(5, 3, dtype=np.float32)
    assert arcflow.nngp(x, x.astype(">f4")).dtype == np.float32
    assert arcflow.nngp(x, x.astype(">f8")).dtype == np.float64


# --------------------------------------------------------------------------------------------------
# 4. Ctrl-C and the GIL


def _slow_rows():
    # RectifiedMonomial(5) takes the generic-order path (about 25 ns per pair and layer): 64 rows x 1280
    # columns x 2000 layers is one engine call of several seconds, with tables of only 50 MB (float32).
    act = RectifiedMonomial(5)
    x, y = _x(64, 4, dtype=np.float32), _x(1280, 4, seed=1, dtype=np.float32)
    return x, y, dict(depth=2000, activation=act, w_std=0.005, b_std=1.0, threads=2)


def _engine(x, y, depth, order=5, w_std=0.005, b_std=1.0):
    cls = _core.FcEngineF32 if x.dtype == np.float32 else _core.FcEngineF64
    act = _core.ActParams(kind=_core.ActKind.monomial, n=order)
    return cls(x, y, _core.FcParams(act=act, depth=depth, w_var=w_std**2, b_var=b_std**2,
                                    gram_scale=w_std**2 / x.shape[1]))


def test_ctrl_c_stops_one_long_engine_call():
    x, y, kw = _slow_rows()
    eng = _engine(x, y, kw["depth"])
    out = np.full((64, 1280), np.nan, np.float32)
    assert _interrupted(lambda: eng.rows(0, 64, out, None, None, 2))
    # Stopped inside the call: a signal noticed only when the call returns finds every entry written.
    assert np.isnan(out).any()
    # Engines still compute after an interrupt, as the reference does.
    ref = reference.ntk(x[:3].astype(np.float64), y[:70].astype(np.float64), depth=30,
                        activation=RectifiedMonomial(5), w_std=0.005, b_std=1.0)
    part = np.empty((3, 70), np.float32)
    _engine(x[:3].copy(), y[:70].copy(), 30).rows(0, 3, None, part, None, 2)
    np.testing.assert_allclose(part, ref, rtol=1e-4)


def test_ctrl_c_in_ntk_raises_keyboard_interrupt_and_leaves_out_partly_written():
    x, y, kw = _slow_rows()
    out = np.full((64, 1280), np.nan, np.float32)
    assert _interrupted(lambda: arcflow.ntk(x, y, out=out, **kw), after=0.5)
    assert np.isnan(out).any()


def test_ctrl_c_stops_building_the_row_tables():
    # The engine's constructor builds the per-row tables (O(n depth): here 600 rows x 10001 layers, a few
    # tenths of a second). The timer thread can send its signal during the build only if the constructor
    # released the GIL, and the constructor raises only if it polls for it: otherwise it returns an engine.
    x = _x(600, 3, dtype=np.float32)
    made = []
    assert _interrupted(lambda: made.append(_engine(x, None, 10_000, order=1, w_std=1.0, b_std=0.0)),
                        after=0.02)
    assert not made


def test_an_interrupted_engine_still_works():
    x, y, kw = _slow_rows()
    assert _interrupted(lambda: arcflow.ntk(x, y, **kw))
    small = _x(70, 4)
    np.testing.assert_allclose(arcflow.ntk(small, depth=3, threads=2), reference.ntk(small, depth=3),
                               rtol=1e-12, atol=1e-14)


def test_progress_bar_names_the_function_called(capsys):
    x = _x(70, 3)
    arcflow.ntk(x, progress=True)
    err = capsys.readouterr().err
    assert "arcflow.ntk" in err and "arcflow.kernels" not in err
    arcflow.nngp(x, progress=True)
    err = capsys.readouterr().err
    assert "arcflow.nngp" in err and "arcflow.kernels" not in err


# --------------------------------------------------------------------------------------------------
# 5. memory of the engine's per-row tables


def test_memory_check_counts_the_row_tables(monkeypatch):
    # 100,000 rows at depth 300: a 0.8 MB result, but 1.2 GB of per-row tables. With 500 MB "available"
    # the check must refuse before allocating anything.
    monkeypatch.setattr(dp, "available_memory", lambda: 500 * 2**20)
    x = np.ones((100_000, 2))
    with pytest.raises(MemoryError) as e:
        arcflow.kernels(x, depth=300, diag=True)
    msg = str(e.value)
    assert msg.startswith("arcflow.kernels:") and "per-row tables" in msg and "rows" in msg, msg
    with pytest.raises(MemoryError, match=r"^arcflow\.nngp:.*per-row tables"):
        arcflow.nngp(x[:10], x, depth=300)  # an 8 MB result, the tables of x2 1.2 GB
    # a small problem still passes the same check
    assert arcflow.nngp(x[:100], depth=3, diag=True).shape == (100,)


def test_kernel_value_batch_memory_error_suggests_what_it_has(monkeypatch):
    monkeypatch.setattr(dp, "available_memory", lambda: 2**20)
    with pytest.raises(MemoryError) as e:
        compat.kernel_value_batch(np.ones((300, 3)), 5)
    msg = str(e.value)
    assert msg.startswith("arcflow.compat.kernel_value_batch:") and "out=" not in msg, msg
    assert "d_max" in msg


@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", "") or "ASAN_OPTIONS" in os.environ,
                    reason="AddressSanitizer: RLIMIT_AS cannot cap a process whose shadow memory is reserved")
def test_allocation_failure_in_the_engine_is_a_memory_error_that_says_what():
    # Address space capped at 1 GB more than in use: the 2 GB of tables cannot be allocated. std::bad_alloc
    # came out as a bare "std::bad_alloc".
    r = _run_python("""
        import resource, numpy as np
        import arcflow
        from arcflow import _dispatch as dp
        dp.available_memory = lambda: None          # skip the up-front check: reach the C++ allocation
        x = np.ones((50_000, 2))
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
        try:
            arcflow.nngp(x, depth=1000, diag=True)
        except MemoryError as e:
            print("MemoryError:", e)
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "MemoryError: arcflow.nngp:" in out and "per-row tables of x1" in out and "50000 rows" in out, out


# --------------------------------------------------------------------------------------------------
# 6. unaligned arrays


def _unaligned(shape, dtype):
    dtype = np.dtype(dtype)
    buf = np.zeros(int(np.prod(shape)) * dtype.itemsize + 1, np.uint8)
    a = np.ndarray(shape, dtype, buffer=buf, offset=1)
    assert not a.flags.aligned
    return a


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unaligned_inputs_are_copied_and_right(dtype):
    x, y = _unaligned((70, 5), dtype), _unaligned((33, 5), dtype)
    x[...] = _x(70, 5, dtype=dtype)
    y[...] = _x(33, 5, seed=1, dtype=dtype)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    ref = reference.kernels(x.astype(np.float64), y.astype(np.float64), depth=3, b_std=0.2)
    k = arcflow.kernels(x, y, depth=3, b_std=0.2)
    assert k.ntk.dtype == dtype
    np.testing.assert_allclose(k.ntk, ref.ntk, rtol=tol, atol=tol * np.max(ref.ntk))
    np.testing.assert_allclose(arcflow.ntk(x, depth=3, b_std=0.2, diag=True),
                               reference.ntk(x.astype(np.float64), depth=3, b_std=0.2, diag=True), rtol=tol)
    np.testing.assert_allclose(compat.kernel_value(x, 3, 1), reference.kernel_value_original(
        x.astype(np.float64), 3, 1), rtol=1e-4 if dtype == np.float32 else 1e-10)


def test_unaligned_out_is_refused():
    x = _x(6, 3)
    out = _unaligned((6, 6), np.float64)
    with pytest.raises(ValueError, match=r"arcflow\.ntk: out\['ntk'\] is not aligned"):
        arcflow.ntk(x, out=out)
    assert not out.any()


@pytest.mark.parametrize("cls, dtype", [(_core.FcEngineF64, np.float64), (_core.FcEngineF32, np.float32)])
def test_bindings_refuse_unaligned_arrays(cls, dtype):
    x = _unaligned((6, 3), dtype)
    x[...] = 1
    relu = _core.FcParams(act=_core.ActParams(kind=_core.ActKind.abrelu), depth=1)
    with pytest.raises(ValueError, match="x1 is not aligned"):
        cls(x, None, relu)
    good = np.ones((6, 3), dtype)
    with pytest.raises(ValueError, match="x2 is not aligned"):
        cls(good, x, relu)
    e = cls(good, None, relu)
    with pytest.raises(ValueError, match="not aligned"):
        e.rows(0, 6, _unaligned((6, 6), dtype), None, None, 1)
    with pytest.raises(ValueError, match="not aligned"):
        e.diag(None, _unaligned((6,), dtype), 1)
    # an output of another dtype would be converted into a temporary copy and the results lost in it
    other = np.float32 if dtype == np.float64 else np.float64
    with pytest.raises((ValueError, TypeError), match="dtype"):
        e.rows(0, 6, np.zeros((6, 6), other), None, None, 1)


# --------------------------------------------------------------------------------------------------
# 7. messages a user meets


@pytest.mark.parametrize("get", [None, 5, ()])
def test_bad_get_names_get(get):
    with pytest.raises(ValueError, match=r"arcflow\.kernels: get must"):
        arcflow.kernels(_x(), get=get)


def test_messages_do_not_print_whole_arrays():
    a, b = np.ones((40, 40)), np.ones((5, 3))
    for call in (lambda: compat.kernel_value(b, a, 3), lambda: compat.kernel_value_batch(b, a),
                 lambda: arcflow.ntk(b, depth=a), lambda: arcflow.ntk(b, w_std=a),
                 lambda: arcflow.ntk(b, threads=a)):
        with pytest.raises((ValueError, TypeError)) as e:
            call()
        msg = str(e.value)
        assert len(msg) < 300 and "(40, 40)" in msg, msg


def test_activation_messages_do_not_print_whole_arrays():
    from arcflow.activations import resolve
    big = np.arange(1000.0)
    for call in (lambda: LeakyReLU(big), lambda: RectifiedMonomial(big), lambda: resolve(big),
                 lambda: arcflow.nngp(_x(), activation=big)):
        with pytest.raises(ValueError) as e:
            call()
        assert "999" not in str(e.value) and len(str(e.value)) < 400, str(e.value)


def test_step_is_named_step():
    with pytest.raises(ValueError, match=r"arcflow\.ntk: Step\(\) has no NTK"):
        arcflow.ntk(_x(), activation="step")
    with pytest.raises(ValueError, match=r"arcflow\.kernels: Step\(\) has no NTK"):
        arcflow.kernels(_x(), activation=Step())


def test_activation_reprs_are_the_names_a_user_writes():
    assert repr(ReLU()) == "ReLU()"
    assert repr(Abs()) == "Abs()"
    assert repr(Identity()) == "Identity()"
    assert repr(LeakyReLU(0.1)) == "LeakyReLU(0.1)"
    assert repr(ABReLU(0.5, 2.0)) == "ABReLU(a=0.5, b=2.0)"
    assert repr(Step()) == "Step()"
    assert repr(RectifiedMonomial(3)) == "RectifiedMonomial(3)"
    for act in (ReLU(), LeakyReLU(0.25), ABReLU(0.5, 2.0), Step(), RectifiedMonomial(3)):
        assert eval(repr(act)) == act


def test_numpy_scalars_are_accepted_as_activation_parameters():
    x = _x(6, 3)
    act = LeakyReLU(np.float32(0.1))
    assert act == LeakyReLU(float(np.float32(0.1)))
    np.testing.assert_allclose(arcflow.ntk(x, depth=2, activation=act),
                               reference.ntk(x, depth=2, activation=LeakyReLU(float(np.float32(0.1)))), rtol=1e-12)
    assert ABReLU(np.float64(-1), np.int32(1)) == Abs()
    m = RectifiedMonomial(np.int64(2))
    assert m == RectifiedMonomial(2) and type(m.n) is int
    np.testing.assert_allclose(arcflow.ntk(x, depth=2, activation=m),
                               reference.ntk(x, depth=2, activation=RectifiedMonomial(2)), rtol=1e-12)
    assert RectifiedMonomial(3.0) == RectifiedMonomial(3)
    for bad in (2.5, np.float64(1.5), -1, np.int8(-2), True, "2", float("nan")):
        with pytest.raises(ValueError, match="RectifiedMonomial"):
            RectifiedMonomial(bad)
    for bad in (np.float32(np.inf), "0.1", None):
        with pytest.raises(ValueError, match="ABReLU"):
            LeakyReLU(bad)


@pytest.mark.parametrize("args, words", [
    (["--threads", "0"], "--threads"), (["--threads", "-3"], "--threads"), (["--threads", "1000000"], "--threads"),
    (["--n", "5"], "--n"), (["--n", "0"], "--n"), (["--n", "x"], "--n"), (["--d-max", "0"], "--d-max"),
    (["--seed", "-1"], "--seed")])
def test_demo_bad_options_are_argparse_errors(args, words, capsys):
    pytest.importorskip("sklearn")
    from arcflow.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["demo"] + args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err


def test_demo_smallest_n_runs():
    pytest.importorskip("sklearn")
    from arcflow.__main__ import main
    assert main(["demo", "--n", "50", "--d-max", "2", "--no-irevnet"]) == 0


def test_demo_max_rel_diff_matches_the_whole_array_formula():
    from arcflow.demo import _max_rel_diff
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4, 5, 5)), rng.normal(size=(3, 4, 5, 5))
    whole = np.max(np.abs(a - b)) / np.max(np.abs(b))
    pairs = [(a[i, j], b[i, j]) for i in range(3) for j in range(4)]
    assert _max_rel_diff(pairs) == whole
    assert _max_rel_diff(pairs, each=True) == max(np.max(np.abs(p - q)) / np.max(np.abs(q)) for p, q in pairs)


def test_get_num_threads_is_within_the_limit():
    assert 1 <= arcflow.get_num_threads() <= MAX
    old = dp._default_threads
    try:
        arcflow.set_num_threads(MAX)
        assert arcflow.get_num_threads() == MAX
    finally:
        dp._default_threads = old
    assert os.cpu_count() is None or MAX >= 4 * os.cpu_count()


def test_default_threads_from_the_environment_stay_within_the_limit():
    env = dict(os.environ, OMP_NUM_THREADS="5000")
    r = subprocess.run([sys.executable, "-c", "import arcflow; print(arcflow.get_num_threads())"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) == MAX
