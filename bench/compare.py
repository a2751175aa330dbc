"""Time arcflow against the NumPy reference, the original NumPy UCI code and neural-tangents, in one run.

    python bench/compare.py [--n 8000] [--d 64] [--depth 5] [--reps 5] [--ref-reps 3]
                            [--n-kvb 3000] [--dtype float64|float32|both] [--threads N]
                            [--nt-python /path/to/python] [--json out.json] [--quick]

Every baseline is timed interleaved with arcflow, rep by rep (A B B A ...), and its ratio is the median
of the per-rep ratios, so that both programs see the same load on a shared machine. Every program runs
in its own subprocess (a "worker": this file with ``--worker``), on the same
inputs (regenerated from the same seed), pinned to the same CPUs (``sched_setaffinity``) and thread
count (arcflow's ``threads=``, threadpoolctl for BLAS, the CPU affinity for XLA). The time is the
median of the repetitions after a warm-up; the peak memory is the worker's ``ru_maxrss`` (the whole
process: interpreter, libraries, inputs, outputs), printed with its increase over the RSS measured
just before the first call (``delta``).

The NumPy baselines (``arcflow.reference``, the original ``kernel_value_batch`` and the roofline's
GEMM / arccos / write measurements) run with ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` removed
from their environment (only there), so NumPy runs at its best; the BLAS that threadpoolctl reports
in that environment is printed.

neural-tangents 0.6.5 needs ``jax==0.5.3``: keep it in its own virtual environment and pass its
interpreter with ``--nt-python`` (its time is measured inside that process: jitted ``kernel_fn``,
warm-up call first, ``block_until_ready``).

The full matrix (x2 = a copy of x1) is timed twice: into fresh outputs (the user's call; on a VM the page
faults of fresh memory cost from one call to the next what they like) and into the same touched ``out=``
buffers every call (the kernel alone), each in its own worker so that the peak memory stays per program.

The floor (roofline, see docs/benchmarking.md)::

    floor = (a) GEMM time of x1 @ x2.T (NumPy, same threads, preallocated output)
          + (b) depth * n1 * n2 / (arccos throughput per core * threads)
          + (c) time to write the two outputs (NNGP and NTK) once: np.empty + fill
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)
NUMPY_ENV_DROP = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
SEED = 20260


# ==================================================================================================
# worker side: one program, printed as one JSON line
# ==================================================================================================
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _inputs(n, d, dtype="float64", normalise=False):
    import numpy as np

    x = np.random.default_rng(SEED).standard_normal((n, d))
    if normalise:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=dtype)


def _time_reps(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return times


def _timings(call, job):
    """The timed repetitions: all at once, or (``serve``) one per "run" line on stdin until "quit".

    The served form lets the driver interleave two programs rep by rep (A B B A ...), so that both
    see the same load on a shared machine and each rep gives one paired ratio.
    """
    if not job.get("serve"):
        return _time_reps(call, job["reps"])
    print("READY", flush=True)
    times = []
    while True:
        cmd = sys.stdin.readline().strip()
        if cmd != "run":  # "quit" or EOF
            return times
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
        del out
        print(f"TIME {times[-1]!r}", flush=True)


def _corner(a, k=6):
    import numpy as np

    return np.asarray(a[:k, :k], dtype=np.float64).tolist()


def _blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"note": "threadpoolctl not installed"}]
    keep = ("user_api", "internal_api", "version", "architecture", "num_threads", "threading_layer",
            "filepath")
    return [{k: v for k, v in info.items() if k in keep} for info in threadpool_info()]


def _limit_blas(threads):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=threads)


def work_arcflow(job):
    import arcflow

    import numpy as np

    x = _inputs(job["n"], job["d"], job["dtype"])
    x2 = x.copy() if job.get("full") else None
    threads = job["threads"]
    # prealloc: write into the same touched out= buffers every call (no page faults: the kernel's time alone)
    out_bufs = None
    if job.get("prealloc"):
        n2 = x.shape[0]
        out_bufs = {"nngp": np.zeros((x.shape[0], n2), x.dtype), "ntk": np.zeros((x.shape[0], n2), x.dtype)}

    def call():
        return arcflow.kernels(x, x2, depth=job["depth"], activation="relu", threads=threads, out=out_bufs)

    rss0 = _rss_mb()
    call()  # warm-up at full size
    out = call()
    res = {"corner_nngp": _corner(out.nngp), "corner_ntk": _corner(out.ntk)}
    del out
    res.update(times=_timings(call, job), rss_before_mb=rss0, warmup="full size",
               blas=_blas_info())
    return res


def work_reference(job):
    from arcflow import reference

    _limit_blas(job["threads"])
    x = _inputs(job["n"], job["d"])
    small = x[:256].copy()
    rss0 = _rss_mb()
    reference.kernels(small, None, depth=job["depth"], activation="relu")  # warm-up, small size

    def call():
        return reference.kernels(x, None, depth=job["depth"], activation="relu")

    times = _timings(call, job)
    out = reference.kernels(x[:64], None, depth=job["depth"], activation="relu")
    return {"times": times, "rss_before_mb": rss0, "warmup": "256 rows",
            "corner_nngp": _corner(out.nngp), "corner_ntk": _corner(out.ntk), "blas": _blas_info()}


def work_original(job):
    from arcflow import reference

    _limit_blas(job["threads"])
    x = _inputs(job["n"], job["d"], normalise=True)
    rss0 = _rss_mb()
    reference.kernel_value_batch_original(x[:256].copy(), job["depth"])  # warm-up, small size
    times = _timings(lambda: reference.kernel_value_batch_original(x, job["depth"]), job)
    out = reference.kernel_value_batch_original(x[:64], job["depth"])
    return {"times": times, "rss_before_mb": rss0, "warmup": "256 rows",
            "corner_kvb": _corner(out[-1][0]), "blas": _blas_info()}


def work_compat(job):
    from arcflow import compat

    x = _inputs(job["n"], job["d"], normalise=True)
    call = lambda: compat.kernel_value_batch(x, job["depth"], threads=job["threads"])  # noqa: E731
    rss0 = _rss_mb()
    call()  # warm-up at full size
    times = _timings(call, job)
    out = compat.kernel_value_batch(x[:64], job["depth"], threads=job["threads"])
    return {"times": times, "rss_before_mb": rss0, "warmup": "full size",
            "corner_kvb": _corner(out[-1][0])}


def work_nt(job):
    import jax

    if job["dtype"] == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import neural_tangents as nt
    from neural_tangents import stax

    layers = [stax.Dense(512, W_std=1.0, b_std=0.0)]
    for _ in range(job["depth"]):
        layers += [stax.Relu(), stax.Dense(512 if _ < job["depth"] - 1 else 1, W_std=1.0, b_std=0.0)]
    if job["depth"] == 0:
        layers = [stax.Dense(1, W_std=1.0, b_std=0.0)]
    _, _, kernel_fn = stax.serial(*layers)
    kfn = jax.jit(kernel_fn, static_argnames="get")
    x = jnp.asarray(_inputs(job["n"], job["d"], job["dtype"]))

    def call():
        k = kfn(x, None, get=("nngp", "ntk"))
        return k.nngp.block_until_ready(), k.ntk.block_until_ready()

    rss0 = _rss_mb()
    call()  # jit compilation + warm-up at full size
    nngp, ntk = call()
    res = {"corner_nngp": _corner(nngp), "corner_ntk": _corner(ntk)}
    del nngp, ntk
    res.update(times=_timings(call, job), rss_before_mb=rss0, warmup="jit + full size",
               versions={"jax": jax.__version__,
                         "neural_tangents": getattr(nt, "__version__", "?")},
               devices=[str(dev) for dev in jax.devices()])
    return res


def _fresh_write(shape, dtype):
    """The floor's (c): a fresh output written once (np.empty + fill, page faults included)."""
    import numpy as np

    buf = np.empty(shape, dtype=dtype)
    buf.fill(1.0)
    return buf


def work_roofline(job):
    import numpy as np

    _limit_blas(job["threads"])
    n1 = n2 = job["n"]
    d, dtype, threads, reps = job["d"], job["dtype"], job["threads"], job["reps"]
    x1 = _inputs(n1, d, dtype)
    x2 = x1.copy()
    res = {"blas": _blas_info()}

    # (a) GEMM x1 @ x2.T into a preallocated (touched) output: compute + one write of n1*n2
    c = np.empty((n1, n2), dtype=dtype)
    np.matmul(x1, x2.T, out=c)
    t = _time_reps(lambda: np.matmul(x1, x2.T, out=c), reps)
    res["gemm_s"] = statistics.median(t)
    res["gemm_gflops"] = 2.0 * n1 * n2 * d / res["gemm_s"] / 1e9
    c = None  # frees the array (a del would leave the lambda above a name that is not bound)
    # the GEMM rate on cache-sized blocks (no memory traffic), one thread per block as a tiled
    # engine uses it: 256 x d times d x 256, per core, times the threads
    b1, b2 = x1[:256].copy(), x2[:256].copy()
    cb = np.empty((256, 256), dtype=dtype)
    inner = 200
    limiter = _limit_blas(1)
    np.matmul(b1, b2.T, out=cb)
    tb = statistics.median(_time_reps(
        lambda: [np.matmul(b1, b2.T, out=cb) for _ in range(inner)], reps))
    if limiter is not None:
        limiter.restore_original_limits()
        _limit_blas(threads)
    res["gemm_block_gflops_per_core"] = 2.0 * 256 * 256 * d * inner / tb / 1e9
    res["gemm_block_s"] = 2.0 * n1 * n2 * d / (res["gemm_block_gflops_per_core"] * 1e9 * threads)

    # (b) NumPy's arccos, compute-bound: a 2048-element array (16 KiB in float64) that stays in L1
    a = np.random.default_rng(1).uniform(-1.0, 1.0, 2048).astype(dtype)
    o = np.empty_like(a)
    np.arccos(a, out=o)
    inner = 2000

    def loop():
        for _ in range(inner):
            np.arccos(a, out=o)

    ta = statistics.median(_time_reps(loop, reps))
    res["numpy_acos_per_core"] = a.size * inner / ta
    # arcflow's own vectorised arccos (one core), where this build exposes it
    try:
        from arcflow import _core
        fn = getattr(_core._bench, "acos_throughput")
    except (ImportError, AttributeError):
        fn = None
    if fn is not None:
        rates = [fn(dtype == "float32", 0.2) for _ in range(reps)]
        res["arcflow_acos_per_core"] = statistics.median(rates)

    # (c) writing the two outputs (NNGP and NTK) once: fresh np.empty + fill (page faults included,
    # as for a fresh result array), and refilling an existing buffer (bandwidth only)
    shape = (2, n1, n2)

    def fresh():
        return _fresh_write(shape, dtype)

    res["write_fresh_s"] = statistics.median(_time_reps(fresh, reps))
    buf = fresh()
    res["write_refill_s"] = statistics.median(_time_reps(lambda: buf.fill(2.0), reps))
    res["write_bytes"] = buf.nbytes
    buf = None  # frees the array (as c above)
    res["threads"] = threads
    return res


def work_roofline_paired(job):
    """The roofline ratio measured rep by rep in one process: each repetition times the full matrix (fresh
    results, then into touched out= buffers that start on a cache line, as arcflow's own results do), the
    GEMM, arcflow's arccos rate and the two writes back to back, and takes the ratio of that repetition; the
    median of the per-rep ratios is the acceptance's "median of ratios measured in one run". The separate
    workers above measure the kernel and the floor minutes apart, under whatever load each one met."""
    import numpy as np

    import arcflow
    from arcflow import _core, _dispatch

    _limit_blas(job["threads"])
    n = job["n"]
    d, dtype, threads, reps, depth = job["d"], job["dtype"], job["threads"], job["reps"], job["depth"]
    x1 = _inputs(n, d, dtype)
    x2 = x1.copy()
    ops = depth * n * n
    single = dtype == "float32"
    c = np.empty((n, n), dtype=dtype)
    outs = {k: _dispatch.allocate((n, n), np.dtype(dtype), "compare") for k in ("nngp", "ntk")}
    for o in outs.values():
        o.fill(0.0)
    refill = np.empty((2, n, n), dtype=dtype)
    refill.fill(0.0)

    def kernel_fresh():
        return arcflow.kernels(x1, x2, depth=depth, activation="relu", threads=threads)

    def kernel_out():
        return arcflow.kernels(x1, x2, depth=depth, activation="relu", threads=threads, out=outs)

    def fresh_write():
        return _fresh_write((2, n, n), dtype)

    def once(fn):
        t0 = time.perf_counter()
        r = fn()
        t = time.perf_counter() - t0
        del r
        return t

    for fn in (kernel_fresh, kernel_out, lambda: np.matmul(x1, x2.T, out=c), fresh_write):
        once(fn)  # warm-up
    rows = []
    for _ in range(reps):
        k_fresh = once(kernel_fresh)
        k_out = once(kernel_out)
        a = once(lambda: np.matmul(x1, x2.T, out=c))
        b = ops / (_core._bench.acos_throughput(single, 0.1) * threads)
        c_fresh = once(fresh_write)
        c_refill = once(lambda: refill.fill(2.0))
        rows.append({"kernel_fresh_s": k_fresh, "kernel_out_s": k_out, "gemm_s": a, "acos_s": b,
                     "write_fresh_s": c_fresh, "write_refill_s": c_refill,
                     "ratio_fresh": k_fresh / (a + b + c_fresh), "ratio_out": k_out / (a + b + c_refill)})
    return {"reps": rows,
            "ratio_fresh": statistics.median(r["ratio_fresh"] for r in rows),
            "ratio_out": statistics.median(r["ratio_out"] for r in rows), "threads": threads}


WORKERS = {"arcflow": work_arcflow, "reference": work_reference, "original": work_original,
           "compat": work_compat, "nt": work_nt, "roofline": work_roofline,
           "roofline_paired": work_roofline_paired}


def worker_main(spec: str) -> None:
    job = json.loads(spec)
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[: job["threads"]])
    with open("/proc/loadavg") as f:
        load0 = f.read().split()[:3]
    t0 = time.perf_counter()
    res = WORKERS[job["kind"]](job)
    with open("/proc/loadavg") as f:
        res["loadavg"] = {"start": load0, "end": f.read().split()[:3]}
    res["peak_mb"] = _peak_mb()
    res["worker_wall_s"] = time.perf_counter() - t0
    res["cpus"] = sorted(os.sched_getaffinity(0))
    print("RESULT " + json.dumps(res), flush=True)


# ==================================================================================================
# driver side
# ==================================================================================================
def _worker_cmd(job, python=None, drop_env=()):
    env = dict(os.environ)
    for key in drop_env:
        env.pop(key, None)
    threads = str(job["threads"])
    env.update(OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if job["kind"] == "nt":
        env.setdefault("JAX_PLATFORMS", "cpu")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return [python or sys.executable, HERE, "--worker", json.dumps(job)], env


def _finish(res, job, drop_env):
    res["median_s"] = statistics.median(res["times"]) if res.get("times") else None
    res["job"] = job
    res["env_dropped"] = [k for k in drop_env if k in os.environ]
    return res


# run_pair's pause before each timed call: the threads of the program that ran last (XLA's pool, OpenMP's team)
# spin for a while after their call returns, and would otherwise run into the other program's timed call.
PAUSE_S = 0.2


def run_pair(job_a, job_b, rounds, kw_a=None, kw_b=None):
    """Run two programs side by side, interleaved rep by rep (A B, B A, A B, ...), with a pause of PAUSE_S
    before every timed call.

    Each worker sets up and warms up first (one after the other), then the driver asks for one timed
    call at a time. Returns both results; the B result carries the per-round ratios t_B / t_A.
    """
    import tempfile

    kws = (kw_a or {}, kw_b or {})
    procs, errs = [], []
    try:
        for job, kw in zip((job_a, job_b), kws):
            cmd, env = _worker_cmd(dict(job, serve=True), kw.get("python"), kw.get("drop_env", ()))
            err = tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=err, text=True, bufsize=1)
            procs.append(proc)
            errs.append(err)
            _expect(proc, err, "READY", job)

        times = ([], [])
        for r in range(rounds):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for i in order:
                time.sleep(PAUSE_S)
                procs[i].stdin.write("run\n")
                procs[i].stdin.flush()
                times[i].append(float(_expect(procs[i], errs[i], "TIME ", (job_a, job_b)[i])))
        out = []
        for i, (proc, job, kw) in enumerate(zip(procs, (job_a, job_b), kws)):
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            res = json.loads(_expect(proc, errs[i], "RESULT ", job))
            proc.wait(timeout=600)
            out.append(_finish(res, job, kw.get("drop_env", ())))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for err in errs:
            err.close()
    res_a, res_b = out
    ratios = [tb / ta for ta, tb in zip(res_a["times"], res_b["times"])]
    res_b["paired_ratios"] = ratios
    res_b["paired_ratio_median"] = statistics.median(ratios)
    res_b["paired_with"] = {"job": job_a, "times": res_a["times"]}
    return res_a, res_b


def _expect(proc, err, prefix, job):
    """Read the worker's stdout until a line starting with prefix; return the rest of that line."""
    while True:
        line = proc.stdout.readline()
        if not line:
            err.seek(0)
            tail = err.read()[-2000:]
            raise RuntimeError(f"worker {job['kind']} ended before {prefix.strip()} "
                               f"(rc {proc.poll()}):\n{tail}")
        if line.startswith(prefix):
            return line[len(prefix):].strip()


def run_worker(job, python=None, drop_env=(), timeout=3600):
    cmd, env = _worker_cmd(job, python, drop_env)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return _finish(json.loads(line[len("RESULT "):]), job, drop_env)
    tail = (proc.stderr or proc.stdout)[-2000:]
    raise RuntimeError(f"worker {job['kind']} failed (rc {proc.returncode}, "
                       f"{time.perf_counter() - t0:.0f} s):\n{tail}")


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _machine():
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus_online": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Core(s) per socket", "Thread(s) per core",
                               "Socket(s)", "L2 cache", "L3 cache", "Hypervisor vendor"):
                info[key.strip()] = val.strip()
        flags = next((ln for ln in out.splitlines() if ln.startswith("Flags")), "")
        info["simd"] = [f for f in ("avx2", "fma", "avx512f") if f" {f}" in flags]
    except OSError:
        pass
    try:
        repo = os.path.dirname(os.path.dirname(HERE))
        info["git_head"] = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"],
                                          capture_output=True, text=True).stdout.strip()
        probe = subprocess.run([sys.executable, "-c", "import arcflow; print(arcflow.__file__)"],
                               capture_output=True, text=True)
        info["arcflow_imported_from"] = probe.stdout.strip()
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
        with open("/proc/loadavg") as f:
            info["loadavg_at_start"] = f.read().split()[:3]
    except OSError:
        pass
    return info


def _nt_python(arg):
    if arg:
        return arg
    probe = subprocess.run([sys.executable, "-c", "import neural_tangents"], capture_output=True)
    return sys.executable if probe.returncode == 0 else None


def _rel_diff(a, b, part="all"):
    """max |a - b| / max |b| over the whole block, its off-diagonal or its diagonal entries."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    mask = np.ones(a.shape, dtype=bool)
    if part != "all":
        eye = np.eye(a.shape[0], a.shape[1], dtype=bool)
        mask = eye if part == "diag" else ~eye
    return float(np.max(np.abs(a - b)[mask]) / np.max(np.abs(b)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8000, help="rows of x1 = x2 (default 8000)")
    p.add_argument("--d", type=int, default=64, help="features (default 64)")
    p.add_argument("--depth", type=int, default=5, help="hidden ReLU layers (default 5)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--ref-reps", type=int, default=3,
                   help="repetitions of the slow NumPy programs (reference, original; default 3)")
    p.add_argument("--n-kvb", type=int, default=3000,
                   help="N of the kernel_value_batch comparison (default 3000)")
    p.add_argument("--dtype", choices=("float64", "float32", "both"), default="both")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads (and CPUs) for every program (default: all this process may use)")
    p.add_argument("--nt-python", default=None,
                   help="python of a venv with neural-tangents 0.6.5 + jax 0.5.3 (default: this "
                        "python if it imports neural_tangents, else neural-tangents is skipped)")
    p.add_argument("--skip", default="",
                   help="comma list of programs to leave out: reference,original,nt,threads,roofline")
    p.add_argument("--json", default=None, help="write every number to this file")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: n 1000, n-kvb 500, 2 repetitions")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return 0
    if args.quick:
        args.n, args.n_kvb = min(args.n, 1000), min(args.n_kvb, 500)
        args.reps, args.ref_reps = min(args.reps, 2), min(args.ref_reps, 2)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    dtypes = ("float64", "float32") if args.dtype == "both" else (args.dtype,)
    nt_python = None if "nt" in skip else _nt_python(args.nt_python)
    T, n, d, depth = args.threads, args.n, args.d, args.depth
    base = {"n": n, "d": d, "depth": depth, "threads": T}

    machine = _machine()
    results = {}
    t_start = time.perf_counter()

    def go(key, job, **kw):
        _log(f"[{time.perf_counter() - t_start:6.0f} s] {key} ...")
        try:
            results[key] = run_worker(job, **kw)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            _log(f"    failed: {exc}")
            results[key] = {"error": str(exc), "job": job}
            return
        r = results[key]
        if r.get("median_s") is not None:
            _log(f"    median {r['median_s']:.3f} s  peak {r['peak_mb']:.0f} MB")

    def go_pair(key_a, job_a, key_b, job_b, rounds, kw_a=None, kw_b=None):
        _log(f"[{time.perf_counter() - t_start:6.0f} s] {key_b} interleaved with {key_a} ...")
        try:
            res_a, res_b = run_pair(job_a, job_b, rounds, kw_a, kw_b)
        except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
            _log(f"    failed: {exc}")
            results[key_b] = {"error": str(exc), "job": job_b}
            return
        results.setdefault(key_a, res_a)
        results[key_b] = res_b
        _log(f"    medians {res_a['median_s']:.3f} s / {res_b['median_s']:.3f} s, "
             f"paired ratio {res_b['paired_ratio_median']:.2f}, peak {res_b['peak_mb']:.0f} MB")

    # arcflow alone (its rows), then every baseline interleaved rep by rep with arcflow
    for dt in dtypes:
        go(f"arcflow/{dt}", dict(base, kind="arcflow", dtype=dt, reps=args.reps))
        go(f"arcflow_full/{dt}", dict(base, kind="arcflow", dtype=dt, reps=args.reps, full=True))
        go(f"arcflow_full_out/{dt}", dict(base, kind="arcflow", dtype=dt, reps=args.reps, full=True,
                                          prealloc=True))
    if "reference" not in skip:
        go_pair("arcflow@reference/float64", dict(base, kind="arcflow", dtype="float64"),
                "reference/float64", dict(base, kind="reference", dtype="float64"), args.ref_reps,
                kw_b={"drop_env": NUMPY_ENV_DROP})
    if nt_python:
        for dt in dtypes:
            go_pair(f"arcflow@nt/{dt}", dict(base, kind="arcflow", dtype=dt),
                    f"nt/{dt}", dict(base, kind="nt", dtype=dt), args.reps,
                    kw_b={"python": nt_python})
    kvb = dict(base, n=args.n_kvb, dtype="float64")
    if "original" not in skip:
        go_pair("compat/float64", dict(kvb, kind="compat"), "original/float64",
                dict(kvb, kind="original"), args.ref_reps, kw_b={"drop_env": NUMPY_ENV_DROP})
    else:
        go("compat/float64", dict(kvb, kind="compat", reps=args.reps))
    if "threads" not in skip and T >= 2:
        go_pair("threads2/float64", dict(base, kind="arcflow", dtype="float64", threads=2),
                "threads1/float64", dict(base, kind="arcflow", dtype="float64", threads=1),
                args.reps)
    if "roofline" not in skip:
        for dt in dtypes:
            go(f"roofline/{dt}", dict(base, kind="roofline", dtype=dt, reps=args.reps),
               drop_env=NUMPY_ENV_DROP)
        for dt in dtypes:
            go(f"roofline_paired/{dt}", dict(base, kind="roofline_paired", dtype=dt, reps=args.reps),
               drop_env=NUMPY_ENV_DROP)

    with open("/proc/loadavg") as f:
        machine["loadavg_at_end"] = f.read().split()[:3]
    machine["run_wall_s"] = round(time.perf_counter() - t_start, 1)
    summary = report(results, args, machine, dtypes, nt_python)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
                       "machine": machine, "args": vars(args), "summary": summary,
                       "results": results}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


def report(results, args, machine, dtypes, nt_python):
    T, n, depth = args.threads, args.n, args.depth
    lines = []
    say = lines.append
    cores = machine.get("CPU(s)", "?")
    say(f"machine: {machine.get('Model name', platform.processor())}, {cores} CPUs "
        f"({', '.join(machine.get('simd', []))}), {machine.get('mem_total_gb', '?')} GB; "
        f"load average at start {' '.join(machine.get('loadavg_at_start', []))}, at end "
        f"{' '.join(machine.get('loadavg_at_end', []))} (whole run {machine.get('run_wall_s')} s)")
    say(f"workload: NNGP + NTK, ReLU, depth {depth}, d = {args.d}, n1 = n2 = {n} (x2=None unless "
        f"noted); kernel_value_batch(X, {depth}) at N = {args.n_kvb}; {T} thread(s) for every "
        f"program; median of {args.reps} reps after a warm-up ({args.ref_reps} reps for the NumPy "
        f"reference and the original code, warmed up on 256 rows)")
    rr = results.get("roofline/float64") or results.get(f"roofline/{dtypes[0]}") or {}
    blas = [b for b in rr.get("blas", []) if b.get("user_api") == "blas"]
    if blas:
        b = blas[0]
        say(f"NumPy BLAS (baseline env, {', '.join(NUMPY_ENV_DROP)} unset): {b.get('internal_api')} "
            f"{b.get('version')}, kernel {b.get('architecture')}, {b.get('num_threads')} thread(s)")
    dropped = sorted({k for r in results.values() for k in r.get("env_dropped", [])})
    if dropped:
        say(f"  (removed from the NumPy baselines' environment: {', '.join(dropped)})")
    say("")

    def med(key):
        r = results.get(key) or {}
        return r.get("median_s")

    rows = []  # (label, dtype, n, key, ratio-base key)
    for dt in dtypes:
        rows.append(("arcflow.kernels", dt, n, f"arcflow/{dt}", f"arcflow/{dt}"))
        rows.append(("arcflow.kernels (x2 = x1: full matrix)", dt, n, f"arcflow_full/{dt}",
                     f"arcflow/{dt}"))
        rows.append(("  same, into touched out= buffers", dt, n, f"arcflow_full_out/{dt}", f"arcflow/{dt}"))
        if dt == "float64":
            rows.append(("arcflow.reference.kernels (NumPy)", dt, n, "reference/float64",
                         "arcflow/float64"))
        rows.append(("neural-tangents 0.6.5, jit kernel_fn", dt, n, f"nt/{dt}", f"arcflow/{dt}"))
    rows.append((f"arcflow.compat.kernel_value_batch(X, {depth})", "float64", args.n_kvb,
                 "compat/float64", "compat/float64"))
    rows.append((f"original NumPy kernel_value_batch(X, {depth})", "float64", args.n_kvb,
                 "original/float64", "compat/float64"))

    head = f"{'program':<42} {'dtype':<8} {'N':>6} {'median s':>9} {'min s':>7} {'reps':>4} " \
           f"{'x arcflow':>9} {'peak MB':>8} {'delta MB':>8}"
    say(head)
    say("-" * len(head))
    summary = {"rows": []}
    for label, dt, nn, key, base_key in rows:
        r = results.get(key)
        if r is None:
            if key.startswith("nt/") and not nt_python:
                say(f"{label:<42} {dt:<8} {nn:>6} {'(not run: skipped, or neural-tangents not '}"
                    f"importable: pass --nt-python)")
            continue
        if "error" in r:
            say(f"{label:<42} {dt:<8} {nn:>6} failed: {r['error'].splitlines()[0][:60]}")
            continue
        m, mb = r["median_s"], med(base_key)
        if "paired_ratio_median" in r:
            ratio = r["paired_ratio_median"]  # interleaved with arcflow, median of per-rep ratios
        else:
            ratio = m / mb if (mb and key != base_key) else (1.0 if key == base_key else float("nan"))
        delta = r["peak_mb"] - r["rss_before_mb"]
        say(f"{label:<42} {dt:<8} {nn:>6} {m:9.3f} {min(r['times']):7.3f} {len(r['times']):>4} {ratio:9.2f} "
            f"{r['peak_mb']:8.0f} {delta:8.0f}")
        summary["rows"].append({"program": label, "dtype": dt, "n": nn, "median_s": m,
                                "reps": len(r["times"]), "times": r["times"],
                                "ratio_vs_arcflow": ratio, "peak_mb": r["peak_mb"],
                                "delta_mb": delta})
    say("(x arcflow: for the baselines, the median over reps of t_baseline / t_arcflow, the two run "
        "interleaved rep by rep (A B B A ...) so that both see the same load; for arcflow's own rows, "
        "median / median. peak MB = the worker's ru_maxrss, delta = peak minus the RSS just before "
        "the warm-up)")
    for key in ("reference/float64", "nt/float64", "nt/float32", "original/float64"):
        r = results.get(key, {})
        if "paired_with" in r:
            pa = r["paired_with"]["times"]
            say(f"  {key}: arcflow side of the pair median {statistics.median(pa):.3f} s; "
                f"per-rep ratios {', '.join(f'{q:.1f}' for q in r['paired_ratios'])}")
    out_mb = 2 * n * n * 8 / 2**20
    say(f"(one float64 output pair NNGP + NTK at N = {n}: {out_mb:.0f} MB)")

    # sanity: every program computed the same numbers
    checks = []
    a64 = results.get("arcflow/float64", {})
    for key in ("arcflow_full/float64", "arcflow_full_out/float64", "reference/float64", "nt/float64", "nt/float32",
                "arcflow/float32"):
        r = results.get(key, {})
        if "corner_ntk" in r and "corner_ntk" in a64:
            checks.append(f"{key.replace('/', ' ')} "
                          f"{_rel_diff(r['corner_ntk'], a64['corner_ntk'], 'off'):.1e} / "
                          f"{_rel_diff(r['corner_ntk'], a64['corner_ntk'], 'diag'):.1e}")
    c, o = results.get("compat/float64", {}), results.get("original/float64", {})
    if "corner_kvb" in c and "corner_kvb" in o:
        checks.append(f"original vs compat {_rel_diff(c['corner_kvb'], o['corner_kvb']):.1e}")
    if checks:
        say("same numbers? max rel. difference of a 6 x 6 NTK corner vs arcflow float64, "
            "off-diagonal / diagonal: "
            + ", ".join(checks))

    t1, t2 = med("threads1/float64"), med("threads2/float64")
    if t1 and t2:
        sp = results["threads1/float64"].get("paired_ratio_median", t1 / t2)
        say(f"threads: arcflow float64 at N = {n}: 1 thread {t1:.3f} s, 2 threads {t2:.3f} s "
            f"(medians, interleaved), speed-up {sp:.2f}x (median of per-rep ratios)")
        summary["threads"] = {"t1_s": t1, "t2_s": t2, "speedup": sp}

    summary["floor"] = {}
    for dt in dtypes:
        r = results.get(f"roofline/{dt}")
        if not r or "error" in r:
            continue
        say("")
        ops = depth * n * n
        acos = r["numpy_acos_per_core"] * T
        b = ops / acos
        a, cw = r["gemm_s"], r["write_fresh_s"]
        floor = a + b + cw
        say(f"floor, {dt}, {T} thread(s), n1 = n2 = {n}, d = {args.d}, depth {depth}:")
        say(f"  (a) {'GEMM x1 @ x2.T, NumPy, out= preallocated':<48} {a:8.3f} s  "
            f"({r['gemm_gflops']:.0f} GFLOP/s; 256 x 256 blocks in cache, 1 thread each: "
            f"{r['gemm_block_gflops_per_core']:.0f} GFLOP/s per core -> {r['gemm_block_s']:.3f} s)")
        say(f"  (b) {f'{depth} n1 n2 arccos at NumPy rate x {T} core(s)':<48} {b:8.3f} s  "
            f"(np.arccos on 2048 elements in L1: {r['numpy_acos_per_core'] / 1e9:.3f} G/s per core)")
        say(f"  (c) {'write NNGP + NTK once, np.empty + fill':<48} {cw:8.3f} s  "
            f"({r['write_bytes'] / 2**20:.0f} MB; refill of an existing buffer "
            f"{r['write_refill_s']:.3f} s)")
        say(f"  floor = a + b + c = {floor:.3f} s")
        f = {"gemm_s": a, "gemm_gflops": r["gemm_gflops"],
             "gemm_block_gflops_per_core": r["gemm_block_gflops_per_core"],
             "numpy_acos_per_core": r["numpy_acos_per_core"], "acos_s": b, "write_s": cw,
             "write_refill_s": r["write_refill_s"], "floor_s": floor}
        # The symmetric call computes half the pairs (one triangle) and still writes both whole outputs: its
        # floor is a/2 + b/2 + c, the work it actually does.
        floor_sym = a / 2 + b / 2 + cw
        say(f"  floor of the symmetric call (x2 = None: half the pairs, whole outputs) = a/2 + b/2 + c = "
            f"{floor_sym:.3f} s")
        f["floor_symmetric_s"] = floor_sym
        for label, key, fl in (("arcflow (x2 = x1, full)", f"arcflow_full/{dt}", floor),
                               ("arcflow (x2 = None)", f"arcflow/{dt}", floor_sym)):
            m = med(key)
            if m:
                say(f"  {label:<24} time / its floor = {m / fl:.2f}")
                f[f"ratio_{key.split('/')[0]}"] = m / fl
        if "arcflow_acos_per_core" in r:
            b2 = ops / (r["arcflow_acos_per_core"] * T)
            floor2 = a + b2 + cw
            say(f"  with arcflow's own vectorised arccos ({r['arcflow_acos_per_core'] / 1e9:.3f} G/s "
                f"per core, _core._bench.acos_throughput): (b) = {b2:.3f} s, floor = {floor2:.3f} s")
            f.update(arcflow_acos_per_core=r["arcflow_acos_per_core"], floor_arcflow_acos_s=floor2)
            for label, key, fl in (("arcflow (x2 = x1, full)", f"arcflow_full/{dt}", floor2),
                                   ("arcflow (x2 = None)", f"arcflow/{dt}", a / 2 + b2 / 2 + cw)):
                m = med(key)
                if m:
                    say(f"  {label:<24} time / that floor (half of a and b when symmetric) = {m / fl:.2f}")
                    f[f"ratio_acos_{key.split('/')[0]}"] = m / fl
            # The kernel alone: the full matrix into touched out= buffers, against the floor whose (c) is the
            # refill of an existing buffer (no page faults on either side; on a VM their cost varies a lot).
            m = med(f"arcflow_full_out/{dt}")
            if m:
                floor3 = a + b2 + r["write_refill_s"]
                say(f"  {'arcflow (full, out=)':<24} time / that floor with (c) = refill ({floor3:.3f} s) = "
                    f"{m / floor3:.2f}")
                f.update(floor_arcflow_acos_refill_s=floor3, ratio_acos_refill_arcflow_full_out=m / floor3)
        summary["floor"][dt] = f
    summary["floor_paired"] = {}
    for dt in dtypes:
        r = results.get(f"roofline_paired/{dt}")
        if not r or "error" in r or "reps" not in r:
            continue
        say("")
        say(f"roofline rep by rep, {dt}, full matrix, one worker (kernel, GEMM, arcflow's arccos rate and the writes "
            f"timed back to back in each repetition; floor with arcflow's arccos):")
        per_fresh = ", ".join(f"{x['ratio_fresh']:.2f}" for x in r["reps"])
        per_out = ", ".join(f"{x['ratio_out']:.2f}" for x in r["reps"])
        say(f"  fresh results vs floor with (c) = np.empty + fill: median {r['ratio_fresh']:.2f} (per rep {per_fresh})")
        say(f"  into touched out= buffers on a cache line vs floor with (c) = refill: median {r['ratio_out']:.2f} "
            f"(per rep {per_out})")
        summary["floor_paired"][dt] = r
    say("")
    say("note: the machine is a shared VM (other jobs may run at the same time); compare the ratios, "
        "and quote absolute times only with this machine.")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    sys.exit(main())
