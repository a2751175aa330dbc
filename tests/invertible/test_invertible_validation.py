"""Weights and arguments the invertible blocks must refuse, and overflows they must report: values that do
not fit the weights' dtype, impossible batch-norm statistics, 1x1 convolutions whose inverse cannot be
computed in the dtype, non-integer sizes, float32 forwards that leave the float32 range (the float64 NumPy
oracle decides where), tensors NumPy cannot hold."""
import numpy as np
import pytest

from arcflow.invertible import (ActNorm, AffineCoupling, InjectivePad, IRevNet, IRevNetBlock, InvertibleConv1x1,
                                Sequential, SpaceToDepth, from_torch)
from arcflow.invertible import _ops
from _helpers.invertible import bn_relu_np, conv2d_oracle, psi_np, randomize_bn

F32_MAX = float(np.finfo(np.float32).max)


def small_net(dtype=np.float32, rng=0):
    return IRevNet([2, 2], [1, 2], [8, 32], init_ds=0, in_shape=(4, 8, 8), mult=4, n_classes=3, rng=rng, dtype=dtype)


# ---- state dicts ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("owner", ["block", "net", "sequential"])
def test_float32_weight_beyond_float32_range_is_rejected(owner):
    """1e39 is finite as given (float64) but Inf once stored in float32: the test runs after the cast."""
    if owner == "net":
        model, key = small_net(), "stack.1.bottleneck_block.2.weight"
    elif owner == "block":
        model, key = IRevNetBlock(16, 8, rng=0), "bottleneck_block.2.weight"
    else:
        model, key = Sequential(IRevNetBlock(16, 8, rng=0)), "0.bottleneck_block.2.weight"
    sd = model.state_dict()
    assert sd[key].dtype == np.float32
    before = {k: v.copy() for k, v in sd.items()}
    bad = dict(sd)
    bad[key] = np.full(sd[key].shape, 1e39)
    assert np.isfinite(bad[key]).all()
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + r" \(max \|value\| 1e\+39 overflows float32"):
        model.load_state_dict(bad)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    ok = dict(sd)
    ok[key] = np.full(sd[key].shape, 3e38)  # within range: accepted
    model.load_state_dict(ok)


def test_negative_running_var_is_rejected():
    blk = IRevNetBlock(16, 8, rng=0)
    sd = blk.state_dict()
    sd["bottleneck_block.0.running_var"] = sd["bottleneck_block.0.running_var"].copy()
    sd["bottleneck_block.0.running_var"][3] = -0.5
    with pytest.raises(ValueError, match=r"bottleneck_block\.0\.running_var \(negative variance -0\.5\)"):
        blk.load_state_dict(sd)
    net = small_net()
    with pytest.raises(ValueError, match=r"bn1\.running_var \(negative variance"):
        net.load_state_dict({"bn1.running_var": -np.ones(64)}, strict=False)
    sd["bottleneck_block.0.running_var"][3] = 0.0  # zero is a valid (degenerate) variance
    blk.load_state_dict(sd)


def test_num_batches_tracked_must_be_a_whole_number():
    blk = IRevNetBlock(16, 8, rng=0)
    key = "bottleneck_block.3.num_batches_tracked"
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + r" \(not an integer"):
        blk.load_state_dict({key: np.array(1.5)}, strict=False)
    assert blk.state_dict()[key] == 0
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + r" \(must be a non-negative integer"):
        blk.load_state_dict({key: np.array(-2)}, strict=False)
    blk.load_state_dict({key: np.array(7.0)}, strict=False)  # a whole float is fine
    assert blk.state_dict()[key] == 7 and blk.state_dict()[key].dtype == np.int64
    blk.load_state_dict({key: np.int64(9)}, strict=False)
    assert blk.state_dict()[key] == 9


def _conv1x1_with_s(s_small, c=4, lu=True):
    blk = InvertibleConv1x1(c, lu=lu, rng=0)
    sd = blk.state_dict()
    if lu:
        sd["s"] = sd["s"].copy()
        sd["s"][1] = s_small
    else:
        u, _, vt = np.linalg.svd(sd["weight"])
        sv = np.ones(c)
        sv[-1] = s_small
        sd["weight"] = (u * sv) @ vt
    return blk, sd


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "full"])
def test_conv1x1_whose_inverse_is_inaccurate_in_float64_is_rejected(lu):
    blk, sd = _conv1x1_with_s(1e-300, lu=lu)
    before = blk.weight
    key = "s" if lu else "weight"
    with pytest.raises(ValueError, match=rf"InvertibleConv1x1\.load_state_dict: invalid values: {key} \(.*"
                                         r"ill-conditioned.*float64"):
        blk.load_state_dict(sd)
    np.testing.assert_array_equal(blk.weight, before)


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "full"])
def test_conv1x1_ill_conditioned_for_float32_only(lu):
    """s = 1e-8: fine in float64 (the round trip matches to the float64 bound), refused for float32 input,
    where the round trip would be off by O(1) (shown here with NumPy's own float32 arithmetic)."""
    blk, sd = _conv1x1_with_s(1e-8, lu=lu)
    blk.load_state_dict(sd)
    x = np.random.default_rng(1).standard_normal((2, 4, 3, 3))
    w = blk.weight
    cond = np.linalg.cond(w)
    assert 1e7 < cond < 1e9
    err64 = np.abs(blk.inverse(blk.forward(x)) - x).max()
    assert err64 <= cond * 1e-15
    w32, winv32 = w.astype(np.float32), np.linalg.inv(w).astype(np.float32)
    x32 = x.astype(np.float32)
    y32 = np.einsum("ij,njhw->nihw", w32, x32)
    assert np.abs(np.einsum("ij,njhw->nihw", winv32, y32) - x32).max() > 1e-2  # float32 cannot invert it
    key = "s" if lu else "weight"
    for fn, where in ((blk.forward, "InvertibleConv1x1"), (blk.inverse, r"InvertibleConv1x1\.inverse")):
        with pytest.raises(ValueError, match=rf"^{where}: {key} \(.*condition number .* float32.*compute in float64"):
            fn(x32)


# ---- integer arguments ------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda v: SpaceToDepth(v), lambda v: InjectivePad(v), lambda v: IRevNetBlock(8, 16, stride=v),
    lambda v: IRevNetBlock(v, 8), lambda v: ActNorm(v), lambda v: InvertibleConv1x1(v),
    lambda v: AffineCoupling(v), lambda v: _ops.psi(np.zeros((1, 1, 4, 4)), v),
    lambda v: IRevNet([v], [1], [8], init_ds=0, in_shape=(4, 8, 8)),
], ids=["SpaceToDepth", "InjectivePad", "IRevNetBlock.stride", "IRevNetBlock.in_ch", "ActNorm",
        "InvertibleConv1x1", "AffineCoupling", "psi", "IRevNet.n_blocks"])
def test_sizes_must_be_integers(make):
    for bad in (2.7, 2.0, "2", True):
        with pytest.raises(TypeError, match="must be an integer"):
            make(bad)
    make(np.int64(2))  # NumPy integers are integers
    make(np.int32(2))


def test_space_to_depth_numpy_integer_block():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    psi = SpaceToDepth(np.int64(2))
    assert psi.block == 2 and type(psi.block) is int
    np.testing.assert_array_equal(psi.forward(x), psi_np(x))


# ---- float32 overflow in a forward: FloatingPointError naming where --------------------------------------

def _first_overflow_np(net, x, limit=F32_MAX):
    """(block index, layer) where the float64 NumPy oracle of net.forward(x) first exceeds ``limit`` (the
    float32 range): layer is the key of the convolution inside F, or "output" for the block's sum."""
    n = net.in_ch // 2
    x1, x2 = x[:, :n].astype(np.float64), x[:, n:].astype(np.float64)
    for i, blk in enumerate(net.stack):
        sd = blk.state_dict()
        if blk.injective:
            xx = np.concatenate([x1, x2, np.zeros((x1.shape[0], blk.pad) + x1.shape[2:])], axis=1)
            x1, x2 = xx[:, : blk.out_ch], xx[:, blk.out_ch:]
        h, stride, bn_over = x2, blk.stride, False
        for kind, j, _ in blk._layout:  # the reference nn.Sequential order
            if kind == "bn":  # fused into the next convolution's input pass: counted as that layer
                h = bn_relu_np(h, sd, f"bottleneck_block.{j}.")
                bn_over = np.abs(h).max() > limit
                continue
            h = conv2d_oracle(h, sd[f"bottleneck_block.{j}.weight"], None, stride, 1)
            stride = 1
            last = j == blk._layout[-1][1]  # its result and the sum x1 + F(x2) are one step: "output"
            if bn_over or (np.abs(h).max() > limit and not last):
                return i, f"bottleneck_block.{j}"
            if last and np.abs(h).max() > limit:
                return i, "output"
        if blk.stride == 2:
            x1, x2 = psi_np(x1), psi_np(x2)
        x1, x2 = x2, x1 + h
        if np.abs(x2).max() > limit:
            return i, "output"
    return None


@pytest.mark.parametrize("case", [
    (None, 1e30),                                    # plain input: finite
    ((2, 0, 1e25), 1e20), ((2, -1, 1e30), 1e15),     # a block with large weights: its first / last convolution
    ((3, 1, 1e30), 1e10),                            # the middle convolution of the last block
], ids=["finite", "stack2-first-conv", "stack2-last-conv", "stack3-middle-conv"])
def test_irevnet_float32_overflow_names_the_block(case):
    scaled, scale = case
    net = small_net()
    randomize_bn(net, np.random.default_rng(2))
    if scaled is not None:
        i, m, factor = scaled
        key = f"stack.{i}.bottleneck_block.{[j for k, j, _ in net.stack[i]._layout if k == 'conv'][m]}.weight"
        sd = net.state_dict()
        sd[key] = sd[key] * np.float32(factor)
        net.load_state_dict(sd)
    x = np.random.default_rng(3).standard_normal((2, 4, 8, 8))
    xs = (x / np.abs(x).max() * scale).astype(np.float32)
    where = _first_overflow_np(net, xs)
    # float32 partial sums may overflow a little before the exact value does: a case counts only when
    # the oracle places it the same with a 16x margin
    assert where == _first_overflow_np(net, xs, F32_MAX / 16)
    if where is None:
        assert np.isfinite(net.forward(xs)).all()
        return
    i, layer = where
    for threads in (1, 2):  # the main thread and the thread-pool path
        with pytest.raises(FloatingPointError) as err:
            net.forward(xs, threads=threads)
        msg = str(err.value)
        assert msg.startswith(f"IRevNet.forward: block {i} (stack.{i})"), (msg, where)
        if layer == "output":
            assert "output psi(x1) + F(x2)" in msg and f"bottleneck_block.{net.stack[i]._layout[-1][1]}" in msg, msg
        else:
            assert f"overflowed float32 in {layer} " in msg, (msg, where)


def test_irevnet_float32_inverse_and_classify_overflow():
    net = small_net()
    sd = net.state_dict()
    sd["stack.3.bottleneck_block.2.weight"] = sd["stack.3.bottleneck_block.2.weight"] * np.float32(1e30)
    net.load_state_dict(sd)
    z = np.random.default_rng(4).standard_normal((2,) + net.out_shape).astype(np.float32)
    z = (z / np.abs(z).max() * np.float32(1e10)).astype(np.float32)
    # the oracle: the first convolution of the last block (the first one the inverse runs) leaves float32
    h = conv2d_oracle(bn_relu_np(z[:, :32].astype(np.float64), sd, "stack.3.bottleneck_block.0."),
                      sd["stack.3.bottleneck_block.2.weight"], None, 1, 1)
    assert np.abs(h).max() > F32_MAX
    for threads in (1, 2):
        with pytest.raises(FloatingPointError, match=r"^IRevNet\.inverse: block 3 \(stack\.3\): the bottleneck F "
                                                     r"overflowed float32 in bottleneck_block\.2 "):
            net.inverse(z, threads=threads)
    sd = net.state_dict()
    sd["linear.weight"] = np.full_like(sd["linear.weight"], 3e38)
    net.load_state_dict(sd)
    with pytest.raises(FloatingPointError, match="IRevNet.classify: the logits"):
        net.classify(np.abs(z))


def test_irevnet_nan_input_is_still_an_input_error():
    net = small_net()
    x = np.zeros((2, 4, 8, 8), np.float32)
    x[1, 3, 7, 7] = np.nan
    for threads in (1, 2):
        with pytest.raises(ValueError, match="^IRevNet.forward: input contains NaN or Inf$"):
            net.forward(x, threads=threads)
    z = np.zeros((2,) + net.out_shape, np.float32)
    z[0, -1, -1, -1] = np.inf
    with pytest.raises(ValueError, match="^IRevNet.inverse: input contains NaN or Inf$"):
        net.inverse(z)


def _coupling_float64_layers(cp, x1):
    p = cp.state_dict()
    a0 = conv2d_oracle(x1, p["subnet.0.weight"], p["subnet.0.bias"], 1, 1)
    a1 = conv2d_oracle(np.maximum(a0, 0), p["subnet.2.weight"], p["subnet.2.bias"], 1, 0)
    a2 = conv2d_oracle(np.maximum(a1, 0), p["subnet.4.weight"], p["subnet.4.bias"], 1, 1)
    return a0, a1, a2


def test_affine_coupling_overflow_names_the_layer():
    cp = AffineCoupling(4, hidden=6, rng=0, zero_init=False)
    sd = cp.state_dict()
    sd["subnet.2.weight"] = sd["subnet.2.weight"] * 1e30
    cp.load_state_dict(sd)
    x = (np.random.default_rng(5).standard_normal((2, 4, 5, 5)) * 1e10).astype(np.float32)
    a0, a1, _ = _coupling_float64_layers(cp, x[:, :2].astype(np.float64))
    assert np.abs(a0).max() < F32_MAX < np.abs(a1).max()  # the oracle: subnet.2 leaves float32
    with pytest.raises(FloatingPointError, match=r"^AffineCoupling: the coupling network overflowed float32: the "
                                                 r"output of subnet\.2"):
        cp.forward(x)
    with pytest.raises(FloatingPointError, match=r"^AffineCoupling\.inverse: .*subnet\.2"):
        cp.inverse(x)
    # float64 has the range: the same weights work there
    y = cp.forward(x.astype(np.float64))
    assert np.isfinite(y).all()


def test_affine_coupling_exp_overflow_and_weight_beyond_float32():
    cp = AffineCoupling(4, hidden=6, rng=0, zero_init=False, clamp=0.0)  # no clamp: exp(s) can overflow
    sd = cp.state_dict()
    sd["subnet.4.bias"] = np.concatenate([np.full(2, 100.0), np.zeros(2)])  # s ~ 100: exp(100) > float32 max
    cp.load_state_dict(sd)
    x = np.random.default_rng(6).standard_normal((1, 4, 3, 3)).astype(np.float32)
    _, _, a2 = _coupling_float64_layers(cp, x[:, :2].astype(np.float64))
    with np.errstate(over="ignore"):
        assert np.abs(x[:, 2:] * np.exp(a2[:, :2]) + a2[:, 2:]).max() > F32_MAX
    with pytest.raises(FloatingPointError, match=r"^AffineCoupling: y2 = x2 \* exp\(s\) \+ t overflowed float32"):
        cp.forward(x)
    sd["subnet.4.bias"] = np.zeros(4)
    sd["subnet.0.weight"] = np.full_like(sd["subnet.0.weight"], 1e39)  # finite in the float64 weights
    cp.load_state_dict(sd)
    with pytest.raises(FloatingPointError, match=r"subnet\.0\.weight .*overflows float32"):
        cp.forward(x)
    with pytest.raises(FloatingPointError, match=r"^Sequential: block 1: AffineCoupling: .*subnet\.0\.weight"):
        Sequential(ActNorm(4), cp).forward(x)


def test_actnorm_and_conv1x1_overflow():
    a = ActNorm(2)
    a.load_state_dict({"loc": np.zeros(2), "scale": np.array([1e-36, 1.0])})
    x = np.full((1, 2, 2, 2), 1e3, np.float32)
    assert 1e3 / 1e-36 > F32_MAX
    with pytest.raises(FloatingPointError, match=r"^ActNorm: y = \(x - loc\) / scale overflowed float32"):
        a.forward(x)
    assert np.isfinite(a.forward(x.astype(np.float64))).all()
    w = InvertibleConv1x1(2, lu=False)
    w.load_state_dict({"weight": np.array([[3e38, 0.0], [0.0, 3e38]])})
    with pytest.raises(FloatingPointError, match=r"^InvertibleConv1x1: y = W x overflowed float32"):
        w.forward(x)


# ---- tensors from PyTorch ---------------------------------------------------------------------------------

class _FakeTensor:
    """The parts of a torch tensor from_torch uses: bfloat16 has no NumPy dtype, .numpy() raises as torch does."""

    def __init__(self, values, dtype):
        self.values, self.dtype = np.asarray(values, np.float32), dtype

    def detach(self):
        return self

    def cpu(self):
        return self

    def float(self):
        return _FakeTensor(self.values, "torch.float32")

    def numpy(self):
        if self.dtype != "torch.float32":
            raise TypeError(f"Got unsupported ScalarType {self.dtype.split('.')[-1]}")
        return self.values.copy()


def test_from_torch_bfloat16_is_converted_exactly():
    net = small_net()
    sd = net.state_dict()
    key = "stack.0.bottleneck_block.0.weight"
    # values with 8 significant bits are exact in bfloat16
    vals = np.round(np.random.default_rng(7).uniform(-1, 1, sd[key].shape) * 64) / 64
    tensors = dict(sd)
    tensors[key] = _FakeTensor(vals, "torch.bfloat16")
    arrays = from_torch(tensors)
    assert arrays[key].dtype == np.float32
    np.testing.assert_array_equal(arrays[key], vals.astype(np.float32))
    from_torch(tensors, net)
    np.testing.assert_array_equal(net.state_dict()[key], vals.astype(np.float32))


def test_from_torch_unconvertible_tensor_names_the_key():
    net = small_net()
    tensors = dict(net.state_dict())
    tensors["bn1.weight"] = _FakeTensor(np.ones(64), "torch.float8_e4m3fn")
    with pytest.raises(TypeError, match=r"^from_torch: key 'bn1\.weight': cannot convert a tensor of dtype "
                                        r"torch\.float8_e4m3fn"):
        from_torch(tensors)
    with pytest.raises(ValueError, match=r"bn1\.weight .*float8"):
        net.load_state_dict(tensors)


def test_from_torch_real_bfloat16():
    torch = pytest.importorskip("torch")
    blk = IRevNetBlock(16, 8, rng=0)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in blk.state_dict().items()}
    key = "bottleneck_block.0.weight"
    sd[key] = sd[key].to(torch.bfloat16)
    arrays = from_torch(sd)
    np.testing.assert_array_equal(arrays[key], sd[key].float().numpy())


# ---- logdet of the injective network ----------------------------------------------------------------------

def test_irevnet_logdet_injective_network_explains():
    net = IRevNet.cifar10(n_blocks=[1, 1, 1])
    assert net.stack[0].injective
    with pytest.raises(ValueError, match=r"^IRevNet\.logdet: undefined for this network: block 0 \(stack\.0\) "
                                         r"pads 3 channels to 32 .*not square"):
        net.logdet(np.zeros((1, 3, 32, 32), np.float32))
    bij = IRevNet([1, 1], [2, 2], [24, 96], init_ds=2, in_shape=(3, 16, 16), n_classes=5, rng=0)
    assert not any(b.injective for b in bij.stack)
    ld = bij.logdet(np.zeros((3, 3, 16, 16), np.float32))
    np.testing.assert_array_equal(ld, np.zeros(3, np.float32))
