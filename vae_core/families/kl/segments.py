"""The high-resolution stages of the kl-f8 encoder/decoder as a list of *segments* that tiles can run one at a time
(the sweep engine, :mod:`vae_core.tiling.sweep`, runs them; :class:`~vae_core.tiling.geometry.SweepSegment` is what it
needs of one).

Every segment except a stage's first starts at a GroupNorm, so a tile can stop just before a norm, wait for that
norm's whole-image statistics, then go on from exactly where it stopped. A segment reads and writes a small
*state*: the residual stream ``x`` and, inside a resnet block, the branch ``h``.

| segment | starts with | state in → out | does |
|---|---|---|---|
| ``convin`` | — | x(3 ch) → x | encoder ``conv_in`` |
| ``upconv`` | — | x → x at 2× | decoder ``Upsample`` (nearest ×2, 3×3 conv) |
| ``res1`` | ``norm1`` on x | x → x, h | ``h = conv1(silu(norm1(x)))`` |
| ``res2`` | ``norm2`` on h | x, h → x | ``x = shortcut(x) + conv2(silu(norm2(h)))`` |
| ``down`` | — | x → x at ½ | encoder ``Downsample`` (pad right/bottom, 3×3 stride 2) |
| ``head`` | ``norm_out`` on x | x → image | decoder ``conv_out(silu(norm_out(x)))`` |

Geometry is per axis and exact: each segment maps the interval it must *output* to the interval it must *read*
(:meth:`Segment.needs`), so a tile's windows are derived backwards from its core, and every 3×3 conv is computed as
a "valid" convolution inside the image and zero-padded only where the window touches the image border, exactly
like the untiled conv. Tensors are ``[1, C, h, w]`` in the model's dtype; intervals are ``(start, end)`` at the
resolution where the segment reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...tiling.geometry import Interval, Rect, Rects, State, Stats, hull
from ...tiling.stats import apply_norm
from .model import AutoencoderKL, GroupNorm, ResnetBlock

__all__ = ["Segment", "decoder_segments", "encoder_segments", "conv3", "conv_flops"]


def _c3(i: Interval, n: int) -> Interval:
    """Input interval a 3×3 stride-1 conv (zero padding 1) reads to produce output interval ``i``."""
    return max(0, i[0] - 1), min(n, i[1] + 1)


def _up(i: Interval, n_in: int) -> Interval:
    """Input interval nearest ×2 upsampling reads to produce output interval ``i``."""
    return i[0] // 2, min(n_in, (i[1] + 1) // 2)


def _down(i: Interval, n_in: int) -> Interval:
    """Input interval of pad(right/bottom 1) + 3×3 stride-2 conv for output interval ``i`` (pad row excluded)."""
    return 2 * i[0], min(n_in, 2 * i[1] + 1)


def _crop(t: torch.Tensor, have: Rect, want: Rect) -> torch.Tensor:
    (hy, hx), (wy, wx) = have, want
    if have == want:
        return t
    return t[..., wy[0] - hy[0]:wy[1] - hy[0], wx[0] - hx[0]:wx[1] - hx[0]]


def conv3(t: torch.Tensor, have: Rect, conv: nn.Conv2d, out: Rect, size: tuple[int, int]) -> torch.Tensor:
    """3×3 stride-1 conv of ``t`` (covering ``have``) giving exactly the rect ``out``: valid inside the image,
    zero-padded only on sides where ``out`` touches the border of an image of ``size`` (H, W)."""
    want = (_c3(out[0], size[0]), _c3(out[1], size[1]))
    t = _crop(t, have, want)
    top, bottom = int(out[0][0] == 0), int(out[0][1] == size[0])
    left, right = int(out[1][0] == 0), int(out[1][1] == size[1])
    pad = [0, 0]
    if top and bottom:
        pad[0], top, bottom = 1, 0, 0
    if left and right:
        pad[1], left, right = 1, 0, 0
    if top or bottom or left or right:
        t = F.pad(t, (left, right, top, bottom))
    return F.conv2d(t, conv.weight, conv.bias, 1, tuple(pad))


def norm_silu(t: torch.Tensor, m: GroupNorm, stats: Stats) -> torch.Tensor:
    """SiLU of the GroupNorm ``m`` of ``t`` with the whole-image statistics ``stats[m]`` (``[1, G]`` mean/var)."""
    mean, var = stats[m]
    return F.silu(apply_norm(m, t, mean, var), inplace=True)


def conv_flops(conv: nn.Conv2d, pixels: int) -> int:
    """FLOPs (2 per multiply-add) of ``conv`` over ``pixels`` output pixels, batch 1."""
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return 2 * k * conv.in_channels * conv.out_channels * pixels


@dataclass
class Segment:
    """One segment of a tiled stage (see the module docstring for the kinds).

    Attributes:
        kind: ``convin`` | ``upconv`` | ``res1`` | ``res2`` | ``down`` | ``head``.
        module: the conv, resnet block, ``Downsample``/``Upsample`` or, for ``head``, the decoder.
        norm: the GroupNorm the segment starts with (its statistics must be known before it runs), or None.
        norm_reg: the register that norm reads.
        scale: 2 (upsamples), 1, or -2 (downsamples) from input to output resolution.
        channels: channels of each register at the segment's input; ``out_channels`` of ``x`` at its output.
    """

    kind: str
    module: nn.Module
    norm: Optional[GroupNorm]
    norm_reg: str
    scale: int
    channels: dict[str, int]
    out_channels: int

    def out_size(self, n: int) -> int:
        return n * 2 if self.scale == 2 else n // 2 if self.scale == -2 else n

    # -- geometry ------------------------------------------------------------------------------------------
    def needs(self, out: Rects, n_in: tuple[int, int]) -> Rects:
        """Rects each input register must cover so the segment can produce ``out`` (an image of ``n_in``)."""
        n_out = (self.out_size(n_in[0]), self.out_size(n_in[1]))
        axes = range(2)
        if self.kind in ("convin", "head"):
            return {"x": tuple(_c3(out["x"][a], n_in[a]) for a in axes)}
        if self.kind == "upconv":
            return {"x": tuple(_up(_c3(out["x"][a], n_out[a]), n_in[a]) for a in axes)}
        if self.kind == "down":
            return {"x": tuple(_down(out["x"][a], n_in[a]) for a in axes)}
        if self.kind == "res1":
            return {"x": tuple(hull(out["x"][a], _c3(out["h"][a], n_in[a])) for a in axes)}
        if self.kind == "res2":
            return {"x": out["x"], "h": tuple(_c3(out["x"][a], n_in[a]) for a in axes)}
        raise AssertionError(self.kind)

    def outputs(self) -> tuple[str, ...]:
        return ("x", "h") if self.kind == "res1" else ("x",)

    def flops(self, out: Rects) -> int:
        """FLOPs of the convs of this segment for the output rects ``out`` (batch 1)."""
        area = lambda r: (r[0][1] - r[0][0]) * (r[1][1] - r[1][0])  # noqa: E731
        m = self.module
        if self.kind in ("convin", "upconv", "down"):
            conv = m if isinstance(m, nn.Conv2d) else m.conv
            return conv_flops(conv, area(out["x"]))
        if self.kind == "head":
            return conv_flops(m.conv_out, area(out["x"]))
        if self.kind == "res1":
            return conv_flops(m.conv1, area(out["h"]))
        f = conv_flops(m.conv2, area(out["x"]))
        return f + (conv_flops(m.nin_shortcut, area(out["x"])) if m.nin_shortcut is not None else 0)

    # -- execution -----------------------------------------------------------------------------------------
    def run(self, state: State, have: Rects, out: Rects, n_in: tuple[int, int], stats: Stats) -> State:
        """Run on a tile: ``state`` covers ``have`` (image of size ``n_in``); returns the state covering ``out``."""
        m, x = self.module, state["x"]
        if self.kind == "convin":
            return {"x": conv3(x, have["x"], m, out["x"], n_in)}
        if self.kind == "upconv":
            n_out = (n_in[0] * 2, n_in[1] * 2)
            mid = tuple(_c3(out["x"][a], n_out[a]) for a in range(2))
            src = tuple(_up(mid[a], n_in[a]) for a in range(2))
            t = F.interpolate(_crop(x, have["x"], src), scale_factor=2.0, mode="nearest")
            t = _crop(t, tuple((2 * s[0], 2 * s[1]) for s in src), mid)
            return {"x": conv3(t, mid, m.conv, out["x"], n_out)}
        if self.kind == "down":
            src = tuple(_down(out["x"][a], n_in[a]) for a in range(2))
            t = _crop(x, have["x"], src)
            pad_b, pad_r = 2 * out["x"][0][1] + 1 - src[0][1], 2 * out["x"][1][1] + 1 - src[1][1]
            if pad_b or pad_r:
                t = F.pad(t, (0, pad_r, 0, pad_b))
            return {"x": F.conv2d(t, m.conv.weight, m.conv.bias, 2, 0)}
        if self.kind == "head":
            src = tuple(_c3(out["x"][a], n_in[a]) for a in range(2))
            t = norm_silu(_crop(x, have["x"], src), m.norm_out, stats)
            return {"x": conv3(t, src, m.conv_out, out["x"], n_in)}
        if self.kind == "res1":
            src = tuple(_c3(out["h"][a], n_in[a]) for a in range(2))
            t = norm_silu(_crop(x, have["x"], src), m.norm1, stats)
            return {"x": _crop(x, have["x"], out["x"]), "h": conv3(t, src, m.conv1, out["h"], n_in)}
        if self.kind == "res2":
            src = tuple(_c3(out["x"][a], n_in[a]) for a in range(2))
            t = norm_silu(_crop(state["h"], have["h"], src), m.norm2, stats)
            h = conv3(t, src, m.conv2, out["x"], n_in)
            skip = _crop(x, have["x"], out["x"])
            if m.nin_shortcut is not None:
                skip = m.nin_shortcut(skip)
            return {"x": skip.add_(h) if m.nin_shortcut is not None else h.add_(skip)}
        raise AssertionError(self.kind)


def _resnet(block: ResnetBlock) -> list[Segment]:
    cin, cout = block.conv1.in_channels, block.conv1.out_channels
    return [Segment("res1", block, block.norm1, "x", 1, {"x": cin}, cout),
            Segment("res2", block, block.norm2, "h", 1, {"x": cin, "h": cout}, cout)]


def decoder_segments(model: AutoencoderKL) -> list[list[Segment]]:
    """Per tiled decoder stage, from the latent resolution up: the upsample of the level below, the level's resnets
    and, in the last stage, the head. Stage ``i`` reads at latent resolution × 2^i."""
    dec, stages = model.decoder, []
    for lvl in reversed(range(len(dec.up) - 1)):
        up = dec.up[lvl + 1].upsample
        segs = [Segment("upconv", up, None, "x", 2, {"x": up.conv.in_channels}, up.conv.out_channels)]
        for block in dec.up[lvl].block:
            segs += _resnet(block)
        if lvl == 0:
            segs.append(Segment("head", dec, dec.norm_out, "x", 1, {"x": dec.norm_out.num_channels},
                                dec.conv_out.out_channels))
        stages.append(segs)
    return stages


def encoder_segments(model: AutoencoderKL) -> list[list[Segment]]:
    """Per tiled encoder stage, from the image resolution down to the lowest level: conv_in (first stage), the
    level's resnets and its downsample. Stage ``i`` reads at image resolution / 2^i."""
    enc, stages = model.encoder, []
    for lvl in range(len(enc.down) - 1):
        segs: list[Segment] = []
        if lvl == 0:
            segs.append(Segment("convin", enc.conv_in, None, "x", 1, {"x": enc.conv_in.in_channels},
                                enc.conv_in.out_channels))
        for block in enc.down[lvl].block:
            segs += _resnet(block)
        down = enc.down[lvl].downsample
        segs.append(Segment("down", down, None, "x", -2, {"x": down.conv.in_channels}, down.conv.out_channels))
        stages.append(segs)
    return stages
