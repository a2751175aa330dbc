"""arcflow's i-RevNet and flow blocks against outputs recorded from PyTorch (tests/data/torch_golden.npz, made by
tests/invertible/make_torch_golden.py with torch 2.13), so CI compares with PyTorch without installing it.

The PyTorch weights load into arcflow through from_torch / load_state_dict (strict), and every recorded output
must be reproduced: forward outputs, the logits, the inverses (arcflow's inverse of PyTorch's output against
PyTorch's inverse and against the input) and the log-determinants (the closed forms, and for one small
sample the log|det J| that autograd computed). Tolerances are relative (Frobenius) errors: float64 1e-12,
float32 1e-5 (docs/mathematics.md §2: the inversion bounds)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _helpers.numeric import load_golden
from arcflow.invertible import ActNorm, AffineCoupling, InvertibleConv1x1, IRevNetBlock, Sequential, from_torch

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "torch_golden.npz"
TOL = {"float64": 1e-12, "float32": 1e-5}


META, ARRAYS = load_golden(GOLDEN)
CASES = {c["name"]: c for c in META["cases"]}


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape and np.isfinite(got).all()
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def state_dict(case):
    pre = f"{case['name']}/sd/"
    return {k: ARRAYS[pre + k] for k in case["state_dict"]}


def get(case, key):
    return ARRAYS[f"{case['name']}/{key}"]


def test_golden_file_is_small_and_complete():
    assert GOLDEN.stat().st_size < 1_000_000
    assert META["generator"].endswith("make_torch_golden.py") and META["versions"]["torch"].startswith("2.")
    kinds = {c["kind"] for c in META["cases"]}
    assert kinds == {"irevnet_block", "irevnet", "coupling", "actnorm", "conv1x1", "sequential"}
    nets = [c for c in META["cases"] if c["kind"] == "irevnet"]
    assert any(c["config"]["init_ds"] == 0 for c in nets) and any(c["config"]["init_ds"] == 2 for c in nets)
    for c in META["cases"]:
        if c["kind"] == "sequential":
            continue
        for dt in TOL:
            outs = [k for k in ARRAYS if k.startswith(f"{c['name']}/{dt}/")]
            assert outs, (c["name"], dt)
            for k in outs:
                assert ARRAYS[k].dtype == np.dtype(dt) and np.isfinite(ARRAYS[k]).all(), k


def _cases(kind):
    return [pytest.param(c, id=c["name"]) for c in META["cases"] if c["kind"] == kind]


@pytest.mark.parametrize("dt", list(TOL))
@pytest.mark.parametrize("case", _cases("irevnet_block"))
def test_irevnet_block_matches_torch(case, dt):
    cfg = case["config"]
    blk = IRevNetBlock(cfg["in_ch"], cfg["out_ch"], cfg["stride"], cfg["first"], cfg["mult"], cfg["affine_bn"],
                       rng=0, dtype=dt)
    from_torch(state_dict(case), blk, strict=True)
    assert set(blk.state_dict()) == set(case["state_dict"])
    x = get(case, "x").astype(dt)
    y = blk.forward(x)
    assert y.dtype == np.dtype(dt)
    assert rel(y, get(case, f"{dt}/y")) <= TOL[dt]
    xi = blk.inverse(get(case, f"{dt}/y"))
    assert rel(xi, get(case, f"{dt}/x_inv")) <= TOL[dt]
    assert rel(xi, x) <= TOL[dt]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dt", list(TOL))
@pytest.mark.parametrize("case", _cases("irevnet"))
def test_irevnet_matches_torch(case, dt, threads):
    cfg = dict(case["config"])
    net = from_torch(state_dict(case), **cfg, rng=0, dtype=dt)
    assert list(net.state_dict()) == case["state_dict"]
    assert net.num_parameters() == case["num_parameters"]
    x = get(case, "x").astype(dt)
    z = net.forward(x, threads=threads)
    assert z.dtype == np.dtype(dt)
    assert rel(z, get(case, f"{dt}/z")) <= TOL[dt]
    assert rel(net.classify(get(case, f"{dt}/z")), get(case, f"{dt}/logits")) <= TOL[dt]
    xi = net.inverse(get(case, f"{dt}/z"), threads=threads)
    assert rel(xi, get(case, f"{dt}/x_inv")) <= TOL[dt]
    assert rel(xi, x) <= TOL[dt]
    injective = any(b.injective for b in net.stack)
    assert injective == (cfg["init_ds"] == 0)  # the CIFAR-like net pads 3 channels; the other is bijective
    if not injective:
        np.testing.assert_array_equal(net.logdet(x), np.zeros(2, dt))


def _flow(case):
    cfg, sd = case["config"], state_dict(case)
    if case["kind"] == "coupling":
        blk = AffineCoupling(cfg["channels"], hidden=cfg["hidden"], clamp=cfg["clamp"], rng=0)
    elif case["kind"] == "actnorm":
        blk = ActNorm(cfg["channels"])
    else:
        blk = InvertibleConv1x1(cfg["channels"], rng=0)
    blk.load_state_dict(sd, strict=True)
    return blk


@pytest.mark.parametrize("dt", list(TOL))
@pytest.mark.parametrize("case", _cases("coupling") + _cases("actnorm") + _cases("conv1x1"))
def test_flow_block_matches_torch(case, dt):
    blk = _flow(case)
    x = get(case, "x").astype(dt)
    y, ld = blk.forward(x, return_logdet=True)
    assert y.dtype == np.dtype(dt) and ld.dtype == np.dtype(dt)
    assert rel(y, get(case, f"{dt}/y")) <= TOL[dt]
    assert rel(ld, get(case, f"{dt}/logdet")) <= TOL[dt]
    xi = blk.inverse(get(case, f"{dt}/y"))
    assert rel(xi, get(case, f"{dt}/x_inv")) <= TOL[dt]
    assert rel(xi, x) <= TOL[dt]


@pytest.mark.parametrize("case", _cases("coupling") + _cases("actnorm") + _cases("conv1x1"))
def test_flow_logdet_matches_autograd_jacobian(case):
    blk = _flow(case)
    x_small = np.ascontiguousarray(get(case, "x")[:1, :, :2, :2])
    np.testing.assert_allclose(blk.logdet(x_small)[0], case["autograd_logdet_small"], rtol=1e-10, atol=1e-12)


def test_flow_chain_matches_torch():
    case = CASES["chain"]
    seq = Sequential(*[_flow(CASES[name]) for name in case["blocks"]])
    y, ld = seq.forward(get(case, "x"), return_logdet=True)
    assert rel(y, get(case, "float64/y")) <= TOL["float64"]
    assert rel(ld, get(case, "float64/logdet")) <= TOL["float64"]
    assert rel(seq.inverse(get(case, "float64/y")), get(case, "x")) <= TOL["float64"]
