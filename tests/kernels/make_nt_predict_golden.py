"""Regenerate tests/data/nt_predict_golden.npz: neural-tangents 0.6.5 predictions that CI compares arcflow.predict with.

neural-tangents is not a test dependency (it needs jax 0.5.3); this script records its numbers once. Run it in
a separate environment (see tests/make_nt_golden.py)::

    /tmp/ntvenv/bin/python tests/kernels/make_nt_predict_golden.py      # writes tests/data/nt_predict_golden.npz

Three kinds of case, all in float64 (jax_enable_x64):

* ``ensemble``: ``nt.predict.gradient_descent_mse_ensemble(kernel_fn, x_train, y_train, learning_rate, diag_reg,
  diag_reg_absolute_scale)`` with ``kernel_fn`` of ``stax.serial(Dense(W_std, b_std), [phi, Dense] * depth)``
  (the network of tests/make_nt_golden.py), then several ``predict_fn(t, x_test, get, compute_cov)`` calls.
* ``gd``: ``nt.predict.gradient_descent_mse(k_train_train, y_train, ...)`` on the NTK, then
  ``predict_fn(t, fx_train_0, fx_test_0, k_test_train)`` calls.
* ``gp``: ``nt.predict.gp_inference(Kernel(nngp, ntk), y_train, ...)`` then ``predict_fn(get, k_test_train,
  k_test_test)`` calls.

Layout of the .npz: ``meta`` is a JSON string (versions, notes, the list of cases, each with its list of calls);
arrays are named ``{case}_{name}`` (inputs and nt's kernels) and ``{case}_c{j}_{field}`` (call j's results:
``{g}_mean`` and ``{g}_cov`` for each g of the call, ``fx_train``/``fx_test`` for ``gd``). A ``t`` of a call is
null (t=None), a number (``Infinity`` for t=inf) or a nested list. A case with ``y_1d`` has a 1-D y_train: nt
0.6.5 mishandles 1-D targets (it takes the sample axis for the output axis), so nt ran on ``y[:, None]`` and the
stored results have that axis dropped, which is what arcflow returns for a 1-D y_train.
Training kernels are kept well conditioned (below COND_MAX) where diag_reg is 0, so that the 1e-10 kernel
agreement between arcflow and nt carries over to 1e-8 in the predictions.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "data" / "nt_predict_golden.npz"
SEED = 20261207
COND_MAX = 1e4
ACTIVATIONS = [("ReLU", []), ("Erf", []), ("LeakyReLU", [0.2]), ("Abs", []), ("ABReLU", [-0.5, 1.2]),
               ("Identity", [])]


def nt_layer(stax, name, args):
    table = {
        "ReLU": lambda: stax.Relu(),
        "LeakyReLU": lambda alpha: stax.LeakyRelu(alpha),
        "ABReLU": lambda a, b: stax.ABRelu(a, b),
        "Abs": lambda: stax.Abs(),
        "Identity": lambda: stax.Identity(),
        "Erf": lambda: stax.Erf(),
    }
    return table[name](*args)


def nt_kernel_fn(name, args, depth, w_std, b_std, width=16):
    from neural_tangents import stax

    layers = [stax.Dense(width, W_std=w_std, b_std=b_std)]
    for _ in range(depth):
        layers += [nt_layer(stax, name, args), stax.Dense(width, W_std=w_std, b_std=b_std)]
    layers[-1] = stax.Dense(1, W_std=w_std, b_std=b_std)
    return stax.serial(*layers)[2]


def _np(a):
    return np.asarray(a, dtype=np.float64)


def _t_value(t):
    return None if t is None else (np.inf if t == "inf" else np.asarray(t, dtype=np.float64))


def main() -> int:
    import jax
    jax.config.update("jax_enable_x64", True)
    import neural_tangents
    from neural_tangents import predict

    rng = np.random.default_rng(SEED)
    arrays, cases = {}, []

    def store(prefix, name, value):
        arrays[f"{prefix}_{name}"] = _np(value)

    def conditioned(k, reg, absolute):
        a = np.array(k, dtype=np.float64)
        scale = 1.0 if absolute else np.trace(a) / a.shape[0]
        a += reg * scale * np.eye(a.shape[0])
        w = np.linalg.eigvalsh(a)
        return w[0] > 0 and w[-1] / w[0] < COND_MAX

    # ---------------------------------------------------------------------------------------- ensemble
    t_specs = [None, 0.7, "inf", [0.0, 0.3, 2.5], [[0.5], [4.0]], 15.0]
    gets = ["nngp", "ntk", ("nngp", "ntk"), ("ntk", "nngp"), None]
    n_ens = 0
    while n_ens < 36:
        name, args = ACTIVATIONS[n_ens % len(ACTIVATIONS)]
        depth = int(rng.integers(1, 5))
        w_std = float(np.round(rng.uniform(0.6, 2.0), 4))
        b_std = float(np.round(rng.choice([0.0, rng.uniform(0.05, 0.8)]), 4))
        reg_kind = n_ens % 3            # 0: none, 1: relative, 2: absolute
        diag_reg = 0.0 if reg_kind == 0 else float(np.round(10 ** rng.uniform(-4, -1), 6))
        absolute = reg_kind == 2
        if name == "Identity" and diag_reg == 0.0:
            diag_reg = 1e-3       # the linear kernel of n > d points is singular
        lr = float(rng.choice([1.0, 0.5, 3.0]))
        n, m, d = int(rng.integers(6, 11)), int(rng.integers(3, 6)), 3
        k_out = int(rng.choice([1, 2, 3]))
        y_1d = k_out == 1 and n_ens % 2 == 0
        x_train, x_test = rng.standard_normal((n, d)), rng.standard_normal((m, d))
        y = rng.standard_normal((n, k_out))
        kfn = nt_kernel_fn(name, args, depth, w_std, b_std)
        kdd = kfn(x_train, None, ("nngp", "ntk"))
        if not all(conditioned(_np(getattr(kdd, g)), diag_reg, absolute) for g in ("nngp", "ntk")):
            continue
        key = f"ens{n_ens:03d}"
        ktd = kfn(x_test, x_train, ("nngp", "ntk"))
        ktt = kfn(x_test, None, "nngp")
        for nm, v in (("x_train", x_train), ("x_test", x_test), ("y_train", y[:, 0] if y_1d else y),
                      ("nngp_dd", kdd.nngp), ("ntk_dd", kdd.ntk), ("nngp_td", ktd.nngp), ("ntk_td", ktd.ntk),
                      ("nngp_tt", ktt)):
            store(key, nm, v)
        pf = predict.gradient_descent_mse_ensemble(kfn, x_train, y, learning_rate=lr, diag_reg=diag_reg,
                                                   diag_reg_absolute_scale=absolute)
        calls = []
        picks = rng.choice(len(t_specs), size=4, replace=False)
        for j, ti in enumerate(picks):
            t = t_specs[int(ti)]
            get = gets[int(rng.integers(0, len(gets)))]
            compute_cov = bool(rng.integers(0, 2))
            with_test = bool(j % 3 != 2)
            out = pf(_t_value(t), x_test if with_test else None, get, compute_cov)
            names = ("nngp", "ntk") if get is None else ((get,) if isinstance(get, str) else get)
            for g in names:
                v = out if isinstance(get, str) else getattr(out, g)
                mean, cov = (v.mean, v.covariance) if compute_cov else (v, None)
                mean = _np(mean)
                if y_1d:
                    mean = mean[..., 0]
                if not np.all(np.isfinite(mean)) or (cov is not None and not np.all(np.isfinite(_np(cov)))):
                    raise RuntimeError(f"nt returned non-finite values in {key} call {j}")
                store(f"{key}_c{j}", f"{g}_mean", mean)
                if cov is not None:
                    store(f"{key}_c{j}", f"{g}_cov", cov)
            calls.append(dict(t=t, x_test=with_test, get=None if get is None else
                              (get if isinstance(get, str) else list(get)), compute_cov=compute_cov))
        cases.append(dict(key=key, kind="ensemble", activation=[name, args], depth=depth, w_std=w_std, b_std=b_std,
                          diag_reg=diag_reg, diag_reg_absolute_scale=absolute, learning_rate=lr, y_1d=y_1d,
                          calls=calls))
        n_ens += 1

    # ---------------------------------------------------------------------------------------- gradient_descent_mse
    n_gd = 0
    while n_gd < 12:
        name, args = ACTIVATIONS[n_gd % 4]
        depth = int(rng.integers(1, 5))
        w_std, b_std = float(np.round(rng.uniform(0.6, 2.0), 4)), float(np.round(rng.uniform(0.0, 0.5), 4))
        diag_reg = 0.0 if n_gd % 2 == 0 else float(np.round(10 ** rng.uniform(-4, -1), 6))
        absolute = n_gd % 4 == 3
        lr = float(rng.choice([1.0, 0.25, 2.0]))
        n, m, d, k_out = int(rng.integers(6, 11)), int(rng.integers(3, 6)), 3, int(rng.choice([1, 2]))
        y_1d = k_out == 1 and n_gd % 3 == 0
        x_train, x_test = rng.standard_normal((n, d)), rng.standard_normal((m, d))
        y = rng.standard_normal((n, k_out))
        kfn = nt_kernel_fn(name, args, depth, w_std, b_std)
        kdd, ktd = _np(kfn(x_train, None, "ntk")), _np(kfn(x_test, x_train, "ntk"))
        if not conditioned(kdd, diag_reg, absolute):
            continue
        key = f"gd{n_gd:03d}"
        fx_train_0, fx_test_0 = 0.3 * rng.standard_normal((n, k_out)), 0.3 * rng.standard_normal((m, k_out))
        for nm, v in (("k_dd", kdd), ("k_td", ktd), ("y_train", y[:, 0] if y_1d else y),
                      ("fx_train_0", fx_train_0[:, 0] if y_1d else fx_train_0),
                      ("fx_test_0", fx_test_0[:, 0] if y_1d else fx_test_0)):
            store(key, nm, v)
        pf = predict.gradient_descent_mse(kdd, y, learning_rate=lr, diag_reg=diag_reg,
                                          diag_reg_absolute_scale=absolute)
        calls = []
        variants = [("zero", None), ("array", "array"), ("array", None), (None, "array"), ("zero", "array")]
        for j, t in enumerate([None, 0.8, [0.0, 1.0, 6.0], "inf", None]):
            f0, ft0 = variants[(j + n_gd) % len(variants)]
            a_f0 = 0.0 if f0 == "zero" else (fx_train_0 if f0 == "array" else None)
            a_ft0 = fx_test_0 if ft0 == "array" else None
            res = pf(_t_value(t), a_f0, a_ft0, ktd if a_ft0 is not None else None)
            if a_f0 is not None and a_ft0 is not None:
                fields = dict(fx_train=res[0], fx_test=res[1])
            elif a_ft0 is not None:
                fields = dict(fx_test=res)
            else:
                fields = dict(fx_train=res)
            for nm, v in fields.items():
                v = _np(v)
                if not np.all(np.isfinite(v)):
                    raise RuntimeError(f"nt returned non-finite values in {key} call {j}")
                store(f"{key}_c{j}", nm, v[..., 0] if y_1d else v)
            calls.append(dict(t=t, fx_train_0=f0, fx_test_0=ft0))
        cases.append(dict(key=key, kind="gd", diag_reg=diag_reg, diag_reg_absolute_scale=absolute,
                          learning_rate=lr, y_1d=y_1d, calls=calls))
        n_gd += 1

    # ---------------------------------------------------------------------------------------- gp_inference
    n_gp = 0
    gp_gets = ["nngp", "ntk", "ntkgp", ("nngp", "ntk"), None, ("ntkgp", "nngp")]
    while n_gp < 12:
        name, args = ACTIVATIONS[(n_gp + 1) % 5]
        depth = int(rng.integers(1, 5))
        w_std, b_std = float(np.round(rng.uniform(0.6, 2.0), 4)), float(np.round(rng.uniform(0.0, 0.5), 4))
        diag_reg = 0.0 if n_gp % 2 == 0 else float(np.round(10 ** rng.uniform(-4, -1), 6))
        absolute = n_gp % 4 == 1
        n, m, d, k_out = int(rng.integers(6, 11)), int(rng.integers(3, 6)), 3, int(rng.choice([1, 2]))
        y_1d = k_out == 1 and n_gp % 2 == 1
        x_train, x_test = rng.standard_normal((n, d)), rng.standard_normal((m, d))
        y = rng.standard_normal((n, k_out))
        kfn = nt_kernel_fn(name, args, depth, w_std, b_std)
        kdd = kfn(x_train, None, ("nngp", "ntk"))
        if not all(conditioned(_np(getattr(kdd, g)), diag_reg, absolute) for g in ("nngp", "ntk")):
            continue
        ktd, ktt = kfn(x_test, x_train, ("nngp", "ntk")), kfn(x_test, None, ("nngp", "ntk"))
        key = f"gp{n_gp:03d}"
        for nm, v in (("nngp_dd", kdd.nngp), ("ntk_dd", kdd.ntk), ("nngp_td", ktd.nngp), ("ntk_td", ktd.ntk),
                      ("nngp_tt", ktt.nngp), ("ntk_tt", ktt.ntk), ("y_train", y[:, 0] if y_1d else y)):
            store(key, nm, v)
        pf = predict.gp_inference(kdd, y, diag_reg=diag_reg, diag_reg_absolute_scale=absolute)
        calls = []
        for j in range(4):
            get = gp_gets[(j + n_gp) % len(gp_gets)]
            with_test = j != 3
            with_cov = j in (1, 2, 3)
            out = pf(get, ktd if with_test else None, (ktt if with_test else True) if with_cov else None)
            names = ("nngp", "ntk") if get is None else ((get,) if isinstance(get, str) else get)
            for g in names:
                v = out if isinstance(get, str) else getattr(out, g)
                mean, cov = (v.mean, v.covariance) if with_cov else (v, None)
                mean = _np(mean)
                store(f"{key}_c{j}", f"{g}_mean", mean[..., 0] if y_1d else mean)
                if cov is not None:
                    store(f"{key}_c{j}", f"{g}_cov", cov)
            calls.append(dict(get=None if get is None else (get if isinstance(get, str) else list(get)),
                              test=with_test, cov=with_cov))
        cases.append(dict(key=key, kind="gp", diag_reg=diag_reg, diag_reg_absolute_scale=absolute, y_1d=y_1d,
                          calls=calls))
        n_gp += 1

    meta = dict(
        format=1,
        generator="tests/kernels/make_nt_predict_golden.py",
        seed=SEED,
        versions=dict(neural_tangents=neural_tangents.__version__, jax=jax.__version__, numpy=np.__version__),
        parameterization="ntk",
        notes=[
            "1-D y_train: nt 0.6.5 treats the only axis as the output axis (a (n,) target gives test means of "
            "shape (m, n)); the cases marked y_1d ran nt on y[:, None] and store the results without that axis.",
            "max_learning_rate is not recorded: nt 0.6.5 calls scipy.linalg.eigvalsh(eigvals=...), removed in "
            "SciPy 1.14; the tests check arcflow's against the formula with numpy.linalg.eigvalsh.",
            f"Training kernels (after diag_reg) have a condition number below {COND_MAX:g}.",
        ],
        cases=cases,
    )
    arrays["meta"] = np.array(json.dumps(meta))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(cases)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
