"""The hv10 family: the HunyuanVideo 1.0 VAE design (causal 3-D convs with replicate padding, GroupNorm over the
whole clip, mid-block attention over every latent pixel of the clip; 16 latent channels, 8× in space, 4× in time),
on videos and images: the SD VAE's design in 3-D, so the kl family's fp16 fix (GroupNorm-normalised stream
rescaling, :mod:`vae_core.families.groupnorm_fix`) applies as it is. ComfyUI's and diffusers
``AutoencoderKLHunyuanVideo`` keys (Tencent's release uses diffusers' names); the latent scaling factor from
``config.json`` or the published 0.476986; exact tiling of the whole-clip reference op by op
(:mod:`vae_core.tiling.clip`): the statistics of every norm pooled over the clip while the op before it writes its
output."""
from __future__ import annotations

import functools
import json
import logging
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..base import Canonical, LatentFormat, LoadRequest, scale_only_format
from ..groupnorm_fix import fp16_fix_model
from ..video import VideoFamily, meta_input
from ...errors import VaeError, VaeInputError, VaeLoadError
from ...tiling.clip import activation_bytes, plan_bytes, run_program
from ...tiling.memory import cpu_available, free_memory
from ...tiling.options import TileOptions
from .chunked import run_chunked
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


@functools.lru_cache(maxsize=32)
def _plan(cfg: HV10Config, kind: str, frames: int, height: int, width: int, tile: Optional[int],
          dtype: torch.dtype) -> dict[str, int]:
    """:func:`~vae_core.tiling.clip.plan_bytes` of a ``kind`` call (batch 1) on a ``meta`` twin built for ``cfg``
    (chunked: a dry run of :func:`~vae_core.families.hv10.chunked.run_chunked`'s first, second and last chunk, the
    latent-resolution clip between its parts counted with the activations: it stays on the compute device)."""
    with torch.device("meta"):
        twin = HV10VAE(cfg).to(dtype)
    x = meta_input(cfg, kind, frames, height, width, dtype)
    with torch.no_grad():
        if not cfg.chunked:
            return plan_bytes(program(twin, kind), x, tile, width)
        figures: dict[str, int] = {}
        y = run_chunked(twin, kind, x, tile, width, TileOptions(), figures=figures, sample=True)
    act = activation_bytes(figures, x.element_size()) + figures["latents"]  # the latent clip: on the device
    return {"state": 0, "stores": figures["store_peak"], "widest": figures["widest"], "activations": act,
            "output": y.numel() * x.element_size(), "total": figures["store_peak"] + act}


class HV10Family(VideoFamily):
    """The hv10 family (see the module docstring)."""

    video_schedules = ("auto",)  # one engine: schedule= does not apply
    video_reference = "whole-clip reference"
    user_settings = ("chunked", "causal_attention", "norm_groups")

    def recognises(self, sd: Mapping[str, torch.Tensor]) -> bool:
        return is_hv10(sd)

    def canonical(self, sd: Mapping[str, torch.Tensor], where: object, request: LoadRequest) -> Canonical:
        canon, layout, prefix = hv10_to_canonical(sd, where)
        return Canonical(canon, f"hv10-{layout}", prefix)

    def config(self, canon: Canonical, where: object, request: LoadRequest) -> HV10Config:
        """From the shapes, and what they cannot say from (lowest first) the file's metadata, the caller's
        ``norm_groups`` setting, config.json or a host module's settings, the caller's ``chunked`` and
        ``causal_attention`` settings."""
        settings: dict[str, Any] = {}
        meta = (request.metadata or {}).get(_META)
        if meta is not None:
            try:
                extra = json.loads(meta)
            except ValueError as exc:
                raise VaeLoadError(where, f"metadata {_META!r} that is not JSON ({exc})", "a JSON object") from None
            if not isinstance(extra, dict) or set(extra) - {"norm_num_groups"}:
                raise VaeLoadError(where, f"metadata {_META!r} = {meta[:80]!r}", '{"norm_num_groups": <int>}')
            settings.update(extra)
        if request.settings.get("norm_groups"):
            settings["norm_num_groups"] = request.settings["norm_groups"]
        settings.update(request.config or {})
        settings.update({k: v for k, v in request.settings.items() if k in ("chunked", "causal_attention")})
        return hv10_config(canon.state_dict, request.config_path or where, settings)

    def file_metadata(self, model: nn.Module, layout: str) -> dict[str, str]:
        """The GroupNorm groups where they are not the released 32 (shapes cannot say; ComfyUI builds 32; a diffusers
        *folder* has them in config.json too)."""
        g = model.config.norm_groups
        return {} if g == 32 else {_META: json.dumps({"norm_num_groups": g})}

    def describe(self, config: HV10Config) -> str:
        return f"a HunyuanVideo 1.0-design VAE of widths {list(config.block_out_channels)}"

    def latent_format(self, config: HV10Config, canon: Canonical, request: LoadRequest) -> LatentFormat:
        return scale_only_format(request, _NAME, HV10_SCALING_FACTOR, "HunyuanVideo 1.0")

    def summary(self, model: nn.Module, fmt: LatentFormat) -> list[tuple[str, str]]:
        cfg = model.config
        mask = "frame-causal (as released)" if cfg.causal_attention else "unmasked (as ComfyUI runs it)"
        if cfg.chunked:
            norms = (f"GroupNorm({cfg.norm_groups}) per chunk (newer ComfyUI's schedule: 2 latent frames per decoder "
                     "chunk, frame 0 then 8 frames per encoder chunk, causal convs carried across)")
            what = "the chunked schedule"
        else:
            norms, what = f"GroupNorm({cfg.norm_groups}) over the whole clip", "the whole-clip reference"
        return [("network", f"HunyuanVideo 1.0 design (videos and images; {cfg.downscale}× in space, "
                            f"{cfg.temporal_scale}× in time): widths {list(cfg.block_out_channels)}, "
                            f"{cfg.num_res_blocks} res blocks per level, {norms}, mid-block attention over every "
                            f"latent pixel of the clip, {mask}; tiling runs {what} exactly, op by op in pieces")]

    def host_settings(self, module: nn.Module) -> dict[str, Any]:
        """What a host's live module says that its tensors do not: the mid-block attention's mask (ours says
        ``causal``; ComfyUI's ``AttnBlock`` attends over every token unmasked), the GroupNorm groups, and whether it
        runs in chunks (newer ComfyUI's encoder and decoder say ``carried``)."""
        out: dict[str, Any] = {}
        for name, m in module.named_modules():
            if name.rpartition(".")[2] in ("encoder", "decoder") and isinstance(getattr(m, "carried", None), bool):
                out["chunked"] = out.get("chunked", False) or m.carried
            if name.endswith("mid.attn_1") and "causal_attention" not in out:
                out["causal_attention"] = bool(getattr(m, "causal", False))
            if isinstance(m, nn.GroupNorm) and "norm_num_groups" not in out:
                out["norm_num_groups"] = int(m.num_groups)
        return out

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
        :func:`~vae_core.tiling.clip.run_program` on a ``meta`` twin, cached): ``stores`` the whole-clip registers
        alive at once (they grow with the clip), ``activations`` what the compute device holds besides them; ``total``
        on the model's device, where the registers are counted only if they fit half its free memory (else they go
        to CPU memory). Untiled (``tile`` None) the reference pass holds everything on the device: about five tensors
        of its widest stage. ``schedule`` is not used (one schedule)."""
        need = dict(_plan(model.config, kind, frames, height, width, tile, dtype))
        if tile is None:
            need["activations"] = 5 * need["widest"]
            need["total"] = need["activations"]
            return need
        on_device = self._stores_on_device(need["stores"], _device(model))
        need["total"] = need["activations"] + (need["stores"] if on_device else 0)
        return need

    def tiled(self, kind: str):
        """Videos and images (one frame) by :func:`~vae_core.tiling.clip.run_program` over :func:`program`; the
        registers on the compute device where they fit half its free memory, else in CPU memory (refused, naming the
        sizes, where they do not fit that either). ``mode`` and ``schedule`` do not apply (every call is exact at
        the untiled FLOPs)."""
        def run(model: nn.Module, t: torch.Tensor, tile: int, opts: Any) -> torch.Tensor:
            moments = kind == "encode" and opts.moments
            x = t if t.dim() == 5 else t.unsqueeze(2)
            if t.dim() == 5:
                model.check_video(x, kind)
            cfg = model.config
            f = cfg.downscale if kind == "decode" else 1
            frames = x.shape[2] if kind == "encode" else 1 + cfg.temporal_scale * (x.shape[2] - 1)
            store = None
            # registers share the memory of a CPU (or meta) call; elsewhere the quick whole-frame dry run says whether
            # they fit (they do not depend on the tile)
            stores = 0 if x.device.type in ("cpu", "meta") else x.shape[0] * _plan(
                cfg, kind, frames, x.shape[3] * f, x.shape[4] * f, None, x.dtype)["stores"]
            if not self._stores_on_device(stores, x.device):
                store = torch.device("cpu")
                if stores > cpu_available():
                    why = "a chunk's registers" if cfg.chunked else "the whole-clip statistics"
                    raise VaeError(f"{kind} of {frames} frames of {x.shape[4] * f}x{x.shape[3] * f} px (batch "
                                   f"{x.shape[0]}): {why} need {stores / 2**30:.1f} GiB of "
                                   f"registers, more than half the device's free memory and more than the "
                                   f"{cpu_available() / 2**30:.1f} GiB of CPU memory available; expected a shorter "
                                   "clip or a smaller size (HunyuanVideo 1.0's GroupNorms span the whole clip; "
                                   "settings={'chunked': True} runs newer ComfyUI's chunks)")
                log.info("%s: registers (%.1f GiB) kept in CPU memory", kind, stores / 2**30)
            if cfg.chunked:
                y = run_chunked(model, kind, x, tile, x.shape[-1] * f, opts, moments, store=store)
            else:
                y = run_program(program(model, kind, moments), x, tile, x.shape[-1] * f, opts, store=store)
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
