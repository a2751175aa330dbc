"""Checks shared by the invertible blocks (irevnet.py, flows.py): integer arguments, NCHW inputs, seeds,
tensors from PyTorch, state dicts. Every failure is a TypeError / ValueError whose message starts with the
public name of the block or function (``where``)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Mapping, Optional, Tuple

import numpy as np

from . import _ops
from ._ops import as_int  # noqa: F401  (re-exported: the blocks take it from here)

__all__ = ["as_int", "rng", "to_numpy", "check_nchw", "load_checked"]


def rng(seed) -> np.random.Generator:
    """A Generator as it is, anything else seeds a new one."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def to_numpy(v, where: str, key: Optional[str] = None) -> np.ndarray:
    """A NumPy array from an array, a torch tensor (detached, on the CPU) or anything np.asarray takes.
    bfloat16 tensors become float32 (exact: bfloat16 is float32 with a shorter mantissa; NumPy has no
    bfloat16); a tensor NumPy cannot hold otherwise is a TypeError naming ``key``."""
    if isinstance(v, np.ndarray):
        return v
    what = f"key {key!r}" if key is not None else "value"
    if hasattr(v, "detach") and hasattr(v, "cpu") and hasattr(v, "numpy"):  # a torch tensor
        t = v.detach().cpu()
        if str(getattr(t, "dtype", "")) == "torch.bfloat16":
            t = t.float()
        try:
            return t.numpy()
        except (TypeError, RuntimeError, ValueError) as err:
            raise TypeError(f"{where}: {what}: cannot convert a tensor of dtype {getattr(t, 'dtype', '?')} to a "
                            f"NumPy array ({err}); convert it to float32 or float64 first") from None
    try:
        return np.asarray(v)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{where}: {what}: cannot convert {type(v).__name__} to an array ({err})") from None


def check_nchw(x, where: str, expected: str, channels: Optional[int] = None, block: Optional[int] = None,
               block_why: str = "", hw: Optional[Tuple[int, int]] = None, kinds: str = "fiub",
               finite: bool = True, what: str = "input") -> np.ndarray:
    """x as an aligned C-contiguous (N, C, H, W) array in its compute dtype (``_ops.result_dtype``: float32 for
    float16/float32 input, float64 for anything else real): TypeError for a non-real dtype, ValueError for a wrong
    shape (naming ``expected``) and, with
    ``finite``, for NaN/Inf (``f"{where}: {what} contains NaN or Inf"``)."""
    xa = np.asarray(x)
    _ops.check_nchw_shape(xa, where, expected, channels, block, block_why, hw, kinds)
    xa = _ops.aligned(xa, _ops.result_dtype(xa))
    if finite and not _ops.all_finite(xa):
        raise ValueError(f"{where}: {what} contains NaN or Inf")
    return xa


def _cast(v: np.ndarray, ref: np.ndarray, k: str) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """(v cast to ref's dtype, None) or (None, the problem). The finiteness test is made AFTER the cast:
    1e39 is finite in float64 but Inf in float32."""
    if ref.dtype.kind in "iu":
        vf = v.astype(np.float64)
        if not np.isfinite(vf).all() or np.any(vf != np.round(vf)):
            return None, f"{k} (not an integer: {v.reshape(-1)[:3].tolist()})"
        if np.any(vf < 0) or np.any(vf > np.iinfo(ref.dtype).max):
            return None, f"{k} (must be a non-negative integer, got {v.reshape(-1)[:3].tolist()})"
        return np.array(v, dtype=ref.dtype, copy=True), None
    with np.errstate(over="ignore", invalid="ignore"):
        new = np.array(v, dtype=ref.dtype, copy=True)
    if not np.isfinite(new).all():
        if v.dtype.kind in "iub" or np.isfinite(v).all():
            return None, (f"{k} (max |value| {float(np.max(np.abs(v.astype(np.float64)))):.3g} overflows "
                          f"{ref.dtype}, whose largest value is {float(np.finfo(ref.dtype).max):.3g})")
        return None, f"{k} (NaN or Inf)"
    return new, None


def load_checked(where: str, expected: Mapping[str, np.ndarray], mapping: Mapping, strict: bool,
                 value_check: Optional[Callable[[str, np.ndarray], Optional[str]]] = None
                 ) -> "OrderedDict[str, np.ndarray]":
    """Validate a state dict against ``expected`` (key -> current array: its shape and dtype) and return
    the new arrays, cast to the expected dtypes; nothing is modified here. Values must be finite in the
    expected dtype; ``*.running_var`` non-negative; integer buffers (``num_batches_tracked``) whole
    numbers; ``value_check(key, array)`` returns a problem string or None for block-specific rules.
    ValueError listing every problem (``f"{where}.load_state_dict: ... (weights left unchanged)"``)."""
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{where}.load_state_dict: expected a mapping of name -> array, got {type(mapping).__name__}")
    missing = [k for k in expected if k not in mapping]
    unexpected = [str(k) for k in mapping if k not in expected]
    wrong, bad = [], []
    new = OrderedDict()
    for k, ref in expected.items():
        if k not in mapping:
            continue
        try:
            v = to_numpy(mapping[k], f"{where}.load_state_dict", k)
        except TypeError as err:
            bad.append(f"{k} ({err})")
            continue
        if v.dtype.kind not in "fiub":
            bad.append(f"{k} (dtype {v.dtype}, expected a real array)")
            continue
        if v.shape != ref.shape:
            wrong.append(f"{k} (expected {tuple(ref.shape)}, got {tuple(v.shape)})")
            continue
        arr, problem = _cast(v, ref, k)
        if problem is None and k.endswith("running_var") and np.any(arr < 0):
            problem = f"{k} (negative variance {float(arr.min()):.3g})"
        if problem is None and value_check is not None:
            problem = value_check(k, arr)
        if problem is not None:
            bad.append(problem)
            continue
        new[k] = arr
    problems = []
    if strict and missing:
        problems.append("missing keys: " + ", ".join(missing))
    if strict and unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if wrong:
        problems.append("wrongly shaped keys: " + "; ".join(wrong))
    if bad:
        problems.append("invalid values: " + "; ".join(bad))
    if problems:
        raise ValueError(f"{where}.load_state_dict: " + " | ".join(problems) + " (weights left unchanged)")
    return new
