"""Encode/decode of a bare network through the tiling engine with the plan its family gives: what :class:`Vae`,
the host engine and the benchmark call. ``opts`` as in :class:`~vae_core.tiling.TileOptions` (untiled, tiled,
``"auto"``; out-of-memory fallback to tiles).

Shapes: images ``[B, 3, H, W]`` in [-1, 1]; raw latents ``[B, C, H/f, W/f]`` (``f = model.config.downscale``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .families.kl.tiling import decoder_forward, encoder_forward
from .families.registry import for_model
from .tiling.options import TileOptions
from .tiling.run import run

__all__ = ["encode", "decode", "cache_needed", "encoder_forward", "decoder_forward"]


def decode(model: nn.Module, z: torch.Tensor, opts: Optional[TileOptions] = None) -> torch.Tensor:
    """Decode raw latents ``[B, C, h, w]`` → images ``[B, 3, f·h, f·w]`` per ``opts`` (untiled, tiled or auto),
    falling back to tiles when an untiled call runs out of memory; the family picks the tiling (GroupNorm sweeps for
    kl, halos for wan and tiny)."""
    f = model.config.downscale
    return run("decode", model, z, opts or TileOptions(), (z.shape[2] * f, z.shape[3] * f), model.decode,
               for_model(model).tiled("decode"))


def encode(model: nn.Module, x: torch.Tensor, opts: Optional[TileOptions] = None) -> torch.Tensor:
    """Encode images ``[B, 3, H, W]`` in [-1, 1] → raw posterior means ``[B, C, H//f, W//f]``; see :func:`decode`."""
    return run("encode", model, x, opts or TileOptions(), (x.shape[2], x.shape[3]), model.encode,
               for_model(model).tiled("encode"))


def cache_needed(model: nn.Module, op: str, height: int, width: int, tile: int,
                 dtype: torch.dtype = torch.float32) -> int:
    """Bytes of ``cache_bytes`` with which exact tiling of one ``height``×``width`` image runs at full speed (every
    segment once per tile); 0 when one tile covers it or the family's plan needs no cache (halos)."""
    return for_model(model).cache_needed(model, op, height, width, tile, dtype)
