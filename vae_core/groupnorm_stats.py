"""Whole-image GroupNorm statistics for tiled runs: per-tile core statistics pooled exactly, and the norm applied
with given statistics.

Each tile adds the statistics of its *core* (each pixel counted once over all tiles) to a float64 Chan merge; the
tiles then normalise with the pooled whole-image statistics.
"""
from __future__ import annotations

from typing import Optional

import torch

from .model import GroupNorm

__all__ = ["StatsAccumulator", "apply_norm"]


class StatsAccumulator:
    """Chan-merged count/mean/M2 per (batch, group), in float64 on the tensor's device."""

    def __init__(self) -> None:
        self.n = 0.0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def add(self, x: torch.Tensor, groups: int) -> None:
        """Add the pixels of ``x`` ``[B, C, h, w]`` (any float dtype) to the statistics of its ``groups`` groups."""
        v = x.reshape(x.shape[0], groups, -1)
        cnt = float(v.shape[-1])
        if cnt == 0:
            return
        var, mean = torch.var_mean(v.float(), dim=-1, unbiased=False)
        mean, m2 = mean.double(), var.double() * cnt
        if self.mean is None:
            self.n, self.mean, self.m2 = cnt, mean, m2
            return
        tot = self.n + cnt
        delta = mean - self.mean
        self.mean = self.mean + delta * (cnt / tot)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * cnt / tot)
        self.n = tot

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, var)``, each float64 ``[B, groups]`` (biased variance, like GroupNorm)."""
        if self.mean is None or self.m2 is None:
            raise RuntimeError("GroupNorm statistics requested before any tile reached the norm")
        return self.mean, self.m2 / self.n


def apply_norm(m: GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm ``m`` of ``x`` ``[B, C, h, w]`` with given per-(batch, group) ``mean``/``var``: one fused
    multiply-add in ``x``'s dtype (scale and shift computed in float64)."""
    per = x.shape[1] // m.num_groups
    rstd = (var + m.eps).rsqrt()
    scale = rstd.repeat_interleave(per, dim=1)
    shift = -mean.repeat_interleave(per, dim=1) * scale
    if m.weight is not None:
        w, b = m.weight.double(), m.bias.double()
        scale, shift = scale * w, shift * w + b
    if x.dtype in (torch.float16, torch.bfloat16):  # x·scale could overflow where |mean|/std is large: centre first
        bias = (m.bias.double() if m.bias is not None else torch.zeros_like(scale[0]))
        centred = x - mean.repeat_interleave(per, dim=1).to(x.device, x.dtype)[..., None, None]
        return torch.addcmul(bias.to(x.device, x.dtype)[None, :, None, None].expand_as(scale[..., None, None]),
                             centred, scale.to(x.device, x.dtype)[..., None, None])
    scale = scale.to(x.device, x.dtype)[..., None, None]
    shift = shift.to(x.device, x.dtype)[..., None, None]
    return torch.addcmul(shift, x, scale)
