"""The HunyuanVideo 1.0 VAE on videos and images, host-free.

Parameter names and shapes are ComfyUI's (``hunyuan_video_vae_bf16.safetensors``; its ``AutoencoderKL`` built with
``conv3d=True``): the SD VAE's names with every 3-D conv under ``.conv`` — ``encoder.conv_in.conv``,
``encoder.down.<i>.block.<j>`` (``norm1``, ``conv1.conv``, ``norm2``, ``conv2.conv``, ``nin_shortcut.conv``),
``encoder.down.<i>.downsample.conv.conv``, ``encoder.mid.{block_1, attn_1, block_2}`` (attention ``norm``, ``q``,
``k``, ``v``, ``proj_out`` as 1×1×1 convs), ``encoder.norm_out``, ``encoder.conv_out.conv``, ``quant_conv``,
``post_quant_conv`` and the decoder likewise with ``up.<i>.block`` / ``up.<i>.upsample`` (``up.0`` is the
full-resolution level). Four levels (128, 256, 512, 512), ×2 in space at the first three, also in time at the
second and third (4×); 16 latent channels; GroupNorm(32) everywhere.

Every conv is causal in time with replicate padding (2 frames before, none after; 1 pixel each side in space), and
the temporal upsampler keeps frame 0 single. But the GroupNorms normalise over ``T×H×W`` and the mid block's
attention runs over every latent pixel of the clip, so — unlike Wan and HunyuanVideo 1.5 — the result of a frame
depends on the whole clip: the reference (diffusers ``AutoencoderKLHunyuanVideo`` with framewise and spatial tiling
off, Tencent's release, ComfyUI v0.3.64) runs the clip in one pass, and so do :meth:`HV10VAE.encode`/``decode``.
The attention is frame-causal in diffusers and Tencent's code (a query sees its frame and the ones before) and
unmasked in ComfyUI: ``config.causal_attention`` says which. Exact tiling runs the network op by op over the clip
(:func:`program`, :mod:`vae_core.tiling.clip`).

Shapes: videos ``[B, 3, F, H, W]`` in [-1, 1] with ``F = 1 + 4k`` and ``H, W`` multiples of 8; raw latents
``[B, 16, 1 + k, H/8, W/8]`` (the posterior mean, before the scaling factor 0.476986); decoded videos are not
clamped. 4-D tensors are the image case: one frame.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import VaeInputError
from ...tiling.clip import Axis, AttnOp, Carries, ConvOp, Program
from ..layers import frame_attention

__all__ = ["HV10Config", "HV10VAE", "decode_chunks", "encode_chunks", "program"]


@dataclass(frozen=True)
class HV10Config:
    """Shape of a HunyuanVideo 1.0-design VAE: level widths, residual blocks per level (decoder: one more), latent
    channels, how many of the downsampling levels (the last ones) halve the frame count too, the GroupNorm groups,
    whether the mid-block attention is frame-causal (diffusers, Tencent) or not (ComfyUI), and whether the network
    runs in chunks (``chunked``: newer ComfyUI's schedule, see :func:`decode_chunks`) instead of the whole clip."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    num_res_blocks: int = 2
    z_dim: int = 16
    in_channels: int = 3
    out_channels: int = 3
    temporal_levels: int = 2
    norm_groups: int = 32
    causal_attention: bool = True
    chunked: bool = False

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downscale(self) -> int:
        return 2 ** (self.levels - 1)

    @property
    def temporal_scale(self) -> int:
        return 2 ** self.temporal_levels

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    @property
    def encoder_widths(self) -> list[int]:  # for the image memory estimate (tile="auto", the OOM fallback)
        return list(self.block_out_channels)

    decoder_widths = encoder_widths

    def halves_time(self, level: int) -> bool:
        """Whether encoder level ``level``'s downsampler (0: full resolution; the last level has none) halves time
        too: the last ``temporal_levels`` of them do."""
        return self.levels - 1 - self.temporal_levels <= level < self.levels - 1

    def doubles_time(self, level: int) -> bool:
        """Whether decoder level ``level``'s upsampler (level 0 has none) doubles time too: the first
        ``temporal_levels`` above full resolution do. Not a mirror of :meth:`halves_time`: the encoder halves time
        at its low-resolution levels, the decoder doubles it at its high-resolution ones (as released)."""
        return 1 <= level <= self.temporal_levels


def decode_chunks(latent_frames: int) -> list[tuple[int, int]]:
    """Latent frame ranges of the chunked decoder: 2 latent frames each (newer ComfyUI, #10995: ``conv_in`` and the
    mid block run over the whole latent clip, then each chunk's up path, GroupNorms over the chunk only)."""
    return [(i, min(i + 2, latent_frames)) for i in range(0, latent_frames, 2)]


def encode_chunks(frames: int, temporal_scale: int) -> list[tuple[int, int]]:
    """Frame ranges of the chunked encoder: frame 0 alone, then ``2·ft`` frames each (the down path per chunk,
    GroupNorms over the chunk only; then the mid block over the whole latent clip). ``frames = 1 + ft·k``."""
    step = 2 * temporal_scale
    return [(0, 1)] + [(i, min(i + step, frames)) for i in range(1, frames, step)]


class CausalConv3d(nn.Module):
    """A 3-D conv (``.conv``, no padding of its own) on a replicate-padded input: ``k − 1`` frames before (none
    after), ``k // 2`` pixels on each side; ``stride`` (time, rows, cols). With a :class:`~vae_core.tiling.clip.Carries` (keyed by conv) from an earlier
    chunk, its frames replace the replicated ones (and this call's last input frames go to the next chunk)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: tuple[int, int, int] = (1, 1, 1)) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, k, stride=stride)

    def pads(self) -> tuple[int, int, int, int, int, int]:
        p = self.conv.kernel_size[1] // 2
        return (p, p, p, p, self.conv.kernel_size[0] - 1, 0)

    def forward(self, x: torch.Tensor, carry: Optional[Carries] = None) -> torch.Tensor:
        k = self.conv.kernel_size[0]
        if k == 1:
            return self.conv(x)
        prev = None if carry is None else carry.prev.get(self)
        if prev is None:
            x = F.pad(x, self.pads(), mode="replicate")
        else:  # the previous chunk's last input frames instead of the replicated first one
            x = torch.cat([prev, F.pad(x, self.pads()[:4] + (0, 0), mode="replicate")], dim=2)
        if carry is not None:
            carry.next[self] = x[:, :, x.shape[2] - (k - 1):]
        return self.conv(x)

    def axes(self, up: tuple[int, int] = (1, 1), first: bool = False) -> tuple[Axis, Axis, Axis]:
        """The conv's (time, rows, cols) maps for :mod:`vae_core.tiling.clip` (``up``: nearest upsampling before it
        in time and in space; ``first``: frame 0 not repeated)."""
        k, s, p = self.conv.kernel_size, self.conv.stride, self.pads()
        return (Axis(k[0], s[0], p[4], 0, up[0], first), Axis(k[1], s[1], p[2], p[3], up[1]),
                Axis(k[2], s[2], p[0], p[1], up[1]))


def _norm(cfg: HV10Config, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm1 → SiLU → conv1 → norm2 → SiLU → conv2, plus a 1×1×1 ``nin_shortcut`` when channels change."""

    def __init__(self, cfg: HV10Config, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cfg, cin), CausalConv3d(cin, cout)
        self.norm2, self.conv2 = _norm(cfg, cout), CausalConv3d(cout, cout)
        self.nin_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, carry: Optional[Carries] = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), carry)
        h = self.conv2(F.silu(self.norm2(h)), carry)
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head attention over every pixel of every frame (1×1×1-conv ``q``/``k``/``v``/``proj_out``); with
    ``causal`` a pixel attends to its frame and the frames before it only."""

    def __init__(self, cfg: HV10Config, channels: int) -> None:
        super().__init__()
        self.causal = cfg.causal_attention
        self.norm = _norm(cfg, channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv3d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        hn = self.norm(x)
        tokens = lambda u: u.reshape(b, c, t * h * w).transpose(1, 2).contiguous()  # noqa: E731
        out = frame_attention(tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn)), t, self.causal)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, t, h, w))


class Downsample(nn.Module):
    """A stride-2 causal conv (rows and cols; frames too with ``time``)."""

    def __init__(self, channels: int, time: bool) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=(2 if time else 1, 2, 2))

    def forward(self, x: torch.Tensor, carry: Optional[Carries] = None) -> torch.Tensor:
        return self.conv(x, carry)


class Upsample(nn.Module):
    """Nearest ×2 in space (and in time with ``time``: frame 0 stays one frame, ``T → 1 + 2(T − 1)``), then a
    causal conv. A later chunk (``carry`` not first) doubles every frame."""

    def __init__(self, channels: int, time: bool) -> None:
        super().__init__()
        self.time = time
        self.conv = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor, carry: Optional[Carries] = None) -> torch.Tensor:
        t = 2 if self.time else 1
        if carry is not None and not carry.first:
            return self.conv(F.interpolate(x, scale_factor=(t, 2, 2), mode="nearest"), carry)
        first = F.interpolate(x[:, :, :1], scale_factor=(1, 2, 2), mode="nearest")
        if x.shape[2] > 1:
            rest = F.interpolate(x[:, :, 1:], scale_factor=(t, 2, 2), mode="nearest")
            first = torch.cat((first, rest), dim=2)
        return self.conv(first, carry)


def _mid(cfg: HV10Config, dim: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(cfg, dim, dim), AttnBlock(cfg, dim), ResnetBlock(cfg, dim, dim)
    return mid


class HV10VAE(nn.Module):
    """The HunyuanVideo 1.0-design VAE (see the module docstring)."""

    def __init__(self, cfg: HV10Config) -> None:
        super().__init__()
        self.config = cfg
        ch, n, z = list(cfg.block_out_channels), cfg.num_res_blocks, cfg.z_dim
        if any(c % cfg.norm_groups for c in ch):
            raise VaeInputError(f"HunyuanVideo 1.0 widths {ch} with GroupNorm({cfg.norm_groups}); expected widths "
                                f"that are multiples of {cfg.norm_groups}")
        enc = nn.Module()
        enc.conv_in = CausalConv3d(cfg.in_channels, ch[0])
        enc.down = nn.ModuleList()
        cin = ch[0]
        for i, cout in enumerate(ch):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(n):
                level.block.append(ResnetBlock(cfg, cin, cout))
                cin = cout
            if i < cfg.levels - 1:
                level.downsample = Downsample(cin, cfg.halves_time(i))
            enc.down.append(level)
        enc.mid = _mid(cfg, cin)
        enc.norm_out = _norm(cfg, cin)
        enc.conv_out = CausalConv3d(cin, 2 * z)
        self.encoder = enc
        self.quant_conv = nn.Conv3d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv3d(z, z, 1)
        dec = nn.Module()
        cin = ch[-1]
        dec.conv_in = CausalConv3d(z, cin)
        dec.mid = _mid(cfg, cin)
        ups: list[nn.Module] = []
        for i in reversed(range(cfg.levels)):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(n + 1):
                level.block.append(ResnetBlock(cfg, cin, ch[i]))
                cin = ch[i]
            if i > 0:
                level.upsample = Upsample(cin, cfg.doubles_time(i))
            ups.insert(0, level)
        dec.up = nn.ModuleList(ups)
        dec.norm_out = _norm(cfg, cin)
        dec.conv_out = CausalConv3d(cin, cfg.out_channels)
        self.decoder = dec

    # -- reference calls ---------------------------------------------------------------------------------------
    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Videos ``[B, 3, 1 + 4k, H, W]`` → the posterior's raw mean and log-variance ``[B, 2z, 1 + k, H/8, W/8]``
        (images ``[B, 3, H, W]`` → ``[B, 2z, H/8, W/8]``), the whole clip in one pass (``config.chunked``: the down
        path per :func:`encode_chunks` chunk, then the rest over the whole latent clip)."""
        if x.dim() == 4:
            return self.encode_moments(x.unsqueeze(2)).squeeze(2)
        e = self.encoder

        def down(h: torch.Tensor, carry: Optional[Carries] = None) -> torch.Tensor:
            h = e.conv_in(h, carry)
            for level in e.down:
                for block in level.block:
                    h = block(h, carry)
                if hasattr(level, "downsample"):
                    h = level.downsample(h, carry)
            return h

        if self.config.chunked:
            carry, parts = Carries(), []
            for f0, f1 in encode_chunks(x.shape[2], self.config.temporal_scale):
                parts.append(down(x[:, :, f0:f1], carry))
                carry.advance()
            h = torch.cat(parts, dim=2)
        else:
            h = down(x)
        h = e.mid.block_2(e.mid.attn_1(e.mid.block_1(h)))
        return self.quant_conv(e.conv_out(F.silu(e.norm_out(h))))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`encode_moments`' mean ``[B, z, ...]``."""
        return self.encode_moments(x)[:, : self.config.z_dim]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents ``[B, z, T, h, w]`` → videos ``[B, 3, 1 + 4(T − 1), 8h, 8w]`` (``[B, z, h, w]`` → images
        ``[B, 3, 8h, 8w]``), the whole clip in one pass (``config.chunked``: ``conv_in`` and the mid block over the
        whole clip, the rest per :func:`decode_chunks` chunk)."""
        if z.dim() == 4:
            return self.decode(z.unsqueeze(2)).squeeze(2)
        d = self.decoder
        h = d.conv_in(self.post_quant_conv(z))
        h = d.mid.block_2(d.mid.attn_1(d.mid.block_1(h)))

        def up(h: torch.Tensor, carry: Optional[Carries] = None) -> torch.Tensor:
            for level in reversed(d.up):
                for block in level.block:
                    h = block(h, carry)
                if hasattr(level, "upsample"):
                    h = level.upsample(h, carry)
            return d.conv_out(F.silu(d.norm_out(h)), carry)

        if not self.config.chunked:
            return up(h)
        carry, parts = Carries(), []
        for t0, t1 in decode_chunks(h.shape[2]):
            parts.append(up(h[:, :, t0:t1], carry))
            carry.advance()
        return torch.cat(parts, dim=2)

    def check_video(self, t: torch.Tensor, kind: str) -> None:
        """Refuse a video the design cannot encode: a frame count other than ``1 + 4k``."""
        ft = self.config.temporal_scale
        if kind == "encode" and (t.shape[2] - 1) % ft:
            raise VaeInputError(f"encode input: {t.shape[2]} frames; expected 1 + {ft}k frames "
                                f"(1, {1 + ft}, {1 + 2 * ft}, ...)")


def _pointwise(conv: nn.Conv3d) -> tuple[Axis, Axis, Axis]:
    return (Axis(), Axis(), Axis())


class _Builder:
    """Lists a network's ops over fresh register names."""

    def __init__(self, first: str) -> None:
        self.ops: list = []
        self.cur, self._n = first, 0

    def fresh(self) -> str:
        self._n += 1
        return f"r{self._n}"

    def conv(self, conv: CausalConv3d, norm: Optional[nn.GroupNorm] = None, up: tuple[int, int] = (1, 1),
             first: bool = False, post=None) -> None:  # type: ignore[no-untyped-def]
        dst = self.fresh()
        self.ops.append(ConvOp(self.cur, dst, conv.conv, conv.axes(up, first), norm, post=post))
        self.cur = dst

    def plain(self, conv: nn.Conv3d) -> None:
        dst = self.fresh()
        self.ops.append(ConvOp(self.cur, dst, conv, _pointwise(conv)))
        self.cur = dst

    def block(self, b: ResnetBlock) -> None:
        x, mid, out = self.cur, self.fresh(), self.fresh()
        side = None if b.nin_shortcut is None else (self.fresh(), b.nin_shortcut.conv)
        self.ops.append(ConvOp(x, mid, b.conv1.conv, b.conv1.axes(), b.norm1, side=side))
        self.ops.append(ConvOp(mid, out, b.conv2.conv, b.conv2.axes(), b.norm2, res=x if side is None else side[0]))
        self.cur = out

    def mid(self, m: nn.Module) -> None:
        self.block(m.block_1)
        dst = self.fresh()
        self.ops.append(AttnOp(self.cur, dst, m.attn_1, m.attn_1.causal, frame_attention))
        self.cur = dst
        self.block(m.block_2)


def program(model: HV10VAE, kind: str, moments: bool = False, part: str = "all", first: bool = True) -> Program:
    """The ops of ``kind`` (``"encode"``: video → raw mean, or with ``moments`` mean and log-variance; ``"decode"``)
    over registers, for :func:`vae_core.tiling.clip.run_program` (input register ``"x"``). ``part`` picks a piece of
    the chunked schedule: decode ``"head"`` (to the mid block's output, whole clip) and ``"chunk"`` (the rest, one
    chunk; ``first``: the first chunk, whose temporal upsamplers keep frame 0 single); encode ``"chunk"`` (the down
    path) and ``"tail"`` (the rest, whole clip); ``"all"`` the whole network."""
    b = _Builder("x")
    head, tail = part in ("all", "head"), part in ("all", "chunk" if kind == "decode" else "tail")
    if kind == "decode":
        d = model.decoder
        if head:
            b.plain(model.post_quant_conv)
            b.conv(d.conv_in)
            b.mid(d.mid)
        if tail:
            for i in reversed(range(len(d.up))):
                level = d.up[i]
                for block in level.block:
                    b.block(block)
                if hasattr(level, "upsample"):
                    t = level.upsample.time
                    b.conv(level.upsample.conv, up=(2 if t else 1, 2), first=t and first)
            b.conv(d.conv_out, norm=d.norm_out)
        return Program(b.ops)
    e, z = model.encoder, model.config.z_dim
    if part in ("all", "chunk"):
        b.conv(e.conv_in)
        for level in e.down:
            for block in level.block:
                b.block(block)
            if hasattr(level, "downsample"):
                b.conv(level.downsample.conv)
    if tail:
        b.mid(e.mid)
        quant = model.quant_conv
        b.conv(e.conv_out, norm=e.norm_out, post=quant if moments else (lambda y: quant(y)[:, :z]))
    return Program(b.ops)
