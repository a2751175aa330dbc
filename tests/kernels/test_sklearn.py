"""arcflow.sklearn: the NNGP/NTK Gaussian-process kernels and the estimators, against independent oracles.

Oracles: arcflow.reference (the NumPy float64 recursion) for kernel values; central finite differences of
arcflow.reference in the log-hyperparameters for the gradients scikit-learn optimises with; dense NumPy
linear algebra (np.linalg.solve, scipy.linalg.expm) on reference kernels for the estimators' predictions;
scikit-learn's own check_estimator for the estimator contract.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.linalg
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, WhiteKernel
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import arcflow.reference as ref
from arcflow.sklearn import NNGPKernel, NNGPRegressor, NTKClassifier, NTKKernel, NTKRegressor

ACTS = [("relu", 1.4, 0.3), ("erf", 1.2, 0.2), ("abs", 1.1, 0.4), ("leaky_relu", 1.3, 0.5)]


def _x(n, d, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def _ref(get, x1, x2=None, **kw):
    return getattr(ref.kernels(x1, x2, get=get, **kw), get)


def _fd_log_grad(get, x, name, kw, h=1e-5):
    """d K / d log(kw[name]) by central differences of the NumPy reference (error ~ h^2)."""
    lo, hi = dict(kw), dict(kw)
    lo[name] = kw[name] * np.exp(-h)
    hi[name] = kw[name] * np.exp(h)
    return (_ref(get, x, **hi) - _ref(get, x, **lo)) / (2 * h)


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("cls,get", [(NNGPKernel, "nngp"), (NTKKernel, "ntk")])
@pytest.mark.parametrize("act,w,b", ACTS)
def test_kernel_value_diag_and_log_gradients_match_the_reference(cls, get, act, w, b):
    x, y = _x(9, 4), _x(5, 4, seed=1)
    kw = dict(depth=3, activation=act, w_std=w, b_std=b)
    k = cls(**kw)
    assert _rel(k(x, y), _ref(get, x, y, **kw)) < 1e-12
    assert _rel(k.diag(x), np.diagonal(_ref(get, x, **kw))) < 1e-12
    K, G = k(x, eval_gradient=True)
    assert _rel(K, _ref(get, x, **kw)) < 1e-12
    assert G.shape == (9, 9, 2)
    # scikit-learn orders the hyperparameters by name: b_std, then w_std; gradients are d/d log.
    assert [h.name for h in k.hyperparameters] == ["b_std", "w_std"]
    assert _rel(G[..., 0], _fd_log_grad(get, x, "b_std", kw)) < 1e-7
    assert _rel(G[..., 1], _fd_log_grad(get, x, "w_std", kw)) < 1e-7


def test_theta_round_trip_and_fixed_hyperparameters():
    k = NTKKernel(depth=2, w_std=1.5, b_std=0.2)
    np.testing.assert_allclose(k.theta, np.log([0.2, 1.5]), rtol=1e-15)
    k2 = k.clone_with_theta(np.log([0.3, 1.1]))
    assert (k2.b_std, k2.w_std) == pytest.approx((0.3, 1.1), rel=1e-14)
    kw = dict(depth=2, activation="relu", w_std=1.5, b_std=0.2)
    fixed_b = NTKKernel(**kw, b_std_bounds="fixed")
    K, G = fixed_b(_x(6, 3), eval_gradient=True)
    assert G.shape == (6, 6, 1) and fixed_b.n_dims == 1
    assert _rel(G[..., 0], _fd_log_grad("ntk", _x(6, 3), "w_std", kw)) < 1e-7
    both = NTKKernel(**kw, b_std_bounds="fixed", w_std_bounds="fixed")
    assert both(_x(4, 3), eval_gradient=True)[1].shape == (4, 4, 0)


def test_b_std_zero_must_be_fixed_to_be_a_hyperparameter():
    with pytest.raises(ValueError, match="b_std = 0.0 must be > 0.*b_std_bounds='fixed'"):
        NNGPKernel(b_std=0.0)(_x(3, 2))
    K = NNGPKernel(depth=2, b_std=0.0, b_std_bounds="fixed")(_x(3, 2))
    assert _rel(K, _ref("nngp", _x(3, 2), depth=2)) < 1e-12


def test_gradient_needs_y_none():
    with pytest.raises(ValueError, match="only be evaluated when Y is None"):
        NNGPKernel()(_x(3, 2), _x(2, 2), eval_gradient=True)


def test_composite_kernel_gradient_matches_finite_differences():
    """ConstantKernel() * NTKKernel + WhiteKernel(): scikit-learn's composition calls our gradient; checked
    against central differences of the composite's own values in theta."""
    x = _x(8, 3)
    k = ConstantKernel(0.7) * NTKKernel(depth=3, w_std=1.3, b_std=0.2) + WhiteKernel(0.05)
    K, G = k(x, eval_gradient=True)
    assert G.shape == (8, 8, k.n_dims) and k.n_dims == 4
    h = 1e-5
    for i in range(k.n_dims):
        tp, tm = k.theta.copy(), k.theta.copy()
        tp[i] += h
        tm[i] -= h
        fd = (k.clone_with_theta(tp)(x) - k.clone_with_theta(tm)(x)) / (2 * h)
        assert _rel(G[..., i], fd) < 1e-7, k.hyperparameters[i].name


def test_gaussian_process_recovers_the_nngp_hyperparameters():
    """Targets drawn from the NNGP prior (depth 2, w_std 1.6, b_std 0.5) plus noise 0.05: the fitted
    GaussianProcessRegressor reaches at least the log marginal likelihood of the true hyperparameters and
    lands near them."""
    rng = np.random.default_rng(3)
    n, d = 300, 4
    x = rng.normal(size=(n, d)) * rng.uniform(0.3, 3.0, size=(n, 1))  # varied norms: w and b separate
    true = dict(depth=2, w_std=1.6, b_std=0.5)
    noise = 0.05
    K = _ref("nngp", x, **true) + noise * np.eye(n)
    y = np.linalg.cholesky(K) @ rng.normal(size=n)
    kernel = NNGPKernel(depth=2, w_std=1.0, b_std=0.1) + WhiteKernel(0.1, noise_level_bounds=(1e-4, 1e1))
    gp = GaussianProcessRegressor(kernel, normalize_y=False, n_restarts_optimizer=2, random_state=0).fit(x, y)
    true_kernel = NNGPKernel(**true) + WhiteKernel(noise)
    lml_true = gp.log_marginal_likelihood(true_kernel.theta)
    assert gp.log_marginal_likelihood_value_ >= lml_true - 1e-6
    fitted = gp.kernel_.get_params()
    assert fitted["k1__w_std"] == pytest.approx(1.6, rel=0.15)
    assert fitted["k1__b_std"] == pytest.approx(0.5, rel=0.5)
    assert fitted["k2__noise_level"] == pytest.approx(noise, rel=0.5)


# --------------------------------------------------------------------------------------------------------
# Estimators

def _ntk_mean_oracle(get, xtr, ytr, xte, t, diag_reg, **kw):
    """The infinite ensemble's mean from dense linear algebra on reference kernels (neural-tangents'
    conventions: diag_reg relative to the mean diagonal, learning rate 1, the MSE averaged over all y.size
    targets, so the flow is exp(-K t / y.size))."""
    Ktt = _ref(get, xtr, **kw)
    Kst = _ref(get, xte, xtr, **kw)
    A = Ktt + diag_reg * np.trace(Ktt) / len(Ktt) * np.eye(len(Ktt))
    if t is None:
        return Kst @ np.linalg.solve(A, ytr)
    return Kst @ np.linalg.solve(A, (np.eye(len(A)) - scipy.linalg.expm(-A * t / ytr.size)) @ ytr)


@pytest.mark.parametrize("t", [None, 20.0, 300.0])
@pytest.mark.parametrize("act,w,b", ACTS[:2])
def test_ntk_regressor_matches_dense_linear_algebra(t, act, w, b):
    xtr, xte = _x(30, 3), _x(7, 3, seed=2)
    ytr = np.stack([np.sin(xtr[:, 0]), xtr[:, 1] ** 2], axis=1)
    kw = dict(depth=2, activation=act, w_std=w, b_std=b)
    m = NTKRegressor(**kw, diag_reg=1e-3, t=t).fit(xtr, ytr)
    assert _rel(m.predict(xte), _ntk_mean_oracle("ntk", xtr, ytr, xte, t, 1e-3, **kw)) < 1e-8
    m1 = NTKRegressor(**kw, diag_reg=1e-3, t=t).fit(xtr, ytr[:, 0])
    assert m1.predict(xte).shape == (7,)
    assert _rel(m1.predict(xte), _ntk_mean_oracle("ntk", xtr, ytr[:, 0], xte, t, 1e-3, **kw)) < 1e-8


def test_nngp_regressor_mean_and_std_are_the_gp_posterior():
    xtr, xte = _x(25, 3), _x(2100, 3, seed=4)  # more test rows than one covariance block
    ytr = np.cos(xtr[:, 0])
    kw = dict(depth=3, activation="relu", w_std=1.4, b_std=0.2)
    m = NNGPRegressor(**kw, diag_reg=1e-2).fit(xtr, ytr)
    mean, std = m.predict(xte, return_std=True)
    Ktt = _ref("nngp", xtr, **kw)
    A = Ktt + 1e-2 * np.trace(Ktt) / len(Ktt) * np.eye(len(Ktt))
    Kst = _ref("nngp", xte, xtr, **kw)
    prior = ref.kernels(xte, get="nngp", diag=True, **kw).nngp
    var = prior - np.einsum("ij,ji->i", Kst, np.linalg.solve(A, Kst.T))
    assert _rel(mean, Kst @ np.linalg.solve(A, ytr)) < 1e-8
    assert _rel(std, np.sqrt(np.maximum(var, 0))) < 1e-6


def test_classifier_is_argmax_of_one_hot_regression():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 4))
    labels = np.array(["a", "b", "c"])
    y = labels[(x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)]
    xte = rng.normal(size=(20, 4))
    kw = dict(depth=2, activation="relu", w_std=1.4, b_std=0.1)
    clf = NTKClassifier(**kw, diag_reg=1e-3).fit(x, y)
    Y = np.stack([(y == c).astype(float) - 1 / 3 for c in labels], axis=1)
    f = _ntk_mean_oracle("ntk", x, Y, xte, None, 1e-3, **kw)
    assert _rel(clf.decision_function(xte), f) < 1e-8
    assert np.array_equal(clf.predict(xte), labels[np.argmax(f, axis=1)])
    assert clf.score(x, y) == 1.0  # t = infinity interpolates the (lightly regularised) training labels


def test_binary_decision_function_is_one_column():
    x = _x(30, 3)
    y = (x[:, 0] > 0).astype(int)
    clf = NTKClassifier(depth=2, b_std=0.1).fit(x, y)
    df = clf.decision_function(x)
    assert df.shape == (30,)
    assert np.array_equal(clf.predict(x), (df > 0).astype(int))


def test_pipeline_grid_search_and_pickle():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(80, 3))
    y = np.sin(2 * x[:, 0]) + 0.1 * rng.normal(size=80)
    pipe = make_pipeline(StandardScaler(), NTKRegressor(depth=2, b_std=0.1))
    gs = GridSearchCV(pipe, {"ntkregressor__depth": [1, 3], "ntkregressor__diag_reg": [1e-3, 1e-1]}, cv=3)
    gs.fit(x, y)
    assert set(gs.best_params_) == {"ntkregressor__depth", "ntkregressor__diag_reg"}
    again = pickle.loads(pickle.dumps(gs.best_estimator_))
    np.testing.assert_array_equal(again.predict(x), gs.best_estimator_.predict(x))


def _cnn():
    from arcflow import stax
    return stax.serial(stax.Conv(3, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), stax.Relu(),
                       stax.AvgPool((2, 2), (2, 2)), stax.Conv(3, (2, 2), W_std=1.3), stax.Erf(),
                       stax.GlobalAvgPool(), stax.Dense(1, W_std=1.2, b_std=0.2))


def test_convolutional_network_on_image_rows():
    """network=stax.serial(...), rows reshaped to images: the prediction of dense linear algebra on the NumPy
    recursion's CNTK / CNN-GP (arcflow.reference_conv) of the same images."""
    from sklearn.base import clone

    from arcflow import reference_conv
    rng = np.random.default_rng(7)
    imgs, imgs_te = rng.normal(size=(24, 6, 6, 2)), rng.normal(size=(5, 6, 6, 2))
    x, xte = imgs.reshape(24, -1), imgs_te.reshape(5, -1)
    labels = np.array([0, 1, 2])
    y = labels[(imgs[:, :3].mean(axis=(1, 2, 3)) > 0).astype(int) + (imgs[:, 3:, :, 0].mean(axis=(1, 2)) > 0)]
    net = _cnn()

    def k(get, a, b=None):
        return getattr(reference_conv.evaluate(net._ops, a, b, diag=False, want_nngp=True, want_ntk=True), get)

    clf = NTKClassifier(network=net, image_shape=(6, 6, 2), diag_reg=1e-3).fit(x, y)
    Y = np.stack([(y == c).astype(float) - 1 / 3 for c in labels], axis=1)
    Ktt = k("ntk", imgs)
    A = Ktt + 1e-3 * np.trace(Ktt) / len(Ktt) * np.eye(len(Ktt))
    f = k("ntk", imgs_te, imgs) @ np.linalg.solve(A, Y)
    assert _rel(clf.decision_function(xte), f) < 1e-9
    assert np.array_equal(clf.predict(xte), labels[np.argmax(f, axis=1)])
    reg = NNGPRegressor(network=net, image_shape=[6, 6, 2], diag_reg=1e-2).fit(x, y.astype(float))
    Ktt = k("nngp", imgs)
    A = Ktt + 1e-2 * np.trace(Ktt) / len(Ktt) * np.eye(len(Ktt))
    assert _rel(reg.predict(xte), k("nngp", imgs_te, imgs) @ np.linalg.solve(A, y.astype(float))) < 1e-9
    twin = clone(clf).fit(x, y)  # clone copies the network; pickling keeps it
    np.testing.assert_array_equal(twin.decision_function(xte), clf.decision_function(xte))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(clf)).decision_function(xte), clf.decision_function(xte))


@pytest.mark.parametrize("kw,exc,match", [
    ({"image_shape": (6, 6, 2)}, ValueError, "image_shape is for a network"),
    ({"network": "cnn", "image_shape": (6, 6, 3)}, ValueError, r"image_shape \(6, 6, 3\) has 108 values, but X has 72"),
    ({"network": "cnn", "image_shape": (6, 12)}, ValueError, r"image_shape must be \(H, W, C\)"),
    ({"network": "relu"}, TypeError, "network must be an arcflow.stax.serial"),
])
def test_network_parameter_errors(kw, exc, match):
    kw = dict(kw)
    if kw.get("network") == "cnn":
        kw["network"] = _cnn()
    with pytest.raises(exc, match=match):
        NTKRegressor(**kw).fit(_x(6, 72), np.arange(6.0))


@pytest.mark.parametrize("bad,match", [({"t": -1.0}, "t must be None"), ({"diag_reg": -1.0}, "diag_reg"),
                                       ({"activation": "swish"}, "swish")])
def test_bad_parameters_are_clear_errors_at_fit(bad, match):
    with pytest.raises(ValueError, match=match):
        NTKRegressor(**bad).fit(_x(5, 2), np.arange(5.0))


def _fc_network():
    from arcflow import stax
    return stax.serial(stax.Dense(4, W_std=1.2, b_std=0.1), stax.Erf(), stax.Dense(1, W_std=1.5, b_std=0.3))


@parametrize_with_checks([NTKRegressor(b_std=0.1), NNGPRegressor(b_std=0.1), NTKClassifier(b_std=0.1),
                          NTKRegressor(depth=3, activation="erf", t=1e4), NTKClassifier(network=_fc_network())])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)
