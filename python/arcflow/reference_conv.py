"""Exact float64 NumPy evaluation of the kernels of :func:`arcflow.stax.serial` networks (CNN-GP and CNTK).

The oracle of the fused C++ engine that :mod:`arcflow.stax` uses (tests compare the two), slow but plain: it
follows neural-tangents 0.6.5's ``stax`` kernel rules (ntk parameterization) layer by
layer on the covariance of every pair of pixel positions, for a block of image pairs at a time:

* input:   ``Sigma[p, q] = <x[p, :], y[q, :]> / C``  (C channels; for (n, d) inputs ``<x, y> / d``), Theta = 0;
* Dense / Conv: ``Sigma <- W_std^2 conv(Sigma) + b_std^2`` (no bias term for ``b_std=None``),
  ``Theta <- W_std^2 conv(Theta) + Sigma``, where ``conv`` averages ``Sigma[p + a, q + a]`` over the filter
  offsets a (the 1 / filter size of the ntk parameterization), with the padding applied to both positions
  (zeros for "SAME", periodic for "CIRCULAR"); Dense is the identity ``conv``;
* activation: ``Sigma <- T``, ``Theta <- Tdot * Theta`` with T, Tdot the Gaussian expectations of
  :mod:`arcflow.reference` at each pixel pair, whose variances are the images' own ``Sigma(x, x)[p, p]`` and
  ``Sigma(y, y)[q, q]``;
* AvgPool: the window average over both positions independently (normalised by the full window, as
  neural-tangents' default ``normalize_edges=False``), Sigma and Theta alike;
* Flatten: the mean of the same-position entries ``Sigma[p, p]``; GlobalAvgPool: the mean over all pairs (p, q).

Memory is O(block * (H W)^2): each block of pairs holds a few (H W)^2 arrays per pair (checked before it is
allocated), never an n1 x n2 x (H W)^2 array. Each image's own recursion runs first (the per-image tables of the
variances each activation needs); on its same-position pairs the cosine is pinned to exactly 1. Pairs of
*different* images whose patches are collinear (duplicate images) are computed naively, as in
:mod:`arcflow.reference` (off by up to ~1e-8 there).
"""
from __future__ import annotations

from collections import namedtuple
from typing import Iterator, List, Optional, Tuple

import numpy as np

from . import reference as _ref

__all__ = ["Kernels", "evaluate", "spatial_shapes", "BLOCK_BYTES"]

Kernels = namedtuple("Kernels", ["nngp", "ntk"])

# Target working memory of one block of pairs; a single pair larger than this still runs (if memory allows).
BLOCK_BYTES = 64 << 20
# (H W)^2 float64 arrays alive at once per pair: Sigma, Theta, a padded copy, the angle's temporaries.
_LIVE_ARRAYS = 12

# An op is a plain tuple (the compiled form of an arcflow.stax layer):
#   ("dense", w2, b2)                     b2 None: no bias
#   ("conv", fh, fw, padding, w2, b2)     padding "SAME" | "VALID" | "CIRCULAR"; stride 1
#   ("pool", wh, ww, sh, sw, padding)
#   ("act", activation)                   an arcflow.activations object
#   ("flatten",) | ("gap",)


def _same_pads(size: int, window: int, stride: int) -> Tuple[int, int]:
    """lax.padtype_to_pads for "SAME": the output has ceil(size / stride) entries."""
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def _out_size(size: int, window: int, stride: int, padding: str) -> int:
    if padding == "VALID":
        return (size - window) // stride + 1 if size >= window else 0
    return -(-size // stride)


def spatial_shapes(ops, hw: Tuple[int, int]) -> List[Optional[Tuple[int, int]]]:
    """The image size entering each op (None once the readout has removed the positions); the last entry is
    the size after the last op. A VALID window larger than the image gives (0, w) or (h, 0)."""
    shapes: List[Optional[Tuple[int, int]]] = [hw]
    cur: Optional[Tuple[int, int]] = hw
    for op in ops:
        if cur is not None:
            if op[0] == "conv":
                cur = (_out_size(cur[0], op[1], 1, op[3]), _out_size(cur[1], op[2], 1, op[3]))
            elif op[0] == "pool":
                cur = (_out_size(cur[0], op[1], op[3], op[5]), _out_size(cur[1], op[2], op[4], op[5]))
            elif op[0] in ("flatten", "gap"):
                cur = None
        shapes.append(cur)
    return shapes


def _pad(s: np.ndarray, axes, pads, padding: str) -> np.ndarray:
    """Pad the position axes (both positions of a pair) with zeros ("SAME") or periodically ("CIRCULAR")."""
    if padding == "VALID" or pads == (0, 0):
        return s
    width = [(0, 0)] * s.ndim
    for a in axes:
        width[a] = pads
    return np.pad(s, width, mode="constant" if padding == "SAME" else "wrap")


def _conv(s: np.ndarray, fh: int, fw: int, padding: str) -> np.ndarray:
    """mean over filter offsets (a, b) of s[:, h1 + a, w1 + b, h2 + a, w2 + b], padded; s is (B, H, W, H, W)."""
    for (ax1, ax2), f in (((1, 3), fh), ((2, 4), fw)):
        size = s.shape[ax1]
        if padding != "VALID":
            s = _pad(s, (ax1, ax2), _same_pads(size, f, 1), padding)
        out = s.shape[ax1] - f + 1
        acc = None
        for a in range(f):
            idx = [slice(None)] * s.ndim
            idx[ax1] = idx[ax2] = slice(a, a + out)
            part = s[tuple(idx)]
            acc = part.copy() if acc is None else acc + part
        s = acc / f
    return s


def _pool(s: np.ndarray, wh: int, ww: int, sh: int, sw: int, padding: str) -> np.ndarray:
    """Window average over each position axis independently (both positions of the pair), with strides."""
    for ax, w, st in ((1, wh, sh), (3, wh, sh), (2, ww, sw), (4, ww, sw)):
        size = s.shape[ax]
        out = _out_size(size, w, st, padding)
        if padding != "VALID":
            s = _pad(s, (ax,), _same_pads(size, w, st), padding)
        acc = None
        for a in range(w):
            idx = [slice(None)] * s.ndim
            idx[ax] = slice(a, a + st * (out - 1) + 1, st)
            part = s[tuple(idx)]
            acc = part.copy() if acc is None else acc + part
        s = acc / w
    return s


def _readout(s: np.ndarray, kind: str) -> np.ndarray:
    b, h, w = s.shape[:3]
    m = s.reshape(b, h * w, h * w)
    if kind == "flatten":
        return np.einsum("bpp->b", m) / (h * w)
    return m.sum(axis=(1, 2)) / (h * w) ** 2


def _act(act, s12, s1, s2, image: bool, self_pair: bool, need_dot: bool):
    """T and Tdot at every pixel pair; s1, s2 are the two images' own same-position variances."""
    if image:
        s1 = s1[:, :, :, None, None]
        s2 = s2[:, None, None, :, :]
    root, c, theta = _ref._angle(s1, s2, s12)
    if self_pair:
        # Same image, same position: the cosine is exactly 1 (0 for a zero variance, the reference's convention).
        if image:
            b, h, w = s12.shape[:3]
            p = np.arange(h * w)
            dvar = s12.reshape(b, h * w, h * w)[:, p, p]
            c.reshape(b, h * w, h * w)[:, p, p] = np.where(dvar == 0.0, 0.0, 1.0)
            theta.reshape(b, h * w, h * w)[:, p, p] = np.where(dvar == 0.0, np.pi / 2, 0.0)
        else:
            c = np.where(s12 == 0.0, 0.0, 1.0)
            theta = np.where(s12 == 0.0, np.pi / 2, 0.0)
    return _ref._expectations(act, s1, s2, s12, root, c, theta, need_dot)


def _diag_positions(s: np.ndarray, image: bool) -> np.ndarray:
    if not image:
        return s.copy()
    b, h, w = s.shape[:3]
    p = np.arange(h * w)
    return s.reshape(b, h * w, h * w)[:, p, p].reshape(b, h, w)


def _run_pairs(ops, xa, xb, tab_a, tab_b, want_ntk: bool):
    """Sigma and Theta after every op for the pairs (xa[k], xb[k]). tab_a / tab_b: per activation, the images'
    own same-position variances; None for a self pair (xa is xb), whose tables are recorded and returned."""
    self_pair = tab_a is None
    image = xa.ndim == 4
    d = xa.shape[-1]
    scale = 1.0 / d if d > 0 else 0.0
    if image:
        s = np.einsum("bhwc,bxyc->bhwxy", xa, xb) * scale
    else:
        s = np.einsum("bc,bc->b", xa, xb) * scale
    theta = np.zeros_like(s) if want_ntk else None
    tables = []
    k = 0
    for op in ops:
        kind = op[0]
        if kind == "dense" or kind == "conv":
            w2, b2 = (op[1], op[2]) if kind == "dense" else (op[4], op[5])
            if kind == "conv":
                s = _conv(s, op[1], op[2], op[3])
                if want_ntk:
                    theta = _conv(theta, op[1], op[2], op[3])
            s = w2 * s
            if b2 is not None:
                s = s + b2
            if want_ntk:
                theta = w2 * theta + s
        elif kind == "act":
            if self_pair:
                v = _diag_positions(s, image)
                tables.append(v)
                va = vb = v
            else:
                va, vb = tab_a[k], tab_b[k]
            k += 1
            t, tdot = _act(op[1], s, va, vb, image, self_pair, want_ntk)
            s = t
            if want_ntk:
                theta = tdot * theta
        elif kind == "pool":
            s = _pool(s, *op[1:])
            if want_ntk:
                theta = _pool(theta, *op[1:])
        else:  # readout
            s = _readout(s, kind)
            if want_ntk:
                theta = _readout(theta, kind)
            image = False
    return s, theta, tables


def _pair_chunks(n1: int, n2: int, sym: bool, block: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Index arrays (i, j) of at most `block` pairs: all pairs, or i < j for the symmetric case."""
    ii: list = []
    jj: list = []
    count = 0
    for i in range(n1):
        j0 = i + 1 if sym else 0
        while j0 < n2:
            j1 = min(n2, j0 + block - count)
            ii.append(np.full(j1 - j0, i, dtype=np.intp))
            jj.append(np.arange(j0, j1, dtype=np.intp))
            count += j1 - j0
            j0 = j1
            if count == block:
                yield np.concatenate(ii), np.concatenate(jj)
                ii, jj, count = [], [], 0
    if count:
        yield np.concatenate(ii), np.concatenate(jj)


def _block_size(ops, hw, where: str) -> int:
    from ._dispatch import check_allocation
    if hw is None:
        per_pair = 8 * _LIVE_ARRAYS
    else:
        # the largest (padded) image along the way
        biggest = 1
        for op, shape in zip(ops, spatial_shapes(ops, hw)):
            if shape is None:
                break
            h, w = shape
            if op[0] == "conv" and op[3] != "VALID":
                h, w = h + op[1] - 1, w + op[2] - 1
            elif op[0] == "pool" and op[5] != "VALID":
                h, w = h + op[1], w + op[2]
            biggest = max(biggest, h * w)
        per_pair = 8 * _LIVE_ARRAYS * biggest * biggest
    block = max(1, min(BLOCK_BYTES // per_pair, 1 << 16))
    check_allocation(block * per_pair, where, f"the pixel-pair covariances of {block} image pair(s)",
                     "use smaller images")
    return block


def evaluate(ops, x1: np.ndarray, x2: Optional[np.ndarray], *, diag: bool, want_nngp: bool, want_ntk: bool,
             where: str = "arcflow.reference_conv.evaluate") -> Kernels:
    """NNGP / NTK of the compiled network ``ops`` (float64), inputs already validated: (n, H, W, C) images
    or (n, d) rows, float64. Returns (n1, n2) arrays, or (n1,) for ``diag=True``; None for a kernel not asked."""
    image = x1.ndim == 4
    hw = x1.shape[1:3] if image else None
    block = _block_size(ops, hw, where)
    n1 = x1.shape[0]

    # Each image's own recursion: its per-activation variance tables and its k(x, x).
    def self_run(x):
        n = x.shape[0]
        nngp_d = np.empty(n)
        ntk_d = np.empty(n) if want_ntk else None
        tabs: Optional[list] = None
        for lo in range(0, n, block):
            xs = x[lo:lo + block]
            s, th, t = _run_pairs(ops, xs, xs, None, None, want_ntk)
            nngp_d[lo:lo + block] = s
            if want_ntk:
                ntk_d[lo:lo + block] = th
            if tabs is None:
                tabs = [np.empty((n,) + v.shape[1:]) for v in t]
            for dst, v in zip(tabs, t):
                dst[lo:lo + block] = v
        if tabs is None:  # n = 0
            tabs = [np.empty((0,)) for op in ops if op[0] == "act"]
        return nngp_d, ntk_d, tabs

    d1_nngp, d1_ntk, tab1 = self_run(x1)
    if diag:
        return Kernels(d1_nngp if want_nngp else None, d1_ntk)

    sym = x2 is None
    if sym:
        x2_, tab2, n2 = x1, tab1, n1
    else:
        _, _, tab2 = self_run(x2)
        x2_, n2 = x2, x2.shape[0]
    from ._dispatch import check_allocation
    check_allocation(8 * n1 * n2 * (int(want_nngp) + int(want_ntk)), where, "the output")
    nngp = np.empty((n1, n2)) if want_nngp else None
    ntk = np.empty((n1, n2)) if want_ntk else None
    for ii, jj in _pair_chunks(n1, n2, sym, block):
        s, th, _ = _run_pairs(ops, x1[ii], x2_[jj], [t[ii] for t in tab1], [t[jj] for t in tab2], want_ntk)
        for out, v in ((nngp, s), (ntk, th)):
            if out is not None:
                out[ii, jj] = v
                if sym:
                    out[jj, ii] = v
    if sym:
        idx = np.arange(n1)
        if want_nngp:
            nngp[idx, idx] = d1_nngp
        if want_ntk:
            ntk[idx, idx] = d1_ntk
    return Kernels(nngp, ntk)
