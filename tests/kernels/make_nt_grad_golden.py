"""Regenerate tests/data/nt_grad_golden.npz: jax derivatives of neural-tangents 0.6.5 kernels with respect to
W_std and b_std, which CI compares arcflow.kernel_grads with.

neural-tangents is not a test dependency (it needs jax 0.5.3); this script records its numbers once, in a
separate environment (see tests/kernels/make_nt_golden.py)::

    /tmp/ntvenv/bin/python tests/kernels/make_nt_grad_golden.py      # writes tests/data/nt_grad_golden.npz

Each case is ``stax.serial(Dense(w, W_std, b_std), [phi, Dense(w, W_std, b_std)] * depth)`` with a 1-wide
read-out (ntk parameterisation), and the derivatives are ``jax.jacfwd`` of ``kernel_fn(x1, x2, ('nngp', 'ntk'))``
with respect to (W_std, b_std), in float64. Only x1 against a different x2 of random rows (and zero rows): the
diagonal and other collinear pairs are where neural-tangents' angle is off (docs/mathematics.md §1.3), and
RectifiedMonomial / Step are left out (nt 0.6.5 returns NaN for them; see make_nt_golden.py).
Layout of the .npz: ``meta`` is a JSON string (versions, notes, cases); case k stores ``case_{k:03d}_x1``,
``_x2``, ``_nngp``, ``_nngp_dw``, ``_nngp_db`` and, where the activation has an NTK, ``_ntk``, ``_ntk_dw``, ``_ntk_db``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "data" / "nt_grad_golden.npz"
SEED = 20261207
N1, N2, D = 5, 4, 3
NO_NTK = {"Sign"}


def nt_layer(stax, name, args):
    table = {
        "ReLU": lambda: stax.Relu(),
        "LeakyReLU": lambda alpha: stax.LeakyRelu(alpha),
        "ABReLU": lambda a, b: stax.ABRelu(a, b),
        "Abs": lambda: stax.Abs(),
        "Identity": lambda: stax.Identity(),
        "Erf": lambda: stax.Erf(),
        "Sign": lambda: stax.Sign(),
    }
    return table[name](*args)


def nt_grads(x1, x2, name, args, depth, w_std, b_std, width=16):
    """neural-tangents' (nngp, ntk) and their jacobians with respect to (W_std, b_std), float64."""
    import jax
    import jax.numpy as jnp
    from neural_tangents import stax

    def kernels(p):
        layers = [stax.Dense(width, W_std=p[0], b_std=p[1])]
        for _ in range(depth):
            layers += [nt_layer(stax, name, args), stax.Dense(width, W_std=p[0], b_std=p[1])]
        layers[-1] = stax.Dense(1, W_std=p[0], b_std=p[1])
        _, _, kernel_fn = stax.serial(*layers)
        k = kernel_fn(x1, x2, ("nngp", "ntk"))
        return k.nngp, k.ntk

    p = jnp.array([w_std, b_std], dtype=jnp.float64)
    val = [np.asarray(v, dtype=np.float64) for v in kernels(p)]
    jac = [np.asarray(j, dtype=np.float64) for j in jax.jacfwd(kernels)(p)]
    return val, jac


def main() -> int:
    import jax
    jax.config.update("jax_enable_x64", True)
    import neural_tangents

    rng = np.random.default_rng(SEED)
    arrays, cases = {}, []
    alpha = float(np.round(rng.uniform(0.01, 0.5), 6))
    a, b = (float(v) for v in np.round(rng.uniform(-1.5, 1.5, size=2), 6))
    specs = [("ReLU", []), ("LeakyReLU", [alpha]), ("ABReLU", [a, b]), ("Abs", []), ("Identity", []),
             ("Erf", []), ("Sign", [])]

    def add(name, args, depth, w_std, b_std, x1, x2, kind):
        (nngp, ntk), (jn, jt) = nt_grads(x1, x2, name, args, depth, w_std, b_std)
        for v in (nngp, ntk, jn, jt):
            if not np.all(np.isfinite(v)):
                raise RuntimeError(f"neural-tangents returned non-finite values for {name}{args}")
        key = f"case_{len(cases):03d}"
        arrays[key + "_x1"], arrays[key + "_x2"] = x1, x2
        arrays[key + "_nngp"], arrays[key + "_nngp_dw"], arrays[key + "_nngp_db"] = nngp, jn[..., 0], jn[..., 1]
        if name not in NO_NTK:
            arrays[key + "_ntk"], arrays[key + "_ntk_dw"], arrays[key + "_ntk_db"] = ntk, jt[..., 0], jt[..., 1]
        cases.append(dict(key=key, activation=[name, args], depth=depth, w_std=w_std, b_std=b_std, kind=kind,
                          has_ntk=name not in NO_NTK))

    def std_pair(zero_bias):
        w = float(np.round(rng.uniform(0.5, 2.0), 6))
        return w, (0.0 if zero_bias else float(np.round(rng.uniform(0.05, 1.0), 6)))

    for name, args in specs:
        for depth in range(0, 5):
            w, bs = std_pair(zero_bias=depth == 2)
            add(name, args, depth, w, bs, rng.standard_normal((N1, D)), rng.standard_normal((N2, D)), "general")
        for depth in (2, 3):
            w, bs = std_pair(zero_bias=depth == 2)
            x1, x2 = rng.standard_normal((N1, D)), rng.standard_normal((N2, D))
            x1[1] = 0.0
            x2[3] = 0.0
            add(name, args, depth, w, bs, x1, x2, "zero_row")

    meta = dict(
        format=1,
        generator="tests/kernels/make_nt_grad_golden.py",
        seed=SEED,
        versions=dict(neural_tangents=neural_tangents.__version__, jax=jax.__version__, numpy=np.__version__),
        parameterization="ntk",
        derivative="jax.jacfwd with respect to (W_std, b_std)",
        notes=[
            "x1 against a different x2 only: no diagonal, no collinear pairs (nt's angle is off there).",
            "RectifiedMonomial and Step left out: nt 0.6.5 returns NaN for them in float64.",
            "Sign: only the NNGP is stored (no NTK in docs/mathematics.md).",
            "Zero rows: nt uses theta = pi/2 where Sigma(x,x) Sigma(y,y) = 0; with b_std = 0 the zero row keeps "
            "zero variance and its derivatives are 0.",
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
