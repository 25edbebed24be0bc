"""The training-free fp16 fix for the HunyuanVideo 1.5 VAE design: the RMS norm's scale invariance, as for Wan
(:mod:`vae_core.families.wan.fp16_fix`), plus one scalar at each end of the streams.

Inside each side, every read of the residual stream goes through an RMS norm except the residual adds, the 1×1
``nin_shortcut`` s and the resamplers (a conv read directly plus a parameter-free packing shortcut: linear), so the
stream can be multiplied by one power of two ``s`` by rescaling what writes into it: ``conv_in``, each block's
``conv2``, the attention's ``proj_out``, and the biases of the shortcuts and resamplers. Two reads are not through a
norm and are not part of the stream: the encoder's output shortcut (the mean of the stream over channel groups,
added to the latent) and the decoder's input shortcut (the latent repeated over channels, added to the stream). The
model carries one factor for each (``encoder_shortcut_scale`` = 1/s, ``decoder_shortcut_scale`` = s: float32
buffers, never cast to fp16), so the outputs are unchanged; a host module's copy carries them to the engine, but they
are not weights, so a fixed model is not saved (:meth:`HV15Family.check_save`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .blocks import AttnBlock, Downsample, ResnetBlock, Upsample
from .model import HV15VAE
from ...precision.calibrate import FIX_TARGET, fix_streams, scale_conv

__all__ = ["rescale_hv15_stream", "fp16_fix_hv15"]


def _stream(side: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are ``side``'s residual stream, in order."""
    out: list[nn.Module] = [side.conv_in]
    levels = side.down if hasattr(side, "down") else side.up
    mid = [side.mid.block_1, side.mid.attn_1, side.mid.block_2]
    if hasattr(side, "up"):
        out += mid
    for level in levels:
        out += list(level.block)
        for name in ("downsample", "upsample"):
            if hasattr(level, name):
                out.append(getattr(level, name))
    return out + (mid if hasattr(side, "down") else [])


@torch.no_grad()
def rescale_hv15_stream(model: HV15VAE, side: nn.Module, s: float,
                        conv1_factors: Optional[dict[ResnetBlock, float]] = None) -> None:
    """Multiply ``side``'s (``model.encoder`` or ``model.decoder``) residual stream by ``s`` in place."""
    scale_conv(side.conv_in.conv, s, s)
    for m in _stream(side)[1:]:
        if isinstance(m, ResnetBlock):
            scale_conv(m.conv2.conv, s, s)
            if m.nin_shortcut is not None:  # reads the scaled stream: only its bias needs the factor
                scale_conv(m.nin_shortcut, 1.0, s)
            c = (conv1_factors or {}).get(m, 1.0)
            scale_conv(m.conv1.conv, c, c)
        elif isinstance(m, AttnBlock):
            scale_conv(m.proj_out, s, s)
        elif isinstance(m, (Downsample, Upsample)):  # conv reads the stream: bias only; the packing is linear
            scale_conv(m.conv.conv, 1.0, s)
    if side is model.encoder:
        model.encoder_shortcut_scale.mul_(1.0 / s)
    else:
        model.decoder_shortcut_scale.mul_(s)


def fp16_fix_hv15(model: HV15VAE, sample: Optional[torch.Tensor] = None, target: float = FIX_TARGET
                  ) -> tuple[HV15VAE, float, float]:
    """A rescaled fp32 copy of ``model`` whose stream peaks on ``sample`` are ≤ ``target``.

    Returns:
        ``(new_model, peak_before, peak_after)``: largest |module output| before and after, on the same input.
    """
    return fix_streams(model, sample, target, _stream, lambda m: m.conv1 if isinstance(m, ResnetBlock) else None,
                       rescale_hv15_stream)
