"""What every training-free fp16 fix shares: the calibration image, peak measurement by forward hooks, the
power-of-two factor choice and the in-place conv rescale. A family's fix (``families/<name>/fp16_fix.py``) decides
where the factors go.

Tensors: images ``[B, 3, H, W]`` in [-1, 1], float32 (peaks are measured in fp32).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["FIX_TARGET", "calibration_image", "measure_peaks", "pow2_down", "scale_conv", "fix_copy"]


#: Largest stream activation the fix aims for on the calibration input: 64× headroom below fp16's 65504.
FIX_TARGET = 1024.0


def scale_conv(conv: nn.Conv2d, w: float, b: float) -> None:
    conv.weight.data.mul_(w)
    if conv.bias is not None:
        conv.bias.data.mul_(b)


def calibration_image(size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """A built-in high-contrast synthetic image ``[1, 3, size, size]`` in [-1, 1]: saturated colour bars, hard
    black/white edges, a checkerboard, gradients and a specular-like white spot over noise."""
    g = torch.Generator().manual_seed(1234)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    img = torch.empty(3, size, size)
    img[0], img[1], img[2] = xx, yy, -xx * yy
    q = size // 4
    bars = torch.tensor([[1, 1, 1], [1, 1, -1], [-1, 1, 1], [-1, 1, -1], [1, -1, 1], [1, -1, -1], [-1, -1, 1],
                         [-1, -1, -1]], dtype=torch.float32)
    for i in range(8):
        img[:, :q, i * size // 8:(i + 1) * size // 8] = bars[i][:, None, None]
    check = (((torch.arange(size)[:, None] // 8) + (torch.arange(size)[None] // 8)) % 2).float() * 2 - 1
    img[:, q:2 * q, : size // 2] = check[q:2 * q, : size // 2]
    img[:, 2 * q:, size // 2:] = torch.rand(3, size - 2 * q, size - size // 2, generator=g) * 2 - 1
    spot = ((xx + 0.5) ** 2 + (yy - 0.6) ** 2 < 0.02).float()
    img = img * (1 - spot) + spot
    return img.clamp(-1, 1)[None].to(device)


@torch.no_grad()
def measure_peaks(model: nn.Module, image: torch.Tensor, latents: Optional[torch.Tensor] = None
                  ) -> dict[nn.Module, float]:
    """Largest |output| of every module of ``model`` over an encode of ``image`` and a decode of ``latents``
    (default: the encoded image plus noise of the same std). Runs in the model's dtype (use fp32)."""
    peaks: dict[nn.Module, float] = {}

    def hook(mod: nn.Module, _inp: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            v = float(out.detach().abs().amax()) if out.numel() else 0.0
            peaks[mod] = max(peaks.get(mod, 0.0), v if math.isfinite(v) else math.inf)

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        z = model.encode(image)
        if latents is None:  # a local generator: never touch the caller's RNG state
            g = torch.Generator(device=z.device).manual_seed(0)
            noise = torch.randn(z.shape, generator=g, device=z.device, dtype=z.dtype)
            latents = torch.cat([z, noise * z.std()])
        model.decode(latents)
    finally:
        for h in handles:
            h.remove()
    return peaks


def pow2_down(peak: float, target: float) -> float:
    if not math.isfinite(peak) or peak <= target:
        return 1.0 if math.isfinite(peak) else 2.0 ** -16
    return 2.0 ** -math.ceil(math.log2(peak / target))


def fix_copy(model: nn.Module, sample: Optional[torch.Tensor],
             rescale: Callable[[nn.Module, dict[nn.Module, float]], None]) -> tuple[nn.Module, float, float]:
    """The frame of every fp16 fix: an fp32 copy of ``model`` on its device, peaks measured on ``sample`` (images
    ``[B, 3, H, W]`` in [-1, 1]; the :func:`calibration_image` if None), ``rescale(copy, peaks)`` applied in place
    (a family's choice of factors), peaks measured again.

    Returns:
        ``(fixed_copy, peak_before, peak_after)``: largest |module output| before and after, on the same input.
    """
    dev = next(model.parameters()).device
    fixed = copy.deepcopy(model).to(device=dev, dtype=torch.float32)
    image = calibration_image(device=dev) if sample is None else sample.to(dev, torch.float32)
    before = measure_peaks(fixed, image)
    rescale(fixed, before)
    after = measure_peaks(fixed, image)
    return fixed, max(before.values()), max(after.values())


def fix_streams(model: nn.Module, sample: Optional[torch.Tensor], target: float,
                stream: Callable[[nn.Module], list[nn.Module]], conv1_of: Callable[[nn.Module], Optional[nn.Module]],
                rescale_side: Callable[[nn.Module, nn.Module, float, dict[nn.Module, float]], None],
                ) -> tuple[nn.Module, float, float]:
    """:func:`fix_copy` for the video families' residual-stream fix: per side (encoder, decoder), one factor for the
    stream from its peak, and one per residual block for its first conv (``conv1_of(block)``: the module whose peak
    sets it, None for other stream members); ``rescale_side(copy, side, factor, conv1_factors)`` applies them."""
    def rescale(fixed: nn.Module, before: dict[nn.Module, float]) -> None:
        for side in (fixed.encoder, fixed.decoder):
            members = stream(side)
            peak = max(before.get(m, 0.0) for m in members)
            conv1 = {m: pow2_down(before.get(c, 0.0), target) for m in members
                     if (c := conv1_of(m)) is not None}
            rescale_side(fixed, side, pow2_down(peak, target), conv1)

    return fix_copy(model, sample, rescale)
