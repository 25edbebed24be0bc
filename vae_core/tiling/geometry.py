"""Tile geometry shared by both tiling engines: intervals, rects, the one tile splitter, and what the sweep engine
needs of a segment.

Intervals are half-open ``(start, end)`` index pairs on one axis; a rect is ``(rows, cols)``. Tensors are
``[B, C, H, W]``.
"""
from __future__ import annotations

import math
from typing import Optional, Protocol

import torch
from torch import nn

__all__ = ["Interval", "Rect", "Rects", "State", "Stats", "hull", "split", "SweepSegment"]

Interval = tuple[int, int]
Rect = tuple[Interval, Interval]          # (rows, cols)
State = dict[str, torch.Tensor]           # register name -> tensor
Rects = dict[str, Rect]                   # register name -> its rect
Stats = dict[nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]]  # norm -> whole-image (mean, var), [B, groups]


def hull(a: Interval, b: Interval) -> Interval:
    """The smallest interval covering ``a`` and ``b``."""
    return min(a[0], b[0]), max(a[1], b[1])


def split(size: int, core: int) -> list[Interval]:
    """Cut ``range(size)`` into ``ceil(size / core)`` (at least one) near-equal consecutive intervals, none longer
    than ``core``: the tile cores on one axis."""
    n = max(1, math.ceil(size / core))
    cuts = [round(i * size / n) for i in range(n + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(n)]


class SweepSegment(Protocol):
    """One step of a tiled stage run by the sweep engine (:mod:`vae_core.tiling.sweep`); a family implements it
    (the kl family's :class:`~vae_core.families.kl.segments.Segment`).

    Attributes:
        norm: the GroupNorm the segment starts with (the engine pools its whole-image statistics first), or None.
        channels: channels of each state register at the segment's input; ``out_channels``: of ``x`` at its output.
    """

    norm: Optional[nn.GroupNorm]
    channels: dict[str, int]
    out_channels: int

    def out_size(self, n: int) -> int:
        """Output length on one axis for an input of length ``n``."""

    def needs(self, out: Rects, n_in: tuple[int, int]) -> Rects:
        """Rects each input register must cover so the segment can produce ``out``."""

    def outputs(self) -> tuple[str, ...]:
        """Registers the segment writes."""

    def flops(self, out: Rects) -> int:
        """FLOPs of its convs for the output rects ``out`` (batch 1)."""

    def run(self, state: State, have: Rects, out: Rects, n_in: tuple[int, int], stats: Stats) -> State:
        """Run on a tile: ``state`` covers ``have``; returns the state covering ``out``."""
