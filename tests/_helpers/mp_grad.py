"""50-digit central finite differences of the kernel recursion, the oracle of arcflow.kernel_grads.

The recursion is mp_oracle's (the same per-layer formulas, ``_mp_layer``), evaluated with w_std and b_std as
50-digit numbers so that a step of 1e-20 leaves about 30 digits of the derivative (the truncation error of
the central difference is of order step^2 = 1e-40). Pair by pair: keep the inputs small.
"""
from __future__ import annotations

import numpy as np

from _helpers.mp_oracle import _mp, _mp_layer


def _mp_recursion(mp, act, rows1, rows2, d, depth, w, b, fix_dep, need_ntk, diag):
    """(nngp, ntk) as lists of lists of mpf at the parameters (w, b) (mpf); diag: k(x, x) per row of rows1."""
    w2, b2 = w * w, b * b

    def first(u, v):
        return w2 * mp.fsum(p * q for p, q in zip(u, v)) / d + b2

    def chain(u):
        s = [first(u, u)]
        for _ in range(depth):
            t, _ = _mp_layer(mp, act, s[-1], s[-1], s[-1], False)
            s.append(w2 * t + b2)
        return s

    c1 = [chain(u) for u in rows1]
    c2 = c1 if rows2 is None else [chain(v) for v in rows2]
    pairs = [(i, i) for i in range(len(rows1))] if diag else \
        [(i, j) for i in range(len(rows1)) for j in range(len(rows1 if rows2 is None else rows2))]
    out = {}
    for i, j in pairs:
        u, v = rows1[i], (rows1 if rows2 is None else rows2)[j]
        s12 = first(u, v)
        th = s12 if fix_dep < 1 else mp.mpf(0)
        for layer in range(2, depth + 2):
            t, tdot = _mp_layer(mp, act, c1[i][layer - 2], c2[j][layer - 2], s12, need_ntk)
            s12 = w2 * t + b2
            if need_ntk:
                th = w2 * tdot * th + (s12 if layer > fix_dep else 0)
        out[i, j] = (s12, th if need_ntk else None)
    return out


def mp_kernel_grads(x1, x2=None, *, depth, activation="relu", w_std=1.0, b_std=0.0, fix_dep=0, need_ntk=True,
                    diag=False, dps=50, step="1e-20"):
    """d/dw_std and d/db_std of the NNGP and NTK by 50-digit central differences, rounded to float64.

    Returns a dict {"nngp": (d_w, d_b), "ntk": (d_w, d_b)} (no "ntk" when need_ntk is False); the arrays are
    (n1, n2), or (n1,) with diag=True (x2 must then be None).
    """
    from arcflow.activations import resolve

    mp = _mp()
    act = resolve(activation)
    x1 = np.asarray(x1, dtype=np.float64)
    n1, d = x1.shape
    n2 = n1 if x2 is None else np.asarray(x2).shape[0]
    shape = (n1,) if diag else (n1, n2)
    res = {k: (np.zeros(shape), np.zeros(shape)) for k in (("nngp", "ntk") if need_ntk else ("nngp",))}
    with mp.workdps(dps):
        h = mp.mpf(step)
        rows1 = [[mp.mpf(float(v)) for v in r] for r in x1]
        rows2 = None if x2 is None else [[mp.mpf(float(v)) for v in r] for r in np.asarray(x2, dtype=np.float64)]
        w, b = mp.mpf(float(w_std)), mp.mpf(float(b_std))
        for p, (wp, bp, wm, bm) in enumerate(((w + h, b, w - h, b), (w, b + h, w, b - h))):
            hi = _mp_recursion(mp, act, rows1, rows2, d, depth, wp, bp, fix_dep, need_ntk, diag)
            lo = _mp_recursion(mp, act, rows1, rows2, d, depth, wm, bm, fix_dep, need_ntk, diag)
            for (i, j), (s_hi, t_hi) in hi.items():
                s_lo, t_lo = lo[i, j]
                idx = i if diag else (i, j)
                res["nngp"][p][idx] = float((s_hi - s_lo) / (2 * h))
                if need_ntk:
                    res["ntk"][p][idx] = float((t_hi - t_lo) / (2 * h))
    return res
