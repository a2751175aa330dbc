"""NNGP and NTK of deep fully-connected networks: the public functions over the fused C++ recursion."""
from __future__ import annotations

import sys
import time
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

from . import _core
from . import _cuda
from . import _dispatch as dp
from .activations import Activation, ActivationLike, resolve

_VALID_GET = ("nngp", "ntk")
_VALID_DEVICES = ("auto", "cpu", "cuda")
# device="auto" moves a problem to the GPU from this many pair-layers on (below, transfers dominate).
_AUTO_CUDA_WORK = 50_000_000
# Work (pair-layers) per C++ call: small enough that Ctrl-C and the progress bar react within a second.
_WORK_PER_CALL = 4_000_000 * 8


class Kernels(NamedTuple):
    """The kernels of one pass; a field is None when it was not requested with ``get``."""

    nngp: Optional[np.ndarray]
    ntk: Optional[np.ndarray]


def _engine_class(dtype):
    return _core.FcEngineF32 if dtype == np.float32 else _core.FcEngineF64


class _Progress:
    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        self.enabled = enabled
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="row", file=sys.stderr)
        except ImportError:  # tqdm is optional: a plain line on stderr instead
            self.total, self.done, self.t0, self.desc = total, 0, time.perf_counter(), desc

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
        else:
            self.done += n
            el = time.perf_counter() - self.t0
            sys.stderr.write(f"\r{self.desc}: {self.done}/{self.total} rows, {el:.1f} s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


def _run_rows(engine, n1: int, n2: int, depth: int, symmetric: bool, outs, threads: int, progress: bool,
              desc: str, d: int = 0) -> None:
    """Drive the engine over blocks of rows; between blocks Python handles signals (Ctrl-C) and progress.

    A block's work is counted in pair-layers; the Gram product costs about one pair-layer per 32 features.
    """
    tile = int(_core.fc_tile)
    per_row = max(1, n2 * (depth + 1 + d // 32))
    block = max(tile, (_WORK_PER_CALL // per_row) // tile * tile)
    bar = _Progress(n1, progress, desc)
    try:
        for r0 in range(0, n1, block):
            r1 = min(n1, r0 + block)
            _engine_call(desc, engine.rows, r0, r1, *outs, threads)
            bar.update(r1 - r0)
    finally:
        bar.close()


def _prepare(x1, x2, where):
    """The inputs as the engine reads them: C-contiguous, native byte order, aligned (copied when not)."""
    a1 = dp.as_matrix(x1, "x1", where)
    a2 = None if x2 is None else dp.as_matrix(x2, "x2", where)
    if a2 is not None and a2.shape[1] != a1.shape[1]:
        raise ValueError(f"{where}: x1 and x2 must have the same number of features (columns), "
                         f"got x1 {a1.shape} and x2 {a2.shape}")
    dtype = dp.result_dtype(a1, a2)
    dp.check_finite(a1, "x1", where)
    if a2 is not None:
        dp.check_finite(a2, "x2", where)
    a1 = dp.as_engine_input(a1, dtype)
    if a2 is not None:
        a2 = dp.as_engine_input(a2, dtype)
    return a1, a2, dtype


def _check_get(get, where):
    if isinstance(get, str):
        get = (get,)
    try:
        get = tuple(get)
    except TypeError:
        raise ValueError(f"{where}: get must be 'nngp', 'ntk' or a sequence of them, got {get!r}") from None
    bad = [g for g in get if g not in _VALID_GET]
    if bad or not get:
        raise ValueError(f"{where}: get must name 'nngp' and/or 'ntk', got {get!r}")
    return get


def _engine_call(where, fn, *args):
    """An engine step; a C++ allocation failure (MemoryError naming what) or an overflow of the exact kernel
    (FloatingPointError naming the layer) gets the public function's name."""
    try:
        return fn(*args)
    except MemoryError as e:
        raise MemoryError(f"{where}: {e}") from None
    except FloatingPointError as e:
        raise FloatingPointError(f"{where}: {e}") from None


def kernels(x1, x2=None, *, depth: int = 1, activation: ActivationLike = "relu", w_std: float = 1.0,
            b_std: float = 0.0, fix_dep: int = 0, diag: bool = False, get: Union[str, Sequence[str]] = ("nngp", "ntk"),
            threads: Optional[int] = None, out=None, progress: bool = False, device: str = "auto") -> Kernels:
    """NNGP and NTK of ``Dense(w_std, b_std) -> [activation -> Dense(w_std, b_std)] * depth`` in one pass.

    The recursion (ntk parameterization, as neural-tangents' ``stax.serial``; docs/mathematics.md §1)::

        Sigma^1 = w_std^2 <x, y> / d + b_std^2,          Theta^1 = Sigma^1
        Sigma^(l+1) = w_std^2 E[phi(u) phi(v)] + b_std^2
        Theta^(l+1) = Sigma^(l+1) + w_std^2 E[phi'(u) phi'(v)] Theta^l

    Parameters
    ----------
    x1, x2 : (n1, d) and (n2, d) arrays. ``x2=None`` computes the symmetric matrix of x1 (one triangle,
        mirrored), and so does passing the same array object twice (``kernels(x, x)``): the entries (i, j) and
        (j, i) of the full computation hold the same bits (the Gram products are summed in the same order),
        so the mirror changes nothing but the time. A copy of x1 as x2 is computed in full. float32 in gives float32
        out; float64, integer, bool and lists give float64.
    depth : number of hidden activations (0 gives the linear kernel).
    fix_dep : the first ``fix_dep`` layers are frozen and add nothing to Theta (0 <= fix_dep <= depth).
    diag : True or False. True gives only k(x, x) for the rows of x1, shape (n1,), in O(n1 (d + depth)); it
        takes no x2 (a ValueError: for k(x1[i], x2[i]) compute the full matrix of the pairs you need).
    get : "nngp", "ntk" or both; the other field of the result is None.
    threads : OpenMP threads, 1 to ``arcflow._dispatch.MAX_THREADS`` (4 per core, at least 256); default
        ``arcflow.get_num_threads()``. A call never runs more threads than it has 64 x 64 tiles.
    out : preallocated outputs (for example ``np.memmap``), written tile by tile: a dict
        {"nngp": array, "ntk": array}, or a sequence in the order of ``get``. Each must be C-contiguous,
        aligned, of the result's dtype and must not share memory with x1, x2 or the other output
        (ValueError). If the call is interrupted (Ctrl-C: KeyboardInterrupt, raised within about a second)
        or fails while computing, the out= arrays are left partly written.
    progress : True or False: show a progress bar (tqdm when installed) on stderr.
    device : "cpu", "cuda" or "auto" (the GPU for large problems and for GPU arrays, when arcflow was built
        with CUDA and a device is present). GPU arrays (CuPy, anything with ``__cuda_array_interface__``)
        go in and come out without host copies; NumPy arrays with device="cuda" are copied in and the result
        comes back as NumPy. "cuda" without a usable GPU is a RuntimeError.

    Example
    -------
    >>> import numpy as np, arcflow
    >>> x = np.random.default_rng(0).normal(size=(100, 10))
    >>> k = arcflow.kernels(x, depth=3, activation="relu", w_std=1.4, b_std=0.1)
    >>> k.ntk.shape
    (100, 100)
    """
    return _kernels(x1, x2, depth, activation, w_std, b_std, fix_dep, diag, get, threads, out, progress, device,
                    "arcflow.kernels")


def _kernels(x1, x2, depth, activation, w_std, b_std, fix_dep, diag, get, threads, out, progress, device,
             where: str) -> Kernels:
    """kernels() under the public name ``where`` that the user called (in messages and the progress bar)."""
    get = _check_get(get, where)
    diag = dp.check_bool(diag, "diag", where)
    progress = dp.check_bool(progress, "progress", where)
    act, depth, w, b, fix_dep = network_params(depth, activation, w_std, b_std, fix_dep, where)
    want_ntk = "ntk" in get
    if want_ntk and not act.has_ntk:
        raise ValueError(f"{where}: {act!r} has no NTK: its derivative is a Dirac delta, so E[phi'(u) phi'(v)] "
                         f"is infinite; ask for the NNGP only (arcflow.nngp, or get=('nngp',))")
    threads = dp.check_threads(threads, where)
    if x2 is x1:  # kernels(x, x): the symmetric path, half the work and the same bits (see the docstring)
        x2 = None
    if diag and x2 is not None:
        raise ValueError(f"{where}: diag=True computes k(x1[i], x1[i]) and takes no x2; for the kernel between "
                         f"x1 and x2 leave diag=False")
    use_cuda = _choose_device(device, x1, x2, where)
    if use_cuda is None:  # GPU arrays in: the CUDA path, no host copy
        return _kernels_on_gpu_arrays(x1, x2, act, depth, w, b, fix_dep, diag, want_ntk, "nngp" in get, out, where)
    a1, a2, dtype = _prepare(x1, x2, where)
    n1, d = a1.shape
    n2 = n1 if a2 is None else a2.shape[0]
    if d == 0 and n1 > 0 and n2 > 0:
        raise ValueError(f"{where}: x1 has no features (shape {a1.shape}); the kernel needs d >= 1")

    shape = (n1,) if diag else (n1, n2)
    wanted = [g for g in _VALID_GET if g in get]
    outs = _collect_out(out, get, wanted, shape, dtype, where)
    dp.check_no_overlap([(f"out[{k!r}]", v) for k, v in outs.items()], [("x1", a1), ("x2", a2)], where)
    missing = [g for g in wanted if outs.get(g) is None]
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize * len(missing)
    dp.check_allocation(nbytes, where, f"the output ({' and '.join(missing)}, shape {shape}, {dtype})")
    if use_cuda == "auto":
        use_cuda = not diag and n1 * n2 * (depth + 1) >= _AUTO_CUDA_WORK
    if use_cuda and not diag and n1 > 0 and n2 > 0:
        res = _cuda.kernels_cuda(a1, a2, fc_params(act, depth, w * w, b * b, (w * w) / max(d, 1), fix_dep),
                                 "nngp" in get, want_ntk)
        for g, r in zip(("nngp", "ntk"), res):
            if g in outs:
                outs[g][...] = r
            elif g in wanted:
                outs[g] = r
        return Kernels(outs.get("nngp"), outs.get("ntk"))
    # The CPU engine's own memory: per-row tables that grow as rows x depth, whatever the output's size.
    ebytes = dp.engine_bytes(n1, None if a2 is None else n2, d, depth, dtype.itemsize, threads, diag)
    dp.check_allocation(nbytes + ebytes, where,
                        f"the output ({nbytes} bytes) with the per-row tables and tile buffers of the kernel "
                        f"engine ({ebytes} bytes, growing as rows x depth)",
                        hint="compute it in blocks of rows of x1 (and x2)")
    for g in missing:
        outs[g] = dp.allocate(shape, dtype, where)

    if n1 > 0 and (diag or n2 > 0):
        engine = _engine_call(where, _engine_class(dtype), a1, a2,
                              fc_params(act, depth, w * w, b * b, (w * w) / max(d, 1), fix_dep))
        res = (outs.get("nngp"), outs.get("ntk"))
        if diag:
            _engine_call(where, engine.diag, *res, threads)
        else:
            _run_rows(engine, n1, n2, depth, a2 is None, (res[0], res[1], None), threads, progress, where, d)
    return Kernels(outs.get("nngp"), outs.get("ntk"))


def network_params(depth, activation, w_std, b_std, fix_dep, where: str):
    """The fully-connected network's parameters, checked (one place for kernels, kernel_fn and kernel_grads):
    (activation object, depth, w_std, b_std, fix_dep) or a ValueError/TypeError naming ``where``."""
    try:
        act = resolve(activation)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    depth = dp.check_depth(depth, where)
    w = dp.check_std(w_std, "w_std", where)
    b = dp.check_std(b_std, "b_std", where)
    fix_dep = dp.check_depth(fix_dep, where, "fix_dep")
    if fix_dep > depth:
        raise ValueError(f"{where}: fix_dep = {fix_dep} is larger than depth = {depth}; "
                         f"at most depth layers can be frozen")
    return act, depth, w, b, fix_dep


def fc_params(act: Activation, depth: int, w_var: float, b_var: float, gram_scale: float,
              fix_dep: int) -> _core.FcParams:
    """The recursion's parameters as the C++ engines take them (the caller has validated the values).

    ``act.kind`` names a member of ``_core.ActKind``, the one place the activation codes are defined.
    """
    return _core.FcParams(act=act_params(act), depth=int(depth), w_var=float(w_var), b_var=float(b_var),
                          gram_scale=float(gram_scale), fix_dep=int(fix_dep))


def act_params(act: Activation) -> _core.ActParams:
    """The activation as the C++ engines take it (``act.kind`` names a member of ``_core.ActKind``)."""
    kind = _core.ActKind.__members__[act.kind]
    if act.kind == "abrelu":
        a, b = act.params()
        return _core.ActParams(kind=kind, a=float(a), b=float(b))
    if act.kind == "monomial":
        return _core.ActParams(kind=kind, n=int(act.params()[0]))
    return _core.ActParams(kind=kind)


def _collect_out(out, get, wanted, shape, dtype, where):
    if out is None:
        return {}
    if isinstance(out, np.ndarray):
        if len(wanted) != 1:
            raise ValueError(f"{where}: out= is a single array but two kernels were requested; "
                             f"pass a dict {{'nngp': ..., 'ntk': ...}}")
        out = {wanted[0]: out}
    elif isinstance(out, dict):
        extra = [k for k in out if k not in wanted]
        if extra:
            raise ValueError(f"{where}: out= has entries {extra} that were not requested (get={get!r})")
    elif isinstance(out, (tuple, list)):
        if len(out) != len(get):
            raise ValueError(f"{where}: out= has {len(out)} arrays for get={get!r}")
        out = dict(zip(get, out))
    else:
        raise ValueError(f"{where}: out= must be an array, a dict or a sequence of arrays, got {type(out).__name__}")
    res = {}
    for k, v in out.items():
        if v is not None:
            res[k] = dp.check_out(v, shape, dtype, where, f"out[{k!r}]")
    return res


def nngp(x1, x2=None, *, depth: int = 1, activation: ActivationLike = "relu", w_std: float = 1.0,
         b_std: float = 0.0, diag: bool = False, threads: Optional[int] = None, out=None,
         progress: bool = False, device: str = "auto") -> np.ndarray:
    """The NNGP kernel Sigma^(depth+1) (see :func:`kernels` for the recursion and the arguments).

    An out= array is left partly written when the call is interrupted (Ctrl-C) or fails while computing.

    >>> import numpy as np, arcflow
    >>> k = arcflow.nngp(np.eye(3), depth=2, activation="erf")
    """
    return _kernels(x1, x2, depth, activation, w_std, b_std, 0, diag, ("nngp",), threads, out, progress, device,
                    "arcflow.nngp").nngp


def ntk(x1, x2=None, *, depth: int = 1, activation: ActivationLike = "relu", w_std: float = 1.0,
        b_std: float = 0.0, fix_dep: int = 0, diag: bool = False, threads: Optional[int] = None, out=None,
        progress: bool = False, device: str = "auto") -> np.ndarray:
    """The Neural Tangent Kernel Theta^(depth+1) (see :func:`kernels` for the recursion and the arguments).

    An out= array is left partly written when the call is interrupted (Ctrl-C) or fails while computing.

    >>> import numpy as np, arcflow
    >>> k = arcflow.ntk(np.eye(3), depth=2, activation="relu", fix_dep=1)
    """
    return _kernels(x1, x2, depth, activation, w_std, b_std, fix_dep, diag, ("ntk",), threads, out, progress,
                    device, "arcflow.ntk").ntk


def _choose_device(device, x1, x2, where):
    """True / False / "auto" (decide on size), or None for GPU arrays (which take the CUDA path whole)."""
    if device not in _VALID_DEVICES:
        raise ValueError(f"{where}: device must be one of {_VALID_DEVICES}, got {device!r}")
    on_gpu = _cuda.is_device_array(x1) or (x2 is not None and _cuda.is_device_array(x2))
    if on_gpu:
        if device == "cpu":
            raise TypeError(f"{where}: x1/x2 are GPU arrays but device='cpu'; copy them to the host "
                            f"(for CuPy: .get()) or use device='cuda'")
        return None
    if device == "cpu":
        return False
    if device == "cuda":
        if not _cuda.built():
            raise RuntimeError(f"{where}: device='cuda' but this arcflow was built without CUDA "
                               f"(rebuild with nvcc present, or ARCFLOW_CUDA=ON)")
        if not _cuda.available():
            raise RuntimeError(f"{where}: device='cuda' but no CUDA device is visible")
        return True
    return "auto" if _cuda.available() else False


def _kernels_on_gpu_arrays(x1, x2, act, depth, w, b, fix_dep, diag, want_ntk, want_nngp, out, where):
    if diag or out is not None:
        raise ValueError(f"{where}: diag= and out= are not supported for GPU arrays; pass NumPy arrays")
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        if len(x.shape) != 2:
            raise ValueError(f"{where}: {name} must be a 2-D array of shape (n, d), got shape {tuple(x.shape)}")
    d = x1.shape[1]
    if x2 is not None and x2.shape[1] != d:
        raise ValueError(f"{where}: x1 and x2 must have the same number of features (columns), "
                         f"got x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)}")
    import cupy as cp  # a GPU array implies CuPy (or a CUDA array library that CuPy can wrap)
    for name, x in (("x1", x1), ("x2", x2)):
        if x is not None and not bool(cp.isfinite(cp.asarray(x)).all()):
            raise ValueError(f"{where}: {name} contains NaN or Inf")
    res = _cuda.kernels_cuda(x1, x2, fc_params(act, depth, w * w, b * b, (w * w) / max(d, 1), fix_dep),
                             want_nngp, want_ntk)
    return Kernels(*res)
