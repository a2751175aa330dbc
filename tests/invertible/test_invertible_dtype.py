"""One dtype-promotion rule for the invertible blocks, the kernels' (arcflow._dispatch.result_dtype): float16 and
float32 input compute in float32, everything else real in float64; the result equals the block run on the input
cast to that dtype by hand."""
import numpy as np
import pytest

from arcflow import _dispatch
from arcflow.invertible import (ActNorm, AffineCoupling, InjectivePad, IRevNet, IRevNetBlock, InvertibleConv1x1,
                                SpaceToDepth, _ops)

INPUT_DTYPES = [np.float16, np.float32, np.dtype(">f4"), np.float64, np.int32, np.uint8, np.bool_]


def _blocks():
    return {
        "psi": SpaceToDepth(2), "pad": InjectivePad(3),
        "block": IRevNetBlock(4, 2, stride=1, mult=1, rng=0, dtype=np.float64),
        "block_s2": IRevNetBlock(4, 8, stride=2, mult=2, rng=1, dtype=np.float64),
        "actnorm": ActNorm(4), "conv1x1": InvertibleConv1x1(4, rng=2),
        "coupling": AffineCoupling(4, hidden=6, rng=3, zero_init=False),
    }


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=lambda t: np.dtype(t).str)
def test_blocks_follow_the_kernels_dtype_rule(dtype):
    x = (np.random.default_rng(0).uniform(0, 3, (2, 4, 6, 6))).astype(dtype)
    want = _dispatch.result_dtype(x)
    assert want == (np.float32 if np.dtype(dtype).kind == "f" and np.dtype(dtype).itemsize <= 4 else np.float64)
    for name, blk in _blocks().items():
        if name == "actnorm":
            blk.initialize(x.astype(np.float64))
        y = blk.forward(x)
        assert y.dtype == want, name
        np.testing.assert_array_equal(y, blk.forward(x.astype(want)), err_msg=name)
        assert blk.inverse(y).dtype == want, name
    assert _ops.psi(x, 2).dtype == want
    assert _ops.conv2d(x, np.ones((1, 4, 1, 1))).dtype == want  # the data input decides, weights follow


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int16], ids=lambda t: np.dtype(t).name)
def test_irevnet_and_pairs_follow_the_rule(dtype):
    net = IRevNet([1, 1], [1, 2], [4, 16], init_ds=0, in_shape=(4, 8, 8), mult=2, n_classes=3, rng=0,
                  dtype=np.float64)
    x = np.random.default_rng(1).uniform(-2, 2, (2, 4, 8, 8)).astype(dtype)
    want = _dispatch.result_dtype(x)
    z = net.forward(x, threads=1)
    assert z.dtype == want and net.classify(z).dtype == want
    np.testing.assert_array_equal(z, net.forward(x.astype(want), threads=1))
    blk = net.stack[0]
    a, b = blk.forward((x[:, :2], x[:, 2:].astype(np.float16)))
    pair_dt = _dispatch.result_dtype(x[:, :2], x[:, 2:].astype(np.float16))
    assert a.dtype == pair_dt and b.dtype == pair_dt
