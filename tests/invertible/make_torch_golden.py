"""Regenerate tests/data/torch_golden.npz: PyTorch outputs of the i-RevNet and the flow blocks that CI compares
arcflow with (tests/invertible/test_torch_golden.py), so CI needs no torch.

torch is not a test dependency; this script records its numbers once. Run it in a separate environment::

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl numpy
    /tmp/torchvenv/bin/python tests/invertible/make_torch_golden.py        # writes tests/data/torch_golden.npz

Everything here is PyTorch (arcflow is not imported): the modules follow the structure of the reference
i-RevNet code (jhjacobsen/pytorch-i-revnet, models/iRevNet.py and models/model_utils.py: the same module
tree, hence the same state_dict keys, the same psi algorithm, the same pair order; two fixes in the inverse
only, where the reference is wrong: the injective padding's inverse drops the appended channels, and the
initial psi is skipped when init_ds == 0), and of RealNVP/Glow for the flows (affine coupling with FrEIA's
soft clamp, ActNorm, the LU-parameterised invertible 1x1 convolution). tests/invertible/test_irevnet_torch.py and
tests/invertible/test_flows_torch.py use these same modules for their live comparisons.

Weights are drawn in float32 by PyTorch's own initialisation (batch-norm statistics and affine parameters
randomised, seeded) and stored once; the float64 outputs come from the same weights cast to float64
(exact), the float32 outputs from the float32 modules. Layout of the .npz: ``meta`` is a JSON string
(versions, the cases with their configurations and array keys); case ``name`` stores ``name/sd/<key>``
(its state dict), ``name/x`` (float64 input; the float32 runs use x.astype(float32)) and
``name/<dtype>/<output>`` (``z``, ``logits``, ``x_inv``, ``y``, ``logdet``, ...).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "data" / "torch_golden.npz"
SEED = 20261207

try:
    import torch
    nn = torch.nn
    F = torch.nn.functional
except ImportError:  # the test modules import the classes below only after pytest.importorskip("torch")
    torch = None
    nn = None


# ---- the reference i-RevNet (models/model_utils.py, models/iRevNet.py) ---------------------------------------

if torch is not None:
    class TorchPsi(nn.Module):
        """Space-to-depth in the reference's way: split along W, stack, permute."""

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
        """irevnet_block: (x1, x2) -> (psi(x2), F(x2) + psi(x1))."""

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
        """iRevNet: initial psi, the block stack, and the classifier head (bn1, ReLU, avg-pool, linear)."""

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

    # ---- flows (RealNVP / Glow) ----------------------------------------------------------------------------

    class TorchCoupling(nn.Module):
        """RealNVP/Glow coupling with FrEIA's soft clamp clamp * 0.636 * atan(s / clamp)."""

        def __init__(self, c, hidden, clamp):
            super().__init__()
            self.c1, self.c2, self.clamp = c // 2, c - c // 2, clamp
            self.subnet = nn.Sequential(nn.Conv2d(self.c1, hidden, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                                        nn.Conv2d(hidden, 2 * self.c2, 3, padding=1))

        def _st(self, x1):
            a = self.subnet(x1)
            return self.clamp * 0.636 * torch.atan(a[:, :self.c2] / self.clamp), a[:, self.c2:]

        def forward(self, x):
            x1, x2 = x[:, :self.c1], x[:, self.c1:]
            s, t = self._st(x1)
            return torch.cat([x1, x2 * torch.exp(s) + t], 1)

        def inverse(self, y):
            y1, y2 = y[:, :self.c1], y[:, self.c1:]
            s, t = self._st(y1)
            return torch.cat([y1, (y2 - t) * torch.exp(-s)], 1)

        def logdet(self, x):
            s, _ = self._st(x[:, :self.c1])
            return s.reshape(s.shape[0], -1).sum(1)

    class TorchConv1x1(nn.Module):
        """Glow's LU-parameterised invertible 1x1 convolution, W = P L (U + diag s)."""

        def __init__(self, sd):
            super().__init__()
            for k, v in sd.items():
                self.register_buffer(k, torch.as_tensor(v))

        def weight(self):
            c = self.s.shape[0]
            eye = torch.eye(c, dtype=self.s.dtype)
            return self.perm @ (torch.tril(self.lower, -1) + eye) @ (torch.triu(self.upper, 1) + torch.diag(self.s))

        def forward(self, x):
            w = self.weight().to(x.dtype)
            return F.conv2d(x, w[:, :, None, None])

        def inverse(self, y):
            w = self.weight().to(y.dtype)
            return F.conv2d(y, torch.linalg.inv(w)[:, :, None, None])

        def logdet(self, x):
            ld = x.shape[2] * x.shape[3] * torch.sum(torch.log(torch.abs(self.s))).to(x.dtype)
            return ld.expand(x.shape[0])

    class TorchActNorm(nn.Module):
        def __init__(self, sd):
            super().__init__()
            self.loc = torch.as_tensor(sd["loc"]).view(1, -1, 1, 1)
            self.scale = torch.as_tensor(sd["scale"]).view(1, -1, 1, 1)

        def forward(self, x):
            return (x - self.loc.to(x.dtype)) / self.scale.to(x.dtype)

        def inverse(self, y):
            return y * self.scale.to(y.dtype) + self.loc.to(y.dtype)

        def logdet(self, x):
            ld = -x.shape[2] * x.shape[3] * torch.sum(torch.log(torch.abs(self.scale))).to(x.dtype)
            return ld.expand(x.shape[0])

    def glow_conv1x1_state(c, g):
        """perm, lower, upper, s of a random rotation (QR of a Gaussian matrix, LU with partial pivoting), with s
        rescaled so that log|det W| is not ~0."""
        q, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper) * (0.5 + 1.5 * torch.rand(c, generator=g, dtype=torch.float64))
        return {"perm": p, "lower": torch.tril(lower, -1), "upper": torch.triu(upper, 1), "s": s}

    def autograd_logdet(fn, x):
        """log|det J| of fn at one sample x (1, C, H, W), J from autograd (float64)."""
        jac = torch.autograd.functional.jacobian(fn, x)
        n = x.numel()
        sign, ld = torch.linalg.slogdet(jac.reshape(n, n))
        assert sign != 0
        return float(ld)


# ---- the recorded cases --------------------------------------------------------------------------------------

#: i-RevNet networks: an injective CIFAR-like one (first block pads 3 -> 8 channels, init_ds 0) and a
#: bijective ImageNet-like one (initial psi, every block at stride 2); small widths keep the file small
NETS = {
    "irevnet_cifar_like": dict(n_blocks=[2, 1, 1], n_strides=[1, 2, 2], n_channels=[4, 16, 64], init_ds=0,
                               in_shape=[3, 16, 16], mult=4, affine_bn=True, n_classes=10),
    "irevnet_imagenet_like": dict(n_blocks=[2, 1], n_strides=[2, 2], n_channels=[24, 96], init_ds=2,
                                  in_shape=[3, 16, 16], mult=8, affine_bn=True, n_classes=7),
}
#: single blocks (in_ch, out_ch, stride, first, affine_bn, mult, H, W)
BLOCKS = {
    "block_stride1": (16, 8, 1, False, True, 4, 6, 7),
    "block_stride2": (8, 16, 2, False, True, 4, 6, 8),
    "block_injective_first": (3, 8, 1, True, True, 4, 5, 5),
    "block_no_affine": (12, 24, 2, True, False, 6, 4, 6),
}


def _np(t):
    return t.detach().cpu().numpy()


def main() -> int:
    if torch is None:
        print("make_torch_golden.py needs torch (see the module docstring)", file=sys.stderr)
        return 1
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    arrays, cases = {}, []

    def put(name, key, value):
        arrays[f"{name}/{key}"] = np.asarray(value)
        return f"{name}/{key}"

    def put_sd(name, sd):
        for k, v in sd.items():
            put(name, f"sd/{k}", _np(v) if hasattr(v, "detach") else v)
        return list(sd)

    g = torch.Generator().manual_seed(SEED)

    # -- single i-RevNet blocks: forward pair and the inverse of that pair
    for name, (in_ch, out_ch, stride, first, affine, mult, h, w) in BLOCKS.items():
        blk = randomize(TorchBlock(in_ch, out_ch, stride, first, affine, mult), seed=len(cases) + 1)
        sd = {k: v.clone() for k, v in blk.state_dict().items()}
        x = torch.randn(2, in_ch, h, w, generator=g, dtype=torch.float64).numpy()
        keys = put_sd(name, sd)
        put(name, "x", x)
        n1 = in_ch // 2
        for dname, tdt in (("float64", torch.float64), ("float32", torch.float32)):
            m = randomize(TorchBlock(in_ch, out_ch, stride, first, affine, mult), seed=0)
            m.load_state_dict(sd)
            m = m.to(tdt).eval()
            xt = torch.from_numpy(x).to(tdt)
            with torch.no_grad():
                a, b = m((xt[:, :n1], xt[:, n1:]))
                x1, x2 = m.inverse((a, b))
            put(name, f"{dname}/y", _np(torch.cat((a, b), 1)))
            put(name, f"{dname}/x_inv", _np(torch.cat((x1, x2), 1)))
        cases.append(dict(name=name, kind="irevnet_block", state_dict=keys,
                          config=dict(in_ch=in_ch, out_ch=out_ch, stride=stride, first=first, mult=mult,
                                      affine_bn=affine)))

    # -- whole networks: z, logits, the inverse of z
    for name, cfg in NETS.items():
        net = randomize(TorchIRevNet(cfg["n_blocks"], cfg["n_strides"], cfg["n_classes"], cfg["n_channels"],
                                     cfg["init_ds"], cfg["affine_bn"], list(cfg["in_shape"]), cfg["mult"]),
                        seed=len(cases) + 1)
        sd = {k: v.clone() for k, v in net.state_dict().items()}
        x = torch.randn(2, *cfg["in_shape"], generator=g, dtype=torch.float64).numpy()
        keys = put_sd(name, sd)
        put(name, "x", x)
        for dname, tdt in (("float64", torch.float64), ("float32", torch.float32)):
            m = TorchIRevNet(cfg["n_blocks"], cfg["n_strides"], cfg["n_classes"], cfg["n_channels"],
                             cfg["init_ds"], cfg["affine_bn"], list(cfg["in_shape"]), cfg["mult"])
            m.load_state_dict(sd)
            m = m.to(tdt).eval()
            with torch.no_grad():
                logits, z = m(torch.from_numpy(x).to(tdt))
                xr = m.inverse(z)
            put(name, f"{dname}/z", _np(z))
            put(name, f"{dname}/logits", _np(logits))
            put(name, f"{dname}/x_inv", _np(xr))
        n_params = sum(p.numel() for p in net.parameters())
        cases.append(dict(name=name, kind="irevnet", state_dict=keys, config=cfg, num_parameters=n_params))

    # -- flows: forward, inverse of the output, log-determinants (formula; autograd for one small sample)
    flows = []
    for c, hidden in ((4, 8), (5, 6)):
        cp = TorchCoupling(c, hidden, 2.0)  # torch's default Conv2d init: the last layer is not zero
        flows.append((f"coupling_c{c}", "coupling", dict(channels=c, hidden=hidden, clamp=2.0), cp,
                      {k: v.clone() for k, v in cp.state_dict().items()}))
    an_sd = {"loc": torch.randn(4, generator=g, dtype=torch.float64),
             "scale": (0.3 + 2.7 * torch.rand(4, generator=g, dtype=torch.float64))
             * torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64)}
    flows.append(("actnorm", "actnorm", dict(channels=4), TorchActNorm(an_sd), an_sd))
    cv_sd = glow_conv1x1_state(4, g)
    flows.append(("conv1x1", "conv1x1", dict(channels=4), TorchConv1x1(cv_sd), cv_sd))
    for name, kind, cfg, mod, sd in flows:
        c = cfg["channels"]
        x = torch.randn(3, c, 5, 4, generator=g, dtype=torch.float64).numpy()
        keys = put_sd(name, sd)
        put(name, "x", x)
        for dname, tdt in (("float64", torch.float64), ("float32", torch.float32)):
            m = mod.to(tdt) if kind == "coupling" else mod
            xt = torch.from_numpy(x).to(tdt)
            with torch.no_grad():
                y = m(xt)
                put(name, f"{dname}/y", _np(y))
                put(name, f"{dname}/x_inv", _np(m.inverse(y)))
                put(name, f"{dname}/logdet", _np(m.logdet(xt)))
        m64 = mod.to(torch.float64) if kind == "coupling" else mod
        x_small = torch.from_numpy(x[:1, :, :2, :2].copy())
        cases.append(dict(name=name, kind=kind, state_dict=keys, config=cfg,
                          autograd_logdet_small=autograd_logdet(m64, x_small)))
    # the chain ActNorm -> 1x1 conv -> coupling, float64
    chain = ["actnorm", "conv1x1", "coupling_c4"]
    chain_mods = [next(f[3] for f in flows if f[0] == name) for name in chain]
    x = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y, ld = x, torch.zeros(2, dtype=torch.float64)
        for m in chain_mods:
            ld = ld + m.logdet(y)
            y = m(y)
    put("chain", "x", x.numpy())
    put("chain", "float64/y", _np(y))
    put("chain", "float64/logdet", _np(ld))
    cases.append(dict(name="chain", kind="sequential", blocks=chain))

    meta = dict(format=1, generator="tests/invertible/make_torch_golden.py", seed=SEED,
                versions=dict(torch=torch.__version__, numpy=np.__version__),
                notes=["weights are float32 values (PyTorch's initialisation); the float64 outputs use them "
                       "cast to float64, exactly",
                       "logdet: the closed forms (sum of s; H*W*sum log|s|; -H*W*sum log|scale|); "
                       "autograd_logdet_small is log|det J| of one (1, C, 2, 2) sample by autograd"],
                cases=cases)
    arrays["meta"] = np.array(json.dumps(meta))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(cases)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
