"""Parity with a PyTorch implementation of the reference i-RevNet (optional: skipped without torch).

The PyTorch modules below follow the structure of the reference code (jhjacobsen/pytorch-i-revnet,
models/iRevNet.py and models/model_utils.py): the same module tree, hence the same state_dict keys, the
same psi algorithm (split along W, stack, permute), the same pair order. Two fixes in the inverse only,
where the reference is wrong: the injective padding's inverse drops the appended channels, and the
initial psi is skipped when init_ds == 0.
"""
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from arcflow.invertible import IRevNet, IRevNetBlock, SpaceToDepth, from_torch  # noqa: E402


class TorchPsi(nn.Module):
    def __init__(self, b):
        super().__init__()
        self.b = b

    def forward(self, x):
        n, c, h, w = x.shape
        b = self.b
        t = x.permute(0, 2, 3, 1)                                   # N, H, W, C
        cols = [chunk.contiguous().view(n, h // b, b * b * c) for chunk in t.split(b, 2)]
        return torch.stack(cols, 1).permute(0, 3, 2, 1).contiguous()  # N, D, H/b, W/b

    def inverse(self, y):
        n, d, hb, wb = y.shape
        b = self.b
        c = d // (b * b)
        t = y.permute(0, 2, 3, 1).contiguous().view(n, hb, wb, b, b, c)  # (i, j, dy, dx, c)
        return t.permute(0, 5, 1, 3, 2, 4).contiguous().view(n, c, hb * b, wb * b)


class TorchInjPad(nn.Module):
    def __init__(self, pad):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x, (0, 0, 0, 0, 0, self.pad))

    def inverse(self, x):
        return x[:, : x.shape[1] - self.pad]


class TorchBlock(nn.Module):
    def __init__(self, in_ch, out_ch, stride=1, first=False, affine_bn=True, mult=4):
        super().__init__()
        self.pad = 2 * out_ch - in_ch
        self.stride = stride
        self.inj_pad = TorchInjPad(self.pad)
        self.psi = TorchPsi(stride)
        if self.pad != 0 and stride == 1:
            in_ch = out_ch * 2
        hid = out_ch // mult
        layers = []
        if not first:
            layers += [nn.BatchNorm2d(in_ch // 2, affine=affine_bn), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(in_ch // 2, hid, 3, stride=stride, padding=1, bias=False),
                   nn.BatchNorm2d(hid, affine=affine_bn), nn.ReLU(inplace=True),
                   nn.Conv2d(hid, hid, 3, padding=1, bias=False), nn.Dropout(p=0.0),
                   nn.BatchNorm2d(hid, affine=affine_bn), nn.ReLU(inplace=True),
                   nn.Conv2d(hid, out_ch, 3, padding=1, bias=False)]
        self.bottleneck_block = nn.Sequential(*layers)

    def _split(self, x):
        n = x.shape[1] // 2
        return x[:, :n].contiguous(), x[:, n:].contiguous()

    def forward(self, x):
        if self.pad != 0 and self.stride == 1:
            x = self._split(self.inj_pad(torch.cat(x, 1)))
        x1, x2 = x
        fx2 = self.bottleneck_block(x2)
        if self.stride == 2:
            x1, x2 = self.psi(x1), self.psi(x2)
        return x2, fx2 + x1

    def inverse(self, y):
        x2, y1 = y
        if self.stride == 2:
            x2 = self.psi.inverse(x2)
        x1 = y1 - self.bottleneck_block(x2)
        if self.stride == 2:
            x1 = self.psi.inverse(x1)
        if self.pad != 0 and self.stride == 1:
            return self._split(self.inj_pad.inverse(torch.cat((x1, x2), 1)))
        return x1, x2


class TorchIRevNet(nn.Module):
    def __init__(self, n_blocks, n_strides, n_classes, n_channels, init_ds, affine_bn, in_shape, mult):
        super().__init__()
        self.ds = in_shape[2] // 2 ** (n_strides.count(2) + init_ds // 2)
        self.init_ds = init_ds
        self.in_ch = in_shape[0] * 2 ** init_ds
        self.init_psi = TorchPsi(init_ds)
        self.stack = nn.ModuleList()
        in_ch, first = self.in_ch, True
        for ch, depth, stride in zip(n_channels, n_blocks, n_strides):
            for s in [stride] + [1] * (depth - 1):
                self.stack.append(TorchBlock(in_ch, ch, s, first, affine_bn, mult))
                in_ch, first = 2 * ch, False
        self.bn1 = nn.BatchNorm2d(n_channels[-1] * 2, momentum=0.9)
        self.linear = nn.Linear(n_channels[-1] * 2, n_classes)

    def forward(self, x):
        n = self.in_ch // 2
        if self.init_ds != 0:
            x = self.init_psi(x)
        out = (x[:, :n], x[:, n:])
        for blk in self.stack:
            out = blk(out)
        z = torch.cat(out, 1)
        h = F.avg_pool2d(F.relu(self.bn1(z)), self.ds)
        return self.linear(h.view(h.shape[0], -1)), z

    def inverse(self, z):
        n = z.shape[1] // 2
        out = (z[:, :n], z[:, n:])
        for blk in reversed(self.stack):
            out = blk.inverse(out)
        x = torch.cat(out, 1)
        return self.init_psi.inverse(x) if self.init_ds != 0 else x


def randomize(module, seed):
    """Random BN statistics and affine parameters (the default init makes every BN the identity), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.num_batches_tracked.fill_(7)
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                    m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return module.eval()


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
