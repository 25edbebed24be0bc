"""The fp16 fix written into a host's own VAE tensors (A1111 keeps one first-stage module and reloads weights into it):
the family's fix computed on the engine's view of the host module, copied back in place, the host's GroupNorm eps set
to the fixed ones, and a fingerprint of every parameter so a reload of other (e.g. un-fixed) weights is noticed
whichever segments kept factor 1. The stock eps is remembered per norm so a reload or switching the fix off can put
it back."""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from ..errors import VaeInputError
from .attach import HostEngine

__all__ = ["apply_fp16_fix", "is_fixed", "undo_fp16_fix_eps"]

log = logging.getLogger(__name__)


def _norms(module: nn.Module) -> dict[str, nn.GroupNorm]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.GroupNorm)}


def _fingerprint(module: nn.Module) -> torch.Tensor:
    """Per-parameter sums of absolute values, in float32 on the CPU: any reload of other (e.g. un-fixed) weights
    changes the sum of every tensor the fix rescaled, whichever segments kept factor 1."""
    with torch.no_grad():
        return torch.stack([p.detach().float().abs().sum() for p in module.parameters()]).cpu()


def is_fixed(module: nn.Module) -> bool:
    """Whether the fp16 fix was applied to exactly the weights ``module`` holds now."""
    stamp = module.__dict__.get("_vae_pack_fixed")
    return isinstance(stamp, torch.Tensor) and torch.equal(stamp, _fingerprint(module))


def apply_fp16_fix(module: nn.Module, host: HostEngine) -> Optional[tuple[float, float]]:
    """Rescale the host ``module`` in place (through ``host``, its engine) so fp16 does not overflow; same outputs.
    Skips if already applied to these weights; resets eps first when the host reloaded the weights since.

    Returns:
        ``(peak_before, peak_after)``, or None when it was already applied.
    Raises:
        VaeInputError: the VAE's family has no fp16 fix (saying why).
    """
    norms = _norms(module)
    for m in norms.values():
        m.__dict__.setdefault("_vae_pack_eps0", m.eps)
    if is_fixed(module):
        return None
    for m in norms.values():
        m.eps = m._vae_pack_eps0
    with host.attached() as vae, torch.no_grad():
        fix = vae.family.fp16_fix
        if fix is None:
            raise VaeInputError(f"fp16 fix for {host.name} ({vae.info.family}): {vae.family.no_fp16_fix}")
        fixed, before, after = fix(vae.model, None)
        mine = dict(fixed.named_parameters())
        for key, p in vae.model.named_parameters():  # aliases of the host's tensors: written in place
            p.copy_(mine[key].to(p.dtype))
    host.set_host_eps(fixed)
    module._vae_pack_fixed = _fingerprint(module)
    log.info("VAE pack fp16 fix: largest activation %.4g -> %.4g", before, after)
    return before, after


def undo_fp16_fix_eps(module: nn.Module) -> None:
    """Put back the stock eps (used when the fix is switched off; the host reloads the weights)."""
    for m in _norms(module).values():
        if "_vae_pack_eps0" in m.__dict__:
            m.eps = m._vae_pack_eps0
    module.__dict__.pop("_vae_pack_fixed", None)
