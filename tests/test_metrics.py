"""PSNR / SSIM against hand-computed values."""

import math

import numpy as np
import pytest

from rettn.tools import metrics


def test_psnr_known_values():
    a = np.zeros((4, 8, 8, 3))
    b = np.full((4, 8, 8, 3), 0.1)
    assert metrics.psnr(a, b) == pytest.approx(20.0)  # mse 0.01 -> 20 dB
    assert metrics.psnr(a, a) == math.inf


def test_ssim_identity_and_degradation():
    rng = np.random.default_rng(0)
    a = rng.random((2, 32, 32, 3))
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    slightly = np.clip(a + rng.normal(0, 0.02, a.shape), 0, 1)
    badly = rng.random(a.shape)
    assert 0.9 < metrics.ssim(a, slightly) < 1.0
    assert metrics.ssim(a, badly) < 0.2
    # a constant offset keeps structure: SSIM stays high while PSNR drops
    shifted = np.clip(a * 0.8 + 0.1, 0, 1)
    assert metrics.ssim(a, shifted) > 0.8


def test_shape_errors():
    with pytest.raises(ValueError, match="channels-last"):
        metrics.psnr(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.ssim(np.zeros((8, 8, 3)), np.zeros((4, 8, 8, 3)))
