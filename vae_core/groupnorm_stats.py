"""Whole-image GroupNorm statistics for tiled runs: pooled per-tile core statistics and a norm hook.

The tiling engine sets :class:`NormHook` as :data:`vae_core.model.NORM_HOOK`; each :class:`~vae_core.model.GroupNorm`
then (a) adds the statistics of the tile's *core* (each pixel counted once over all tiles) to a float64 Chan merge,
and (b) normalises with frozen whole-image statistics, or with the tensor's own when none are given (proxy runs).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .model import GroupNorm

__all__ = ["StatsAccumulator", "Stats", "apply_norm", "StopForward", "NormHook"]



class StatsAccumulator:
    """Chan-merged count/mean/M2 per (batch, group), in float64 on the tensor's device."""

    def __init__(self) -> None:
        self.n = 0.0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def add(self, x: torch.Tensor, groups: int) -> None:
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
        if self.mean is None or self.m2 is None:
            raise RuntimeError("GroupNorm statistics requested before any tile reached the norm")
        return self.mean, self.m2 / self.n


Stats = dict[GroupNorm, tuple[torch.Tensor, torch.Tensor]]


def apply_norm(m: GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm of ``x`` with given per-(batch, group) ``mean``/``var``: one fused multiply-add."""
    per = x.shape[1] // m.num_groups
    rstd = (var + m.eps).rsqrt()
    scale = rstd.repeat_interleave(per, dim=1)
    shift = -mean.repeat_interleave(per, dim=1) * scale
    if m.weight is not None:
        w, b = m.weight.double(), m.bias.double()
        scale, shift = scale * w, shift * w + b
    scale = scale.to(x.device, x.dtype)[..., None, None]
    shift = shift.to(x.device, x.dtype)[..., None, None]
    return torch.addcmul(shift, x, scale)


class StopForward(Exception):
    """Ends a tile's forward once the GroupNorm whose statistics are being gathered has been reached."""


class NormHook:
    """Norm hook: normalise with ``frozen`` stats (or the tensor's own when None) and pool the core's statistics.

    With ``stop_at`` set, only that norm's core statistics are pooled and the forward ends there (raises StopForward).
    """

    def __init__(self, frozen: Optional[Stats], stop_at: Optional[GroupNorm] = None) -> None:
        self.frozen = frozen
        self.stop_at = stop_at
        self.acc: dict[GroupNorm, StatsAccumulator] = {}
        self.order: list[GroupNorm] = []
        self.stage_of: dict[GroupNorm, int] = {}
        self.stage = 0
        self.core: tuple[slice, slice] = (slice(None), slice(None))

    def __call__(self, m: GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if self.stop_at is None or m is self.stop_at:
            if m not in self.acc:
                self.acc[m] = StatsAccumulator()
                self.order.append(m)
                self.stage_of[m] = self.stage
            self.acc[m].add(x[..., self.core[0], self.core[1]], m.num_groups)
            if m is self.stop_at:
                raise StopForward
        if self.frozen is None:
            return F.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)
        mean, var = self.frozen[m]
        return apply_norm(m, x, mean.to(x.device), var.to(x.device))

    def stats(self) -> Stats:
        return {m: a.result() for m, a in self.acc.items()}
