"""The tiny autoencoders (madebyollin's TAESD design: TAESD, TAESDXL, TAESD3, TAEF1, TAEF2), host-free.

Parameter names are the original ones under ``encoder.``/``decoder.`` (the indices of the original ``nn.Sequential``
files ``taesd_encoder.pth``/``taesd_decoder.pth``; the decoder's index 0 is the parameter-free clamp), so the
original weights load with ``strict=True`` once prefixed; :mod:`vae_core.families.tiny.convert` maps the other layouts.

* Encoder: conv(3, 64), Block; three times [conv(64, 64, stride 2, no bias), Block × 3]; conv(64, latent).
* Decoder: clamp ``tanh(z/3)·3``; conv(latent, 64), ReLU; three times [Block × 3, nearest ×2, conv(64, 64, no
  bias)]; Block; conv(64, 3).
* Block: ``relu(conv(relu(conv(relu(conv(x))))) + skip(x))`` with 3×3 convs (skip: identity here: 64 → 64).
* TAEF2 (``TinyConfig.pool``, FLUX.2's 32-channel latents): the six blocks at latent resolution (the encoder's last
  three, the decoder's first three) first add a global "pool" branch, ``x = x + conv1x1(relu(GroupNorm(4,
  conv1x1(x))))`` (64 → 256 → 64 channels, no biases, GroupNorm eps 1e-5), as in madebyollin's ``use_midblock_gn``.

Conventions: images in [-1, 1] (the network itself works in [0, 1]). TAESD's own latents are the diffusion model's
*scaled* latents; like ComfyUI's TAESD, this module converts at its boundary with two scalar parameters so that
``encode``/``decode`` speak the matching full VAE's *raw* latents: ``taesd = (raw - vae_shift) · vae_scale`` (TAESD:
0.18215/0, TAESDXL: 0.13025/0, TAESD3: 1.5305/0.0609, TAEF1: 0.3611/0.1159; 1/0 gives TAESD's own latents, as
diffusers' ``AutoencoderTiny`` does). Everything else is local (no norm, no attention), so tiling with a halo of the
receptive radius is exact (:mod:`vae_core.tiling.halo`); TAEF2's GroupNorm blocks need whole-image statistics and run
untiled at latent resolution (:class:`~vae_core.tiling.halo.Whole` stages).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ...errors import VaeInputError
from ...tiling.halo import Local, Stage, Whole

__all__ = ["TinyConfig", "TinyAutoencoder", "TinyHalfMissing"]

WIDTH = 64


class TinyHalfMissing(VaeInputError):
    """Raised when the encoder (or decoder) of a TAESD loaded from one half alone is used."""


@dataclass(frozen=True)
class TinyConfig:
    """Shape of a tiny autoencoder: ``latent_channels`` (4 for TAESD/TAESDXL, 16 for TAESD3/TAEF1, 32 for TAEF2),
    which halves exist (the original files hold one each) and ``pool`` (TAEF2's GroupNorm blocks)."""

    latent_channels: int = 4
    has_encoder: bool = True
    has_decoder: bool = True
    pool: bool = False
    in_channels: int = 3
    out_channels: int = 3

    @property
    def downscale(self) -> int:
        return 8

    @property
    def encoder_widths(self) -> list[int]:  # for the memory estimate: 64 channels at every resolution
        return [WIDTH] * 4

    decoder_widths = encoder_widths


def _conv(cin: int, cout: int, **kw: object) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, **kw)


#: TAEF2's pool branch: 4× wider, normalised in 4 groups.
POOL_WIDTH, POOL_GROUPS = 4 * WIDTH, 4
#: Indices of the blocks with a pool branch (TAEF2) in the encoder and decoder ``nn.Sequential``.
ENCODER_POOL_BLOCKS, DECODER_POOL_BLOCKS = (11, 12, 13), (3, 4, 5)


class Block(nn.Module):
    def __init__(self, channels: int, pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(),
                                  _conv(channels, channels))
        self.pool = nn.Sequential(nn.Conv2d(channels, POOL_WIDTH, 1, bias=False), nn.GroupNorm(POOL_GROUPS, POOL_WIDTH),
                                  nn.ReLU(), nn.Conv2d(POOL_WIDTH, channels, 1, bias=False)) if pool else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + x)


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def _encoder(latent: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [_conv(3, WIDTH), Block(WIDTH)]
    for level in range(3):
        mid = pool and level == 2  # the last level runs at latent resolution
        layers += [_conv(WIDTH, WIDTH, stride=2, bias=False), Block(WIDTH, mid), Block(WIDTH, mid), Block(WIDTH, mid)]
    return nn.Sequential(*layers, _conv(WIDTH, latent))


def _decoder(latent: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [Clamp(), _conv(latent, WIDTH), nn.ReLU()]
    for level in range(3):
        mid = pool and level == 0
        layers += [Block(WIDTH, mid), Block(WIDTH, mid), Block(WIDTH, mid), nn.Upsample(scale_factor=2),
                   _conv(WIDTH, WIDTH, bias=False)]
    return nn.Sequential(*layers, Block(WIDTH), _conv(WIDTH, 3))


class TinyAutoencoder(nn.Module):
    """TAESD-design encoder/decoder; ``encoder``/``decoder`` is None when that half was not loaded."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder: Optional[nn.Sequential] = _encoder(cfg.latent_channels, cfg.pool) if cfg.has_encoder else None
        self.decoder: Optional[nn.Sequential] = _decoder(cfg.latent_channels, cfg.pool) if cfg.has_decoder else None
        self.vae_scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.vae_shift = nn.Parameter(torch.tensor(0.0), requires_grad=False)

    def _half(self, name: str) -> nn.Sequential:
        half = getattr(self, name)
        if half is None:
            raise TinyHalfMissing(f"{name} of a tiny autoencoder loaded without it (the original TAESD ships "
                                  f"taesd_encoder and taesd_decoder as separate files); expected both halves: put "
                                  "the other file beside it with the same name but encoder/decoder swapped")
        return half

    def _to_raw(self, t: torch.Tensor) -> torch.Tensor:
        return t / self.vae_scale + self.vae_shift

    def _from_raw(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.vae_shift) * self.vae_scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] (H, W multiples of 8) → raw latents ``[B, C, H/8, W/8]``."""
        return self._to_raw(self._half("encoder")((x + 1) / 2))

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """A tiny autoencoder has no posterior to sample: refused (VaeInputError)."""
        raise VaeInputError("the posterior of a tiny autoencoder: it encodes deterministically; expected the mean")

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents ``[B, C, h, w]`` → images ``[B, 3, 8h, 8w]`` in about [-1, 1] (not clamped)."""
        return self._half("decoder")(self._from_raw(z)) * 2 - 1

    # -- exact tiling: every stage is local -------------------------------------------------------------------------
    def encode_stages(self) -> list[Stage]:
        """The encode as local stages: radii count the 3×3 convs (1 px each) at each stage's input resolution;
        TAEF2's GroupNorm blocks at latent resolution as one whole stage."""
        enc = list(self._half("encoder"))
        stages: list[Stage] = [Local(lambda t, m=nn.Sequential(*enc[:2]): m((t + 1) / 2), radius=1 + 3)]
        for i in range(3):
            part = enc[2 + 4 * i: 6 + 4 * i]  # stride-2 conv, then 3 blocks at half resolution
            if self.config.pool and i == 2:
                stages += [Local(part[0], radius=1, down=2), Whole(nn.Sequential(*part[1:]))]
            else:
                stages.append(Local(nn.Sequential(*part), radius=1 + 2 * 9, down=2))
        stages.append(Local(lambda t, m=enc[-1]: self._to_raw(m(t)), radius=1))
        return stages

    def decode_stages(self) -> list[Stage]:
        """The decode as local stages (clamp, conv and 3 blocks per resolution; nearest ×2 + conv per level);
        TAEF2's first three blocks (GroupNorm) as one whole stage at latent resolution."""
        dec = list(self._half("decoder"))
        first = nn.Sequential(*dec[:6])  # clamp, conv, relu, 3 blocks at latent resolution
        stages: list[Stage] = [Whole(lambda t, m=first: m(self._from_raw(t))) if self.config.pool else
                               Local(lambda t, m=first: m(self._from_raw(t)), radius=1 + 9)]
        for i in range(3):
            lo = 6 + 5 * i
            stages.append(Local(nn.Sequential(*dec[lo:lo + 2]), radius=1, up=2))  # nearest ×2, conv
            if i < 2:
                stages.append(Local(nn.Sequential(*dec[lo + 2:lo + 5]), radius=9))  # 3 blocks
            else:
                last = nn.Sequential(*dec[lo + 2:])  # 1 block, conv out
                stages.append(Local(lambda t, m=last: m(t) * 2 - 1, radius=3 + 1))
        return stages
