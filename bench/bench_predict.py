"""Time arcflow.predict, arcflow.kernel_grads and arcflow.sklearn against neural-tangents 0.6.5, in one run.

    python bench/bench_predict.py --nt-python /path/to/ntvenv/bin/python [--threads 2] [--reps 5] [--quick]

1. Inference: ``gradient_descent_mse_ensemble(kernel_fn, x_train, y_train, diag_reg=1e-4)`` built and called
   as ``predict_fn(t, x_test, get="ntk", compute_cov=True)`` for t = None (infinite time) and for an array of
   5 finite times, timed as a whole (kernels + factorisation + products); the kernels that call needs
   (NNGP + NTK train-train and test-train, NNGP test-test) are timed alone as well, for the kernel share.
   neural-tangents: ``stax.serial(Dense(512), [Relu, Dense(512)] * 2, Relu, Dense(1))`` (W_std 1.4, b_std 0.1),
   its kernel_fn jitted as its users do (``jax.jit(kernel_fn, static_argnames="get")``), the same predict call.
2. Gradients: ``arcflow.kernel_grads(x, get="ntk")`` (value, d/dw_std, d/db_std) against a jitted
   ``jax.jacfwd`` of neural-tangents' NTK with respect to (W_std, b_std), plus its value.
3. scikit-learn: ``GaussianProcessRegressor(NNGPKernel(depth=2) + WhiteKernel()).fit`` (arcflow only: there
   is no neural-tangents counterpart), with the number of kernel + gradient evaluations of the optimiser.

Each program runs in its own worker process (bench/compare.py's plumbing), pinned to the same CPUs and thread
count; arcflow and neural-tangents run side by side, one timed call at a time (A B B A ...), after a warm-up
call each. Reported: medians of the repetitions, their ratio, and the median of the per-repetition ratios.
The two sides' results are compared in the same run (max |a - b| / max |b|). OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE are removed from both sides' environment (both factorise with OpenBLAS's LAPACK, jax through
scipy's), and OPENBLAS_THREAD_TIMEOUT=4 is set unless given: on a loaded machine OpenBLAS's spinning idle threads
otherwise make a 300 x 300 Cholesky take hundreds of milliseconds.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time

import compare  # bench/compare.py: worker plumbing, inputs, machine description

DEPTH, W_STD, B_STD, DIAG_REG, D, N_TEST, OUTPUTS = 3, 1.4, 0.1, 1e-4, 64, 500, 10
DROP = compare.NUMPY_ENV_DROP


# ---------------------------------------------------------------------------------------------- workers
def _data(job):
    import numpy as np

    n, m = job["n"], job.get("m", 0)
    x = compare._inputs(n + m, job.get("d", D), job["dtype"])
    y = np.random.default_rng(compare.SEED + 1).standard_normal((n, OUTPUTS)).astype(job["dtype"])
    return x[:n], x[n:], y


def _finite_times(n):
    import numpy as np

    return n * OUTPUTS * np.logspace(-2.0, 2.0, 5)  # eta t / y.size from 1e-2 to 1e2


def _serve(job, call, to_arrays, versions):
    """Warm up (its result is saved for the agreement check), then the timed calls (compare's protocol)."""
    import numpy as np

    out = to_arrays(call())
    if job.get("save"):
        np.savez(job["save"], *[np.asarray(a, dtype=np.float64) for a in out])
    del out
    return {"times": compare._timings(call, job), "versions": versions}


def work_arcflow(job):
    import numpy as np

    import arcflow
    from arcflow import predict

    kfn = arcflow.kernel_fn(depth=DEPTH, activation="relu", w_std=W_STD, b_std=B_STD, threads=job["threads"])
    versions = {"arcflow": getattr(arcflow, "__version__", "?"), "numpy": np.__version__}
    if job["case"] == "sklearn":
        return _sklearn(job, versions)
    x_tr, x_te, y = _data(job)
    if job["case"] == "kernels":  # what predict_fn(get="ntk", compute_cov=True) computes
        def call():
            return kfn(x_tr, None, ("nngp", "ntk")), kfn(x_te, x_tr, ("nngp", "ntk")), kfn(x_te, None, "nngp")
        return _serve(job, call, lambda r: (r[1].ntk, r[2]), versions)
    if job["case"] == "predict":
        t = None if job["t"] == "inf" else _finite_times(job["n"])

        def call():  # a fresh predictor every call: it keeps its factorisation
            pf = predict.gradient_descent_mse_ensemble(kfn, x_tr, y, diag_reg=DIAG_REG)
            return pf(t, x_te, get="ntk", compute_cov=True)
        return _serve(job, call, tuple, versions)
    if job["case"] == "grads":
        def call():
            return arcflow.kernel_grads(x_tr, depth=DEPTH, activation="relu", w_std=W_STD, b_std=B_STD,
                                        get="ntk", threads=job["threads"]).ntk
        return _serve(job, call, tuple, versions)
    raise ValueError(job["case"])


def work_nt(job):
    import jax

    if job["dtype"] == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import neural_tangents as nt
    from neural_tangents import stax

    def net(w_std, b_std):
        layers = [stax.Dense(512, W_std=w_std, b_std=b_std)]
        for i in range(DEPTH):
            layers += [stax.Relu(), stax.Dense(512 if i < DEPTH - 1 else 1, W_std=w_std, b_std=b_std)]
        return stax.serial(*layers)[2]

    ready = jax.block_until_ready
    kfn = jax.jit(net(W_STD, B_STD), static_argnames="get")
    x_tr, x_te, y = (jnp.asarray(a) for a in _data(job))
    versions = {"jax": jax.__version__, "neural_tangents": getattr(nt, "__version__", "?")}
    if job["case"] == "kernels":
        def call():
            return ready((kfn(x_tr, None, ("nngp", "ntk")), kfn(x_te, x_tr, ("nngp", "ntk")),
                          kfn(x_te, None, "nngp")))
        return _serve(job, call, lambda r: (r[1].ntk, r[2]), versions)
    if job["case"] == "predict":
        t = None if job["t"] == "inf" else jnp.asarray(_finite_times(job["n"]), dtype=x_tr.dtype)

        def call():
            pf = nt.predict.gradient_descent_mse_ensemble(kfn, x_tr, y, diag_reg=DIAG_REG)
            return ready(pf(t, x_te, get="ntk", compute_cov=True))
        return _serve(job, call, tuple, versions)
    if job["case"] == "grads":
        def ntk(p):
            return net(p[0], p[1])(x_tr, None, "ntk")
        value_and_jac = jax.jit(lambda p: (ntk(p), jax.jacfwd(ntk)(p)))
        p = jnp.asarray([W_STD, B_STD], dtype=x_tr.dtype)
        return _serve(job, lambda: ready(value_and_jac(p)), lambda r: (r[0], r[1][..., 0], r[1][..., 1]),
                      versions)
    raise ValueError(job["case"])


def _sklearn(job, versions):
    """Fits a GP on samples of an NNGP prior; counts and times the kernel's gradient evaluations."""
    import numpy as np
    import sklearn
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import WhiteKernel

    import arcflow
    from arcflow.sklearn import NNGPKernel

    x = compare._inputs(job["n"], job["d"], "float64")
    k = arcflow.kernels(x, depth=2, w_std=1.3, b_std=0.4, get="nngp").nngp + 0.05 * np.eye(job["n"])
    y = np.linalg.cholesky(k) @ np.random.default_rng(compare.SEED + 2).standard_normal(job["n"])
    stats = {"evals": 0, "kernel_s": 0.0}
    inner = NNGPKernel.__call__

    def counted(self, X, Y=None, eval_gradient=False):  # the kernel's share of each optimiser step
        t0 = time.perf_counter()
        r = inner(self, X, Y, eval_gradient)
        stats["kernel_s"] += time.perf_counter() - t0
        stats["evals"] += bool(eval_gradient)
        return r
    NNGPKernel.__call__ = counted
    fits = []

    def call():
        stats.update(evals=0, kernel_s=0.0)
        fits.append(GaussianProcessRegressor(NNGPKernel(depth=2) + WhiteKernel()).fit(x, y))
        return dict(stats)
    per_fit = [call()]  # warm-up
    times = []
    for _ in range(job["reps"]):
        t0 = time.perf_counter()
        per_fit.append(call())
        times.append(time.perf_counter() - t0)
    versions.update(sklearn=sklearn.__version__)
    return {"times": times, "per_fit": per_fit[1:], "kernel": str(fits[-1].kernel_), "versions": versions}


# ---------------------------------------------------------------------------------------------- driver
def _num(v, width, prec):
    return f"{'-':>{width}}" if v is None else f"{v:{width}.{prec}f}"


def _rel(a, b, off_diagonal=False):
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    diff = np.abs(a - b)
    if off_diagonal:
        diff = diff * (1.0 - np.eye(a.shape[-2], a.shape[-1]))
    return float(diff.max() / np.abs(b).max())


def _agreement(path_a, path_b, case):
    import numpy as np

    a, b = np.load(path_a), np.load(path_b)
    names = {"predict": ("mean", "cov"), "kernels": ("ntk_td", "nngp_tt"), "grads": ("value", "d_w", "d_b")}[case]
    rels = [f"{nm} {_rel(a[k], b[k]):.0e}" for nm, k in zip(names, a.files)]
    if case == "grads":  # nt's NTK diagonal is off where the angle is near 0 (docs/mathematics.md)
        rels.append(f"off-diag. {max(_rel(a[k], b[k], True) for k in a.files):.0e}")
    return ", ".join(rels)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nt-python", default=None, help="python of a venv with neural-tangents 0.6.5 + jax 0.5.3; "
                   "without it only arcflow's side runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", choices=("float64", "float32", "both"), default="both")
    p.add_argument("--skip", default="", help="comma list of: predict, grads, sklearn")
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, 2 repetitions")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:  # compare's worker_main, with this file's programs
        compare.WORKERS.update(arcflow=work_arcflow, nt=work_nt)
        compare.worker_main(args.worker)
        return 0
    compare.HERE = os.path.abspath(__file__)  # compare's run_pair / run_worker start this file's workers
    # Idle OpenBLAS threads sleep at once instead of spinning into the other side's turn (both sides' LAPACK).
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    sizes = {"predict": (1000, 4000), "grads": (1000, 2000), "sklearn": (500, 1000)}
    if args.quick:
        sizes, args.reps = {"predict": (300,), "grads": (200,), "sklearn": (100,)}, min(args.reps, 2)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    dtypes = ("float64", "float32") if args.dtype == "both" else (args.dtype,)
    T, machine, tmp = args.threads, compare._machine(), tempfile.mkdtemp(prefix="bench_predict_")
    rows, versions, t_start = [], {}, time.perf_counter()

    def run(label, job):
        """One row: arcflow alone, or interleaved with neural-tangents on the same job."""
        compare._log(f"[{time.perf_counter() - t_start:5.0f} s] {label} {job['dtype']} n = {job['n']} ...")
        job = dict(job, threads=T)
        ja, jb = dict(job, kind="arcflow", save=f"{tmp}/a.npz"), dict(job, kind="nt", save=f"{tmp}/b.npz")
        if not args.nt_python:
            ra, rb = compare.run_worker(dict(ja, reps=args.reps), drop_env=DROP), None
        else:
            ra, rb = compare.run_pair(ja, jb, args.reps, {"drop_env": DROP},
                                      {"python": args.nt_python, "drop_env": DROP})
            versions.update(rb["versions"])
        versions.update(ra["versions"])
        row = {"label": label, "dtype": job["dtype"], "n": job["n"], "a": ra["median_s"], "b": None,
               "ratio": None, "paired": None, "agree": ""}
        if rb is not None:
            row.update(b=rb["median_s"], ratio=rb["median_s"] / ra["median_s"], paired=rb["paired_ratio_median"],
                       agree=_agreement(f"{tmp}/a.npz", f"{tmp}/b.npz", job["case"]))
        rows.append(row)
        return row

    for dt in [] if "predict" in skip else dtypes:
        for n in sizes["predict"]:
            base = dict(n=n, m=N_TEST, dtype=dt)
            kern = run("  kernels alone", dict(base, case="kernels"))
            for t, label in (("inf", "predict t=None"), ("five", "predict 5 times")):
                r = run(label, dict(base, case="predict", t=t))
                r["share"] = " / ".join(f"{k / w:.0%}" for k, w in ((kern["a"], r["a"]), (kern["b"], r["b"])) if k)
    for dt in [] if "grads" in skip else dtypes:
        for n in sizes["grads"]:
            run("kernel_grads ntk", dict(n=n, dtype=dt, case="grads"))
    sk = []
    for n in [] if "sklearn" in skip else sizes["sklearn"]:
        compare._log(f"[{time.perf_counter() - t_start:5.0f} s] sklearn GP fit n = {n} ...")
        r = compare.run_worker(dict(kind="arcflow", case="sklearn", n=n, d=8, dtype="float64", threads=T,
                                    reps=args.reps), drop_env=DROP)
        versions.update(r["versions"])
        sk.append((n, r))

    with open("/proc/loadavg") as fh:
        load = f"{' '.join(machine.get('loadavg_at_start', []))}, at end {' '.join(fh.read().split()[:3])}"
    print(f"machine: {machine.get('Model name', '?')}, {machine.get('CPU(s)', '?')} CPUs "
        f"({', '.join(machine.get('simd', []))}), {machine.get('mem_total_gb', '?')} GB, shared with other jobs; "
        f"{T} threads (and CPUs) for every program; load average at start {load}; "
        f"run {time.perf_counter() - t_start:.0f} s")
    print(f"versions: {', '.join(f'{k} {v}' for k, v in sorted(versions.items()))}; git {machine.get('git_head')}")
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv))
    print(f"workload: depth {DEPTH} ReLU, w_std {W_STD}, b_std {B_STD}, d = {D}, {OUTPUTS} outputs, n_test = "
        f"{N_TEST}, diag_reg {DIAG_REG}; get='ntk', compute_cov=True; median of {args.reps} after a warm-up")
    head = (f"{'call':<18} {'dtype':<8} {'n':>5} {'arcflow s':>9} {'nt s':>8} {'nt/af':>6} {'paired':>6} "
            f"{'kernel share af/nt':>18}  agreement (max|a-b|/max|b|)")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['label']:<18} {r['dtype']:<8} {r['n']:>5} {r['a']:9.3f} {_num(r['b'], 8, 3)} "
              f"{_num(r['ratio'], 6, 2)} {_num(r['paired'], 6, 2)} {r.get('share', ''):>18}  {r['agree']}")
    print("(nt/af: ratio of the medians; paired: median of the per-repetition ratios, the two run interleaved; "
        "kernel share: the kernels alone over the whole call, each side)")
    for n, r in sk:
        evals = statistics.median(q["evals"] for q in r["per_fit"])
        k_s = statistics.median(q["kernel_s"] / max(q["evals"], 1) for q in r["per_fit"])
        print(f"sklearn GaussianProcessRegressor(NNGPKernel(depth=2) + WhiteKernel()).fit, n = {n}, d = 8 "
            f"(arcflow only: neural-tangents has no scikit-learn kernel): {r['median_s']:.3f} s, {evals:.0f} "
            f"kernel+gradient evaluations, {r['median_s'] / max(evals, 1) * 1e3:.1f} ms per optimiser step of "
            f"which {k_s * 1e3:.1f} ms in NNGPKernel; fitted {r['kernel']} (prior: w_std 1.3, b_std 0.4, noise 0.05)")
    if not args.nt_python:
        print("note: neural-tangents not run (no --nt-python): arcflow's side only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
