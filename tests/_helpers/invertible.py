"""Oracles and cases shared by the invertible-block tests: a direct float64 conv2d, an independent float64
NumPy model of the reference i-RevNet block (psi, BN-ReLU, bottleneck, block forward), BN randomisation,
the block cases, and the conv2d micro-kernel levels (the ``conv2d_isa`` fixture in conftest.py runs a test
under each of them)."""
import numpy as np

from arcflow import _core

from _helpers.numeric import assert_differs  # noqa: F401  (re-exported: the invertible tests' negative control)


def conv2d_levels():
    """conv2d's micro-kernel levels this CPU runs: "generic", and "avx2" where the CPU has AVX2+FMA
    ("avx512" selects conv2d's avx2 kernel again, so it adds no case)."""
    return [lv for lv in _core._conv2d_isa_levels() if lv != "avx512"]


def conv2d_oracle(x, w, b=None, stride=1, padding=0):
    """Direct float64 cross-correlation: a sum over the kernel taps of shifted, strided slices."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (wd + 2 * padding - kw) // stride + 1
    y = np.zeros((n, o, ho, wo))
    for u in range(kh):
        for v in range(kw):
            patch = xp[:, :, u:u + stride * (ho - 1) + 1:stride, v:v + stride * (wo - 1) + 1:stride]
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, u, v])
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return y


REL = {np.float32: 1e-5, np.float64: 1e-12}


def rel_err(a, b):
    """||a - b|| / ||b|| in the Frobenius norm (the invertible tests' convention)."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


# ---- an independent float64 NumPy oracle of the reference block -----------------------------------


def psi_np(x, b=2):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4).reshape(n, b * b * c, h // b, w // b)


def psi_inv_np(y, b=2):
    n, cb, h, w = y.shape
    c = cb // (b * b)
    return y.reshape(n, b, b, c, h, w).transpose(0, 3, 4, 1, 5, 2).reshape(n, c, h * b, w * b)


def bn_relu_np(x, sd, pre):
    g = sd.get(pre + "weight", np.ones_like(sd[pre + "running_mean"]))
    b = sd.get(pre + "bias", np.zeros_like(sd[pre + "running_mean"]))
    m, v = sd[pre + "running_mean"], sd[pre + "running_var"]
    e = lambda a: np.asarray(a, np.float64)[None, :, None, None]  # noqa: E731
    return np.maximum((x - e(m)) / np.sqrt(e(v) + 1e-5) * e(g) + e(b), 0)


def bottleneck_np(blk, x2):
    sd = blk.state_dict()
    j = 0 if blk.first else 2
    h = x2
    if not blk.first:
        h = bn_relu_np(h, sd, "bottleneck_block.0.")
    h = conv2d_oracle(h, sd[f"bottleneck_block.{j}.weight"], None, blk.stride, 1)
    h = bn_relu_np(h, sd, f"bottleneck_block.{j + 1}.")
    h = conv2d_oracle(h, sd[f"bottleneck_block.{j + 3}.weight"], None, 1, 1)
    h = bn_relu_np(h, sd, f"bottleneck_block.{j + 5}.")
    return conv2d_oracle(h, sd[f"bottleneck_block.{j + 7}.weight"], None, 1, 1)


def block_forward_np(blk, x1, x2):
    if blk.pad and blk.stride == 1:
        x = np.concatenate([x1, x2, np.zeros((x1.shape[0], blk.pad) + x1.shape[2:])], axis=1)
        x1, x2 = x[:, : x.shape[1] // 2], x[:, x.shape[1] // 2:]
    f = bottleneck_np(blk, x2)
    if blk.stride == 2:
        x1, x2 = psi_np(x1), psi_np(x2)
    return x2, f + x1


def randomize_bn(blk_or_net, rng):
    """Non-trivial running statistics and affine parameters (torch's init makes BN the identity)."""
    sd = blk_or_net.state_dict()
    for k, v in sd.items():
        if k.endswith("running_mean") or k.endswith(".bias"):
            sd[k] = rng.standard_normal(v.shape).astype(v.dtype) * 0.1
        elif k.endswith("running_var") or (k.endswith(".weight") and v.ndim == 1):
            sd[k] = rng.uniform(0.5, 1.5, v.shape).astype(v.dtype)
    blk_or_net.load_state_dict(sd)


BLOCK_CASES = [
    # in_ch, out_ch, stride, first, mult, affine_bn, h
    (32, 16, 1, False, 4, True, 8),     # plain stride-1 block
    (32, 16, 1, True, 4, True, 6),      # first block: no leading BN-ReLU
    (16, 32, 2, False, 4, True, 8),     # stride 2: psi on both halves
    (3, 16, 1, True, 4, True, 8),       # injective: 3 -> 32 channels (the CIFAR stem)
    (12, 16, 1, False, 2, False, 5),    # injective, odd H/W, affine=False BN
    (8, 16, 2, True, 8, False, 4),
]
