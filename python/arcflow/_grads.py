"""Gradients of the NNGP and NTK with respect to w_std and b_std (forward mode, in the C++ core)."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

from . import _core
from . import _dispatch as dp
from . import _kernels as kn
from .activations import ActivationLike, resolve

_WHERE = "arcflow.kernel_grads"
# Pair-layers per C++ call (each carries two tangents, about four times the kernel's work): Ctrl-C between calls.
_WORK_PER_CALL = 4_000_000


class Grad(NamedTuple):
    """A kernel and its derivatives with respect to w_std and b_std (arrays of one shape and dtype)."""

    value: np.ndarray
    d_w_std: np.ndarray
    d_b_std: np.ndarray


class KernelGrads(NamedTuple):
    """The kernels with their gradients; a field is None when it was not requested with ``get``."""

    nngp: Optional[Grad]
    ntk: Optional[Grad]


def kernel_grads(x1, x2=None, *, depth: int = 1, activation: ActivationLike = "relu", w_std: float = 1.0,
                 b_std: float = 0.0, fix_dep: int = 0, get: Union[str, Sequence[str]] = ("nngp", "ntk"),
                 diag: bool = False, threads: Optional[int] = None) -> KernelGrads:
    """The NNGP and NTK of :func:`arcflow.kernels` with their derivatives with respect to w_std and b_std.

    The derivatives are exact (forward mode: the tangent of every layer of the recursion is carried next to
    its value), with respect to the standard deviations themselves (not the variances, not their
    logarithms: for scikit-learn's log-hyperparameters multiply by w_std and b_std)::

        d Sigma^1 / d w_std = 2 w_std <x, y> / d,     d Sigma^1 / d b_std = 2 b_std
        d Sigma^(l+1) = d(w_std^2) T + w_std^2 dT + d(b_std^2),  dT from Price's theorem and homogeneity

    Arguments, validation, dtypes (float32 in gives float32 out) and the symmetric case (``x2=None`` or
    ``x2 is x1``: exactly symmetric matrices) are those of :func:`arcflow.kernels` (CPU only). ``value`` is
    what :func:`arcflow.kernels` returns for the same call. The derivatives are carried in float64 and
    rounded to the output dtype at the end. Where a derivative overflows the dtype, FloatingPointError.

    Example
    -------
    >>> import numpy as np, arcflow
    >>> x = np.random.default_rng(0).normal(size=(20, 5))
    >>> g = arcflow.kernel_grads(x, depth=2, w_std=1.4, b_std=0.1)
    >>> g.ntk.d_w_std.shape
    (20, 20)
    """
    k = kn._kernels(x1, x2, depth, activation, w_std, b_std, fix_dep, diag, get, threads, None, False, "cpu",
                    _WHERE)
    get = kn._check_get(get, _WHERE)
    threads = dp.check_threads(threads, _WHERE)
    act = resolve(activation)
    w, b = float(w_std), float(b_std)
    if x2 is x1:
        x2 = None
    a1, a2, dtype = kn._prepare(x1, x2, _WHERE)
    n1, d = a1.shape
    n2 = n1 if a2 is None else a2.shape[0]
    shape = (n1,) if diag else (n1, n2)
    wanted = [g for g in ("nngp", "ntk") if g in get]
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize * 2 * len(wanted)
    # The gradient engine's own memory: double tables of 15 values per row and layer, x2 transposed in double.
    ebytes = 8 * ((n1 + (0 if a2 is None else n2)) * (15 * (depth + 1) + 1) + n2 * d)
    dp.check_allocation(nbytes + ebytes, _WHERE, f"the gradients ({' and '.join(wanted)}, shape {shape}, {dtype}) "
                        f"with the tables of the gradient engine ({ebytes} bytes)",
                        hint="compute them in blocks of rows of x1 (and x2)")
    outs = {g: (dp.allocate(shape, dtype, _WHERE), dp.allocate(shape, dtype, _WHERE)) for g in wanted}
    if n1 > 0 and (diag or n2 > 0):
        cls = _core.FcGradF32 if dtype == np.float32 else _core.FcGradF64
        params = kn.fc_params(act, depth, w * w, b * b, (w * w) / max(d, 1), fix_dep)
        engine = kn._engine_call(_WHERE, cls, a1, a2, params)
        nn, nt = outs.get("nngp", (None, None)), outs.get("ntk", (None, None))
        if diag:
            kn._engine_call(_WHERE, engine.diag, nn[0], nn[1], nt[0], nt[1], threads)
        else:
            per_row = max(1, n2 * (depth + 1 + d // 8))  # the double Gram: about a pair-layer per 8 features
            block = max(1, _WORK_PER_CALL // per_row)
            for r0 in range(0, n1, block):  # between calls Python runs its signal handlers (Ctrl-C)
                kn._engine_call(_WHERE, engine.rows, r0, min(n1, r0 + block), nn[0], nn[1], nt[0], nt[1], threads)
        for g, (dw, db) in outs.items():
            if not (np.isfinite(dw).all() and np.isfinite(db).all()):
                raise FloatingPointError(f"{_WHERE}: a derivative of the {g.upper()} overflows {dtype} "
                                         f"(w_std={w_std!r}, b_std={b_std!r}, depth={depth})")
    res = {g: Grad(getattr(k, g), *outs[g]) for g in wanted}
    return KernelGrads(res.get("nngp"), res.get("ntk"))
