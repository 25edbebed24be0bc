"""The training-free fp16 fix for the Wan VAE design (Wan 2.1, Qwen-Image, Wan 2.2): the same idea as
:mod:`vae_core.families.kl.fp16_fix`, with the RMS norm's scale invariance (``normalize(s·x) = normalize(x)`` for ``s > 0``) in place of GroupNorm's.

Every read of the residual stream goes through an RMS norm except the residual adds, the 1×1 shortcuts and the
resamplers, so the whole stream of the encoder (and, separately, of the decoder) can be multiplied by one power of
two ``s`` by rescaling what writes into it: ``conv1`` (conv_in) weight and bias, each residual block's last conv,
each attention block's ``proj``, and the biases of the shortcuts and resamplers (their input is already scaled).
Each residual block's first conv feeds only an RMS norm and takes a free factor of its own. The heads start with an RMS norm, so
the outputs are unchanged; in fp32 the rescaled model computes the same function to rounding.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .blocks import AttentionBlock, DownBlock, Resample, ResidualBlock, UpBlock
from .model import WanVAE
from ...precision.calibrate import FIX_TARGET, fix_streams, scale_conv

__all__ = ["rescale_wan_stream", "fp16_fix_wan"]


def _stream(side: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are ``side``'s residual stream (Wan 2.2 levels and their inner blocks too)."""
    out: list[nn.Module] = [side.conv1]
    for m in (side.downsamples if hasattr(side, "downsamples") else side.upsamples):
        if isinstance(m, (DownBlock, UpBlock)):  # the parameter-free shortcut is linear: it scales with the stream
            out.extend(m.downsamples if isinstance(m, DownBlock) else m.upsamples)
        out.append(m)
    return out + list(side.middle)


@torch.no_grad()
def rescale_wan_stream(side: nn.Module, s: float, conv1_factors: Optional[dict[ResidualBlock, float]] = None) -> None:
    """Multiply ``side``'s (``model.encoder`` or ``model.decoder``) residual stream by ``s`` in place."""
    scale_conv(side.conv1, s, s)
    for m in _stream(side)[1:]:
        if isinstance(m, ResidualBlock):
            scale_conv(m.residual[6], s, s)
            if isinstance(m.shortcut, nn.Conv3d):  # reads the scaled stream: only its bias needs the factor
                scale_conv(m.shortcut, 1.0, s)
            c = (conv1_factors or {}).get(m, 1.0)
            scale_conv(m.residual[2], c, c)
        elif isinstance(m, AttentionBlock):
            scale_conv(m.proj, s, s)
        elif isinstance(m, Resample):  # spatial and temporal convs read the scaled stream: biases only
            scale_conv(m.resample[1], 1.0, s)
            if hasattr(m, "time_conv"):
                scale_conv(m.time_conv, 1.0, s)


def fp16_fix_wan(model: WanVAE, sample: Optional[torch.Tensor] = None, target: float = FIX_TARGET
                 ) -> tuple[WanVAE, float, float]:
    """A rescaled fp32 copy of ``model`` whose stream peaks on ``sample`` are ≤ ``target``.

    Returns:
        ``(new_model, peak_before, peak_after)``: largest |module output| before and after, on the same input.
    """
    return fix_streams(model, sample, target, _stream,
                       lambda m: m.residual[2] if isinstance(m, ResidualBlock) else None,
                       lambda fixed, side, s, conv1: rescale_wan_stream(side, s, conv1))
