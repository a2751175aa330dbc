"""A 50-digit mpmath evaluation of the kernel recursion of docs/mathematics.md §1.

It is the tie-breaker of the numerical notes in docs/mathematics.md §1.3: where neural-tangents (or the NumPy
reference) and arcflow disagree by more than 1e-10, this decides. Pairs are evaluated one at a time,
so keep the inputs small (a few rows, depth <= 8). A cosine within 1e-40 of +-1 is taken as exactly
+-1 (exactly collinear inputs), so Step and Sign keep their exact angle 0 or pi through the layers.
The session fixture ``mp_oracle`` (conftest.py) returns :func:`mp_kernels`.
"""
from __future__ import annotations

import numpy as np


def _mp():
    import mpmath as mp_module
    return mp_module


def _mp_j(mp, n, theta):
    """Cho & Saul's J_n(theta) at the working precision."""
    j_prev = mp.pi - theta
    if n == 0:
        return j_prev
    s, c = mp.sin(theta), mp.cos(theta)
    j_cur = s + (mp.pi - theta) * c
    for k in range(2, n + 1):
        j_prev, j_cur = j_cur, (2 * k - 1) * c * j_cur + (k - 1) ** 2 * s * s * j_prev
    return j_cur


def _mp_layer(mp, act, s1, s2, s12, need_dot):
    """T and Tdot of one layer for one pair (s1, s2 >= 0), with c = 0 where s1 s2 = 0."""
    from arcflow.activations import ABReLU, Erf, RectifiedMonomial, Sign

    root = mp.sqrt(s1 * s2)
    if root == 0:
        c = mp.mpf(0)
    else:
        c = max(mp.mpf(-1), min(mp.mpf(1), s12 / root))
        # Exactly collinear pairs have c = +-1 exactly; 50-digit rounding leaves 1e-50, and Step or
        # Sign would amplify that gap layer by layer (gap -> sqrt(gap)). Snap such a c to +-1.
        if 1 - abs(c) < mp.mpf(10) ** (10 - mp.mp.dps):
            c = mp.sign(c)
    theta = mp.acos(c)
    if isinstance(act, ABReLU):
        a, b = mp.mpf(act.a), mp.mpf(act.b)
        curv = (a - b) ** 2 / (2 * mp.pi)
        t = curv * root * (mp.sin(theta) - theta * c) + (a * a + b * b) / 2 * s12
        return t, ((a * a + b * b) / 2 - curv * theta) if need_dot else None
    if isinstance(act, RectifiedMonomial):
        n = act.n
        t = root ** n / (2 * mp.pi) * _mp_j(mp, n, theta)
        tdot = n * n * root ** (n - 1) / (2 * mp.pi) * _mp_j(mp, n - 1, theta) if need_dot else None
        return t, tdot
    if isinstance(act, Sign):
        return 2 / mp.pi * mp.asin(c), None
    if isinstance(act, Erf):
        q = (1 + 2 * s1) * (1 + 2 * s2)
        t = 2 / mp.pi * mp.asin(2 * s12 / mp.sqrt(q))
        return t, (4 / mp.pi / mp.sqrt(q - 4 * s12 * s12)) if need_dot else None
    raise ValueError(f"mp_kernels: unsupported activation {act!r}")


def mp_kernels(x1, x2=None, *, depth, activation="relu", w_std=1.0, b_std=0.0, fix_dep=0,
               need_ntk=True, dps=50, all_depths=False):
    """NNGP and NTK evaluated pair by pair at ``dps`` digits; returned rounded to float64.

    The inputs are taken as exact binary numbers. With ``all_depths=True`` returns two lists indexed
    by depth 0 ... ``depth`` (fix_dep must then be 0), else the pair (nngp, ntk) at ``depth``.
    NTK entries are None-filled (NaN) when ``need_ntk`` is False.
    """
    from arcflow.activations import resolve

    mp = _mp()
    act = resolve(activation)
    x1 = np.asarray(x1, dtype=np.float64)
    x2 = x1 if x2 is None else np.asarray(x2, dtype=np.float64)
    n1, d = x1.shape
    n2 = x2.shape[0]
    nngp = np.full((depth + 1, n1, n2), np.nan)
    ntk = np.full((depth + 1, n1, n2), np.nan)
    with mp.workdps(dps):
        w2, b2 = mp.mpf(w_std) ** 2, mp.mpf(b_std) ** 2
        rows1 = [[mp.mpf(float(v)) for v in r] for r in x1]
        rows2 = [[mp.mpf(float(v)) for v in r] for r in x2]

        def first(u, v):
            return w2 * mp.fsum(a * b for a, b in zip(u, v)) / d + b2

        def diag_chain(u):                       # Sigma^l(x, x) for l = 1 ... depth + 1, c = 1
            s = [first(u, u)]
            for _ in range(depth):
                t, _ = _mp_layer(mp, act, s[-1], s[-1], s[-1], False)
                s.append(w2 * t + b2)
            return s

        diag1 = [diag_chain(u) for u in rows1]
        diag2 = [diag_chain(v) for v in rows2]
        for i, u in enumerate(rows1):
            for j, v in enumerate(rows2):
                s12 = first(u, v)
                th = s12 if fix_dep < 1 else mp.mpf(0)
                nngp[0, i, j], ntk[0, i, j] = float(s12), float(th)
                for layer in range(2, depth + 2):
                    t, tdot = _mp_layer(mp, act, diag1[i][layer - 2], diag2[j][layer - 2], s12,
                                        need_ntk)
                    s12 = w2 * t + b2
                    if need_ntk:
                        th = w2 * tdot * th + (s12 if layer > fix_dep else 0)
                        ntk[layer - 1, i, j] = float(th)
                    nngp[layer - 1, i, j] = float(s12)
    if all_depths:
        return list(nngp), list(ntk)
    return nngp[depth], ntk[depth]
