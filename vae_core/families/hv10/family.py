"""The hv10 family: the HunyuanVideo 1.0 VAE design (causal 3-D convs with replicate padding, GroupNorm over the
whole clip, mid-block attention over every latent pixel of the clip; 16 latent channels, 8× in space, 4× in time),
on videos and images: the SD VAE's design in 3-D, so the kl family's fp16 fix (GroupNorm-normalised stream
rescaling, :mod:`vae_core.families.groupnorm_fix`) applies as it is. ComfyUI's and diffusers
``AutoencoderKLHunyuanVideo`` keys (Tencent's release uses diffusers' names); the latent scaling factor from
``config.json`` or the published 0.476986; exact tiling of the whole-clip reference op by op
(:mod:`vae_core.tiling.clip`): the statistics of every norm pooled over the clip while the op before it writes its
output."""
from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..base import Canonical, LatentFormat, LoadRequest, refuse_family
from ..groupnorm_fix import fp16_fix_model
from ..scaling import check_factor
from ..video import VideoFamily
from ...errors import VaeInputError, VaeLoadError
from ...tiling.clip import plan_bytes, run_program
from ...tiling.memory import free_memory
from .convert import canonical_to_diffusers, hv10_config, hv10_to_canonical, is_hv10
from .model import HV10Config, HV10VAE, program

__all__ = ["HV10", "HV10_SCALING_FACTOR"]

log = logging.getLogger(__name__)

#: HunyuanVideo 1.0's latent scaling factor (diffusion latents = raw · factor), as diffusers and ComfyUI publish it.
HV10_SCALING_FACTOR = 0.476986
_NAME = "hunyuanvideo"
#: safetensors metadata of a ComfyUI-layout file with other GroupNorm groups than 32
_META = "hunyuanvideo_vae"


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class HV10Family(VideoFamily):
    """The hv10 family (see the module docstring)."""

    video_schedules = ("auto",)  # one engine: schedule= does not apply
    video_reference = "whole-clip reference"

    def recognises(self, sd: Mapping[str, torch.Tensor]) -> bool:
        return is_hv10(sd)

    def canonical(self, sd: Mapping[str, torch.Tensor], where: object, request: LoadRequest) -> Canonical:
        canon, layout, prefix = hv10_to_canonical(sd, where)
        return Canonical(canon, f"hv10-{layout}", prefix)

    def config(self, canon: Canonical, where: object, request: LoadRequest) -> HV10Config:
        settings = dict(request.config or {})
        meta = (request.metadata or {}).get(_META)
        if meta is not None and not request.config:
            try:
                extra = json.loads(meta)
            except ValueError as exc:
                raise VaeLoadError(where, f"metadata {_META!r} that is not JSON ({exc})", "a JSON object") from None
            if not isinstance(extra, dict) or set(extra) - {"norm_num_groups"}:
                raise VaeLoadError(where, f"metadata {_META!r} = {meta[:80]!r}", '{"norm_num_groups": <int>}')
            settings.update(extra)
        return hv10_config(canon.state_dict, request.config_path or where, settings)

    def file_metadata(self, model: nn.Module, layout: str) -> dict[str, str]:
        """The GroupNorm groups where they are not the released 32 (shapes cannot say; ComfyUI builds 32)."""
        g = model.config.norm_groups
        return {} if g == 32 or layout == "diffusers" else {_META: json.dumps({"norm_num_groups": g})}

    def describe(self, config: HV10Config) -> str:
        return f"a HunyuanVideo 1.0-design VAE of widths {list(config.block_out_channels)}"

    def latent_format(self, config: HV10Config, canon: Canonical, request: LoadRequest) -> LatentFormat:
        refuse_family(request, (_NAME,), "a HunyuanVideo 1.0-design VAE")
        cfg = request.config or {}
        sources = {"family": "given" if request.family else "keys (HunyuanVideo 1.0 design)"}
        if request.scaling_factor is not None:
            scale, sources["scaling_factor"] = request.scaling_factor, "given"
        elif cfg.get("scaling_factor") is not None:
            scale = check_factor(cfg["scaling_factor"], "scaling_factor", "config.json", positive=True,
                                 path=request.config_path or "config.json")
            sources["scaling_factor"] = "config.json"
        else:
            scale, sources["scaling_factor"] = HV10_SCALING_FACTOR, "HunyuanVideo 1.0 default"
        sources["shift_factor"] = "none (HunyuanVideo 1.0 scales only)"
        return LatentFormat(_NAME, float(scale), None, sources)

    def summary(self, model: nn.Module, fmt: LatentFormat) -> list[tuple[str, str]]:
        cfg = model.config
        mask = "frame-causal (as released)" if cfg.causal_attention else "unmasked (as ComfyUI runs it)"
        return [("network", f"HunyuanVideo 1.0 design (videos and images; {cfg.downscale}× in space, "
                            f"{cfg.temporal_scale}× in time): widths {list(cfg.block_out_channels)}, "
                            f"{cfg.num_res_blocks} res blocks per level, GroupNorm({cfg.norm_groups}) over the whole "
                            f"clip, mid-block attention over every latent pixel of the clip, {mask}; tiling runs the "
                            "whole-clip reference exactly, op by op in pieces")]

    def host_settings(self, module: nn.Module) -> dict[str, Any]:
        """How a host runs the mid-block attention, which the tensors do not show: ours says (``causal``), ComfyUI's
        ``AttnBlock`` attends over every token unmasked."""
        for name, m in module.named_modules():
            if name.endswith("mid.attn_1"):
                return {"causal_attention": bool(getattr(m, "causal", False))}
        return {}

    def check_sides(self, model: nn.Module, t: torch.Tensor, kind: str) -> None:
        f = model.config.downscale  # replicate-padded stride-2 convs round up: the decoder could not give them back
        if kind == "encode" and (t.shape[-2] % f or t.shape[-1] % f):
            raise VaeInputError(f"encode input of {t.shape[-1]}x{t.shape[-2]} px; expected sides that are multiples "
                                f"of {f} for a HunyuanVideo 1.0 VAE (crop or resize first)")

    # -- exact tiling ------------------------------------------------------------------------------------------
    def _stores_on_device(self, stores: int, device: torch.device) -> bool:
        return device.type in ("cpu", "meta") or stores <= free_memory(device) // 2

    def video_working_set(self, model: nn.Module, kind: str, frames: int, height: int, width: int,
                          tile: Optional[int], dtype: torch.dtype = torch.float32,
                          schedule: str = "tile") -> dict[str, int]:
        """Estimated peak bytes of a video call of ``frames`` pixel frames of ``height``×``width`` px (a dry run of
        :func:`~vae_core.tiling.clip.run_program` on a ``meta`` twin): ``stores`` the whole-clip registers alive at
        once (they grow with the clip), ``activations`` a piece's tensors; ``total`` on the model's device (the
        registers move to CPU memory where they do not fit half its free memory). Untiled (``tile`` None), the
        reference pass holds about a third more than the registers. ``schedule`` is not used (one schedule)."""
        cfg = model.config
        f, ft = cfg.downscale, cfg.temporal_scale
        with torch.device("meta"):
            twin = self.build(cfg).to(dtype)
        shape = ((1, cfg.latent_channels, 1 + (frames - 1) // ft, height // f, width // f) if kind == "decode"
                 else (1, cfg.in_channels, frames, height, width))
        x = torch.empty(shape, device="meta", dtype=dtype)
        with torch.no_grad():
            need = plan_bytes(program(twin, kind), x, tile, width)
        if tile is None:
            need["activations"] = need["stores"] // 3
        on_device = self._stores_on_device(need["stores"], _device(model))
        need["total"] = need["activations"] + (need["stores"] if on_device else 0)
        return need

    def tiled(self, kind: str):
        """Videos and images (one frame) by :func:`~vae_core.tiling.clip.run_program` over :func:`program`; the
        registers on the compute device where they fit half its free memory, else in CPU memory. ``mode`` and
        ``schedule`` do not apply (every call is exact at about the untiled cost)."""
        def run(model: nn.Module, t: torch.Tensor, tile: int, opts: Any) -> torch.Tensor:
            moments = kind == "encode" and opts.moments
            x = t if t.dim() == 5 else t.unsqueeze(2)
            if t.dim() == 5:
                model.check_video(x, kind)
            prog = program(model, kind, moments)
            image_w = x.shape[-1] * (model.config.downscale if kind == "decode" else 1)
            store = None
            if x.device.type not in ("cpu", "meta"):
                frames = x.shape[2] if kind == "encode" else 1 + model.config.temporal_scale * (x.shape[2] - 1)
                f = model.config.downscale if kind == "decode" else 1
                need = self.video_working_set(model, kind, frames, x.shape[3] * f, x.shape[4] * f, tile, x.dtype)
                if not self._stores_on_device(need["stores"] * x.shape[0], x.device):
                    store = torch.device("cpu")
                    log.info("%s: whole-clip registers (%.1f GiB) kept in CPU memory", kind, need["stores"] / 2**30)
            y = run_program(prog, x, tile, image_w, opts, store=store)
            return y if t.dim() == 5 else y.squeeze(2)
        return run

    def diffusers_peer(self, model: nn.Module) -> bool:
        c = model.config  # diffusers' AutoencoderKLHunyuanVideo: 4× in time, the released frame-causal attention
        return c.temporal_levels == 2 and c.levels >= 3 and c.causal_attention

    def file_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
        return canonical_to_diffusers(sd) if layout == "diffusers" else sd

    def diffusers_config(self, model: nn.Module, fmt: LatentFormat) -> dict[str, Any]:
        c = model.config
        return {"_class_name": "AutoencoderKLHunyuanVideo", "in_channels": c.in_channels,
                "out_channels": c.out_channels, "latent_channels": c.z_dim,
                "down_block_types": ["HunyuanVideoDownBlock3D"] * c.levels,
                "up_block_types": ["HunyuanVideoUpBlock3D"] * c.levels,
                "block_out_channels": list(c.block_out_channels), "layers_per_block": c.num_res_blocks,
                "norm_num_groups": c.norm_groups, "act_fn": "silu",
                "spatial_compression_ratio": c.downscale, "temporal_compression_ratio": c.temporal_scale,
                "mid_block_add_attention": True, "scaling_factor": fmt.scaling_factor}


HV10 = HV10Family("hv10", "HunyuanVideo 1.0-design VAE", HV10VAE, HV10Config, fp16_fix_model,
                  found="a HunyuanVideo 1.0-design VAE (causal 3-D convs, GroupNorm, 16 latent channels)")
