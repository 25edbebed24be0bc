"""The layers of the LTX-Video VAE design, host-free, streamed over frames.

Every layer takes videos ``[B, C, T, H, W]`` and a :class:`~vae_core.tiling.stream.CausalState` (or None: one call
over the whole clip, both its ends in view: the reference pass). 3-D convs pad in time by replicating the clip's
first frame (causal: two copies, the encoder's) or its first and its last frame (non-causal: one each, the
decoder's); with a state they keep the input frames they have not consumed and *lag*: a non-causal conv gives frame
``t`` once frame ``t + 1`` has arrived, and its last frame on the call marked ``state.final``
(:mod:`vae_core.tiling.lagged`). Blocks that add a shortcut to a lagging branch queue the shortcut's frames. In space
the convs pad by one pixel, zeros or reflected (the decoder of the original files), which a tiled window's halo keeps
away from every kept pixel. Norms are per pixel (``pixel_norm``: RMS over channels; LayerNorm on channel-changing
shortcuts), so every layer is local in space.

Parameter names are the original layout (Lightricks' files, as ComfyUI ships them): ``conv.weight`` inside a conv,
``res_blocks.<j>.conv1.conv``, ``norm3.norm``, ``conv_shortcut``, ``per_channel_scale1/2``, ``scale_shift_table``,
``time_embedder.timestep_embedder.linear_1/2``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...tiling.stream import CausalState

__all__ = ["TimeConv", "ResBlock", "ResGroup", "SpaceToDepth", "DepthToSpace", "TimestepEmbedder", "pixel_norm",
           "DecodeContext"]

State = Optional[CausalState]
_MARK = torch.empty(0)  # a state entry that only says "done" (no bytes)


def pixel_norm(x: torch.Tensor) -> torch.Tensor:
    """RMS over channels per pixel and frame, ε = 1e-8 (LTX's ``PixelNorm`` / diffusers' ``RMSNorm`` without
    weight); half-precision inputs are normalised in float32."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * torch.rsqrt(xf.pow(2).mean(1, keepdim=True) + 1e-8)).to(x.dtype)


def _queue(state: CausalState, key: object, new: torch.Tensor, n: int) -> torch.Tensor:
    """Append ``new`` to the frame queue at ``key`` and take its first ``n`` frames (a lagging branch's partner)."""
    q = state.cache.pop(key, None)
    q = new if q is None else torch.cat([q, new], 2)
    if q.shape[2] > n:
        state.cache[key] = q[:, :, n:].clone()
    return q[:, :, :n]


class TimeConv(nn.Module):
    """A 3-D conv (``conv``: the weights, kernel ``k`` in every axis) padded in time by replicated end frames:
    ``k − 1`` copies of the first frame (``causal``) or ``(k − 1)/2`` of the first and of the last frame; in space
    ``k // 2`` pixels of ``padding_mode`` (``"zeros"``/``"reflect"``). Stride ``(st, s, s)``.
    ``[B, I, T, H, W]`` → ``[B, O, T', H', W']``."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: tuple[int, int, int] = (1, 1, 1),
                 causal: bool = True, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=(0, kernel // 2, kernel // 2),
                              padding_mode=padding_mode)
        self.kernel, self.stride_t, self.causal = kernel, stride[0], causal
        self.left = kernel - 1 if causal else (kernel - 1) // 2
        self.right = 0 if causal else (kernel - 1) // 2

    def _empty(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        h, w = ((n + 2 * p - k) // s + 1 for n, p, k, s in zip(x.shape[3:], c.padding[1:], c.kernel_size[1:],
                                                               c.stride[1:]))
        return x.new_empty((x.shape[0], c.out_channels, 0, h, w))

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        k, s = self.kernel, self.stride_t
        if state is None:
            seq = torch.cat([x[:, :, :1]] * self.left + [x] + [x[:, :, -1:]] * self.right, 2)
            return self.conv(seq)
        prev = state.cache.get(self)
        if prev is None:
            if x.shape[2] == 0:
                return self._empty(x)
            seq = torch.cat([x[:, :, :1]] * self.left + [x], 2)
        else:
            seq = torch.cat([prev, x], 2)
        if state.final and self.right:
            seq = torch.cat([seq] + [seq[:, :, -1:]] * self.right, 2)
        n = (seq.shape[2] - k) // s + 1 if seq.shape[2] >= k else 0
        state.cache[self] = seq[:, :, n * s:].clone()
        return self.conv(seq[:, :, :(n - 1) * s + k]) if n else self._empty(x)


class DecodeContext:
    """What a decode call gives its layers besides frames: per conditioned block the timestep's scale/shift values
    (``ada``: ``[B, 4, C, 1, 1, 1]``, or the head's ``[B, 2, C, 1, 1, 1]``), and per noise-injecting block its two
    whole-frame noise maps ``[H, W]`` (``noise``), sliced at ``state.window`` in tiles."""

    def __init__(self) -> None:
        self.ada: dict[nn.Module, torch.Tensor] = {}
        self.noise: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}


class _Norm3(nn.Module):
    """The LayerNorm over channels of a channel-changing shortcut (``norm``: ε = 1e-6, affine)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class ResBlock(nn.Module):
    """Pixel norm, (timestep scale/shift), SiLU, conv, (spatial noise), pixel norm, (scale/shift), SiLU, conv,
    (spatial noise), plus the input (LayerNorm + 1×1×1 conv where the widths differ). Spatial radius 2."""

    def __init__(self, cin: int, cout: int, causal: bool, padding: str, noise: bool = False,
                 conditioned: bool = False) -> None:
        super().__init__()
        self.conv1 = TimeConv(cin, cout, causal=causal, padding_mode=padding)
        self.conv2 = TimeConv(cout, cout, causal=causal, padding_mode=padding)
        if cin != cout:
            self.norm3, self.conv_shortcut = _Norm3(cin), nn.Conv3d(cin, cout, 1)
        if noise:
            self.per_channel_scale1 = nn.Parameter(torch.zeros(cin, 1, 1))
            self.per_channel_scale2 = nn.Parameter(torch.zeros(cin, 1, 1))
        if conditioned:
            self.scale_shift_table = nn.Parameter(torch.zeros(4, cin))

    def _noise(self, h: torch.Tensor, ctx: Optional[DecodeContext], which: int, state: State) -> torch.Tensor:
        if ctx is None or self not in ctx.noise:
            raise RuntimeError("a noise-injecting LTX block run without its noise maps (use LTXVAE.decode)")
        r, c = state.window if state is not None else (0, 0)
        m = ctx.noise[self][which][r:r + h.shape[3], c:c + h.shape[4]].to(h.dtype)
        scale = self.per_channel_scale1 if which == 0 else self.per_channel_scale2
        return h + (m[None] * scale)[None, :, None]

    def forward(self, x: torch.Tensor, state: State = None, ctx: Optional[DecodeContext] = None) -> torch.Tensor:
        ada = ctx.ada.get(self) if ctx is not None else None
        if hasattr(self, "scale_shift_table") and ada is None:
            raise RuntimeError("a timestep-conditioned LTX block run without its timestep (use LTXVAE.decode)")
        h = pixel_norm(x)
        if ada is not None:
            h = h * (1 + ada[:, 1]) + ada[:, 0]
        h = self.conv1(F.silu(h), state)
        if hasattr(self, "per_channel_scale1"):
            h = self._noise(h, ctx, 0, state)
        h = pixel_norm(h)
        if ada is not None:
            h = h * (1 + ada[:, 3]) + ada[:, 2]
        h = self.conv2(F.silu(h), state)
        if hasattr(self, "per_channel_scale2"):
            h = self._noise(h, ctx, 1, state)
        s = x
        if hasattr(self, "conv_shortcut"):  # (a conv cannot take zero frames: a lagging stream may bring none)
            s = self.conv_shortcut(self.norm3(x)) if x.shape[2] else h[:, :, :0]
        return h + (s if state is None else _queue(state, (self, "shortcut"), s, h.shape[2]))


class TimestepEmbedder(nn.Module):
    """The decode timestep → ``[B, dim]``: 256 sinusoids (cos first, max period 10000), linear, SiLU, linear
    (``timestep_embedder.linear_1/2``; PixArt-α's combined embedding without size conditions)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = nn.Module()
        self.timestep_embedder.linear_1 = nn.Linear(256, dim)
        self.timestep_embedder.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        proj = torch.cat([torch.cos(args), torch.sin(args)], -1).to(dtype)
        e = self.timestep_embedder
        return e.linear_2(F.silu(e.linear_1(proj)))


class ResGroup(nn.Module):
    """A run of residual blocks of one width (``res_blocks``), timestep-conditioned through one shared
    ``time_embedder`` (to ``4·C``) where ``conditioned``."""

    def __init__(self, dim: int, layers: int, causal: bool, padding: str, noise: bool = False,
                 conditioned: bool = False) -> None:
        super().__init__()
        self.res_blocks = nn.ModuleList(ResBlock(dim, dim, causal, padding, noise, conditioned)
                                        for _ in range(layers))
        if conditioned:
            self.time_embedder = TimestepEmbedder(4 * dim)


def _pack(t: torch.Tensor, stride: tuple[int, int, int]) -> torch.Tensor:
    """``[B, C, st·T, sh·H, sw·W]`` → ``[B, C·st·sh·sw, T, H, W]`` (channel order: channel, then the time, row
    and column offsets: the reference's)."""
    b, c, t_, h, w = t.shape
    st, sh, sw = stride
    t = t.reshape(b, c, t_ // st, st, h // sh, sh, w // sw, sw).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return t.reshape(b, c * st * sh * sw, t_ // st, h // sh, w // sw)


def _unpack(t: torch.Tensor, stride: tuple[int, int, int]) -> torch.Tensor:
    """The inverse of :func:`_pack`: ``[B, C·st·sh·sw, T, H, W]`` → ``[B, C, st·T, sh·H, sw·W]``."""
    b, pc, t_, h, w = t.shape
    st, sh, sw = stride
    c = pc // (st * sh * sw)
    t = t.reshape(b, c, st, sh, sw, t_, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return t.reshape(b, c, t_ * st, h * sh, w * sw)


class SpaceToDepth(nn.Module):
    """LTX 0.9.5+'s encoder downsampler by ``stride`` (time, rows, cols): the clip's first frame doubled in front
    (``st = 2``), a causal conv packed into channels, plus the input packed and averaged over channel groups. Streams
    whole ``st``-frame groups (an odd frame waits for its partner)."""

    def __init__(self, cin: int, cout: int, stride: tuple[int, int, int], causal: bool = True,
                 padding: str = "zeros") -> None:
        super().__init__()
        self.stride = stride
        self.group = cin * math.prod(stride) // cout
        self.conv = TimeConv(cin, cout // math.prod(stride), causal=causal, padding_mode=padding)

    def _run(self, x: torch.Tensor, state: State) -> torch.Tensor:
        packed = _pack(x, self.stride)
        b, c, t, h, w = packed.shape
        residual = packed.reshape(b, c // self.group, self.group, t, h, w).mean(2)
        return _pack(self.conv(x, state), self.stride) + residual

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        st = self.stride[0]
        if state is None:
            return self._run(torch.cat([x[:, :, :st - 1], x], 2), None)
        if (self, "started") not in state.cache and x.shape[2]:
            x = torch.cat([x[:, :, :st - 1], x], 2)
            state.cache[(self, "started")] = _MARK
        rest = state.cache.pop((self, "rest"), None)
        if rest is not None:
            x = torch.cat([rest, x], 2)
        n = x.shape[2] // st * st
        if n < x.shape[2]:
            if state.final:
                raise RuntimeError(f"{x.shape[2]} frames left at the clip's end of a time-halving downsampler")
            state.cache[(self, "rest")] = x[:, :, n:].clone()
        return self._run(x[:, :, :n], state)


class DepthToSpace(nn.Module):
    """The decoder's upsampler by ``stride``: a conv unpacked from channels (``st = 2``: the clip's first frame
    dropped), plus (``residual``) the input unpacked and its channels tiled. The conv may lag: the shortcut's frames
    wait in a queue."""

    def __init__(self, cin: int, stride: tuple[int, int, int], residual: bool, reduction: int, causal: bool,
                 padding: str) -> None:
        super().__init__()
        self.stride, self.residual = stride, residual
        self.repeats = math.prod(stride) // reduction
        self.conv = TimeConv(cin, math.prod(stride) * cin // reduction, causal=causal, padding_mode=padding)

    def _drop(self, t: torch.Tensor, state: State, name: str) -> torch.Tensor:
        st = self.stride[0]
        if state is None:
            return t[:, :, st - 1:]
        if (self, name) in state.cache or not t.shape[2]:
            return t
        state.cache[(self, name)] = _MARK
        return t[:, :, st - 1:]

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        h = self._drop(_unpack(self.conv(x, state), self.stride), state, "dropped")
        if not self.residual:
            return h
        r = self._drop(_unpack(x, self.stride).repeat(1, self.repeats, 1, 1, 1), state, "dropped-shortcut")
        return h + (r if state is None else _queue(state, (self, "shortcut"), r, h.shape[2]))
