"""The ltx family: the LTX-Video VAE design (0.9.0 to 0.9.8: causal encoder, non-causal decoder, RMS norms over
channels, no attention; 128 latent channels, 32× in space, 8× in time), on videos and images. Original (Lightricks',
ComfyUI's) and diffusers ``AutoencoderKLLTXVideo`` keys, the block sequence from shapes; per-channel latent statistics
from the weights; the timestep-conditioned decoders' noise drawn once per call from a seed; exact streamed tiling in
space and time (halos, a state per tile, layers that lag for the decoder's look into the future)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..base import Canonical, LatentFormat, LoadRequest, refuse_family
from ..video import PerChannelLatents, VideoFamily
from ...errors import VaeInputError
from .convert import canonical_to_diffusers, diffusers_config, is_ltx, ltx_config, ltx_to_canonical, original_config
from .model import STAT_KEYS, LTXConfig, LTXVAE

__all__ = ["LTX"]

#: latent family names: LTX-Video 0.9.x, LTX-2 (the 0.9.5 block design, its own weights and statistics)
_NAMES = ("ltxv", "ltx2")
_STATS = tuple(f"per_channel_statistics.{k}" for k in STAT_KEYS)


def _settings(request: LoadRequest) -> dict[str, Any]:
    """What shapes cannot say: a diffusers config.json, or the ``vae`` part of an original file's metadata."""
    if request.config:
        return dict(request.config)
    import json
    raw = (request.metadata or {}).get("config")
    if not raw:
        return {}
    try:
        vae = json.loads(raw).get("vae")
    except (ValueError, AttributeError):
        return {}
    return vae if isinstance(vae, dict) else {}


class LTXFamily(PerChannelLatents, VideoFamily):
    """The ltx family (see the module docstring)."""

    host_normalised = True
    no_fp16_fix = ("LTX-Video's hosts run its VAE in bfloat16 or float32 (ComfyUI's working dtypes), never in "
                   "float16; no fp16 fix is offered")

    def recognises(self, sd: Mapping[str, torch.Tensor]) -> bool:
        return is_ltx(sd)

    def canonical(self, sd: Mapping[str, torch.Tensor], where: object, request: LoadRequest) -> Canonical:
        canon, layout, prefix = ltx_to_canonical(sd, where)
        sources = {}
        if not all(k in canon for k in _STATS):
            sources["latent statistics"] = "none in the weights: latents are not normalised (mean 0, std 1)"
        return Canonical(canon, f"ltx-{layout}", prefix, sources)

    def config(self, canon: Canonical, where: object, request: LoadRequest) -> LTXConfig:
        cfg, sources = ltx_config(canon.state_dict, canon.layout.split("-", 1)[1], where, _settings(request))
        canon.sources.update({f"ltx {k}": v for k, v in sources.items()})
        return cfg

    def describe(self, config: LTXConfig) -> str:
        return (f"an LTX-Video VAE with {len(config.encoder)} encoder and {len(config.decoder)} decoder blocks "
                f"({config.z_dim} latent channels)")

    def latent_format(self, config: LTXConfig, canon: Canonical, request: LoadRequest) -> LatentFormat:
        refuse_family(request, _NAMES, "an LTX-Video VAE")
        cls = str((request.config or {}).get("_class_name", ""))
        path = request.path
        names = f"{path.parent.name}/{path.name}".lower() if path is not None and hasattr(path, "parent") else ""
        if request.family is not None:
            name, named = request.family, "given"
        elif "LTX2" in cls:
            name, named = "ltx2", f"config.json _class_name {cls}"
        elif "ltx-2" in names or "ltx2" in names:
            name, named = "ltx2", f"the name {path.name!r}"
        else:
            name, named = "ltxv", ("keys (LTX-Video design; LTX-2's VAE has the same blocks: family='ltx2' names "
                                   "it so)")
        sources = {"family": named,
                   "scaling_factor": "per-channel statistics: per_channel_statistics (the weights)",
                   "shift_factor": "per-channel statistics: per_channel_statistics (the weights)"}
        tensors = {_STATS[0]: torch.zeros(config.z_dim), _STATS[1]: torch.ones(config.z_dim)}
        return LatentFormat(name, 1.0, None, sources, tensors)

    def summary(self, model: nn.Module, fmt: LatentFormat) -> list[tuple[str, str]]:
        c = model.config
        cond = (f"timestep-conditioned (timestep {c.decode_timestep}, latent noise {c.decode_noise_scale}, seeded)"
                if c.conditioned else "not timestep-conditioned")
        noise = any(b.noise for b in c.decoder)
        return [("network", f"LTX-Video design (videos and images; {c.downscale}× in space, {c.temporal_scale}× in "
                            f"time): {len(c.encoder)} encoder / {len(c.decoder)} decoder blocks, RMS norms, no "
                            f"attention; decoder {'causal' if c.decoder_causal else 'non-causal'}, {cond}"
                            f"{', noise-injecting' if noise else ''}, {c.decoder_padding} padding; tiling is exact in "
                            "space and time (halos, a state per tile, lagging layers); scale_latents uses the "
                            "per-channel statistics")]

    def check_sides(self, model: nn.Module, t: torch.Tensor, kind: str) -> None:
        model.check_video(t, kind)

    def _plan(self, model: nn.Module, kind: str, t: torch.Tensor, moments: bool) -> tuple[torch.Tensor, list]:
        """``(what the plan runs on, the plan)``: a decode runs on the latents its noise was mixed into."""
        if kind == "decode":
            z, ctx = model.decode_context(t)
            return z, model.video_plan("decode", z.shape[2], ctx=ctx)
        return t, model.video_plan("encode", t.shape[2], moments)

    def video_plan_for(self, model: nn.Module, kind: str, t: torch.Tensor, moments: bool) -> list:
        return self._plan(model, kind, t, moments)[1]

    def tiled(self, kind: str):
        """Images as one-frame videos; videos by the lagged streamed plan (the decode's noise drawn first)."""
        from ...tiling.stream import run_segments

        def run(model: nn.Module, t: torch.Tensor, tile: int, opts: Any) -> torch.Tensor:
            v = t.unsqueeze(2) if t.dim() == 4 else t
            model.check_video(v, kind)
            schedule = (opts.schedule if opts.schedule != "auto"
                        else self.video_schedule(model, kind, v, tile, opts.cache_bytes))
            src, plan = self._plan(model, kind, v, opts.moments)
            y = run_segments(plan, src, tile, opts, schedule=schedule)
            return y.squeeze(2) if t.dim() == 4 else y
        return run

    def file_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
        return canonical_to_diffusers(sd) if layout == "diffusers" else sd

    def host_settings(self, module: nn.Module) -> dict[str, Any]:
        """How a host built its LTX module (ComfyUI's ``VideoVAE``): each side's spatial padding (its convs'
        ``padding_mode``), the decoder's causality and its upsamplers' shortcuts, which the tensors do not show."""
        out: dict[str, Any] = {}
        ups: list[tuple[int, bool]] = []
        for name, m in module.named_modules():
            parts = name.split(".")
            for side in ("encoder", "decoder"):
                if side in parts and isinstance(m, nn.Conv3d):
                    out.setdefault(f"{side}_spatial_padding_mode", m.padding_mode)
            if "decoder" in parts and isinstance(getattr(m, "causal", None), bool):  # ComfyUI's Decoder, our convs
                out.setdefault("causal_decoder", m.causal)
            if len(parts) >= 2 and parts[-2] == "up_blocks" and "decoder" in parts and parts[-1].isdigit() and \
                    isinstance(getattr(m, "residual", None), bool) and hasattr(m, "stride"):
                ups.append((int(parts[-1]), m.residual))
        if ups:
            out["upsample_residual"] = [r for _, r in sorted(ups)][::-1]  # diffusers' order: output end first
        return out

    def file_metadata(self, model: nn.Module, layout: str) -> dict[str, str]:
        """The ``config`` metadata of Lightricks' files (what shapes cannot say: padding, causality, shortcuts)."""
        import json
        return {"config": json.dumps({"vae": original_config(model.config)})}

    def check_save(self, model: nn.Module, layout: str, what: str) -> None:
        c = model.config
        if layout == "diffusers" and (c.decoder_padding, c.encoder_padding) != ("zeros", "zeros"):
            raise VaeInputError(f"{what}: an LTX-Video VAE that pads with {c.encoder_padding!r} (encoder) and "
                                f"{c.decoder_padding!r} (decoder) in the diffusers layout; expected the original "
                                "layout (one .safetensors file with its config, which ComfyUI and diffusers' "
                                "from_single_file read): AutoencoderKLLTXVideo pads with zeros and would decode it "
                                "differently at the borders")

    def diffusers_config(self, model: nn.Module, fmt: LatentFormat) -> dict[str, Any]:
        self.check_save(model, "diffusers", "a diffusers config")
        return diffusers_config(model.config)

    def diffusers_peer(self, model: nn.Module) -> bool:
        c = model.config  # diffusers' AutoencoderKLLTXVideo pads with zeros and has no per-channel log-variance
        return (c.decoder_padding, c.encoder_padding, c.log_var) == ("zeros", "zeros", "uniform")


LTX = LTXFamily("ltx", "LTX-Video-design VAE", LTXVAE, LTXConfig,
                found="an LTX-Video-design VAE (RMS norms without weights, 128 latent channels, 32×/8×)")
