"""Hooks on Forge's VAE object (``sd_model.forge_objects.vae``: ``first_stage_model`` with LDM names, ``patcher``,
``vae_dtype``), for Forge main and hosts of Neo's shape.

* :func:`install_tiled` — the accordion's exact tiled encode/decode. Where ``VAE.decode``/``encode`` look up the
  patcher's ``model_vae_decode_wrapper``/``model_vae_encode_wrapper`` (Forge main), a wrapper swaps the first stage's
  encoder/decoder forwards for the vae_core engine for the duration of each call (chaining a wrapper another
  extension set, e.g. LayerDiffuse); elsewhere (Neo's stored methods) the forwards are swapped for the job, as on
  A1111. Both run inside Forge's own ``decode_inner``, so its batching, ``process_out`` scaling and ``[B, H, W, C]``
  0..1 output stay Forge's. :func:`restore` puts back exactly what was there.
* :func:`install_guard` — the whole-tensor NaN guard on ``first_stage_model.encode``/``decode`` (Forge has none): a
  retry casts the weights as loaded and sets ``vae_dtype``, which Forge casts the next inputs to.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from . import hooks
from .host import looks_up_wrappers

log = logging.getLogger(__name__)
KEYS = ("model_vae_encode_wrapper", "model_vae_decode_wrapper")


def install_tiled(vae: Any, encoder_tile: int, decoder_tile: int, mode: str,
                  cancel: Optional[Callable[[], object]] = None) -> str:
    """Tile ``vae``'s encode and decode until :func:`restore`; returns how ("wrappers" or "forwards")."""
    restore(vae)
    fsm = vae.first_stage_model
    if not looks_up_wrappers(vae):
        hooks.install_tiled(fsm, encoder_tile, decoder_tile, mode, cancel=cancel)
        return "forwards"
    options = vae.patcher.model_options
    saved = {key: options.get(key) for key in KEYS}

    def wrap(previous: Optional[Callable[..., Any]]) -> Callable[..., Any]:
        def wrapper(inner: Callable[[Any], Any], x: Any) -> Any:
            hooks.install_tiled(fsm, encoder_tile, decoder_tile, mode, cancel=cancel)
            try:
                return previous(inner, x) if previous is not None else inner(x)
            finally:
                hooks.restore_tiled(fsm)
        wrapper._vae_pack = True  # type: ignore[attr-defined]
        return wrapper

    for key in KEYS:
        options[key] = wrap(saved[key])
    vae.__dict__["_vae_pack_saved_wrappers"] = (options, saved)
    return "wrappers"


def is_tiled(vae: Any) -> bool:
    """Whether our wrappers or swapped forwards are in place on ``vae``."""
    options = getattr(getattr(vae, "patcher", None), "model_options", {}) or {}
    return any(getattr(options.get(k), "_vae_pack", False) for k in KEYS) or \
        "_vae_pack_saved_forwards" in vae.first_stage_model.__dict__


def restore(vae: Any) -> None:
    """Put back the wrappers (or forwards) that were there before :func:`install_tiled`."""
    swapped = "_vae_pack_saved_forwards" in vae.first_stage_model.__dict__
    hooks.restore_tiled(vae.first_stage_model)
    kept = vae.__dict__.pop("_vae_pack_saved_wrappers", None)
    if swapped or kept is not None:
        log.info("VAE pack: tiling removed from Forge's VAE")
    if kept is None:
        return
    options, saved = kept
    for key, previous in saved.items():
        if not getattr(options.get(key), "_vae_pack", False):
            continue  # replaced since by another extension: theirs stays
        if previous is None:
            options.pop(key, None)
        else:
            options[key] = previous


def install_guard(vae: Any) -> None:
    """The NaN guard on ``vae.first_stage_model`` (idempotent)."""
    hooks.install_guard(vae.first_stage_model, lambda dtype: setattr(vae, "vae_dtype", dtype))
