"""Hooks on A1111's ``first_stage_model`` (ldm ``AutoencoderKL`` or sgm's wrapper; both have encoder/decoder).

* :func:`engine` — the vae_core engine on A1111's own tensors (:class:`vae_core.attach.HostEngine`: a meta-device
  skeleton pointed at the first stage's current parameters for each call), so it costs no memory and follows
  ``load_state_dict`` and ``.to()``.
* :func:`install_tiled` / :func:`restore_tiled` — swap ``encoder.forward``/``decoder.forward`` for the vae_core
  tiled engine during processing, and put back exactly what was there.
* :func:`install_guard` — whole-tensor NaN check on ``first_stage_model.encode``/``decode``; retries in bf16 (where
  native) then fp32, and sets ``devices.dtype_vae`` like A1111's own retry does.
* :func:`apply_fp16_fix` — rescale the weights in place (GroupNorm eps too) when the VAE runs in fp16.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn

from vae_core import tiling
from vae_core.attach import HostEngine
from vae_core.precision import GuardState, fp16_fix_model, guarded

log = logging.getLogger(__name__)

_ENGINES: "weakref.WeakKeyDictionary[nn.Module, HostEngine]" = weakref.WeakKeyDictionary()


def _norms(module: nn.Module) -> dict[str, nn.GroupNorm]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.GroupNorm)}


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
            return tiling.encoder_forward(vae.model, x, opts)

    def decoder_forward(z: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        opts = tiling.TileOptions(tile=decoder_tile or "auto", mode=mode, cancel=_raised_during_call(cancel))
        with engine(fsm).attached() as vae:
            return tiling.decoder_forward(vae.model, z, opts)

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
    state = GuardState()
    for name in ("encode", "decode"):
        original = getattr(fsm, name)

        def call(x: torch.Tensor, *args: Any, _orig: Callable = original, _what: str = name, **kw: Any) -> Any:
            box: dict[str, Any] = {}

            def run(dtype: torch.dtype) -> torch.Tensor:
                if next(fsm.parameters()).dtype != dtype:
                    state.cast(fsm, dtype)  # from the weights as loaded, never a rounded retry's
                    devices.dtype_vae = dtype  # A1111 casts the next inputs to this
                box["out"] = _orig(x.to(dtype), *args, **kw)
                return _tensor_of(box["out"])

            dtype = next(fsm.parameters()).dtype
            guarded(run, dtype, x.device, state, f"VAE {_what}",
                    lambda: f"{_what} input range [{float(x.min()):.4g}, {float(x.max()):.4g}]")
            return box["out"]

        setattr(fsm, name, call)
    fsm._vae_pack_guard = state


def remove_guard(fsm: nn.Module) -> None:
    if fsm.__dict__.pop("_vae_pack_guard", None) is not None:
        fsm.__dict__.pop("encode", None)
        fsm.__dict__.pop("decode", None)


def _fingerprint(fsm: nn.Module) -> torch.Tensor:
    """Per-parameter sums of absolute values, in float32 on the CPU: any reload of other (e.g. un-fixed) weights
    changes the sum of every tensor the fix rescaled, whichever segments kept factor 1."""
    with torch.no_grad():
        return torch.stack([p.detach().float().abs().sum() for p in fsm.parameters()]).cpu()


def is_fixed(fsm: nn.Module) -> bool:
    """Whether the fp16 fix was applied to exactly the weights ``fsm`` holds now."""
    stamp = fsm.__dict__.get("_vae_pack_fixed")
    return isinstance(stamp, torch.Tensor) and torch.equal(stamp, _fingerprint(fsm))


def apply_fp16_fix(fsm: nn.Module) -> Optional[tuple[float, float]]:
    """Rescale ``fsm`` in place so fp16 does not overflow (same outputs). Skips if already applied to these
    weights; resets eps first when A1111 reloaded the weights since. Returns (peak_before, peak_after) or None."""
    norms = _norms(fsm)
    for m in norms.values():
        m.__dict__.setdefault("_vae_pack_eps0", m.eps)
    if is_fixed(fsm):
        return None
    for m in norms.values():
        m.eps = m._vae_pack_eps0
    host = engine(fsm)
    with host.attached() as vae, torch.no_grad():
        fixed, before, after = fp16_fix_model(vae.model)
        mine = dict(fixed.named_parameters())
        for key, p in vae.model.named_parameters():  # aliases of A1111's tensors: written in place
            p.copy_(mine[key].to(p.dtype))
    host.set_host_eps(fixed)
    fsm._vae_pack_fixed = _fingerprint(fsm)
    log.info("VAE pack fp16 fix: largest activation %.4g -> %.4g", before, after)
    return before, after


def undo_fp16_fix_eps(fsm: nn.Module) -> None:
    """Put back the stock eps (used when the fix is switched off; A1111 reloads the weights)."""
    for m in _norms(fsm).values():
        if "_vae_pack_eps0" in m.__dict__:
            m.eps = m._vae_pack_eps0
    fsm.__dict__.pop("_vae_pack_fixed", None)
