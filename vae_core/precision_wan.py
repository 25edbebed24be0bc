"""The training-free fp16 fix for Qwen-Image's VAE (Wan 2.1 design): the same idea as :mod:`vae_core.precision`,
with the RMS norm's scale invariance (``normalize(s·x) = normalize(x)`` for ``s > 0``) in place of GroupNorm's.

Every read of the residual stream goes through an RMS norm except the residual adds, the 1×1 shortcuts and the
resamplers, so the whole stream of the encoder (and, separately, of the decoder) can be multiplied by one power of
two ``s`` by rescaling what writes into it: ``conv1`` (conv_in) weight and bias, each residual block's last conv,
each attention block's ``proj``, and the biases of the shortcuts and resamplers (their input is already scaled).
Each residual block's first conv feeds only an RMS norm and takes a free factor of its own. The heads start with an RMS norm, so
the outputs are unchanged; in fp32 the rescaled model computes the same function to rounding.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .model_wan import AttentionBlock, Resample, ResidualBlock, WanImageVAE
from .precision import FIX_TARGET, _pow2_down, calibration_image, measure_peaks

__all__ = ["rescale_wan_stream", "fp16_fix_wan"]


def _scale(conv: nn.Module, weight: float, bias: float) -> None:
    conv.weight.mul_(weight)
    if conv.bias is not None:
        conv.bias.mul_(bias)


@torch.no_grad()
def rescale_wan_stream(side: nn.Module, s: float, conv1_factors: Optional[dict[ResidualBlock, float]] = None) -> None:
    """Multiply ``side``'s (``model.encoder`` or ``model.decoder``) residual stream by ``s`` in place."""
    _scale(side.conv1, s, s)
    blocks = list(side.downsamples if hasattr(side, "downsamples") else side.upsamples) + list(side.middle)
    for m in blocks:
        if isinstance(m, ResidualBlock):
            _scale(m.residual[6], s, s)
            if isinstance(m.shortcut, nn.Conv3d):  # reads the scaled stream: only its bias needs the factor
                _scale(m.shortcut, 1.0, s)
            c = (conv1_factors or {}).get(m, 1.0)
            _scale(m.residual[2], c, c)
        elif isinstance(m, AttentionBlock):
            _scale(m.proj, s, s)
        elif isinstance(m, Resample):
            _scale(m.resample[1], 1.0, s)


def fp16_fix_wan(model: WanImageVAE, sample: Optional[torch.Tensor] = None, target: float = FIX_TARGET
                 ) -> tuple[WanImageVAE, float, float]:
    """A rescaled fp32 copy of ``model`` whose stream peaks on ``sample`` are ≤ ``target``.

    Returns:
        ``(new_model, peak_before, peak_after)``: largest |module output| before and after, on the same input.
    """
    dev = next(model.parameters()).device
    fixed = copy.deepcopy(model).to(device=dev, dtype=torch.float32)
    image = calibration_image(device=dev) if sample is None else sample.to(dev, torch.float32)
    before = measure_peaks(fixed, image)
    for side in (fixed.encoder, fixed.decoder):
        stream = [side.conv1, *(side.downsamples if hasattr(side, "downsamples") else side.upsamples), *side.middle]
        peak = max(before.get(m, 0.0) for m in stream)
        conv1 = {m: _pow2_down(before.get(m.residual[2], 0.0), target) for m in stream if isinstance(m, ResidualBlock)}
        rescale_wan_stream(side, _pow2_down(peak, target), conv1)
    after = measure_peaks(fixed, image)
    return fixed, max(before.values()), max(after.values())
