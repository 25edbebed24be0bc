"""What the causal video networks (Wan, HunyuanVideo 1.5) share: the reference chunk schedule, the streamed plan
that exact tiling follows, and the one-frame image case.

A network mixes in :class:`CausalVideoNet` and gives the pieces of one chunk: ``_enc_local(x, state)`` (the encoder
down to latent resolution, local), ``_enc_moments(h, state)`` (the rest, at latent resolution, whole frames: the raw
posterior's mean and log-variance stacked on channels), ``_dec_whole(z, state)`` (the decoder's latent-resolution part) and the local chains
``encode_chain()``/``decode_chain()`` (:class:`~vae_core.tiling.halo.Local` stages ``fn(x, state)``), plus
``check_video(t, kind)`` and a config with ``downscale`` and ``temporal_scale``.

Shapes: videos ``[B, C, 1 + ft·k, H, W]`` ↔ raw latents ``[B, z, 1 + k, H/f, W/f]``; 4-D tensors are one frame.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..tiling.halo import Local, Whole
from ..tiling.stream import CausalState, Segment, decode_chunks, encode_chunks, run_chunked

__all__ = ["CausalVideoNet"]


class CausalVideoNet:
    """The reference calls and plans of a causal video network (see the module docstring)."""

    def _dec_local(self, h: torch.Tensor, state: Optional[CausalState]) -> torch.Tensor:
        for st in self.decode_chain():
            h = st.fn(h, state)
        return h

    def _enc_whole(self, h: torch.Tensor, state: Optional[CausalState]) -> torch.Tensor:
        """The latent-resolution part of the encoder → the posterior mean ``[B, z, t, h, w]``."""
        return self._enc_moments(h, state)[:, : self.config.latent_channels]

    def _enc_head(self, moments: bool):  # type: ignore[no-untyped-def]
        return self._enc_moments if moments else self._enc_whole

    def encode(self, x: torch.Tensor, moments: bool = False) -> torch.Tensor:
        """Videos ``[B, 3, 1 + ft·k, H, W]`` → raw latents ``[B, z, 1 + k, H/f, W/f]`` by the reference schedule
        (frame 0, then ``ft``-frame chunks, one causal state); images ``[B, 3, H, W]`` → ``[B, z, H/f, W/f]``.
        ``moments``: the posterior's mean and log-variance stacked on channels (``2z``) instead of the mean."""
        head = self._enc_head(moments)
        if x.dim() == 4:
            return head(self._enc_local(x.unsqueeze(2), None), None).squeeze(2)
        self.check_video(x, "encode")
        return run_chunked(lambda t, s: head(self._enc_local(t, s), s), x,
                           encode_chunks(x.shape[2], self.config.temporal_scale))

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`encode` with ``moments=True``."""
        return self.encode(x, moments=True)

    def decode(self, z: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Raw latents ``[B, z, T, h, w]`` → videos ``[B, 3, 1 + ft·(T − 1), f·h, f·w]``, one latent frame at a time
        (into ``out`` if given); ``[B, z, h, w]`` → images ``[B, 3, f·h, f·w]``."""
        if z.dim() == 4:
            return self._dec_local(self._dec_whole(z.unsqueeze(2), None), None).squeeze(2)
        self.check_video(z, "decode")
        return run_chunked(lambda t, s: self._dec_local(self._dec_whole(t, s), s), z,
                           decode_chunks(z.shape[2], self.config.temporal_scale), out)

    def plan_decode_chain(self) -> list[Local]:
        """The decoder chain the streamed plans tile (default: :meth:`decode_chain`; a network may split stages
        finer for them)."""
        return self.decode_chain()

    def video_plan(self, kind: str, frames: int, moments: bool = False) -> list[Segment]:
        """The streamed plan of a video call: local chains tiled, the latent-resolution part whole (``moments``: an
        encode ends on the posterior's mean and log-variance)."""
        f, ft = self.config.downscale, self.config.temporal_scale
        if kind == "encode":
            per_latent = [(i, i + 1, i, i + 1) for i in range(1 + (frames - 1) // ft)]
            return [Segment(self.encode_chain(), encode_chunks(frames, ft), 1),
                    Segment(Whole(self._enc_head(moments)), per_latent, f)]
        per_latent = [(i, i + 1, i, i + 1) for i in range(frames)]
        return [Segment(Whole(self._dec_whole), per_latent, f),
                Segment(self.plan_decode_chain(), decode_chunks(frames, ft), f)]

    # the image case (run by vae_core.tiling.halo: 4-D stages, no state)
    @staticmethod
    def _image(stage: Union[Local, Whole]) -> Union[Local, Whole]:
        def fn(t: torch.Tensor, g=stage.fn) -> torch.Tensor:
            return g(t.unsqueeze(2), None).squeeze(2)
        if isinstance(stage, Whole):
            return Whole(fn, stage.up, stage.down)
        return Local(fn, stage.radius, stage.up, stage.down, stage.blocks)

    def encode_stages(self, moments: bool = False) -> list[Union[Local, Whole]]:
        return [self._image(s) for s in (*self.encode_chain(), Whole(self._enc_head(moments)))]

    def decode_stages(self) -> list[Union[Local, Whole]]:
        return [self._image(s) for s in (Whole(self._dec_whole), *self.decode_chain())]
