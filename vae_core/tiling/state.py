"""The causal state of a streamed video run, shared by the two streaming engines (:mod:`vae_core.tiling.stream`
for causal chains, :mod:`vae_core.tiling.lagged` for chains whose layers lag), and the chunk ranges they take."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["CausalState", "Chunk", "is_first"]

#: ``(in_start, in_end, out_start, out_end)``: a chunk's input and output frame ranges.
Chunk = tuple[int, int, int, int]


class CausalState:
    """The causal state of one streamed run (one spatial tile, or one whole-frame pass): per module, the input frames
    its next chunk needs (``cache``), and the index of the chunk being run (``chunk``; 0 is the reference's first
    chunk, which the Wan temporal resamplers treat specially). ``None`` in place of a state means "a single first
    frame with nothing before it" (the image case)."""

    def __init__(self) -> None:
        self.cache: dict[object, torch.Tensor] = {}
        self.chunk = 0
        #: lagged chains (:mod:`vae_core.tiling.lagged`): every input frame has arrived (pad the clip's end), and the
        #: origin (row, col) of the stage's input window in the whole frame
        self.final = False
        self.window = (0, 0)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.values())


def is_first(state: Optional[CausalState]) -> bool:
    """Whether the chunk being run is the reference's first (always, for the image case ``state=None``)."""
    return state is None or state.chunk == 0
