"""The layers of the HunyuanVideo 1.5 VAE design, host-free, streamed over frames.

Every layer takes videos ``[B, C, T, H, W]`` and a :class:`~vae_core.tiling.stream.CausalState` (or None: one call
over all the frames given, the first of them the clip's first). Causal 3-D convs pad in time with two copies of the
clip's first frame (replicate padding, as the reference does) and, with a state, prepend the last two frames of the
previous chunk instead; in space they pad by replicating the border pixel (window edges inside a tiled frame are
never read by a kept pixel). The mid block's attention is frame-causal over every pixel of every frame so far (the
reference's mask): with a state, the keys and values of earlier chunks are kept. Parameter names are the original
layout (``conv.weight``, ``norm1.gamma``, ``nin_shortcut``, ``q``/``k``/``v``/``proj_out``), so original weights
load with ``strict=True``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import RMSNorm, attention
from ...tiling.stream import CausalState, is_first

__all__ = ["CausalConv3d", "ResnetBlock", "AttnBlock", "Downsample", "Upsample", "space_to_channels",
           "channels_to_space"]

State = Optional[CausalState]


class CausalConv3d(nn.Module):
    """A 3×3×3 conv causal in time (``conv``: the weights): two frames of left context (the state's, else the first
    frame replicated), one replicated pixel around in space. ``[B, C, T, H, W]`` → ``[B, O, T, H, W]``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3)

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        prev = state.cache.get(self) if state is not None else None
        if prev is None:
            seq = torch.cat([x[:, :, :1], x[:, :, :1], x], 2)
        else:
            seq = torch.cat([prev, x], 2)
        if state is not None:
            state.cache[self] = seq[:, :, -2:].clone()
        seq = F.pad(seq, (1, 1, 1, 1, 0, 0), mode="replicate")
        return F.conv3d(seq, self.conv.weight, self.conv.bias)


class ResnetBlock(nn.Module):
    """RMS norm, SiLU, conv, RMS norm, SiLU, conv, plus the input (``nin_shortcut``: a 1×1×1 conv where the widths
    differ). Spatial receptive radius 2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = RMSNorm(cin), CausalConv3d(cin, cout)
        self.norm2, self.conv2 = RMSNorm(cout), CausalConv3d(cout, cout)
        self.nin_shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), state)
        h = self.conv2(F.silu(self.norm2(h)), state)
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head attention over every pixel of every frame, frame-causal: a pixel of frame ``f`` attends to the
    pixels of frames ``0..f`` (the reference's mask). With a state, the keys and values of earlier chunks are kept
    (they grow with the frames, at latent resolution: 2 × C values per latent pixel)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.q, self.k, self.v = nn.Conv3d(dim, dim, 1), nn.Conv3d(dim, dim, 1), nn.Conv3d(dim, dim, 1)
        self.proj_out = nn.Conv3d(dim, dim, 1)

    @staticmethod
    def _tokens(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(2).transpose(1, 2).contiguous()  # [B, C, T, H, W] -> [B, T·H·W, C]

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        n = self.norm(x)
        q, k, v = self._tokens(self.q(n)), self._tokens(self.k(n)), self._tokens(self.v(n))
        if state is not None:
            pk, pv = state.cache.get((self, "k")), state.cache.get((self, "v"))
            if pk is not None:
                k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
            state.cache[(self, "k")], state.cache[(self, "v")] = k, v
        hw, before = h * w, k.shape[1] - t * h * w
        out = torch.cat([attention(q[:, f * hw:(f + 1) * hw], k[:, :before + (f + 1) * hw],
                                   v[:, :before + (f + 1) * hw]) for f in range(t)], 1)
        return self.proj_out(out.transpose(1, 2).reshape(b, c, t, h, w)) + x


def space_to_channels(x: torch.Tensor, rt: int) -> torch.Tensor:
    """``[B, C, rt·T, 2H, 2W]`` → ``[B, rt·4·C, T, H, W]`` (channel order: time offset, row offset, column offset,
    then channel), the reference's packing."""
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // rt, rt, h // 2, 2, w // 2, 2).permute(0, 3, 5, 7, 1, 2, 4, 6)
    return x.reshape(b, rt * 4 * c, t // rt, h // 2, w // 2)


def channels_to_space(x: torch.Tensor, rt: int) -> torch.Tensor:
    """The inverse of :func:`space_to_channels`: ``[B, rt·4·C, T, H, W]`` → ``[B, C, rt·T, 2H, 2W]``."""
    b, pc, t, h, w = x.shape
    c = pc // (rt * 4)
    x = x.view(b, rt, 2, 2, c, t, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
    return x.reshape(b, c, t * rt, h * 2, w * 2)


class Downsample(nn.Module):
    """×2 down in space (and in time where ``temporal``) by a causal conv packed into channels, plus the input packed
    and averaged over channel groups. In time the clip's first frame goes alone (its packed channels doubled), the
    others in pairs; a chunk holding the first frame must hold nothing else but it or an odd count after it."""

    def __init__(self, cin: int, cout: int, temporal: bool) -> None:
        super().__init__()
        factor = 8 if temporal else 4
        self.conv = CausalConv3d(cin, cout // factor)
        self.temporal, self.cout = temporal, cout
        self.group = factor * cin // cout

    def _mean(self, x: torch.Tensor, group: int) -> torch.Tensor:
        b, _, t, h, w = x.shape
        return x.view(b, self.cout, group, t, h, w).mean(dim=2)

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        y = self.conv(x, state)
        if not self.temporal:
            return space_to_channels(y, 1) + self._mean(space_to_channels(x, 1), self.group)
        parts, short = [], []
        if is_first(state):
            first = space_to_channels(y[:, :, :1], 1)
            parts.append(torch.cat([first, first], 1))
            short.append(self._mean(space_to_channels(x[:, :, :1], 1), self.group // 2))
            y, x = y[:, :, 1:], x[:, :, 1:]
        if y.shape[2]:
            parts.append(space_to_channels(y, 2))
            short.append(self._mean(space_to_channels(x, 2), self.group))
        return torch.cat(parts, 2) + torch.cat(short, 2)


class Upsample(nn.Module):
    """×2 up in space (and in time where ``temporal``): a causal conv unpacked from channels, plus the input's
    channels repeated and unpacked. In time the clip's first frame gives one frame (half the packed channels), the
    others two each."""

    def __init__(self, cin: int, cout: int, temporal: bool) -> None:
        super().__init__()
        factor = 8 if temporal else 4
        self.conv = CausalConv3d(cin, cout * factor)
        self.temporal = temporal
        self.repeats = factor * cout // cin

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        y = self.conv(x, state)
        if not self.temporal:
            return channels_to_space(y, 1) + channels_to_space(x.repeat_interleave(self.repeats, dim=1), 1)
        parts, short = [], []
        if is_first(state):
            first = channels_to_space(y[:, :, :1], 1)
            parts.append(first[:, : first.shape[1] // 2])
            short.append(channels_to_space(x[:, :, :1], 1).repeat_interleave(self.repeats // 2, dim=1))
            y, x = y[:, :, 1:], x[:, :, 1:]
        if y.shape[2]:
            parts.append(channels_to_space(y, 2))
            short.append(channels_to_space(x, 2).repeat_interleave(self.repeats, dim=1))
        return torch.cat(parts, 2) + torch.cat(short, 2)
