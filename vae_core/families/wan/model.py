"""Qwen-Image's VAE (the Wan 2.1 causal 3D VAE design) for single images, host-free.

Parameter names and shapes are the original Wan 2.1 layout (what ComfyUI's ``qwen_image_vae.safetensors`` holds):
``encoder.conv1`` (conv_in), ``encoder.downsamples.<i>`` (a flat list of residual blocks and resamplers),
``encoder.middle.{0,1,2}`` (residual, attention, residual), ``encoder.head.{0,2}`` (RMS norm, conv), ``conv1``/
``conv2`` (the quant convs), and the decoder likewise with ``decoder.upsamples``. 3-D conv weights keep their
``[O, I, 3, 3, 3]`` shape so the original weights load with ``strict=True``; :mod:`vae_core.families.wan.convert` maps
diffusers' ``AutoencoderKLQwenImage`` names.

A single image is the first (and only) frame of a causal video: every causal 3-D conv sees two zero frames before
it, so it equals a 2-D conv with the last temporal tap of its kernel; the temporal resamplers are skipped for a first
frame. So everything here is 2-D: images ``[B, 3, H, W]`` (H, W multiples of 8) in [-1, 1], raw latents
``[B, z, H/8, W/8]`` (the posterior mean, before the pipeline's per-channel ``latents_mean``/``latents_std``),
decoded images clamped to [-1, 1] as the reference does. The RMS norm is per pixel (over channels) and the only
attention is the mid block's, so tiling is exact with halos around everything but the mid block
(:mod:`vae_core.tiling.halo`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import attention
from ...tiling.halo import Local, Whole

__all__ = ["WanConfig", "WanImageVAE"]


@dataclass(frozen=True)
class WanConfig:
    """Shape of a Wan 2.1-design VAE (Qwen-Image: base_dim 96, z_dim 16, dim_mult (1, 2, 4, 4), 2 res blocks)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3
    #: which encoder resamplers also downsample in time (carry a ``time_conv``); Qwen-Image: (False, True, True)
    temporal_down: tuple[bool, ...] = (False, True, True)

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def encoder_widths(self) -> list[int]:  # for the memory estimate
        return [self.base_dim * m for m in self.dim_mult]

    decoder_widths = encoder_widths


class CausalConv3d(nn.Conv3d):
    """A causal 3-D conv run on one frame: ``[B, C, H, W]`` → 2-D conv with the kernel's last temporal tap."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        w = self.weight[:, :, -1]
        return F.conv2d(x, w, self.bias, padding=self.padding[1:])


class RMSNorm(nn.Module):
    """``normalize(x, over channels) · √C · γ``; γ stored ``[C, 1, 1, 1]`` (in blocks) or ``[C, 1, 1]``."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.normalize(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=1).to(x.dtype)
        return y * self.scale * self.gamma.view(-1, 1, 1)


class ResidualBlock(nn.Module):
    """``residual``: RMS norm, SiLU, conv, RMS norm, SiLU, dropout, conv (indices 0–6); ``shortcut`` 1×1 if widths
    differ. Receptive radius 2 (two 3×3 convs)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(RMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1), RMSNorm(cout),
                                      nn.SiLU(), nn.Dropout(0.0), CausalConv3d(cout, cout, 3, padding=1))
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels (``norm``, ``to_qkv``, ``proj``): global."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(b, 3 * c, h * w).transpose(1, 2).chunk(3, dim=-1)
        out = attention(q.contiguous(), k.contiguous(), v.contiguous())
        return self.proj(out.transpose(1, 2).reshape(b, c, h, w)) + x


class Resample(nn.Module):
    """``down``: right/bottom zero pad, 3×3 stride 2; ``up``: nearest ×2 then 3×3 conv to half the channels.
    ``time_conv`` (temporal resampling) is stored for strict loading but unused on a first frame."""

    def __init__(self, dim: int, mode: str, temporal: bool) -> None:
        super().__init__()
        self.mode = mode
        if mode == "down":
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if temporal:
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
            if temporal:
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


def _head(dim: int, cout: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, cout, 3, padding=1))


class WanImageVAE(nn.Module):
    """The Wan 2.1-design VAE on single images. ``temporal_down`` flags (default ``cfg.temporal_down``; Qwen-Image:
    encoder (False, True, True)) only decide which resamplers carry a ``time_conv`` to load."""

    def __init__(self, cfg: WanConfig, temporal_down: Optional[tuple[bool, ...]] = None) -> None:
        super().__init__()
        temporal_down = cfg.temporal_down if temporal_down is None else tuple(temporal_down)
        self.config = cfg
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        enc = nn.Module()
        enc.conv1 = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(cout, "down", temporal_down[i]))
        enc.downsamples = nn.Sequential(*blocks)
        enc.middle = nn.Sequential(ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                   ResidualBlock(dims[-1], dims[-1]))
        enc.head = _head(dims[-1], 2 * cfg.z_dim)
        self.encoder = enc
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        ddims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_up = tuple(reversed(temporal_down))
        dec = nn.Module()
        dec.conv1 = CausalConv3d(cfg.z_dim, ddims[0], 3, padding=1)
        dec.middle = nn.Sequential(ResidualBlock(ddims[0], ddims[0]), AttentionBlock(ddims[0]),
                                   ResidualBlock(ddims[0], ddims[0]))
        ups: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(ddims[:-1], ddims[1:])):
            if i > 0:
                cin //= 2  # the upsampler before halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                ups.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                ups.append(Resample(cout, "up", temporal_up[i]))
        dec.upsamples = nn.Sequential(*ups)
        dec.head = _head(ddims[-1], cfg.out_channels)
        self.decoder = dec
        # the diffusion model's per-channel latent statistics (pipeline constants, not in the original weights)
        self.register_buffer("latents_mean", torch.zeros(cfg.z_dim), persistent=False)
        self.register_buffer("latents_std", torch.ones(cfg.z_dim), persistent=False)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents → the diffusion model's: ``(z - latents_mean) / latents_std`` per channel."""
        return (z - self.latents_mean.view(1, -1, 1, 1).to(z)) / self.latents_std.view(1, -1, 1, 1).to(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latents_std.view(1, -1, 1, 1).to(z) + self.latents_mean.view(1, -1, 1, 1).to(z)

    def _mean(self, moments: torch.Tensor) -> torch.Tensor:
        return self.conv1(moments)[:, : self.config.z_dim]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] → raw posterior mean ``[B, z, H/8, W/8]``."""
        e = self.encoder
        h = e.middle(e.downsamples(e.conv1(x)))
        return self._mean(e.head(h))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents ``[B, z, h, w]`` → images ``[B, 3, 8h, 8w]`` clamped to [-1, 1]."""
        d = self.decoder
        h = d.middle(d.conv1(self.conv2(z)))
        return d.head(d.upsamples(h)).clamp(-1.0, 1.0)

    # -- exact tiling: local stages around the global mid block ------------------------------------------------------
    @staticmethod
    def _blocks(seq: nn.Sequential) -> list[Local]:
        out: list[Local] = []
        for m in seq:
            if isinstance(m, ResidualBlock):
                out.append(Local(m, radius=2))
            elif m.mode == "down":  # pad right/bottom 1, 3×3 stride 2: reads [2o, 2o + 2]
                out.append(Local(m, radius=1, down=2))
            else:  # nearest ×2, then 3×3
                out.append(Local(m, radius=1, up=2))
        return out

    def encode_stages(self) -> list[Union[Local, Whole]]:
        e = self.encoder
        return [Local(e.conv1, radius=1), *self._blocks(e.downsamples), Whole(e.middle),
                Local(lambda t: self._mean(e.head(t)), radius=1)]

    def decode_stages(self) -> list[Union[Local, Whole]]:
        d = self.decoder
        return [Local(lambda t: d.conv1(self.conv2(t)), radius=1), Whole(d.middle), *self._blocks(d.upsamples),
                Local(lambda t: d.head(t).clamp(-1.0, 1.0), radius=1)]
