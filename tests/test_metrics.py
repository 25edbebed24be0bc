"""The lab's metrics against independent implementations: scikit-image (PSNR, SSIM) and pytorch-msssim (MS-SSIM),
on random images, a real photo with a real VAE's round trip, odd sizes and edge cases; and the heat map."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vae_core.lab import metrics
from vae_core.io.images import load_image
from conftest import SAMPLE

skm = pytest.importorskip("skimage.metrics")
pm = pytest.importorskip("pytorch_msssim")


def _pairs():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 203, 177, generator=g, dtype=torch.float64)
    yield "noise", a, (a + 0.08 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    photo = metrics.to_unit(load_image(SAMPLE))
    blurred = torch.nn.functional.avg_pool2d(photo, 5, stride=1, padding=2, count_include_pad=False)
    yield "photo-blur", photo, blurred
    yield "photo-shift", photo[..., 3:, :-2], photo[..., :-3, 2:]
    yield "odd-small", a[:1, :, :171, :165], a[:1, :, 5:176, 7:172]  # just above MS-SSIM's 160 px


def _sk_ssim(a, b):
    vals = [skm.structural_similarity(x.permute(1, 2, 0).numpy(), y.permute(1, 2, 0).numpy(), gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=2)
            for x, y in zip(a, b)]
    return float(np.mean(vals))


@pytest.mark.parametrize("name,a,b", list(_pairs()), ids=[p[0] for p in _pairs()])
def test_psnr_ssim_ms_ssim_match_independent_implementations(name, a, b):
    assert metrics.psnr(a, b) == pytest.approx(skm.peak_signal_noise_ratio(a.numpy(), b.numpy(), data_range=1.0),
                                               abs=1e-9)
    assert metrics.ssim(a, b) == pytest.approx(_sk_ssim(a, b), abs=1e-9)
    ref = float(pm.ms_ssim(a, b, data_range=1.0))
    assert metrics.ms_ssim(a, b) == pytest.approx(ref, rel=1e-4, abs=2e-6)  # its window is float32
    assert 0 < metrics.ssim(a, b) < 1 and metrics.psnr(a, b) < 60  # the cases are not trivial


def test_identical_and_edge_cases():
    a = torch.rand(1, 3, 200, 200, dtype=torch.float64)
    assert metrics.psnr(a, a) == math.inf
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ms_ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ms_ssim(a[..., :160, :], a[..., :160, :]) is None  # too small for five scales
    with pytest.raises(ValueError, match="at least 11 px"):
        metrics.ssim(a[..., :10, :], a[..., :10, :])
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(a, a[..., :100])


def test_heatmap_palette_and_gain():
    a = torch.zeros(3, 4, 4, dtype=torch.float64)
    b = a.clone()
    b[:, 0, 0] = 1 / 16  # 16/255-ish: full scale at gain 16
    b[:, 1, 1] = 1 / 64  # a quarter of the scale
    h = metrics.heatmap(a, b, 16.0)
    assert h.shape == (3, 4, 4) and h.min() >= 0 and h.max() <= 1
    assert torch.allclose(h[:, 0, 0], metrics._PALETTE[-1]) and torch.allclose(h[:, 2, 2], metrics._PALETTE[0])
    assert 0 < float(h[:, 1, 1].sum()) < float(h[:, 0, 0].sum())  # monotone: brighter for larger errors
