"""Regenerate tests/data/nt_stax_random_golden.npz: neural-tangents 0.6.5 kernels of random convolutional
networks (1 to 6 Conv layers, images 4x4 to 16x16), which tests/kernels/test_stax_random.py compares
arcflow.stax.serial with, in float64 and in float32.

neural-tangents is not a test dependency (it needs jax 0.5.3); this script records its numbers once and does not
import arcflow. Run it in a separate environment::

    python3 -m venv /tmp/ntvenv
    /tmp/ntvenv/bin/pip install jax==0.5.3 jaxlib==0.5.3 neural-tangents==0.6.5 "numpy<2.2"
    /tmp/ntvenv/bin/python tests/kernels/make_nt_stax_random_golden.py   # writes tests/data/nt_stax_random_golden.npz

What is drawn (seed SEED, so a re-run reproduces the file up to jax's own version-to-version rounding): N_CASES
networks ``stax.serial(...)`` with 1 to 6 Conv layers (filters 3x3, 5x5 and non-square ones, some of even size;
padding SAME, VALID or CIRCULAR), each mostly followed by an activation, AvgPool layers in random places (window
2 or 3, possibly non-square, strides 1 or 2, padding VALID / SAME and sometimes CIRCULAR, once in a while before
the first Conv), a GlobalAvgPool or Flatten readout, and half the time a head (Dense, or Dense, activation, Dense,
...); every activation of arcflow.stax (case k's first activation is ACTIVATIONS[k % 8], the rest are random),
random W_std and b_std (None: no bias) per layer; random images 4x4 to 16x16 (not necessarily square) with 1 to 3
channels. A VALID layer is only drawn where the image keeps at least one pixel.

The images are float32 numbers (stored as float32; nt saw the same values in float64), so that the float32
comparison of the test measures arithmetic, not the rounding of the inputs. Everything nt computes here is float64
(jax_enable_x64): ``kernel_fn(x1, x2)``, ``kernel_fn(x1, None)`` (whose diagonal is the diagonal k(x, x)) and the
diagonal of ``kernel_fn(x2, None)``, NNGP and NTK (no NTK where a Sign has none).

Layout of the .npz: ``meta`` is a JSON string (versions, notes, the list of cases); a case's ``layers`` is a list
of ``[name, kwargs]`` with ``name`` a layer of ``arcflow.stax`` and of neural-tangents' stax and kwargs its
arguments (lists for tuples). Case ``case_{k:03d}`` stores ``_x1`` (N1 images), ``_x2`` (N2 images), ``_nngp``,
``_ntk`` (x1 vs x2), ``_sym_nngp``, ``_sym_ntk`` (x1 with itself), ``_diag2_nngp``, ``_diag2_ntk`` (k(x, x) for
x2). Two nt defects change what is stored (both in the notes):

* RectifiedMonomial(1): nt 0.6.5 evaluates (pi - theta) / sin(theta) at theta = 0, i.e. NaN wherever the cosine is
  exactly 1 (every same-image same-position pair), and the NaN spreads through every later layer. Its function is
  max(x, 0), the same as Relu, so nt's kernels are computed with Relu in its place (the case's ``nt_layers``);
  where nt's own RectifiedMonomial(1) gives finite numbers (x1 vs x2 in some networks) they are stored too as
  ``_nngp_monomial`` / ``_ntk_monomial``.
* Sign followed by pooling and a later activation (``nt_sign_defect``): nt sets the same-image covariance of
  Sign's output to 1 at every pair of positions, right only for equal positions, so its NNGP is wrong. The arrays
  then also hold ``*_erf_limit``: nt with Erf(b=SIGN_B) in place of every Sign, whose NNGP tends to Sign's
  (within ~1e-6 here).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "data" / "nt_stax_random_golden.npz"
SEED = 20261208
N_CASES = 60
N1, N2 = 3, 4
ACTIVATIONS = ("Relu", "LeakyRelu", "ABRelu", "Abs", "Erf", "Sign", "RectifiedMonomial", "Identity")
# Sign networks have no NTK: drawn rarely beyond the cases whose first activation is Sign by rotation.
ACT_WEIGHTS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.25, 1.0, 1.0])
SIGN_B = 1e7
FILTERS = ([3, 3], [5, 5], [3, 5], [5, 3], [1, 3], [3, 1], [2, 3], [4, 2], [1, 5])
FILTER_P = np.array([0.3, 0.25, 0.07, 0.07, 0.06, 0.06, 0.07, 0.06, 0.06])
WINDOWS = ([2, 2], [3, 3], [2, 3], [3, 2])
WINDOW_P = np.array([0.4, 0.3, 0.15, 0.15])


def sign_defect(layers):
    """True where nt's Sign is wrong: a Sign, later an AvgPool or GlobalAvgPool, later an activation that reads
    the variances (not Identity, a no-op in nt)."""
    names = [name for name, _ in layers]
    if "Sign" not in names:
        return False
    after = names[names.index("Sign") + 1:]
    pools = [i for i, n in enumerate(after) if n in ("AvgPool", "GlobalAvgPool")]
    return bool(pools) and any(n in ACTIVATIONS and n != "Identity" for n in after[pools[0] + 1:])


def random_std(rng):
    w = float(np.round(rng.uniform(0.5, 2.0), 6))
    b = None if rng.random() < 0.3 else float(np.round(rng.uniform(0.05, 1.0), 6))
    return w, b


def activation(rng, name=None):
    if name is None:
        name = str(rng.choice(ACTIVATIONS, p=ACT_WEIGHTS / ACT_WEIGHTS.sum()))
    if name == "LeakyRelu":
        return [name, {"alpha": float(np.round(rng.uniform(0.01, 0.5), 6))}]
    if name == "ABRelu":
        a, b = (float(v) for v in np.round(rng.uniform(-1.5, 1.5, size=2), 6))
        return [name, {"a": a, "b": b}]
    if name == "RectifiedMonomial":
        return [name, {"degree": 1}]
    return [name, {}]


def out_size(size, window, stride, padding):
    return (size - window) // stride + 1 if padding == "VALID" else -(-size // stride)


def random_pool(rng, h, w):
    win = list(WINDOWS[rng.choice(len(WINDOWS), p=WINDOW_P)])
    u = rng.random()
    strides = None if u < 0.4 else [1, 1] if u < 0.5 else [2, 2] if u < 0.85 else [1, 2]
    padding = str(rng.choice(["VALID", "SAME", "CIRCULAR"], p=[0.45, 0.4, 0.15]))
    if padding == "VALID" and (h < win[0] or w < win[1]):
        padding = "SAME"
    s = strides or [1, 1]
    return (["AvgPool", {"window_shape": win, "strides": strides, "padding": padding}],
            out_size(h, win[0], s[0], padding), out_size(w, win[1], s[1], padding))


def random_network(rng, h, w, first_act):
    """A list of [name, kwargs]; the image stays at least 1x1 through every VALID layer."""
    layers = []
    pending = [first_act]
    if rng.random() < 0.08:
        lay, h, w = random_pool(rng, h, w)
        layers.append(lay)
    for _ in range(int(rng.integers(1, 7))):
        fs = list(FILTERS[rng.choice(len(FILTERS), p=FILTER_P)])
        if rng.random() < 0.5:
            fs = fs[::-1]
        padding = str(rng.choice(["SAME", "VALID", "CIRCULAR"]))
        if padding == "VALID" and (h < fs[0] or w < fs[1]):
            padding = "SAME"
        W, b = random_std(rng)
        layers.append(["Conv", {"out_chan": 4, "filter_shape": fs, "padding": padding, "W_std": W, "b_std": b}])
        h, w = out_size(h, fs[0], 1, padding), out_size(w, fs[1], 1, padding)
        if pending or rng.random() < 0.85:
            layers.append(activation(rng, pending.pop() if pending else None))
        if rng.random() < 0.3:
            lay, h, w = random_pool(rng, h, w)
            layers.append(lay)
    layers.append(["GlobalAvgPool", {}] if rng.random() < 0.5 else ["Flatten", {}])
    head = rng.random()
    if head < 0.3:
        W, b = random_std(rng)
        layers.append(["Dense", {"out_dim": 1, "W_std": W, "b_std": b}])
    elif head < 0.55:
        for _ in range(int(rng.integers(1, 3))):
            W, b = random_std(rng)
            layers.append(["Dense", {"out_dim": 3, "W_std": W, "b_std": b}])
            layers.append(activation(rng))
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


def kernels(kfn, x, y, has_ntk, what):
    k = kfn(x, y, ("nngp", "ntk"))
    out = {"nngp": np.asarray(k.nngp, np.float64)}
    if has_ntk:
        out["ntk"] = np.asarray(k.ntk, np.float64)
    for v in out.values():
        if not np.all(np.isfinite(v)):
            raise RuntimeError(f"neural-tangents returned non-finite values ({what})")
    return out


def main() -> int:
    import jax
    jax.config.update("jax_enable_x64", True)
    import neural_tangents

    rng = np.random.default_rng(SEED)
    arrays, cases = {}, []
    for k in range(N_CASES):
        h, w, c = int(rng.integers(4, 17)), int(rng.integers(4, 17)), int(rng.integers(1, 4))
        layers = random_network(rng, h, w, ACTIVATIONS[k % len(ACTIVATIONS)])
        x1 = rng.standard_normal((N1, h, w, c)).astype(np.float32)
        x2 = rng.standard_normal((N2, h, w, c)).astype(np.float32)
        y1, y2 = x1.astype(np.float64), x2.astype(np.float64)
        has_ntk = not any(name == "Sign" for name, _ in layers)
        nt_layers = [["Relu", {}] if name == "RectifiedMonomial" else [name, kw] for name, kw in layers]
        kfn = nt_serial(nt_layers)
        key = f"case_{k:03d}"
        arrays[key + "_x1"], arrays[key + "_x2"] = x1, x2
        for tag, (a, b) in (("_", (y1, y2)), ("_sym_", (y1, None))):
            for f, v in kernels(kfn, a, b, has_ntk, f"{key} {tag}").items():
                arrays[key + tag + f] = v
        for f, v in kernels(kfn, y2, None, has_ntk, f"{key} x2").items():
            arrays[key + "_diag2_" + f] = np.ascontiguousarray(np.diag(v))
        monomial_finite = False
        if nt_layers != layers:
            own = nt_serial(layers)(y1, y2, ("nngp", "ntk"))
            vals = {f: np.asarray(getattr(own, f), np.float64) for f in ("nngp", "ntk") if f == "nngp" or has_ntk}
            monomial_finite = all(np.all(np.isfinite(v)) for v in vals.values())
            if monomial_finite:
                for f, v in vals.items():
                    arrays[f"{key}_{f}_monomial"] = v
        defect = sign_defect(layers)
        if defect:
            erf = nt_serial([["Erf", {"b": SIGN_B}] if name == "Sign" else [name, kw] for name, kw in nt_layers])
            arrays[key + "_sym_nngp_erf_limit"] = np.asarray(erf(y1, None, "nngp"), np.float64)
            arrays[key + "_nngp_erf_limit"] = np.asarray(erf(y1, y2, "nngp"), np.float64)
            arrays[key + "_diag2_nngp_erf_limit"] = np.ascontiguousarray(np.diag(np.asarray(erf(y2, None, "nngp"))))
        case = dict(key=key, layers=layers, image=[h, w, c], has_ntk=has_ntk, nt_sign_defect=defect)
        if nt_layers != layers:
            case.update(nt_layers=nt_layers, nt_monomial_finite=monomial_finite)
        cases.append(case)
        print(f"{key} {h}x{w}x{c}: " + " ".join(name for name, _ in layers), flush=True)

    meta = dict(
        format=1,
        generator="tests/kernels/make_nt_stax_random_golden.py",
        seed=SEED,
        n1=N1, n2=N2,
        versions=dict(neural_tangents=neural_tangents.__version__, jax=jax.__version__, numpy=np.__version__),
        parameterization="ntk",
        notes=[
            "Images are float32 values (stored as float32); nt computed everything in float64 on those values.",
            "RectifiedMonomial(1): nt 0.6.5 gives NaN wherever the cosine is exactly 1 ((pi - theta) / sin(theta) "
            "at theta = 0, every same-image same-position pair) and the NaN spreads; the kernels are nt's with "
            "Relu in its place (the same function, max(x, 0)): the case's nt_layers. Where nt's own "
            "RectifiedMonomial(1) is finite (x1 vs x2) its kernels are stored as *_monomial.",
            "Sign: nt returns Theta computed with Tdot = 0; Sign has no NTK, so only the NNGP is stored.",
            "Sign followed by pooling and a later activation (nt_sign_defect): nt 0.6.5 sets the same-image "
            "covariance of Sign's output to 1 at every pair of positions (exact only for equal positions), so its "
            "NNGP is wrong there; *_erf_limit stores nt with Erf(b=1e7) in place of Sign.",
            "Flatten without pooling: nt's NTK on the diagonal of kernel_fn(x, None) is off by up to a few 1e-9 "
            "(a spurious angle ~1e-8 at c = 1 in its ReLU-family Tdot); off-diagonal entries are not affected.",
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
