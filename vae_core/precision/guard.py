"""The NaN guard: every output element is checked; on NaN/inf the call is retried in a wider dtype (fp16 → bf16 where
native → fp32) from the weights as loaded (:class:`GuardState` keeps them when a retry's cast would round them), and
the dtype that worked is remembered for later calls."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import NonFiniteOutputError
from . import dtypes

__all__ = ["GuardState", "guarded"]

log = logging.getLogger(__name__)


def _rounds(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether casting ``src`` values to ``dst`` can change them (fp16 → bf16, fp32 → fp16, ...; not → fp32)."""
    if src == dst:
        return False
    return not (dst in (torch.float32, torch.float64) and torch.finfo(dst).bits >= torch.finfo(src).bits)


@dataclass
class GuardState:
    """Per-model memory of the NaN guard: whether it already logged, the dtype that worked, and ``pristine``: a CPU
    copy of the floating-point weights as they were before the guard's first rounding cast (taken only then, e.g.
    before an fp16 → bf16 retry), so every retry and every later cast starts from the weights the user loaded."""

    warned: bool = False
    working_dtype: Optional[torch.dtype] = None
    pristine: Optional[dict[str, torch.Tensor]] = None

    def cast(self, module: nn.Module, dtype: torch.dtype, keep: bool = True) -> None:
        """Cast ``module``'s floating-point parameters and buffers to ``dtype``: from :attr:`pristine` when it exists
        (taken first when this cast would round the current values and ``keep``: a retry's cast; a cast the user asks
        for keeps nothing), else in place as ``module.to`` does."""
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        current = next((t.dtype for t in tensors.values() if t.is_floating_point()), dtype)
        if keep and self.pristine is None and _rounds(current, dtype):
            self.keep_weights(module)
        if self.pristine is None:
            module.to(dtype=dtype)
            return
        with torch.no_grad():
            for key, t in tensors.items():
                if key in self.pristine:
                    t.data = self.pristine[key].to(device=t.device, dtype=dtype)

    def keep_weights(self, module: nn.Module) -> None:
        """Take :attr:`pristine` now (e.g. outside a timed call) from ``module``'s current weights."""
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        self.pristine = {k: t.detach().to("cpu", copy=True) for k, t in tensors.items() if t.is_floating_point()}

    def forget_weights(self) -> None:
        """Drop :attr:`pristine` (the weights it copied were replaced, e.g. a host module re-attached)."""
        self.pristine = None


def guarded(run: Callable[[torch.dtype], torch.Tensor], dtype: torch.dtype, device: torch.device,
            state: GuardState, what: str, describe_input: Callable[[], str]) -> tuple[torch.Tensor, torch.dtype]:
    """Run ``run(dtype)``; if any output element is non-finite, retry in bf16 (when native) then fp32.

    ``run`` casts its model to the dtype it is given with :meth:`GuardState.cast` (so a retry starts from the weights
    the user loaded, never from the rounded weights of an earlier retry). Returns ``(output, dtype_that_worked)``.
    Raises NonFiniteOutputError when fp32 fails too (the input is the cause). Logs one warning per model
    (``state``).
    """
    out = run(dtype)
    if bool(torch.isfinite(out).all()):
        return out, dtype
    tried = [dtype]
    for retry in (torch.bfloat16, torch.float32):
        if retry in tried or (retry == torch.bfloat16 and not dtypes.bf16_supported(device)):
            continue
        if not state.warned:
            log.warning("%s produced NaN/inf in %s; retrying in %s and keeping that precision for this VAE", what,
                        str(dtype).replace("torch.", ""), str(retry).replace("torch.", ""))
            state.warned = True
        del out
        out = run(retry)
        tried.append(retry)
        if bool(torch.isfinite(out).all()):
            state.working_dtype = retry
            return out, retry
    raise NonFiniteOutputError(f"{what} produced NaN/inf even in float32: the input is the cause ({describe_input()})")
