"""One encode/decode call through the tiling engine: the tile argument (None, ``"auto"``, px) resolved against free
memory, untiled first with a tiled retry after an out-of-memory error, cancel checks inside long attention calls.
Which tiled engine runs (GroupNorm sweeps or halos) is the family's choice: the caller passes it as ``tiled``."""
from __future__ import annotations

import gc
import logging
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import Cancelled, VaeError, VaeInputError
from ..progress import ATTENTION_HOOK
from .cache import resolve_budget
from .memory import MIN_TILE, auto_tile, free_memory, is_oom
from .options import TileOptions, check_mode

__all__ = ["run", "untiled_call", "Tiled"]

log = logging.getLogger(__name__)

#: ``tiled(model, t, tile_px, opts)``: a family's tiled encode or decode.
Tiled = Callable[[nn.Module, torch.Tensor, int, TileOptions], torch.Tensor]


def untiled_call(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor, opts: TileOptions) -> torch.Tensor:
    """An untiled call: no autograd graph, and one progress step so hosts see the call finish."""
    with torch.no_grad():
        out = fn(t)
    if opts.progress is not None:
        opts.progress(1, 1)
    return out


def _free_after_oom(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(kind: str, model: nn.Module, t: torch.Tensor, opts: TileOptions, pixels: tuple[int, int],
         untiled: Callable[[torch.Tensor], torch.Tensor],
         tiled: Tiled) -> torch.Tensor:
    """Run ``kind`` (``"encode"``/``"decode"``, for messages) of ``model`` on ``t`` per ``opts``: ``untiled(t)``
    when ``opts.tile`` is None (retried through ``tiled`` after an out-of-memory error) or ``"auto"`` finds it fits,
    else ``tiled(model, t, tile, opts)``. ``pixels``: the (H, W) of the image side, for the tile choice. Returns a
    contiguous tensor; no autograd graph is kept.

    Raises:
        VaeInputError: a bad ``mode``, ``tile`` or ``cache_bytes``; VaeError: out of memory where tiling cannot help.
    """
    check_mode(opts)  # on every path, tiled or not: a wrong mode is a caller's bug whether or not it tiles
    tile = opts.tile
    if isinstance(tile, str):
        if tile != "auto":
            raise VaeInputError(f"tile={tile!r}: expected None, 'auto' or an int ≥ {MIN_TILE} (image pixels)")
        tile = auto_tile(model, pixels[0] * t.shape[0], pixels[1], t.dtype, t.device)
        if tile is not None:
            log.info("%s: auto tile %d px for %dx%d (batch %d)", kind, tile, pixels[1], pixels[0], t.shape[0])
    elif tile is not None:
        if isinstance(tile, bool) or not isinstance(tile, int):
            raise VaeInputError(f"tile={tile!r}: expected None, 'auto' or an int ≥ {MIN_TILE} (image pixels)")
        if tile < MIN_TILE:
            raise VaeInputError(f"tile={tile}: below the minimum of {MIN_TILE} image pixels")
    resolve_budget(opts.cache_bytes, torch.device("meta"))  # validate the argument early
    if opts.channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    token = ATTENTION_HOOK.set(lambda done, total: _attention_cancel(opts))
    try:
        with torch.no_grad():  # inference only: no autograd graph may outlive a tile
            return _run_hooked(kind, model, t, opts, pixels, untiled, tiled, tile).contiguous()
    finally:
        ATTENTION_HOOK.reset(token)


def _attention_cancel(opts: TileOptions) -> None:
    """Between attention query chunks: the host's cancel check (it may raise its own interrupt)."""
    if opts.cancel is not None and opts.cancel():
        raise Cancelled("VAE call cancelled during attention")


def _run_hooked(kind: str, model: nn.Module, t: torch.Tensor, opts: TileOptions, pixels: tuple[int, int],
                untiled: Callable[[torch.Tensor], torch.Tensor],
                tiled: Tiled,
                tile: Optional[int]) -> torch.Tensor:
    if tile is not None:
        return tiled(model, t, tile, opts)
    failed: Optional[str] = None
    try:
        return untiled_call(untiled, t, opts)
    except Exception as exc:  # noqa: BLE001 - only allocation failures are handled, the rest re-raised
        if not is_oom(exc):
            raise
        failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    # outside the except block, so the failed attempt's frames and tensors can be freed
    _free_after_oom(t.device)
    budget = free_memory(t.device) // 2
    largest = max(pixels)
    if largest <= MIN_TILE:
        raise VaeError(f"{kind}: out of memory on a {pixels[1]}x{pixels[0]} image ({failed}), too small to tile")
    tile = min(auto_tile(model, pixels[0], pixels[1], t.dtype, t.device, budget) or largest, largest // 2)
    tile = max(MIN_TILE, tile // 8 * 8)
    f = model.config.downscale
    if tile // f >= max(pixels[0] // f, pixels[1] // f):  # one tile would cover the latent: the same call again
        raise VaeError(f"{kind}: out of memory on a {pixels[1]}x{pixels[0]} image ({failed}); the smallest tile "
                       f"({MIN_TILE} px) covers it, so tiling cannot help")
    log.warning("%s: out of memory untiled (%s); retrying tiled with %d px tiles", kind, failed, tile)
    return tiled(model, t, tile, opts)

