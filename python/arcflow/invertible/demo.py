"""i-RevNet demo: invert the representation of small greyscale images (e.g. scikit-learn's 8x8 digits).

``run_irevnet_demo(images)`` builds a small i-RevNet for 1 x H x W images (an initial psi to 4 x H/2 x W/2,
an injective stage that pads to 32 channels, a stride-2 stage to 128 channels), maps the images to their
representation z = f(x), reconstructs x = f^-1(z), and reports the relative reconstruction error. The
network is randomly initialised (untrained): the inverse is exact whatever the weights.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

from .irevnet import IRevNet

__all__ = ["run_irevnet_demo", "demo_network"]


def demo_network(h: int = 8, w: int = 8, rng=0, dtype=np.float32, n_blocks=(4, 4)) -> IRevNet:
    """The demo's i-RevNet for 1 x h x w images (h and w divisible by 4): psi(2) -> 4 channels,
    stage 1 (stride 1, injective to 2 x 16 channels), stage 2 (stride 2, 2 x 64 channels)."""
    return IRevNet(n_blocks=list(n_blocks), n_strides=[1, 2], n_channels=[16, 64], init_ds=2, in_shape=(1, h, w),
                   mult=4, affine_bn=True, n_classes=10, rng=rng, dtype=dtype)


def _as_nchw(images) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype.kind not in "fiub":
        raise TypeError(f"run_irevnet_demo: images must be a real array, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"run_irevnet_demo: expected greyscale images of shape (N, H, W) or (N, 1, H, W), "
                         f"got shape {np.asarray(images).shape}")
    if x.shape[0] < 1 or x.shape[2] % 4 or x.shape[3] % 4:
        raise ValueError(f"run_irevnet_demo: expected at least one image with H and W divisible by 4, "
                         f"got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("run_irevnet_demo: images contain NaN or Inf")
    return x


def _save_png(orig: np.ndarray, recon: np.ndarray, path: str, err: float) -> Optional[str]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    k = min(10, orig.shape[0])
    fig = Figure(figsize=(1.2 * k, 2.8))
    axes = fig.subplots(2, k, squeeze=False)
    vmin, vmax = float(orig[:k].min()), float(orig[:k].max())
    for j in range(k):
        for row, img in ((0, orig[j, 0]), (1, recon[j, 0])):
            ax = axes[row, j]
            ax.imshow(img, cmap="gray_r", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        if j == 0:
            axes[0, 0].set_ylabel("original")
            axes[1, 0].set_ylabel("f^-1(f(x))")
    fig.suptitle(f"i-RevNet: inputs and their reconstructions from the representation (rel. error {err:.1e})",
                 fontsize=9)
    fig.savefig(path, dpi=100)
    return path


def run_irevnet_demo(images: np.ndarray, png_path: Optional[str] = None, rng=0) -> dict:
    """Forward and invert ``images`` ((N, H, W) or (N, 1, H, W), H and W divisible by 4) through a small
    randomly initialised i-RevNet, in float32 and in float64.

    Returns ``{"rel_error": ||x - f^-1(f(x))|| / ||x|| (float32), "rel_error_float64": ...,
    "shape": shape of the representation z, "seconds": float32 forward + inverse time, "blocks": number of
    i-RevNet blocks, "png": path of the saved figure or None}``. With matplotlib importable and
    ``png_path`` given, saves originals (top row) beside reconstructions (bottom row).
    """
    x = _as_nchw(images)
    _, _, h, w = x.shape
    out = {}
    for dt in (np.float32, np.float64):
        net = demo_network(h, w, rng=rng, dtype=dt)
        xd = np.ascontiguousarray(x, dtype=dt)
        t0 = time.perf_counter()
        z = net.forward(xd)
        xr = net.inverse(z)
        secs = time.perf_counter() - t0
        err = float(np.linalg.norm(xr.astype(np.float64) - xd) / max(np.linalg.norm(xd.astype(np.float64)), 1e-300))
        if dt == np.float32:
            out.update(rel_error=err, shape=tuple(int(s) for s in z.shape), seconds=secs, blocks=len(net.stack))
            recon32 = xr
        else:
            out["rel_error_float64"] = err
    out["png"] = _save_png(x.astype(np.float32), recon32, png_path, out["rel_error"]) if png_path else None
    return out
