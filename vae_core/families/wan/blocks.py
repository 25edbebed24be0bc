"""The layers of the Wan VAE design (Wan 2.1, Qwen-Image, Wan 2.2), host-free, streamed over frames.

Every layer takes videos ``[B, C, T, H, W]`` and a :class:`~vae_core.tiling.stream.CausalState` (or None: a single
first frame with nothing before it, the image case). Causal 3-D convs pad ``2·p`` frames in front: with a state they
prepend the frames the previous chunk left there (zeros before the first frame), exactly as the reference's feature
cache does; on a lone first frame they run as a 2-D conv with the kernel's last temporal tap (the other taps read
zeros). Parameter names are the original Wan layout (``residual.{0,2,3,6}``, ``shortcut``, ``resample.1``,
``time_conv``), so original weights load with ``strict=True``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import RMSNorm, attention
from ...tiling.stream import CausalState, is_first

__all__ = ["CausalConv3d", "RMSNorm", "ResidualBlock", "AttentionBlock", "Resample", "AvgDown3D", "DupUp3D",
           "DownBlock", "UpBlock", "patchify", "unpatchify", "per_frame"]

State = Optional[CausalState]


def per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D ``fn`` (``[N, C, H, W]`` → ``[N, C', H', W']``) to every frame of ``x [B, C, T, H, W]``."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class CausalConv3d(nn.Conv3d):
    """A 3-D conv causal in time: ``2·padding_t`` frames of left context (the state's, else zeros), spatial zero
    padding as given. ``[B, C, T, H, W]`` → ``[B, O, T', H', W']``."""

    def _prev(self, x: torch.Tensor, state: State) -> Optional[torch.Tensor]:
        n = 2 * self.padding[0]
        if n == 0:
            return None
        prev = state.cache.get(self) if state is not None else None
        if state is not None:
            seq = x if prev is None else torch.cat([prev, x], 2)
            state.cache[self] = seq[:, :, -n:].clone()
        return prev

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:  # type: ignore[override]
        n = 2 * self.padding[0]
        prev = self._prev(x, state)
        pad = self.padding[1:]
        if n == 0:
            return F.conv3d(x, self.weight, self.bias, self.stride, (0, *pad))
        if prev is None and x.shape[2] == 1 and self.kernel_size[0] == n + 1 and self.stride[0] == 1:
            return F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, padding=pad).unsqueeze(2)
        missing = n if prev is None else n - prev.shape[2]  # zeros before the first frame
        if prev is not None:
            x = torch.cat([prev, x], 2)
        if missing:
            x = F.pad(x, (0, 0, 0, 0, missing, 0))
        return F.conv3d(x, self.weight, self.bias, self.stride, (0, *pad))


class ResidualBlock(nn.Module):
    """``residual``: RMS norm, SiLU, conv, RMS norm, SiLU, dropout, conv (indices 0–6); ``shortcut`` 1×1×1 if widths
    differ. Spatial receptive radius 2 (two 3×3 convs); two frames of left context per conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(RMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1), RMSNorm(cout),
                                      nn.SiLU(), nn.Dropout(0.0), CausalConv3d(cout, cout, 3, padding=1))
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        r = self.residual
        h = r[2](F.silu(r[0](x)), state)
        h = r[6](F.silu(r[3](h)), state)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels of each frame (``norm``, ``to_qkv``, ``proj``): global in space,
    per frame in time."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _frame(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(b, 3 * c, h * w).transpose(1, 2).chunk(3, dim=-1)
        out = attention(q.contiguous(), k.contiguous(), v.contiguous())
        return self.proj(out.transpose(1, 2).reshape(b, c, h, w)) + x

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        return per_frame(self._frame, x)


class Resample(nn.Module):
    """``down``: right/bottom zero pad, 3×3 stride 2, then (``temporal``) a stride-2 time conv over the previous
    chunk's last frame and this chunk; ``up``: (``temporal``) a time conv doubling the frames, then nearest ×2 and a
    3×3 conv to ``out_dim`` (Wan 2.1: half the channels). The reference's first chunk skips the time conv (one frame
    in, one frame out) and the up time conv starts its causal stream from the second chunk."""

    def __init__(self, dim: int, mode: str, temporal: bool, out_dim: Optional[int] = None) -> None:
        super().__init__()
        self.mode, self.temporal = mode, temporal
        if mode == "down":
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if temporal:
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                          nn.Conv2d(dim, out_dim or dim // 2, 3, padding=1))
            if temporal:
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        if self.mode == "up":
            if self.temporal and not is_first(state):
                b, c, t, h, w = x.shape
                y = self.time_conv(x, state).reshape(b, 2, c, t, h, w)
                x = torch.stack((y[:, 0], y[:, 1]), 3).reshape(b, c, 2 * t, h, w)
            return per_frame(self.resample, x)
        x = per_frame(self.resample, x)
        if not self.temporal or state is None:
            return x
        prev = state.cache.get(self)
        state.cache[self] = x[:, :, -1:].clone()
        if prev is None:  # the first chunk passes through
            return x
        return self.time_conv(torch.cat([prev, x], 2))


class AvgDown3D(nn.Module):
    """Wan 2.2's parameter-free shortcut: space/time-to-channel by ``factor_t × factor_s²``, then the mean over
    groups of channels to ``cout``. Each chunk is zero-padded in front to a multiple of ``factor_t`` (the first,
    one-frame chunk averages its frame with a zero frame), as the reference does."""

    def __init__(self, cin: int, cout: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.cin, self.cout, self.ft, self.fs = cin, cout, factor_t, factor_s
        self.group = cin * factor_t * factor_s * factor_s // cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        x = F.pad(x, (0, 0, 0, 0, (ft - x.shape[2] % ft) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, self.cout, self.group, t // ft, h // fs, w // fs).mean(dim=2)


class DupUp3D(nn.Module):
    """Wan 2.2's parameter-free up shortcut: channels repeated and moved to ``factor_t × factor_s²`` positions; on the
    first chunk the first ``factor_t − 1`` frames are dropped (one latent frame → one frame)."""

    def __init__(self, cin: int, cout: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.cout, self.ft, self.fs = cout, factor_t, factor_s
        self.repeats = cout * factor_t * factor_s * factor_s // cin

    def forward(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        x = x.repeat_interleave(self.repeats, dim=1)
        b, _, t, h, w = x.shape
        x = x.view(b, self.cout, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, self.cout, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first else x


class DownBlock(nn.Module):
    """Wan 2.2's encoder level: ``downsamples`` (residual blocks, then a Resample unless last) plus the
    :class:`AvgDown3D` shortcut of the level's input."""

    def __init__(self, cin: int, cout: int, num_res: int, temporal: bool, down: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(cin, cout, 2 if temporal else 1, 2 if down else 1)
        blocks: list[nn.Module] = []
        for _ in range(num_res):
            blocks.append(ResidualBlock(cin, cout))
            cin = cout
        if down:
            blocks.append(Resample(cout, "down", temporal))
        self.downsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        h = x
        for m in self.downsamples:
            h = m(h, state)
        return h + self.avg_shortcut(x)


class UpBlock(nn.Module):
    """Wan 2.2's decoder level: ``upsamples`` (``num_res + 1`` residual blocks, then a Resample to the same width
    unless last) plus the :class:`DupUp3D` shortcut where it upsamples."""

    def __init__(self, cin: int, cout: int, num_res: int, temporal: bool, up: bool) -> None:
        super().__init__()
        self.avg_shortcut = DupUp3D(cin, cout, 2 if temporal else 1, 2) if up else None
        blocks: list[nn.Module] = []
        for _ in range(num_res + 1):
            blocks.append(ResidualBlock(cin, cout))
            cin = cout
        if up:
            blocks.append(Resample(cout, "up", temporal, out_dim=cout))
        self.upsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        h = x
        for m in self.upsamples:
            h = m(h, state)
        return h if self.avg_shortcut is None else h + self.avg_shortcut(x, is_first(state))


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, T, H, W]`` → ``[B, C·p², T, H/p, W/p]``; channel ``c·p² + j·p + i`` holds pixel offset (row i,
    col j), the Wan 2.2 order."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of :func:`patchify`."""
    if p == 1:
        return x
    b, cp, t, h, w = x.shape
    x = x.reshape(b, cp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cp // (p * p), t, h * p, w * p)
