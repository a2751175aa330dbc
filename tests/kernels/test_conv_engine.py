"""The fused C++ engine behind arcflow.stax (cpp/src/cpu/conv_kernel.cpp): numbers, exactness, the call's options.

Oracles: arcflow.reference_conv (the exact float64 NumPy CNN-GP / CNTK, itself checked against neural-tangents in
test_stax.py); symmetries of the exact kernel (a circular network's GlobalAvgPool kernel is invariant under
circular shifts of one image); the engine's own float64 result for float32 inputs.
"""
from __future__ import annotations

import numpy as np
import pytest

import arcflow
from arcflow import _core, reference_conv, stax

from _helpers.numeric import rel_err
from _helpers.signals import interrupted

W = 1.5


def _conv(padding="SAME", f=(3, 3), b=0.1):
    return stax.Conv(4, f, padding=padding, W_std=W, b_std=b)


NETS = {
    "gap-relu": [_conv(), stax.Relu(), _conv(), stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1, W, 0.2)],
    "flatten-erf-valid": [_conv("VALID", (3, 2)), stax.Erf(), _conv("CIRCULAR", b=None), stax.Abs(), stax.Flatten()],
    "pool-mono2": [_conv(), stax.RectifiedMonomial(2), stax.AvgPool((2, 2), (2, 2), "SAME"), _conv("CIRCULAR"),
                   stax.LeakyRelu(0.3), stax.Flatten(), stax.Dense(1, W, 0.1), stax.Relu(), stax.Dense(1)],
    "pool-valid-abrelu": [_conv("VALID", (2, 3)), stax.ABRelu(-0.5, 1.2), stax.AvgPool((3, 2), (1, 2)), _conv(),
                          stax.Identity(), stax.GlobalAvgPool()],
    "pool-circular-erf": [_conv(), stax.Relu(), stax.AvgPool((2, 2), (1, 1), "CIRCULAR"), _conv("CIRCULAR", (2, 2)),
                          stax.Erf(), stax.GlobalAvgPool()],
    "sign-nngp": [_conv(), stax.Sign(), _conv(), stax.Relu(), stax.GlobalAvgPool()],
    "step-nngp": [_conv("CIRCULAR"), stax.RectifiedMonomial(0), _conv("VALID"), stax.Erf(), stax.Flatten()],
    "fc-per-layer": [stax.Dense(3, 1.2, 0.1), stax.Erf(), stax.Dense(3, 0.8), stax.Relu(), stax.Dense(1, 1.7, 0.4)],
    # ops before the first Conv / Dense, while Theta is still identically 0 (the engine skips its arrays)
    "pool-first": [stax.AvgPool((2, 2), padding="SAME"), _conv("CIRCULAR"), stax.Relu(), stax.Flatten()],
    "readout-first": [stax.AvgPool((2, 2)), stax.GlobalAvgPool(), stax.Dense(1, 1.2, 0.3), stax.Relu(),
                      stax.Dense(1)],
}


def _images(name, n, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)) if name.startswith("fc") else rng.normal(size=(n, 7, 6, 2))


@pytest.mark.parametrize("isa", _core._isa_levels())
@pytest.mark.parametrize("name", sorted(NETS))
def test_engine_equals_the_numpy_recursion(name, isa):
    kfn = stax.serial(*NETS[name])
    get = ("nngp", "ntk") if kfn.has_ntk else ("nngp",)
    x1, x2 = _images(name, 5, 0), _images(name, 4, 1)
    old = _core._fc_isa()
    _core._set_fc_isa(isa)
    try:
        got = {"cross": kfn(x1, x2, get=get), "sym": kfn(x1, get=get), "diag": kfn.diag(x1, get=get),
               "f32": kfn(x1.astype(np.float32), x2.astype(np.float32), get=get)}
    finally:
        _core._set_fc_isa(old)
    want = {"cross": reference_conv.evaluate(kfn._ops, x1, x2, diag=False, want_nngp=True, want_ntk=len(get) > 1),
            "sym": reference_conv.evaluate(kfn._ops, x1, None, diag=False, want_nngp=True, want_ntk=len(get) > 1),
            "diag": reference_conv.evaluate(kfn._ops, x1, None, diag=True, want_nngp=True, want_ntk=len(get) > 1)}
    want["f32"] = want["cross"]
    for f in get:
        for k in ("cross", "sym", "diag"):
            assert getattr(got[k], f).dtype == np.float64
            assert rel_err(getattr(got[k], f), getattr(want[k], f)) < 1e-13, (k, f)
        assert getattr(got["f32"], f).dtype == np.float32
        assert rel_err(getattr(got["f32"], f), getattr(want["f32"], f)) < 2e-6, f
        sym = getattr(got["sym"], f)
        np.testing.assert_array_equal(sym, sym.T)
        np.testing.assert_array_equal(np.diag(sym), getattr(got["diag"], f))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_identical_patches_are_exact(dtype):
    """A circular network's GlobalAvgPool kernel does not change when one image is shifted circularly:
    k(x, roll(x)) = k(x, x). The shifted pair meets every patch of x again at other positions, where the cosine
    must come out exactly 1 (an angle of ~sqrt(eps) there would move the ReLU NTK by ~1e-9)."""
    net = [_conv("CIRCULAR"), stax.Relu(), _conv("CIRCULAR", b=0.3), stax.Relu(), _conv("CIRCULAR"), stax.Relu(),
           stax.GlobalAvgPool(), stax.Dense(1, W, 0.1)]
    kfn = stax.serial(*net)
    x = np.random.default_rng(2).normal(size=(3, 6, 6, 2)).astype(dtype)
    shifted = np.roll(x, (2, 1), axis=(1, 2))
    diag = kfn.diag(x)
    ref = reference_conv.evaluate(kfn._ops, x.astype(np.float64), None, diag=True, want_nngp=True, want_ntk=True)
    tol = 1e-13 if dtype == np.float64 else 2e-6
    for f in ("nngp", "ntk"):
        assert rel_err(getattr(diag, f), getattr(ref, f)) < tol
    for y in (x.copy(), shifted):
        k = kfn(x, y)
        for f in ("nngp", "ntk"):
            got = np.diag(getattr(k, f))
            assert rel_err(got, getattr(diag, f)) < (4e-15 if dtype == np.float64 else 1e-6), f


def test_duplicate_images_give_the_diagonal_bit_for_bit():
    kfn = stax.serial(*NETS["pool-mono2"])
    x = _images("pool-mono2", 4, 3)
    k = kfn(x, x.copy())
    d = kfn.diag(x)
    for f in ("nngp", "ntk"):
        np.testing.assert_array_equal(np.diag(getattr(k, f)), getattr(d, f))


def test_zero_images_and_zero_patches():
    """Zero variance takes the pi/2 convention of the reference (cosine 0), also next to nonzero images."""
    kfn = stax.serial(*NETS["gap-relu"])
    x = _images("gap", 4, 4)
    x[1] = 0.0
    x[2, :3] = 0.0
    nobias = stax.serial(_conv(b=None), stax.Relu(), _conv(b=None), stax.Erf(), stax.Flatten())
    for net in (kfn, nobias):
        got, want = net(x), reference_conv.evaluate(net._ops, x, None, diag=False, want_nngp=True, want_ntk=True)
        for f in ("nngp", "ntk"):
            assert np.all(np.isfinite(getattr(got, f)))
            assert rel_err(getattr(got, f), getattr(want, f)) < 1e-13


def test_threads_blocks_and_out(monkeypatch, tmp_path):
    kfn = stax.serial(*NETS["gap-relu"])
    x1, x2 = _images("gap", 7, 5), _images("gap", 5, 6)
    one = kfn(x1, x2, threads=1)
    for threads in (2, 3):
        k = kfn(x1, x2, threads=threads)
        np.testing.assert_array_equal(k.ntk, one.ntk)
    monkeypatch.setattr(stax, "_WORK_PER_CALL", 1)  # one row per engine call
    rows = kfn(x1, x2, progress=True)
    np.testing.assert_array_equal(rows.nngp, one.nngp)
    sym_rows = kfn(x1)
    monkeypatch.undo()
    np.testing.assert_array_equal(sym_rows.ntk, kfn(x1).ntk)
    mm = np.lib.format.open_memmap(tmp_path / "ntk.npy", mode="w+", dtype=np.float64, shape=(7, 5))
    res = kfn(x1, x2, get="ntk", out=mm)
    assert res is mm
    np.testing.assert_array_equal(np.load(tmp_path / "ntk.npy"), one.ntk)
    both = {"nngp": np.empty((7, 5)), "ntk": np.empty((7, 5))}
    k = kfn(x1, x2, out=both)
    assert k.nngp is both["nngp"] and k.ntk is both["ntk"]
    with pytest.raises(ValueError, match=r"arcflow\.stax\.serial: out\['ntk'\] has shape"):
        kfn(x1, x2, get="ntk", out=np.empty((5, 7)))
    with pytest.raises(ValueError, match=r"arcflow\.stax\.serial: out\['ntk'\] has dtype"):
        kfn(x1.astype(np.float32), get="ntk", out=np.empty((7, 7)))
    with pytest.raises(ValueError, match="shares memory with the input x1"):
        kfn(x1, get="ntk", out=x1.reshape(-1)[:49].reshape(7, 7))
    with pytest.raises(ValueError, match="threads must be"):
        kfn(x1, threads=0)


@pytest.mark.parametrize("readout", [stax.Flatten, stax.GlobalAvgPool])
def test_tiles_of_pairs_cover_every_entry(monkeypatch, readout):
    # 16 x 16 images and two activations: the engine's pair tiles (about 256 KB of images and tables) are 5
    # images wide here, so 13 x 11 images take several tiles each way, and one-row blocks cut across them
    kfn = stax.serial(_conv(), stax.Relu(), _conv("CIRCULAR"), stax.Erf(), readout())
    rng = np.random.default_rng(11)
    x1, x2 = rng.normal(size=(13, 16, 16, 1)), rng.normal(size=(11, 16, 16, 1))
    want = {"cross": reference_conv.evaluate(kfn._ops, x1, x2, diag=False, want_nngp=True, want_ntk=True),
            "sym": reference_conv.evaluate(kfn._ops, x1, None, diag=False, want_nngp=True, want_ntk=True)}
    for work in (None, 1):
        if work is not None:
            monkeypatch.setattr(stax, "_WORK_PER_CALL", work)  # one row per engine call
        for threads in (1, 2):
            got = {"cross": kfn(x1, x2, threads=threads), "sym": kfn(x1, threads=threads)}
            for case, k in got.items():
                assert rel_err(k.nngp, want[case].nngp) < 1e-12, (case, work, threads)
                assert rel_err(k.ntk, want[case].ntk) < 1e-12, (case, work, threads)


def test_ctrl_c_stops_a_long_call():
    kfn = stax.serial(*[layer for _ in range(30) for layer in (_conv(), stax.Relu())], stax.GlobalAvgPool())
    x = np.random.default_rng(7).normal(size=(120, 12, 12, 1))
    out = np.zeros((120, 120))
    assert interrupted(lambda: kfn(x, get="nngp", out=out, threads=2), after=0.5)
    k = kfn(x[:3], get="nngp")  # the engine still works
    assert rel_err(k, reference_conv.evaluate(kfn._ops, x[:3], None, diag=False, want_nngp=True,
                                              want_ntk=False).nngp) < 1e-12


def test_overflow_is_a_floating_point_error_before_any_output():
    kfn = stax.serial(_conv(), stax.RectifiedMonomial(3), _conv(), stax.RectifiedMonomial(3), stax.Flatten())
    x = np.full((2, 5, 5, 1), 1e30)
    with pytest.raises(FloatingPointError, match=r"arcflow\.stax\.serial: .*float64 after op 3 \(activation\)"):
        kfn(x)
    with pytest.raises(FloatingPointError, match=r"float32"):
        kfn(np.full((2, 5, 5, 1), 1e12, np.float32), get="nngp")
    assert np.isfinite(kfn(np.full((2, 5, 5, 1), 1e12), get="nngp")).all()


def test_memory_error_names_the_buffers(monkeypatch):
    from arcflow import _dispatch
    monkeypatch.setattr(_dispatch, "available_memory", lambda: 10_000)
    with pytest.raises(MemoryError, match=r"arcflow\.stax\.serial: .*per-thread pixel-pair buffers"):
        stax.serial(*NETS["gap-relu"])(np.ones((2, 6, 6, 2)), threads=1)


def test_fc_network_with_per_layer_stds_matches_arcflow_kernels_when_they_agree():
    """The engine's 1 x 1 "image" path for rows, against the fused fully-connected engine (shared stds written as
    a network that does not take the fused route: a trailing Identity layer and Dense(W=1))."""
    rng = np.random.default_rng(8)
    x1, x2 = rng.normal(size=(6, 9)), rng.normal(size=(4, 9))
    layers = [stax.Dense(5, 1.3, 0.2), stax.Relu(), stax.Dense(5, 1.3, 0.2), stax.Relu(), stax.Dense(5, 1.3, 0.2),
              stax.Identity(), stax.Dense(1, 1.0)]
    kfn = stax.serial(*layers)
    assert kfn._route is None
    want = arcflow.kernels(x1, x2, depth=2, activation="relu", w_std=1.3, b_std=0.2)
    got = kfn(x1, x2)
    assert rel_err(got.nngp, want.nngp) < 1e-13
    # the NTK of the extra Identity + Dense(1.0) layer: Theta + Sigma
    assert rel_err(got.ntk, want.ntk + want.nngp) < 1e-13
