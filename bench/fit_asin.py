"""Fits the division-free arcsine of cpp/include/arcflow/fast_math.hpp (asin_poly) and prints its C++ code.

asin(u) = u + u z R(z), z = u^2, 0 <= u <= 1/sqrt(2) (the range that angle_direct leaves). R is the
Chebyshev interpolant of (asin(u) - u) / (u z) on 0 <= z <= 1/2, computed with mpmath at 50 digits, rounded
to the working precision, and evaluated as the kernels do: in K interleaved Horner chains in powers of z^K
(chain k holds c_k, c_(k+K), c_(k+2K), ...), p = sum_k z^k chain_k. The script checks the rounded
polynomial, evaluated in that precision and that order, against mpmath on a fine grid and prints the
maximum relative error, then the code.

    python bench/fit_asin.py [--terms 18 --chains 4 --dtype float64] [--terms 8 --chains 2 --dtype float32]

Needs mpmath (pip install mpmath); not part of the package.
"""
import argparse

import numpy as np
import mpmath as mp

mp.mp.dps = 50


def _r(z):
    if z == 0:
        return mp.mpf(1) / 6
    u = mp.sqrt(z)
    return (mp.asin(u) - u) / (u * z)


def fit(terms: int) -> list:
    """Coefficients c_0 .. c_(terms-1) of R in increasing powers of z, as mpmath numbers."""
    poly = mp.chebyfit(_r, [mp.mpf(0), mp.mpf(1) / 2], terms)
    return list(poly[::-1])


def chains(coef: np.ndarray, k: int) -> list:
    """Chain j: the indices j, j + k, j + 2k, ... (evaluated from the highest down)."""
    return [list(range(j, len(coef), k)) for j in range(k)]


def evaluate(u: np.ndarray, coef: np.ndarray, k: int) -> np.ndarray:
    """The polynomial in coef's precision and in the kernels' order of operations."""
    z = u * u
    z2 = z * z
    zk = {1: z, 2: z2, 4: z2 * z2}[k]
    vals = []
    for idx in chains(coef, k):
        acc = np.full_like(u, coef[idx[-1]])
        for i in reversed(idx[:-1]):
            acc = acc * zk + coef[i]
        vals.append(acc)
    if k == 1:
        p = vals[0]
    elif k == 2:
        p = vals[0] + z * vals[1]
    else:
        p = (vals[0] + z * vals[1]) + z2 * (vals[2] + z * vals[3])
    return u + u * (z * p)


def max_rel_error(coef: np.ndarray, k: int, points: int = 20001) -> float:
    u = np.linspace(0, np.sqrt(0.5) * (1 + 1e-6), points).astype(coef.dtype)[1:]
    y = evaluate(u, coef, k).astype(np.float64)
    ref = np.array([float(mp.asin(mp.mpf(float(v)))) for v in u])
    return float(np.max(np.abs(y - ref) / ref))


def code(coef: np.ndarray, k: int) -> str:
    f = coef.dtype == np.float32
    lit = (lambda v: f"{np.float32(v):.9e}f") if f else (lambda v: f"T({float(v):.17e})")
    lines = []
    idx = chains(coef, k)
    names = "abcd"[:k]
    lines.append("  " + ", ".join(f"{names[j]} = {lit(coef[idx[j][-1]])}" for j in range(k)) + ";  // "
                 + ", ".join(f"c{idx[j][-1]}" for j in range(k)))
    depth = max(len(i) for i in idx)
    for step in range(2, depth + 1):
        for j in range(k):
            if len(idx[j]) >= step:
                i = idx[j][-step]
                lines.append(f"  {names[j]} = {names[j]} * zk + {lit(coef[i])};  // c{i}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--terms", type=int, default=18)
    ap.add_argument("--chains", type=int, default=4, choices=(1, 2, 4))
    ap.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    a = ap.parse_args()
    coef = np.array([float(c) for c in fit(a.terms)], dtype=a.dtype)
    print(f"max relative error in {a.dtype}, {a.chains} chain(s): {max_rel_error(coef, a.chains):.2e}")
    print(code(coef, a.chains))


if __name__ == "__main__":
    main()
