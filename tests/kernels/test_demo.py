"""The demo (python -m arcflow demo) in its quick form: arcflow's kernels give the reference's accuracy."""
from __future__ import annotations

import re

import pytest

from arcflow import demo
from arcflow.__main__ import main as cli_main

ROW = re.compile(r"^(NTK|NNGP)\s+(arcflow \(C\+\+\)|NumPy reference)\s+.*?([\d.]+)%\s+([\d.]+)%\s*$")


def _accuracies(text: str) -> dict:
    found = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            found[(m.group(1), m.group(2).split()[0])] = (float(m.group(3)), float(m.group(4)))
    return found


def test_quick_demo_prints_equal_accuracies(capsys):
    assert cli_main(["demo", "--quick"]) == 0
    text = capsys.readouterr().out
    acc = _accuracies(text)
    assert set(acc) == {("NTK", "arcflow"), ("NTK", "NumPy"), ("NNGP", "arcflow"), ("NNGP", "NumPy")}
    assert acc[("NTK", "arcflow")] == acc[("NTK", "NumPy")]
    assert acc[("NNGP", "arcflow")] == acc[("NNGP", "NumPy")]
    assert acc[("NTK", "arcflow")][1] > 80.0  # digits are easy: a broken kernel would not get here
    assert "accuracies equal (arcflow vs reference): yes" in text
    assert "speed-up" in text


def test_run_returns_numbers_and_same_kernels(capsys):
    res = demo.run(n=120, d_max=2, irevnet=False)
    capsys.readouterr()
    assert res["equal"] and res["grid_cells_differing"] == 0
    assert res["accuracy"]["NTK/arcflow"] == res["accuracy"]["NTK/reference"]
    assert res["accuracy"]["NNGP/arcflow"] == res["accuracy"]["NNGP/reference"]
    assert res["max_rel_diff"]["ntk"] < 1e-12 and res["max_rel_diff"]["nngp"] < 1e-12
    assert set(res["time_s"]) == {"NTK/arcflow", "NTK/reference", "NNGP/arcflow", "NNGP/reference"}


def _fake_irevnet(monkeypatch, fn):
    import sys
    import types

    mod = types.ModuleType("arcflow.invertible.demo")
    if fn is not None:
        mod.run_irevnet_demo = fn
    monkeypatch.setitem(sys.modules, "arcflow.invertible.demo", mod)


def _not_implemented(images, png_path=None):
    raise NotImplementedError


def test_irevnet_part_absent_or_not_implemented(capsys, monkeypatch, tmp_path):
    import numpy as np

    images = np.random.default_rng(0).random((4, 8, 8))
    for fn in (None, _not_implemented):
        _fake_irevnet(monkeypatch, fn)
        assert demo.irevnet_part(images, str(tmp_path / "irev.png")) is None
        assert "not available yet" in capsys.readouterr().out


def test_irevnet_part_prints_the_error(capsys, monkeypatch, tmp_path):
    import numpy as np

    seen = {}

    def fake(images, png_path=None):
        seen["shape"], seen["png"] = images.shape, png_path
        return 3.5e-16

    _fake_irevnet(monkeypatch, fake)
    images = np.random.default_rng(0).random((4, 8, 8))
    assert demo.irevnet_part(images, str(tmp_path / "irev.png")) == 3.5e-16
    assert seen["shape"] == (4, 1, 8, 8) and seen["png"].endswith("irev.png")
    assert "3.5e-16" in capsys.readouterr().out


def test_irevnet_part_prints_a_result_dict(capsys, monkeypatch):
    import numpy as np

    def fake(images, png_path=None):
        return {"rel_error": 2e-7, "rel_error_float64": 4e-16, "blocks": 3, "seconds": 0.01,
                "png": png_path}

    _fake_irevnet(monkeypatch, fake)
    demo.irevnet_part(np.zeros((2, 8, 8)), None)
    line = capsys.readouterr().out
    assert "2e-07 (float32)" in line and "4e-16 (float64)" in line and "figure" not in line


def test_cli_rejects_unknown_command():
    with pytest.raises(SystemExit):
        cli_main(["no-such-command"])
