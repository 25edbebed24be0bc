"""The Wan VAE design on videos and images, host-free: Wan 2.1 (and Qwen-Image's VAE, its image case) and Wan 2.2.

Parameter names and shapes are the original Wan layout (what ComfyUI's ``wan_2.1_vae.safetensors``,
``wan2.2_vae.safetensors`` and ``qwen_image_vae.safetensors`` hold): ``encoder.conv1``, ``encoder.downsamples``,
``encoder.middle.{0,1,2}`` (residual, attention, residual), ``encoder.head.{0,2}``, ``conv1``/``conv2`` (the quant
convs) and the decoder likewise with ``decoder.upsamples``. Wan 2.1 lists its levels' blocks flat; Wan 2.2
(``residual=True``) nests them per level (``downsamples.<i>.downsamples.<j>``) with parameter-free shortcuts and
2×2-patchified pixels (12 channels in and out), so its latents are 16× smaller in space. Both are 4× in time.

Shapes: videos ``[B, 3, F, H, W]`` in [-1, 1] with ``F = 1 + 4k`` and ``H, W`` multiples of ``downscale`` (8, Wan
2.2: 16); raw latents ``[B, z, 1 + k, H/f, W/f]`` (the posterior mean, before the pipeline's per-channel
``latents_mean``/``latents_std``); decoded videos clamped to [-1, 1] as the reference does. 4-D tensors are the image
case: one frame, ``[B, 3, H, W]`` ↔ ``[B, z, H/f, W/f]``.

The reference schedule (the model's own, diffusers' ``AutoencoderKLWan`` with tiling off) is run as is: encode frame
0, then chunks of 4 frames; decode one latent frame at a time; one causal state carried through. Tiling follows
:mod:`vae_core.tiling.stream` (videos) and :mod:`vae_core.tiling.halo` (images) over the stages listed here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import VaeInputError
from ..streamed import CausalVideoNet
from ...tiling.halo import Local
from ...tiling.stream import CausalState, is_first
from .blocks import (AttentionBlock, CausalConv3d, DownBlock, RMSNorm, Resample, ResidualBlock, UpBlock, patchify,
                     unpatchify)

__all__ = ["WanConfig", "WanVAE"]

#: frames per encode chunk after the first (the reference's, for every Wan VAE)
CHUNK = 4


@dataclass(frozen=True)
class WanConfig:
    """Shape of a Wan-design VAE. Wan 2.1 / Qwen-Image: base_dim 96, z_dim 16; Wan 2.2: base_dim 160,
    decoder_base_dim 256, z_dim 48, ``residual=True``, ``patch=2``. All: dim_mult (1, 2, 4, 4), 2 res blocks,
    temporal_down (False, True, True)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3
    #: which encoder levels also downsample in time (carry a ``time_conv``); Wan: (False, True, True)
    temporal_down: tuple[bool, ...] = (False, True, True)
    decoder_base_dim: Optional[int] = None
    residual: bool = False  # Wan 2.2's levels with AvgDown3D/DupUp3D shortcuts
    patch: int = 1  # Wan 2.2: 2×2 patchify before the encoder, unpatchify after the decoder

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * self.patch

    @property
    def temporal_scale(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_down)

    @property
    def version(self) -> str:
        return "2.2" if self.residual else "2.1"

    @property
    def encoder_widths(self) -> list[int]:  # for the memory estimate
        return [self.base_dim * m for m in self.dim_mult]

    @property
    def decoder_widths(self) -> list[int]:
        return [(self.decoder_base_dim or self.base_dim) * m for m in self.dim_mult]


def _head(dim: int, cout: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, cout, 3, padding=1))


def _run(seq: nn.Module, x: torch.Tensor, state: Optional[CausalState]) -> torch.Tensor:
    for m in seq:
        x = m(x, state)
    return x


class WanVAE(CausalVideoNet, nn.Module):
    """The Wan-design VAE (see the module docstring). ``temporal_down`` flags (default ``cfg.temporal_down``) say
    which encoder resamplers carry a ``time_conv``; the decoder's are the reverse."""

    def __init__(self, cfg: WanConfig, temporal_down: Optional[tuple[bool, ...]] = None) -> None:
        super().__init__()
        temporal_down = cfg.temporal_down if temporal_down is None else tuple(temporal_down)
        self.config = cfg
        p2, levels, n = cfg.patch ** 2, len(cfg.dim_mult), cfg.num_res_blocks
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        enc = nn.Module()
        enc.conv1 = CausalConv3d(cfg.in_channels * p2, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            last, temporal = i == levels - 1, i < len(temporal_down) and temporal_down[i]
            if cfg.residual:
                blocks.append(DownBlock(cin, cout, n, temporal and not last, not last))
                continue
            for _ in range(n):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if not last:
                blocks.append(Resample(cout, "down", temporal))
        enc.downsamples = nn.Sequential(*blocks)
        enc.middle = nn.Sequential(ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                   ResidualBlock(dims[-1], dims[-1]))
        enc.head = _head(dims[-1], 2 * cfg.z_dim)
        self.encoder = enc
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        base = cfg.decoder_base_dim or cfg.base_dim
        ddims = [base * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_up = tuple(reversed(temporal_down))
        dec = nn.Module()
        dec.conv1 = CausalConv3d(cfg.z_dim, ddims[0], 3, padding=1)
        dec.middle = nn.Sequential(ResidualBlock(ddims[0], ddims[0]), AttentionBlock(ddims[0]),
                                   ResidualBlock(ddims[0], ddims[0]))
        ups: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(ddims[:-1], ddims[1:])):
            last, temporal = i == levels - 1, i < len(temporal_up) and temporal_up[i]
            if cfg.residual:
                ups.append(UpBlock(cin, cout, n, temporal and not last, not last))
                continue
            if i > 0:
                cin //= 2  # the Wan 2.1 upsampler before halved the channels
            for _ in range(n + 1):
                ups.append(ResidualBlock(cin, cout))
                cin = cout
            if not last:
                ups.append(Resample(cout, "up", temporal))
        dec.upsamples = nn.Sequential(*ups)
        dec.head = _head(ddims[-1], cfg.out_channels * p2)
        self.decoder = dec
        # the diffusion model's per-channel latent statistics (pipeline constants, not in the original weights)
        self.register_buffer("latents_mean", torch.zeros(cfg.z_dim), persistent=False)
        self.register_buffer("latents_std", torch.ones(cfg.z_dim), persistent=False)

    # -- latent statistics -------------------------------------------------------------------------------------
    def _stat(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, *([1] * (z.dim() - 2))).to(z)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (4-D or 5-D) → the diffusion model's: ``(z - latents_mean) / latents_std`` per channel."""
        return (z - self._stat(self.latents_mean, z)) / self._stat(self.latents_std, z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self._stat(self.latents_std, z) + self._stat(self.latents_mean, z)

    # -- the pieces of one chunk: local at high resolution, whole frames at latent resolution ------------------
    # The blocks at latent resolution (the encoder's last level, the decoder's first) run with the mid block on
    # whole frames: cheap there, and their halos would otherwise widen every high-resolution window.
    def _enc_split(self) -> int:
        """Index of the first encoder block after the last stride-2 one (the blocks at latent resolution)."""
        blocks = list(self.encoder.downsamples)
        down = [i for i, m in enumerate(blocks) if (isinstance(m, Resample) and m.mode == "down")
                or (isinstance(m, DownBlock) and isinstance(m.downsamples[-1], Resample))]
        return down[-1] + 1 if down else 0

    def _dec_split(self) -> int:
        """Wan 2.1: index of the decoder's first upsampler; Wan 2.2: 0 (level 0 is split inside its block)."""
        if self.config.residual:
            return 0
        ups = [i for i, m in enumerate(self.decoder.upsamples) if isinstance(m, Resample)]
        return ups[0] if ups else len(self.decoder.upsamples)

    def _enc_local(self, x: torch.Tensor, state: Optional[CausalState]) -> torch.Tensor:
        e = self.encoder
        return _run(e.downsamples[:self._enc_split()], e.conv1(patchify(x, self.config.patch), state), state)

    def _enc_moments(self, h: torch.Tensor, state: Optional[CausalState]) -> torch.Tensor:
        e = self.encoder
        h = _run(e.middle, _run(e.downsamples[self._enc_split():], h, state), state)
        return self.conv1(e.head[2](F.silu(e.head[0](h)), state))

    def _dec_whole(self, z: torch.Tensor, state: Optional[CausalState]) -> torch.Tensor:
        """Up to the first upsampler. Wan 2.2: ``[level-0 residual output; level-0 input]`` stacked on channels
        (the input feeds the level's DupUp3D shortcut after the upsampler)."""
        d = self.decoder
        h = _run(d.middle, d.conv1(self.conv2(z), state), state)
        if not self.config.residual:
            return _run(d.upsamples[:self._dec_split()], h, state)
        first = d.upsamples[0]
        if first.avg_shortcut is None:
            return first(h, state)
        return torch.cat([_run(first.upsamples[:-1], h, state), h], 1)

    def _dec_first_up(self, t: torch.Tensor, state: Optional[CausalState]) -> torch.Tensor:
        """Wan 2.2: level 0's upsampler plus its shortcut, from :meth:`_dec_whole`'s stacked output."""
        first = self.decoder.upsamples[0]
        c = first.upsamples[-1].resample[1].in_channels
        return first.upsamples[-1](t[:, :c], state) + first.avg_shortcut(t[:, c:], is_first(state))

    def check_video(self, t: torch.Tensor, kind: str) -> None:
        """Refuse a video the schedule cannot run: frame count ``1 + 4k`` for encode, a 4× temporal design."""
        if self.config.temporal_scale != CHUNK:
            raise VaeInputError(f"{kind} of a video with a Wan-design VAE of temporal scale "
                                f"{self.config.temporal_scale}; expected 4 (temporal_down with two True levels)")
        if kind == "encode" and (t.shape[2] - 1) % CHUNK:
            raise VaeInputError(f"encode input: {t.shape[2]} frames; expected 1 + 4k frames (1, 5, 9, ..., 81)")

    # -- exact tiling --------------------------------------------------------------------------------------------
    @staticmethod
    def _split_up(m: UpBlock) -> list[Local]:
        """A Wan 2.2 decoder level as one stage per residual block: the level's input rides along beside the branch
        (a ``(branch, input)`` pair, cropped alike) to the last stage, which upsamples both and adds them."""
        blocks = list(m.upsamples)
        if m.avg_shortcut is None:
            return [Local(b, radius=2) for b in blocks]
        res, up = blocks[:-1], blocks[-1]
        out = [Local(lambda t, s, b=res[0]: (b(t, s), t), radius=2)]
        out += [Local(lambda p, s, b=b: (b(p[0], s), p[1]), radius=2) for b in res[1:]]
        out.append(Local(lambda p, s: up(p[0], s) + m.avg_shortcut(p[1], is_first(s)), radius=1, up=2))
        return out

    def _locals(self, seq: nn.Sequential, split: bool = False) -> list[Local]:
        """One :class:`Local` per block, with its spatial receptive radius in input pixels (``split``: Wan 2.2's
        decoder levels as one stage per residual block, for the streamed plans)."""
        out: list[Local] = []
        n = self.config.num_res_blocks
        for m in seq:
            if split and isinstance(m, UpBlock):
                out += self._split_up(m)
            elif isinstance(m, ResidualBlock):
                out.append(Local(m, radius=2))
            elif isinstance(m, Resample):  # down: pad right/bottom 1, 3×3 stride 2; up: nearest ×2, then 3×3
                out.append(Local(m, radius=1, down=2) if m.mode == "down" else Local(m, radius=1, up=2))
            elif isinstance(m, DownBlock):  # n residual blocks, then the stride-2 resampler (if any)
                down = isinstance(m.downsamples[-1], Resample)
                out.append(Local(m, radius=2 * n + (1 if down else 0), down=2 if down else 1, blocks=True))
            else:  # UpBlock: n + 1 residual blocks, then nearest ×2 and a 3×3 (if any)
                up = m.avg_shortcut is not None
                out.append(Local(m, radius=2 * (n + 1) + (1 if up else 0), up=2 if up else 1))
        return out

    def encode_chain(self) -> list[Local]:
        """The encoder down to latent resolution, as local stages ``fn(x, state)``."""
        e, p = self.encoder, self.config.patch
        pre = [Local(lambda t, s: patchify(t, p), radius=0, down=p, blocks=True)] if p > 1 else []
        return [*pre, Local(e.conv1, radius=1), *self._locals(e.downsamples[:self._enc_split()])]

    def decode_chain(self, split: bool = False) -> list[Local]:
        """The decoder from its first upsampler on, as local stages ``fn(x, state)`` (``split``: see
        :meth:`_locals`)."""
        d, p = self.decoder, self.config.patch
        first: list[Local] = []
        ups = d.upsamples[self._dec_split():]
        if self.config.residual and d.upsamples[0].avg_shortcut is not None:
            first, ups = [Local(self._dec_first_up, radius=1, up=2)], d.upsamples[1:]
        elif self.config.residual:
            ups = d.upsamples[1:]
        post = [Local(lambda t, s: unpatchify(t, p), radius=0, up=p)] if p > 1 else []
        return [*first, *self._locals(ups, split),
                Local(lambda t, s: d.head[2](F.silu(d.head[0](t)), s).clamp(-1.0, 1.0), radius=1), *post]

    def plan_decode_chain(self) -> list[Local]:
        """Wan 2.2's decoder levels one stage per residual block for the streamed plans (smaller halos there)."""
        return self.decode_chain(split=True)
