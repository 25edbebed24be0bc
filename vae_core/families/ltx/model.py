"""The LTX-Video VAE (0.9.0 to 0.9.8) on videos and images, host-free.

Parameter names are the original layout (Lightricks' files, as ComfyUI ships them): ``encoder.conv_in.conv``,
``encoder.down_blocks.<i>`` (a run of residual blocks ``res_blocks.<j>``, a stride-2 conv ``conv``, a
channel-changing residual block, or a space/time-to-depth downsampler ``conv.conv``), ``encoder.conv_out.conv``; the
decoder likewise with ``up_blocks.<i>`` (runs of residual blocks, optionally timestep-conditioned and noise-injecting;
depth-to-space upsamplers ``conv.conv``), ``decoder.timestep_scale_multiplier``, ``decoder.last_time_embedder``,
``decoder.last_scale_shift_table``; ``per_channel_statistics.mean-of-means``/``std-of-means`` (the latent
normalisation). The block sequence is read from the shapes (:mod:`.convert`).

Shapes: videos ``[B, 3, F, H, W]`` in [-1, 1] with ``F = 1 + 8k`` and ``H, W`` multiples of 32; raw latents
``[B, 128, 1 + k, H/32, W/32]`` (the posterior mean, before normalisation); decoded videos are not clamped. 4-D
tensors are one frame.

The reference (diffusers ``AutoencoderKLLTXVideo`` with tiling off) runs the whole clip at once; its encoder is causal
in time, its decoder is not (each conv sees the next frame too, the clip's last frame replicated at the end). Both
run here streamed chunk by chunk with bounded memory, exactly (:mod:`vae_core.tiling.lagged`): the encoder on frame 0
then 8-frame chunks, the decoder one latent frame at a time, its layers lagging as far as the reference's reach into
the future. A timestep-conditioned decoder (0.9.1+) takes the decode timestep (ComfyUI's 0.05) and mixes noise into
the latents (0.025) and, where the weights inject it, into its blocks: all drawn for the whole output from a seeded
generator before the first tile and sliced per tile, so a tiled decode equals the untiled one for a seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import VaeInputError
from ...tiling.halo import Local
from ...tiling.options import TileOptions
from ...tiling.stream import Segment, encode_chunks, run_segments
from .blocks import DecodeContext, DepthToSpace, ResBlock, ResGroup, SpaceToDepth, TimeConv, TimestepEmbedder, \
    pixel_norm

__all__ = ["LTXBlock", "LTXConfig", "LTXVAE", "STAT_KEYS"]

#: the latent normalisation's buffers (``per_channel_statistics.<name>``)
STAT_KEYS = ("mean-of-means", "std-of-means")


@dataclass(frozen=True)
class LTXBlock:
    """One block of the sequence: ``kind`` ``"res"`` (``layers`` residual blocks of width ``cin``; ``noise``:
    noise-injecting), ``"res_xy"`` (one residual block ``cin`` → ``cout``), ``"conv"`` (the encoder's stride-2 conv),
    ``"s2d"`` (the encoder's space/time-to-depth downsampler by ``stride``, ``cin`` → ``cout``) or ``"d2s"`` (the
    decoder's depth-to-space upsampler by ``stride``; ``residual`` shortcut; channels ÷ ``reduction``)."""

    kind: str
    cin: int
    cout: int
    layers: int = 1
    stride: tuple[int, int, int] = (1, 1, 1)
    noise: bool = False
    residual: bool = False
    reduction: int = 1


@dataclass(frozen=True)
class LTXConfig:
    """Shape of an LTX-Video VAE: the encoder's and decoder's block sequences, the patch size (4: 4×4 pixels packed
    into channels at both ends), latent channels, the posterior's log-variance (``"uniform"``: one channel shared by
    all; ``"per_channel"``), whether the decoder is timestep-conditioned, causal, how each side pads in space (the
    decoder: ``"reflect"`` in Lightricks' files, ``"zeros"`` in diffusers'; the encoder: zeros), and the decode
    timestep and noise scale (ComfyUI's defaults)."""

    encoder: tuple[LTXBlock, ...]
    decoder: tuple[LTXBlock, ...]
    patch: int = 4
    z_dim: int = 128
    in_channels: int = 3
    out_channels: int = 3
    log_var: str = "uniform"
    conditioned: bool = False
    decoder_causal: bool = False
    decoder_padding: str = "reflect"
    encoder_padding: str = "zeros"
    decode_timestep: float = 0.05
    decode_noise_scale: float = 0.025

    @property
    def downscale(self) -> int:
        return self.patch * 2 ** sum(b.stride[1] == 2 for b in self.encoder)

    @property
    def temporal_scale(self) -> int:
        return 2 ** sum(b.stride[0] == 2 for b in self.encoder)

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    def _widths(self, blocks: tuple[LTXBlock, ...], ends: int, top: bool) -> list[int]:
        """The widest tensor's channels at each resolution level (0: full resolution) along ``blocks``: the image's
        own ``ends`` channels where no block runs (the patchified levels), the blocks' widths from ``log2(patch)``
        on (``top``: the blocks run from the latent level up, as the decoder's do)."""
        n = self.downscale.bit_length() - 1
        out = [ends] * (n + 1)
        level = n if top else self.patch.bit_length() - 1
        for b in blocks:  # a resampling block takes cin at its level and gives cout at the next
            out[level] = max(out[level], b.cin)
            if b.stride[1] == 2:
                level += -1 if top else 1
            out[level] = max(out[level], b.cout)
        return out

    @property
    def encoder_widths(self) -> list[int]:  # for the image memory estimate (tile="auto", the OOM fallback)
        return self._widths(self.encoder, self.in_channels, top=False)

    @property
    def decoder_widths(self) -> list[int]:
        return self._widths(self.decoder, self.out_channels, top=True)


def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, T, p·h, p·w]`` → ``[B, C·p·p, T, h, w]`` (channel order: channel, column offset, row offset)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def _unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of :func:`_patchify`."""
    b, pc, t, h, w = x.shape
    x = x.reshape(b, pc // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, pc // (p * p), t, h * p, w * p)


def _block(spec: LTXBlock, causal: bool, padding: str, conditioned: bool) -> nn.Module:
    if spec.kind == "res":
        return ResGroup(spec.cin, spec.layers, causal, padding, spec.noise, conditioned)
    if spec.kind == "res_xy":
        return ResBlock(spec.cin, spec.cout, causal, padding, spec.noise)
    if spec.kind == "conv":
        return TimeConv(spec.cin, spec.cout, stride=(2, 2, 2), causal=causal, padding_mode=padding)
    if spec.kind == "s2d":
        return SpaceToDepth(spec.cin, spec.cout, spec.stride, causal, padding)
    if spec.kind == "d2s":
        return DepthToSpace(spec.cin, spec.stride, spec.residual, spec.reduction, causal, padding)
    raise VaeInputError(f"LTX block kind {spec.kind!r}: expected res, res_xy, conv, s2d or d2s")


class LTXVAE(nn.Module):
    """The LTX-Video VAE (see the module docstring)."""

    def __init__(self, cfg: LTXConfig) -> None:
        super().__init__()
        self.config = cfg
        p2 = cfg.patch ** 2
        enc = nn.Module()
        enc.conv_in = TimeConv(cfg.in_channels * p2, cfg.encoder[0].cin, padding_mode=cfg.encoder_padding)
        enc.down_blocks = nn.ModuleList(_block(b, True, cfg.encoder_padding, False) for b in cfg.encoder)
        last = cfg.encoder[-1].cout
        enc.conv_out = TimeConv(last, cfg.z_dim + 1 if cfg.log_var == "uniform" else 2 * cfg.z_dim,
                                padding_mode=cfg.encoder_padding)
        self.encoder = enc
        dec, causal, pad = nn.Module(), cfg.decoder_causal, cfg.decoder_padding
        dec.conv_in = TimeConv(cfg.z_dim, cfg.decoder[0].cin, causal=causal, padding_mode=pad)
        dec.up_blocks = nn.ModuleList(_block(b, causal, pad, cfg.conditioned) for b in cfg.decoder)
        last = cfg.decoder[-1].cout
        dec.conv_out = TimeConv(last, cfg.out_channels * p2, causal=causal, padding_mode=pad)
        if cfg.conditioned:
            dec.timestep_scale_multiplier = nn.Parameter(torch.tensor(1000.0))
            dec.last_time_embedder = TimestepEmbedder(2 * last)
            dec.last_scale_shift_table = nn.Parameter(torch.zeros(2, last))
        self.decoder = dec
        self.per_channel_statistics = nn.Module()
        self.per_channel_statistics.register_buffer(STAT_KEYS[0], torch.zeros(cfg.z_dim))
        self.per_channel_statistics.register_buffer(STAT_KEYS[1], torch.ones(cfg.z_dim))

    # -- latent normalisation ----------------------------------------------------------------------------------
    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1) + (1,) * (z.dim() - 2)
        s = self.per_channel_statistics
        return (s.get_buffer(STAT_KEYS[0]).view(shape).to(z), s.get_buffer(STAT_KEYS[1]).view(shape).to(z))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (4-D or 5-D) → the diffusion model's: ``(z − mean) / std`` per channel."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return z * std + mean

    # -- checks ------------------------------------------------------------------------------------------------
    def check_video(self, t: torch.Tensor, kind: str) -> None:
        """Refuse what the reference cannot run: an encode of other than ``1 + 8k`` frames, or of sides that are
        not multiples of 32 (the downsamplers pack exact blocks)."""
        ft, f = self.config.temporal_scale, self.config.downscale
        if kind == "encode" and t.dim() == 5 and (t.shape[2] - 1) % ft:
            raise VaeInputError(f"encode input: {t.shape[2]} frames; expected 1 + {ft}k frames "
                                f"(1, {1 + ft}, {1 + 2 * ft}, ...)")
        if kind == "encode" and (t.shape[-2] % f or t.shape[-1] % f):
            raise VaeInputError(f"encode input of {t.shape[-1]}x{t.shape[-2]} px; expected sides that are multiples "
                                f"of {f} for an LTX-Video VAE (crop or resize first)")

    # -- the chains ----------------------------------------------------------------------------------------------
    def _stages(self, blocks: nn.ModuleList, ctx: Optional[DecodeContext]) -> list[Local]:
        out: list[Local] = []
        for spec, m in zip(self.config.encoder if blocks is self.encoder.down_blocks else self.config.decoder,
                           blocks):
            if spec.kind == "res":
                out += [Local(partial(rb, ctx=ctx), radius=2) for rb in m.res_blocks]
            elif spec.kind == "res_xy":
                out.append(Local(partial(m, ctx=ctx), radius=2))
            elif spec.kind == "conv":
                out.append(Local(m, radius=1, down=2))
            elif spec.kind == "s2d":
                out.append(Local(m, radius=1, down=spec.stride[1], blocks=spec.stride[1] > 1))
            else:
                out.append(Local(m, radius=1, up=spec.stride[1]))
        return out

    def _enc_in(self, x: torch.Tensor, state) -> torch.Tensor:  # noqa: ANN001
        return self.encoder.conv_in(_patchify(x, self.config.patch), state)

    def _enc_head(self, h: torch.Tensor, state, moments: bool = False) -> torch.Tensor:  # noqa: ANN001
        h = self.encoder.conv_out(F.silu(pixel_norm(h)), state)
        z = self.config.z_dim
        if not moments:
            return h[:, :z]
        if self.config.log_var == "uniform":
            return torch.cat([h[:, :z], h[:, z:z + 1].expand(-1, z, -1, -1, -1)], 1)
        return h

    def encode_chain(self, moments: bool = False) -> list[Local]:
        """The encoder as local stages ``fn(x, state)``: patchify + input conv, the blocks, the head (mean, or
        ``moments``: mean and log-variance stacked on channels)."""
        p = self.config.patch
        return [Local(self._enc_in, radius=p, down=p, blocks=True), *self._stages(self.encoder.down_blocks, None),
                Local(partial(self._enc_head, moments=moments), radius=1)]

    def _dec_head(self, h: torch.Tensor, state, ctx: Optional[DecodeContext] = None) -> torch.Tensor:  # noqa: ANN001
        h = pixel_norm(h)
        if self.config.conditioned:
            if ctx is None or self.decoder not in ctx.ada:
                raise RuntimeError("a timestep-conditioned LTX decoder run without its timestep (use LTXVAE.decode)")
            ada = ctx.ada[self.decoder]
            h = h * (1 + ada[:, 1]) + ada[:, 0]
        return _unpatchify(self.decoder.conv_out(F.silu(h), state), self.config.patch)

    def decode_chain(self, ctx: Optional[DecodeContext] = None) -> list[Local]:
        """The decoder as local stages ``fn(z, state)`` (``ctx``: the call's timestep values and noise maps)."""
        return [Local(self.decoder.conv_in, radius=1), *self._stages(self.decoder.up_blocks, ctx),
                Local(partial(self._dec_head, ctx=ctx), radius=1, up=self.config.patch)]

    def video_plan(self, kind: str, frames: int, moments: bool = False,
                   ctx: Optional[DecodeContext] = None) -> list[Segment]:
        """The streamed plan: one lagged chain (encode: frame 0, then ``8``-frame chunks; decode: one latent frame
        at a time)."""
        f, ft = self.config.downscale, self.config.temporal_scale
        if kind == "encode":
            chunks = encode_chunks(frames, ft)
            return [Segment(self.encode_chain(moments), chunks, 1, lagged=True)]
        out = 1 + ft * (frames - 1)
        chunks = [(i, i + 1, 0, out if i == frames - 1 else 0) for i in range(frames)]
        return [Segment(self.decode_chain(ctx), chunks, f, lagged=True)]

    # -- decode inputs -------------------------------------------------------------------------------------------
    def decode_context(self, z: torch.Tensor, timestep: Optional[float] = None, noise_scale: Optional[float] = None,
                       seed: int = 0, generator: Optional[torch.Generator] = None
                       ) -> tuple[torch.Tensor, DecodeContext]:
        """The latents a decode runs on and its :class:`DecodeContext`, for raw latents ``z [B, C, T, h, w]``.

        A timestep-conditioned decoder mixes noise into the latents as ComfyUI does (``(1 − s)·z + s·n`` on the
        normalised latents, ``s = noise_scale``, default the config's 0.025) and takes ``timestep`` (default 0.05).
        Its noise, then each noise-injecting block's two whole-frame maps in the reference's order, come from
        ``generator`` (default: a CPU generator seeded with ``seed``), drawn on the CPU in float32 and cast (float64
        for float64 latents, as the references draw in their activations' dtype; in fp16/bf16 their generators
        would draw other numbers, so a seed would not give the same video at another precision)."""
        cfg, ctx = self.config, DecodeContext()
        # a seed means one noise at every precision: half-precision generators draw other numbers, not rounded ones
        draw = torch.float64 if z.dtype == torch.float64 else torch.float32
        g = generator if generator is not None else torch.Generator().manual_seed(int(seed))
        if not cfg.conditioned:
            if timestep is not None or noise_scale:
                raise VaeInputError(f"timestep={timestep}, noise_scale={noise_scale} for an LTX decoder without "
                                    "timestep conditioning (0.9.0); expected neither")
        else:
            s = cfg.decode_noise_scale if noise_scale is None else float(noise_scale)
            if not 0.0 <= s <= 1.0:
                raise VaeInputError(f"noise_scale={s}: expected a value in [0, 1]")
            if s:
                n = torch.randn(z.shape, generator=g, dtype=draw).to(z)
                mean, std = self._stats(z)
                z = (1 - s) * z + s * (n * std + mean)
            t = torch.full((z.shape[0],), cfg.decode_timestep if timestep is None else float(timestep),
                           device=z.device, dtype=torch.float32)
            t = t * self.decoder.timestep_scale_multiplier.float()
            for spec, m in zip(cfg.decoder, self.decoder.up_blocks):
                if spec.kind == "res":
                    emb = m.time_embedder(t, z.dtype).view(z.shape[0], 4, -1)
                    for rb in m.res_blocks:
                        ctx.ada[rb] = (emb + rb.scale_shift_table[None].to(emb))[..., None, None, None]
            emb = self.decoder.last_time_embedder(t, z.dtype).view(z.shape[0], 2, -1)
            ctx.ada[self.decoder] = (emb + self.decoder.last_scale_shift_table[None].to(emb))[..., None, None, None]
        h, w = z.shape[-2:]
        for spec, m in zip(cfg.decoder, self.decoder.up_blocks):
            blocks = m.res_blocks if spec.kind == "res" else [m] if spec.kind == "res_xy" else []
            for rb in blocks:
                if hasattr(rb, "per_channel_scale1"):
                    ctx.noise[rb] = tuple(torch.randn((h, w), generator=g, dtype=draw).to(z) for _ in range(2))
            if spec.kind == "d2s":
                h, w = h * spec.stride[1], w * spec.stride[2]
        return z, ctx

    # -- reference calls -----------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, moments: bool = False) -> torch.Tensor:
        """Videos ``[B, 3, 1 + 8k, H, W]`` → raw latents ``[B, 128, 1 + k, H/32, W/32]``, streamed (bounded memory);
        images ``[B, 3, H, W]`` → ``[B, 128, H/32, W/32]``. ``moments``: mean and log-variance (``2·128``)."""
        self.check_video(x, "encode")
        v = x.unsqueeze(2) if x.dim() == 4 else x
        y = run_segments(self.video_plan("encode", v.shape[2], moments), v, None, TileOptions())
        return y.squeeze(2) if x.dim() == 4 else y

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x, moments=True)

    def decode(self, z: torch.Tensor, out: Optional[torch.Tensor] = None, *, timestep: Optional[float] = None,
               noise_scale: Optional[float] = None, seed: int = 0) -> torch.Tensor:
        """Raw latents ``[B, 128, T, h, w]`` → videos ``[B, 3, 1 + 8(T − 1), 32h, 32w]``, streamed one latent frame
        at a time (into ``out`` if given); 4-D: one frame. ``timestep``/``noise_scale``/``seed``: see
        :meth:`decode_context`."""
        v = z.unsqueeze(2) if z.dim() == 4 else z
        v, ctx = self.decode_context(v, timestep, noise_scale, seed)
        y = run_segments(self.video_plan("decode", v.shape[2], ctx=ctx), v, None, TileOptions(),
                         out=out if z.dim() == 5 else None)
        return y.squeeze(2) if z.dim() == 4 else y

    def whole_clip(self, kind: str, t: torch.Tensor, ctx: Optional[DecodeContext] = None,
                   moments: bool = False) -> torch.Tensor:
        """The reference's one pass over the whole clip (no state: memory grows with the frames; for tests)."""
        chain = self.encode_chain(moments) if kind == "encode" else self.decode_chain(ctx)
        for st in chain:
            t = st.fn(t, None)
        return t


def release_config(version: str = "0.9.5", width_div: int = 1, layers: Optional[int] = None) -> LTXConfig:
    """The block sequence of a released LTX-Video VAE (``"0.9.0"``; ``"0.9.1"``; ``"0.9.5"`` for 0.9.5 to 0.9.8;
    ``"2"``: LTX-2's, the 0.9.5 blocks without timestep conditioning), as Lightricks' configs give it, for the
    benchmark and tests without weights; ``width_div`` narrows every width and ``layers`` sets every residual run's
    length (tiny test networks)."""
    def w(c: int) -> int:
        return max(1, c // width_div)

    def n(k: int) -> int:
        return k if layers is None else layers

    def res(c: int, k: int, noise: bool = False) -> LTXBlock:
        return LTXBlock("res", w(c), w(c), layers=n(k), noise=noise)

    def up(c: int, residual: bool, reduction: int) -> LTXBlock:
        return LTXBlock("d2s", w(c), w(c) // reduction, stride=(2, 2, 2), residual=residual, reduction=reduction)

    if version in ("0.9.0", "0.9.1"):
        encoder = (res(128, 4), LTXBlock("conv", w(128), w(128), stride=(2, 2, 2)), LTXBlock("res_xy", w(128), w(256)),
                   res(256, 3), LTXBlock("conv", w(256), w(256), stride=(2, 2, 2)), LTXBlock("res_xy", w(256), w(512)),
                   res(512, 3), LTXBlock("conv", w(512), w(512), stride=(2, 2, 2)), res(512, 3), res(512, 4))
    elif version in ("0.9.5", "2"):
        encoder = (res(128, 4), LTXBlock("s2d", w(128), w(256), stride=(1, 2, 2)), res(256, 6),
                   LTXBlock("s2d", w(256), w(512), stride=(2, 1, 1)), res(512, 6),
                   LTXBlock("s2d", w(512), w(1024), stride=(2, 2, 2)), res(1024, 2),
                   LTXBlock("s2d", w(1024), w(2048), stride=(2, 2, 2)), res(2048, 2))
    else:
        raise VaeInputError(f"LTX-Video version {version!r}: expected '0.9.0', '0.9.1', '0.9.5' or '2'")
    if version == "0.9.0":
        decoder = (res(512, 4), res(512, 3), up(512, False, 1), res(512, 3), LTXBlock("res_xy", w(512), w(256)),
                   up(256, False, 1), res(256, 3), LTXBlock("res_xy", w(256), w(128)), up(128, False, 1),
                   res(128, 4))
    else:
        noise = version == "0.9.1"
        decoder = (res(1024, 8 if noise else 5), up(1024, True, 2), res(512, 7 if noise else 5, noise),
                   up(512, True, 2), res(256, 6 if noise else 5, noise), up(256, True, 2), res(128, 5, noise))
    return LTXConfig(encoder=encoder, decoder=decoder, conditioned=version not in ("0.9.0", "2"))
