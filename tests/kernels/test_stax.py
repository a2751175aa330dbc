"""arcflow.stax: neural-tangents' layer names, serial()'s kernel function, the CNN-GP / CNTK it computes (the fused
C++ engine) and the exact NumPy recursion (arcflow.reference_conv) that is its oracle.

Oracles: neural-tangents 0.6.5 (tests/data/nt_stax_golden.npz from tests/kernels/make_nt_stax_golden.py, 56 random
convolutional networks, and live where jax imports) to 1e-10 relative in float64, the diagonal included; for the
networks where nt's Sign is wrong (a Sign followed by pooling, see the golden file's notes) nt's Erf(b=1e7) network,
whose NNGP tends to Sign's; arcflow.kernels / arcflow.reference for fully-connected networks.
"""
from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest

import arcflow
from arcflow import reference, reference_conv, stax

from _helpers.numeric import assert_differs, import_nt, load_golden, rel_err

TOL = 1e-10
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "nt_stax_golden.npz"
META, ARRAYS = load_golden(GOLDEN)
CASES = META["cases"]
WORST: dict = {}


def _layer(name, kw):
    return getattr(stax, name)(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})


def _kfn(case):
    return stax.serial(*(_layer(n, kw) for n, kw in case["layers"]))


def _case_id(c):
    return c["key"] + "-" + "-".join(n for n, _ in c["layers"])


def _flatten_without_pooling(case):
    names = [n for n, _ in case["layers"]]
    return "Flatten" in names and "AvgPool" not in names


# nt 0.6.5 is off on the NTK diagonal of kernel_fn(x1, None) for Flatten networks without pooling (its
# same-position path leaves a spurious angle ~1e-8 at c = 1 in the ReLU-family Tdot): those entries are held to
# NT_DIAG_TOL against nt and to 1e-13 against the same-position recursion below (test_flatten_diagonal_...).
NT_DIAG_TOL = 1e-8


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_golden_against_neural_tangents(case):
    kfn = _kfn(case)
    key = case["key"]
    x1, x2 = ARRAYS[key + "_x1"], ARRAYS[key + "_x2"]
    get = ("nngp", "ntk") if case["has_ntk"] else ("nngp",)
    sym, cross, diag = kfn(x1, get=get), kfn(x1, x2, get=get), kfn.diag(x1, get=get)
    off = ~np.eye(len(x1), dtype=bool)
    for field in get:
        got = {"_sym": getattr(sym, field), "": getattr(cross, field)}
        got_diag = getattr(diag, field)
        assert got["_sym"].dtype == np.float64 and got["_sym"].shape == (len(x1), len(x1))
        assert got[""].shape == (len(x1), len(x2)) and got_diag.shape == (len(x1),)
        np.testing.assert_array_equal(np.diag(got["_sym"]), got_diag)
        if case["nt_sign_defect"]:
            for tag in ("_sym", ""):
                # the Erf(b x) limit: NNGP within ~1/b of Sign's; nt's own Sign is far off
                assert rel_err(got[tag], ARRAYS[key + tag + "_nngp_erf_limit"]) < 1e-5
                assert_differs(ARRAYS[key + tag + "_nngp"], got[tag], 1e-3, f"{key} nt Sign defect")
            continue
        err = rel_err(got[""], ARRAYS[key + "_" + field])
        want_sym = ARRAYS[key + "_sym_" + field]
        err_off = rel_err(got["_sym"][off], want_sym[off]) if len(x1) > 1 else 0.0
        err_diag = rel_err(got_diag, np.diag(want_sym))
        WORST[(key, field)] = (err, err_off, err_diag)
        assert err <= TOL, f"{field}: {err:.2e} from neural-tangents"
        assert err_off <= TOL, f"{field} (x1, None) off the diagonal: {err_off:.2e} from neural-tangents"
        diag_tol = NT_DIAG_TOL if field == "ntk" and _flatten_without_pooling(case) else TOL
        assert err_diag <= diag_tol, f"{field} diagonal: {err_diag:.2e} from neural-tangents"
    if case["nt_sign_defect"]:
        return
    # float32 in, computed in float32 by the engine; and the NumPy recursion (the engine's other oracle)
    f32 = kfn(x1.astype(np.float32), x2.astype(np.float32), get=get)
    numpy_path = reference_conv.evaluate(kfn._ops, x1, x2, diag=False, want_nngp=True, want_ntk=len(get) > 1)
    for field in get:
        assert rel_err(getattr(f32, field), ARRAYS[key + "_" + field]) <= 1e-5, f"{field} float32"
        assert rel_err(getattr(numpy_path, field), ARRAYS[key + "_" + field]) <= TOL, f"{field} NumPy recursion"


def _same_position_oracle(layers, x):
    """k(x, x) of a network without pooling, from the same-position entries alone (a Conv's same-position output
    needs only same-position inputs; Flatten averages them): v[p] = Sigma(x, x)[p, p] and t[p] = Theta(x, x)[p, p],
    with the closed forms at c = 1 typed here: ABReLU(a, b): T = (a^2 + b^2) / 2 v, Tdot = (a^2 + b^2) / 2;
    Erf: T = 2 / pi arcsin(2 v / (1 + 2 v)), Tdot = 4 / (pi sqrt(1 + 4 v)); Sign: T = 1."""
    v = (x ** 2).mean(axis=-1)
    t = np.zeros_like(v)

    def conv(u, fh, fw, padding):
        if padding != "VALID":
            pads = [(0, 0)] + [((f - 1) // 2, f - 1 - (f - 1) // 2) for f in (fh, fw)]
            u = np.pad(u, pads, mode="constant" if padding == "SAME" else "wrap")
        h, w = u.shape[1] - fh + 1, u.shape[2] - fw + 1
        return sum(u[:, a:a + h, b:b + w] for a in range(fh) for b in range(fw)) / (fh * fw)

    for lay in layers:
        if isinstance(lay, (stax.Conv, stax.Dense)):
            if isinstance(lay, stax.Conv):
                v, t = conv(v, *lay.filter_shape, lay.padding), conv(t, *lay.filter_shape, lay.padding)
            v = lay.W_std ** 2 * v + (lay.b_std ** 2 if lay.b_std is not None else 0.0)
            t = lay.W_std ** 2 * t + v
        elif isinstance(lay, stax.Flatten):
            v, t = v.mean(axis=(1, 2)), t.mean(axis=(1, 2))
        elif isinstance(lay, stax.Erf):
            v, t = 2 / np.pi * np.arcsin(2 * v / (1 + 2 * v)), 4 / (np.pi * np.sqrt(1 + 4 * v)) * t
        elif isinstance(lay, stax.Sign):
            v, t = np.where(v > 0, 1.0, 0.0), np.zeros_like(v)   # no NTK (not compared)
        else:
            act = lay.activation
            k = (act.a ** 2 + act.b ** 2) / 2
            v, t = k * v, k * t
    return v, t


FLAT = [c for c in CASES if _flatten_without_pooling(c) and not c["nt_sign_defect"]]


@pytest.mark.parametrize("case", FLAT, ids=_case_id)
def test_flatten_diagonal_against_same_position_recursion(case):
    key = case["key"]
    layers = [_layer(n, kw) for n, kw in case["layers"]]
    x1 = ARRAYS[key + "_x1"]
    v, t = _same_position_oracle(layers, x1)
    d = stax.serial(*layers).diag(x1, get=("nngp", "ntk") if case["has_ntk"] else ("nngp",))
    assert rel_err(d.nngp, v) < 1e-13
    assert rel_err(d.nngp, np.diag(ARRAYS[key + "_sym_nngp"])) <= TOL
    if case["has_ntk"]:
        assert rel_err(d.ntk, t) < 1e-13
        WORST[(key, "ntk diag, nt off by")] = rel_err(np.diag(ARRAYS[key + "_sym_ntk"]), t)


def test_flatten_cases_exist():
    assert len(FLAT) >= 5 and any(c["has_ntk"] for c in FLAT)


def test_golden_covers_the_architectures():
    """The generator's random draws reach every padding, both readouts, pooling and every activation."""
    seen = set()
    for c in CASES:
        for name, kw in c["layers"]:
            seen.add(name + kw.get("padding", ""))
            if name == "Conv":
                seen.add("filter%d" % kw["filter_shape"][0])
                seen.add("bias" if kw["b_std"] is not None else "nobias")
    want = {"ConvSAME", "ConvVALID", "ConvCIRCULAR", "Flatten", "GlobalAvgPool", "Relu", "LeakyRelu", "ABRelu",
            "Abs", "Erf", "Sign", "Identity", "filter3", "filter5", "bias", "nobias"}
    assert want <= seen, want - seen
    assert any(n.startswith("AvgPool") for n in seen)
    assert sum(not c["nt_sign_defect"] and "Sign" in [n for n, _ in c["layers"]] for c in CASES) >= 1


def test_float32_in_float32_out():
    case = next(c for c in CASES if c["has_ntk"] and len(c["layers"]) > 4)
    kfn = _kfn(case)
    x1 = ARRAYS[case["key"] + "_x1"].astype(np.float32)
    k32, k64 = kfn(x1), kfn(x1.astype(np.float64))
    for f in ("nngp", "ntk"):
        assert getattr(k32, f).dtype == np.float32
        assert rel_err(getattr(k32, f), getattr(k64, f)) < 1e-6
    assert kfn.diag(x1, get="ntk").dtype == np.float32
    assert kfn(x1, x1.astype(np.float64), get="nngp").dtype == np.float64


# --------------------------------------------------------------------------------------------------
# Fully-connected networks: arcflow.kernels (fused engine) and arcflow.reference
# --------------------------------------------------------------------------------------------------
FC = [("relu", stax.Relu()), ("leaky", stax.LeakyRelu(0.2)), ("abrelu", stax.ABRelu(-0.4, 1.3)),
      ("abs", stax.Abs()), ("erf", stax.Erf()), ("identity", stax.Identity()), ("mono2", stax.RectifiedMonomial(2)),
      ("sign", stax.Sign())]


@pytest.mark.parametrize("name,act", FC, ids=[n for n, _ in FC])
@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("b_std", [None, 0.3])
def test_fc_serial_equals_arcflow_kernels(name, act, depth, b_std):
    rng = np.random.default_rng(depth)
    x1, x2 = rng.normal(size=(6, 5)), rng.normal(size=(4, 5))
    w = 1.3
    layers = [stax.Dense(8, W_std=w, b_std=b_std)]
    for _ in range(depth):
        layers += [act, stax.Dense(8, W_std=w, b_std=b_std)]
    kfn = stax.serial(*layers)
    assert kfn._route == (depth, act.activation if depth else arcflow.activations.ReLU(), w, b_std or 0.0)
    get = ("nngp", "ntk") if kfn.has_ntk else ("nngp",)
    # depth 0 has no activation (arcflow.kernels refuses an NTK request naming Sign even then)
    ref_kw = dict(depth=depth, activation=act.activation if depth else "relu", w_std=w, b_std=b_std or 0.0, get=get)
    for y in (x2, None):
        fused = arcflow.kernels(x1, y, **ref_kw)
        oracle = reference.kernels(x1, y, **ref_kw)
        numpy_path = reference_conv.evaluate(kfn._ops, x1, y, diag=False, want_nngp=True, want_ntk="ntk" in get)
        routed = kfn(x1, y, get=get)
        for f in get:
            assert rel_err(getattr(numpy_path, f), getattr(fused, f)) < 1e-10
            assert rel_err(getattr(numpy_path, f), getattr(oracle, f)) < 1e-12
            assert rel_err(getattr(routed, f), getattr(numpy_path, f)) < 1e-10
    d = reference_conv.evaluate(kfn._ops, x1, None, diag=True, want_nngp=True, want_ntk="ntk" in get)
    for f in get:
        assert rel_err(getattr(d, f), getattr(reference.kernels(x1, diag=True, **ref_kw), f)) < 1e-12
        assert rel_err(getattr(kfn.diag(x1, get=get), f), getattr(d, f)) < 1e-10


def test_fc_per_layer_stds_match_the_1x1_image_network():
    """Different W_std / b_std per layer (not arcflow.kernels' network): the same network written with 1x1 Conv
    layers on 1x1 images (the image path: Gram, conv, Flatten) gives the same kernels."""
    rng = np.random.default_rng(3)
    x1, x2 = rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    stds = [(1.2, 0.1), (0.8, None), (1.7, 0.4)]
    fc = stax.serial(stax.Dense(3, *stds[0]), stax.Erf(), stax.Dense(3, *stds[1]), stax.Relu(),
                     stax.Dense(1, *stds[2]))
    assert fc._route is None
    img = stax.serial(stax.Conv(3, (1, 1), W_std=stds[0][0], b_std=stds[0][1]), stax.Erf(),
                      stax.Conv(3, (1, 1), W_std=stds[1][0], b_std=stds[1][1]), stax.Relu(),
                      stax.Conv(3, (1, 1), W_std=stds[2][0], b_std=stds[2][1]), stax.Flatten())
    a, b = fc(x1, x2), img(x1[:, None, None, :], x2[:, None, None, :])
    for f in ("nngp", "ntk"):
        assert rel_err(getattr(a, f), getattr(b, f)) < 1e-13
    # and it is not the shared-std network (the per-layer stds are used)
    assert_differs(a.ntk, arcflow.kernels(x1, x2, depth=2, activation="relu", w_std=1.2, b_std=0.1).ntk)


def test_rectified_monomial_one_equals_relu_on_images():
    """Two different closed forms (arc-cosine J_1 and ABReLU's) on the same convolutional network."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 5, 5, 2))
    conv = [stax.Conv(4, (3, 3), padding="SAME", W_std=1.3, b_std=0.2)]
    a = stax.serial(*conv, stax.Relu(), stax.AvgPool((2, 2)), *conv, stax.RectifiedMonomial(1), stax.GlobalAvgPool())
    b = stax.serial(*conv, stax.Relu(), stax.AvgPool((2, 2)), *conv, stax.Relu(), stax.GlobalAvgPool())
    ka, kb = a(x), b(x)
    for f in ("nngp", "ntk"):
        assert rel_err(getattr(ka, f), getattr(kb, f)) < 1e-13


# --------------------------------------------------------------------------------------------------
# The kernel function object
# --------------------------------------------------------------------------------------------------
CNN = (stax.Conv(8, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), stax.Relu(), stax.AvgPool((2, 2), (2, 2)),
       stax.Conv(8, (3, 3), padding="CIRCULAR", W_std=1.4), stax.Erf(), stax.Flatten(), stax.Dense(1, 1.1, 0.2))


def test_get_forms_and_diag():
    kfn = stax.serial(*CNN)
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=(4, 6, 6, 2)), rng.normal(size=(3, 6, 6, 2))
    both = kfn(x1, x2)
    assert isinstance(both, arcflow.Kernels) and both.nngp.shape == (4, 3)
    np.testing.assert_array_equal(kfn(x1, x2, get="ntk"), both.ntk)
    rev = kfn(x1, x2, get=("ntk", "nngp"))
    assert rev._fields == ("ntk", "nngp")
    np.testing.assert_array_equal(rev.nngp, both.nngp)
    sym = kfn(x1)
    np.testing.assert_array_equal(sym.nngp, sym.nngp.T)
    np.testing.assert_array_equal(np.diag(sym.ntk), kfn.diag(x1, get="ntk"))
    # the symmetric call agrees with the general call on the same images (off the diagonal: same formulas)
    assert rel_err(kfn(x1, x1).ntk, sym.ntk) < 1e-13
    only = stax.serial(stax.Conv(2, (3, 3)), stax.Sign(), stax.GlobalAvgPool())
    assert not only.has_ntk
    k = only(x1)
    assert k.ntk is None and k.nngp.shape == (4, 4)


def test_numpy_recursion_blocks_of_pairs_give_the_same_numbers(monkeypatch):
    kfn = stax.serial(*CNN)
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=(5, 6, 6, 2)), rng.normal(size=(4, 6, 6, 2))

    def run(y):
        return reference_conv.evaluate(kfn._ops, x1, y, diag=False, want_nngp=True, want_ntk=True)

    whole, whole_sym = run(x2), run(None)
    per_pair = 8 * reference_conv._LIVE_ARRAYS * (6 * 6 + 6 * 2 + 4) ** 2
    monkeypatch.setattr(reference_conv, "BLOCK_BYTES", 3 * per_pair)   # a few pairs per block
    assert reference_conv._block_size(kfn._ops, (6, 6), "t") < 5
    small, small_sym = run(x2), run(None)
    for f in ("nngp", "ntk"):
        assert rel_err(getattr(small, f), getattr(whole, f)) < 1e-14
        assert rel_err(getattr(small_sym, f), getattr(whole_sym, f)) < 1e-14


def test_memory_check_names_the_function(monkeypatch):
    from arcflow import _dispatch
    monkeypatch.setattr(_dispatch, "available_memory", lambda: 1000)
    with pytest.raises(MemoryError, match=r"arcflow\.stax\.serial: the output .*pixel-pair buffers"):
        stax.serial(*CNN)(np.ones((2, 6, 6, 2)))


def test_repr_pickle_equality_immutability():
    kfn = stax.serial(*CNN)
    assert repr(kfn).startswith("arcflow.stax.serial(Conv(out_chan=8, filter_shape=(3, 3), strides=None, "
                                "padding='SAME', W_std=1.4, b_std=0.1), Relu(), AvgPool(")
    assert repr(stax.LeakyRelu(0.2)) == "LeakyRelu(alpha=0.2)"
    assert repr(stax.Dense(3)) == "Dense(out_dim=3, W_std=1.0, b_std=None)"
    assert eval("stax." + repr(stax.ABRelu(-1, 2))) == stax.ABRelu(-1.0, 2.0)
    back = pickle.loads(pickle.dumps(kfn))
    assert back == kfn and hash(back) == hash(kfn) and back is not kfn
    x = np.random.default_rng(2).normal(size=(3, 6, 6, 2))
    np.testing.assert_array_equal(back(x, get="ntk"), kfn(x, get="ntk"))
    assert kfn != stax.serial(*CNN[:-1], stax.Dense(1, 1.1, 0.3))
    assert stax.Conv(8, (3, 3), padding="same") == stax.Conv(8, [3, 3], padding="SAME")
    assert pickle.loads(pickle.dumps(stax.RectifiedMonomial(2))) == stax.RectifiedMonomial(2)
    with pytest.raises(AttributeError):
        kfn._layers = ()
    with pytest.raises(AttributeError):
        stax.Dense(3).W_std = 2.0
    assert arcflow.stax is stax


def test_widths_do_not_change_the_kernel():
    x = np.random.default_rng(4).normal(size=(3, 5, 5, 1))
    a = stax.serial(stax.Conv(1, (3, 3)), stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1))(x)
    b = stax.serial(stax.Conv(512, (3, 3)), stax.Relu(), stax.GlobalAvgPool(), stax.Dense(10))(x)
    np.testing.assert_array_equal(a.ntk, b.ntk)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers,match", [
    ((), "at least one layer"),
    ((stax.Dense(1), stax.Relu(), stax.Abs(), stax.Dense(1)), r"layer 2 \(Abs\(\)\): two activations in a row"),
    ((stax.Relu(), stax.Dense(1)), r"layer 0 \(Relu\(\)\): an activation needs a Dense or Conv"),
    ((stax.Conv(1, (3, 3)), stax.Flatten(), stax.Relu()), r"layer 2 .*Flatten does not keep"),
    ((stax.Conv(1, (3, 3)), stax.Flatten(), stax.Conv(1, (3, 3))), r"layer 2 \(Conv\(.*after the readout"),
    ((stax.Conv(1, (3, 3)), stax.GlobalAvgPool(), stax.AvgPool((2, 2))), r"layer 2 \(AvgPool.*after the readout"),
    ((stax.Conv(1, (3, 3)), stax.Flatten(), stax.GlobalAvgPool()), r"layer 2 .*second readout \(layer 1"),
    ((stax.Conv(1, (3, 3)), stax.Relu(), stax.Dense(1)), r"layer 2 \(Dense.*on images before the readout"),
    ((stax.Conv(1, (3, 3)), stax.Relu()), "needs a readout"),
    ((stax.Dense(1), "relu"), r"layer 1 is 'relu', not an arcflow.stax layer"),
])
def test_bad_layer_orders(layers, match):
    with pytest.raises((ValueError, TypeError), match=match):
        stax.serial(*layers)


@pytest.mark.parametrize("make,match", [
    (lambda: stax.Conv(1, (3, 3), strides=(2, 2)), "only stride 1"),
    (lambda: stax.Conv(1, (3, 3), padding="FULL"), "padding must be one of"),
    (lambda: stax.Conv(1, (3,)), "filter_shape must be two positive integers"),
    (lambda: stax.Conv(1, (0, 3)), "filter_shape must be two positive integers"),
    (lambda: stax.Conv(0, (3, 3)), "out_chan must be a positive integer"),
    (lambda: stax.Conv(1, (3, 3), W_std=-1.0), "W_std must be a finite number >= 0"),
    (lambda: stax.Dense(1, b_std=float("nan")), "b_std must be a finite number >= 0 or None"),
    (lambda: stax.Dense(1, W_std=None), "W_std must be"),
    (lambda: stax.AvgPool((2, 2), strides=(0, 1)), "strides must be two positive integers"),
    (lambda: stax.LeakyRelu(float("inf")), "alpha must be a finite real number"),
    (lambda: stax.RectifiedMonomial(1.5), "RectifiedMonomial: degree must be an integer"),
])
def test_bad_layer_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs():
    cnn = stax.serial(stax.Conv(1, (5, 5)), stax.Relu(), stax.Conv(1, (3, 3)), stax.Flatten())
    fc = stax.serial(stax.Dense(1), stax.Relu(), stax.Dense(1))
    img = np.ones((2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"arcflow\.stax\.serial: x1 must be images of shape \(n, H, W, C\)"):
        cnn(np.ones((2, 64)))
    with pytest.raises(ValueError, match=r"x1 must be 2-D \(n, d\).*add Conv layers"):
        fc(img)
    with pytest.raises(ValueError, match=r"layer 2 \(Conv\(.*at least 3 x 3 with VALID padding, but its input "
                                         r"is 2 x 2 \(from 6 x 6 images\)"):
        cnn(np.ones((2, 6, 6, 3)))
    with pytest.raises(ValueError, match=r"layer 0 .*at least 5 x 5"):
        cnn(np.ones((2, 4, 9, 3)))
    with pytest.raises(ValueError, match="x1 and x2 differ in channels"):
        cnn(img, np.ones((2, 8, 8, 2)))
    with pytest.raises(ValueError, match="x1 and x2 differ in shape"):
        cnn(img, np.ones((2, 9, 8, 3)))
    with pytest.raises(ValueError, match="x1 and x2 differ in shape"):
        fc(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="x2 contains NaN or infinite values"):
        cnn(img, np.full((1, 8, 8, 3), np.nan))
    with pytest.raises(TypeError, match="real numeric array"):
        fc(np.ones((2, 3), dtype=complex))
    with pytest.raises(ValueError, match="images are empty"):
        cnn(np.ones((2, 0, 8, 3)))
    sign = stax.serial(stax.Conv(1, (3, 3)), stax.Sign(), stax.GlobalAvgPool())
    with pytest.raises(ValueError, match=r"Sign\(\) has no NTK"):
        sign(img, get="ntk")
    with pytest.raises(ValueError, match="get must name"):
        cnn(img, get="cov")
    with pytest.raises(ValueError, match="get names a kernel twice"):
        cnn(img, get=("ntk", "ntk"))


# --------------------------------------------------------------------------------------------------
# Live neural-tangents (where jax imports)
# --------------------------------------------------------------------------------------------------


def test_live_against_neural_tangents():
    jax = import_nt()
    spec = importlib.util.spec_from_file_location(
        "make_nt_stax_golden", Path(__file__).resolve().parent / "make_nt_stax_golden.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(777)
        done = 0
        while done < 3:
            h, w, c = 6, 5, 2
            layers = gen.random_network(rng, h, w)
            if gen.sign_defect(layers):
                continue
            x1, x2 = rng.normal(size=(3, h, w, c)), rng.normal(size=(2, h, w, c))
            want = gen.nt_serial(layers)(x1, x2, ("nngp", "ntk"))
            kfn = stax.serial(*(_layer(n, kw) for n, kw in layers))
            got = kfn(x1, x2, get=("nngp", "ntk") if kfn.has_ntk else ("nngp",))
            assert rel_err(got.nngp, np.asarray(want.nngp)) <= TOL
            if kfn.has_ntk:
                assert rel_err(got.ntk, np.asarray(want.ntk)) <= TOL
            done += 1
    finally:
        jax.config.update("jax_enable_x64", previous)
