"""Invertible-network blocks of the i-RevNet family with exact forward and inverse (NCHW NumPy arrays).

Blocks: SpaceToDepth (psi), InjectivePad, IRevNetBlock, IRevNet (the whole reference architecture),
AffineCoupling, ActNorm, InvertibleConv1x1 and Sequential. See docs/mathematics.md §2.
"""
from __future__ import annotations

from .irevnet import SpaceToDepth, InjectivePad, IRevNetBlock, IRevNet, from_torch  # noqa: F401
from .flows import AffineCoupling, ActNorm, InvertibleConv1x1, Sequential  # noqa: F401

__all__ = [
    "SpaceToDepth", "InjectivePad", "IRevNetBlock", "IRevNet", "from_torch",
    "AffineCoupling", "ActNorm", "InvertibleConv1x1", "Sequential",
]
