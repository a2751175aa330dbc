"""arcflow and arcflow.reference against neural-tangents 0.6.5 (SPEC.md: 1e-10 relative, float64).

The recorded numbers come from tests/make_nt_golden.py (tests/data/nt_golden.npz), so CI needs no jax.
Where arcflow and neural-tangents differ by more than 1e-10, the 50-digit recursion decides
(SPEC.md, numerical notes): arcflow must then match it, and neural-tangents must be the one that is off.
A live comparison runs only where neural-tangents imports.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import arcflow
from arcflow import activations as acts
from arcflow import reference

# Every test here runs with both layouts of the CPU layer loops (conftest.fc_layout).
pytestmark = pytest.mark.usefixtures("fc_layout")

TOL = 1e-10
GOLDEN = Path(__file__).resolve().parent / "data" / "nt_golden.npz"


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (SPEC.md's measure)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return float(np.max(np.abs(got - want), initial=0.0)) / (scale if scale > 0 else 1.0)


def _load():
    with np.load(GOLDEN, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        arrays = {k: z[k] for k in z.files if k != "meta"}
    return meta, arrays


META, ARRAYS = _load()
CASES = META["cases"]


def _case_id(c):
    name, args = c["activation"]
    label = name + ("(" + ",".join(f"{a:g}" for a in args) + ")" if args else "")
    return f"{c['key']}-{label}-depth{c['depth']}-{c['kind']}"


def _inputs(c):
    x1 = ARRAYS[c["key"] + "_x1"]
    x2 = ARRAYS.get(c["key"] + "_x2")
    return x1, x2


def _activation(c):
    name, args = c["activation"]
    return getattr(acts, name)(*args)


def _get(c):
    return ("nngp", "ntk") if c["has_ntk"] else ("nngp",)


def _check(got, want_nt, case_kwargs, x1, x2, field, mp_oracle, who):
    """got vs neural-tangents; beyond TOL the 50-digit recursion decides who is right."""
    err = rel_err(got, want_nt)
    if err <= TOL:
        return
    nngp_mp, ntk_mp = mp_oracle(x1, x2, need_ntk=(field == "ntk"), **case_kwargs)
    truth = nngp_mp if field == "nngp" else ntk_mp
    err_truth, err_nt = rel_err(got, truth), rel_err(want_nt, truth)
    assert err_truth <= TOL and err_nt > TOL, (
        f"{who} {field}: {err:.2e} from neural-tangents; 50-digit check: {who} off by "
        f"{err_truth:.2e}, neural-tangents off by {err_nt:.2e}")


# --------------------------------------------------------------------------------------------------
def test_golden_file_is_small_and_covers_the_acceptance_grid():
    assert GOLDEN.stat().st_size < 1_000_000
    assert META["versions"]["neural_tangents"] == "0.6.5"
    names = {c["activation"][0] for c in CASES}
    assert names == {"ReLU", "LeakyReLU", "ABReLU", "Abs", "Identity", "Erf", "Sign"}
    for name in names:
        general = [c for c in CASES if c["activation"][0] == name and c["kind"] == "general"]
        assert sorted(c["depth"] for c in general) == list(range(9))
        assert {c["kind"] for c in CASES if c["activation"][0] == name} == {
            "general", "symmetric", "zero_row"}
    for c in CASES:
        x1, x2 = _inputs(c)
        if x2 is not None:
            assert x1.shape[0] != x2.shape[0]
    assert any(c["b_std"] == 0 for c in CASES) and any(c["b_std"] > 0 for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_reference_matches_neural_tangents(case, mp_oracle):
    x1, x2 = _inputs(case)
    kw = dict(depth=case["depth"], activation=_activation(case), w_std=case["w_std"],
              b_std=case["b_std"])
    got = reference.kernels(x1, x2, get=_get(case), **kw)
    for field in _get(case):
        _check(getattr(got, field), ARRAYS[f"{case['key']}_{field}"], kw, x1, x2, field, mp_oracle,
               "reference")


def _engine_cases():
    for c in CASES:
        yield pytest.param(c, id=_case_id(c))


@pytest.mark.parametrize("case", list(_engine_cases()))
def test_arcflow_matches_neural_tangents(case, mp_oracle):
    if not hasattr(arcflow, "kernels"):
        pytest.skip("arcflow.kernels is not implemented yet (issue 2)")
    x1, x2 = _inputs(case)
    kw = dict(depth=case["depth"], activation=_activation(case), w_std=case["w_std"],
              b_std=case["b_std"])
    got = arcflow.kernels(x1, x2, get=_get(case), **kw)
    for field in _get(case):
        value = getattr(got, field)
        assert value.dtype == np.float64
        assert np.all(np.isfinite(value))
        _check(value, ARRAYS[f"{case['key']}_{field}"], kw, x1, x2, field, mp_oracle, "arcflow")


# --------------------------------------------------------------------------------------------------
def _import_nt():
    """neural-tangents, x64 on; skipped (never passed) where it does not import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jax = pytest.importorskip("jax")
        pytest.importorskip("neural_tangents")
    return jax


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "make_nt_golden", Path(__file__).resolve().parent / "make_nt_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_live_against_neural_tangents(mp_oracle):
    jax = _import_nt()
    gen = _load_generator()
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(12345)
        engines = [("reference", reference.kernels)]
        if hasattr(arcflow, "kernels"):
            engines.append(("arcflow", arcflow.kernels))
        for name, args in gen.activation_specs(rng):
            for _ in range(2):
                depth = int(rng.integers(0, 9))
                w_std, b_std = float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.0, 1.0))
                x1, x2 = rng.standard_normal((6, 3)), rng.standard_normal((4, 3))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    nngp_nt, ntk_nt = gen.nt_kernels(x1, x2, name, args, depth, w_std, b_std)
                kw = dict(depth=depth, activation=getattr(acts, name)(*args), w_std=w_std,
                          b_std=b_std)
                get = ("nngp",) if name in gen.NO_NTK else ("nngp", "ntk")
                for who, fn in engines:
                    got = fn(x1, x2, get=get, **kw)
                    _check(got.nngp, nngp_nt, kw, x1, x2, "nngp", mp_oracle, who)
                    if "ntk" in get:
                        _check(got.ntk, ntk_nt, kw, x1, x2, "ntk", mp_oracle, who)
    finally:
        jax.config.update("jax_enable_x64", previous)
