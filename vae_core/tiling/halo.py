"""Exact tiling for networks whose high-resolution parts are *local*: no GroupNorm (TAESD) or a norm over channels
only (RMS norm, the Wan design of Qwen-Image's VAE), so every output pixel depends on a bounded input neighbourhood.

A network describes its encode or decode as a list of stages (:class:`Local` or :class:`Whole`). Consecutive
:class:`Local` stages form a *chain* that a tile runs end to end: the tile's core in the chain's output is mapped
backwards through each stage to the input window it needs (``radius`` input pixels of halo per stage, windows aligned
to the stage's stride), the window runs through the chain, and only the core is kept. Interior window edges are
zero-padded by the convs, but the halo keeps every kept pixel clear of them, and at the image border the window's
padding is the image's own, so a tiled chain equals the untiled one to float rounding whenever each ``radius`` bounds
its stage's receptive field. :class:`Whole` stages (attention over the whole latent) run untiled, on the assembled
low-resolution output of the chain before them. Memory is one tile's window activations plus the assembled outputs.

Shapes: tensors are ``[B, C, H, W]``; ``up``/``down`` give a stage's resolution change (output px per input px, or
input px per output px); intervals are half-open ``(start, end)`` per axis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ..errors import Cancelled, VaeInputError
from .geometry import Interval, split
from .options import TileOptions

__all__ = ["Local", "Whole", "Stage", "run_stages", "chain_radius", "halo_tiled", "stage_sizes", "windows"]


@dataclass(frozen=True)
class Local:
    """A translation-equivariant stage with a bounded receptive field.

    Attributes:
        fn: ``[B, C, h, w]`` → ``[B, C', h·up/down, w·up/down]`` (a window of the stage's input).
        radius: receptive radius in input pixels: output pixel ``p`` reads input pixels within ``radius`` of
            ``p·down/up`` (for a stride, of the ``down``-wide block ``[p·down, p·down + down)``).
        up, down: nearest/transposed upsampling factor, or stride product (one of them is 1).
        blocks: the stage reshapes whole ``down``×``down`` blocks (space-to-depth, e.g. a 2×2 patchify or average
            pool): windows end on block boundaries too.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    radius: int
    up: int = 1
    down: int = 1
    blocks: bool = False

    def needs(self, out: Interval, n_in: int) -> Interval:
        """Input interval (aligned to ``down``; both ends if ``blocks``) that output interval ``out`` depends on,
        clipped to the input."""
        if self.up > 1:
            lo, hi = out[0] // self.up - self.radius, -(-out[1] // self.up) + self.radius
        else:
            lo, hi = out[0] * self.down - self.radius, out[1] * self.down + self.radius
            lo -= lo % self.down
            if self.blocks:  # space-to-depth stages read whole stride blocks
                hi += (-hi) % self.down
        return max(0, lo), min(n_in, hi)

    def out_start(self, in_start: int) -> int:
        """Output index of the first output pixel of a window that starts at input index ``in_start``."""
        return in_start * self.up // self.down


@dataclass(frozen=True)
class Whole:
    """A stage that needs its whole input at once (e.g. attention over the latent); ``up``/``down`` as in Local."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    up: int = 1
    down: int = 1


Stage = Union[Local, Whole]


def chain_radius(chain: list[Local]) -> int:
    """Receptive radius of a chain in its *output* pixels (upper bound), for reports and tests."""
    scale, total = 1.0, 0.0
    for st in reversed(chain):  # output-side first: a radius at a stage's input, in final output px
        scale = scale * st.down / st.up if st.up == 1 else scale / st.up
        total += st.radius / scale if scale else 0
    return int(total + 0.999)


def stage_sizes(chain: list[Local], h: int, w: int) -> list[tuple[int, int]]:
    sizes = [(h, w)]
    for st in chain:
        h, w = h * st.up // st.down, w * st.up // st.down
        sizes.append((h, w))
    return sizes


def windows(chain: list[Local], sizes: list[tuple[int, int]], r: Interval, c: Interval
            ) -> list[tuple[Interval, Interval]]:
    """The (rows, cols) each stage's input needs, and the chain's output core ``(r, c)`` last (``sizes``: each
    stage's input size and the output's, from :func:`stage_sizes`)."""
    needs = [(r, c)]
    for st, (ih, iw) in zip(reversed(chain), reversed(sizes[:-1])):
        rr, cc = needs[0]
        needs.insert(0, (st.needs(rr, ih), st.needs(cc, iw)))
    return needs


def _run_chain(chain: list[Local], x: torch.Tensor, core_px: int, progress: Optional[Callable[[int, int], None]],
               cancel: Optional[Callable[[], object]], counts: list[int]) -> torch.Tensor:
    sizes = stage_sizes(chain, x.shape[2], x.shape[3])
    oh, ow = sizes[-1]
    for st, (ih, iw) in zip(chain, sizes):
        if st.down > 1 and (ih % st.down or iw % st.down):
            raise VaeInputError(f"tiled input of {ih}×{iw} px at a stride-{st.down} stage; expected sides that are "
                                f"multiples of {st.down}")
    rows, cols = split(oh, core_px), split(ow, core_px)
    out: Optional[torch.Tensor] = None
    total, done = len(rows) * len(cols), 0
    for r in rows:
        for c in cols:
            if cancel is not None and cancel():

                raise Cancelled("tiled VAE call cancelled between tiles")
            needs = windows(chain, sizes, r, c)
            (r0, r1), (c0, c1) = needs[0]
            t = x[:, :, r0:r1, c0:c1]
            for i, st in enumerate(chain):
                t = st.fn(t)
                start = (st.out_start(r0), st.out_start(c0))
                (r0, r1), (c0, c1) = needs[i + 1]
                t = t[:, :, r0 - start[0]:r1 - start[0], c0 - start[1]:c1 - start[1]]
            if out is None:
                out = t.new_empty((x.shape[0], t.shape[1], oh, ow))
            out[:, :, r[0]:r[1], c[0]:c[1]] = t
            done += 1
            counts[0] += 1
            if progress is not None:
                progress(done, total)
    assert out is not None
    return out


def run_stages(stages: list[Stage], x: torch.Tensor, tile: int, image_scale: float,
               progress: Optional[Callable[[int, int], None]] = None,
               cancel: Optional[Callable[[], object]] = None) -> tuple[torch.Tensor, int]:
    """Run ``stages`` on ``x`` with local chains tiled and whole stages untiled.

    Args:
        tile: tile edge in *image* pixels; a chain's core is ``tile`` scaled to its output resolution (≥ 8 px).
        image_scale: image pixels per pixel of ``x`` (8 for a decoder's latent input, 1 for an encoder's image).
    Returns:
        ``(output, tiles_run)``.
    """
    counts = [0]
    scale = float(image_scale)
    chain: list[Local] = []

    def flush(t: torch.Tensor) -> torch.Tensor:
        nonlocal chain, scale
        if not chain:
            return t
        out_scale = scale
        for st in chain:
            out_scale = out_scale * st.down / st.up
        t = _run_chain(chain, t, max(8, int(tile / out_scale)), progress, cancel, counts)
        scale, chain = out_scale, []
        return t

    for st in stages:
        if isinstance(st, Local):
            chain.append(st)
            continue
        x = flush(x)
        x = st.fn(x)
        scale = scale * st.down / st.up
    return flush(x), counts[0]


def halo_tiled(stages: list[Stage], x: torch.Tensor, tile: int, image_scale: float, opts: TileOptions
               ) -> torch.Tensor:
    """A family's tiled call by halos: :func:`run_stages` with ``opts``' progress and cancel hooks, the report
    filled in (schedule ``"halo"``, one sweep: halos make it exact in either mode)."""
    out, tiles = run_stages(stages, x, tile, image_scale, opts.progress, opts.cancel)
    if opts.report is not None:
        opts.report.schedule, opts.report.tiles, opts.report.sweeps = "halo", tiles, 1
    return out
