"""Validation, dtype promotion, thread and output handling for the public API (the numerics live in C++)."""
from __future__ import annotations

import numbers
import os
from typing import Optional

import numpy as np

from . import _core

_default_threads: Optional[int] = None

# The most threads a call may ask for: 4 per core, at least 256. OpenMP starts every thread it is asked for
# (each with a stack and tile buffers); a million of them crashed the process.
MAX_THREADS = max(256, 4 * (os.cpu_count() or 1))


def set_num_threads(n: Optional[int]) -> None:
    """Set the default number of threads of arcflow's kernels (None: OpenMP's default, OMP_NUM_THREADS)."""
    global _default_threads
    if n is None:
        _default_threads = None
        return
    _default_threads = check_threads(n, "set_num_threads")


def get_num_threads() -> int:
    """The number of threads arcflow's kernels use when no ``threads=`` is given."""
    if _default_threads is not None:
        return _default_threads
    return min(MAX_THREADS, max(1, int(_core.omp_max_threads())))  # OMP_NUM_THREADS may ask for any number


def check_threads(threads, where: str) -> int:
    if threads is None:
        return get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
        raise ValueError(f"{where}: threads must be an integer between 1 and {MAX_THREADS}, got {_short(threads)}")
    if not 1 <= int(threads) <= MAX_THREADS:
        raise ValueError(f"{where}: threads must be between 1 and {MAX_THREADS} (4 per core of this machine, "
                         f"at least 256), got {int(threads)}")
    return int(threads)


def check_bool(value, name: str, where: str) -> bool:
    """A real bool (np.bool_ included): a string such as "no" is truthy and would silently mean True."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{where}: {name} must be True or False, got {_short(value)}")


def _short(v) -> str:
    """repr(v) for a message, without printing a whole array."""
    if isinstance(v, np.ndarray) and v.size > 1:
        return f"an array of shape {v.shape} and dtype {v.dtype}"
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


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
    """float32 when every input is a float of at most 4 bytes (float16, float32, either byte order), else float64."""
    kinds = [a.dtype for a in arrays if a is not None]
    if kinds and all(k.kind == "f" and k.itemsize <= 4 for k in kinds):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def as_engine_input(arr: np.ndarray, dtype) -> np.ndarray:
    """C-contiguous, native byte order, aligned to its items: the only form the C++ engine reads (an array
    at an odd address, e.g. ``np.ndarray(..., buffer=buf, offset=1)``, is copied)."""
    return np.require(arr, dtype=np.dtype(dtype).newbyteorder("="), requirements=("C", "A"))


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
        raise ValueError(f"{where}: {name} must be an integer >= {minimum}, got {_short(depth)}")
    if int(depth) < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}, got {depth}")
    if int(depth) > 10_000:
        raise ValueError(f"{where}: {name} = {depth} is unreasonably large (at most 10000)")
    return int(depth)


def check_std(v, name: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{where}: {name} must be a real number >= 0, got {_short(v)}")
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


def check_allocation(nbytes: int, where: str, what: str, hint: Optional[str] = None) -> None:
    """MemoryError before any work when what is to be allocated cannot fit in memory."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        if hint is None:
            hint = "pass out= (for example an np.memmap) to write it to disk, or compute it in row blocks"
        raise MemoryError(
            f"{where}: {what} needs {nbytes} bytes ({_human(nbytes)}), more than the {avail} bytes "
            f"({_human(avail)}) of memory available; {hint}")


# Per row besides the tables: the range flag, two float64 diagonals and two int layer indices (row_table).
_ROW_SCAN_BYTES = 1 + 2 * 8 + 2 * 4


def engine_bytes(n1: int, n2: Optional[int], d: int, depth: int, itemsize: int, threads: int, diag: bool,
                 n_all: int = 0) -> int:
    """Bytes the C++ engine allocates besides the outputs: the per-row tables (5 values per row and layer, two
    per row, and the range scan's diagonals), the packed copy of x2 and each thread's tile buffers (fc_kernel.cpp)."""
    tile = int(_core.fc_tile)

    def rows(n):
        return -(-max(n, 1) // tile) * tile

    total = rows(n1) * (5 * (depth + 1) + 2)
    extra = rows(n1) * _ROW_SCAN_BYTES
    if n2 is not None:
        total += rows(n2) * (5 * (depth + 1) + 2)
        extra += rows(n2) * _ROW_SCAN_BYTES
    if not diag:
        n2_ = n1 if n2 is None else n2
        total += rows(n2_) * max(d, 1)
        tiles = -(-n1 // tile) * -(-n2_ // tile)
        total += min(threads, max(tiles, 1)) * (tile * tile * (6 + n_all) + 6 * tile)
    return total * itemsize + extra


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
    if not out.flags.aligned:
        # The kernels store whole values: an odd address is undefined behaviour in C++ (and copying the
        # result over afterwards would double the memory that out= exists to save).
        raise ValueError(f"{where}: {name} is not aligned: its data address is not a multiple of its "
                         f"{out.dtype.itemsize}-byte items; pass an aligned array (np.empty, np.memmap)")
    return out


def check_no_overlap(named_outs, named_inputs, where: str) -> None:
    """ValueError when an out= array shares memory with an input or with another out= array: the kernels
    read the inputs while they write the outputs, so an overlap gives wrong numbers without a word."""
    outs = [(k, v) for k, v in named_outs if v is not None]
    for i, (k, o) in enumerate(outs):
        for name, x in named_inputs:
            if x is not None and np.may_share_memory(o, x):
                raise ValueError(f"{where}: {k} shares memory with the input {name}; pass a separate array "
                                 f"(the input is read while the output is written)")
        for k2, o2 in outs[i + 1:]:
            if np.may_share_memory(o, o2):
                raise ValueError(f"{where}: {k} and {k2} share memory; pass two separate arrays")


def env_threads_hint() -> Optional[str]:
    return os.environ.get("OMP_NUM_THREADS")
