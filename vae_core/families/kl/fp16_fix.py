"""The training-free fp16 fix of the kl family (AutoencoderKL).

The fix rests on one identity: ``GroupNorm(s·x)`` with ``eps`` replaced by ``s²·eps`` equals ``GroupNorm(x)`` for
any ``s > 0``. In the AutoencoderKL every read of the residual stream goes through a GroupNorm except the residual
adds, the 1×1 shortcuts and the resampling convs, so the stream can be multiplied by a factor per *segment*
(a run of blocks joined by identity skips) by rescaling the convs that write into it (``conv_in``, each resnet's
``conv2``, attention ``proj_out``, shortcuts and resampling convs, which also undo the previous segment's factor)
and each reading GroupNorm's ``eps``. Each resnet's ``conv1`` feeds only ``norm2`` and takes a free factor of its
own. Factors are powers of two, so in fp32 the rescaled model computes the same function to rounding.

What it cannot shrink: post-GroupNorm activations, q/k/v and attention logits, and ``conv_out``; they are bounded
by the GroupNorm affine parameters and the weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ...precision.calibrate import FIX_TARGET, fix_copy, pow2_down, scale_conv
from .model import AttnBlock, AutoencoderKL, Downsample, GroupNorm, ResnetBlock, Upsample

__all__ = ["StreamSegment", "stream_segments", "rescale_stream", "choose_scales", "fp16_fix_model"]


@dataclass
class StreamSegment:
    """A run of the residual stream at one scale: ``entry`` writes it from the previous segment (or the input)."""

    entry: nn.Module
    members: list[nn.Module] = field(default_factory=list)


def _walk(entry: nn.Conv2d, body: list[nn.Module]) -> list[StreamSegment]:
    segs = [StreamSegment(entry)]
    for mod in body:
        if isinstance(mod, (Upsample, Downsample)) or (isinstance(mod, ResnetBlock) and mod.nin_shortcut is not None):
            segs.append(StreamSegment(mod))
        else:
            segs[-1].members.append(mod)
    return segs


def stream_segments(model: AutoencoderKL) -> tuple[list[StreamSegment], list[StreamSegment]]:
    """Encoder and decoder segments, in stream order."""
    enc, dec = model.encoder, model.decoder
    enc_body: list[nn.Module] = []
    for level in enc.down:
        enc_body += list(level.block) + ([level.downsample] if level.downsample is not None else [])
    enc_body += [enc.mid.block_1, enc.mid.attn_1, enc.mid.block_2]
    dec_body: list[nn.Module] = [dec.mid.block_1, dec.mid.attn_1, dec.mid.block_2]
    for level in reversed(dec.up):
        dec_body += list(level.block) + ([level.upsample] if level.upsample is not None else [])
    return _walk(enc.conv_in, enc_body), _walk(dec.conv_in, dec_body)


def _scale_resnet(r: ResnetBlock, s_in: float, s_out: float, t: float) -> None:
    r.norm1.eps *= s_in * s_in
    scale_conv(r.conv1, t, t)
    r.norm2.eps *= t * t
    scale_conv(r.conv2, s_out, s_out)
    if r.nin_shortcut is not None:
        scale_conv(r.nin_shortcut, s_out / s_in, s_out)


@torch.no_grad()
def rescale_stream(segments: list[StreamSegment], final_norm: GroupNorm, scales: list[float],
                   conv1_scales: Optional[dict[ResnetBlock, float]] = None) -> None:
    """Multiply segment i of the stream by ``scales[i]`` (relative to now), in place; output unchanged.

    Args:
        segments: from :func:`stream_segments` (encoder or decoder).
        final_norm: the GroupNorm that reads the last segment (``norm_out``).
        scales: one positive factor per segment (powers of two keep fp32 results bit-close).
        conv1_scales: optional free factor per resnet ``conv1`` output.
    """
    if len(scales) != len(segments) or any(s <= 0 for s in scales):
        raise ValueError(f"scales: expected {len(segments)} positive factors, got {scales}")
    conv1_scales = conv1_scales or {}
    prev = 1.0
    for seg, s in zip(segments, scales):
        e = seg.entry
        if isinstance(e, nn.Conv2d):
            scale_conv(e, s, s)
        elif isinstance(e, (Upsample, Downsample)):
            scale_conv(e.conv, s / prev, s)
        else:
            _scale_resnet(e, prev, s, conv1_scales.get(e, 1.0))
        for m in seg.members:
            if isinstance(m, ResnetBlock):
                _scale_resnet(m, s, s, conv1_scales.get(m, 1.0))
            elif isinstance(m, AttnBlock):
                m.norm.eps *= s * s
                scale_conv(m.proj_out, s, s)
        prev = s
    final_norm.eps *= prev * prev


def choose_scales(segments: list[StreamSegment], peaks: dict[nn.Module, float], target: float = FIX_TARGET
                  ) -> tuple[list[float], dict[ResnetBlock, float]]:
    """Power-of-two factors bringing each segment's peak (writer outputs and conv2 outputs) and each conv1 output
    down to ``target``."""
    scales, conv1 = [], {}
    for seg in segments:
        mods = [seg.entry] + seg.members
        peak = 0.0
        for m in mods:
            peak = max(peak, peaks.get(m, 0.0))
            if isinstance(m, ResnetBlock):
                peak = max(peak, peaks.get(m.conv2, 0.0), peaks.get(m.nin_shortcut, 0.0) if m.nin_shortcut else 0.0)
                conv1[m] = pow2_down(peaks.get(m.conv1, 0.0), target)
            elif isinstance(m, AttnBlock):
                peak = max(peak, peaks.get(m.proj_out, 0.0))
        scales.append(pow2_down(peak, target))
    return scales, conv1


def fp16_fix_model(model: AutoencoderKL, sample: Optional[torch.Tensor] = None, target: float = FIX_TARGET
                   ) -> tuple[AutoencoderKL, float, float]:
    """A rescaled fp32 copy of ``model`` whose stream peaks on ``sample`` are ≤ ``target`` where shrinkable.

    Returns:
        ``(new_model, peak_before, peak_after)``: largest |module output| before and after, on the same input.
    """
    def rescale(fixed: nn.Module, before: dict[nn.Module, float]) -> None:
        enc_segs, dec_segs = stream_segments(fixed)
        for segs, norm in ((enc_segs, fixed.encoder.norm_out), (dec_segs, fixed.decoder.norm_out)):
            scales, conv1 = choose_scales(segs, before, target)
            rescale_stream(segs, norm, scales, conv1)

    return fix_copy(model, sample, rescale)
