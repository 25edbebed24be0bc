"""The SD-family kl-f8 AutoencoderKL, written from its published architecture with LDM (CompVis) parameter names.

Parameter names follow the original LDM layout (``encoder.down.0.block.0.norm1.weight``, ``mid.attn_1.q``,
``nin_shortcut``...), so an LDM state dict loads with ``strict=True``. This file never reads files and never
converts keys: ``convert.py`` does that. Widths, depth and latent channels come from :class:`ModelConfig`, so SD1/2,
SDXL, SD3/Flux (16 channels, no quant convs) and narrow test variants share one implementation.

Two hooks serve the tiling engine without the model knowing about tiles:

* the encoder and decoder expose their low-resolution parts (``stem``, ``head``) as plain methods; the tiled
  stages are run segment by segment by :mod:`vae_core.families.kl.segments` on the same modules;
* :data:`ATTENTION_HOOK` is called between attention query chunks (cancel checks in long untiled calls).

Tensor conventions: images are float ``[B, 3, H, W]`` in [-1, 1]; latents are raw (unscaled) ``[B, C, H/8, W/8]``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...progress import ATTENTION_HOOK
from ..layers import attention

__all__ = ["ModelConfig", "AutoencoderKL", "GroupNorm", "ATTENTION_HOOK", "attention"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of an AutoencoderKL.

    Attributes:
        ch: channels of the first level (SD: 128; the test fixture: 32).
        ch_mult: per-level multipliers of ``ch`` (SD: (1, 2, 4, 4)); ``len(ch_mult) - 1`` downsamplings.
        num_res_blocks: resnet blocks per encoder level (decoder levels have one more). SD: 2.
        z_channels: latent channels (SD1/2/XL: 4, SD3/Flux: 16).
        embed_dim: channels after ``quant_conv``; equals ``z_channels`` for SD.
        use_quant_conv: whether ``quant_conv``/``post_quant_conv`` exist (False for SD3/Flux).
        in_channels, out_channels: image channels (3).
        norm_groups: GroupNorm groups (32).
        norm_eps: GroupNorm epsilon (1e-6).
        decoder_ch: first-level width of the decoder when it differs from the encoder's (Flux.2), else None.
        latent_bn: Flux.2's latent normalisation: BatchNorm statistics (``bn.running_mean``/``running_var``, no
            affine) over the latents patchified 2×2 (``4 × latent_channels`` channels); ``bn_eps`` its epsilon.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    use_quant_conv: bool = True
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32
    norm_eps: float = 1e-6
    decoder_ch: Optional[int] = None
    latent_bn: bool = False
    bn_eps: float = 1e-4

    @property
    def encoder_widths(self) -> list[int]:
        return [self.ch * m for m in self.ch_mult]

    @property
    def decoder_widths(self) -> list[int]:
        return [(self.decoder_ch or self.ch) * m for m in self.ch_mult]

    @property
    def latent_channels(self) -> int:
        return self.embed_dim if self.use_quant_conv else self.z_channels

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along one axis (8 for kl-f8)."""
        return 2 ** (len(self.ch_mult) - 1)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (a class of its own so the tiling engine and the fp16 fix can find the model's norms)."""


def _norm(cfg: ModelConfig, channels: int) -> GroupNorm:
    return GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps, affine=True)


class ResnetBlock(nn.Module):
    """norm1 → SiLU → conv1 → norm2 → SiLU → conv2, plus a 1×1 ``nin_shortcut`` when channels change."""

    def __init__(self, cfg: ModelConfig, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = _norm(cfg, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cfg, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place where the tensor is fresh (inference only: the engine runs under no_grad/inference_mode)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1×1-conv q/k/v/proj_out (LDM ``mid.attn_1``)."""

    def __init__(self, cfg: ModelConfig, channels: int) -> None:
        super().__init__()
        self.norm = _norm(cfg, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [B, HW, C], contiguous: PyTorch picks its fused (flash) kernels only for a unit stride along C
        tokens = lambda t: t.reshape(b, c, h * w).transpose(1, 2).contiguous()  # noqa: E731
        out = attention(tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn)))
        out = out.transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class MidBlock(nn.Module):
    """resnet → attention → resnet at the lowest resolution (LDM ``mid``)."""

    def __init__(self, cfg: ModelConfig, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.attn_1 = AttnBlock(cfg, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, then a 3×3 stride-2 conv without padding: ``[B,C,H,W] -> [B,C,H//2,W//2]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest ×2, then a 3×3 conv: ``[B,C,H,W] -> [B,C,2H,2W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ``block`` (resnets) and an optional ``downsample``/``upsample``."""

    def __init__(self, blocks: Sequence[nn.Module], resample: Optional[nn.Module], kind: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        setattr(self, kind, resample)
        self.kind = kind

    @property
    def resample(self) -> Optional[nn.Module]:
        return getattr(self, self.kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    """Image ``[B, in_channels, H, W]`` → moments ``[B, 2·z_channels, H/8, W/8]`` (mean and log-variance)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = cfg.encoder_widths
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        down, cin = [], cfg.ch
        for i, cout in enumerate(widths):
            blocks = [ResnetBlock(cfg, cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks)]
            last = i == len(widths) - 1
            down.append(Level(blocks, None if last else Downsample(cout), "downsample"))
            cin = cout
        self.down = nn.ModuleList(down)
        self.mid = MidBlock(cfg, widths[-1])
        self.norm_out = _norm(cfg, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Lowest-resolution part: mid block, norm_out, SiLU, conv_out."""
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.head(h)


class Decoder(nn.Module):
    """Latent ``[B, z_channels, h, w]`` → image ``[B, out_channels, 8h, 8w]`` (about [-1, 1], not clamped).

    ``up[i]`` is stored in LDM order (``up[0]`` is the full-resolution level) and run from the last to the first.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = cfg.decoder_widths
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(cfg, widths[-1])
        up, cin = [None] * len(widths), widths[-1]
        for i in reversed(range(len(widths))):
            cout = widths[i]
            blocks = [ResnetBlock(cfg, cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks + 1)]
            up[i] = Level(blocks, Upsample(cout) if i != 0 else None, "upsample")
            cin = cout
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(cfg, widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def stem(self, z: torch.Tensor) -> torch.Tensor:
        """Lowest-resolution part: conv_in and the mid block (with global attention)."""
        return self.mid(self.conv_in(z))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """norm_out, SiLU, conv_out at full resolution."""
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.stem(z)
        for level in reversed(self.up):
            h = level(h)
        return self.head(h)


class AutoencoderKL(nn.Module):
    """kl-f8 AutoencoderKL: ``encoder``, ``decoder`` and, when ``cfg.use_quant_conv``, the 1×1 quant convs."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = cfg.encoder_widths + cfg.decoder_widths
        if any(w % cfg.norm_groups for w in widths):
            raise ValueError(f"ModelConfig: channel widths {widths} are not all divisible by "
                             f"norm_groups={cfg.norm_groups}")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        else:
            self.quant_conv = None
            self.post_quant_conv = None
        self.bn = LatentNorm(4 * cfg.latent_channels, cfg.bn_eps) if cfg.latent_bn else None

    def moments_to_mean(self, moments: torch.Tensor) -> torch.Tensor:
        """Encoder moments ``[B, 2z, h, w]`` → posterior mean ``[B, latent_channels, h, w]`` (after quant_conv)."""
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments[:, : moments.shape[1] // 2]

    def quant_moments(self, moments: torch.Tensor) -> torch.Tensor:
        """Encoder moments → the posterior's mean and log-variance ``[B, 2·latent_channels, h, w]`` (after
        quant_conv)."""
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B,3,H,W]`` in [-1, 1] → raw posterior mean ``[B, C, H//8, W//8]``."""
        return self.moments_to_mean(self.encoder(x))

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B,3,H,W]`` → the posterior's mean and log-variance ``[B, 2C, H//8, W//8]``."""
        return self.quant_moments(self.encoder(x))

    def decode_input(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.post_quant_conv is None else self.post_quant_conv(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents ``[B, C, h, w]`` → image ``[B, 3, 8h, 8w]``, about [-1, 1]."""
        return self.decoder(self.decode_input(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class LatentNorm(nn.Module):
    """Flux.2's latent normalisation: raw latents ``[B, C, h, w]`` (h, w even) are patchified 2×2 to
    ``[B, 4C, h/2, w/2]`` (channel ``4c + 2i + j`` holds pixel ``(2y+i, 2x+j)`` of channel ``c``) and standardised
    with fixed BatchNorm statistics; that is the space the Flux.2 transformer works in. Buffers only (no affine)."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(self.running_var.view(1, -1, 1, 1) + self.eps).to(z.device, z.dtype)
        return mean, std

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw ``[B, C, h, w]`` → normalised patchified ``[B, 4C, h/2, w/2]``."""
        b, c, h, w = z.shape
        z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised patchified ``[B, 4C, h, w]`` → raw ``[B, C, 2h, 2w]``."""
        mean, std = self._stats(z)
        z = z * std + mean
        b, c4, h, w = z.shape
        return z.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

