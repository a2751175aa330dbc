"""MNIST-sized kernel into a memory map: `python bench/mnist_scale.py [N]` (default 60000, d = 784, float32 NTK,
depth 3). Writes a (N, N) float32 .npy memmap (14.4 GB at N = 60000) tile by tile with a progress bar,
prints the wall time (on the CPU: device='cpu') and checks a 50 x 50 corner against the NumPy reference.
Ctrl-C stops it within a second."""
import os
import sys
import tempfile
import time

import numpy as np

import arcflow


def main(n: int = 60000, d: int = 784) -> None:
    x = np.random.default_rng(0).random((n, d), dtype=np.float32)  # MNIST-like: non-negative pixels
    path = os.path.join(tempfile.gettempdir(), f"arcflow_ntk_{n}.npy")
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, n))
    t0 = time.perf_counter()
    try:
        arcflow.ntk(x, depth=3, out=out, progress=True, device="cpu")
        out.flush()
        el = time.perf_counter() - t0
        ref = arcflow.reference.ntk(x[:50].astype(np.float64), depth=3)
        err = float(np.abs(out[:50, :50] - ref).max() / np.abs(ref).max())
        print(f"N={n} d={d} float32 NTK depth 3 into np.memmap ({out.nbytes / 1e9:.1f} GB) on the CPU "
              f"({arcflow.get_num_threads()} threads): {el:.1f} s; "
              f"50x50 corner vs reference: rel. error {err:.1e}")
    finally:
        del out
        os.remove(path)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 60000)
