"""Image/video similarity against a dense reference: PSNR, SSIM, and LPIPS when available.

Inputs are float arrays or tensors in [0, 1] shaped (..., H, W, 3) (channels last, as pipelines
return with ``output_type="np"``); videos are compared frame by frame and averaged.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _as_nchw(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if t.shape[-1] != 3:
        raise ValueError(f"expected channels-last RGB arrays (..., H, W, 3), got shape {tuple(t.shape)}")
    return t.reshape(-1, *t.shape[-3:]).permute(0, 3, 1, 2)


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all pixels (inf for identical inputs)."""
    x, y = _as_nchw(a), _as_nchw(b)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, size, size)


def ssim(a, b, data_range: float = 1.0) -> float:
    """Structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01,
    K2=0.03), per channel, averaged over pixels, channels and frames. Images smaller than the
    window use a window of their size."""
    x, y = _as_nchw(a), _as_nchw(b)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    size = min(11, x.shape[-1], x.shape[-2])
    w = _gaussian(size, 1.5 * size / 11)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def filt(z):
        return F.conv2d(z, w, groups=3)

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


class LPIPS:
    """LPIPS (Zhang et al. 2018) through the ``lpips`` package, when it and its weights load.

    ``LPIPS.load()`` returns an instance or raises ``RuntimeError`` saying why it is unavailable
    (the package is optional and its backbone weights come from the internet on first use).
    """

    def __init__(self, model):
        self.model = model

    @classmethod
    def load(cls):
        try:
            import lpips  # noqa: F401
        except ImportError:
            raise RuntimeError("LPIPS not available: the lpips package is not installed (pip install lpips)") from None
        try:
            import lpips

            model = lpips.LPIPS(net="alex", verbose=False).eval()
        except Exception as e:  # weights download fails offline
            raise RuntimeError(f"LPIPS not available: its weights could not be loaded ({type(e).__name__}: {e})") from None
        return cls(model)

    @torch.no_grad()
    def __call__(self, a, b) -> float:
        x, y = (_as_nchw(t).float() * 2 - 1 for t in (a, b))
        return float(self.model(x, y).mean())


def compare(reference, candidate, lpips_model: LPIPS | None = None) -> dict:
    """{'psnr': dB, 'ssim': ..., 'lpips': ... or None} of ``candidate`` against ``reference``."""
    out = {"psnr": psnr(reference, candidate), "ssim": ssim(reference, candidate), "lpips": None}
    if lpips_model is not None:
        out["lpips"] = lpips_model(reference, candidate)
    return out
