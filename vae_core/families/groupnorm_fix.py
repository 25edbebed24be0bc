"""The training-free fp16 fix of the GroupNorm-normalised designs: the kl family (AutoencoderKL) and HunyuanVideo
1.0 (the same network in 3-D).

The fix rests on one identity: ``GroupNorm(s·x)`` with ``eps`` replaced by ``s²·eps`` equals ``GroupNorm(x)`` for
any ``s > 0``. In the AutoencoderKL every read of the residual stream goes through a GroupNorm except the residual
adds, the 1×1 shortcuts and the resampling convs, so the stream can be multiplied by a factor per *segment*
(a run of blocks joined by identity skips) by rescaling the convs that write into it (``conv_in``, each resnet's
``conv2``, attention ``proj_out``, shortcuts and resampling convs, which also undo the previous segment's factor)
and each reading GroupNorm's ``eps``. Each resnet's ``conv1`` feeds only ``norm2`` and takes a free factor of its
own. Factors are powers of two, so in fp32 the rescaled model computes the same function to rounding.

The walk reads modules by what they hold (``conv1``: a residual block, ``proj_out``: attention, a ``conv`` alone: a
resampler), so the HunyuanVideo 1.0 design — the same network with causal 3-D convs (each under ``.conv``;
replicate padding commutes with the factors) — is fixed by the same code.

What it cannot shrink: post-GroupNorm activations, q/k/v and attention logits, and ``conv_out``; they are bounded
by the GroupNorm affine parameters and the weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..precision.calibrate import FIX_TARGET, fix_copy, pow2_down, scale_conv

__all__ = ["StreamSegment", "stream_segments", "rescale_stream", "choose_scales", "fp16_fix_model"]


@dataclass
class StreamSegment:
    """A run of the residual stream at one scale: ``entry`` writes it from the previous segment (or the input)."""

    entry: nn.Module
    members: list[nn.Module] = field(default_factory=list)


def _is_block(m: nn.Module) -> bool:
    return hasattr(m, "conv1")


def _is_attn(m: nn.Module) -> bool:
    return hasattr(m, "proj_out")


def _w(m: nn.Module) -> nn.Module:
    """The module holding a conv's weight: the conv itself, or the 3-D conv inside a causal-conv wrapper."""
    return m if hasattr(m, "weight") else m.conv


def _walk(entry: nn.Module, body: list[nn.Module]) -> list[StreamSegment]:
    segs = [StreamSegment(entry)]
    for mod in body:
        resampler = not _is_block(mod) and not _is_attn(mod)
        if resampler or (_is_block(mod) and mod.nin_shortcut is not None):
            segs.append(StreamSegment(mod))
        else:
            segs[-1].members.append(mod)
    return segs


def stream_segments(model: nn.Module) -> tuple[list[StreamSegment], list[StreamSegment]]:
    """Encoder and decoder segments, in stream order."""
    enc, dec = model.encoder, model.decoder
    enc_body: list[nn.Module] = []
    for level in enc.down:
        down = getattr(level, "downsample", None)
        enc_body += list(level.block) + ([down] if down is not None else [])
    enc_body += [enc.mid.block_1, enc.mid.attn_1, enc.mid.block_2]
    dec_body: list[nn.Module] = [dec.mid.block_1, dec.mid.attn_1, dec.mid.block_2]
    for level in reversed(dec.up):
        up = getattr(level, "upsample", None)
        dec_body += list(level.block) + ([up] if up is not None else [])
    return _walk(enc.conv_in, enc_body), _walk(dec.conv_in, dec_body)


def _scale_resnet(r: nn.Module, s_in: float, s_out: float, t: float) -> None:
    r.norm1.eps *= s_in * s_in
    scale_conv(_w(r.conv1), t, t)
    r.norm2.eps *= t * t
    scale_conv(_w(r.conv2), s_out, s_out)
    if r.nin_shortcut is not None:
        scale_conv(_w(r.nin_shortcut), s_out / s_in, s_out)


@torch.no_grad()
def rescale_stream(segments: list[StreamSegment], final_norm: nn.GroupNorm, scales: list[float],
                   conv1_scales: Optional[dict[nn.Module, float]] = None) -> None:
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
    for i, (seg, s) in enumerate(zip(segments, scales)):
        e = seg.entry
        if i == 0:  # conv_in
            scale_conv(_w(e), s, s)
        elif not _is_block(e):  # a resampler
            scale_conv(_w(e.conv), s / prev, s)
        else:
            _scale_resnet(e, prev, s, conv1_scales.get(e, 1.0))
        for m in seg.members:
            if _is_block(m):
                _scale_resnet(m, s, s, conv1_scales.get(m, 1.0))
            elif _is_attn(m):
                m.norm.eps *= s * s
                scale_conv(m.proj_out, s, s)
        prev = s
    final_norm.eps *= prev * prev


def choose_scales(segments: list[StreamSegment], peaks: dict[nn.Module, float], target: float = FIX_TARGET
                  ) -> tuple[list[float], dict[nn.Module, float]]:
    """Power-of-two factors bringing each segment's peak (writer outputs and conv2 outputs) and each conv1 output
    down to ``target``."""
    scales, conv1 = [], {}
    for seg in segments:
        mods = [seg.entry] + seg.members
        peak = 0.0
        for m in mods:
            peak = max(peak, peaks.get(m, 0.0))
            if _is_block(m):
                peak = max(peak, peaks.get(m.conv2, 0.0), peaks.get(m.nin_shortcut, 0.0) if m.nin_shortcut else 0.0)
                conv1[m] = pow2_down(peaks.get(m.conv1, 0.0), target)
            elif _is_attn(m):
                peak = max(peak, peaks.get(m.proj_out, 0.0))
        scales.append(pow2_down(peak, target))
    return scales, conv1


def fp16_fix_model(model: nn.Module, sample: Optional[torch.Tensor] = None, target: float = FIX_TARGET
                   ) -> tuple[nn.Module, float, float]:
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
