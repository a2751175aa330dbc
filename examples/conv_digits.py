"""Convolutional kernels on scikit-learn's digits: CNTK and CNN-GP side by side with the fully-connected NTK.

    python examples/conv_digits.py                 # all 1797 digits
    python examples/conv_digits.py --n 300 --threads 2

The kernels, all of infinitely wide networks (ntk parameterization, no biases):

* CNTK-GAP / CNN-GP-GAP: the NTK / NNGP of ``depth x [Conv(3x3, SAME, W_std=sqrt 2), Relu], GlobalAvgPool, Dense``
  (the convolutional NTK of Arora et al. 2019 and the CNN-GP of Novak et al. 2019 with global average pooling);
* CNTK-Flatten / CNN-GP-Flatten: the same with Flatten in place of GlobalAvgPool;
* FC NTK / FC NNGP: the fully-connected ReLU kernels of ``python -m arcflow demo`` (the NTK grid of Arora et al.,
  dep x fix_dep, and the NNGP of depth 1 to 5), computed by ``arcflow.compat`` / ``arcflow.nngp``.

The protocol is the demo's (``arcflow.demo``): rows L2-normalised, a fixed stratified split train / validation /
test (60 / 20 / 20 %), the network's depth and the SVM's C chosen on validation, the winner refit on train +
validation and scored on test. The images are the L2-normalised rows as 8 x 8 x 1 arrays times 8 (mean square
pixel 1; without biases the kernels scale with it, which only rescales C). The CNTK and the CNN-GP of one readout
come from the same call (``kfn(x)`` returns both), so their kernel time is the same number: the time of both.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Optional, Sequence

import numpy as np

import arcflow
from arcflow import stax
from arcflow.demo import C_GRID, N_MIN, arcflow_kernels, load_data, nngp_candidates, ntk_candidates, select

READOUTS = {"GAP": stax.GlobalAvgPool, "Flatten": stax.Flatten}
DEPTHS = (3, 4, 5)


def conv_network(depth: int, readout: str) -> stax.SerialKernelFn:
    """depth x [Conv 3x3 SAME, Relu], the readout, Dense: the kernel function of arcflow.stax."""
    layers = []
    for _ in range(depth):
        layers += [stax.Conv(64, (3, 3), padding="SAME", W_std=math.sqrt(2.0)), stax.Relu()]
    return stax.serial(*layers, READOUTS[readout](), stax.Dense(10, W_std=1.0))


def as_images(X: np.ndarray) -> np.ndarray:
    """L2-normalised 64-pixel rows as (n, 8, 8, 1) images with mean square pixel 1."""
    return math.sqrt(X.shape[1]) * X.reshape(-1, 8, 8, 1)


def conv_kernels(images: np.ndarray, depths: Sequence[int], readout: str, threads: Optional[int] = None):
    """{depth: arcflow.Kernels (nngp, ntk)} over all images, and the seconds all of them took."""
    out = {}
    t0 = time.perf_counter()
    for depth in depths:
        out[depth] = conv_network(depth, readout)(images, threads=threads)
    return out, time.perf_counter() - t0


def run(n: Optional[int] = None, depths: Sequence[int] = DEPTHS, seed: int = 0, d_max: int = 5,
        threads: Optional[int] = None, out=None) -> dict:
    """Compute every kernel, select and score each under the demo's protocol, print the table to ``out``
    (default stdout) and return the numbers, the convolutional kernels and the images they were computed on."""
    out = sys.stdout if out is None else out

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    X, y, _, split = load_data(n, seed)
    images = as_images(X)
    train, val, test = split
    depth_txt = ", ".join(str(d) for d in depths)
    say(f"arcflow {arcflow.__version__}: convolutional and fully-connected kernels, SVM on scikit-learn's digits "
        f"({len(y)} images 8 x 8, 10 classes)")
    say(f"split (stratified, seed {seed}): train {len(train)} / validation {len(val)} / test {len(test)}; depth "
        f"and C chosen on validation, winner refit on train + validation, test accuracy reported")
    say(f"conv networks: depth x [Conv 3x3 SAME, W_std = sqrt 2, Relu], readout, Dense; depth in {{{depth_txt}}}; "
        f"C in {{{', '.join(f'{c:g}' for c in C_GRID)}}}")
    say()

    # warm-up (thread pool, first-call costs) on a few images, so the timing is of the work itself
    arcflow_kernels(X[:16], d_max, threads)
    for readout in READOUTS:
        conv_network(depths[0], readout)(images[:4], threads=threads)

    rows = []
    fc_ntk, fc_nngp, t_ntk, t_nngp = arcflow_kernels(X, d_max, threads)
    rows.append(("FC NTK", f"dep 0..{d_max - 1} x fix_dep (Arora et al.)", t_ntk,
                 select(ntk_candidates(fc_ntk), y, split), lambda s: "dep={} fix={}".format(*s["label"])))
    rows.append(("FC NNGP", f"depth 1..{d_max}, ReLU", t_nngp, select(nngp_candidates(fc_nngp), y, split),
                 lambda s: "depth={}".format(*s["label"])))
    kernels = {}
    for readout in READOUTS:
        ks, secs = conv_kernels(images, depths, readout, threads)
        kernels[readout] = ks
        for kind, field in (("CNTK", "ntk"), ("CNN-GP", "nngp")):
            cands = [((d,), getattr(k, field)) for d, k in ks.items()]
            rows.append((f"{kind}-{readout}", f"[Conv 3x3, Relu] x depth, {readout}, Dense", secs,
                         select(cands, y, split), lambda s: "depth={}".format(*s["label"])))

    header = (f"{'kernel':<15} {'network':<40} {'kernel time':>11}   {'chosen on validation':<22} "
              f"{'val acc':>8} {'test acc':>8}")
    say(header)
    say("-" * len(header))
    for name, net, secs, sel, fmt in rows:
        chosen = f"{fmt(sel)} C={sel['C']:g}"
        say(f"{name:<15} {net:<40} {secs:10.3f}s   {chosen:<22} {100 * sel['val_acc']:7.2f}% "
            f"{100 * sel['test_acc']:7.2f}%")
    say("-" * len(header))
    best = max(rows, key=lambda r: (r[3]["test_acc"], r[3]["val_acc"]))
    say(f"best test accuracy: {best[0]} ({100 * best[3]['test_acc']:.2f}%); arcflow threads: "
        f"{arcflow.get_num_threads() if threads is None else threads}; the CNTK and CNN-GP of one readout share "
        f"their kernel time (one call gives both, for every depth)")
    return {
        "n": int(len(y)), "depths": tuple(depths), "seed": seed,
        "rows": [{"kernel": name, "network": net, "time_s": secs, "label": sel["label"], "C": sel["C"],
                  "val_acc": sel["val_acc"], "test_acc": sel["test_acc"]} for name, net, secs, sel, _ in rows],
        "kernels": kernels, "images": images, "split": split,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None,
                        help=f"a stratified subset of N digits, {N_MIN} to 1797 (default: all 1797)")
    parser.add_argument("--threads", type=int, default=None, help="arcflow threads (default: all)")
    parser.add_argument("--depths", default=",".join(map(str, DEPTHS)),
                        help="the conv networks' depths to choose from on validation (default 3,4,5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    args = parser.parse_args(argv)
    if args.n is not None and not N_MIN <= args.n <= 1797:
        parser.error(f"--n must be between {N_MIN} and 1797, got {args.n}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    try:
        depths = tuple(int(d) for d in args.depths.split(","))
    except ValueError:
        parser.error(f"--depths must be integers separated by commas, got {args.depths!r}")
    if not depths or min(depths) < 1:
        parser.error(f"--depths must be positive, got {args.depths!r}")
    run(n=args.n, depths=depths, seed=args.seed, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
