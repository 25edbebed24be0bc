"""Encode/decode of a bare network through the tiling engine with the plan its family gives: what :class:`Vae`,
the host engine and the benchmark call. ``opts`` as in :class:`~vae_core.tiling.TileOptions` (untiled, tiled,
``"auto"``; out-of-memory fallback to tiles).

Shapes: images ``[B, 3, H, W]`` in [-1, 1]; raw latents ``[B, C, H/f, W/f]`` (``f = model.config.downscale``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from .families.kl.tiling import decoder_forward, encoder_forward
from .families.registry import for_model
from .tiling.memory import free_memory
from .tiling.options import TileOptions
from .tiling.run import run

__all__ = ["encode", "decode", "cache_needed", "encoder_forward", "decoder_forward"]


def _video_tile(model: nn.Module, kind: str, t: torch.Tensor, opts: TileOptions) -> TileOptions:
    """A video call with ``tile="auto"``: untiled where the streamed call's working set fits half the free memory,
    else the largest tile whose working set does (the family's estimate; images keep the image planner)."""
    if t.dim() != 5 or opts.tile != "auto":
        return opts
    f, frames = model.config.downscale, t.shape[2]
    h, w = (t.shape[3] * f, t.shape[4] * f) if kind == "decode" else (t.shape[3], t.shape[4])
    if kind == "decode":
        frames = 1 + model.config.temporal_scale * (frames - 1)
    budget = free_memory(t.device) // 2
    for tile in (None, *VIDEO_TILES):
        if tile is not None and tile >= max(h, w) * 2:
            continue
        need = for_model(model).video_working_set(model, kind, frames, h, w, tile, t.dtype)["total"]
        if need <= budget:
            return dataclasses.replace(opts, tile=tile)
    return dataclasses.replace(opts, tile=VIDEO_TILES[-1])


#: tiles (image px) an automatic video call tries, largest first
VIDEO_TILES = (1024, 768, 512, 384, 256, 128, 64)


def decode(model: nn.Module, z: torch.Tensor, opts: Optional[TileOptions] = None) -> torch.Tensor:
    """Decode raw latents ``[B, C, h, w]`` (or videos ``[B, C, T, h, w]``) → images ``[B, 3, f·h, f·w]`` (videos
    ``[B, 3, F, f·h, f·w]``) per ``opts`` (untiled, tiled or auto), falling back to tiles when an untiled call runs
    out of memory; the family picks the tiling (GroupNorm sweeps for kl, halos for wan and tiny, streamed halos
    for videos)."""
    f = model.config.downscale
    opts = _video_tile(model, "decode", z, opts or TileOptions())
    return run("decode", model, z, opts, (z.shape[-2] * f, z.shape[-1] * f), model.decode,
               for_model(model).tiled("decode"))


def encode(model: nn.Module, x: torch.Tensor, opts: Optional[TileOptions] = None) -> torch.Tensor:
    """Encode images ``[B, 3, H, W]`` (or videos ``[B, 3, F, H, W]``) in [-1, 1] → raw posterior means
    ``[B, C, H//f, W//f]`` (``[B, C, T, H//f, W//f]``; with ``opts.moments`` means and log-variances, ``2C``
    channels); see :func:`decode`."""
    opts = _video_tile(model, "encode", x, opts or TileOptions())
    return run("encode", model, x, opts, (x.shape[-2], x.shape[-1]), model.encode_moments if opts.moments
               else model.encode, for_model(model).tiled("encode"))


def cache_needed(model: nn.Module, op: str, height: int, width: int, tile: int,
                 dtype: torch.dtype = torch.float32) -> int:
    """Bytes of ``cache_bytes`` with which exact tiling of one ``height``×``width`` image runs at full speed (every
    segment once per tile); 0 when one tile covers it or the family's plan needs no cache (halos)."""
    return for_model(model).cache_needed(model, op, height, width, tile, dtype)
