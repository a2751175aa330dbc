"""Activation functions of the fully-connected network whose infinite-width kernels arcflow computes.

Each activation fixes the two Gaussian expectations of the recursion (see docs/mathematics.md §1):
``T = E[phi(u) phi(v)]`` and ``Tdot = E[phi'(u) phi'(v)]`` for ``(u, v)`` centred Gaussian.

Strings are accepted everywhere an activation is: ``"relu"``, ``"leaky_relu"`` (alpha = 0.01),
``"abs"``, ``"step"``, ``"sign"``, ``"erf"``, ``"identity"`` (also ``"linear"``).

Example
-------
>>> import arcflow
>>> from arcflow.activations import LeakyReLU
>>> k = arcflow.ntk(x, depth=3, activation=LeakyReLU(0.1))   # doctest: +SKIP
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Union

__all__ = [
    "Activation", "ReLU", "LeakyReLU", "ABReLU", "Abs", "RectifiedMonomial", "Step", "Sign", "Erf",
    "Identity", "resolve", "ActivationLike",
]


def _short(v) -> str:
    """repr(v) for a message, cut short (an array passed by mistake would fill the screen)."""
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


@dataclass(frozen=True)
class Activation:
    """Base class. ``kind`` names the C++ kernel family; ``params`` are its numbers."""

    @property
    def kind(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def has_ntk(self) -> bool:
        """False where phi' is a Dirac delta (Step, Sign): the NTK is infinite, only the NNGP exists."""
        return True

    def params(self) -> tuple:
        return ()


@dataclass(frozen=True)
class ABReLU(Activation):
    """``phi(x) = a * min(x, 0) + b * max(x, 0)``. ReLU = ABReLU(0, 1), Abs = ABReLU(-1, 1)."""

    a: float = 0.0
    b: float = 1.0

    def __post_init__(self):
        for name in ("a", "b"):
            v = getattr(self, name)
            # numbers.Real takes NumPy scalars (np.float32(0.1)), stored as a Python float
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                raise ValueError(f"ABReLU: {name} must be a finite real number, got {_short(v)}")
            object.__setattr__(self, name, float(v))

    def __repr__(self) -> str:
        # The name the user wrote: ReLU(), Abs(), Identity() and LeakyReLU(alpha) are ABReLUs.
        a, b = self.a, self.b
        if b == 1.0:
            if a == 0.0:
                return "ReLU()"
            if a == -1.0:
                return "Abs()"
            if a == 1.0:
                return "Identity()"
            return f"LeakyReLU({a!r})"
        return f"ABReLU(a={a!r}, b={b!r})"

    @property
    def kind(self) -> str:
        return "abrelu"

    def params(self) -> tuple:
        return (float(self.a), float(self.b))


def ReLU() -> ABReLU:
    """``max(x, 0)``: the arc-cosine kernel of order 1."""
    return ABReLU(0.0, 1.0)


def LeakyReLU(alpha: float = 0.01) -> ABReLU:
    """``max(x, 0) + alpha * min(x, 0)``."""
    return ABReLU(alpha, 1.0)


def Abs() -> ABReLU:
    """``|x|``."""
    return ABReLU(-1.0, 1.0)


def Identity() -> ABReLU:
    """``x`` (a deep linear network): T = Sigma, Tdot = 1."""
    return ABReLU(1.0, 1.0)


@dataclass(frozen=True)
class RectifiedMonomial(Activation):
    """``max(x, 0) ** n``: the arc-cosine kernel of order ``n`` (Cho & Saul, 2009). n = 0 is Step."""

    n: int = 1

    def __post_init__(self):
        n = self.n
        # NumPy integers (np.int64(2)) and integral floats (2.0) are accepted; 2.5 is not rounded to 2.
        ok = not isinstance(n, bool) and (
            isinstance(n, numbers.Integral)
            or (isinstance(n, numbers.Real) and math.isfinite(float(n)) and float(n).is_integer()))
        if not ok or int(n) < 0:
            raise ValueError(f"RectifiedMonomial: the order n must be an integer >= 0, got {_short(n)}")
        if int(n) > 64:
            raise ValueError(f"RectifiedMonomial: order n = {n} is too large (at most 64)")
        object.__setattr__(self, "n", int(n))

    def __repr__(self) -> str:
        return "Step()" if self.n == 0 else f"RectifiedMonomial({self.n})"

    @property
    def kind(self) -> str:
        return "monomial"

    @property
    def has_ntk(self) -> bool:
        return self.n >= 1

    def params(self) -> tuple:
        return (int(self.n),)


def Step() -> RectifiedMonomial:
    """``1[x > 0]``: the arc-cosine kernel of order 0 (NNGP only: its derivative is a Dirac delta)."""
    return RectifiedMonomial(0)


@dataclass(frozen=True)
class Sign(Activation):
    """``sign(x)`` (NNGP only: its derivative is a Dirac delta)."""

    @property
    def kind(self) -> str:
        return "sign"

    @property
    def has_ntk(self) -> bool:
        return False


@dataclass(frozen=True)
class Erf(Activation):
    """``erf(x)``: T = 2/pi * arcsin(2 s12 / sqrt((1 + 2 s1)(1 + 2 s2)))."""

    @property
    def kind(self) -> str:
        return "erf"


_SHORTHANDS = {
    "relu": ReLU,
    "leaky_relu": LeakyReLU,
    "leakyrelu": LeakyReLU,
    "abs": Abs,
    "step": Step,
    "sign": Sign,
    "erf": Erf,
    "identity": Identity,
    "linear": Identity,
}

ActivationLike = Union[str, Activation]


def resolve(activation: ActivationLike) -> Activation:
    """Turn a string shorthand or an Activation into an Activation; ValueError lists the valid ones."""
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        key = activation.strip().lower().replace("-", "_")
        if key in _SHORTHANDS:
            return _SHORTHANDS[key]()
    valid = ", ".join(sorted(_SHORTHANDS)) + (
        ", or an object: ReLU(), LeakyReLU(alpha), ABReLU(a, b), Abs(), RectifiedMonomial(n), Step(),"
        " Sign(), Erf(), Identity() from arcflow.activations")
    raise ValueError(f"unknown activation {_short(activation)}; valid activations are: {valid}")
