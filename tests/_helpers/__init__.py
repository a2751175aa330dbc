"""Shared pieces of the test suite: constants, oracles and assertions that several test modules use.

Test modules import from here (``from _helpers.kernels import ACTIVATIONS``), never from one another:
pytest puts tests/ on sys.path (rootdir-relative "prepend" import mode, tests/ has no __init__.py), so
this package is importable from ``python -m pytest`` at the repository root and from a single test file.
"""
