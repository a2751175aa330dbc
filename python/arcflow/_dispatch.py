"""Validation, dtype promotion, thread and output handling for the public API (the numerics live in C++)."""
from __future__ import annotations

import numbers
import os
from typing import Optional

import numpy as np

from . import _core

_default_threads: Optional[int] = None


def set_num_threads(n: Optional[int]) -> None:
    """Set the default number of threads of arcflow's kernels (None: OpenMP's default, OMP_NUM_THREADS)."""
    global _default_threads
    if n is None:
        _default_threads = None
        return
    _default_threads = check_threads(n, "set_num_threads")


def get_num_threads() -> int:
    """The number of threads arcflow's kernels use when no ``threads=`` is given."""
    return _default_threads if _default_threads is not None else max(1, int(_core.omp_max_threads()))


def check_threads(threads, where: str) -> int:
    if threads is None:
        return get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or int(threads) < 1:
        raise ValueError(f"{where}: threads must be a positive integer, got {threads!r}")
    return int(threads)


def as_matrix(x, name: str, where: str) -> np.ndarray:
    """A 2-D real array: float32 stays float32, float64 stays float64, everything else real -> float64."""
    if isinstance(x, np.ndarray):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as e:
            raise TypeError(f"{where}: {name} could not be converted to a numeric array: {e}") from None
    if np.iscomplexobj(arr):
        raise TypeError(f"{where}: {name} has complex dtype {arr.dtype}; kernels are defined for real inputs only")
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{where}: {name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{where}: {name} must be a 2-D array of shape (n, d), got {arr.ndim}-D shape {arr.shape}")
    return arr


def result_dtype(*arrays) -> np.dtype:
    kinds = [a.dtype for a in arrays if a is not None]
    if kinds and all(k == np.float32 or k == np.float16 for k in kinds):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def check_finite(arr: np.ndarray, name: str, where: str) -> None:
    if arr.size == 0 or arr.dtype.kind in "biu":
        return
    ok = np.isfinite(arr)
    if not ok.all():
        bad_rows = np.flatnonzero(~ok.all(axis=1))
        r = int(bad_rows[0])
        col = int(np.flatnonzero(~ok[r])[0])
        raise ValueError(
            f"{where}: {name} contains NaN or Inf ({len(bad_rows)} bad row(s)); the first is row {r} "
            f"({name}[{r}, {col}] = {arr[r, col]})")


def check_depth(depth, where: str, name: str = "depth", minimum: int = 0) -> int:
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral):
        raise ValueError(f"{where}: {name} must be an integer >= {minimum}, got {depth!r}")
    if int(depth) < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}, got {depth}")
    if int(depth) > 10_000:
        raise ValueError(f"{where}: {name} = {depth} is unreasonably large (at most 10000)")
    return int(depth)


def check_std(v, name: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{where}: {name} must be a real number >= 0, got {v!r}")
    f = float(v)
    if not np.isfinite(f) or f < 0:
        raise ValueError(f"{where}: {name} must be a finite number >= 0, got {v!r}")
    return f


def available_memory() -> Optional[int]:
    """Bytes of memory the process can still get (MemAvailable + SwapFree), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if ":" in line}
        return info.get("MemAvailable", 0) + info.get("SwapFree", 0)
    except (OSError, ValueError, IndexError):
        return None


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n}"


def check_allocation(nbytes: int, where: str, what: str) -> None:
    """MemoryError before any work when the outputs cannot fit in memory."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise MemoryError(
            f"{where}: {what} needs {nbytes} bytes ({_human(nbytes)}), more than the {avail} bytes "
            f"({_human(avail)}) of memory available; pass out= (for example an np.memmap) to write it to disk, "
            f"or compute it in row blocks")


def allocate(shape, dtype, where: str, zero: bool = False) -> np.ndarray:
    """A result array whose data starts on a 64-byte (cache-line) boundary.

    np.empty puts large arrays 16 bytes past a page boundary, so every tile row the kernels write would
    begin and end mid-line: the kernels stream whole cache lines past the caches and give the partial ones
    plain stores, which cost about 17% (float32) and 9% (float64) of a depth-5 kernel at N = 4096 (1 thread,
    Intel Xeon VM). The array is a view of a slightly larger uint8 buffer (its ``base``); zero=True keeps
    np.zeros's lazily zeroed pages.
    """
    itemsize = np.dtype(dtype).itemsize
    nbytes = int(np.prod(shape, dtype=object)) * itemsize
    try:
        raw = (np.zeros if zero else np.empty)(nbytes + 64, np.uint8)
        off = (-raw.ctypes.data) % 64
        return raw[off:off + nbytes].view(dtype).reshape(shape)
    except MemoryError:
        raise MemoryError(f"{where}: could not allocate the output of {nbytes} bytes ({_human(nbytes)})") from None
    except ValueError as e:  # "array is too big"
        raise MemoryError(f"{where}: the output of {nbytes} bytes ({_human(nbytes)}) is too large: {e}") from None


def check_out(out, shape, dtype, where: str, name: str) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise ValueError(f"{where}: {name} must be a NumPy array (or np.memmap), got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"{where}: {name} has shape {out.shape}, expected {tuple(shape)}")
    if out.dtype != dtype:
        raise ValueError(f"{where}: {name} has dtype {out.dtype}, expected {np.dtype(dtype)} (the inputs' dtype)")
    if not out.flags.c_contiguous:
        raise ValueError(f"{where}: {name} must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError(f"{where}: {name} is read-only")
    return out


def env_threads_hint() -> Optional[str]:
    return os.environ.get("OMP_NUM_THREADS")
