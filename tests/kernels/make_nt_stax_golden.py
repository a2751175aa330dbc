"""Regenerate tests/data/nt_stax_golden.npz: neural-tangents 0.6.5 kernels of random convolutional networks,
which tests/kernels/test_stax.py compares arcflow.stax.serial with.

neural-tangents is not a test dependency (it needs jax 0.5.3); this script records its numbers once and does not
import arcflow. Run it in a separate environment::

    python3 -m venv /tmp/ntvenv
    /tmp/ntvenv/bin/pip install jax==0.5.3 jaxlib==0.5.3 neural-tangents==0.6.5 "numpy<2.2"
    /tmp/ntvenv/bin/python tests/kernels/make_nt_stax_golden.py     # writes tests/data/nt_stax_golden.npz

Each case is a random ``stax.serial`` network: 1 to 4 Conv layers (3x3 and 5x5 filters, SAME / VALID / CIRCULAR
padding), each mostly followed by an activation, AvgPool layers in random places, a Flatten or GlobalAvgPool
readout and sometimes a fully-connected head, random W_std and b_std (None: no bias) per layer, on random images
4x4 to 8x8 with 1 to 3 channels. Both kernels in float64 (jax_enable_x64), ``kernel_fn(x1, None)`` and
``kernel_fn(x1, x2)``; see SIGN_B for the networks where nt's Sign is wrong. Layout of the .npz: ``meta`` is a
JSON string (versions, notes and the list of cases); case k stores ``case_{k:03d}_x1``, ``_x2``, ``_sym_nngp``,
``_sym_ntk``, ``_nngp`` and ``_ntk`` (no NTK arrays where an activation has none: Sign), and for the networks
where nt's Sign is wrong ``_sym_nngp_erf_limit`` and ``_nngp_erf_limit``. A case's ``layers`` is a list of
``[name, kwargs]`` with ``name`` a layer of ``arcflow.stax`` (and of neural-tangents' stax), kwargs its arguments.

The seed is fixed, so re-running reproduces the file (up to jax's own version-to-version rounding).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "data" / "nt_stax_golden.npz"
SEED = 20261207
N_CASES = 56
N1, N2 = 3, 2
# RectifiedMonomial is left out: nt 0.6.5 returns NaN in float64 wherever a diagonal variance enters (see
# make_nt_golden.py's notes); Sign is kept for the NNGP only.
ACTIVATIONS = ("Relu", "LeakyRelu", "ABRelu", "Abs", "Erf", "Sign", "Identity")
NO_NTK = {"Sign"}
# nt 0.6.5's Sign sets the whole same-image covariance cov1[p, q] to 1 (right for p = q only). Later Conv layers and
# activations carry the wrong p != q entries along; a pooling layer (AvgPool, GlobalAvgPool) mixes them into the
# same-position variances, and an activation after it reads those (Identity does not): its result is wrong. For
# such networks the file also stores nt's kernels with every Sign replaced by Erf(b=SIGN_B): erf(b x) -> sign(x),
# with an NNGP within ~1/b of Sign's (a check that does not depend on nt's Sign).
SIGN_B = 1e7


def sign_defect(layers):
    """True where nt's Sign is wrong: a Sign, later an AvgPool or GlobalAvgPool, later an activation that reads
    the variances (not Identity, a no-op in nt)."""
    names = [name for name, _ in layers]
    if "Sign" not in names:
        return False
    after = names[names.index("Sign") + 1:]
    pools = [i for i, n in enumerate(after) if n in ("AvgPool", "GlobalAvgPool")]
    return bool(pools) and any(n in ACTIVATIONS and n != "Identity" for n in after[pools[0] + 1:])


# Fixed networks besides the random ones: non-square images, filters and pooling windows, even filter sizes
# (SAME pads one more entry after than before), strided CIRCULAR pooling.
FIXED = [
    ((5, 7, 2), [
        ["Conv", {"out_chan": 2, "filter_shape": [3, 5], "padding": "SAME", "W_std": 1.3, "b_std": 0.2}],
        ["Relu", {}],
        ["AvgPool", {"window_shape": [2, 3], "strides": [1, 2], "padding": "CIRCULAR"}],
        ["Conv", {"out_chan": 2, "filter_shape": [1, 3], "padding": "VALID", "W_std": 1.1, "b_std": None}],
        ["Erf", {}],
        ["Conv", {"out_chan": 2, "filter_shape": [2, 2], "padding": "SAME", "W_std": 0.9, "b_std": 0.3}],
        ["Abs", {}],
        ["AvgPool", {"window_shape": [2, 2], "strides": None, "padding": "SAME"}],
        ["GlobalAvgPool", {}],
        ["Dense", {"out_dim": 1, "W_std": 1.2, "b_std": 0.1}]]),
    ((6, 4, 3), [
        ["Conv", {"out_chan": 2, "filter_shape": [4, 3], "padding": "CIRCULAR", "W_std": 1.5, "b_std": None}],
        ["LeakyRelu", {"alpha": 0.1}],
        ["Conv", {"out_chan": 2, "filter_shape": [2, 1], "padding": "SAME", "W_std": 0.7, "b_std": 0.5}],
        ["ABRelu", {"a": -0.3, "b": 1.2}],
        ["AvgPool", {"window_shape": [3, 2], "strides": [2, 1], "padding": "SAME"}],
        ["Flatten", {}],
        ["Dense", {"out_dim": 1, "W_std": 1.0, "b_std": 0.2}]]),
]


def random_std(rng, allow_none=True):
    w = float(np.round(rng.uniform(0.5, 2.0), 6))
    b = None if allow_none and rng.random() < 0.3 else float(np.round(rng.uniform(0.05, 1.0), 6))
    return w, b


def random_activation(rng):
    name = ACTIVATIONS[rng.integers(len(ACTIVATIONS))]
    if name == "LeakyRelu":
        return [name, {"alpha": float(np.round(rng.uniform(0.01, 0.5), 6))}]
    if name == "ABRelu":
        a, b = (float(v) for v in np.round(rng.uniform(-1.5, 1.5, size=2), 6))
        return [name, {"a": a, "b": b}]
    return [name, {}]


def out_size(size, window, stride, padding):
    return (size - window) // stride + 1 if padding == "VALID" else -(-size // stride)


def random_network(rng, h, w):
    """A list of [name, kwargs]; the image stays at least 1x1 through every VALID layer."""
    layers = []
    for _ in range(int(rng.integers(1, 5))):
        f = int(rng.choice([3, 5]))
        padding = str(rng.choice(["SAME", "VALID", "CIRCULAR"]))
        if padding == "VALID" and (h < f or w < f):
            padding = "SAME"
        W, b = random_std(rng)
        layers.append(["Conv", {"out_chan": 4, "filter_shape": [f, f], "padding": padding, "W_std": W, "b_std": b}])
        h, w = out_size(h, f, 1, padding), out_size(w, f, 1, padding)
        if rng.random() < 0.85:
            layers.append(random_activation(rng))
        if rng.random() < 0.3:
            win = int(rng.choice([2, 3]))
            stride = None if rng.random() < 0.6 else [2, 2]
            padding = str(rng.choice(["SAME", "VALID", "CIRCULAR"]))
            if padding == "VALID" and (h < win or w < win):
                padding = "SAME"
            layers.append(["AvgPool", {"window_shape": [win, win], "strides": stride, "padding": padding}])
            s = 1 if stride is None else 2
            h, w = out_size(h, win, s, padding), out_size(w, win, s, padding)
    layers.append(["GlobalAvgPool", {}] if rng.random() < 0.5 else ["Flatten", {}])
    head = rng.random()
    if head < 0.5:
        W, b = random_std(rng)
        layers.append(["Dense", {"out_dim": 1, "W_std": W, "b_std": b}])
    elif head < 0.7:
        for _ in range(2):
            W, b = random_std(rng)
            layers.append(["Dense", {"out_dim": 3, "W_std": W, "b_std": b}])
            layers.append(random_activation(rng))
        W, b = random_std(rng)
        layers.append(["Dense", {"out_dim": 1, "W_std": W, "b_std": b}])
    return layers


def nt_serial(layers):
    from neural_tangents import stax
    built = []
    for name, kw in layers:
        kw = dict(kw)
        for key in ("filter_shape", "window_shape", "strides"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        built.append(getattr(stax, name)(**kw))
    return stax.serial(*built)[2]


def main() -> int:
    import jax
    jax.config.update("jax_enable_x64", True)
    import neural_tangents

    rng = np.random.default_rng(SEED)
    arrays, cases = {}, []
    for k in range(N_CASES + len(FIXED)):
        h, w, c = (*(int(v) for v in rng.integers(4, 9, size=2)), int(rng.integers(1, 4)))
        layers = random_network(rng, h, w)
        if k >= N_CASES:
            (h, w, c), layers = FIXED[k - N_CASES]
        kfn = nt_serial(layers)
        x1 = np.round(rng.standard_normal((N1, h, w, c)), 8)
        x2 = np.round(rng.standard_normal((N2, h, w, c)), 8)
        has_ntk = not any(name in NO_NTK for name, _ in layers)
        key = f"case_{k:03d}"
        arrays[key + "_x1"], arrays[key + "_x2"] = x1, x2
        for tag, y in (("_sym", None), ("", x2)):
            kern = kfn(x1, y, ("nngp", "ntk"))
            nngp, ntk = np.asarray(kern.nngp, np.float64), np.asarray(kern.ntk, np.float64)
            if not (np.all(np.isfinite(nngp)) and np.all(np.isfinite(ntk))):
                raise RuntimeError(f"neural-tangents returned non-finite values for {layers}")
            arrays[key + tag + "_nngp"] = nngp
            if has_ntk:
                arrays[key + tag + "_ntk"] = ntk
        defect = sign_defect(layers)
        if defect:
            surrogate = nt_serial([["Erf", {"b": SIGN_B}] if name == "Sign" else [name, kw] for name, kw in layers])
            arrays[key + "_sym_nngp_erf_limit"] = np.asarray(surrogate(x1, None, "nngp"), np.float64)
            arrays[key + "_nngp_erf_limit"] = np.asarray(surrogate(x1, x2, "nngp"), np.float64)
        cases.append(dict(key=key, layers=layers, image=[h, w, c], has_ntk=has_ntk, nt_sign_defect=defect))

    meta = dict(
        format=1,
        generator="tests/kernels/make_nt_stax_golden.py",
        seed=SEED,
        versions=dict(neural_tangents=neural_tangents.__version__, jax=jax.__version__, numpy=np.__version__),
        parameterization="ntk",
        notes=[
            "RectifiedMonomial is not recorded: nt 0.6.5 returns NaN in float64 wherever a diagonal variance "
            "enters (see tests/data/nt_golden.npz's notes).",
            "Sign: nt returns Theta computed with Tdot = 0; Sign has no NTK, so only the NNGP is stored.",
            "Sign followed by pooling (nt_sign_defect): nt 0.6.5 sets the same-image covariance of Sign's output to "
            "1 at every pair of positions (exact only for equal positions), so its NNGP is wrong there (by up to "
            "200%); *_nngp_erf_limit stores nt with Erf(b=1e7) in place of Sign, within ~1e-6 of Sign's kernel.",
            "Flatten without pooling (nt evaluates only same-position pairs): nt's NTK on the diagonal of "
            "kernel_fn(x1, None) is off by up to ~2e-9 (a spurious angle ~1e-8 at c = 1 in its ReLU-family Tdot); "
            "the same entries of kernel_fn(x1, x2) and every off-diagonal entry agree to ~1e-15.",
            "Images are rounded to 8 decimals so that the stored inputs are exactly what nt saw.",
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
