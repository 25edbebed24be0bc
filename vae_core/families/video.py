"""What the causal video families (Wan, HunyuanVideo 1.5) share: exact streamed tiling of videos over the plan
their network lists (:mod:`vae_core.tiling.stream`), the choice between its two schedules, and the working-set
estimate; images (4-D) by halos (:mod:`vae_core.tiling.halo`).

A network of such a family gives ``video_plan(kind, frames)`` (:class:`~vae_core.tiling.stream.Segment` s),
``check_video(t, kind)``, ``encode_stages()``/``decode_stages()`` (the one-frame image case) and a config with
``downscale``, ``temporal_scale``, ``latent_channels`` and ``in_channels``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .base import HaloFamily
from ..tiling.cache import resolve_budget
from ..tiling.halo import halo_tiled
from ..tiling.memory import free_memory
from ..tiling.stream import estimate_working_set, run_segments

__all__ = ["VideoFamily", "PerChannelLatents", "meta_input"]


def meta_input(cfg: Any, kind: str, frames: int, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """The ``meta`` input of a ``kind`` call (batch 1) on ``frames`` pixel frames of ``height``×``width`` px, for a
    network config with ``downscale``, ``temporal_scale``, ``latent_channels`` and ``in_channels``: what a
    working-set estimate dry-runs."""
    f, ft = cfg.downscale, cfg.temporal_scale
    shape = ((1, cfg.latent_channels, 1 + (frames - 1) // ft, height // f, width // f) if kind == "decode"
             else (1, cfg.in_channels, frames, height, width))
    return torch.empty(shape, device="meta", dtype=dtype)


class VideoFamily(HaloFamily):
    """A family whose networks take videos ``[B, C, T, H, W]`` (causal in time, local in space but for whole-frame
    stages at latent resolution) as well as images."""

    video = True
    #: the schedules of its exact tiling (``schedule=``), and what its untiled call is (for the bench's table)
    video_schedules: tuple[str, ...] = ("level", "tile")
    video_reference = "streamed reference"

    def check_video(self, model: nn.Module, t: torch.Tensor, kind: str) -> None:
        model.check_video(t, kind)

    def video_working_set(self, model: nn.Module, kind: str, frames: int, height: int, width: int,
                          tile: Optional[int], dtype: torch.dtype = torch.float32,
                          schedule: str = "tile") -> dict[str, int]:
        """Estimated peak bytes of a video call (see :func:`vae_core.tiling.stream.estimate_working_set`): ``frames``
        pixel frames (``1 + ft·k``) of ``height``×``width`` px, ``tile`` px (None: untiled, streamed), ``schedule``
        ``"tile"`` or ``"level"``, by a dry run on a ``meta`` twin of ``model`` (no memory, no data)."""
        with torch.device("meta"):
            twin = self.build(model.config).to(dtype)
        x = meta_input(model.config, kind, frames, height, width, dtype)
        with torch.no_grad():
            return estimate_working_set(self.video_plan_for(twin, kind, x, False), x, tile, dtype, schedule)

    def video_plan_for(self, model: nn.Module, kind: str, t: torch.Tensor, moments: bool) -> list:
        """The streamed plan of a call on ``t`` (a family whose plans need more than the frame count overrides; LTX's
        decode plan runs on the latents its ``decode_context`` gives, noise mixed in)."""
        return model.video_plan(kind, t.shape[2], moments) if moments else model.video_plan(kind, t.shape[2])

    def video_schedule(self, model: nn.Module, kind: str, t: torch.Tensor, tile: Optional[int],
                       cache_bytes: object) -> str:
        """``"level"`` (level-major: halos over one stage, about the untiled cost; every tile's causal state and a
        chunk's whole-frame activations stay alive) where its working set fits, else ``"tile"`` (tile-major: least
        memory). Fits: with ``cache_bytes`` ``"auto"``/None, the whole estimate within half the free memory of
        ``t``'s device (as an automatic tile is chosen); with an int, the states and activations within it (0:
        always tile-major)."""
        if tile is None:
            return "tile"
        budget = 0
        if cache_bytes is not None and cache_bytes != "auto":
            budget = resolve_budget(cache_bytes, t.device)[0]  # validated; states stay on the compute device
            if budget <= 0:
                return "tile"
        f, ft = model.config.downscale, model.config.temporal_scale
        frames, h, w = t.shape[2], t.shape[3], t.shape[4]
        if kind == "decode":
            frames, h, w = 1 + ft * (frames - 1), h * f, w * f
        need = self.video_working_set(model, kind, frames, h, w, tile, t.dtype, "level")
        if cache_bytes is None or cache_bytes == "auto":
            return "level" if need["total"] <= free_memory(t.device) // 2 else "tile"
        return "level" if need["state"] + need["activations"] <= budget else "tile"

    def tiled(self, kind: str):
        """Images (4-D) by halos; videos (5-D) by the streamed plan of the network's ``video_plan``."""
        def run(model: nn.Module, t: torch.Tensor, tile: int, opts: Any) -> torch.Tensor:
            moments = kind == "encode" and opts.moments
            if t.dim() == 5:
                model.check_video(t, kind)
                schedule = (opts.schedule if opts.schedule != "auto"
                            else self.video_schedule(model, kind, t, tile, opts.cache_bytes))
                return run_segments(self.video_plan_for(model, kind, t, moments), t, tile, opts, schedule=schedule)
            if kind == "decode":
                return halo_tiled(model.decode_stages(), t, tile, model.config.downscale, opts)
            return halo_tiled(model.encode_stages(moments), t, tile, 1, opts)
        return run


class PerChannelLatents:
    """A family mixin: the diffusion model's latents are the network's per-channel normalised ones
    (``model.normalize``/``denormalize``: Wan's statistics, LTX-Video's)."""

    def scale_latents(self, model: nn.Module, fmt: Any, z: torch.Tensor) -> torch.Tensor:
        return model.normalize(z)

    def unscale_latents(self, model: nn.Module, fmt: Any, z: torch.Tensor) -> torch.Tensor:
        return model.denormalize(z)
