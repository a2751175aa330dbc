"""i-RevNet blocks and network: exact inversion, a float64 NumPy oracle of the reference block, weights I/O, errors."""
import numpy as np
import pytest

from arcflow.invertible import InjectivePad, IRevNet, IRevNetBlock, SpaceToDepth, from_torch

from _helpers.invertible import (  # the float64 NumPy oracle of the reference block, and the block cases
    BLOCK_CASES, REL, assert_differs, block_forward_np, bn_relu_np, bottleneck_np, psi_inv_np, psi_np, randomize_bn,
    rel_err)


def test_assert_differs_is_a_real_negative_control():
    with pytest.raises(AssertionError):
        assert_differs(np.full(3, np.nan), np.zeros(3))      # `not np.allclose` passes here
    with pytest.raises(AssertionError):
        assert_differs(np.ones(3), np.ones(3) + 1e-9)
    assert_differs(np.ones(3), np.zeros(3) + 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", BLOCK_CASES)
def test_block_matches_numpy_oracle_and_inverts(case, dtype, conv2d_isa):
    in_ch, out_ch, stride, first, mult, affine, h = case
    rng = np.random.default_rng(sum(case[:3]) + h)
    blk = IRevNetBlock(in_ch, out_ch, stride, first, mult, affine, rng=1, dtype=dtype)
    randomize_bn(blk, rng)
    x = rng.standard_normal((3, in_ch, h, h if stride == 1 else h + 2)).astype(dtype)
    n1 = in_ch // 2
    x1, x2 = x[:, :n1], x[:, n1:]
    a, b = blk.forward((x1, x2))
    assert a.dtype == dtype and b.dtype == dtype
    ra, rb = block_forward_np(blk, x1.astype(np.float64), x2.astype(np.float64))
    assert a.shape == ra.shape and b.shape == rb.shape
    assert rel_err(np.concatenate([a, b], 1), np.concatenate([ra, rb], 1)) <= 10 * REL[dtype]
    y1, y2 = blk.inverse((a, b))
    assert rel_err(np.concatenate([y1, y2], 1), x) <= REL[dtype]
    # merged-array interface gives the same numbers
    z = blk.forward(x)
    np.testing.assert_array_equal(z, np.concatenate([a, b], 1))
    np.testing.assert_allclose(blk.inverse(z), x, rtol=0, atol=REL[dtype] * 10 * np.abs(x).max())
    np.testing.assert_allclose(blk.bottleneck(np.concatenate([x1, x2, np.zeros((3, blk.pad) + x.shape[2:], dtype)],
                                                            1)[:, out_ch:] if blk.injective else x2),
                               bottleneck_np(blk, (np.concatenate([x1, x2, np.zeros((3, blk.pad) + x.shape[2:])],
                                                                  1)[:, out_ch:] if blk.injective else x2)
                                             .astype(np.float64)),
                               rtol=0, atol=20 * REL[dtype] * max(1.0, np.abs(rb).max()))


def test_block_bijective_logdet_and_exact_stride1_inverse_float64():
    blk = IRevNetBlock(16, 8, 1, rng=0, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((2, 16, 6, 6))
    assert np.array_equal(blk.logdet(x), np.zeros(2))
    assert rel_err(blk.inverse(blk.forward(x)), x) <= 1e-15
    with pytest.raises(ValueError, match="log-determinant"):
        IRevNetBlock(3, 8, 1, rng=0).logdet(np.zeros((1, 3, 4, 4)))


def test_space_to_depth_and_injective_pad():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 6)).astype(np.float32)
    s = SpaceToDepth(2)
    y = s.forward(x)
    np.testing.assert_array_equal(y, psi_np(x))
    np.testing.assert_array_equal(s.inverse(y), x)
    np.testing.assert_array_equal(psi_inv_np(psi_np(x)), x)
    assert s.logdet(x).shape == (2,)
    p = InjectivePad(5)
    z = p.forward(x)
    assert z.shape == (2, 8, 4, 6) and not z[:, 3:].any()
    np.testing.assert_array_equal(p.inverse(z), x)
    with pytest.raises(ValueError, match=r"SpaceToDepth\(block=2\).*divisible by 2"):
        s.forward(np.zeros((1, 1, 3, 4)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        s.forward(np.full((1, 1, 2, 2), np.inf))
    with pytest.raises(ValueError, match=r"InjectivePad\(pad=5\)"):
        p.forward(np.zeros((3, 4)))


def small_net(dtype, rng=0):
    return IRevNet([2, 2, 2], [1, 2, 2], [16, 64, 256], init_ds=0, in_shape=(3, 16, 16), mult=4, n_classes=10,
                   rng=rng, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reduced_irevnet_inverts(dtype):
    net = small_net(dtype)
    randomize_bn(net, np.random.default_rng(1))
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(dtype)
    z = net.forward(x)
    assert z.shape == (2, 512, 4, 4) and z.dtype == dtype
    assert rel_err(net.inverse(z), x) <= REL[dtype]
    assert net.classify(z).shape == (2, 10)


def _digits_rgb32(n):
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits().images[:n] / 16.0                     # (n, 8, 8) in [0, 1]
    up = np.kron(d, np.ones((4, 4)))                                   # 32 x 32
    return np.repeat(up[:, None], 3, axis=1)                           # 3 channels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_full_cifar10_irevnet_inverts_random_and_real_images(dtype):
    net = IRevNet.cifar10(rng=3, dtype=dtype)
    assert len(net.stack) == 54 and net.out_shape == (512, 8, 8)
    randomize_bn(net, np.random.default_rng(4))
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(dtype)
    assert rel_err(net.inverse(net.forward(x)), x) <= REL[dtype]
    real = _digits_rgb32(2).astype(dtype)
    assert rel_err(net.inverse(net.forward(real)), real) <= REL[dtype]


def test_irevnet_thread_split_does_not_change_numbers():
    net = small_net(np.float32)
    x = np.random.default_rng(9).standard_normal((5, 3, 16, 16)).astype(np.float32)
    z1 = net.forward(x, threads=1)
    for t in (2, 3, 8):
        np.testing.assert_array_equal(net.forward(x, threads=t), z1)
        np.testing.assert_array_equal(net.inverse(z1, threads=t), net.inverse(z1, threads=1))
    np.testing.assert_array_equal(net.forward(x[:1], threads=4), z1[:1])


def test_irevnet_with_initial_psi_inverts():
    net = IRevNet([1, 2], [2, 2], [24, 96], init_ds=2, in_shape=(3, 16, 16), n_classes=5, rng=0,
                  dtype=np.float64)
    assert net.in_ch == 12 and net.out_shape == (192, 2, 2) and net.ds == 2
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16))
    z = net.forward(x)
    assert rel_err(net.inverse(z), x) <= 1e-12
    assert net.classify(z).shape == (3, 5)


def test_classify_matches_numpy():
    net = small_net(np.float64)
    randomize_bn(net, np.random.default_rng(6))
    z = np.random.default_rng(7).standard_normal((3,) + net.out_shape)
    sd = net.state_dict()
    a = bn_relu_np(z, sd, "bn1.")
    ref = a.mean(axis=(2, 3)) @ sd["linear.weight"].T + sd["linear.bias"]
    np.testing.assert_allclose(net.classify(z), ref, rtol=1e-12, atol=1e-12)
    x = np.random.default_rng(8).standard_normal((3, 3, 16, 16))
    np.testing.assert_array_equal(net.predict(x), net.classify(net.forward(x)))


def test_state_dict_keys_follow_the_reference():
    blk = IRevNetBlock(32, 16, 1, first=False)
    keys = list(blk.state_dict())
    assert keys[:5] == ["bottleneck_block.0.weight", "bottleneck_block.0.bias", "bottleneck_block.0.running_mean",
                        "bottleneck_block.0.running_var", "bottleneck_block.0.num_batches_tracked"]
    assert "bottleneck_block.2.weight" in keys and "bottleneck_block.9.weight" in keys
    assert blk.state_dict()["bottleneck_block.2.weight"].shape == (4, 16, 3, 3)
    first = IRevNetBlock(3, 16, 1, first=True, affine_bn=False).state_dict()
    assert list(first) == ["bottleneck_block.0.weight",
                           "bottleneck_block.1.running_mean", "bottleneck_block.1.running_var",
                           "bottleneck_block.1.num_batches_tracked", "bottleneck_block.3.weight",
                           "bottleneck_block.5.running_mean", "bottleneck_block.5.running_var",
                           "bottleneck_block.5.num_batches_tracked", "bottleneck_block.7.weight"]
    assert first["bottleneck_block.0.weight"].shape == (4, 16, 3, 3)  # injective: bottleneck sees out_ch
    net = IRevNet.cifar10(rng=0)
    sd = net.state_dict()
    assert sd["stack.0.bottleneck_block.0.weight"].shape == (4, 16, 3, 3)
    assert sd["stack.18.bottleneck_block.2.weight"].shape == (16, 16, 3, 3)
    assert sd["stack.18.bottleneck_block.9.weight"].shape == (64, 16, 3, 3)
    assert sd["stack.53.bottleneck_block.9.weight"].shape == (256, 64, 3, 3)
    assert sd["bn1.weight"].shape == (512,) and sd["linear.weight"].shape == (10, 512)
    assert list(sd)[-7:] == ["bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                             "bn1.num_batches_tracked", "linear.weight", "linear.bias"]


def test_load_state_dict_round_trip_and_errors_leave_weights_unchanged():
    a = small_net(np.float32, rng=0)
    b = small_net(np.float32, rng=1)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert_differs(a.forward(x), b.forward(x))
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    before = a.state_dict()
    za = a.forward(x)

    bad = b.state_dict()
    del bad["stack.1.bottleneck_block.2.weight"]
    bad["stack.0.extra"] = np.zeros(3)
    bad["linear.weight"] = np.zeros((3, 3))
    bad["stack.0.bottleneck_block.0.weight"] = np.ones((4, 16, 3, 3))  # valid, must not be applied
    with pytest.raises(ValueError) as e:
        a.load_state_dict(bad)
    msg = str(e.value)
    assert "stack.1.bottleneck_block.2.weight" in msg and "stack.0.extra" in msg and "linear.weight" in msg
    assert "missing" in msg and "unexpected" in msg and "shape" in msg
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    np.testing.assert_array_equal(a.forward(x), za)

    part = {"stack.0.bottleneck_block.0.weight": np.ones((4, 16, 3, 3)), "junk": np.zeros(1)}
    a.load_state_dict(part, strict=False)
    assert np.all(a.state_dict()["stack.0.bottleneck_block.0.weight"] == 1)
    with pytest.raises(ValueError, match="NaN"):
        a.load_state_dict({"bn1.weight": np.full(512, np.nan)}, strict=False)

    blk = IRevNetBlock(32, 16)
    with pytest.raises(ValueError, match="missing keys"):
        blk.load_state_dict({})
    # from_torch converts plain arrays too, and strips DataParallel's "module." prefix
    sd = {"module." + k: v for k, v in b.state_dict().items() if not k.endswith("num_batches_tracked")}
    c = from_torch(sd, small_net(np.float32, rng=5))
    np.testing.assert_array_equal(c.forward(x), b.forward(x))
    arrays = from_torch(b.state_dict())
    assert set(arrays) == set(b.state_dict())


def test_bad_input_errors_name_block_and_shape():
    blk = IRevNetBlock(16, 32, stride=2)
    with pytest.raises(ValueError, match=r"IRevNetBlock\(in_ch=16.*\(N, 16, H, W \(even\)\)"):
        blk.forward(np.zeros((1, 15, 8, 8)))
    with pytest.raises(ValueError, match=r"IRevNetBlock.*divisible by 2"):
        blk.forward(np.zeros((1, 16, 7, 8)))
    with pytest.raises(ValueError, match=r"IRevNetBlock.*ndim 3"):
        blk.forward(np.zeros((16, 8, 8)))
    with pytest.raises(ValueError, match=r"IRevNetBlock.*NaN or Inf"):
        blk.forward(np.full((1, 16, 8, 8), np.nan))
    with pytest.raises(ValueError, match=r"IRevNetBlock.*\(N, 8, H, W \(even\)\) for x1"):
        blk.forward((np.zeros((1, 7, 8, 8)), np.zeros((1, 8, 8, 8))))
    with pytest.raises(ValueError, match=r"IRevNetBlock.*inverse.*\(N, 64, H, W\)"):
        blk.inverse(np.zeros((1, 63, 4, 4)))
    with pytest.raises(ValueError, match="even in_ch"):
        IRevNetBlock(15, 30, stride=2)
    with pytest.raises(ValueError, match="shrink"):
        IRevNetBlock(64, 16, stride=1)
    net = small_net(np.float32)
    with pytest.raises(ValueError, match=r"IRevNet.forward.*\(N, 3, 16, 16\)"):
        net.forward(np.zeros((1, 3, 16, 8)))
    with pytest.raises(ValueError, match=r"IRevNet.inverse.*\(N, 512, 4, 4\)"):
        net.inverse(np.zeros((1, 511, 4, 4)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        net.forward(np.full((1, 3, 16, 16), np.inf))


def test_demo_inverts_digits(tmp_path):
    from arcflow.invertible.demo import run_irevnet_demo
    datasets = pytest.importorskip("sklearn.datasets")
    images = datasets.load_digits().images[:16] / 16.0
    png = tmp_path / "irevnet.png"
    res = run_irevnet_demo(images[:, None], png_path=str(png), rng=1)
    assert res["rel_error"] <= 1e-5 and res["rel_error_float64"] <= 1e-12
    assert res["shape"] == (16, 128, 2, 2) and res["seconds"] > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert res["png"] is None
    else:
        assert res["png"] == str(png) and png.stat().st_size > 0
    assert run_irevnet_demo(images[:3], png_path=None)["png"] is None
    with pytest.raises(ValueError, match="greyscale"):
        run_irevnet_demo(np.zeros((2, 3, 8, 8)))
