"""Invertible-network blocks of the i-RevNet family with exact forward and inverse (NCHW NumPy arrays)."""
from __future__ import annotations

__all__: list = []
