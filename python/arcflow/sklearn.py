"""scikit-learn integration: the NNGP and NTK as Gaussian-process kernels, and infinite-network estimators.

Kernels (:class:`NNGPKernel`, :class:`NTKKernel`) are ``sklearn.gaussian_process.kernels.Kernel`` subclasses
with the hyperparameters ``w_std`` and ``b_std`` and analytic gradients (``arcflow.kernel_grads``), so a
``GaussianProcessRegressor`` fits them by marginal likelihood and they compose with scikit-learn's kernels::

    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import WhiteKernel
    from arcflow.sklearn import NNGPKernel
    gp = GaussianProcessRegressor(NNGPKernel(depth=2) + WhiteKernel()).fit(X, y)

Estimators (:class:`NTKRegressor`, :class:`NNGPRegressor`, :class:`NTKClassifier`) predict what the infinitely
wide network predicts (``arcflow.predict.gradient_descent_mse_ensemble``): trained by gradient descent on
the mean squared error for time ``t`` (NTK; ``t=None`` is t = infinity), or the Bayesian posterior (NNGP).
The network is the fully-connected one of ``depth``, ``activation``, ``w_std``, ``b_std``, ``fix_dep``, or any
``network=arcflow.stax.serial(...)`` (then those five are not used); for a convolutional network each row of X
is an image, reshaped to ``image_shape=(H, W, C)``::

    from arcflow import stax
    from arcflow.sklearn import NTKClassifier
    cntk = stax.serial(stax.Conv(1, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), stax.Relu(),
                       stax.GlobalAvgPool(), stax.Dense(1, W_std=1.4, b_std=0.1))
    NTKClassifier(network=cntk, image_shape=(8, 8, 1)).fit(X_train, y_train).score(X_test, y_test)

scikit-learn is an optional dependency (``pip install "arcflow[sklearn]"``): it is imported by this module
only.
"""
from __future__ import annotations

import numbers
from typing import Optional

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.gaussian_process.kernels import Hyperparameter, Kernel
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d

from ._kernel_fn import kernel_fn as _kernel_fn

__all__ = ["NNGPKernel", "NTKKernel", "NTKRegressor", "NNGPRegressor", "NTKClassifier"]

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # older: the estimator method
    def _validate_data(est, X="no_validation", y="no_validation", reset=True, **kw):
        return est._validate_data(X, y, reset=reset, **kw)

# Rows of test points whose covariance block is formed at once when only its diagonal (return_std) is needed.
_STD_BLOCK = 1024


class _InfiniteNetworkKernel(Kernel):
    """The NNGP or NTK (``_get``) of ``Dense -> [activation -> Dense] * depth`` (as ``arcflow.kernels``)."""

    _get = "nngp"

    def __init__(self, depth: int = 1, activation="relu", w_std: float = 1.0, b_std: float = 0.1,
                 fix_dep: int = 0, w_std_bounds=(1e-2, 1e2), b_std_bounds=(1e-5, 1e2)):
        self.depth = depth
        self.activation = activation
        self.w_std = w_std
        self.b_std = b_std
        self.fix_dep = fix_dep
        self.w_std_bounds = w_std_bounds
        self.b_std_bounds = b_std_bounds

    @property
    def hyperparameter_w_std(self) -> Hyperparameter:
        return Hyperparameter("w_std", "numeric", self.w_std_bounds)

    @property
    def hyperparameter_b_std(self) -> Hyperparameter:
        return Hyperparameter("b_std", "numeric", self.b_std_bounds)

    def _where(self) -> str:
        return f"arcflow.sklearn.{type(self).__name__}"

    def _kernel_fn(self):
        """The network's kernel function (validates the parameters); a free hyperparameter must be > 0."""
        where = self._where()
        for name in ("w_std", "b_std"):
            v = getattr(self, name)
            if not getattr(self, f"hyperparameter_{name}").fixed and not (isinstance(v, numbers.Real) and v > 0):
                raise ValueError(f"{where}: {name} = {v!r} must be > 0 while it is a free hyperparameter "
                                 f"(its logarithm is optimised); for {name} = 0 set {name}_bounds='fixed'")
        return _kernel_fn(depth=self.depth, activation=self.activation, w_std=self.w_std, b_std=self.b_std,
                          fix_dep=self.fix_dep)

    def __call__(self, X, Y=None, eval_gradient: bool = False):
        """k(X, Y), and with ``eval_gradient`` (Y None only) its gradient with respect to the logarithms of the
        free hyperparameters in scikit-learn's order (by name: b_std, then w_std), shape (n, n, n_free)."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        if Y is not None:
            if eval_gradient:
                raise ValueError(f"{self._where()}: the gradient can only be evaluated when Y is None")
            Y = np.atleast_2d(np.asarray(Y, dtype=np.float64))
        kfn = self._kernel_fn()
        if not eval_gradient:
            return kfn(X, Y, self._get)
        g = kfn.grads(X, None, self._get)
        grads = []
        for hp in self.hyperparameters:  # sorted by name, as Kernel.theta
            if not hp.fixed:
                d = g.d_b_std if hp.name == "b_std" else g.d_w_std
                grads.append(d * getattr(self, hp.name))  # d/d log s = s d/ds
        K_gradient = np.stack(grads, axis=-1) if grads else np.empty(g.value.shape + (0,))
        return g.value, K_gradient

    def diag(self, X) -> np.ndarray:
        return self._kernel_fn().diag(np.atleast_2d(np.asarray(X, dtype=np.float64)), self._get)

    def is_stationary(self) -> bool:
        return False

    def __repr__(self) -> str:
        act = self.activation if isinstance(self.activation, str) else repr(self.activation)
        return (f"{type(self).__name__}(depth={self.depth}, activation={act!r}, w_std={self.w_std:.3g}, "
                f"b_std={self.b_std:.3g}, fix_dep={self.fix_dep})")


class NNGPKernel(_InfiniteNetworkKernel):
    """The NNGP kernel Sigma of an infinitely wide fully-connected network as a scikit-learn GP kernel.

    Parameters: ``depth``, ``activation``, ``w_std``, ``b_std``, ``fix_dep`` as in ``arcflow.kernels``; the
    hyperparameters ``w_std`` and ``b_std`` have bounds ``w_std_bounds`` / ``b_std_bounds`` (a pair, or
    "fixed" to keep one out of the optimisation).

    >>> import numpy as np
    >>> from arcflow.sklearn import NNGPKernel
    >>> K = NNGPKernel(depth=2, w_std=1.4, b_std=0.1)(np.random.default_rng(0).normal(size=(5, 3)))
    """

    _get = "nngp"


class NTKKernel(_InfiniteNetworkKernel):
    """The Neural Tangent Kernel Theta of an infinitely wide fully-connected network as a scikit-learn kernel
    (parameters as :class:`NNGPKernel`)."""

    _get = "ntk"


# ---------------------------------------------------------------------------------------------------------
# Estimators

class _ImageRows:
    """A kernel function of images applied to scikit-learn's rows: each row is reshaped to ``shape``."""

    def __init__(self, kfn, shape):
        self.kfn, self.shape = kfn, shape

    def _images(self, x):
        x = np.asarray(x)
        return x.reshape((x.shape[0],) + self.shape)

    def __call__(self, x1, x2=None, get=None):
        return self.kfn(self._images(x1), None if x2 is None else self._images(x2), get)

    def diag(self, x, get=None):
        return self.kfn.diag(self._images(x), get)


class _InfiniteNetworkEstimator(BaseEstimator):
    _get = "ntk"

    def __init__(self, depth: int = 1, activation="relu", w_std: float = 1.0, b_std: float = 0.0,
                 fix_dep: int = 0, diag_reg: float = 1e-4, t: Optional[float] = None, network=None,
                 image_shape=None):
        self.depth = depth
        self.activation = activation
        self.w_std = w_std
        self.b_std = b_std
        self.fix_dep = fix_dep
        self.diag_reg = diag_reg
        self.t = t
        self.network = network
        self.image_shape = image_shape

    def _where(self, method: str) -> str:
        return f"arcflow.sklearn.{type(self).__name__}.{method}"

    def _kernel_fn(self, n_features: Optional[int] = None):
        if self.network is None:
            if self.image_shape is not None:
                raise ValueError(f"{self._where('fit')}: image_shape is for a network (network=arcflow.stax."
                                 f"serial(...)); the fully-connected network takes the rows as they are")
            return _kernel_fn(depth=self.depth, activation=self.activation, w_std=self.w_std, b_std=self.b_std,
                              fix_dep=self.fix_dep)
        from .stax import SerialKernelFn
        if not isinstance(self.network, SerialKernelFn):
            raise TypeError(f"{self._where('fit')}: network must be an arcflow.stax.serial(...) kernel function, "
                            f"got {type(self.network).__name__}")
        if self.image_shape is None:
            return self.network
        shape = tuple(self.image_shape) if isinstance(self.image_shape, (tuple, list)) else None
        if shape is None or len(shape) != 3 or not all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in shape):
            raise ValueError(f"{self._where('fit')}: image_shape must be (H, W, C), three positive integers, got "
                             f"{self.image_shape!r}")
        shape = tuple(int(v) for v in shape)
        if n_features is not None and int(np.prod(shape)) != n_features:
            raise ValueError(f"{self._where('fit')}: image_shape {shape} has {int(np.prod(shape))} values, but X "
                             f"has {n_features} features per row")
        return _ImageRows(self.network, shape)

    def _check_t(self, where: str):
        t = self.t
        if t is None:
            return None
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not t >= 0:
            raise ValueError(f"{where}: t must be None (t = infinity) or a time >= 0, got {t!r}")
        return float(t)

    def _fit_targets(self, X, Y):
        """Validates the parameters and builds the predictor (one factorisation of the training kernel)."""
        where = self._where("fit")
        self._check_t(where)
        if isinstance(self.diag_reg, bool) or not isinstance(self.diag_reg, numbers.Real) or not self.diag_reg >= 0:
            raise ValueError(f"{where}: diag_reg must be a number >= 0, got {self.diag_reg!r}")
        self._predictor = self._make_predictor(X, Y)  # kernel_fn checks depth, activation, stds, fix_dep
        self.X_train_ = X
        self.y_train_ = Y

    def _make_predictor(self, X, Y):
        from . import predict
        return predict.gradient_descent_mse_ensemble(self._kernel_fn(X.shape[1]), X, Y, diag_reg=float(self.diag_reg))

    def _predictor_fn(self):
        # The predictor is rebuilt after unpickling (it holds a factorisation, not estimator state).
        if getattr(self, "_predictor", None) is None:
            self._predictor = self._make_predictor(self.X_train_, self.y_train_)
        return self._predictor

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_predictor", None)
        return state

    def _outputs(self, X, return_std: bool = False):
        check_is_fitted(self, "X_train_")
        X = _validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        t = self._check_t(self._where("predict"))
        fn = self._predictor_fn()
        if not return_std:
            return fn(t=t, x_test=X, get=self._get), None
        means, stds = [], []
        for r0 in range(0, X.shape[0], _STD_BLOCK):
            g = fn(t=t, x_test=X[r0:r0 + _STD_BLOCK], get=self._get, compute_cov=True)
            means.append(g.mean)
            stds.append(np.sqrt(np.maximum(np.diagonal(g.covariance), 0)))
        return np.concatenate(means), np.concatenate(stds)

    def _more_tags(self):  # scikit-learn < 1.6
        return {"multioutput": True} if isinstance(self, RegressorMixin) else {}

    def __sklearn_tags__(self):  # scikit-learn >= 1.6
        tags = super().__sklearn_tags__()
        if isinstance(self, RegressorMixin):
            tags.target_tags.multi_output = True
        return tags


class _Regressor(RegressorMixin, _InfiniteNetworkEstimator):
    def fit(self, X, y):
        """Fits on X (n, d) and targets y (n,) or (n, k)."""
        X, y = _validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=[np.float64, np.float32])
        self._fit_targets(X, np.asarray(y, dtype=X.dtype))
        return self

    def predict(self, X, return_std: bool = False):
        """The mean prediction of the infinite ensemble at X, shape (n,) or (n, k); with ``return_std`` also
        the standard deviation of the prediction at each point, shape (n,) (the same for every output)."""
        mean, std = self._outputs(X, return_std)
        return (mean, std) if return_std else mean


class NTKRegressor(_Regressor):
    """Regression by the infinitely wide network trained by gradient descent on the mean squared error.

    The prediction is the mean of the infinite ensemble of such networks after training time ``t``
    (``None``: converged), ``arcflow.predict.gradient_descent_mse_ensemble(..., get="ntk")``. ``diag_reg``
    is added to the training kernel's diagonal, relative to its mean diagonal (neural-tangents' convention).

    >>> import numpy as np
    >>> from arcflow.sklearn import NTKRegressor
    >>> rng = np.random.default_rng(0); X = rng.normal(size=(40, 3)); y = np.sin(X[:, 0])
    >>> model = NTKRegressor(depth=3, w_std=1.4, b_std=0.1).fit(X, y)
    >>> model.predict(X[:2]).shape
    (2,)
    """

    _get = "ntk"


class NNGPRegressor(_Regressor):
    """Regression by the Bayesian posterior of the infinitely wide network (the NNGP Gaussian process), or with
    a finite ``t`` the network whose last layer alone is trained for time t. ``predict(X, return_std=True)``
    gives the posterior standard deviation too (with ``diag_reg`` as the observation noise, relative to the
    mean diagonal of the training kernel)."""

    _get = "nngp"


class NTKClassifier(ClassifierMixin, _InfiniteNetworkEstimator):
    """Classification by NTK regression on one-hot targets (centred: 1 - 1/C for the class, -1/C elsewhere), as
    in the NTK literature; the predicted class is the largest output. ``decision_function`` gives the outputs
    (n, C), or for two classes the difference of the second and the first, shape (n,)."""

    _get = "ntk"

    def fit(self, X, y):
        X, y = _validate_data(self, X, y, dtype=[np.float64, np.float32])
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        self.classes_, idx = np.unique(y, return_inverse=True)
        c = len(self.classes_)
        Y = np.full((X.shape[0], c), -1.0 / c, dtype=X.dtype)
        Y[np.arange(X.shape[0]), idx] += 1.0
        self._fit_targets(X, Y)
        return self

    def decision_function(self, X) -> np.ndarray:
        f, _ = self._outputs(X)
        return f[:, 1] - f[:, 0] if f.shape[1] == 2 else f

    def predict(self, X) -> np.ndarray:
        f, _ = self._outputs(X)
        return self.classes_[np.argmax(f, axis=1)]
