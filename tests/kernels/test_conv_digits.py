"""examples/conv_digits.py on a small subset of the digits: the printed table and the returned numbers agree, every
kernel classifies above chance, and the convolutional kernels the SVM got equal arcflow.reference_conv's exact
float64 evaluation of the networks the example describes (ops written out here, not taken from the example)."""
from __future__ import annotations

import importlib.util
import io
import re
from pathlib import Path

import numpy as np
import pytest

from arcflow import activations, reference_conv
from arcflow.demo import load_data

from _helpers.numeric import rel_err

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "conv_digits.py"
N, DEPTHS = 120, (3, 4)   # a small stratified subset (the example's own minimum is 50)
# Digits have a zero background, so two images often have collinear patches (a single ink pixel at the same spot):
# cosine 1 computed with rounding, where arccos turns an ulp into ~1e-8 in the angle. reference_conv computes such
# pairs of different images naively (its docstring: off by up to ~1e-8 there; two NumPy runs on different batches
# already differ by ~1e-12), so the agreement bar is 1e-8 here, not the 1e-12 of the random networks.
TOL_COLLINEAR = 1e-8
NAMES = ["FC NTK", "FC NNGP", "CNTK-GAP", "CNN-GP-GAP", "CNTK-Flatten", "CNN-GP-Flatten"]
ROW = re.compile(r"^(FC NTK|FC NNGP|CNTK-GAP|CNN-GP-GAP|CNTK-Flatten|CNN-GP-Flatten)\s{2,}(.+?)\s+([\d.]+)s\s+"
                 r"((?:dep|depth)=.*?C=\S+)\s+([\d.]+)%\s+([\d.]+)%$")


def _example():
    spec = importlib.util.spec_from_file_location("conv_digits", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ran():
    mod = _example()
    buf = io.StringIO()
    res = mod.run(n=N, depths=DEPTHS, out=buf)
    return mod, res, buf.getvalue()


def test_table_structure_and_returned_numbers(ran):
    _, res, text = ran
    rows = [ROW.match(line) for line in text.splitlines()]
    rows = [m for m in rows if m]
    assert [m.group(1) for m in rows] == NAMES
    assert [r["kernel"] for r in res["rows"]] == NAMES
    assert res["n"] == N and res["depths"] == DEPTHS
    for m, r in zip(rows, res["rows"]):
        assert float(m.group(3)) == pytest.approx(r["time_s"], abs=1e-3) and r["time_s"] >= 0
        assert float(m.group(5)) == pytest.approx(100 * r["val_acc"], abs=0.006)
        assert float(m.group(6)) == pytest.approx(100 * r["test_acc"], abs=0.006)
        assert m.group(4).endswith(f"C={r['C']:g}")
        if r["kernel"].startswith(("CNTK", "CNN-GP")):
            assert r["label"][0] in DEPTHS
    # one call gives the CNTK and the CNN-GP of a readout: one time for both
    t = {r["kernel"]: r["time_s"] for r in res["rows"]}
    assert t["CNTK-GAP"] == t["CNN-GP-GAP"] and t["CNTK-Flatten"] == t["CNN-GP-Flatten"]
    assert re.search(r"^best test accuracy: (" + "|".join(NAMES) + r") \(", text, re.M)


def test_every_kernel_is_above_chance(ran):
    # 10 balanced classes: chance is 10%; digits are easy, so a broken kernel would not reach half
    _, res, _ = ran
    for r in res["rows"]:
        assert r["val_acc"] > 0.5 and r["test_acc"] > 0.5, r


def _ops(depth, readout):
    """depth x [Conv 3x3 SAME W_std^2 = 2 no bias, ReLU], the readout, Dense W_std = 1 no bias."""
    conv = (("conv", 3, 3, "SAME", 2.0, None), ("act", activations.ReLU()))
    return conv * depth + ((readout,), ("dense", 1.0, None))


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("readout", ["GAP", "Flatten"])
def test_conv_kernels_equal_reference_conv(ran, readout, depth):
    _, res, _ = ran
    X, _, _, _ = load_data(N, 0)
    images = np.sqrt(64) * X.reshape(-1, 8, 8, 1)
    np.testing.assert_array_equal(res["images"], images)
    k = res["kernels"][readout][depth]
    a, b = np.arange(0, 4), np.arange(60, 63)   # a few images: x1 with itself and x1 vs x2
    ops = _ops(depth, "gap" if readout == "GAP" else "flatten")
    sym = reference_conv.evaluate(ops, images[a], None, diag=False, want_nngp=True, want_ntk=True)
    cross = reference_conv.evaluate(ops, images[a], images[b], diag=False, want_nngp=True, want_ntk=True)
    for f in ("nngp", "ntk"):
        got = getattr(k, f)
        assert got.shape == (N, N) and got.dtype == np.float64
        assert rel_err(got[np.ix_(a, a)], getattr(sym, f)) < TOL_COLLINEAR
        assert rel_err(got[np.ix_(a, b)], getattr(cross, f)) < TOL_COLLINEAR


def test_main_parses_its_options(monkeypatch):
    mod = _example()
    seen = {}
    monkeypatch.setattr(mod, "run", lambda **kw: seen.update(kw))
    assert mod.main(["--n", "60", "--threads", "1", "--depths", "2,4", "--seed", "3"]) == 0
    assert seen == dict(n=60, depths=(2, 4), seed=3, threads=1)
    for bad in (["--n", "10"], ["--n", "1798"], ["--depths", "3,x"], ["--depths", "0"], ["--threads", "0"]):
        with pytest.raises(SystemExit) as e:
            mod.main(bad)
        assert e.value.code == 2
