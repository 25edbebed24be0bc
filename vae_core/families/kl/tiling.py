"""How the kl family tiles: its high-resolution stages as segments for the GroupNorm sweep engine
(:mod:`vae_core.tiling.sweep`), its latent-resolution parts (decoder stem, mid block, lowest level; encoder lowest
level and head) untiled, and the cache that runs every segment once per tile.

Tensors: images ``[B, 3, H, W]`` in [-1, 1]; raw latents ``[B, C, H/8, W/8]``; decoder input after post_quant_conv.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...errors import VaeInputError
from ...tiling.options import TileOptions, check_mode
from ...tiling.run import run, untiled_call
from ...tiling.sweep import full_speed_cache, proxy_shape, sweep_tiled
from .model import AutoencoderKL
from .segments import decoder_segments, encoder_segments

__all__ = ["cache_needed", "decode_tiled", "encode_tiled", "decoder_forward", "encoder_forward",
           "decoder_forward_tiled", "encoder_forward_tiled"]


def cache_needed(model: AutoencoderKL, op: str, height: int, width: int, tile: int,
                 dtype: torch.dtype = torch.float32) -> int:
    """Bytes of ``cache_bytes`` with which exact tiling of one ``height``×``width`` image (image pixels) runs every
    segment once per tile (the level-major schedule); 0 when one tile covers the image. Less still gives the
    exact result, with recomputation."""
    down, elem = model.config.downscale, torch.finfo(dtype).bits // 8
    if op == "decode":
        stages, size, factor = decoder_segments(model), (height // down, width // down), 1
        lat = size
    elif op == "encode":
        stages, size = encoder_segments(model), (height, width)
        factor, lat = 2 ** len(stages), (height // 2 ** len(stages), width // 2 ** len(stages))
    else:
        raise VaeInputError(f"op={op!r}: expected 'decode' or 'encode'")
    return full_speed_cache(stages, size, factor, lat, max(1, tile // down), elem)


def decoder_forward_tiled(model: AutoencoderKL, h: torch.Tensor, tile: int, opts: TileOptions) -> torch.Tensor:
    """Tiled ``model.decoder`` forward: decoder input ``[B, z, h, w]`` (after post_quant_conv) → ``[B, 3, 8h, 8w]``
    in the model's dtype. Untiled when one tile covers the latent."""
    check_mode(opts)
    dec, down = model.decoder, model.config.downscale
    core = max(1, tile // down)
    b, _, lh, lw = h.shape
    if core >= lh and core >= lw:
        return untiled_call(dec, h, opts)

    def low(t: torch.Tensor) -> torch.Tensor:
        t = dec.stem(t)
        for blk in dec.up[-1].block:
            t = blk(t)
        return t

    proxies = None
    if opts.mode == "fast":
        ph, pw = proxy_shape(lh, lw, down, opts.proxy_pixels or max(256 * 256, tile * tile))
        proxies = [lambda i=i: low(F.adaptive_avg_pool2d(h[i:i + 1], (ph, pw)) if (ph, pw) != (lh, lw)
                                   else h[i:i + 1]) for i in range(b)]
    out = torch.empty((b, model.config.out_channels, lh * down, lw * down), device=h.device, dtype=h.dtype)
    sweep_tiled(decoder_segments(model), [lambda i=i: low(h[i:i + 1]) for i in range(b)], (lh, lw), 1, (lh, lw),
           core, out, proxies, opts)
    return out


def encoder_forward_tiled(model: AutoencoderKL, x: torch.Tensor, tile: int, opts: TileOptions) -> torch.Tensor:
    """Tiled ``model.encoder`` forward: images ``[B, 3, H, W]`` → moments ``[B, 2z, H//8, W//8]`` (before
    quant_conv), in the model's dtype. Untiled when one tile covers the latent."""
    check_mode(opts)
    enc, down = model.encoder, model.config.downscale
    b, _, hh, ww = x.shape
    stages = encoder_segments(model)
    lat = (hh, ww)
    for _ in stages:
        lat = (lat[0] // 2, lat[1] // 2)
    core = max(1, tile // down)
    if core >= lat[0] and core >= lat[1]:
        return untiled_call(enc, x, opts)
    proxies = None
    if opts.mode == "fast":
        ph, pw = proxy_shape(hh, ww, 1, opts.proxy_pixels or max(256 * 256, tile * tile))
        ph, pw = (hh, ww) if (ph, pw) == (hh, ww) else (max(down, ph // down * down), max(down, pw // down * down))
        proxies = [lambda i=i: x[i:i + 1] if (ph, pw) == (hh, ww) else F.interpolate(
            x[i:i + 1].float(), size=(ph, pw), mode="bilinear", antialias=True, align_corners=False).to(x.dtype)
            for i in range(b)]
    width = stages[-1][-1].out_channels
    low = torch.empty((b, width, lat[0], lat[1]), device=x.device, dtype=x.dtype)
    sweep_tiled(stages, [lambda i=i: x[i:i + 1] for i in range(b)], (hh, ww), 2 ** len(stages), lat, core, low,
           proxies, opts)
    for blk in enc.down[-1].block:
        low = blk(low)
    return enc.head(low)


def decode_tiled(model: AutoencoderKL, z: torch.Tensor, tile: int, opts: TileOptions) -> torch.Tensor:
    """Tiled decode of raw latents ``z`` ``[B, C, h, w]`` → ``[B, 3, 8h, 8w]`` (dtype of the model)."""
    return decoder_forward_tiled(model, model.decode_input(z), tile, opts)


def encode_tiled(model: AutoencoderKL, x: torch.Tensor, tile: int, opts: TileOptions) -> torch.Tensor:
    """Tiled encode of images ``x`` ``[B, 3, H, W]`` → raw posterior mean ``[B, C, H//8, W//8]`` (with
    ``opts.moments``: mean and log-variance, ``2C`` channels)."""
    moments = encoder_forward_tiled(model, x, tile, opts)
    return model.quant_moments(moments) if opts.moments else model.moments_to_mean(moments)


def decoder_forward(model: AutoencoderKL, h: torch.Tensor, opts: Optional[TileOptions] = None) -> torch.Tensor:
    """``model.decoder`` forward per ``opts`` (post-quant latent → image), with the same OOM fallback."""
    opts = opts or TileOptions()
    f = model.config.downscale
    return run("decode", model, h, opts, (h.shape[2] * f, h.shape[3] * f), model.decoder, decoder_forward_tiled)


def encoder_forward(model: AutoencoderKL, x: torch.Tensor, opts: Optional[TileOptions] = None) -> torch.Tensor:
    """``model.encoder`` forward per ``opts`` (image → moments), with the same OOM fallback."""
    opts = opts or TileOptions()
    return run("encode", model, x, opts, (x.shape[2], x.shape[3]), model.encoder, encoder_forward_tiled)
