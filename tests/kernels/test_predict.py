"""arcflow.predict against neural-tangents 0.6.5 (a golden file and, where it imports, live) and against an
independent dense oracle (scipy.linalg.expm and np.linalg.solve on the formulas).

The golden file (tests/kernels/make_nt_predict_golden.py) stores nt's kernels next to its predictions, so the prediction
layer is compared on nt's own kernels (1e-9), and end to end with arcflow.kernel_fn (1e-8; where the NTK of
the training set enters, nt's own NTK diagonal is off by up to 1e-8: see NT_NTK_DIAGONAL).
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

import arcflow
from arcflow import activations as acts
from arcflow import predict

from _helpers.numeric import assert_differs, import_nt, load_golden, rel_err

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "nt_predict_golden.npz"
META, ARRAYS = load_golden(GOLDEN)
CASES = META["cases"]
# Predictions from nt's own kernels. Measured worst 3.5e-10, in the deep linear (Identity) cases with a small
# absolute diag_reg, where a 40-digit evaluation of the formula puts nt itself 1.8e-10 off; elsewhere ~1e-14.
TOL_LAYER = 1e-9
TOL_E2E = 1e-8      # predictions from arcflow's kernels
# nt 0.6.5's NTK on the diagonal k(x, x) is off by up to ~7e-9 relative (arccos of a correlation rounded near 1;
# arcflow agrees with arcflow.reference there to 1e-15: test_nt_ntk_diagonal_defect). Predictions that
# depend on the NTK training kernel amplify it by the kernel's conditioning: measured worst 2.7e-8.
NT_NTK_DIAGONAL = 1e-7


def _t(t):
    return None if t is None else (np.inf if t == "inf" else np.asarray(t, dtype=np.float64))


def _get(g):
    return tuple(g) if isinstance(g, list) else g


def _names(get):
    return ("nngp", "ntk") if get is None else ((get,) if isinstance(get, str) else tuple(get))


def _field(out, get, g):
    return out if isinstance(get, str) else getattr(out, g)


def _case_kfn(c):
    name, args = c["activation"]
    return arcflow.kernel_fn(c["depth"], getattr(acts, name)(*args), c["w_std"], c["b_std"])


class _StoredKernels:
    """A neural-tangents-like kernel_fn that returns the golden file's nt kernels for the case's inputs;
    with ``ntk_diagonal`` the training NTK's diagonal is replaced by it."""

    def __init__(self, key, ntk_diagonal=None):
        self.key = key
        self.x_train, self.x_test = ARRAYS[key + "_x_train"], ARRAYS[key + "_x_test"]
        self.ntk_diagonal = ntk_diagonal
        self.calls = 0

    def __call__(self, x1, x2, get):
        if not isinstance(get, str):
            return arcflow.Kernels(*(self(x1, x2, g) if g in get else None for g in ("nngp", "ntk")))
        self.calls += 1
        if x2 is None:
            part = "dd" if x1 is self.x_train else "tt"
        else:
            assert x1 is self.x_test and x2 is self.x_train
            part = "td"
        k = ARRAYS[f"{self.key}_{get}_{part}"]
        if self.ntk_diagonal is not None and get == "ntk" and part == "dd":
            k = k.copy()
            k[np.diag_indices_from(k)] = self.ntk_diagonal
        return k


def _case_id(c):
    return f"{c['key']}-{c['kind']}"


ENSEMBLE = [c for c in CASES if c["kind"] == "ensemble"]


def test_golden_file_is_small_and_covers_the_grid():
    assert GOLDEN.stat().st_size < 400_000
    assert META["versions"]["neural_tangents"] == "0.6.5"
    acts_seen = {c["activation"][0] for c in ENSEMBLE}
    assert {"ReLU", "Erf", "LeakyReLU", "Abs"} <= acts_seen
    assert {c["depth"] for c in ENSEMBLE} == {1, 2, 3, 4}
    calls = [k for c in ENSEMBLE for k in c["calls"]]
    assert {str(k["t"]) for k in calls} >= {"None", "inf", "0.7", "[0.0, 0.3, 2.5]", "[[0.5], [4.0]]"}
    assert {k["compute_cov"] for k in calls} == {True, False}
    assert {k["x_test"] for k in calls} == {True, False}
    assert {str(k["get"]) for k in calls} >= {"nngp", "ntk", "None", "['ntk', 'nngp']"}
    assert {c["diag_reg"] > 0 for c in ENSEMBLE} == {True, False}
    assert {c["diag_reg_absolute_scale"] for c in ENSEMBLE} == {True, False}
    assert {c["learning_rate"] for c in ENSEMBLE} >= {1.0, 0.5, 3.0}
    assert {c["y_1d"] for c in ENSEMBLE} == {True, False}
    assert any(ARRAYS[c["key"] + "_y_train"].ndim == 2 and ARRAYS[c["key"] + "_y_train"].shape[1] > 1
               for c in ENSEMBLE)
    assert {c["kind"] for c in CASES} == {"ensemble", "gd", "gp"}


def _ensemble_errors(c, kernel_fn):
    """{(call, g, 'mean'/'cov'): (rel error, depends on the NTK training kernel)} for one golden case."""
    key = c["key"]
    pf = predict.gradient_descent_mse_ensemble(kernel_fn, ARRAYS[key + "_x_train"], ARRAYS[key + "_y_train"],
                                               c["learning_rate"], c["diag_reg"], c["diag_reg_absolute_scale"])
    errs = {}
    for j, call in enumerate(c["calls"]):
        get = _get(call["get"])
        x_test = ARRAYS[key + "_x_test"] if call["x_test"] else None
        out = pf(_t(call["t"]), x_test, get, call["compute_cov"])
        for g in _names(get):
            v = _field(out, get, g)
            mean, cov = (v.mean, v.covariance) if call["compute_cov"] else (v, None)
            want = ARRAYS[f"{key}_c{j}_{g}_mean"]
            assert mean.shape == want.shape and mean.dtype == np.float64
            errs[(j, g, "mean")] = (rel_err(mean, want), g == "ntk")
            if call["compute_cov"]:
                want = ARRAYS[f"{key}_c{j}_{g}_cov"]
                assert cov.shape == want.shape
                errs[(j, g, "cov")] = (rel_err(cov, want), g == "ntk")
    return errs


@pytest.mark.parametrize("case", ENSEMBLE, ids=_case_id)
def test_ensemble_on_nt_kernels(case):
    errs = _ensemble_errors(case, _StoredKernels(case["key"]))
    worst = max(errs.items(), key=lambda kv: kv[1][0])
    assert worst[1][0] <= TOL_LAYER, f"{case['key']} call {worst[0]}: {worst[1][0]:.2e} from neural-tangents"


@pytest.mark.parametrize("case", ENSEMBLE, ids=_case_id)
def test_ensemble_end_to_end_with_kernel_fn(case):
    """arcflow.kernel_fn through the predictor against nt's predictions: 1e-8, except where nt's NTK diagonal
    defect enters; there, the difference must vanish (1e-8) when nt's training NTK gets the diagonal of
    arcflow.reference (so the predictor is not what differs) and stay below NT_NTK_DIAGONAL."""
    kfn = _case_kfn(case)
    errs = _ensemble_errors(case, kfn)
    over = {what for what, (err, uses_ntk) in errs.items() if err > TOL_E2E}
    for what in over:
        err, uses_ntk = errs[what]
        assert uses_ntk and err <= NT_NTK_DIAGONAL, f"{case['key']} call {what}: {err:.2e} from neural-tangents"
    if over:
        x = ARRAYS[case["key"] + "_x_train"]
        diag = np.diag(arcflow.reference.kernels(x, **{k: v for k, v in kfn.params().items()
                                                        if k != "fix_dep"}).ntk)
        fixed = _ensemble_errors_against(case, kfn, _StoredKernels(case["key"], diag))
        for what in over:
            assert fixed[what] <= TOL_E2E, f"{case['key']} call {what}: {fixed[what]:.2e} from nt's corrected"


def _ensemble_errors_against(case, kernel_fn, oracle_kernel_fn):
    """{(call, g, 'mean'/'cov'): rel error} between arcflow.predict with two kernel functions."""
    key = case["key"]
    args = (ARRAYS[key + "_x_train"], ARRAYS[key + "_y_train"], case["learning_rate"], case["diag_reg"],
            case["diag_reg_absolute_scale"])
    pf, pf_oracle = (predict.gradient_descent_mse_ensemble(k, *args) for k in (kernel_fn, oracle_kernel_fn))
    errs = {}
    for j, call in enumerate(case["calls"]):
        get = _get(call["get"])
        x_test = ARRAYS[key + "_x_test"] if call["x_test"] else None
        a, b = (p(_t(call["t"]), x_test, get, call["compute_cov"]) for p in (pf, pf_oracle))
        for g in _names(get):
            va, vb = _field(a, get, g), _field(b, get, g)
            if call["compute_cov"]:
                errs[(j, g, "mean")] = rel_err(va.mean, vb.mean)
                errs[(j, g, "cov")] = rel_err(va.covariance, vb.covariance)
            else:
                errs[(j, g, "mean")] = rel_err(va, vb)
    return errs


def test_nt_ntk_diagonal_defect():
    """Why NT_NTK_DIAGONAL exists: off the diagonal arcflow's NTK equals nt's to 1e-13, on it nt is the one off
    (arcflow equals arcflow.reference there)."""
    diag_err = 0.0
    for c in ENSEMBLE:
        key = c["key"]
        kfn = _case_kfn(c)
        x = ARRAYS[key + "_x_train"]
        got, want = kfn(x, get="ntk"), ARRAYS[key + "_ntk_dd"]
        off = ~np.eye(len(x), dtype=bool)
        assert rel_err(got[off], want[off]) < 1e-13
        assert rel_err(kfn(ARRAYS[key + "_x_test"], x, "ntk"), ARRAYS[key + "_ntk_td"]) < 1e-13
        assert rel_err(kfn(x, get="nngp"), ARRAYS[key + "_nngp_dd"]) < 1e-13
        ref = arcflow.reference.kernels(x, **{k: v for k, v in kfn.params().items() if k != "fix_dep"}).ntk
        assert rel_err(np.diag(got), np.diag(ref)) < 1e-13
        diag_err = max(diag_err, rel_err(np.diag(got), np.diag(want)))
    assert 1e-10 < diag_err < 1e-8


@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] == "gd"], ids=_case_id)
def test_gradient_descent_mse_golden(case):
    key = case["key"]
    pf = predict.gradient_descent_mse(ARRAYS[key + "_k_dd"], ARRAYS[key + "_y_train"], case["learning_rate"],
                                      case["diag_reg"], case["diag_reg_absolute_scale"])
    for j, call in enumerate(case["calls"]):
        f0 = {"zero": 0.0, "array": ARRAYS[key + "_fx_train_0"], None: None}[call["fx_train_0"]]
        ft0 = ARRAYS[key + "_fx_test_0"] if call["fx_test_0"] == "array" else None
        res = pf(_t(call["t"]), f0, ft0, ARRAYS[key + "_k_td"] if ft0 is not None else None)
        if f0 is not None and ft0 is not None:
            fields = dict(fx_train=res[0], fx_test=res[1])
        elif ft0 is not None:
            fields = dict(fx_test=res)
        else:
            fields = dict(fx_train=res)
        assert {f"{key}_c{j}_{k}" for k in fields} == {k for k in ARRAYS if k.startswith(f"{key}_c{j}_")}
        for name, v in fields.items():
            want = ARRAYS[f"{key}_c{j}_{name}"]
            assert v.shape == want.shape
            assert rel_err(v, want) <= TOL_LAYER, f"{key} call {j} {name}"


@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] == "gp"], ids=_case_id)
def test_gp_inference_golden(case):
    key = case["key"]
    kernels = {part: arcflow.Kernels(ARRAYS[f"{key}_nngp_{part}"], ARRAYS[f"{key}_ntk_{part}"])
               for part in ("dd", "td", "tt")}
    pf = predict.gp_inference(kernels["dd"], ARRAYS[key + "_y_train"], case["diag_reg"],
                              case["diag_reg_absolute_scale"])
    for j, call in enumerate(case["calls"]):
        get = _get(call["get"])
        k_tt = (kernels["tt"] if call["test"] else True) if call["cov"] else None
        out = pf(get, kernels["td"] if call["test"] else None, k_tt)
        for g in _names(get):
            v = _field(out, get, g)
            mean, cov = (v.mean, v.covariance) if call["cov"] else (v, None)
            assert rel_err(mean, ARRAYS[f"{key}_c{j}_{g}_mean"]) <= TOL_LAYER, f"{key} call {j} {g} mean"
            if call["cov"]:
                want = ARRAYS[f"{key}_c{j}_{g}_cov"]
                # nt's covariance of the training set is exactly zero
                assert (rel_err(cov, want) if np.abs(want).max() > 0 else np.abs(cov).max()) <= TOL_LAYER


# --------------------------------------------------------------------------------------------------
# Oracle 2: the formulas, densely (matrix exponential and linear solves), on small random problems.
def _problem(rng, n=9, m=4, d=3, k=2, dtype=np.float64, activation="erf"):
    x = rng.standard_normal((n, d)).astype(dtype)
    xt = rng.standard_normal((m, d)).astype(dtype)
    y = rng.standard_normal((n, k)).astype(dtype) if k else rng.standard_normal(n).astype(dtype)
    kfn = arcflow.kernel_fn(depth=2, activation=activation, w_std=1.3, b_std=0.2)
    return kfn, x, xt, y


def _dense(kfn, x, xt, y, t, g, lr, reg, absolute, test, cov):
    """The mean and covariance by expm and solve, in float64, from the same kernels (as arrays)."""
    k = {h: np.asarray(kfn(x, get=h), np.float64) for h in ("nngp", "ntk")}
    kt = {h: np.asarray(kfn(xt, x, get=h), np.float64) for h in ("nngp", "ntk")} if test else k
    ktt = np.asarray(kfn(xt, get="nngp"), np.float64) if test else k["nngp"]
    y2 = np.asarray(y, np.float64).reshape(len(x), -1)
    n = len(x)
    kg = k[g] + reg * (1.0 if absolute else np.trace(k[g]) / n) * np.eye(n)
    tau = np.inf if t is None else t * lr / y2.size
    if np.isinf(tau):
        decay = np.eye(n)
    else:
        decay = np.eye(n) - scipy.linalg.expm(-kg * tau)
    if not test:
        mean = decay @ y2
        if t is None:
            return y2, (np.zeros((n, n)) if cov else None)
        e = np.zeros((n, n)) if np.isinf(tau) else scipy.linalg.expm(-kg * tau)
        if g == "nngp":
            c = kg @ e @ e
        else:
            c = e @ k["nngp"] @ e.T
        return mean, c
    a = kt[g] @ np.linalg.solve(kg, decay)                               # (m, n)
    mean = a @ y2
    if not cov:
        return mean, None
    if g == "nngp":
        decay2 = np.eye(n) if np.isinf(tau) else np.eye(n) - scipy.linalg.expm(-2 * kg * tau)
        return mean, ktt - kt["nngp"] @ np.linalg.solve(kg, decay2) @ kt["nngp"].T
    b = a @ kt["nngp"].T
    return mean, ktt + a @ k["nngp"] @ a.T - b - b.T


def _with_fallback(request, monkeypatch):
    if request.param == "numpy":
        monkeypatch.setattr(predict, "_scipy_linalg", lambda: None)
    return request.param


@pytest.fixture(params=["scipy", "numpy"])
def linalg(request, monkeypatch):
    """Each dense-oracle test runs with scipy.linalg and with the NumPy fallback."""
    return _with_fallback(request, monkeypatch)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("g", ["nngp", "ntk"])
@pytest.mark.parametrize("t", [None, 0.0, 0.4, 3.0, np.inf])
@pytest.mark.parametrize("test", [True, False])
def test_ensemble_against_dense_oracle(linalg, dtype, g, t, test):
    rng = np.random.default_rng(hash((g, str(t), test)) % 2**32)
    kfn, x, xt, y = _problem(rng, dtype=dtype)
    lr, reg, absolute = 0.7, 1e-3, bool(rng.integers(0, 2))
    pf = predict.gradient_descent_mse_ensemble(kfn, x, y, learning_rate=lr, diag_reg=reg,
                                               diag_reg_absolute_scale=absolute)
    out = pf(t, xt if test else None, g, compute_cov=True)
    mean, cov = _dense(kfn, x, xt, y, t, g, lr, reg, absolute, test, cov=True)
    assert out.mean.dtype == dtype and out.covariance.dtype == dtype
    tol = 1e-11 if dtype == np.float64 else 1e-5
    assert rel_err(out.mean, mean) <= tol
    scale = max(np.abs(cov).max(), 1e-3 * np.abs(kfn(x, get="nngp")).max())
    assert np.abs(out.covariance - cov).max() <= tol * scale
    mean_only = pf(t, xt if test else None, g)
    np.testing.assert_array_equal(mean_only, out.mean)


def test_array_of_times_stacks_along_leading_axes(linalg):
    kfn, x, xt, y = _problem(np.random.default_rng(3), k=3)
    pf = predict.gradient_descent_mse_ensemble(kfn, x, y, diag_reg=1e-4)
    ts = np.array([[0.0, 0.5, 2.0], [7.0, 30.0, np.inf]])
    out = pf(ts, xt, ("ntk", "nngp"), compute_cov=True)
    assert type(out).__name__ == "Gaussians" and out._fields == ("ntk", "nngp")
    assert out.ntk.mean.shape == (2, 3, len(xt), 3) and out.ntk.covariance.shape == (2, 3, len(xt), len(xt))
    for idx in np.ndindex(ts.shape):
        one = pf(float(ts[idx]), xt, "ntk", compute_cov=True)
        np.testing.assert_allclose(out.ntk.mean[idx], one.mean, rtol=0, atol=1e-13)
        np.testing.assert_allclose(out.ntk.covariance[idx], one.covariance, rtol=0, atol=1e-13)
        want, _ = _dense(kfn, x, xt, y, float(ts[idx]), "ntk", 1.0, 1e-4, False, True, False)
        assert rel_err(one.mean, want) < 1e-11
    # t = 0: the prior mean; t = inf by the eigenbasis equals t=None by the Cholesky solve
    np.testing.assert_allclose(out.ntk.mean[0, 0], 0.0, atol=1e-14)
    assert rel_err(out.ntk.mean[1, 2], pf(None, xt, "ntk")) < 1e-10
    assert rel_err(out.nngp.covariance[1, 2], pf(None, xt, "nngp", True).covariance) < 1e-9


def test_one_dimensional_targets_match_a_single_column(linalg):
    kfn, x, xt, y = _problem(np.random.default_rng(4), k=1)
    pf1 = predict.gradient_descent_mse_ensemble(kfn, x, y[:, 0], diag_reg=1e-4)
    pf2 = predict.gradient_descent_mse_ensemble(kfn, x, y, diag_reg=1e-4)
    for t in (None, 1.5, [1.0, 2.0]):
        a, b = pf1(t, xt, "ntk", True), pf2(t, xt, "ntk", True)
        assert a.mean.shape == b.mean.shape[:-1]
        np.testing.assert_array_equal(a.mean, b.mean[..., 0])
        np.testing.assert_array_equal(a.covariance, b.covariance)


def test_gradient_descent_mse_against_dense_oracle(linalg):
    rng = np.random.default_rng(5)
    kfn, x, xt, y = _problem(rng, k=2)
    k_dd, k_td = kfn(x, get="ntk"), kfn(xt, x, get="ntk")
    fx0, ft0 = rng.standard_normal(y.shape), rng.standard_normal((len(xt), 2))
    lr, n = 2.0, len(x)
    pf = predict.gradient_descent_mse(k_dd, y, learning_rate=lr)
    for t in (0.0, 0.3, 4.0):
        e = scipy.linalg.expm(-k_dd * t * lr / y.size)
        fx_train, fx_test = pf(t, fx0, ft0, k_td)
        assert rel_err(fx_train, fx0 + (e - np.eye(n)) @ (fx0 - y)) < 1e-11
        assert rel_err(fx_test, ft0 + k_td @ np.linalg.solve(k_dd, (np.eye(n) - e) @ (y - fx0))) < 1e-10
        assert rel_err(pf(t), (np.eye(n) - e) @ y) < 1e-11                 # fx_train_0 = 0
        only_test = pf(t, None, ft0, k_td)
        assert rel_err(only_test, ft0 + k_td @ np.linalg.solve(k_dd, (np.eye(n) - e) @ y)) < 1e-10
    fx_train, fx_test = pf(None, fx0, ft0, k_td)
    np.testing.assert_array_equal(fx_train, y)
    assert rel_err(fx_test, ft0 + k_td @ np.linalg.solve(k_dd, y - fx0)) < 1e-11
    ts = [0.5, 1.0]
    fx_train, fx_test = pf(ts, 0.0, ft0, k_td)
    assert fx_train.shape == (2,) + y.shape and fx_test.shape == (2,) + ft0.shape


def test_gp_inference_against_dense_oracle(linalg):
    rng = np.random.default_rng(6)
    kfn, x, xt, y = _problem(rng, k=3)
    kdd, ktd, ktt = kfn(x), kfn(xt, x), kfn(xt)
    pf = predict.gp_inference(kdd, y, diag_reg=1e-3, diag_reg_absolute_scale=True)
    out = pf(("nngp", "ntk", "ntkgp"), ktd, ktt)
    reg = 1e-3 * np.eye(len(x))
    kn, kt = kdd.nngp + reg, kdd.ntk + reg
    assert rel_err(out.nngp.mean, ktd.nngp @ np.linalg.solve(kn, y)) < 1e-11
    assert rel_err(out.nngp.covariance, ktt.nngp - ktd.nngp @ np.linalg.solve(kn, ktd.nngp.T)) < 1e-10
    a = ktd.ntk @ np.linalg.inv(kt)
    b = a @ ktd.nngp.T
    assert rel_err(out.ntk.mean, a @ y) < 1e-11
    assert rel_err(out.ntk.covariance, ktt.nngp + a @ kdd.nngp @ a.T - b - b.T) < 1e-10
    assert rel_err(out.ntkgp.covariance, ktt.ntk - ktd.ntk @ np.linalg.solve(kt, ktd.ntk.T)) < 1e-10
    # a single array serves every get, for the means and the NNGP-style covariances
    pf1 = predict.gp_inference(kdd.nngp, y, diag_reg=1e-3, diag_reg_absolute_scale=True)
    np.testing.assert_allclose(pf1("nngp", ktd.nngp, ktt.nngp).covariance, out.nngp.covariance, atol=1e-13)


def test_max_learning_rate(linalg):
    rng = np.random.default_rng(7)
    kfn, x, _, _ = _problem(rng)
    k = kfn(x, get="ntk")
    top = np.linalg.eigvalsh(k)[-1]
    assert predict.max_learning_rate(k) == pytest.approx(2 * len(x) / (top + 1e-12), rel=1e-12)
    assert predict.max_learning_rate(k, y_train_size=30, momentum=0.5) == pytest.approx(
        2 * 1.5 * 30 / (top + 1e-12), rel=1e-12)


# --------------------------------------------------------------------------------------------------
def test_one_factorisation_per_kernel_and_kind(monkeypatch):
    calls = {"cholesky": 0, "eigh": 0}
    real_chol, real_eigh = predict._cholesky, predict._eigh

    def chol(a):
        calls["cholesky"] += 1
        return real_chol(a)

    def eigh(a):
        calls["eigh"] += 1
        return real_eigh(a)

    monkeypatch.setattr(predict, "_cholesky", chol)
    monkeypatch.setattr(predict, "_eigh", eigh)
    rng = np.random.default_rng(8)
    kfn, x, xt, y = _problem(rng)
    pf = predict.gradient_descent_mse_ensemble(kfn, x, y, diag_reg=1e-4)
    for xtest in (xt, rng.standard_normal((6, 3)), None):
        pf(None, xtest, "ntk")
        pf(None, xtest, "ntk", compute_cov=True)
    assert calls == {"cholesky": 1, "eigh": 0}
    for t in (0.5, [1.0, 2.0], np.inf):
        for xtest in (xt, rng.standard_normal((6, 3)), None):
            pf(t, xtest, "ntk", compute_cov=True)
    assert calls == {"cholesky": 1, "eigh": 1}
    pf(None, xt, None)
    pf(2.0, xt, ("nngp", "ntk"), True)
    assert calls == {"cholesky": 2, "eigh": 2}       # the NNGP's factors, once each
    gp = predict.gp_inference(kfn(x), y, diag_reg=1e-4)
    for _ in range(3):
        gp(None, kfn(xt, x), kfn(xt))
    assert calls == {"cholesky": 4, "eigh": 2}
    gd = predict.gradient_descent_mse(kfn(x, get="ntk"), y)
    for t in (None, 1.0, None, [2.0, 3.0]):
        gd(t, 0.0, np.zeros((len(xt), 2)), kfn(xt, x, "ntk"))
    assert calls == {"cholesky": 5, "eigh": 3}


def test_kernel_fn_is_called_once_per_kernel_set():
    rng = np.random.default_rng(9)
    _, x, xt, y = _problem(rng)
    kfn = arcflow.kernel_fn(depth=2, w_std=1.3, b_std=0.2)
    seen = []

    def counting(x1, x2, get):
        seen.append((x1 is x, x2 is None, get))
        return kfn(x1, x2, get)

    pf = predict.gradient_descent_mse_ensemble(counting, x, y, diag_reg=1e-4)
    pf(None, xt, None, compute_cov=True)
    assert seen[0] == (True, True, ("nngp", "ntk"))        # the training kernels in one pass
    n_train = sum(1 for a, b, _ in seen if a and b)
    pf(None, xt, None, compute_cov=True)
    assert sum(1 for a, b, _ in seen if a and b) == n_train   # cached


def test_user_kernels_are_not_modified():
    rng = np.random.default_rng(10)
    kfn, x, xt, y = _problem(rng)
    k = kfn(x, get="ntk")
    k_copy, y_copy = k.copy(), y.copy()
    pf = predict.gradient_descent_mse(k, y, diag_reg=1e-3)
    pf(None, 0.0, np.zeros((len(xt), 2)), kfn(xt, x, "ntk"))
    pf(1.0, 0.0, np.zeros((len(xt), 2)), kfn(xt, x, "ntk"))
    kk = kfn(x)
    kk_copy = arcflow.Kernels(kk.nngp.copy(), kk.ntk.copy())
    predict.gp_inference(kk, y, diag_reg=1e-3)(None, kfn(xt, x), kfn(xt))
    np.testing.assert_array_equal(k, k_copy)
    np.testing.assert_array_equal(y, y_copy)
    np.testing.assert_array_equal(kk.nngp, kk_copy.nngp)
    np.testing.assert_array_equal(kk.ntk, kk_copy.ntk)


def test_results_do_not_depend_on_call_order():
    """The in-place factorisation of the ensemble's own kernels: later calls that need them recompute them."""
    rng = np.random.default_rng(11)
    kfn, x, xt, y = _problem(rng)
    calls = [(None, xt, "ntk", False), (1.0, xt, "ntk", True), (None, xt, None, True), (2.0, None, "ntk", True),
             (None, xt, "nngp", True), (0.5, xt, ("nngp", "ntk"), True)]
    fresh = [predict.gradient_descent_mse_ensemble(kfn, x, y, diag_reg=1e-4)(*c) for c in calls]
    pf = predict.gradient_descent_mse_ensemble(kfn, x, y, diag_reg=1e-4)
    for c, want in reversed(list(zip(calls, fresh))):
        got = _leaves(pf(*c))
        want = _leaves(want)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def _leaves(r):
    return [r] if isinstance(r, np.ndarray) else [a for v in r for a in _leaves(v)]


def test_get_forms_and_types():
    kfn, x, xt, y = _problem(np.random.default_rng(12))
    pf = predict.gradient_descent_mse_ensemble(kfn, x, y, diag_reg=1e-4)
    assert isinstance(pf(None, xt, "nngp"), np.ndarray)
    both = pf(None, xt)
    assert both._fields == ("nngp", "ntk")
    g = pf(1.0, xt, "NTK", compute_cov=True)
    assert isinstance(g, predict.Gaussian) and g._fields == ("mean", "covariance")
    assert_differs(both.nngp, both.ntk, what="nngp and ntk means")
    back = pickle.loads(pickle.dumps(g))
    np.testing.assert_array_equal(back.mean, g.mean)


# --------------------------------------------------------------------------------------------------
# Bad input: clear exceptions naming the function.
def test_bad_inputs_ensemble():
    kfn, x, xt, y = _problem(np.random.default_rng(13))
    E = "gradient_descent_mse_ensemble"
    with pytest.raises(ValueError, match=f"{E}.*x_train has 9 rows but y_train has 8"):
        predict.gradient_descent_mse_ensemble(kfn, x, y[:-1])
    with pytest.raises(ValueError, match=f"{E}.*y_train contains NaN"):
        predict.gradient_descent_mse_ensemble(kfn, x, np.where(np.arange(9)[:, None] == 3, np.nan, y))
    with pytest.raises(ValueError, match=f"{E}.*y_train must have shape"):
        predict.gradient_descent_mse_ensemble(kfn, x, y[:, :, None])
    with pytest.raises(ValueError, match=f"{E}.*learning_rate"):
        predict.gradient_descent_mse_ensemble(kfn, x, y, learning_rate=-1.0)
    with pytest.raises(ValueError, match=f"{E}.*diag_reg"):
        predict.gradient_descent_mse_ensemble(kfn, x, y, diag_reg=float("nan"))
    with pytest.raises(ValueError, match=f"{E}.*trace_axes"):
        predict.gradient_descent_mse_ensemble(kfn, x, y, trace_axes=(0,))
    with pytest.raises(TypeError, match=f"{E}.*kernel_fn must be callable"):
        predict.gradient_descent_mse_ensemble(3, x, y)
    pf = predict.gradient_descent_mse_ensemble(kfn, x, y, diag_reg=1e-4)
    with pytest.raises(ValueError, match=f"{E}.*t must be >= 0"):
        pf(-1.0, xt)
    with pytest.raises(ValueError, match=f"{E}.*t must be >= 0"):
        pf([1.0, -0.5], xt)
    with pytest.raises(ValueError, match=f"{E}.*t contains NaN"):
        pf(np.nan, xt)
    with pytest.raises(ValueError, match=f"{E}.*get"):
        pf(None, xt, "ntkgp")
    with pytest.raises(ValueError, match=f"{E}.*get"):
        pf(None, xt, ("ntk", "ntk"))
    with pytest.raises(ValueError, match=f"{E}.*get"):
        pf(None, xt, ())
    with pytest.raises(TypeError, match=f"{E}.*compute_cov"):
        pf(None, xt, "ntk", "yes")
    with pytest.raises(ValueError, match="x1 and x2 must have the same number of features"):
        pf(None, xt[:, :2], "ntk")

    def bad_kernel(x1, x2, get):
        k = kfn(x1, x2, get)
        return k[:, :-1] if isinstance(k, np.ndarray) else k

    with pytest.raises(ValueError, match=f"{E}.*kernel_fn.*must have shape"):
        predict.gradient_descent_mse_ensemble(bad_kernel, x, y)(None, xt, "ntk")

    def nan_kernel(x1, x2, get):
        k = np.array(kfn(x1, x2, get))
        k[0, 0] = np.nan
        return k

    with pytest.raises(ValueError, match=f"{E}.*NaN"):
        predict.gradient_descent_mse_ensemble(nan_kernel, x, y)(None, xt, "ntk")


def test_not_positive_definite_names_diag_reg(linalg):
    rng = np.random.default_rng(14)
    x = rng.standard_normal((6, 3))
    x = np.concatenate([x, x[:2]])                       # duplicated inputs: a singular kernel
    y = rng.standard_normal((8, 1))
    kfn = arcflow.kernel_fn(depth=2, b_std=0.1)
    pf = predict.gradient_descent_mse_ensemble(kfn, x, y)
    with pytest.raises(ValueError, match="gradient_descent_mse_ensemble: the training kernel .* diag_reg"):
        pf(None, x[:3], "ntk")
    with pytest.raises(ValueError, match="gradient_descent_mse_ensemble: the training kernel .* diag_reg"):
        pf(np.inf, x[:3], "nngp")
    # finite t is defined for a positive semi-definite kernel (the limit tau of (1 - e^{-lam tau}) / lam)
    out = pf(1.0, x[:3], "ntk")
    assert np.all(np.isfinite(out))
    assert np.all(np.isfinite(predict.gradient_descent_mse_ensemble(kfn, x, y, diag_reg=1e-6)(None, x[:3])))
    k = kfn(x, get="nngp")
    with pytest.raises(ValueError, match="gp_inference: the training kernel .* diag_reg"):
        predict.gp_inference(k, y)("nngp", kfn(x[:2], x, "nngp"))
    with pytest.raises(ValueError, match="gradient_descent_mse: the training kernel .* diag_reg"):
        predict.gradient_descent_mse(k, y)(None, 0.0, np.zeros((2, 1)), kfn(x[:2], x, "nngp"))
    indefinite = np.diag([1.0, 2.0, -1.0])
    with pytest.raises(ValueError, match="gradient_descent_mse: the training kernel .* not positive semi-definite"):
        predict.gradient_descent_mse(indefinite, np.ones(3))(1.0)


def test_bad_inputs_gd_and_gp():
    kfn, x, xt, y = _problem(np.random.default_rng(15))
    k, ktd = kfn(x, get="ntk"), kfn(xt, x, get="ntk")
    G = "gradient_descent_mse"
    with pytest.raises(ValueError, match=f"{G}.*k_train_train must have shape \\(8, 8\\)"):
        predict.gradient_descent_mse(k, y[:-1])
    with pytest.raises(ValueError, match=f"{G}.*k_train_train contains NaN"):
        predict.gradient_descent_mse(np.where(np.eye(9) > 0, np.inf, k), y)
    pf = predict.gradient_descent_mse(k, y)
    with pytest.raises(ValueError, match=f"{G}.*both None"):
        pf(1.0, None, None)
    with pytest.raises(ValueError, match=f"{G}.*need k_test_train"):
        pf(1.0, 0.0, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=f"{G}.*k_test_train must have shape"):
        pf(1.0, 0.0, np.zeros((4, 2)), ktd[:, :-1])
    with pytest.raises(ValueError, match=f"{G}.*fx_test_0 has shape"):
        pf(1.0, 0.0, np.zeros((5, 2)), ktd)
    with pytest.raises(ValueError, match=f"{G}.*fx_train_0 contains NaN"):
        pf(1.0, np.full(y.shape, np.nan))
    with pytest.raises(ValueError, match=f"{G}.*t must be >= 0"):
        pf(-2.0)
    P = "gp_inference"
    gp = predict.gp_inference(kfn(x), y)
    with pytest.raises(ValueError, match=f"{P}.*get"):
        gp("gauss", kfn(xt, x))
    with pytest.raises(ValueError, match=f"{P}.*NTK covariance .* needs the NNGP"):
        predict.gp_inference(k, y)("ntk", ktd, kfn(xt, get="nngp"))
    with pytest.raises(ValueError, match=f"{P}.*k_test_test \\(nngp\\) must have shape"):
        gp("nngp", kfn(xt, x), kfn(x))
    with pytest.raises(ValueError, match=f"{P}.*k_test_train \\(ntk\\) must have shape"):
        gp("ntk", kfn(xt, xt))
    M = "max_learning_rate"
    with pytest.raises(ValueError, match=f"{M}.*square"):
        predict.max_learning_rate(ktd)
    with pytest.raises(ValueError, match=f"{M}.*NaN"):
        predict.max_learning_rate(np.full((2, 2), np.nan))


def test_float32_in_float32_out():
    kfn, x, xt, y = _problem(np.random.default_rng(16), dtype=np.float32)
    pf = predict.gradient_descent_mse_ensemble(kfn, x, y, diag_reg=1e-3)
    for t in (None, 1.0):
        out = pf(t, xt, None, True)
        assert out.nngp.mean.dtype == np.float32 and out.ntk.covariance.dtype == np.float32
    k = kfn(x, get="ntk")
    assert predict.gradient_descent_mse(k, y)(1.0).dtype == np.float32
    assert predict.gradient_descent_mse(k.astype(np.float64), y)(1.0).dtype == np.float64
    assert predict.gp_inference(k, y, 1e-3)("ntk", kfn(xt, x, "ntk")).dtype == np.float32


# --------------------------------------------------------------------------------------------------


def test_live_against_neural_tangents():
    jax = import_nt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from neural_tangents import predict as nt_predict
        from neural_tangents import stax
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(2026)
        layers = {"relu": stax.Relu, "erf": stax.Erf, "abs": stax.Abs}
        for trial in range(6):
            act = list(layers)[trial % 3]
            depth, w, b = int(rng.integers(1, 4)), float(rng.uniform(0.8, 1.8)), float(rng.uniform(0.05, 0.5))
            net = [stax.Dense(8, W_std=w, b_std=b)]
            for _ in range(depth):
                net += [layers[act](), stax.Dense(8, W_std=w, b_std=b)]
            net[-1] = stax.Dense(1, W_std=w, b_std=b)
            nt_kfn = stax.serial(*net)[2]
            x, xt = rng.standard_normal((8, 3)), rng.standard_normal((4, 3))
            y = rng.standard_normal((8, 2))
            reg = float(rng.choice([1e-3, 1e-1]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                want = nt_predict.gradient_descent_mse_ensemble(nt_kfn, x, y, diag_reg=reg)
                ours = predict.gradient_descent_mse_ensemble(nt_kfn, x, y, diag_reg=reg)   # nt's kernel_fn
                for t in (None, 1.3, np.array([0.2, 5.0])):
                    a = want(t, xt, None, True)
                    c = ours(t, xt, None, True)
                    for g in ("nngp", "ntk"):
                        assert rel_err(getattr(c, g).mean, np.asarray(getattr(a, g).mean)) < TOL_LAYER
                        assert rel_err(getattr(c, g).covariance, np.asarray(getattr(a, g).covariance)) < TOL_LAYER
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_work_memory_is_one_kernel_sized_array():
    """Peak NumPy memory of a prediction (tracemalloc), in units of one n x n float64 array: the training
    kernels the call needs, plus at most one n x n work array (the factor; an eigendecomposition of a
    caller's kernel also holds the copy that LAPACK overwrites)."""
    import tracemalloc

    rng = np.random.default_rng(17)
    n, m = 400, 30
    x, xt, y = rng.standard_normal((n, 6)), rng.standard_normal((m, 6)), rng.standard_normal((n, 3))
    kfn = arcflow.kernel_fn(depth=3, b_std=0.2)
    unit = n * n * 8
    predict.gradient_descent_mse_ensemble(kfn, x, y, diag_reg=1e-4)(None, xt, "ntk")   # imports, first calls

    def peak(fn):
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1] / unit
        finally:
            tracemalloc.stop()

    def ens(*args):
        pf = predict.gradient_descent_mse_ensemble(kfn, x, y, diag_reg=1e-4)
        return lambda: pf(*args)

    assert peak(ens(None, xt, "ntk")) < 1.3             # the NTK, factorised in place
    assert peak(ens(None, xt, None)) < 2.3              # both kernels, each factorised in place
    assert peak(ens(1.0, xt, "ntk")) < 2.3              # the NTK and its eigenvectors
    assert peak(ens(2.0, xt, "ntk", True)) < 3.3        # + the NNGP the covariance needs
    k, ktd = kfn(x, get="ntk"), kfn(xt, x, "ntk")
    gd = predict.gradient_descent_mse(k, y)
    assert peak(lambda: gd(None, 0.0, np.zeros((m, 3)), ktd)) < 1.3     # a copy of k, factorised in place
    gd = predict.gradient_descent_mse(k, y)
    assert peak(lambda: gd(1.0, 0.0, np.zeros((m, 3)), ktd)) < 2.3      # the copy and the eigenvectors


def test_docstring_examples_run():
    import doctest

    from arcflow import _kernel_fn

    for module in (predict, _kernel_fn):
        res = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert res.failed == 0 and res.attempted >= 5, module.__name__


def test_non_contiguous_and_list_inputs():
    rng = np.random.default_rng(18)
    kfn, x, xt, y = _problem(rng, k=4)
    want = predict.gradient_descent_mse_ensemble(kfn, x, np.ascontiguousarray(y[:, ::2]), diag_reg=1e-3)
    got = predict.gradient_descent_mse_ensemble(kfn, np.asfortranarray(x), y[:, ::2], diag_reg=1e-3)
    for t in (None, 2.0):
        np.testing.assert_allclose(got(t, xt[::-1], "ntk", True).mean, want(t, xt[::-1], "ntk", True).mean,
                                   rtol=1e-12, atol=1e-14)
    k, ktd = kfn(x, get="ntk"), kfn(xt, x, get="ntk")
    a = predict.gradient_descent_mse(np.asfortranarray(k), y[:, ::2].tolist())
    b = predict.gradient_descent_mse(k, np.ascontiguousarray(y[:, ::2]))
    for t in (None, 0.5):
        ra, rb = a(t, 0.0, np.zeros((len(xt), 2)), ktd.T.copy().T), b(t, 0.0, np.zeros((len(xt), 2)), ktd)
        np.testing.assert_allclose(ra[1], rb[1], rtol=1e-12, atol=1e-14)
        assert ra[1].dtype == np.float64
    kk = kfn(x)
    gp = predict.gp_inference(arcflow.Kernels(kk.nngp.T, kk.ntk[::1, ::1]), y[:, 1])
    gp2 = predict.gp_inference(kk, y[:, 1].copy())
    np.testing.assert_allclose(gp("nngp", kfn(xt, x, "nngp")[:, ::1]), gp2("nngp", kfn(xt, x, "nngp")),
                               rtol=1e-12, atol=1e-14)


def test_import_is_light():
    """arcflow.predict imports NumPy only; scipy.linalg loads on the first factorisation."""
    import subprocess
    import sys

    code = ("import sys, arcflow, arcflow.predict; "
            "print(sorted(m for m in ('scipy', 'jax', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("g", ["nngp", "ntk"])
def test_empty_times_and_test_sets(g):
    """An empty array of times gives empty results of the right shape (np.stack of nothing raised before)."""
    kfn, x, xt, y = _problem(np.random.default_rng(19), k=2)
    pf = predict.gradient_descent_mse_ensemble(kfn, x, y, diag_reg=1e-3)
    for x_test, m in ((xt, len(xt)), (None, len(x)), (xt[:0], 0)):
        r = pf([], x_test, g, True)
        assert r.mean.shape == (0, m, 2) and r.covariance.shape == (0, m, m)
        r = pf(None, x_test, g, True)
        assert r.mean.shape == (m, 2) and r.covariance.shape == (m, m)
    fx_train, fx_test = predict.gradient_descent_mse(kfn(x, get="ntk"), y)([], 0.0, np.zeros((3, 2)),
                                                                             kfn(xt[:3], x, "ntk"))
    assert fx_train.shape == (0, len(x), 2) and fx_test.shape == (0, 3, 2)
