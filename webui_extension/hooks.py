"""Hooks on A1111's ``first_stage_model`` (ldm ``AutoencoderKL`` or sgm's wrapper; both have encoder/decoder).

* :func:`engine` — the vae_core engine on A1111's own tensors (:class:`vae_core.hosts.attach.HostEngine`: a
  meta-device skeleton pointed at the first stage's current parameters for each call), so it costs no memory and
  follows ``load_state_dict`` and ``.to()``.
* :func:`install_tiled` / :func:`restore_tiled` — swap ``encoder.forward``/``decoder.forward`` for the vae_core
  tiled engine during processing, and put back exactly what was there.
* :func:`install_guard` — whole-tensor NaN check on ``first_stage_model.encode``/``decode``; retries in bf16 (where
  native) then fp32, and tells the host the new dtype (A1111's ``devices.dtype_vae``, like its own retry does).
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

    def run(what: str, x: torch.Tensor, tile: Any, forward: Callable[..., torch.Tensor]) -> torch.Tensor:
        report = tiling.TileReport()
        opts = tiling.TileOptions(tile=tile or "auto", mode=mode, cancel=_raised_during_call(cancel), report=report)
        with engine(fsm).attached() as vae:
            out = forward(vae.model, x, opts)
        log.info("VAE pack: tiled %s of %s (%s, tile %s): %d tiles", what, tuple(x.shape), mode, tile or "auto",
                 report.tiles)
        return out

    def encoder_forward(x: torch.Tensor) -> torch.Tensor:
        return run("encode", x, encoder_tile, vae_engine.encoder_forward)

    def decoder_forward(z: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        return run("decode", z, decoder_tile, vae_engine.decoder_forward)

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


def restore_when_closed(p: Any, undo: Callable[[], None]) -> None:
    """Run ``undo`` (e.g. restore a first stage's forwards) when the job ``p`` is closed: A1111 and Forge run every
    txt2img/img2img job (UI and API) in ``with closing(p)``, so this runs when the job fails or is cancelled too,
    where ``postprocess`` is skipped."""
    close = getattr(p, "close", None)
    own = p.__dict__.get("close")  # an instance attribute to put back, if the job had one

    def closing(*args: Any, **kwargs: Any) -> None:
        if own is None:  # once: the job's own close is back
            p.__dict__.pop("close", None)
        else:
            p.__dict__["close"] = own
        try:
            undo()
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


def install_guard(fsm: nn.Module, set_dtype: Callable[[torch.dtype], None]) -> None:
    """Whole-output NaN/inf check with bf16/fp32 retry on ``fsm.encode`` and ``fsm.decode`` (idempotent).

    ``set_dtype(d)`` tells the host that its VAE now runs in ``d``, so it casts the next inputs to it (A1111:
    ``devices.dtype_vae``; Forge: the VAE object's ``vae_dtype``)."""
    if getattr(fsm, "_vae_pack_guard", None) is not None:
        return
    fsm._vae_pack_guard = guard_methods(
        fsm, ("encode", "decode"), lambda: fsm, dtype_now=lambda: next(fsm.parameters()).dtype,
        set_dtype=set_dtype, device=lambda x: x.device, remember=False, output=_tensor_of, inputs_in_dtype=True)


def remove_guard(fsm: nn.Module) -> None:
    if fsm.__dict__.pop("_vae_pack_guard", None) is not None:
        fsm.__dict__.pop("encode", None)
        fsm.__dict__.pop("decode", None)


def apply_fp16_fix(fsm: nn.Module) -> Optional[tuple[float, float]]:
    """Rescale ``fsm`` in place so fp16 does not overflow (same outputs); None when already applied to these weights
    (:func:`vae_core.hosts.fp16_inplace.apply_fp16_fix`)."""
    return fp16_inplace.apply_fp16_fix(fsm, engine(fsm))
