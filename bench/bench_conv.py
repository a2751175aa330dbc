"""Time the convolutional kernels of arcflow.stax.serial (CNTK / CNN-GP) against neural-tangents 0.6.5, in one run.

    python bench/bench_conv.py --nt-python /path/to/ntvenv/bin/python [--threads 2] [--reps 3] [--quick]
                               [--nt-n 32,64] [--alone-n16 2000] [--alone-n32 500] [--json out.json]

Workload: the depth-5 ReLU CNTK of the convolutional-kernels issue, with a GlobalAvgPool readout (CNTK-GAP) and
with a Flatten readout (CNTK-Flatten)::

    serial(*[Conv(c, (3, 3), padding="SAME", W_std=sqrt(2), b_std=0.1), Relu()] * 5,
           GlobalAvgPool() or Flatten(), Dense(1, W_std=sqrt(2), b_std=0.1))

the same layers on both sides (neural-tangents' ``stax.serial`` with the same names and arguments), NNGP and NTK
(``get=("nngp", "ntk")``, x2 = None), float64 and float32 (neural-tangents: float64 = ``jax_enable_x64``, float32 =
jax without x64). Random images, standard normal, 16 x 16 x 3 (and 32 x 32 x 3 below).

1. Against neural-tangents at sizes where it finishes in minutes (16 x 16 x 3 images; ``--nt-n``, default 32 and
   64 for GAP; ``--nt-n-flatten``, default 32, 64 and 256 for Flatten, whose network neural-tangents evaluates on
   same-position pairs only, an (n1, n2, H W) tensor): its ``kernel_fn`` jitted as its users do
   (``jax.jit(kernel_fn, static_argnames="get")``); for GAP above ``--nt-unbatched-max`` images (default 32)
   ``nt.batch(kernel_fn, batch_size=--nt-batch)`` (default 16; jitted inside nt.batch), which is how
   neural-tangents keeps the (n1, n2, H, W, H, W) tensor in memory.
   Each side runs in its own worker process (bench/compare.py's plumbing) started under ``taskset`` on the same
   CPUs, with the same thread count (arcflow: ``threads=``, or ``arcflow.set_num_threads``; XLA:
   ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=T`` and the CPU affinity). Both
   workers warm up with one full-size call (neural-tangents: the jit compilation, excluded from the time), then
   one timed call at a time, interleaved (A B B A ...). Reported: medians of ``--reps``, the ratio of the medians
   and the median of the per-repetition ratios, the peak memory of each worker (``ru_maxrss``: the whole process,
   interpreter, libraries, inputs and outputs included) and the agreement of the two results (max |a - b| / max |b|,
   off the diagonal and on it), so that the benchmark cannot time a wrong answer.
2. arcflow alone at sizes neural-tangents cannot reach here: CNTK-GAP and CNTK-Flatten on ``--alone-n16`` images of
   16 x 16 x 3 and ``--alone-n32`` images of 32 x 32 x 3 (the issue's sizes: 2000 and 500; the defaults are a
   quicker 200 and 50), ``--alone-reps`` timed calls (default 1) after a warm-up on 8 images. Reported: time, peak
   memory against the budget "output + per-thread scratch + 200 MB" (output: the two n x n arrays; scratch: what
   the engine declares per thread, ``ConvEngineF64.scratch_bytes``, about 5 (H W)^2 values for GAP and 5 H W for
   Flatten; the per-image variance tables are inside the 200 MB), the cost per pair of images against the floor,
   and a 4 x 4 corner of the result against arcflow's float64 NumPy evaluation (``arcflow.reference_conv``).

The floor per pair of images (x2 = None: n (n + 1) / 2 pairs), for the 5 conv layers::

    floor = 5 * P * 9 * (2 if the NTK is computed) multiply-adds / FMA rate
          + 5 * P arccos / arccos rate

with P = (H W)^2 pixel pairs for GlobalAvgPool (every pair of positions) and P = H W for Flatten (same-position
pairs only). The FMA rate is measured on the same threads as the multiply-adds per second of a NumPy matmul
(2048 x 2048, float32 or float64: the BLAS GEMM is the proxy for the machine's attainable FMA rate); the arccos
rate is ``arcflow._core._bench.acos_throughput`` (arcflow's vectorised arccos, one core) times the threads.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time

import compare  # bench/compare.py: worker plumbing, machine description

DEPTH, W_STD, B_STD, CHANNELS, WIDTH = 5, math.sqrt(2.0), 0.1, 3, 256
SCRATCH_ARRAYS = 4  # without the engine's own figure: Sigma and Theta of a pair and one copy of each
DROP = compare.NUMPY_ENV_DROP


# ---------------------------------------------------------------------------------------------- workers
def _images(n, hw, dtype):
    import numpy as np

    x = np.random.default_rng(compare.SEED).standard_normal((n, hw, hw, CHANNELS))
    return np.ascontiguousarray(x, dtype=dtype)


def _arcflow_net(readout):
    from arcflow import stax

    layers = []
    for _ in range(DEPTH):
        layers += [stax.Conv(WIDTH, (3, 3), padding="SAME", W_std=W_STD, b_std=B_STD), stax.Relu()]
    layers += [stax.GlobalAvgPool() if readout == "gap" else stax.Flatten(), stax.Dense(1, W_std=W_STD, b_std=B_STD)]
    return stax.serial(*layers)


def _arcflow_call(kfn, threads):
    """kfn(x1, None, get) on `threads` threads: the threads= argument where the kernel function takes one."""
    import arcflow

    if "threads" in inspect.signature(kfn.__call__).parameters:
        return lambda x: kfn(x, None, ("nngp", "ntk"), threads=threads)
    arcflow.set_num_threads(threads)
    return lambda x: kfn(x, None, ("nngp", "ntk"))


def _save(path, k):
    import numpy as np

    np.savez(path, nngp=np.asarray(k.nngp, dtype=np.float64), ntk=np.asarray(k.ntk, dtype=np.float64))


def work_arcflow(job):
    import numpy as np

    import arcflow

    compare._limit_blas(job["threads"])
    kfn = _arcflow_net(job["readout"])
    fn = _arcflow_call(kfn, job["threads"])
    x = _images(job["n"], job["hw"], job["dtype"])
    rss0 = compare._rss_mb()
    res = {"versions": {"arcflow": getattr(arcflow, "__version__", "?"), "numpy": np.__version__},
           "rss_before_mb": rss0}
    if job.get("alone"):  # big sizes: warm up on 8 images; check a corner against the NumPy evaluation after the
        fn(x[:8])          # peak memory of the timed calls is read (the check's own buffers are not arcflow's)
        times, k = [], None
        for _ in range(job["reps"]):
            k = None
            t0 = time.perf_counter()
            k = fn(x)
            times.append(time.perf_counter() - t0)
        res.update(times=times, peak_timed_mb=compare._peak_mb(), out_bytes=int(k.nngp.nbytes + k.ntk.nbytes))
        res["corner"] = _corner_check(kfn, x, k)
        return res
    k = fn(x)  # warm-up at full size; its result is the one compared with neural-tangents'
    if job.get("save"):
        _save(job["save"], k)
    del k
    res["times"] = compare._timings(lambda: fn(x), job)
    return res


def _corner_check(kfn, x, k, m=4):
    """max |a - b| / max |b| of k[:m, :m] against arcflow.reference_conv (exact float64 NumPy) on x[:m]."""
    import numpy as np

    ops = getattr(kfn, "_ops", None)
    try:
        from arcflow.reference_conv import evaluate
    except ImportError:
        evaluate = None
    if ops is None or evaluate is None:
        return None
    ref = evaluate(ops, x[:m].astype(np.float64), None, diag=False, want_nngp=True, want_ntk=True,
                   where="bench_conv")
    return {g: float(np.max(np.abs(np.asarray(getattr(k, g)[:m, :m], np.float64) - getattr(ref, g)))
                     / np.max(np.abs(getattr(ref, g)))) for g in ("nngp", "ntk")}


def work_nt(job):
    import jax

    if job["dtype"] == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import neural_tangents as nt
    from neural_tangents import stax

    layers = []
    for _ in range(DEPTH):
        layers += [stax.Conv(WIDTH, (3, 3), padding="SAME", W_std=W_STD, b_std=B_STD), stax.Relu()]
    layers += [stax.GlobalAvgPool() if job["readout"] == "gap" else stax.Flatten(),
               stax.Dense(1, W_std=W_STD, b_std=B_STD)]
    kernel_fn = stax.serial(*layers)[2]
    if job.get("batch"):
        kfn = nt.batch(kernel_fn, batch_size=job["batch"])  # jitted inside
    else:
        kfn = jax.jit(kernel_fn, static_argnames="get")
    x = jnp.asarray(_images(job["n"], job["hw"], job["dtype"]))

    def call():
        return jax.block_until_ready(kfn(x, None, get=("nngp", "ntk")))

    rss0 = compare._rss_mb()
    t0 = time.perf_counter()
    k = call()  # jit compilation + warm-up at full size
    warm = time.perf_counter() - t0
    if job.get("save"):
        _save(job["save"], k)
    del k
    return {"times": compare._timings(call, job), "rss_before_mb": rss0, "warmup_s": warm,
            "versions": {"jax": jax.__version__, "neural_tangents": getattr(nt, "__version__", "?")}}


def work_floor(job):
    """The floor's two rates on the job's threads: FMA/s of a NumPy matmul, arcflow's arccos per second."""
    import numpy as np

    from arcflow import _core

    compare._limit_blas(job["threads"])
    m, dt = 2048, job["dtype"]
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((m, m)).astype(dt), rng.standard_normal((m, m)).astype(dt)
    c = np.empty((m, m), dtype=dt)
    np.matmul(a, b, out=c)
    t = statistics.median(compare._time_reps(lambda: np.matmul(a, b, out=c), job["reps"]))
    acos = statistics.median(_core._bench.acos_throughput(dt == "float32", 0.2) for _ in range(job["reps"]))
    return {"fma_per_s": m ** 3 / t, "acos_per_s_core": acos, "blas": compare._blas_info()}


# ---------------------------------------------------------------------------------------------- driver
def _worker_cmd(job, python=None, drop_env=()):
    """compare's worker command, started under taskset on the job's CPUs; XLA's thread flags for neural-tangents."""
    cmd, env = _compare_worker_cmd(job, python, drop_env)
    cpus = sorted(os.sched_getaffinity(0))[: job["threads"]]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", ",".join(map(str, cpus))] + cmd
    if job["kind"] == "nt":
        flags = f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={job['threads']}"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    return cmd, env


_compare_worker_cmd = compare._worker_cmd


def _agreement(path_a, path_b):
    import numpy as np

    a, b = np.load(path_a), np.load(path_b)
    out = {}
    for g in ("nngp", "ntk"):
        x, y = a[g], b[g]
        eye = np.eye(*x.shape, dtype=bool)
        scale = np.max(np.abs(y))
        out[g] = {"off": float(np.max(np.abs(x - y)[~eye]) / scale), "diag": float(np.max(np.abs(x - y)[eye]) / scale)}
    return out


def _pair_work(readout, hw):
    """Per pair of images: (multiply-adds per kernel array, arccos) of the 5 conv layers."""
    p = (hw * hw) ** 2 if readout == "gap" else hw * hw
    return DEPTH * p * 9, DEPTH * p


def _scratch_bytes(readout, hw, dtype):
    """Per-thread scratch of the engine, as it declares it (the memory check it makes before a call); without the
    engine, SCRATCH_ARRAYS (H W)^2 (GAP) or H W (Flatten) float64 arrays."""
    try:
        from arcflow import _core, stax
        engine = _core.ConvEngineF32 if dtype == "float32" else _core.ConvEngineF64
        return int(engine.scratch_bytes(hw, hw, CHANNELS, stax._engine_ops(_arcflow_net(readout)._ops)))
    except (ImportError, AttributeError):
        return SCRATCH_ARRAYS * ((hw * hw) ** 2 if readout == "gap" else hw * hw) * 8


def _budget_mb(n, hw, readout, dtype, threads):
    """The acceptance's memory budget: output (two n x n arrays) + per-thread scratch + 200 MB."""
    out = 2 * n * n * (4 if dtype == "float32" else 8)
    scratch = threads * _scratch_bytes(readout, hw, dtype)
    return (out + scratch) / 2**20 + 200, out / 2**20, scratch / 2**20


def _fmt(v, spec, width):
    return f"{'-':>{width}}" if v is None else f"{v:{width}{spec}}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nt-python", default=None, help="python of a venv with neural-tangents 0.6.5 + jax 0.5.3; "
                   "without it the comparison is skipped")
    p.add_argument("--threads", type=int, default=2, help="threads (and CPUs) of every worker (default 2)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of the comparison (default 3)")
    p.add_argument("--dtype", choices=("float64", "float32", "both"), default="both")
    p.add_argument("--readout", choices=("gap", "flatten", "both"), default="both")
    p.add_argument("--nt-n", default="32,64", help="image counts of the GAP comparison, 16 x 16 x 3 (default 32,64)")
    p.add_argument("--nt-n-flatten", default="32,64,256", help="image counts of the Flatten comparison")
    p.add_argument("--nt-batch", type=int, default=16,
                   help="neural-tangents' batch_size for GAP above --nt-unbatched-max images")
    p.add_argument("--nt-unbatched-max", type=int, default=32)
    p.add_argument("--alone-n16", type=int, default=200, help="images of 16 x 16 x 3, arcflow alone (issue: 2000)")
    p.add_argument("--alone-n32", type=int, default=50, help="images of 32 x 32 x 3, arcflow alone (issue: 500)")
    p.add_argument("--alone-reps", type=int, default=1)
    p.add_argument("--skip", default="", help="comma list of: nt, alone, arcflow (arcflow: "
                   "neural-tangents' side of the comparison alone)")
    p.add_argument("--json", default=None, help="write every number, the machine and the command to this file")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: comparison at n = 8, arcflow alone at 16 and 4 images, 2 repetitions")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:  # compare's worker_main, with this file's programs
        compare.WORKERS.update(arcflow=work_arcflow, nt=work_nt, floor=work_floor)
        compare.worker_main(args.worker)
        return 0
    compare.HERE = os.path.abspath(__file__)  # compare's run_pair / run_worker start this file's workers
    compare._worker_cmd = _worker_cmd
    if args.quick:
        args.nt_n, args.nt_n_flatten, args.alone_n16, args.alone_n32 = "8", "8", 16, 4
        args.reps = min(args.reps, 2)
    nt_sizes = {ro: [int(v) for v in arg.split(",") if v.strip()]
                for ro, arg in (("gap", args.nt_n), ("flatten", args.nt_n_flatten))}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    dtypes = ("float64", "float32") if args.dtype == "both" else (args.dtype,)
    readouts = ("gap", "flatten") if args.readout == "both" else (args.readout,)
    T, machine, tmp = args.threads, compare._machine(), tempfile.mkdtemp(prefix="bench_conv_")
    versions, rows, alone, floors, t_start = {}, [], [], {}, time.perf_counter()

    def log(msg):
        compare._log(f"[{time.perf_counter() - t_start:5.0f} s] {msg}")

    def floor(dt):
        if dt not in floors:
            log(f"floor rates {dt} ...")
            floors[dt] = compare.run_worker(dict(kind="floor", dtype=dt, threads=T, reps=5), drop_env=DROP)
        return floors[dt]

    def per_pair(row, dt):
        """Time per pair and the floor per pair, both in seconds of the T threads together."""
        f = floor(dt)
        macs, acos = _pair_work(row["readout"], row["hw"])
        pairs = row["n"] * (row["n"] + 1) / 2
        fl = macs * 2 / f["fma_per_s"] + acos / (f["acos_per_s_core"] * T)
        row.update(per_pair_s=row["a"] / pairs, floor_pair_s=fl, vs_floor=row["a"] / pairs / fl)

    if not args.nt_python and "nt" not in skip:
        log("no --nt-python: the comparison with neural-tangents is skipped")
    for dt in dtypes if args.nt_python and "nt" not in skip else ():
        for ro in readouts:
            for n in nt_sizes[ro]:
                batch = args.nt_batch if ro == "gap" and n > args.nt_unbatched_max else 0
                log(f"{ro} {dt} n = {n} (nt batch_size {batch or 'none'}) ...")
                job = dict(readout=ro, dtype=dt, n=n, hw=16, threads=T)
                ja = dict(job, kind="arcflow", save=f"{tmp}/a.npz")
                jb = dict(job, kind="nt", batch=batch, save=f"{tmp}/b.npz")
                if "arcflow" in skip:  # neural-tangents alone
                    ra, rb = None, compare.run_worker(dict(jb, reps=args.reps), python=args.nt_python, drop_env=DROP)
                else:
                    ra, rb = compare.run_pair(ja, jb, args.reps, {"drop_env": DROP},
                                              {"python": args.nt_python, "drop_env": DROP})
                    versions.update(ra["versions"])
                versions.update(rb["versions"])
                row = dict(job, batch=batch, a=None, b=rb["median_s"], ratio=None, paired=None, times_b=rb["times"],
                           peak_a=None, peak_b=rb["peak_mb"], nt_warmup_s=rb["warmup_s"], agree=None,
                           vs_floor=None, load=rb["loadavg"])
                if ra is not None:
                    row.update(a=ra["median_s"], ratio=rb["median_s"] / ra["median_s"],
                               paired=rb["paired_ratio_median"], paired_ratios=rb["paired_ratios"],
                               times_a=ra["times"], peak_a=ra["peak_mb"],
                               agree=_agreement(f"{tmp}/a.npz", f"{tmp}/b.npz"))
                    per_pair(row, dt)
                    row["budget_mb"] = _budget_mb(n, 16, ro, dt, T)[0]
                rows.append(row)
                log(f"  arcflow {_fmt(row['a'], '.3f', 0)} s, nt {row['b']:.3f} s, "
                    f"paired ratio {_fmt(row['paired'], '.1f', 0)}")
    for dt in dtypes if "alone" not in skip else ():
        for hw, n in ((16, args.alone_n16), (32, args.alone_n32)):
            for ro in readouts:
                if n <= 0:
                    continue
                log(f"arcflow alone {ro} {dt} {hw}x{hw}x{CHANNELS} n = {n} ...")
                job = dict(kind="arcflow", alone=True, readout=ro, dtype=dt, n=n, hw=hw, threads=T,
                           reps=max(args.alone_reps, 1))
                r = compare.run_worker(job, drop_env=DROP, timeout=6 * 3600)
                versions.update(r["versions"])
                budget, out_mb, scratch_mb = _budget_mb(n, hw, ro, dt, T)
                row = dict(job, a=r["median_s"], times_a=r["times"], peak_a=r["peak_timed_mb"],
                           rss_before_mb=r["rss_before_mb"], budget_mb=budget, out_mb=out_mb,
                           scratch_mb=scratch_mb, corner=r["corner"], load=r["loadavg"])
                per_pair(row, dt)
                alone.append(row)
                log(f"  {row['a']:.2f} s, peak {row['peak_a']:.0f} MB (budget {budget:.0f} MB), "
                    f"{row['vs_floor']:.1f}x the floor")

    with open("/proc/loadavg") as fh:
        load_end = fh.read().split()[:3]
    wall = time.perf_counter() - t_start
    command = " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv)
    say = print
    say(f"machine: {machine.get('Model name', '?')}, {machine.get('CPU(s)', '?')} CPUs "
        f"({', '.join(machine.get('simd', []))}), {machine.get('mem_total_gb', '?')} GB, shared with other jobs; "
        f"{T} threads (and CPUs) for every worker; load average at start "
        f"{' '.join(machine.get('loadavg_at_start', []))}, at end {' '.join(load_end)}; run {wall:.0f} s")
    say(f"versions: {', '.join(f'{k} {v}' for k, v in sorted(versions.items()))}; git {machine.get('git_head')}")
    say(f"command: {command}")
    say(f"workload: serial(*[Conv({WIDTH}, (3, 3), padding='SAME', W_std=sqrt(2), b_std={B_STD}), Relu()] * {DEPTH}, "
        f"GlobalAvgPool() | Flatten(), Dense(1, W_std=sqrt(2), b_std={B_STD})), get=('nngp', 'ntk'), x2 = None, "
        f"standard normal images")
    for dt, f in floors.items():
        say(f"floor rates {dt}: NumPy 2048^3 matmul {f['fma_per_s'] / 1e9:.1f} G multiply-adds/s on {T} threads; "
            f"arcflow arccos {f['acos_per_s_core'] / 1e9:.2f} G/s per core")
    if rows:
        say("")
        say(f"against neural-tangents 0.6.5 (16x16x{CHANNELS}; median of {args.reps} after a warm-up call, nt's jit "
            f"compilation in the warm-up and not timed; interleaved A B B A):")
        head = (f"{'readout':<8} {'dtype':<8} {'n':>4} {'nt batch':>8} {'arcflow s':>9} {'nt s':>8} {'nt/af':>7} "
                f"{'paired':>7} {'af MB':>6} {'budget':>6} {'nt MB':>6} {'af/floor':>8}  "
                f"agreement nngp, ntk (off-diag / diag)")
        say(head)
        say("-" * len(head))
        for r in rows:
            ag = "-" if r["agree"] is None else "; ".join(
                f"{r['agree'][g]['off']:.0e} / {r['agree'][g]['diag']:.0e}" for g in ("nngp", "ntk"))
            say(f"{r['readout']:<8} {r['dtype']:<8} {r['n']:>4} {r['batch'] or '-':>8} {_fmt(r['a'], '.3f', 9)} "
                f"{r['b']:8.3f} {_fmt(r['ratio'], '.1f', 7)} {_fmt(r['paired'], '.1f', 7)} "
                f"{_fmt(r['peak_a'], '.0f', 6)} {_fmt(r.get('budget_mb'), '.0f', 6)} {r['peak_b']:6.0f} "
                f"{_fmt(r['vs_floor'], '.1f', 8)}  {ag}")
        say("(nt/af: ratio of the medians; paired: median of the per-repetition ratios; MB: peak RSS of each worker, "
            "whole process; budget: arcflow's, as below; af/floor: arcflow's time per pair over the floor's; "
            "agreement: max |af - nt| / max |nt|)")
    if alone:
        say("")
        say("arcflow alone (x2 = None; time of the full-size call after a warm-up on 8 images"
            + (f", median of {args.alone_reps}" if args.alone_reps > 1 else "")
            + "; peak MB: the worker's ru_maxrss after the timed calls, before the corner check):")
        head = (f"{'readout':<8} {'dtype':<8} {'image':>8} {'n':>5} {'time s':>8} {'peak MB':>8} {'budget':>7} "
                f"{'us/pair':>9} {'floor us':>9} {'x floor':>7}  corner vs NumPy float64 (nngp, ntk)")
        say(head)
        say("-" * len(head))
        for r in alone:
            c = r["corner"]
            cs = "not checked" if c is None else f"{c['nngp']:.0e}, {c['ntk']:.0e}"
            say(f"{r['readout']:<8} {r['dtype']:<8} {r['hw']:>3}x{r['hw']}x{CHANNELS} {r['n']:>5} {r['a']:8.2f} "
                f"{r['peak_a']:8.0f} {r['budget_mb']:7.0f} {r['per_pair_s'] * 1e6:9.2f} {r['floor_pair_s'] * 1e6:9.2f} "
                f"{r['vs_floor']:7.1f}  {cs}")
        say(f"(budget: output (two n x n arrays) + the engine's per-thread scratch (its scratch_bytes) x {T} + 200 MB, "
            f"against the worker's peak RSS (whole process); us/pair: wall time over n (n + 1) / 2 pairs; floor: "
            f"5 layers x pixel pairs x 9 multiply-adds x 2 arrays at the matmul rate + 5 arccos per pixel pair at "
            f"arcflow's rate, on {T} threads)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": command, "machine": dict(machine, loadavg_at_end=load_end, run_wall_s=wall),
                       "args": vars(args), "versions": versions, "floor_rates": floors, "compare": rows,
                       "alone": alone}, fh, indent=1)
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
