"""Regenerate tests/data/nt_golden.npz: neural-tangents 0.6.5 kernels that CI compares arcflow with.

neural-tangents is not a test dependency (it needs jax 0.5.3); this script records its numbers once.
Run it in a separate environment::

    python3 -m venv /tmp/ntvenv
    /tmp/ntvenv/bin/pip install jax==0.5.3 jaxlib==0.5.3 neural-tangents==0.6.5 "numpy<2.2"
    /tmp/ntvenv/bin/python tests/kernels/make_nt_golden.py          # writes tests/data/nt_golden.npz

Each case is ``stax.serial(Dense(w, W_std, b_std), [phi, Dense(w, W_std, b_std)] * depth)`` with a
1-wide read-out, in the ntk parameterisation, ``kernel_fn(x1, x2, ('nngp', 'ntk'))`` in float64.
Layout of the .npz: ``meta`` is a JSON string (versions, notes and a list of cases); case k stores
``case_{k:03d}_x1``, ``case_{k:03d}_x2`` (absent for the symmetric case x2=None), ``case_{k:03d}_nngp``
and ``case_{k:03d}_ntk`` (absent where the activation has no NTK in docs/mathematics.md: Step, Sign).
A case's ``activation`` is ``[name, args]`` with ``name`` a constructor in ``arcflow.activations``.

The seed is fixed, so re-running reproduces the file (up to jax's own version-to-version rounding).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "data" / "nt_golden.npz"
SEED = 20260517
N1, N2, D = 7, 5, 4
DEPTHS = range(0, 9)


def nt_layer(stax, name, args):
    """The neural-tangents layer for an arcflow activation given as (name, args)."""
    table = {
        "ReLU": lambda: stax.Relu(),
        "LeakyReLU": lambda alpha: stax.LeakyRelu(alpha),
        "ABReLU": lambda a, b: stax.ABRelu(a, b),
        "Abs": lambda: stax.Abs(),
        "Identity": lambda: stax.Identity(),
        "Erf": lambda: stax.Erf(),
        "Sign": lambda: stax.Sign(),
        "Step": lambda: stax.RectifiedMonomial(0),
        "RectifiedMonomial": lambda n: stax.RectifiedMonomial(n),
    }
    return table[name](*args)


def nt_kernels(x1, x2, name, args, depth, w_std, b_std, width=16):
    """neural-tangents' (nngp, ntk) for one network, float64 (jax_enable_x64 must be on)."""
    from neural_tangents import stax

    layers = [stax.Dense(width, W_std=w_std, b_std=b_std)]
    for _ in range(depth):
        layers += [nt_layer(stax, name, args), stax.Dense(width, W_std=w_std, b_std=b_std)]
    layers[-1] = stax.Dense(1, W_std=w_std, b_std=b_std)
    _, _, kernel_fn = stax.serial(*layers)
    k = kernel_fn(x1, x2, ("nngp", "ntk"))
    return np.asarray(k.nngp, dtype=np.float64), np.asarray(k.ntk, dtype=np.float64)


def activation_specs(rng):
    """Every activation neural-tangents has in closed form, with random parameters where it has any."""
    alpha = float(np.round(rng.uniform(0.01, 0.5), 6))
    a, b = (float(v) for v in np.round(rng.uniform(-1.5, 1.5, size=2), 6))
    return [("ReLU", []), ("LeakyReLU", [alpha]), ("ABReLU", [a, b]), ("Abs", []),
            ("Identity", []), ("Erf", []), ("Sign", [])]


NO_NTK = {"Sign", "Step"}   # docs/mathematics.md §1.2: phi' is a Dirac delta; nt returns Theta computed with Tdot = 0


def main() -> int:
    import jax
    jax.config.update("jax_enable_x64", True)
    import neural_tangents

    rng = np.random.default_rng(SEED)
    arrays, cases = {}, []

    def add(name, args, depth, w_std, b_std, x1, x2, kind):
        nngp, ntk = nt_kernels(x1, x2, name, args, depth, w_std, b_std)
        if not (np.all(np.isfinite(nngp)) and np.all(np.isfinite(ntk))):
            raise RuntimeError(f"neural-tangents returned non-finite values for {name}{args}")
        key = f"case_{len(cases):03d}"
        arrays[key + "_x1"] = x1
        if x2 is not None:
            arrays[key + "_x2"] = x2
        arrays[key + "_nngp"] = nngp
        if name not in NO_NTK:
            arrays[key + "_ntk"] = ntk
        cases.append(dict(key=key, activation=[name, args], depth=depth, w_std=w_std, b_std=b_std,
                          symmetric=x2 is None, kind=kind, has_ntk=name not in NO_NTK))

    def std_pair(zero_bias):
        w = float(np.round(rng.uniform(0.5, 2.0), 6))
        b = 0.0 if zero_bias else float(np.round(rng.uniform(0.05, 1.0), 6))
        return w, b

    for name, args in activation_specs(rng):
        for depth in DEPTHS:                                   # n1 != n2, every depth
            w, b = std_pair(zero_bias=depth % 3 == 0)
            x1, x2 = rng.standard_normal((N1, D)), rng.standard_normal((N2, D))
            add(name, args, depth, w, b, x1, x2, "general")
        for depth in (1, 4, 8):                                # symmetric: x2 = None
            w, b = std_pair(zero_bias=depth == 4)
            add(name, args, depth, w, b, rng.standard_normal((N1, D)), None, "symmetric")
        for depth, zero_bias in ((2, True), (3, False)):       # a zero row in x1 and in x2
            w, b = std_pair(zero_bias)
            x1, x2 = rng.standard_normal((N1, D)), rng.standard_normal((N2, D))
            x1[2] = 0.0
            x2[0] = 0.0
            add(name, args, depth, w, b, x1, x2, "zero_row")

    # RectifiedMonomial: record what neural-tangents does, keep no numbers (docs/mathematics.md §1.3).
    probe1, probe2 = rng.standard_normal((3, D)), rng.standard_normal((2, D))
    monomial = {}
    for n in range(0, 4):
        row = {}
        for depth in (1, 2):
            for label, p2 in (("x2", probe2), ("symmetric", None)):
                nngp, ntk = nt_kernels(probe1, p2, "RectifiedMonomial", [n], depth, 1.3, 0.2)
                row[f"depth{depth}_{label}"] = dict(nngp_nan=bool(np.isnan(nngp).any()),
                                                    ntk_nan=bool(np.isnan(ntk).any()))
        monomial[str(n)] = row

    meta = dict(
        format=1,
        generator="tests/kernels/make_nt_golden.py",
        seed=SEED,
        versions=dict(neural_tangents=neural_tangents.__version__, jax=jax.__version__,
                      numpy=np.__version__),
        parameterization="ntk",
        notes=[
            "RectifiedMonomial(n) (and Step = RectifiedMonomial(0)) is not recorded: nt 0.6.5 returns NaN "
            "in float64 wherever a diagonal Sigma(x,x) enters (the symmetric case, and every case from "
            "depth 2 on: arccos(1) = 0, then a division by sin(0)). At depth 1 with x2 given (no diagonal "
            "needed) its NNGP and NTK are finite and agree with arcflow.reference to ~1e-15. See "
            "rectified_monomial_probe.",
            "Sign: nt returns Theta computed with Tdot = 0; docs/mathematics.md says Sign has no NTK, so only the "
            "NNGP is stored.",
            "Zero rows: nt uses theta = pi/2 where Sigma(x,x) Sigma(y,y) = 0 (fill_zero in _arctan2).",
        ],
        rectified_monomial_probe=monomial,
        cases=cases,
    )
    arrays["meta"] = np.array(json.dumps(meta))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(cases)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
