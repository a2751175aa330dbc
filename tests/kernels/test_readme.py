"""Every Python code block of README.md runs as written (the README is the user's first contact)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i):
    namespace: dict = {}
    exec(compile(BLOCKS[i], f"README.md python block {i}", "exec"), namespace)
    if "x_rec" in namespace:  # the i-RevNet example: the inverse recovers the input
        x, x_rec = namespace["x"], namespace["x_rec"]
        assert np.max(np.abs(x_rec - x)) <= 1e-4 * np.max(np.abs(x))
