"""Time the i-RevNet block and network: arcflow vs PyTorch CPU vs plain NumPy, in one run.

    python bench/bench_invertible.py [--threads N] [--reps 5] [--batch 64] [--full-batch 16]
                                     [--skip numpy,torch,full] [--breakdown] [--alone] [--openblas-timeout 4|keep]
                                     [--json out.json]

Workloads (float32, inference-form batch-norm with random running statistics, same weights everywhere):
  1. one IRevNetBlock(in_ch=128, out_ch=64, stride=1): each half of the pair has 64 channels in and out,
     32 x 32 pixels, batch 64; bottleneck 64 -> 16 -> 16 -> 64 (3x3 convolutions); forward and inverse;
  2. the same at stride 2 (in_ch=64, out_ch=128: 32 x 32 -> 16 x 16), forward and inverse;
  3. the full CIFAR-10 i-RevNet of the paper (18-18-18 blocks, 16-64-256 channels, 3 x 32 x 32),
     forward + classifier head + inverse (what the PyTorch module computes), batch 16.
Programs: arcflow (C++), PyTorch CPU (a transcription of the reference modules, torch.no_grad, eval mode)
and a plain NumPy implementation (convolution = sliding-window view + tensordot into BLAS, the rest
broadcasting). Every program runs with the same thread count: OMP_NUM_THREADS / torch.set_num_threads /
threadpoolctl for NumPy's BLAS, set before the libraries are imported.
Interleaved: after one warm-up call of each, every repetition times arcflow, PyTorch and NumPy one call
each, back to back (the order rotates from one repetition to the next), so all three see the same load
on a shared machine. Times are medians over the --reps repetitions; every ratio is the median of the
per-repetition ratios (arcflow/torch < 1: arcflow faster; numpy/arcflow and numpy/torch > 1: faster than
NumPy). The floor is the convolutions' multiply-adds at the machine's sgemm rate: a NumPy float32 matmul
of about the same flop count, timed as one more interleaved program, and the 2048^3 matmul of the header
(measured once at the start): the floor is the fastest of all these (the best sgemm rate the machine showed
during the run; OpenBLAS's spinning threads suffer more than anything else from a loaded machine) and
"x floor" is a program's median time over it. Printed: times, ratios, GFLOP/s, time / floor, and (--breakdown) arcflow's
three convolutions of the block timed alone, the rest of the block being the difference.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="threads for every program (default: all CPUs)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--full-batch", type=int, default=16)
    p.add_argument("--skip", default="", help="comma list of: numpy, torch, full, stride2")
    p.add_argument("--breakdown", action="store_true", help="also time arcflow's convolutions of each block alone")
    p.add_argument("--alone", action="store_true",
                   help="time each program in its own block of repetitions instead of interleaved")
    p.add_argument("--openblas-timeout", default="4",
                   help="OPENBLAS_THREAD_TIMEOUT for NumPy's BLAS (default 4: idle threads sleep at once); "
                        "'keep' leaves the environment as it is")
    p.add_argument("--json", default=None)
    return p.parse_args()


ARGS = parse()
THREADS = ARGS.threads or len(os.sched_getaffinity(0))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # NumPy at its best (docs/benchmarking.md)
    os.environ.pop(var, None)
# OpenBLAS's idle threads spin for about 2^28 cycles (0.1 s here) after each BLAS call before they sleep.
# Interleaved, that spin runs on the cores during the next program's turn (arcflow's 30 ms block took up
# to 1.6x longer right after a NumPy call). 2^4 cycles lets them sleep at once; NumPy's own time did not
# change with it (296 / 312 ms against 286-336 ms, fwd / inv, 2 threads). --openblas-timeout keep: as set.
if ARGS.openblas_timeout != "keep":
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = ARGS.openblas_timeout

import numpy as np  # noqa: E402

import arcflow  # noqa: E402
from arcflow import _core  # noqa: E402
from arcflow.invertible import IRevNet, IRevNetBlock  # noqa: E402

try:
    import torch  # noqa: E402
    torch.set_num_threads(THREADS)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "invertible"))
    from make_torch_golden import TorchBlock, TorchIRevNet  # noqa: E402
except Exception as exc:  # torch missing, or its test module not importable
    torch = None
    TORCH_ERR = repr(exc)

try:
    from threadpoolctl import threadpool_limits
except ImportError:
    threadpool_limits = None


def median_time(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def interleaved(fns, reps):
    """{name: callable} -> {name: [seconds per repetition]}: one warm-up call each, then every repetition
    calls each program once, back to back, in an order that rotates from one repetition to the next.
    With --alone, each program instead runs its warm-up and all its repetitions in a block of its own (no
    cache or thread-pool interference from the other programs between its calls; the load may differ)."""
    names = list(fns)
    if ARGS.alone:
        ts = {nm: [] for nm in names}
        for nm in names:
            fns[nm]()
            for _ in range(reps):
                t0 = time.perf_counter()
                fns[nm]()
                ts[nm].append(time.perf_counter() - t0)
        return ts
    for nm in names:
        fns[nm]()
    ts = {nm: [] for nm in names}
    for r in range(reps):
        for nm in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[nm]()
            ts[nm].append(time.perf_counter() - t0)
    return ts


def median_ratio(num, den):
    """Median of the per-repetition ratios num[i] / den[i]."""
    return statistics.median(a / b for a, b in zip(num, den))


def sgemm_floor_prog(flops):
    """(callable, scale): a NumPy float32 matmul of about `flops` multiply-adds x 2, timed interleaved with
    the programs; its time x scale is the floor of that repetition (the machine's sgemm rate right then)."""
    n = max(64, int(round((flops / 2) ** (1 / 3) / 64)) * 64)
    a = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    out = np.empty_like(a)
    return (lambda: np.matmul(a, a, out=out)), flops / (2.0 * n ** 3)


# ---- plain NumPy implementation of the block --------------------------------------------------------
def np_conv3x3(x, w, stride):
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))[:, :, ::stride, ::stride]
    # win: (n, c, ho, wo, 3, 3); contract (c, 3, 3) with w (o, c, 3, 3)
    return np.ascontiguousarray(np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2))


def np_psi(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 3, 5, 1, 2, 4).reshape(n, 4 * c, h // 2, w // 2)


def np_psi_inv(y):
    n, cb, h, w = y.shape
    c = cb // 4
    return y.reshape(n, 2, 2, c, h, w).transpose(0, 3, 4, 1, 5, 2).reshape(n, c, h * 2, w * 2)


class NumpyBlock:
    def __init__(self, blk):
        sd = blk.state_dict()
        self.stride, self.first = blk.stride, blk.first
        self.layers = []
        for kind, j, _ in blk._layout:
            pre = f"bottleneck_block.{j}."
            if kind == "conv":
                self.layers.append(("conv", sd[pre + "weight"].astype(np.float32)))
            else:
                s = sd[pre + "weight"] / np.sqrt(sd[pre + "running_var"] + 1e-5)
                t = sd[pre + "bias"] - sd[pre + "running_mean"] * s
                self.layers.append(("bn", s.astype(np.float32)[None, :, None, None],
                                    t.astype(np.float32)[None, :, None, None]))

    def F(self, x):
        first_conv = True
        for layer in self.layers:
            if layer[0] == "bn":
                x = np.maximum(x * layer[1] + layer[2], 0)
            else:
                x = np_conv3x3(x, layer[1], self.stride if first_conv else 1)
                first_conv = False
        return x

    def forward(self, x1, x2):
        f = self.F(x2)
        if self.stride == 2:
            x1, x2 = np_psi(x1), np_psi(x2)
        return x2, f + x1

    def inverse(self, a, b):
        x2 = np_psi_inv(a) if self.stride == 2 else a
        x1 = b - self.F(x2)
        return (np_psi_inv(x1) if self.stride == 2 else x1), x2


def sgemm_rate():
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    out = np.empty_like(a)
    np.matmul(a, a, out=out)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.matmul(a, a, out=out)
        ts.append(time.perf_counter() - t0)
    return 2 * 2048 ** 3 / min(ts)  # the best of 5: the machine's rate, not the load's


def randomize_np(obj, rng):
    sd = obj.state_dict()
    for k, v in sd.items():
        if k.endswith("running_mean") or k.endswith(".bias"):
            sd[k] = (0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
        elif k.endswith("running_var") or (k.endswith(".weight") and v.ndim == 1):
            sd[k] = rng.uniform(0.5, 1.5, v.shape).astype(v.dtype)
    obj.load_state_dict(sd)


def block_flops(blk, n, h, w):
    ho, wo = h // blk.stride, w // blk.stride
    f_in, hid, out = blk.f_in, blk.hidden, blk.out_ch
    return 2 * n * ho * wo * 9 * (f_in * hid + hid * hid + hid * out)


def conv_breakdown(blk, x2, reps):
    """arcflow's three convolutions of F(x2) (forward), each timed alone: [(label, seconds, flop)]."""
    from arcflow.invertible import _ops
    from arcflow.invertible._backend import CpuOps
    layers = blk.layers(CpuOps(1), x2)
    h, out = x2, []
    for i, (bn, w) in enumerate(layers):
        stride = blk.stride if i == 0 else 1
        kw = dict(in_scale=bn[0], in_shift=bn[1], in_relu=True) if bn is not None else {}
        n, c, hh, ww = h.shape
        ho, wo = hh // stride, ww // stride
        res = np.empty((n, w.shape[0], ho, wo), h.dtype)
        add = np.zeros_like(res) if i == len(layers) - 1 else None

        def run(h=h, w=w, stride=stride, kw=kw, res=res, add=add):
            _ops.conv2d(h, w, None, stride, 1, out=res, addend=add, check_finite=False, **kw)
        t = median_time(run, reps)
        out.append((f"conv{i + 1} {c}->{w.shape[0]} {hh}x{ww} s{stride}", t, 2 * n * ho * wo * w[0].size * w.shape[0]))
        h = res
    return out


def bench_block(name, in_ch, out_ch, stride, results, skip, rate):
    rng = np.random.default_rng(0)
    blk = IRevNetBlock(in_ch, out_ch, stride, rng=1)
    randomize_np(blk, rng)
    n, h, w = ARGS.batch, 32, 32
    x = rng.standard_normal((n, in_ch, h, w)).astype(np.float32)
    x1, x2 = np.ascontiguousarray(x[:, : in_ch // 2]), np.ascontiguousarray(x[:, in_ch // 2:])
    a, b = blk.forward((x1, x2))
    row = {"workload": name, "flops_per_pass": block_flops(blk, n, h, w)}
    progs = {"fwd": {"arcflow": lambda: blk.forward((x1, x2))}, "inv": {"arcflow": lambda: blk.inverse((a, b))}}
    if torch is not None and "torch" not in skip:
        tb = TorchBlock(in_ch, out_ch, stride)
        tb.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in blk.state_dict().items()})
        tb.eval()
        t1, t2 = torch.from_numpy(x1), torch.from_numpy(x2)
        ta, tbb = torch.from_numpy(a), torch.from_numpy(b)
        with torch.no_grad():
            ya, yb = tb((t1, t2))
        row["torch_max_rel_diff"] = float(np.abs(yb.numpy() - b).max() / np.abs(b).max())

        def torch_fwd():
            with torch.no_grad():
                tb((t1, t2))

        def torch_inv():
            with torch.no_grad():
                tb.inverse((ta, tbb))
        progs["fwd"]["torch"], progs["inv"]["torch"] = torch_fwd, torch_inv
    if "numpy" not in skip:
        nb = NumpyBlock(blk)
        progs["fwd"]["numpy"] = lambda: nb.forward(x1, x2)
        progs["inv"]["numpy"] = lambda: nb.inverse(a, b)
    floor_fn, floor_scale = sgemm_floor_prog(row["flops_per_pass"])
    progs["fwd"]["floor"] = progs["inv"]["floor"] = floor_fn
    ctx = threadpool_limits(THREADS, user_api="blas") if threadpool_limits else None
    try:
        if ctx:
            ctx.__enter__()
        for d in ("fwd", "inv"):
            ts = interleaved(progs[d], ARGS.reps)
            floor = min(min(ts.pop("floor")) * floor_scale, row["flops_per_pass"] / rate)
            row[f"floor_{d}"] = floor
            for prog, v in ts.items():
                row[f"{prog}_{d}"] = statistics.median(v)
                row[f"{prog}_{d}_reps"] = v
                row[f"{prog}/floor_{d}"] = statistics.median(v) / floor
            for num, den in (("arcflow", "torch"), ("numpy", "arcflow"), ("numpy", "torch")):
                if num in ts and den in ts:
                    row[f"{num}/{den}_{d}"] = median_ratio(ts[num], ts[den])
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
    if ARGS.breakdown:
        row["breakdown"] = conv_breakdown(blk, x2, ARGS.reps)
    results.append(row)
    return row


def bench_full(results, skip, rate):
    rng = np.random.default_rng(0)
    net = IRevNet.cifar10(rng=2)
    randomize_np(net, rng)
    n = ARGS.full_batch
    x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
    fl, h = 0, 32
    for b in net.stack:
        fl += 2 * block_flops(b, n, h, h)  # forward and inverse each evaluate F once
        h //= b.stride
    row = {"workload": f"CIFAR-10 i-RevNet (54 blocks) forward + classifier head + inverse, batch {n}",
           "flops_per_pass": fl}

    def arcflow_run():  # the same work as the PyTorch module's forward (which returns logits and z) + inverse
        z = net.forward(x)
        net.classify(z)
        net.inverse(z)
    progs = {"arcflow": arcflow_run}
    z = net.forward(x)
    row["arcflow_rel_error"] = float(np.linalg.norm(net.inverse(z) - x) / np.linalg.norm(x))
    if torch is not None and "torch" not in skip:
        tnet = TorchIRevNet([18, 18, 18], [1, 2, 2], 10, [16, 64, 256], 0, True, [3, 32, 32], 4)
        tnet.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in net.state_dict().items()})
        tnet.eval()
        tx = torch.from_numpy(x)

        def torch_run():
            with torch.no_grad():
                tnet.inverse(tnet(tx)[1])
        progs["torch"] = torch_run
    floor_fn, floor_scale = sgemm_floor_prog(fl)
    progs["floor"] = floor_fn
    ts = interleaved(progs, ARGS.reps)
    row["floor"] = min(min(ts.pop("floor")) * floor_scale, fl / rate)
    row["arcflow/floor"] = statistics.median(ts["arcflow"]) / row["floor"]
    if "torch" in ts:
        row["torch/floor"] = statistics.median(ts["torch"]) / row["floor"]
    row["arcflow_fwd_inv"] = statistics.median(ts["arcflow"])
    if "torch" in ts:
        row["torch_fwd_inv"] = statistics.median(ts["torch"])
        row["arcflow/torch"] = median_ratio(ts["arcflow"], ts["torch"])
    results.append(row)
    return row


def main():
    skip = set(s for s in ARGS.skip.split(",") if s)
    if threadpool_limits:
        with threadpool_limits(THREADS):
            rate = sgemm_rate()
    else:
        rate = sgemm_rate()
    machine = {"cpu": platform.processor() or platform.machine(), "threads": THREADS,
               "conv2d_isa": _core.conv2d_cpu_isa(), "numpy": np.__version__, "arcflow": arcflow.__version__,
               "torch": torch.__version__ if torch is not None else None, "sgemm_GFLOPs": rate / 1e9,
               "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT")}
    try:
        with open("/proc/cpuinfo") as f:
            machine["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {machine['cpu']}, {THREADS} threads, conv2d micro-kernel {machine['conv2d_isa']}, "
          f"NumPy sgemm {rate / 1e9:.0f} GFLOP/s, OPENBLAS_THREAD_TIMEOUT="
          f"{os.environ.get('OPENBLAS_THREAD_TIMEOUT', 'unset')}, torch {machine['torch']}, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    how = 'repetitions, each program in its own block (--alone)' if ARGS.alone else 'interleaved repetitions'
    print(f"times: medians of {ARGS.reps} {how}; ratios: medians of the per-repetition ratios")
    if torch is None:
        print(f"(PyTorch not available: {TORCH_ERR})")
    results = []
    cases = [("IRevNetBlock(128, 64, stride 1), batch %d, 32x32" % ARGS.batch, 128, 64, 1)]
    if "stride2" not in skip:
        cases.append(("IRevNetBlock(64, 128, stride 2), batch %d, 32x32" % ARGS.batch, 64, 128, 2))
    for name, ci, co, s in cases:
        r = bench_block(name, ci, co, s, results, skip, rate)
        print(f"\n{name}: {r['flops_per_pass'] / 1e9:.2f} GFLOP per pass (floor at the best sgemm rate of the run: "
              f"{r['floor_fwd'] * 1e3:.1f} ms in the fwd run, {r['floor_inv'] * 1e3:.1f} ms in the inv run)")
        for d in ("fwd", "inv"):
            t = r[f"arcflow_{d}"]
            line = f"  {d}: arcflow {t * 1e3:7.1f} ms ({r['flops_per_pass'] / t / 1e9:4.0f} GFLOP/s, " \
                   f"{r[f'arcflow/floor_{d}']:.2f}x floor)"
            if f"torch_{d}" in r:
                line += f" | torch {r[f'torch_{d}'] * 1e3:7.1f} ms ({r[f'torch/floor_{d}']:.2f}x floor) | " \
                        f"arcflow/torch {r[f'arcflow/torch_{d}']:.2f}"
            if f"numpy_{d}" in r:
                line += f" | numpy {r[f'numpy_{d}'] * 1e3:7.1f} ms | numpy/arcflow {r[f'numpy/arcflow_{d}']:4.1f}x"
                if f"numpy/torch_{d}" in r:
                    line += f"  numpy/torch {r[f'numpy/torch_{d}']:4.1f}x"
                line += f"  numpy/floor {r[f'numpy/floor_{d}']:4.1f}x"
            print(line)
        if "breakdown" in r:
            tot = 0.0
            for label, t, fl in r["breakdown"]:
                tot += t
                print(f"    {label:24s} {t * 1e3:7.2f} ms  {fl / t / 1e9:4.0f} GFLOP/s  "
                      f"({fl / rate / t * 100:3.0f}% of the header's sgemm rate)")
            print(f"    convolutions {tot * 1e3:.2f} ms, rest of the forward {(r['arcflow_fwd'] - tot) * 1e3:.2f} ms")
    if "full" not in skip:
        r = bench_full(results, skip, rate)
        t = r["arcflow_fwd_inv"]
        line = (f"\n{r['workload']}: arcflow {t * 1e3:.1f} ms ({r['flops_per_pass'] / t / 1e9:.0f} GFLOP/s, "
                f"{r['arcflow/floor']:.2f}x floor, rel. reconstruction error {r['arcflow_rel_error']:.1e})")
        if "torch_fwd_inv" in r:
            line += (f" | torch {r['torch_fwd_inv'] * 1e3:.1f} ms ({r['torch/floor']:.2f}x floor) | "
                     f"arcflow/torch {r['arcflow/torch']:.2f}")
        print(line)
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump({"machine": machine, "command": " ".join(sys.argv), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
