"""Parity with a PyTorch implementation of the reference i-RevNet (optional: skipped without torch; CI compares
with the outputs these modules recorded, tests/invertible/test_torch_golden.py).

The PyTorch modules (tests/invertible/make_torch_golden.py) follow the structure of the reference code
(jhjacobsen/pytorch-i-revnet, models/iRevNet.py and models/model_utils.py): the same module tree, hence the same
state_dict keys, the
same psi algorithm (split along W, stack, permute), the same pair order. Two fixes in the inverse only,
where the reference is wrong: the injective padding's inverse drops the appended channels, and the
initial psi is skipped when init_ds == 0.
"""
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from arcflow.invertible import IRevNet, IRevNetBlock, SpaceToDepth, from_torch  # noqa: E402
from make_torch_golden import TorchBlock, TorchIRevNet, TorchPsi, randomize  # noqa: E402


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def to_np(t):
    return t.detach().numpy()


def test_psi_matches_torch_transcription():
    x = torch.randn(2, 5, 8, 6)
    for b in (2,):
        y = TorchPsi(b)(x)
        np.testing.assert_array_equal(SpaceToDepth(b).forward(x.numpy()), to_np(y))
        np.testing.assert_array_equal(to_np(TorchPsi(b).inverse(y)), x.numpy())


@pytest.mark.parametrize("case", [
    (32, 16, 1, False, True, 8), (16, 32, 2, False, True, 8), (3, 16, 1, True, True, 8),
    (12, 24, 2, True, False, 6), (24, 16, 1, False, False, 5),
])
def test_block_parity_with_torch(case):
    in_ch, out_ch, stride, first, affine, h = case
    torch.manual_seed(sum(case[:3]))
    tb = randomize(TorchBlock(in_ch, out_ch, stride, first, affine), seed=1)
    blk = IRevNetBlock(in_ch, out_ch, stride, first, 4, affine, rng=9)
    from_torch(tb.state_dict(), blk)  # strict
    n1 = in_ch // 2
    x = torch.randn(2, in_ch, h, h if stride == 1 else h + 2)
    with torch.no_grad():
        ta, tb_ = tb((x[:, :n1], x[:, n1:]))
        a, b = blk.forward((x[:, :n1].numpy(), x[:, n1:].numpy()))
        assert rel(np.concatenate([a, b], 1), to_np(torch.cat((ta, tb_), 1))) <= 1e-5
        t1, t2 = tb.inverse((ta, tb_))
        y1, y2 = blk.inverse((to_np(ta), to_np(tb_)))
        assert rel(np.concatenate([y1, y2], 1), to_np(torch.cat((t1, t2), 1))) <= 1e-5
    assert set(blk.state_dict()) == set(tb.state_dict())


def _nets(cfg, seed=0):
    torch.manual_seed(seed)
    tnet = randomize(TorchIRevNet(cfg["n_blocks"], cfg["n_strides"], cfg["n_classes"], cfg["n_channels"],
                                  cfg["init_ds"], cfg["affine_bn"], list(cfg["in_shape"]), cfg["mult"]), seed + 1)
    net = IRevNet(**cfg, rng=seed + 2)
    return tnet, net


SMALL = dict(n_blocks=[2, 2, 2], n_strides=[1, 2, 2], n_channels=[16, 64, 256], init_ds=0, in_shape=(3, 16, 16),
             mult=4, affine_bn=True, n_classes=10)
CIFAR10 = dict(n_blocks=[18, 18, 18], n_strides=[1, 2, 2], n_channels=[16, 64, 256], init_ds=0,
               in_shape=(3, 32, 32), mult=4, affine_bn=True, n_classes=10)
IMAGENET_SMALL = dict(n_blocks=[1, 2, 1], n_strides=[2, 2, 2], n_channels=[24, 96, 384], init_ds=2,
                      in_shape=(3, 32, 32), mult=4, affine_bn=True, n_classes=7)


@pytest.mark.parametrize("cfg", [SMALL, CIFAR10, IMAGENET_SMALL], ids=["small", "cifar10", "imagenet-like"])
def test_network_parity_with_torch(cfg):
    tnet, net = _nets(cfg)
    # a state_dict saved from the PyTorch module (through torch.save / torch.load) loads with strict=True
    buf = io.BytesIO()
    torch.save(tnet.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf)
    from_torch(loaded, net, strict=True)
    assert list(net.state_dict()) == list(tnet.state_dict())
    for k, v in tnet.state_dict().items():
        assert net.state_dict()[k].shape == tuple(v.shape), k
    x = torch.randn(2, *cfg["in_shape"])
    with torch.no_grad():
        tlogits, tz = tnet(x)
        z = net.forward(x.numpy())
        assert z.dtype == np.float32
        assert rel(z, to_np(tz)) <= 1e-5
        assert rel(net.classify(z), to_np(tlogits)) <= 1e-5
        tx = tnet.inverse(tz)
        xr = net.inverse(to_np(tz))
        assert rel(xr, to_np(tx)) <= 1e-5
        assert rel(xr, x.numpy()) <= 1e-5


def test_arcflow_weights_load_into_torch_strict():
    tnet, net = _nets(SMALL, seed=3)
    missing, unexpected = tnet.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                                                net.state_dict().items()}, strict=True)
    assert not missing and not unexpected
    tnet.eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert rel(net.forward(x.numpy()), to_np(tnet(x)[1])) <= 1e-5
    # a DataParallel-style checkpoint (module. prefix) through from_torch with a config builds the model
    sd = {"module." + k: v for k, v in tnet.state_dict().items()}
    net2 = from_torch(sd, **SMALL)
    np.testing.assert_array_equal(net2.forward(x.numpy()), net.forward(x.numpy()))
    with pytest.raises(ValueError, match="missing keys"):
        from_torch({k: v for k, v in tnet.state_dict().items() if "stack.0." not in k}, net)
