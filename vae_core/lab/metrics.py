"""Image-quality metrics for the VAE lab: PSNR, SSIM and MS-SSIM (torch, float64), and error heat maps.

Conventions (the ones the model cards and the SDXL paper's autoencoder table use):

* Images are float tensors ``[N, C, H, W]`` in ``[0, data_range]`` (1.0 for the lab: 8-bit pixels / 255, VAE
  outputs mapped from [-1, 1] and clamped). Every metric is computed in float64 and averaged over the batch.
* **PSNR** = ``10·log10(data_range² / MSE)`` over all pixels and channels; identical images give ``inf``.
* **SSIM** (Wang et al. 2004): an 11-tap Gaussian window with σ = 1.5, K1 = 0.01, K2 = 0.03, population
  (co)variances, computed per channel over the *valid* region (no padding: windows that fit inside the image) and
  averaged over channels. This is scikit-image's ``structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=...)``, which pads and then crops the same border.
* **MS-SSIM** (Wang et al. 2003): five scales with weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), the contrast-
  structure term at the first four scales and SSIM at the last, negative terms clipped to 0, 2×2 average pooling
  between scales (a side of odd length padded by one, the padding counted as zeros, as pytorch-msssim does). It
  needs a shorter side above 160 px (four halvings of an 11-px window); :func:`ms_ssim` returns None below that.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["psnr", "signed_psnr", "snr", "frame_psnrs", "temporal_seam", "ssim", "ms_ssim", "MS_SSIM_WEIGHTS", "MS_SSIM_MIN_SIDE", "SSIM_MIN_SIDE",
           "heatmap", "to_unit"]

#: MS-SSIM's per-scale exponents (Wang, Simoncelli & Bovik 2003, Table 1).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
#: MS-SSIM needs the shorter side to exceed this (the 11-px window after four halvings).
MS_SSIM_MIN_SIDE = 10 * 2 ** 4

_WIN, _SIGMA, _K1, _K2 = 11, 1.5, 0.01, 0.03
#: SSIM needs sides of at least the window.
SSIM_MIN_SIDE = _WIN


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """VAE-space images (about [-1, 1]) → float64 in [0, 1], clamped, as a viewer shows them."""
    return ((x.detach().double() + 1.0) / 2.0).clamp(0.0, 1.0)


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"metric inputs of shapes {tuple(a.shape)} and {tuple(b.shape)}; expected two [N, C, H, W] "
                         "tensors of the same shape")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """PSNR in dB of ``b`` against ``a`` (same shape, any rank; ``inf`` when identical): the pack's one PSNR."""
    if a.shape != b.shape:
        raise ValueError(f"metric inputs of shapes {tuple(a.shape)} and {tuple(b.shape)}; expected the same shape")
    mse = float((a.double() - b.double()).square().mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def signed_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of VAE-space tensors (images about [-1, 1], not clamped: a peak-to-peak range of 2)."""
    return psnr(a, b, data_range=2.0)


def snr(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-noise ratio in dB of ``test`` against ``ref`` (signal power = mean square of ``ref``), e.g. for
    latents, which have no fixed range."""
    err = float((ref.double() - test.double()).square().mean())
    return math.inf if err == 0 else 10 * math.log10(float(ref.double().square().mean()) / err)


def _check_video(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 5:
        raise ValueError(f"metric inputs of shapes {tuple(a.shape)} and {tuple(b.shape)}; expected two [B, C, F, H, W] "
                         "videos of the same shape")


def frame_psnrs(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per-frame :func:`signed_psnr` of two videos ``[B, 3, F, H, W]`` in [-1, 1]."""
    _check_video(a, b)
    return [signed_psnr(a[:, :, f], b[:, :, f]) for f in range(a.shape[2])]


def temporal_seam(video: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest *excess* frame-to-frame change of ``video`` over ``reference``'s, in 8-bit levels: max over
    frames ``f ≥ 1`` and pixels of ``|v[f] − v[f−1]| − |r[f] − r[f−1]|``, both quantised to 8 bits as a saved
    video is.
    0 when the video changes between frames exactly as the reference does; a tiler that restarts its causal cache or
    blends temporal tiles shows it as flicker at its boundaries. Videos ``[B, 3, F, H, W]`` in [-1, 1]."""
    _check_video(video, reference)
    q = lambda t: ((t.double().clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    v, r = q(video), q(reference)
    if v.shape[2] < 2:
        return 0.0
    excess = (v[:, :, 1:] - v[:, :, :-1]).abs() - (r[:, :, 1:] - r[:, :, :-1]).abs()
    return max(0.0, float(excess.max()))


def _window(channels: int, device: torch.device) -> torch.Tensor:
    coords = torch.arange(_WIN, dtype=torch.float64, device=device) - _WIN // 2
    g = torch.exp(-coords.square() / (2 * _SIGMA ** 2))
    return (g / g.sum()).repeat(channels, 1, 1, 1)  # [C, 1, 1, WIN], depthwise


def _blur(x: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian, valid region only."""
    c = x.shape[1]
    return F.conv2d(F.conv2d(x, win, groups=c), win.transpose(2, 3), groups=c)


def _ssim_cs(a: torch.Tensor, b: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel SSIM and contrast-structure terms ``[N, C]`` over the valid region."""
    win = _window(a.shape[1], a.device)
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    mu_a, mu_b = _blur(a, win), _blur(b, win)
    var_a = _blur(a * a, win) - mu_a.square()
    var_b = _blur(b * b, win) - mu_b.square()
    cov = _blur(a * b, win) - mu_a * mu_b
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    lum = (2 * mu_a * mu_b + c1) / (mu_a.square() + mu_b.square() + c1)
    return (lum * cs).mean(dim=(2, 3)), cs.mean(dim=(2, 3))


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM (see the module docstring); images need sides ≥ 11 px.

    Raises:
        ValueError: shapes differ, or a side is below the 11-px window.
    """
    _check(a, b)
    if min(a.shape[-2:]) < _WIN:
        raise ValueError(f"SSIM of a {a.shape[-1]}x{a.shape[-2]} image; expected sides of at least {_WIN} px")
    s, _ = _ssim_cs(a.double(), b.double(), data_range)
    return float(s.mean())


def ms_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> Optional[float]:
    """Mean MS-SSIM (see the module docstring), or None for images whose shorter side is ≤ 160 px."""
    _check(a, b)
    if min(a.shape[-2:]) <= MS_SSIM_MIN_SIDE:
        return None
    a, b = a.double(), b.double()
    terms = []
    for level in range(len(MS_SSIM_WEIGHTS)):
        s, cs = _ssim_cs(a, b, data_range)
        if level < len(MS_SSIM_WEIGHTS) - 1:
            terms.append(cs.clamp(min=0))
            pad = [a.shape[2] % 2, a.shape[3] % 2]
            a, b = F.avg_pool2d(a, 2, padding=pad), F.avg_pool2d(b, 2, padding=pad)
    terms.append(s.clamp(min=0))
    weights = torch.tensor(MS_SSIM_WEIGHTS, dtype=torch.float64, device=a.device).view(-1, 1, 1)
    return float(torch.prod(torch.stack(terms) ** weights, dim=0).mean())


#: The heat map's palette, black → purple → red → orange → pale yellow (perceptually ordered, like "inferno").
_PALETTE = torch.tensor([[0, 0, 4], [66, 10, 104], [147, 38, 103], [221, 81, 58], [252, 165, 10], [252, 255, 164]],
                        dtype=torch.float64) / 255.0


def heatmap(a: torch.Tensor, b: torch.Tensor, gain: float) -> torch.Tensor:
    """``|a − b|`` of two images ``[C, H, W]`` in [0, 1], averaged over channels, × ``gain``, clipped to [0, 1] and
    coloured with a black-to-yellow palette → float64 ``[3, H, W]`` in [0, 1]. Black means identical; with
    ``gain`` = 16 an error of 1/16 of the range (16 of 255 levels) is already the brightest colour; NaN/inf pixels
    are the brightest colour too."""
    err = torch.nan_to_num((a.double() - b.double()).abs().mean(dim=0) * gain, nan=1.0, posinf=1.0).clamp(0.0, 1.0)
    pos = err * (len(_PALETTE) - 1)
    lo = pos.floor().long().clamp(max=len(_PALETTE) - 2)
    frac = (pos - lo).unsqueeze(-1)
    rgb = _PALETTE[lo] * (1 - frac) + _PALETTE[lo + 1] * frac  # [H, W, 3]
    return rgb.permute(2, 0, 1)
