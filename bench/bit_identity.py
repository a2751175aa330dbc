"""Bit-identity check for changes to the fused kernel engine (a refactor must not move a single output bit).

    python bench/bit_identity.py save before.pkl     # with the build before the change
    python bench/bit_identity.py check before.pkl    # with the build after it: exit status 1 if any case differs

The sweep: every activation family (general ABReLU, ReLU, LeakyReLU, Abs, Identity, Sign, Erf, RectifiedMonomial
of orders 0..6), depth 0..5, fix_dep, b_std 0 and > 0, float32 and float64, symmetric and not, sizes 1, 63, 65 and
130, duplicate / negated / scaled rows (the refined first-layer gaps), zero rows and rows out of the tile kernel's
range (the long double path), diag=True, compat.kernel_value(_batch) (ntk_all), both layer layouts and every
instruction-set level this CPU runs. Stores a SHA-256 per output (an exception's type and text count as an output).
"""
import hashlib
import itertools
import pickle
import sys

import numpy as np

import arcflow
from arcflow import _core, compat
from arcflow.activations import ABReLU, Erf, RectifiedMonomial, Sign

ACTS = [ABReLU(0.0, 1.0), ABReLU(0.1, 1.0), ABReLU(-1.0, 1.0), ABReLU(1.0, 1.0), ABReLU(-0.3, 0.7), Sign(),
        Erf()] + [RectifiedMonomial(n) for n in range(7)]
SIZES = [1, 63, 65, 130]


def data(n, d, dtype, special, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    if n > 8:
        x[3] = x[2]            # duplicate: near_m
        x[5] = -x[4]           # negated: near_p
        x[7] = 3.0 * x[6]      # scaled copy
        if special:
            x[1] = 0.0         # zero row (pi/2 convention, general path)
            x[n - 2] *= 1e17 if dtype == np.float32 else 1e150  # out of the tile kernel's range: slow path
            x[n - 3] *= 1e-18 if dtype == np.float32 else 1e-150
    return x.astype(dtype)


def call(f):
    try:
        r = f()
    except Exception as e:  # noqa: BLE001 - the same error before and after counts as the same output
        return ("err", type(e).__name__, str(e))
    return tuple(r) if isinstance(r, tuple) else r


def run():
    out = {}
    isas = _core._isa_levels()
    k = 0
    for isa, layout in itertools.product(isas, (0, 1)):
        _core._set_fc_isa(isa)
        _core._set_fc_layout(layout)
        for ai, act in enumerate(ACTS):
            for depth, bstd, dt, sym, special in itertools.product(range(6), (0.0, 0.35), (np.float32, np.float64),
                                                                   (True, False), (False, True)):
                k += 1
                n = SIZES[k % 4]
                n2 = SIZES[(k + 1) % 4]
                d = (5, 17, 64, 3)[k % 4]
                fix = k % (depth + 1)
                x = data(n, d, dt, special, k)
                y = None if sym else data(n2, d, dt, special, k + 1000)
                get = ("nngp", "ntk") if act.has_ntk else ("nngp",)
                key = (isa, layout, ai, depth, bstd, dt.__name__, sym, special)
                r = call(lambda: arcflow.kernels(x, y, depth=depth, activation=act, w_std=1.3, b_std=bstd,
                                                 fix_dep=fix, threads=1, device="cpu", get=get))
                rd = call(lambda: arcflow.kernels(x, depth=depth, activation=act, w_std=1.3, b_std=bstd,
                                                  fix_dep=fix, diag=True, threads=1, device="cpu", get=get))
                out[key] = (r, rd)
        for dm in (1, 3, 6):
            x = data(70, 9, np.float64, False, dm)
            out[(isa, layout, "kvb", dm)] = call(lambda: compat.kernel_value_batch(x, dm, threads=1))
            out[(isa, layout, "kv", dm)] = call(lambda: compat.kernel_value(x, dm, dm // 2, threads=1))
    _core._set_fc_isa("auto")
    _core._set_fc_layout(-1)
    return out


def digest(v):
    if isinstance(v, np.ndarray):
        return (v.dtype.str, v.shape, hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest())
    if isinstance(v, tuple):
        return tuple(digest(u) for u in v)
    return v


if __name__ == "__main__":
    res = {k: digest(v) for k, v in run().items()}
    if len(sys.argv) != 3 or sys.argv[1] not in ("save", "check"):
        sys.exit(__doc__)
    if sys.argv[1] == "save":
        with open(sys.argv[2], "wb") as f:
            pickle.dump(res, f)
        print("saved", len(res), "cases")
    else:
        with open(sys.argv[2], "rb") as f:
            ref = pickle.load(f)
        assert ref.keys() == res.keys(), "case lists differ"
        bad = [k for k in ref if ref[k] != res[k]]
        errs = sum(1 for v in res.values() if "err" in repr(v))
        print(len(res), "cases,", len(bad), "differ;", errs, "with an error output")
        for k in bad[:20]:
            print("DIFF", k)
        sys.exit(1 if bad else 0)
