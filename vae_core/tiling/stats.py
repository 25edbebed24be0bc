"""Whole-image GroupNorm statistics for tiled runs: per-tile core statistics pooled exactly, and the norm applied
with given statistics.

Each tile adds the statistics of its *core* (each pixel counted once over all tiles) to a Chan merge; the tiles then
normalise with the pooled whole-image statistics. The merge runs in float64 where the device has it; on devices
without float64 (Apple's MPS, DirectML: :func:`vae_core.devices.has_float64`) it runs in float32 on the device with
Kahan-compensated updates of the mean and M2 sums, which keeps the pooled statistics within float32 rounding of the
float64 ones (every term of the M2 sum is ≥ 0, so nothing cancels).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..devices import has_float64
from torch import nn

__all__ = ["StatsAccumulator", "apply_norm", "stats_dtype"]


def stats_dtype(device: torch.device) -> torch.dtype:
    """The dtype statistics are pooled and applied in on ``device``: float64 where it exists, else float32."""
    return torch.float64 if has_float64(device) else torch.float32


class StatsAccumulator:
    """Chan-merged count/mean/M2 per (batch, group) on the tensor's device, in :func:`stats_dtype`; compensated
    (Kahan) sums where that is float32."""

    def __init__(self) -> None:
        self.n = 0.0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None
        self._err: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # Kahan compensation (float32 only)

    def add(self, x: torch.Tensor, groups: int) -> None:
        """Add the pixels of ``x`` ``[B, C, h, w]`` or ``[B, C, t, h, w]`` (any float dtype; float64 kept, the others
        reduced in float32) to the statistics of its ``groups`` groups."""
        v = x.reshape(x.shape[0], groups, -1)
        cnt = float(v.shape[-1])
        if cnt == 0:
            return
        var, mean = torch.var_mean(v if v.dtype == torch.float64 else v.float(), dim=-1, unbiased=False)
        dtype = stats_dtype(x.device)
        mean, m2 = mean.to(dtype), var.to(dtype) * cnt
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = cnt, mean, m2
            if dtype != torch.float64:
                self._err = (torch.zeros_like(mean), torch.zeros_like(m2))
            return
        tot = self.n + cnt
        if self._err is None:
            delta = mean - self.mean
            self.mean = self.mean + delta * (cnt / tot)
            self.m2 = self.m2 + m2 + delta.square() * (self.n * cnt / tot)
        else:
            err_mean, err_m2 = self._err
            delta = (mean - self.mean) - err_mean  # against the compensated mean
            self.mean, err_mean = _kahan(self.mean, err_mean, delta * (cnt / tot))
            self.m2, err_m2 = _kahan(self.m2, err_m2, m2 + delta.square() * (self.n * cnt / tot))
            self._err = (err_mean, err_m2)
        self.n = tot

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, var)``, each ``[B, groups]`` in :func:`stats_dtype` (biased variance, like GroupNorm)."""
        if self.mean is None or self.m2 is None:
            raise RuntimeError("GroupNorm statistics requested before any tile reached the norm")
        if self._err is None:
            return self.mean, self.m2 / self.n
        return self.mean + self._err[0], (self.m2 + self._err[1]) / self.n


def _kahan(total: torch.Tensor, err: torch.Tensor, inc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One compensated addition: ``total + err`` tracks the exact sum, ``err`` holds what float32 rounding lost."""
    y = inc + err
    t = total + y
    return t, y - (t - total)


def apply_norm(m: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm ``m`` of ``x`` ``[B, C, h, w]`` (or ``[B, C, t, h, w]``) with given per-(batch, group) ``mean``/``var``: one fused
    multiply-add (scale and shift computed in the statistics' dtype, float64 where the device has it).

    In fp32 the multiply-add runs in place of a copy of ``x``'s dtype. In fp16/bf16 it runs in float32 and the result
    is rounded to ``x``'s dtype once, as PyTorch's own GroupNorm does for half-precision inputs: the tiled output then
    carries the same single rounding as the untiled one (in bf16, computing ``x − mean`` and ``· scale`` in bf16
    itself added two more roundings and ~1.3× the untiled error).
    """
    per = x.shape[1] // m.num_groups
    dtype = mean.dtype
    rstd = (var + m.eps).rsqrt()
    scale = rstd.repeat_interleave(per, dim=1)
    shift = -mean.repeat_interleave(per, dim=1) * scale
    if m.weight is not None:
        w, b = m.weight.to(dtype), m.bias.to(dtype)
        scale, shift = scale * w, shift * w + b
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    spread = (...,) + (None,) * (x.dim() - 2)  # [B, C] over the pixel (and frame) axes
    scale = scale.to(x.device, work)[spread]
    shift = shift.to(x.device, work)[spread]
    if work == x.dtype:
        return torch.addcmul(shift, x, scale)
    return torch.addcmul(shift, x.to(work), scale).to(x.dtype)
