"""``python -m arcflow demo``: NTK and NNGP kernel classification of scikit-learn's digits.

What it does
------------
1. Loads scikit-learn's bundled digits (1797 images of 8 x 8 pixels, 10 classes; no download) and
   L2-normalises every row, as the UCI study of Arora et al. (ICLR 2020) does.
2. Computes the kernels twice, on the same rows: with arcflow (C++) and with the plain NumPy
   reference (``arcflow.reference``), and times both.

   * NTK: the grid of Arora et al. -- ``dep`` = 0 ... d_max - 1 hidden ReLU layers and
     ``fix_dep`` = 0 ... dep frozen layers, all from one call: ``arcflow.compat.kernel_value_batch``
     (one recursion gives every (dep, fix_dep) kernel) against ``kernel_value_batch_original``
     (the published algorithm, d_max^2 layer updates).
   * NNGP: ``depth`` = 1 ... d_max hidden ReLU layers, w_std = sqrt(2), b_std = 0, multiplied by
     d / 2 so that k(x, x) = 1 (a constant factor: it only rescales C).
3. Kernel SVM (``sklearn.svm.SVC(kernel="precomputed")``) on a fixed stratified split
   train / validation / test (60 / 20 / 20 %, seeded). As in Arora et al., (dep, fix_dep, C) -- or
   (depth, C) for the NNGP -- is chosen by validation accuracy (the first best in grid order wins);
   the chosen model is refit on train + validation and its test accuracy is reported.
4. Prints a table with the accuracy from arcflow's kernels and from the reference's, the kernel
   times and the speed-up, and checks that the accuracies are equal (exit status 1 if not).
5. Runs the i-RevNet reconstruction demo of ``arcflow.invertible.demo`` when it is available.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["main", "run", "load_data"]

C_GRID = tuple(10.0 ** k for k in range(-2, 5))  # Arora et al.: C in {1e-2, ..., 1e4}


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def load_data(n: Optional[int] = None, seed: int = 0):
    """Digits rows (L2-normalised), labels, 8 x 8 images in [0, 1], and the split indices.

    ``n`` < 1797 takes a stratified subset of ``n`` rows (for a quick run).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = np.asarray(digits.data, dtype=np.float64)
    y = np.asarray(digits.target)
    images = np.asarray(digits.images, dtype=np.float64) / 16.0
    idx = np.arange(len(y))
    if n is not None and n < len(y):
        idx, _ = train_test_split(idx, train_size=n, stratify=y, random_state=seed)
        idx = np.sort(idx)
    X, y, images = X[idx], y[idx], images[idx]
    X = X / np.linalg.norm(X, axis=1, keepdims=True)  # no digit image is all zero
    pos = np.arange(len(y))
    train_val, test = train_test_split(pos, test_size=0.2, stratify=y, random_state=seed)
    train, val = train_test_split(train_val, test_size=0.25, stratify=y[train_val],
                                  random_state=seed)
    return X, y, images, (np.sort(train), np.sort(val), np.sort(test))


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
def _timed(fn: Callable, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def arcflow_kernels(X: np.ndarray, d_max: int, threads: Optional[int] = None):
    """(NTK grid (d_max, d_max, N, N), list of d_max NNGP matrices, seconds NTK, seconds NNGP)."""
    import arcflow
    from arcflow import compat

    ntk_grid, t_ntk = _timed(compat.kernel_value_batch, X, d_max)
    scale = X.shape[1] / 2.0
    t0 = time.perf_counter()
    nngps = [scale * arcflow.nngp(X, depth=dep, w_std=math.sqrt(2.0), b_std=0.0, threads=threads)
             for dep in range(1, d_max + 1)]
    return ntk_grid, nngps, t_ntk, time.perf_counter() - t0


def reference_kernels(X: np.ndarray, d_max: int):
    """The same kernels from the plain NumPy reference (the published algorithm for the NTK)."""
    from arcflow import reference

    ntk_grid, t_ntk = _timed(reference.kernel_value_batch_original, X, d_max)
    scale = X.shape[1] / 2.0
    t0 = time.perf_counter()
    nngps = [scale * reference.nngp(X, depth=dep, w_std=math.sqrt(2.0), b_std=0.0)
             for dep in range(1, d_max + 1)]
    return ntk_grid, nngps, t_ntk, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# model selection
# --------------------------------------------------------------------------------------------------
def _svm_accuracy(K: np.ndarray, y: np.ndarray, fit_rows, eval_rows, C: float) -> float:
    from sklearn.svm import SVC

    clf = SVC(kernel="precomputed", C=C)
    clf.fit(K[np.ix_(fit_rows, fit_rows)], y[fit_rows])
    return float(np.mean(clf.predict(K[np.ix_(eval_rows, fit_rows)]) == y[eval_rows]))


def select(candidates: Sequence[Tuple[tuple, np.ndarray]], y: np.ndarray, split, c_grid=C_GRID):
    """Grid search on the validation split; refit the winner on train + validation, score on test.

    ``candidates`` is a list of (label, kernel over all rows). Returns a dict with the chosen
    label and C, its validation and test accuracy, and every validation accuracy (for comparison).
    """
    train, val, test = split
    grid: Dict[tuple, float] = {}
    best = None
    for label, K in candidates:
        for C in c_grid:
            acc = _svm_accuracy(K, y, train, val, C)
            grid[label + (C,)] = acc
            if best is None or acc > best[0]:
                best = (acc, label, C, K)
    val_acc, label, C, K = best
    test_acc = _svm_accuracy(K, y, np.sort(np.concatenate([train, val])), test, C)
    return {"label": label, "C": C, "val_acc": val_acc, "test_acc": test_acc, "grid": grid}


def ntk_candidates(ntk_grid: np.ndarray):
    d_max = ntk_grid.shape[0]
    return [((dep, fix), ntk_grid[dep][fix]) for dep in range(d_max) for fix in range(dep + 1)]


def nngp_candidates(nngps: List[np.ndarray]):
    return [((dep,), K) for dep, K in enumerate(nngps, start=1)]


# --------------------------------------------------------------------------------------------------
# i-RevNet part (optional)
# --------------------------------------------------------------------------------------------------
def irevnet_part(images: np.ndarray, png_path: Optional[str]) -> Optional[object]:
    """Run arcflow.invertible.demo.run_irevnet_demo when present; print one line either way."""
    try:
        from arcflow.invertible.demo import run_irevnet_demo
    except ImportError:
        print("i-RevNet demo: not available yet (arcflow.invertible.demo is missing).")
        return None
    # NCHW float64, values in [0, 1]: the first 64 digits, one channel, 8 x 8 pixels
    batch = np.ascontiguousarray(images[:64, None, :, :], dtype=np.float64)
    try:
        result = run_irevnet_demo(batch, png_path=png_path)
    except NotImplementedError:
        print("i-RevNet demo: not available yet (run_irevnet_demo is not implemented).")
        return None
    print(f"i-RevNet demo: {_describe_irevnet(result)}")
    return result


def _describe_irevnet(result) -> str:
    if isinstance(result, (float, int, np.floating)):
        return f"relative reconstruction error ||x - f^-1(f(x))|| / ||x|| = {float(result):.3g}"
    if isinstance(result, dict) and "rel_error" in result:
        parts = []
        parts.append(f"relative reconstruction error ||x - f^-1(f(x))|| / ||x|| = "
                     f"{result['rel_error']:.2g} (float32)")
        if "rel_error_float64" in result:
            parts.append(f"{result['rel_error_float64']:.2g} (float64)")
        if "blocks" in result:
            parts.append(f"{result['blocks']} i-RevNet blocks")
        if "seconds" in result:
            parts.append(f"forward + inverse {result['seconds']:.3f} s")
        if result.get("png"):
            parts.append(f"figure: {result['png']}")
        return ", ".join(parts)
    if isinstance(result, dict):
        return ", ".join(f"{k} = {v:.3g}" if isinstance(v, (float, np.floating)) else f"{k} = {v}"
                         for k, v in result.items())
    return str(result)


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------
def _max_rel_diff(pairs, each: bool = False) -> float:
    """max |a - b| relative to max |b|: over all pairs together, or (each=True) the largest per-pair ratio."""
    worst = top = 0.0
    ratios = []
    for a, b in pairs:
        d, m = float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))
        worst, top = max(worst, d), max(top, m)
        ratios.append(d / m)
    return max(ratios) if each else worst / top


def _fmt_ntk(sel) -> str:
    dep, fix = sel["label"]
    return f"dep={dep} fix={fix} C={sel['C']:g}"


def _fmt_nngp(sel) -> str:
    (dep,) = sel["label"]
    return f"depth={dep} C={sel['C']:g}"


def run(n: Optional[int] = None, d_max: int = 5, seed: int = 0, threads: Optional[int] = None,
        irevnet: bool = True, png_path: Optional[str] = "irevnet_reconstruction.png",
        out=None) -> dict:
    """Run the demo, print its report to ``out`` (default stdout) and return the numbers."""
    out = sys.stdout if out is None else out

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    import arcflow

    X, y, images, split = load_data(n, seed)
    train, val, test = split
    say(f"arcflow {arcflow.__version__} demo: kernel SVM on scikit-learn's digits "
        f"({X.shape[0]} x {X.shape[1]}, {len(np.unique(y))} classes), rows L2-normalised")
    say(f"split (stratified, seed {seed}): train {len(train)} / validation {len(val)} / "
        f"test {len(test)}; hyperparameters chosen on validation, winner refit on "
        f"train + validation, test accuracy reported")
    say(f"grid: NTK dep 0..{d_max - 1} hidden ReLU layers x fix_dep 0..dep (Arora et al., "
        f"kernel_value_batch(X, {d_max})); NNGP depth 1..{d_max} (w_std = sqrt 2, scaled to "
        f"k(x,x) = 1); C in {{{', '.join(f'{c:g}' for c in C_GRID)}}}")
    say()

    # warm-up (thread pool, first-call costs) on a few rows, so the timing is of the work itself
    arcflow_kernels(X[:16], d_max, threads)
    a_ntk, a_nngp, a_t_ntk, a_t_nngp = arcflow_kernels(X, d_max, threads)
    r_ntk, r_nngp, r_t_ntk, r_t_nngp = reference_kernels(X, d_max)

    # Slice by slice: a_ntk - r_ntk over the whole (d_max, d_max, N, N) grid, and its abs, were two more
    # copies of the grid (1.3 GB of the demo's 2.8 GB peak for the 1797 digits).
    rel = _max_rel_diff(((a_ntk[dep, fix], r_ntk[dep, fix]) for dep in range(d_max) for fix in range(dep + 1)))
    rel_nngp = _max_rel_diff(zip(a_nngp, r_nngp), each=True)

    sel = {
        ("NTK", "arcflow"): select(ntk_candidates(a_ntk), y, split),
        ("NTK", "reference"): select(ntk_candidates(r_ntk), y, split),
        ("NNGP", "arcflow"): select(nngp_candidates(a_nngp), y, split),
        ("NNGP", "reference"): select(nngp_candidates(r_nngp), y, split),
    }
    times = {("NTK", "arcflow"): a_t_ntk, ("NTK", "reference"): r_t_ntk,
             ("NNGP", "arcflow"): a_t_nngp, ("NNGP", "reference"): r_t_nngp}
    names = {"arcflow": "arcflow (C++)", "reference": "NumPy reference"}
    fmt = {"NTK": _fmt_ntk, "NNGP": _fmt_nngp}

    header = f"{'kernel':<6} {'computed by':<16} {'kernel time':>11} {'speed-up':>9}   " \
             f"{'chosen on validation':<24} {'val acc':>8} {'test acc':>8}"
    say(header)
    say("-" * len(header))
    for kind in ("NTK", "NNGP"):
        for prog in ("arcflow", "reference"):
            s, t = sel[(kind, prog)], times[(kind, prog)]
            speed = f"{times[(kind, 'reference')] / t:8.1f}x" if prog == "arcflow" else ""
            say(f"{kind:<6} {names[prog]:<16} {t:10.3f}s {speed:>9}   {fmt[kind](s):<24} "
                f"{100 * s['val_acc']:7.2f}% {100 * s['test_acc']:7.2f}%")
    a_total, r_total = a_t_ntk + a_t_nngp, r_t_ntk + r_t_nngp
    say("-" * len(header))
    say(f"kernel time, all {d_max * (d_max + 1) // 2} NTK + {d_max} NNGP matrices: arcflow "
        f"{a_total:.3f} s, NumPy reference {r_total:.3f} s, speed-up {r_total / a_total:.1f}x "
        f"(arcflow threads: {arcflow.get_num_threads() if threads is None else threads})")
    say(f"largest difference arcflow vs reference (relative to the largest entry): "
        f"NTK {rel:.1e}, NNGP {rel_nngp:.1e}")

    equal = all(sel[(k, "arcflow")]["test_acc"] == sel[(k, "reference")]["test_acc"]
                and sel[(k, "arcflow")]["val_acc"] == sel[(k, "reference")]["val_acc"]
                for k in ("NTK", "NNGP"))
    n_cells = sum(len(sel[(k, "arcflow")]["grid"]) for k in ("NTK", "NNGP"))
    n_diff = sum(sel[(k, "arcflow")]["grid"][c] != sel[(k, "reference")]["grid"][c]
                 for k in ("NTK", "NNGP") for c in sel[(k, "arcflow")]["grid"])
    say(f"accuracies equal (arcflow vs reference): {'yes' if equal else 'NO'}; "
        f"validation accuracy differs in {n_diff} of {n_cells} grid cells")
    say()

    irev = irevnet_part(images, png_path) if irevnet else None
    return {
        "n": int(X.shape[0]), "d": int(X.shape[1]), "d_max": d_max, "seed": seed,
        "accuracy": {f"{k}/{p}": {"val": v["val_acc"], "test": v["test_acc"], "label": v["label"],
                                  "C": v["C"]} for (k, p), v in sel.items()},
        "time_s": {f"{k}/{p}": t for (k, p), t in times.items()},
        "speedup": r_total / a_total, "max_rel_diff": {"ntk": rel, "nngp": rel_nngp},
        "equal": equal, "grid_cells_differing": n_diff, "irevnet": irev,
    }


N_MIN = 50  # the stratified 60 / 20 / 20 split needs every one of the 10 classes in each part


def _int_arg(lo: int, hi: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be between {lo} and {hi}, got {v}")
        return v
    return parse


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ._dispatch import MAX_THREADS

    parser = argparse.ArgumentParser(
        prog="python -m arcflow demo",
        description="NTK / NNGP kernel SVM on scikit-learn's digits: arcflow vs the NumPy reference.")
    parser.add_argument("--n", type=_int_arg(N_MIN, 1797, "--n"), default=None,
                        help=f"use a stratified subset of N rows, {N_MIN} to 1797 (default: all 1797)")
    parser.add_argument("--quick", action="store_true",
                        help="small run for tests: 300 rows, d_max 3, no i-RevNet part")
    parser.add_argument("--d-max", type=_int_arg(1, 20, "--d-max"), default=5,
                        help="NTK/NNGP depths 1..D, D from 1 to 20 (default 5)")
    parser.add_argument("--seed", type=_int_arg(0, 2**32 - 1, "--seed"), default=0,
                        help="seed of the split (default 0)")
    parser.add_argument("--threads", type=_int_arg(1, MAX_THREADS, "--threads"), default=None,
                        help=f"arcflow threads, 1 to {MAX_THREADS} (default: all)")
    parser.add_argument("--png", default="irevnet_reconstruction.png",
                        help="where the i-RevNet demo writes its figure")
    parser.add_argument("--no-irevnet", action="store_true", help="skip the i-RevNet part")
    args = parser.parse_args(argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("the demo needs scikit-learn: pip install \"arcflow[demo]\"", file=sys.stderr)
        return 2
    n, d_max, irev = args.n, args.d_max, not args.no_irevnet
    if args.quick:
        n, d_max, irev = (n or 300), min(d_max, 3), False
    result = run(n=n, d_max=d_max, seed=args.seed, threads=args.threads, irevnet=irev,
                 png_path=args.png)
    return 0 if result["equal"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
