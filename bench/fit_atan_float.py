"""Fits the float arctangent polynomial of cpp/include/arcflow/fast_math.hpp (atan_small<float>).

atan(x) = x + x z P(z), z = x^2, |x| <= tan(pi/8) (the range left by the kernels' angle reduction).
P is fitted to the relative error by Lawson's iteratively reweighted least squares (which converges to
the minimax fit) against mpmath; the script prints the coefficients rounded to float and the maximum
relative error of the polynomial evaluated in float32 against mpmath on a fine grid.

    python bench/fit_atan_float.py [--terms 5]

Needs mpmath (pip install mpmath); not part of the package.
"""
import argparse

import numpy as np
from mpmath import atan, mp, mpf, sqrt

mp.dps = 40
Z_MAX = float((sqrt(2) - 1) ** 2)


def fit(terms: int, nodes: int = 4000, iters: int = 200) -> np.ndarray:
    k = np.arange(nodes)
    z = Z_MAX * (1 - np.cos(np.pi * (k + 0.5) / nodes)) / 2  # Chebyshev nodes on [0, Z_MAX]
    x = np.sqrt(z)
    target = np.array([float((atan(mpf(xi)) / mpf(xi) - 1) / mpf(zi)) for xi, zi in zip(x, z)])
    a = np.vander(z, terms, increasing=True)
    w = np.ones(nodes)
    for _ in range(iters):
        wz = w * z  # relative error of atan = z (P - target)
        c, *_ = np.linalg.lstsq(a * wz[:, None], target * wz, rcond=None)
        e = np.abs(z * (a @ c - target))
        w = w * e / e.max() + w * 1e-3
        w /= w.max()
    return c


def max_rel_error_float(c: np.ndarray, points: int = 20001) -> float:
    xs = np.linspace(0, np.sqrt(Z_MAX), points).astype(np.float32)[1:]
    z = xs * xs
    p = np.zeros_like(z)
    for cc in c[::-1].astype(np.float32):
        p = p * z + cc
    y = (xs + xs * (z * p)).astype(np.float64)
    ref = np.array([float(atan(mpf(float(v)))) for v in xs])
    return float(np.max(np.abs(y - ref) / ref))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--terms", type=int, default=5)
    n = ap.parse_args().terms
    c = fit(n)
    print("coefficients (float):", ", ".join(f"{np.float32(v):.9e}f" for v in c))
    print(f"max relative error in float32: {max_rel_error_float(c):.2e}")


if __name__ == "__main__":
    main()
