"""arcflow.kernel_fn: the same numbers as arcflow.kernels (and arcflow.reference), neural-tangents' calling
convention, validation at construction, repr, pickling and equality."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

import arcflow
from arcflow import activations as acts
from arcflow import reference

from _helpers.numeric import rel_err

PARAMS = [
    dict(depth=3, activation="relu", w_std=1.4, b_std=0.1),
    dict(depth=2, activation=acts.Erf(), w_std=1.2, b_std=0.3, fix_dep=1),
    dict(depth=1, activation=acts.LeakyReLU(0.2), w_std=0.9, b_std=0.0),
    dict(depth=0, activation="abs", w_std=1.1, b_std=0.5),
    dict(depth=4, activation=acts.ABReLU(-0.3, 1.7), w_std=0.9, b_std=0.2, fix_dep=4),
]


@pytest.mark.parametrize("p", PARAMS, ids=lambda p: f"{p['activation']}-{p['depth']}")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_equals_arcflow_kernels_and_the_reference(p, dtype):
    rng = np.random.default_rng(0)
    x1, x2 = rng.standard_normal((7, 4)).astype(dtype), rng.standard_normal((5, 4)).astype(dtype)
    kfn = arcflow.kernel_fn(**p)
    want = arcflow.kernels(x1, x2, **p)
    got = kfn(x1, x2)
    assert isinstance(got, arcflow.Kernels)
    np.testing.assert_array_equal(got.nngp, want.nngp)
    np.testing.assert_array_equal(got.ntk, want.ntk)
    assert got.ntk.dtype == dtype
    np.testing.assert_array_equal(kfn(x1, x2, "ntk"), want.ntk)
    np.testing.assert_array_equal(kfn(x1, get="nngp"), arcflow.kernels(x1, **p).nngp)
    sym = kfn(x1)
    np.testing.assert_array_equal(sym.ntk, arcflow.kernels(x1, **p).ntk)
    d = kfn.diag(x1)
    np.testing.assert_array_equal(d.nngp, arcflow.kernels(x1, diag=True, **p).nngp)
    np.testing.assert_array_equal(kfn.diag(x1, "ntk"), arcflow.kernels(x1, diag=True, **p).ntk)
    ref = reference.kernels(x1.astype(np.float64), x2.astype(np.float64), **p)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert rel_err(got.nngp, ref.nngp) < tol and rel_err(got.ntk, ref.ntk) < tol


def test_get_forms():
    x = np.random.default_rng(1).standard_normal((4, 3))
    kfn = arcflow.kernel_fn(depth=2)
    both = kfn(x, None, ("ntk", "nngp"))
    assert both._fields == ("ntk", "nngp")
    np.testing.assert_array_equal(both.ntk, kfn(x, get="ntk"))
    one = kfn(x, get=("ntk",))
    assert one._fields == ("ntk",)
    assert type(kfn(x, get=["nngp", "ntk"])) is arcflow.Kernels
    assert isinstance(kfn(x, get="nngp"), np.ndarray)
    # an activation without an NTK: get=None gives the NNGP and ntk=None
    step = arcflow.kernel_fn(depth=2, activation="step")
    k = step(x)
    assert k.ntk is None and k.nngp.shape == (4, 4)
    with pytest.raises(ValueError, match="arcflow.kernel_fn: .*has no NTK"):
        step(x, get="ntk")
    with pytest.raises(ValueError, match="arcflow.kernel_fn: get"):
        kfn(x, get="ntkgp")
    with pytest.raises(ValueError, match="arcflow.kernel_fn: get names a kernel twice"):
        kfn(x, get=("ntk", "ntk"))
    with pytest.raises(ValueError, match="arcflow.kernel_fn: x1 and x2 must have the same number of features"):
        kfn(x, x[:, :2])
    with pytest.raises(ValueError, match="arcflow.kernel_fn: x1 contains NaN"):
        kfn(np.full((2, 3), np.nan))


@pytest.mark.parametrize("p", PARAMS, ids=lambda p: f"{p['activation']}-{p['depth']}")
def test_repr_pickle_equality(p):
    kfn = arcflow.kernel_fn(**p)
    text = repr(kfn)
    assert text.startswith("arcflow.kernel_fn(depth=")
    ns = {"arcflow": arcflow, **{n: getattr(acts, n) for n in acts.__all__}}
    again = eval(text, ns)
    assert again == kfn and hash(again) == hash(kfn)
    back = pickle.loads(pickle.dumps(kfn))
    assert back == kfn and repr(back) == text
    x = np.random.default_rng(2).standard_normal((3, 2))
    np.testing.assert_array_equal(back(x, get="ntk"), kfn(x, get="ntk"))
    assert kfn.params() == {"depth": p["depth"], "activation": acts.resolve(p["activation"]),
                            "w_std": p["w_std"], "b_std": p["b_std"], "fix_dep": p.get("fix_dep", 0)}
    assert (kfn.depth, kfn.w_std, kfn.b_std, kfn.fix_dep) == (p["depth"], p["w_std"], p["b_std"],
                                                               p.get("fix_dep", 0))
    other = kfn.with_params(w_std=p["w_std"] + 0.5)
    assert other != kfn and other.w_std == p["w_std"] + 0.5 and other.depth == kfn.depth
    assert kfn.with_params() == kfn


def test_threads_and_device_are_kept():
    kfn = arcflow.kernel_fn(depth=1, threads=1, device="cpu")
    assert "threads=1" in repr(kfn) and "device='cpu'" in repr(kfn)
    assert pickle.loads(pickle.dumps(kfn)) == kfn
    assert kfn != arcflow.kernel_fn(depth=1)
    assert kfn.with_params(depth=2).threads == 1


def test_immutable():
    kfn = arcflow.kernel_fn()
    with pytest.raises(AttributeError, match="immutable"):
        kfn.depth = 3
    with pytest.raises(TypeError, match="unknown parameter"):
        kfn.with_params(width=3)


@pytest.mark.parametrize("kw, match", [
    (dict(depth=-1), "depth must be >= 0"),
    (dict(depth=1.5), "depth must be an integer"),
    (dict(activation="swish"), "unknown activation"),
    (dict(w_std=-1.0), "w_std must be a finite number >= 0"),
    (dict(b_std=float("nan")), "b_std must be a finite number >= 0"),
    (dict(w_std="1"), "w_std must be a real number"),
    (dict(depth=2, fix_dep=3), "fix_dep = 3 is larger than depth = 2"),
    (dict(threads=0), "threads must be between 1"),
    (dict(device="tpu"), "device must be one of"),
])
def test_bad_parameters_raise_at_construction(kw, match):
    with pytest.raises(ValueError, match=match) as info:
        arcflow.kernel_fn(**kw)
    assert str(info.value).startswith("arcflow.kernel_fn: ")


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_grads_are_the_derivatives_of_the_reference(get):
    """kfn.grads: the kernel and its w_std / b_std derivatives, against central differences of the NumPy
    reference (error ~ h^2 ~ 1e-10)."""
    x = np.random.default_rng(7).normal(size=(6, 3))
    kw = dict(depth=3, activation="erf", w_std=1.3, b_std=0.4)
    g = arcflow.kernel_fn(**kw).grads(x, get=get)
    h = 1e-5
    for name, d in (("w_std", g.d_w_std), ("b_std", g.d_b_std)):
        hi = getattr(reference.kernels(x, get=get, **{**kw, name: kw[name] + h}), get)
        lo = getattr(reference.kernels(x, get=get, **{**kw, name: kw[name] - h}), get)
        fd = (hi - lo) / (2 * h)
        assert np.max(np.abs(d - fd)) <= 1e-8 * np.max(np.abs(fd))
    both = arcflow.kernel_fn(**kw).grads(x)
    assert isinstance(both, arcflow.KernelGrads) and both.nngp is not None and both.ntk is not None
