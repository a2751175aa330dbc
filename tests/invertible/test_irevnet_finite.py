"""NaN/Inf inputs of IRevNetBlock.forward / .inverse, detected inside the convolutions (x2 in the first conv's
input pass, x1 as the last conv's addend; _ops.conv2d(fused_finite=...)): every position and value is caught
with the block's message, and huge finite values are not rejected and give the oracle's numbers."""
import numpy as np
import pytest

from arcflow.invertible import IRevNetBlock
from arcflow.invertible import _ops
from _helpers.invertible import REL, block_forward_np, bottleneck_np, conv2d_oracle, psi_inv_np, randomize_bn, rel_err

FINITE_CASES = [
    # in_ch, out_ch, stride, first; H, W: W leaves a vector part and a tail in the input pass (stride 2:
    # W/2 = 9) and in the epilogue's output rows
    (16, 8, 1, False),   # plain stride 1
    (16, 8, 1, True),    # first block: raw x2 straight into the conv
    (8, 16, 2, False),   # stride 2: x1 reaches the last conv as psi(x1) (accumulate)
    (8, 16, 2, True),
    (3, 8, 1, True),     # injective: x1, x2 regrouped with zero channels
    (12, 16, 1, False),
]
BAD = [np.nan, np.inf, -np.inf]


def make_block(case, dtype, seed=0):
    in_ch, out_ch, stride, first = case
    blk = IRevNetBlock(in_ch, out_ch, stride, first, mult=4 if out_ch >= 8 else 2, rng=seed, dtype=dtype)
    randomize_bn(blk, np.random.default_rng(seed + 1))
    return blk


def block_inverse_np(blk, a, b):
    """float64 oracle of the inverse: x2 = psi^-1(a), x1 = psi^-1(b - F(x2)), then undo the padding."""
    x2 = psi_inv_np(a) if blk.stride == 2 else a
    x1 = b - bottleneck_np(blk, x2)
    if blk.stride == 2:
        x1 = psi_inv_np(x1)
    x = np.concatenate([x1, x2], axis=1)[:, : blk.in_ch]
    return x[:, : blk.in_ch // 2], x[:, blk.in_ch // 2:]


def inputs(blk, inverse, dtype, n=2, seed=3):
    """A finite input pair of the block (forward: x1, x2; inverse: a, b), H=6 and W=11 (stride 2: W=18)."""
    rng = np.random.default_rng(seed)
    h, w = (6, 18) if blk.stride == 2 else (6, 11)
    if inverse:
        s = blk.stride
        return tuple(rng.standard_normal((n, blk.out_ch, h // s, w // s)).astype(dtype) for _ in range(2))
    c1 = blk.in_ch // 2
    return (rng.standard_normal((n, c1, h, w)).astype(dtype),
            rng.standard_normal((n, blk.in_ch - c1, h, w)).astype(dtype))


def positions(shape):
    size = int(np.prod(shape))
    rng = np.random.default_rng(size)
    return [0, size - 1, size // 2, int(rng.integers(size))]


@pytest.mark.parametrize("merged", [False, True], ids=["pair", "merged"])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", FINITE_CASES)
def test_block_rejects_nan_and_inf_anywhere(case, dtype, inverse, merged, conv2d_isa):
    blk = make_block(case, dtype)
    pair = inputs(blk, inverse, dtype)
    run = blk.inverse if inverse else blk.forward
    where = f"{blk!r}.inverse" if inverse else repr(blk)
    run(pair)  # finite: no error
    for which in (0, 1):
        for pos in positions(pair[which].shape):
            for bad in BAD:
                arrs = [p.copy() for p in pair]
                arrs[which].reshape(-1)[pos] = bad
                arg = np.concatenate(arrs, axis=1) if merged else tuple(arrs)
                with pytest.raises(ValueError) as err:
                    run(arg)
                assert str(err.value) == f"{where}: input contains NaN or Inf", (which, pos, bad)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_block_rejects_nan_on_the_few_images_path(inverse, conv2d_isa):
    """3 images on 2 threads: the convolutions split channels and pixel tiles of one image over the threads."""
    blk = IRevNetBlock(64, 32, stride=1, rng=0)
    randomize_bn(blk, np.random.default_rng(1))
    rng = np.random.default_rng(2)
    pair = tuple(rng.standard_normal((3, 32, 32, 32)).astype(np.float32) for _ in range(2))
    run = blk.inverse if inverse else blk.forward
    where = f"{blk!r}.inverse" if inverse else repr(blk)
    for which in (0, 1):
        for pos in positions(pair[which].shape):
            arrs = [p.copy() for p in pair]
            arrs[which].reshape(-1)[pos] = np.nan
            with pytest.raises(ValueError, match=f"^{where}: input contains NaN or Inf$".replace("(", r"\(")
                               .replace(")", r"\)")):
                run(tuple(arrs), threads=2)


HUGE = {np.float32: 1e30, np.float64: 1e200}  # finite, but the square overflows


def rel_err_scaled(a, b):
    """rel_err with both sides divided by max|b| first (a norm of 1e200 entries overflows)."""
    s = float(np.abs(b).max())
    return rel_err(np.asarray(a, np.float64) / s, np.asarray(b, np.float64) / s)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", FINITE_CASES)
def test_block_accepts_huge_finite_values(case, dtype, conv2d_isa):
    blk = make_block(case, dtype)
    big = HUGE[dtype]
    for which in (0, 1):
        x1, x2 = inputs(blk, False, dtype)
        arrs = [x1, x2]
        for pos, sign in zip(positions(arrs[which].shape), (1, -1, 1, -1)):
            arrs[which].reshape(-1)[pos] = sign * big
        a, b = blk.forward((x1, x2))
        ra, rb = block_forward_np(blk, x1.astype(np.float64), x2.astype(np.float64))
        got, want = np.concatenate([a, b], 1), np.concatenate([ra, rb], 1)
        assert np.isfinite(want).all() and np.isfinite(got).all()
        assert rel_err_scaled(got, want) <= 10 * REL[dtype]
        small = np.abs(want) < 1e6  # the entries the huge ones do not reach
        assert small.sum() > want.size // 4
        assert rel_err(got[small], want[small]) <= 10 * REL[dtype]
        # inverse of huge finite (a, b): accepted, and the oracle's numbers
        x1i, x2i = blk.inverse((a, b))
        o1, o2 = block_inverse_np(blk, a.astype(np.float64), b.astype(np.float64))
        assert rel_err_scaled(np.concatenate([x1i, x2i], 1), np.concatenate([o1, o2], 1)) <= 10 * REL[dtype]


def test_block_overflow_inside_f_is_not_an_input_error():
    """Finite input whose F overflows float32: a FloatingPointError naming the block and the layer, not
    the input error (the float64 oracle on the same float32 values shows where the range is left)."""
    blk = IRevNetBlock(16, 8, 1, first=True, rng=0)
    x1, x2 = inputs(blk, False, np.float32)
    x2[:] = 3e38
    # the first conv's output already leaves the float32 range in the oracle
    h = conv2d_oracle(x2.astype(np.float64), blk.state_dict()["bottleneck_block.0.weight"].astype(np.float64),
                      None, 1, 1)
    assert np.abs(h).max() > np.finfo(np.float32).max
    with pytest.raises(FloatingPointError, match=r"^IRevNetBlock\(in_ch=16.*bottleneck_block\.0"):
        blk.forward((x1, x2))
    with pytest.raises(FloatingPointError, match=r"bottleneck_block\.0"):
        blk.bottleneck(x2)


def test_block_output_overflow_names_the_sum():
    """F finite, x1 + F(x2) beyond float32: FloatingPointError for the block's output (forward and inverse)."""
    blk = IRevNetBlock(16, 8, 1, first=True, rng=0)
    x1, x2 = inputs(blk, False, np.float32)
    x2 *= np.float32(1e34)  # F ~ 1e33 (positively homogeneous with the default batch-norms), hidden layers finite
    f = bottleneck_np(blk, x2.astype(np.float64))
    big = np.finfo(np.float32).max
    x1 = np.where(f > 0, big, np.float32(0.0)).astype(np.float32)
    # the sum leaves float32 by far more than half an ulp of the largest float32 (2**103)
    assert np.isfinite(f).all() and (x1.astype(np.float64) + f).max() > float(big) + 2.0 ** 110
    with pytest.raises(FloatingPointError, match=r"output x1 \+ F\(x2\)"):
        blk.forward((x1, x2))
    # inverse: b - F(x2) below -max
    with pytest.raises(FloatingPointError, match=r"x1 = b - F\(x2\)"):
        blk.inverse((x2, -x1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv2d_fused_finite(dtype, conv2d_isa):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 9)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    scale, shift = np.full(3, 2.0, dtype), np.full(3, -0.5, dtype)
    add = rng.standard_normal((2, 4, 5, 9)).astype(dtype)
    ref = _ops.conv2d(x, w, None, 1, 1, in_scale=scale, in_shift=shift, in_relu=True, addend=add)
    got = _ops.conv2d(x, w, None, 1, 1, in_scale=scale, in_shift=shift, in_relu=True, addend=add,
                      check_finite=False, fused_finite=("x", "addend"))
    np.testing.assert_array_equal(got, ref)
    for bad in BAD:
        xb = x.copy()
        xb[1, 2, 4, 8] = bad  # ReLU(NaN * 2 - 0.5) and ReLU(-Inf) are 0: the raw value is tested
        with pytest.raises(ValueError, match="^conv2d: input contains NaN or Inf$"):
            _ops.conv2d(xb, w, None, 1, 1, in_scale=scale, in_shift=shift, in_relu=True, check_finite=False,
                        fused_finite=("x",))
        _ops.conv2d(xb, w, None, 1, 1, check_finite=False, fused_finite=("addend",), addend=add)  # x not asked
        ab = add.copy()
        ab[0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match="^blk: input contains NaN or Inf$"):
            _ops.conv2d(x, w, None, 1, 1, addend=ab, check_finite=False, fused_finite=("addend",), where="blk")
        out = ab.copy()  # accumulate: out's old values are the addend
        with pytest.raises(ValueError, match="NaN or Inf"):
            _ops.conv2d(x, w, None, 1, 1, out=out, accumulate=True, check_finite=False, fused_finite=("addend",))
    with pytest.raises(ValueError, match="fused_finite"):
        _ops.conv2d(x, w, fused_finite=("w",))
