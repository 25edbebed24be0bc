"""The NaN guard around a host's own encode/decode methods (ComfyUI's ``comfy.sd.VAE``, A1111's first stage): every
output checked whole, retried in bf16 (where native) then fp32 from the weights as loaded, the dtype that worked
remembered (:mod:`vae_core.precision.guard`). One wrapper for both hosts; each passes how its object reports and
changes its dtype."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..precision.guard import GuardState, guarded

__all__ = ["guard_methods"]


def guard_methods(owner: Any, names: Sequence[str], module: Callable[[], nn.Module], *,
                  dtype_now: Callable[[], torch.dtype], set_dtype: Callable[[torch.dtype], None],
                  device: Callable[[torch.Tensor], torch.device], remember: bool = True,
                  output: Callable[[Any], torch.Tensor] = lambda out: out, inputs_in_dtype: bool = False,
                  ) -> GuardState:
    """Replace ``owner.<name>`` for each of ``names`` by a guarded call; returns the shared :class:`GuardState`.

    Args:
        module: the host module whose weights a retry casts (``state.cast``: from the weights as loaded).
        dtype_now: the dtype the host runs in now; ``set_dtype(d)``: tell the host it runs in ``d`` after a cast.
        device: the device of a call, from its input.
        remember: start each call in the dtype that worked before (ComfyUI); else in ``dtype_now()`` (A1111 resets
            its VAE dtype itself).
        output: the tensor to check in a method's return value (A1111's encode returns a distribution).
        inputs_in_dtype: cast the input to the dtype being tried (A1111's methods do not).
    Raises (from a guarded call): NonFiniteOutputError when fp32 fails too (the input is the cause).
    """
    state = GuardState()
    for name in names:
        original = getattr(owner, name)

        def call(x: torch.Tensor, *args: Any, _orig: Callable = original, _what: str = name, **kw: Any) -> Any:
            box: dict[str, Any] = {}

            def run(dtype: torch.dtype) -> torch.Tensor:
                if dtype_now() != dtype:
                    state.cast(module(), dtype)  # from the weights as loaded, never a rounded retry's
                    set_dtype(dtype)
                box["out"] = _orig(x.to(dtype) if inputs_in_dtype else x, *args, **kw)
                return output(box["out"])

            start: Optional[torch.dtype] = state.working_dtype if remember else None
            guarded(run, start or dtype_now(), device(x), state, f"VAE {_what}",
                    lambda: f"{_what} input range [{float(x.min()):.4g}, {float(x.max()):.4g}]")
            return box["out"]

        setattr(owner, name, call)
    return state
