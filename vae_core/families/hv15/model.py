"""The HunyuanVideo 1.5 VAE on videos and images, host-free.

Parameter names and shapes are the original layout (Tencent's ``hunyuanvideo15`` VAE files, as ComfyUI ships them):
``encoder.conv_in.conv``, ``encoder.down.<i>.block.<j>`` (``norm1.gamma``, ``conv1.conv``, ``norm2.gamma``,
``conv2.conv``, ``nin_shortcut``), ``encoder.down.<i>.downsample.conv.conv``, ``encoder.mid.{block_1, attn_1,
block_2}``, ``encoder.norm_out.gamma``, ``encoder.conv_out.conv`` and the decoder likewise with ``up.<i>.block`` /
``up.<i>.upsample``. Five levels (128, 256, 512, 1024, 1024 channels), ×2 down in space at the first four (16×),
also in time at the third and fourth (4×); 32 latent channels.

Shapes: videos ``[B, 3, F, H, W]`` in [-1, 1] with ``F = 1 + 4k`` and ``H, W`` multiples of 16; raw latents
``[B, 32, 1 + k, H/16, W/16]`` (the posterior mean, before the pipeline's scaling factor); decoded videos are not
clamped (the reference does not clamp). 4-D tensors are the image case: one frame.

The reference (diffusers ``AutoencoderKLHunyuanVideo15`` with tiling off) runs the whole clip in one pass; every
layer is causal in time (replicate-padded causal convs, a frame-causal attention mask), so running it chunk by chunk
with a causal state gives the same result: encode frame 0, then chunks of 4 frames; decode one latent frame at a
time. That is what :meth:`HV15VAE.encode`/:meth:`decode` do (memory bounded by the chunk), and what tiling follows
(:mod:`vae_core.tiling.stream` for videos, :mod:`vae_core.tiling.halo` for images) over the stages listed here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import RMSNorm
from ...errors import VaeInputError
from ..streamed import CausalVideoNet
from ...tiling.halo import Local
from ...tiling.stream import CausalState
from .blocks import AttnBlock, CausalConv3d, Downsample, ResnetBlock, Upsample

__all__ = ["HV15Config", "HV15VAE", "SHORTCUT_SCALES"]

#: the fp16 fix's two factors (see :mod:`vae_core.families.hv15.fp16_fix`)
SHORTCUT_SCALES = ("encoder_shortcut_scale", "decoder_shortcut_scale")


@dataclass(frozen=True)
class HV15Config:
    """Shape of a HunyuanVideo 1.5-design VAE: level widths, residual blocks per level (decoder: one more), latent
    channels, and how many levels halve the resolution (``spatial_levels``, the first ones) and, of those, the frame
    count too (``temporal_levels``, the last of them)."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 1024, 1024)
    num_res_blocks: int = 2
    z_dim: int = 32
    in_channels: int = 3
    out_channels: int = 3
    spatial_levels: int = 4
    temporal_levels: int = 2

    @property
    def downscale(self) -> int:
        return 2 ** self.spatial_levels

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

    def down_flags(self, level: int) -> tuple[bool, bool]:
        """Encoder level ``level``: (halves space, halves time)."""
        space = level < self.spatial_levels
        return space, space and level >= self.spatial_levels - self.temporal_levels

    def up_flags(self, level: int) -> tuple[bool, bool]:
        """Decoder level ``level``: (doubles space, doubles time)."""
        return level < self.spatial_levels, level < self.temporal_levels


def _run(blocks: nn.Module, x: torch.Tensor, state: Optional[CausalState]) -> torch.Tensor:
    for m in blocks:
        x = m(x, state)
    return x


def _mid(dim: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(dim, dim), AttnBlock(dim), ResnetBlock(dim, dim)
    return mid


class HV15VAE(CausalVideoNet, nn.Module):
    """The HunyuanVideo 1.5-design VAE (see the module docstring)."""

    def __init__(self, cfg: HV15Config) -> None:
        super().__init__()
        self.config = cfg
        ch, n = list(cfg.block_out_channels), cfg.num_res_blocks
        if ch[-1] % (2 * cfg.z_dim) or ch[-1] % cfg.z_dim:
            raise VaeInputError(f"HunyuanVideo 1.5 widths {ch} with {cfg.z_dim} latent channels; expected a last width "
                                "that is a multiple of twice the latent channels")
        enc = nn.Module()
        enc.conv_in = CausalConv3d(cfg.in_channels, ch[0])
        enc.down = nn.ModuleList()
        cin = ch[0]
        for i, cout in enumerate(ch):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(n):
                level.block.append(ResnetBlock(cin, cout))
                cin = cout
            space, time = cfg.down_flags(i)
            if space:
                level.downsample = Downsample(cin, ch[i + 1], time)
                cin = ch[i + 1]
            enc.down.append(level)
        enc.mid = _mid(cin)
        enc.norm_out = RMSNorm(cin)
        enc.conv_out = CausalConv3d(cin, 2 * cfg.z_dim)
        self.encoder = enc
        dch = list(reversed(ch))
        dec = nn.Module()
        dec.conv_in = CausalConv3d(cfg.z_dim, dch[0])
        dec.mid = _mid(dch[0])
        dec.up = nn.ModuleList()
        cin = dch[0]
        for i, cout in enumerate(dch):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(n + 1):
                level.block.append(ResnetBlock(cin, cout))
                cin = cout
            space, time = cfg.up_flags(i)
            if space or time:
                level.upsample = Upsample(cin, dch[i + 1], time)
                cin = dch[i + 1]
            dec.up.append(level)
        dec.norm_out = RMSNorm(cin)
        dec.conv_out = CausalConv3d(cin, cfg.out_channels)
        self.decoder = dec
        # the fp16 fix's factors on the two shortcuts that leave or enter a rescaled stream (1: the weights as
        # released): buffers, so a host module's copy carries them, kept float32 by _apply (2^16 overflows fp16);
        # not in files
        for name in SHORTCUT_SCALES:
            self.register_buffer(name, torch.ones((), dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """As ``nn.Module._apply`` (``.to``, ``.half``...), but the shortcut factors stay float32 (their device
        follows)."""
        keep = {n: self._buffers[n] for n in SHORTCUT_SCALES}
        out = super()._apply(fn, recurse)
        for n, old in keep.items():
            if old is not None and self._buffers[n] is not None:
                self._buffers[n] = old.to(self._buffers[n].device, torch.float32)
        return out

    # -- the pieces of one chunk: local at high resolution, whole frames at latent resolution ------------------
    def _enc_levels(self, upto: bool) -> list[nn.Module]:
        """The encoder's blocks before (``upto``) or after its last downsampler, in order."""
        out: list[nn.Module] = []
        last = self.config.spatial_levels - 1
        for i, level in enumerate(self.encoder.down):
            if (i <= last) == upto:
                out += list(level.block) + ([level.downsample] if hasattr(level, "downsample") else [])
        return out

    def _enc_local(self, x: torch.Tensor, state: Optional[CausalState]) -> torch.Tensor:
        return _run(self._enc_levels(True), self.encoder.conv_in(x, state), state)

    def _enc_moments(self, h: torch.Tensor, state: Optional[CausalState]) -> torch.Tensor:
        """Latent-resolution levels, mid block and head → the posterior's mean and log-variance ``[B, 2z, t, h, w]``."""
        e, z = self.encoder, self.config.z_dim
        h = _run(self._enc_levels(False), h, state)
        h = _run((e.mid.block_1, e.mid.attn_1, e.mid.block_2), h, state)
        b, c, t, hh, ww = h.shape
        shortcut = h.view(b, 2 * z, c // (2 * z), t, hh, ww).mean(dim=2) * self.encoder_shortcut_scale
        return e.conv_out(F.silu(e.norm_out(h)), state) + shortcut

    def _dec_whole(self, z: torch.Tensor, state: Optional[CausalState]) -> torch.Tensor:
        """Input conv (plus the latent repeated over its channels), mid block and the latent-resolution blocks."""
        d = self.decoder
        repeated = z.repeat_interleave(d.conv_in.conv.out_channels // z.shape[1], dim=1)
        h = d.conv_in(z, state) + repeated * self.decoder_shortcut_scale
        h = _run((d.mid.block_1, d.mid.attn_1, d.mid.block_2), h, state)
        return _run(d.up[0].block, h, state)

    def _head(self, h: torch.Tensor, state: Optional[CausalState]) -> torch.Tensor:
        d = self.decoder
        return d.conv_out(F.silu(d.norm_out(h)), state)

    # -- reference calls ---------------------------------------------------------------------------------------
    def check_video(self, t: torch.Tensor, kind: str) -> None:
        """Refuse a video the schedule cannot run: frame count ``1 + ft·k`` for encode."""
        ft = self.config.temporal_scale
        if kind == "encode" and (t.shape[2] - 1) % ft:
            raise VaeInputError(f"encode input: {t.shape[2]} frames; expected 1 + {ft}k frames "
                                f"(1, {1 + ft}, {1 + 2 * ft}, ...)")

    # -- exact tiling ------------------------------------------------------------------------------------------
    @staticmethod
    def _locals(blocks: list[nn.Module]) -> list[Local]:
        out = []
        for m in blocks:
            if isinstance(m, ResnetBlock):
                out.append(Local(m, radius=2))
            elif isinstance(m, Downsample):  # a 3×3 conv, then 2×2 blocks packed into channels
                out.append(Local(m, radius=1, down=2, blocks=True))
            else:  # Upsample: a 3×3 conv, then channels unpacked into 2×2 blocks
                out.append(Local(m, radius=1, up=2))
        return out

    def encode_chain(self) -> list[Local]:
        """The encoder down to latent resolution, as local stages ``fn(x, state)``."""
        return [Local(self.encoder.conv_in, radius=1), *self._locals(self._enc_levels(True))]

    def decode_chain(self) -> list[Local]:
        """The decoder from its first upsampler on, as local stages ``fn(x, state)``."""
        blocks: list[nn.Module] = [self.decoder.up[0].upsample] if hasattr(self.decoder.up[0], "upsample") else []
        for level in list(self.decoder.up)[1:]:
            blocks += list(level.block) + ([level.upsample] if hasattr(level, "upsample") else [])
        return [*self._locals(blocks), Local(self._head, radius=1)]
