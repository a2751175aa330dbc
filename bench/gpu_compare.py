"""Time arcflow's CUDA backend against the same recursion in CuPy and in jitted JAX, in one run, on one GPU.

    python bench/gpu_compare.py [--n 5000,10000,20000,50000] [--d 256] [--depth 5] [--repeat 5]
                                [--mode symmetric|general] [--skip cupy,jax] [--json out.json]

Workload (issue 5): NNGP + NTK, ReLU, w_std = 1.4, b_std = 0.1, float32, n1 = n2 = n rows of d features.
- arcflow: ``arcflow._cuda.kernels_cuda`` on CuPy arrays (no host copies), the fused tile kernel. With
  ``--mode general`` (the default) it gets x2 = a copy of x and computes every pair, as the two ports do;
  with ``--mode symmetric`` (``kernels(x)``) it computes one triangle and mirrors it (half the pairs).
- cupy: the NumPy recursion ported line by line to CuPy (whole n x n arrays, np -> cp), as users do.
- jax: the same formulas in jax.numpy under ``jax.jit`` (matmul at Precision.HIGHEST: no TF32).
Each time is the median of ``--repeat`` runs after one warm-up, synchronised (CuPy stream / JAX
``block_until_ready``); an implementation that runs out of memory is reported as OOM.

The floor (roofline, docs/benchmarking.md; on a GPU the terms overlap, so their maximum):
    (a) 2 n1 n2 d / (fp32 GEMM rate measured with cupy.matmul, no TF32)
    (b) output bytes (NNGP + NTK, 2 n1 n2 4) / (device copy bandwidth measured with cupy.copyto, read + write)
    (c) depth n1 n2 / (arcsine throughput of the device, measured in registers by arcflow._cuda.asin_throughput)
Printed per n with the ratios cupy / arcflow, jax / arcflow and arcflow / floor.

Without a GPU, CuPy or the CUDA build of arcflow the script says what is missing and exits with status 0
(JAX is optional: without it that column is skipped).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX must not grab 75% of the GPU
os.environ.setdefault("CUPY_TF32", "0")

W_STD, B_STD = 1.4, 0.1


def _median_time(fn, sync, repeat):
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- the CuPy port of the NumPy recursion (ReLU: arc-cosine kernel of order 1) ----------------------------
def cupy_relu_kernels(cp, x, depth, w_std, b_std):
    w2, b2 = w_std * w_std, b_std * b_std
    d = x.shape[1]
    s1 = (w2 / d) * cp.einsum("ij,ij->i", x, x) + b2
    s12 = (w2 / d) * (x @ x.T) + b2
    ntk = s12.copy()
    for _ in range(depth):
        root = cp.sqrt(s1)[:, None] * cp.sqrt(s1)[None, :]
        c = cp.clip(s12 / root, -1.0, 1.0)
        theta = cp.arccos(c)
        t = root * (cp.sin(theta) + (math.pi - theta) * c) / (2 * math.pi)
        tdot = (math.pi - theta) / (2 * math.pi)
        s1 = w2 * s1 / 2 + b2
        s12 = w2 * t + b2
        ntk = w2 * tdot * ntk + s12
    return s12, ntk


# ---- the same formulas in JAX -----------------------------------------------------------------------------
def make_jax_relu_kernels(jax, jnp, depth, w_std, b_std):
    w2, b2 = w_std * w_std, b_std * b_std

    def f(x):
        d = x.shape[1]
        s1 = (w2 / d) * jnp.einsum("ij,ij->i", x, x) + b2
        s12 = (w2 / d) * jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST) + b2
        ntk = s12
        for _ in range(depth):
            root = jnp.sqrt(s1)[:, None] * jnp.sqrt(s1)[None, :]
            c = jnp.clip(s12 / root, -1.0, 1.0)
            theta = jnp.arccos(c)
            t = root * (jnp.sin(theta) + (jnp.pi - theta) * c) / (2 * jnp.pi)
            tdot = (jnp.pi - theta) / (2 * jnp.pi)
            s1 = w2 * s1 / 2 + b2
            s12 = w2 * t + b2
            ntk = w2 * tdot * ntk + s12
        return s12, ntk

    return jax.jit(f)


def measure_ceilings(cp, arcflow_cuda, d, repeat):
    sync = cp.cuda.get_current_stream().synchronize
    m = int(os.environ.get("GPU_COMPARE_GEMM_N", "16384"))
    a = cp.random.default_rng(0).standard_normal((m, d), dtype=cp.float32)
    out = cp.empty((m, m), dtype=cp.float32)
    t = _median_time(lambda: cp.matmul(a, a.T, out=out), sync, repeat)
    gemm_rate = 2.0 * m * m * d / t
    a = out = None
    src = cp.ones(1 << 29, dtype=cp.float32)  # 2 GiB
    dst = cp.empty_like(src)
    t = _median_time(lambda: cp.copyto(dst, src), sync, repeat)
    copy_bw = 2.0 * src.nbytes / t
    src = dst = None
    cp.get_default_memory_pool().free_all_blocks()
    asin_rate = arcflow_cuda.asin_throughput(True)
    return {"gemm_flops": gemm_rate, "copy_bytes_per_s": copy_bw, "asin_per_s": asin_rate}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="5000,10000,20000,50000")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--mode", choices=("symmetric", "general"), default="general")
    ap.add_argument("--skip", default="", help="comma-separated: cupy, jax")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    try:
        import cupy as cp
    except ImportError:
        print("gpu_compare: CuPy is not installed (pip install cupy-cuda12x or cupy-cuda13x); nothing to run")
        return 0
    try:
        from arcflow import _cuda as arcflow_cuda
        from arcflow._kernels import fc_params
        from arcflow.activations import ReLU
    except ImportError as e:
        print(f"gpu_compare: arcflow is not importable: {e}")
        return 0
    if not arcflow_cuda.available():
        why = "arcflow was built without CUDA" if not arcflow_cuda.built() else "no CUDA device visible"
        print(f"gpu_compare: {why}; nothing to run")
        return 0
    jax = jnp = None
    if "jax" not in skip:
        try:
            import jax
            import jax.numpy as jnp
            if not any(dv.platform == "gpu" for dv in jax.devices()):
                print("gpu_compare: JAX sees no GPU; the jax column is skipped")
                jax = None
        except Exception as e:  # noqa: BLE001 - any JAX install problem only drops the column
            print(f"gpu_compare: JAX unavailable ({type(e).__name__}: {e}); the jax column is skipped")
            jax = None

    info = arcflow_cuda.device_info(0)
    print(f"device: {info['name']}, {info['total_memory'] / 2**30:.0f} GiB, "
          f"sm_{info['compute_capability'][0]}{info['compute_capability'][1]}, {info['multiprocessors']} SMs; "
          f"cupy {cp.__version__}" + (f", jax {jax.__version__}" if jax else ""))
    ceil = measure_ceilings(cp, arcflow_cuda, args.d, args.repeat)
    print(f"ceilings: fp32 GEMM {ceil['gemm_flops'] / 1e12:.1f} TFLOP/s, "
          f"copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s "
          f"(read + write), arcsine {ceil['asin_per_s'] / 1e12:.2f} T/s")
    print(f"NNGP + NTK, ReLU, depth {args.depth}, d = {args.d}, float32, mode {args.mode}, "
          f"median of {args.repeat} after a warm-up")
    hdr = (f"{'n':>7} {'arcflow s':>10} {'cupy s':>10} {'jax s':>10} {'cupy/arc':>9} {'jax/arc':>8} "
           f"{'gemm s':>8} {'write s':>8} {'asin s':>8} {'floor s':>8} {'arc/floor':>9} {'max rel diff':>12}")
    print(hdr)
    rows = []
    sync_cp = cp.cuda.get_current_stream().synchronize
    for n in [int(v) for v in args.n.split(",") if v]:
        rng = cp.random.default_rng(1)
        x = rng.standard_normal((n, args.d), dtype=cp.float32)
        x2 = None if args.mode == "symmetric" else x.copy()
        w2, b2 = W_STD * W_STD, B_STD * B_STD
        params = fc_params(ReLU(), args.depth, w2, b2, w2 / args.d, 0)
        res = {"n": n}

        def run_arcflow():
            return arcflow_cuda.kernels_cuda(x, x2, params, True, True)

        try:
            res["arcflow"] = _median_time(lambda: run_arcflow(), sync_cp, args.repeat)
            kn, kt = run_arcflow()
            sync_cp()
            probe = min(n, 1000)
            ref_n, ref_t = cp.asnumpy(kn[:probe, :probe]), cp.asnumpy(kt[:probe, :probe])
            del kn, kt
        except Exception as e:  # noqa: BLE001
            res["arcflow"] = None
            res["arcflow_error"] = f"{type(e).__name__}: {e}"
            ref_n = ref_t = None
        cp.get_default_memory_pool().free_all_blocks()
        diffs = []

        def check(kn, kt):
            if ref_n is None:
                return
            import numpy as np
            p = ref_n.shape[0]
            a, b = cp.asnumpy(kn[:p, :p]), cp.asnumpy(kt[:p, :p])
            diffs.append(max(float(np.max(np.abs(a - ref_n)) / np.max(np.abs(ref_n))),
                             float(np.max(np.abs(b - ref_t)) / np.max(np.abs(ref_t)))))

        if "cupy" not in skip:
            try:
                res["cupy"] = _median_time(lambda: cupy_relu_kernels(cp, x, args.depth, W_STD, B_STD), sync_cp,
                                           args.repeat)
                check(*cupy_relu_kernels(cp, x, args.depth, W_STD, B_STD))
            except cp.cuda.memory.OutOfMemoryError:
                res["cupy"] = "OOM"
            cp.get_default_memory_pool().free_all_blocks()
        if jax is not None:
            f = make_jax_relu_kernels(jax, jnp, args.depth, W_STD, B_STD)
            xj = jnp.asarray(cp.asnumpy(x))
            try:
                res["jax"] = _median_time(lambda: jax.block_until_ready(f(xj)), lambda: None, args.repeat)
                kn, kt = f(xj)
                check(cp.asarray(jax.device_get(kn[:1000, :1000])), cp.asarray(jax.device_get(kt[:1000, :1000])))
                del kn, kt
            except Exception as e:  # noqa: BLE001 - XLA reports OOM as XlaRuntimeError
                res["jax"] = "OOM" if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e).lower() else f"error: {e}"
            del xj
        gemm = 2.0 * n * n * args.d / ceil["gemm_flops"]
        write = 2.0 * n * n * 4 / ceil["copy_bytes_per_s"]
        asin = args.depth * n * n / ceil["asin_per_s"]
        floor = max(gemm, write, asin)
        res.update({"floor": floor, "floor_terms": {"gemm": gemm, "write": write, "asin": asin},
                    "max_rel_diff": max(diffs) if diffs else None})
        rows.append(res)

        def fmt(v, w=10):
            return f"{v:>{w}.4f}" if isinstance(v, float) else f"{str(v if v is not None else '-'):>{w}}"

        def ratio(a, b, w):
            return f"{a / b:>{w}.2f}" if isinstance(a, float) and isinstance(b, float) else f"{'-':>{w}}"

        arc = res.get("arcflow")
        print(f"{n:>7} {fmt(arc)} {fmt(res.get('cupy'))} {fmt(res.get('jax'))} {ratio(res.get('cupy'), arc, 9)} "
              f"{ratio(res.get('jax'), arc, 8)} {gemm:>8.4f} {write:>8.4f} {asin:>8.4f} {floor:>8.4f} "
              f"{ratio(arc, floor, 9)} {fmt(res['max_rel_diff'], 12) if diffs else '-':>12}")
        if res.get("arcflow_error"):
            print(f"        arcflow failed: {res['arcflow_error']}")
        x = x2 = None
        cp.get_default_memory_pool().free_all_blocks()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": info, "ceilings": ceil, "args": vars(args), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
