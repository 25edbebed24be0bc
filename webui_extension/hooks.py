"""Hooks on A1111's ``first_stage_model`` (ldm ``AutoencoderKL`` or sgm's wrapper; both have encoder/decoder).

* :func:`engine` — the vae_core engine on A1111's own tensors (:class:`vae_core.hosts.attach.HostEngine`: a
  meta-device skeleton pointed at the first stage's current parameters for each call), so it costs no memory and
  follows ``load_state_dict`` and ``.to()``.
* :func:`install_tiled` / :func:`restore_tiled` — swap ``encoder.forward``/``decoder.forward`` for the vae_core
  tiled engine during processing, and put back exactly what was there.
* :func:`install_guard` — whole-tensor NaN check on ``first_stage_model.encode``/``decode``; retries in bf16 (where
  native) then fp32, and sets ``devices.dtype_vae`` like A1111's own retry does.
* :func:`apply_fp16_fix` — rescale the weights in place (GroupNorm eps too) when the VAE runs in fp16
  (:mod:`vae_core.hosts.fp16_inplace`).
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn

from vae_core import engine as vae_engine
from vae_core import tiling
from vae_core.hosts import fp16_inplace
from vae_core.hosts.attach import HostEngine
from vae_core.hosts.fp16_inplace import is_fixed, undo_fp16_fix_eps  # noqa: F401 - script.py and tests use them here
from vae_core.hosts.guard import guard_methods

log = logging.getLogger(__name__)

_ENGINES: "weakref.WeakKeyDictionary[nn.Module, HostEngine]" = weakref.WeakKeyDictionary()


def engine(fsm: nn.Module) -> HostEngine:
    """The vae_core engine on ``fsm``'s own parameters (one per first-stage module; it re-reads them per call)."""
    found = _ENGINES.get(fsm)
    if found is None:
        found = _ENGINES[fsm] = HostEngine(fsm, name=f"A1111 first stage ({type(fsm).__name__})")
    return found


def _raised_during_call(cancel: Optional[Callable[[], object]]) -> Optional[Callable[[], bool]]:
    """``cancel`` for one VAE call, ignoring an interrupt that was already pending when the call started.

    A1111's Interrupt stops the sampler and then still decodes (and for img2img/hires, encodes) what it has, so a
    call that starts interrupted must run to the end, as A1111's own VAE call would; an interrupt pressed during a
    long tiled call stops it between tiles."""
    if cancel is None:
        return None
    pending = bool(cancel())
    return lambda: not pending and bool(cancel())


def install_tiled(fsm: nn.Module, encoder_tile: Any, decoder_tile: Any, mode: str,
                  cancel: Optional[Callable[[], object]] = None) -> None:
    """Route ``fsm.encoder``/``fsm.decoder`` forwards through the vae_core engine (``tile`` 0 → "auto").
    ``cancel`` (A1111's interrupt flag) stops a call only when it turns true during that call."""
    restore_tiled(fsm)
    saved = {part: getattr(fsm, part).__dict__.get("forward") for part in ("encoder", "decoder")}

    def encoder_forward(x: torch.Tensor) -> torch.Tensor:
        opts = tiling.TileOptions(tile=encoder_tile or "auto", mode=mode, cancel=_raised_during_call(cancel))
        with engine(fsm).attached() as vae:
            return vae_engine.encoder_forward(vae.model, x, opts)

    def decoder_forward(z: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        opts = tiling.TileOptions(tile=decoder_tile or "auto", mode=mode, cancel=_raised_during_call(cancel))
        with engine(fsm).attached() as vae:
            return vae_engine.decoder_forward(vae.model, z, opts)

    fsm.encoder.forward = encoder_forward
    fsm.decoder.forward = decoder_forward
    fsm._vae_pack_saved_forwards = saved


def restore_tiled(fsm: nn.Module) -> None:
    saved = fsm.__dict__.pop("_vae_pack_saved_forwards", None)
    if saved is None:
        return
    for part, fwd in saved.items():
        mod = getattr(fsm, part)
        if fwd is None:
            mod.__dict__.pop("forward", None)
        else:
            mod.forward = fwd


def restore_when_closed(p: Any, fsm: nn.Module) -> None:
    """Restore ``fsm``'s forwards when the job ``p`` is closed: A1111 runs every txt2img/img2img job (UI and API) in
    ``with closing(p)``, so this runs when the job fails or is cancelled too, where ``postprocess`` is skipped."""
    close = getattr(p, "close", None)
    own = p.__dict__.get("close")  # an instance attribute to put back, if the job had one

    def closing(*args: Any, **kwargs: Any) -> None:
        if own is None:  # once: the job's own close is back
            p.__dict__.pop("close", None)
        else:
            p.__dict__["close"] = own
        try:
            restore_tiled(fsm)
        finally:
            if close is not None:
                close(*args, **kwargs)

    p.close = closing


def _tensor_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("parameters", "mean"):  # ldm's DiagonalGaussianDistribution
        if isinstance(getattr(out, attr, None), torch.Tensor):
            return getattr(out, attr)
    raise TypeError(f"first_stage_model output of type {type(out).__name__}: no tensor to check")


def install_guard(fsm: nn.Module, devices: Any) -> None:
    """Whole-output NaN/inf check with bf16/fp32 retry on ``fsm.encode`` and ``fsm.decode`` (idempotent)."""
    if getattr(fsm, "_vae_pack_guard", None) is not None:
        return
    fsm._vae_pack_guard = guard_methods(
        fsm, ("encode", "decode"), lambda: fsm, dtype_now=lambda: next(fsm.parameters()).dtype,
        set_dtype=lambda d: setattr(devices, "dtype_vae", d),  # A1111 casts the next inputs to this
        device=lambda x: x.device, remember=False, output=_tensor_of, inputs_in_dtype=True)


def remove_guard(fsm: nn.Module) -> None:
    if fsm.__dict__.pop("_vae_pack_guard", None) is not None:
        fsm.__dict__.pop("encode", None)
        fsm.__dict__.pop("decode", None)


def apply_fp16_fix(fsm: nn.Module) -> Optional[tuple[float, float]]:
    """Rescale ``fsm`` in place so fp16 does not overflow (same outputs); None when already applied to these weights
    (:func:`vae_core.hosts.fp16_inplace.apply_fp16_fix`)."""
    return fp16_inplace.apply_fp16_fix(fsm, engine(fsm))
