"""A kernel function object: the network's parameters bound once, called like neural-tangents' ``kernel_fn``."""
from __future__ import annotations

from collections import namedtuple
from typing import Optional, Sequence, Union

from . import _dispatch as dp
from ._kernels import Kernels, _check_get, _kernels, network_params
from .activations import ActivationLike

_WHERE = "arcflow.kernel_fn"
_FIELDS = ("depth", "activation", "w_std", "b_std", "fix_dep")
_NAMEDTUPLES: dict = {}


def _named(fields: tuple):
    """The result type for a tuple of names: arcflow.Kernels for ('nngp', 'ntk'), else a named tuple whose
    fields follow the order asked for (as neural-tangents' kernel_fn does)."""
    if fields == ("nngp", "ntk"):
        return Kernels
    if fields not in _NAMEDTUPLES:
        _NAMEDTUPLES[fields] = namedtuple("Kernels", fields)
    return _NAMEDTUPLES[fields]


def _validate(depth, activation, w_std, b_std, fix_dep, threads, device, where):
    """The checks of arcflow.kernels, made once when the object is built."""
    act, depth, w, b, fix_dep = network_params(depth, activation, w_std, b_std, fix_dep, where)
    if threads is not None:
        threads = dp.check_threads(threads, where)
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{where}: device must be one of ('auto', 'cpu', 'cuda'), got {device!r}")
    return depth, act, w, b, fix_dep, threads, device


class KernelFn:
    """NNGP and NTK of ``Dense(w_std, b_std) -> [activation -> Dense(w_std, b_std)] * depth`` as a function of
    the inputs, with neural-tangents' calling convention ``kernel_fn(x1, x2=None, get=None)``.

    The numbers are those of :func:`arcflow.kernels` (the fused C++ engine; docs/mathematics.md §1); this
    object only binds the parameters, validated once when it is built. It is immutable, hashable, compares
    equal by its parameters and pickles.

    Example
    -------
    >>> import numpy as np, arcflow
    >>> kfn = arcflow.kernel_fn(depth=3, activation="relu", w_std=1.4, b_std=0.1)
    >>> x = np.random.default_rng(0).normal(size=(20, 5))
    >>> kfn(x, get="ntk").shape, kfn(x, x[:3]).nngp.shape, kfn.diag(x, get="nngp").shape
    ((20, 20), (20, 3), (20,))
    """

    __slots__ = ("_depth", "_activation", "_w_std", "_b_std", "_fix_dep", "_threads", "_device")

    def __init__(self, depth: int = 1, activation: ActivationLike = "relu", w_std: float = 1.0,
                 b_std: float = 0.0, fix_dep: int = 0, *, threads: Optional[int] = None, device: str = "auto"):
        vals = _validate(depth, activation, w_std, b_std, fix_dep, threads, device, _WHERE)
        for name, v in zip(("_depth", "_activation", "_w_std", "_b_std", "_fix_dep", "_threads", "_device"), vals):
            object.__setattr__(self, name, v)

    def __setattr__(self, name, value):
        raise AttributeError(f"KernelFn is immutable; use with_params({name.lstrip('_')}=...) for a modified copy")

    depth = property(lambda self: self._depth, doc="Number of hidden activations.")
    activation = property(lambda self: self._activation, doc="The activation (an arcflow.activations object).")
    w_std = property(lambda self: self._w_std, doc="Standard deviation of the weights.")
    b_std = property(lambda self: self._b_std, doc="Standard deviation of the biases.")
    fix_dep = property(lambda self: self._fix_dep, doc="Number of frozen first layers (no NTK contribution).")
    threads = property(lambda self: self._threads, doc="OpenMP threads (None: arcflow.get_num_threads()).")
    device = property(lambda self: self._device, doc="'auto', 'cpu' or 'cuda', as in arcflow.kernels.")

    @property
    def has_ntk(self) -> bool:
        """False for activations whose derivative is a Dirac delta (Step, Sign): only the NNGP exists."""
        return self._activation.has_ntk

    def params(self) -> dict:
        """The network's parameters, as keyword arguments of :func:`arcflow.kernel_fn`."""
        return {"depth": self._depth, "activation": self._activation, "w_std": self._w_std,
                "b_std": self._b_std, "fix_dep": self._fix_dep}

    def with_params(self, **kw) -> "KernelFn":
        """A copy with some parameters replaced (validated like the constructor), e.g. ``with_params(w_std=2)``."""
        allowed = (*_FIELDS, "threads", "device")
        bad = [k for k in kw if k not in allowed]
        if bad:
            raise TypeError(f"{_WHERE}: with_params() got unknown parameter(s) {bad}; valid: {list(allowed)}")
        args = {**self.params(), "threads": self._threads, "device": self._device, **kw}
        return type(self)(**args)

    def _default_get(self):
        return ("nngp", "ntk") if self.has_ntk else ("nngp",)

    def _call(self, x1, x2, get, diag: bool):
        single = isinstance(get, str)
        names = self._default_get() if get is None else _check_get(get, _WHERE)
        if len(set(names)) != len(names):
            raise ValueError(f"{_WHERE}: get names a kernel twice: {get!r}")
        ordered = tuple(g for g in ("nngp", "ntk") if g in names)
        k = _kernels(x1, x2, self._depth, self._activation, self._w_std, self._b_std, self._fix_dep, diag,
                     ordered, self._threads, None, False, self._device, _WHERE)
        if single:
            return getattr(k, names[0])
        if get is None:  # Kernels(nngp, ntk); ntk is None for an NNGP-only activation
            return k
        return _named(tuple(names))(*(getattr(k, g) for g in names))

    def __call__(self, x1, x2=None, get: Union[None, str, Sequence[str]] = None):
        """The kernels between the rows of x1 (n1, d) and x2 (n2, d) (x2=None: x1 with itself).

        get : None gives both, as :class:`arcflow.Kernels` (nngp, ntk; ntk is None for an activation without
            an NTK); one name ("nngp" or "ntk") gives that array, (n1, n2); a tuple of names gives a named
            tuple with those fields in that order.
        """
        return self._call(x1, x2, get, False)

    def diag(self, x, get: Union[None, str, Sequence[str]] = None):
        """k(x[i], x[i]) for every row, shape (n,), in O(n (d + depth)); ``get`` as in ``__call__``."""
        return self._call(x, None, get, True)

    def grads(self, x1, x2=None, get: Union[None, str, Sequence[str]] = None, diag: bool = False):
        """The kernels with their derivatives with respect to w_std and b_std (:func:`arcflow.kernel_grads`):
        one name gives a :class:`arcflow.Grad` (value, d_w_std, d_b_std); None (both, where the activation has
        an NTK) or a sequence gives :class:`arcflow.KernelGrads`."""
        from ._grads import kernel_grads
        names = self._default_get() if get is None else get
        g = kernel_grads(x1, x2, depth=self._depth, activation=self._activation, w_std=self._w_std,
                         b_std=self._b_std, fix_dep=self._fix_dep, get=names, diag=diag, threads=self._threads)
        return getattr(g, get) if isinstance(get, str) else g

    def __repr__(self) -> str:
        extra = ""
        if self._threads is not None:
            extra += f", threads={self._threads!r}"
        if self._device != "auto":
            extra += f", device={self._device!r}"
        return (f"arcflow.kernel_fn(depth={self._depth!r}, activation={self._activation!r}, "
                f"w_std={self._w_std!r}, b_std={self._b_std!r}, fix_dep={self._fix_dep!r}{extra})")

    def _key(self):
        return (self._depth, self._activation, self._w_std, self._b_std, self._fix_dep, self._threads, self._device)

    def __eq__(self, other):
        if not isinstance(other, KernelFn):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __reduce__(self):
        return (_rebuild, (self.params(), self._threads, self._device))


def _rebuild(params, threads, device):
    return KernelFn(**params, threads=threads, device=device)


def kernel_fn(depth: int = 1, activation: ActivationLike = "relu", w_std: float = 1.0, b_std: float = 0.0,
              fix_dep: int = 0, *, threads: Optional[int] = None, device: str = "auto") -> KernelFn:
    """The kernel function of ``Dense(w_std, b_std) -> [activation -> Dense(w_std, b_std)] * depth``.

    ``kfn = arcflow.kernel_fn(...)`` is called as neural-tangents' ``kernel_fn``: ``kfn(x1, x2=None, get=None)``
    (get=None: both kernels as :class:`arcflow.Kernels`; "nngp" or "ntk": one array; a tuple: a named tuple),
    and ``kfn.diag(x)``. The parameters are those of :func:`arcflow.kernels` and are checked here, once.
    It is what :mod:`arcflow.predict` takes.

    >>> import numpy as np, arcflow
    >>> kfn = arcflow.kernel_fn(depth=3, activation="erf", w_std=1.4, b_std=0.1)
    >>> kfn
    arcflow.kernel_fn(depth=3, activation=Erf(), w_std=1.4, b_std=0.1, fix_dep=0)
    >>> ntk = kfn(np.eye(4), get="ntk")
    """
    return KernelFn(depth, activation, w_std, b_std, fix_dep, threads=threads, device=device)


__all__ = ["KernelFn", "kernel_fn"]
