"""The wan family: the Wan 2.1 design (causal 3-D convs, RMS norm) of Qwen-Image's VAE, run on single images.
Original Wan and diffusers ``AutoencoderKLQwenImage`` keys (Wan 2.2's VAE is named and refused); per-channel latent
statistics from ``config.json`` or Qwen-Image's published defaults; the fp16 fix by RMS-norm stream rescaling; exact
tiling by halos (the mid block's attention runs whole, at latent resolution)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..base import Canonical, HaloFamily, LatentFormat, LoadRequest, refuse_family
from ..scaling import check_factors
from .convert import canonical_to_diffusers, is_wan, wan_config, wan_to_canonical
from .fp16_fix import fp16_fix_wan
from .model import WanConfig, WanImageVAE

__all__ = ["WAN", "QWEN_LATENTS_MEAN", "QWEN_LATENTS_STD"]

#: Qwen-Image's per-channel latent statistics (its pipeline normalises raw latents with them; diffusers' defaults).
QWEN_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                     -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
QWEN_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                    1.6382, 1.1253, 2.8251, 1.9160)
_STATS = ("latents_mean", "latents_std")


def _latent_stats(request: LoadRequest, z: int) -> tuple[Optional[tuple], Optional[tuple], str]:
    cfg = request.config or {}
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    if mean is not None or std is not None:
        where = request.config_path or "config.json"
        mean = check_factors(mean, "latents_mean", "config.json", positive=False, count=z, path=where)
        std = check_factors(std, "latents_std", "config.json", positive=True, count=z, path=where)
        return mean, std, "config.json"
    if request.host:
        return None, None, "the host module's, or none"
    if z == len(QWEN_LATENTS_MEAN):
        return QWEN_LATENTS_MEAN, QWEN_LATENTS_STD, "Qwen-Image's defaults (16 channels)"
    return None, None, f"none known for {z} channels"


class WanFamily(HaloFamily):
    """The wan family (see the module docstring)."""

    def recognises(self, sd: Mapping[str, torch.Tensor]) -> bool:
        return is_wan(sd)

    def canonical(self, sd: Mapping[str, torch.Tensor], where: object, request: LoadRequest) -> Canonical:
        canon, layout, prefix = wan_to_canonical(sd, where)
        for stat in _STATS:  # per-channel statistics, when a host module keeps them (files: config.json's)
            if request.host and prefix + stat in sd:
                canon[stat] = sd[prefix + stat]
        return Canonical(canon, f"wan-{layout}", prefix)

    def config(self, canon: Canonical, where: object, request: LoadRequest) -> WanConfig:
        cfg, temporal = wan_config(canon.state_dict, where)
        return dataclasses.replace(cfg, temporal_down=temporal)

    def describe(self, config: WanConfig) -> str:
        return f"a Wan 2.1-design VAE of base width {config.base_dim}"

    def latent_format(self, config: WanConfig, canon: Canonical, request: LoadRequest) -> LatentFormat:
        refuse_family(request, ("qwen-image",), "a Qwen-Image / Wan 2.1-design VAE")
        mean, std, src = _latent_stats(request, config.z_dim)
        tensors = {"latents_mean": torch.tensor(mean) if mean else torch.zeros(config.z_dim),
                   "latents_std": torch.tensor(std) if std else torch.ones(config.z_dim)}
        if request.host:
            return LatentFormat("qwen-image", 1.0, None, {"family": "keys (Wan 2.1 design)"}, tensors)
        return LatentFormat("qwen-image", 1.0, None, {"family": "keys (Wan 2.1 design)",
                                                      "scaling_factor": f"per-channel statistics: {src}",
                                                      "shift_factor": f"per-channel statistics: {src}"}, tensors)

    def scale_latents(self, model: nn.Module, fmt: LatentFormat, z: torch.Tensor) -> torch.Tensor:
        return model.normalize(z)

    def unscale_latents(self, model: nn.Module, fmt: LatentFormat, z: torch.Tensor) -> torch.Tensor:
        return model.denormalize(z)

    def summary(self, model: nn.Module, fmt: LatentFormat) -> list[tuple[str, str]]:
        cfg = model.config
        return [("network", f"Wan 2.1 design on single images: base width {cfg.base_dim} × {list(cfg.dim_mult)}, "
                            f"{cfg.num_res_blocks} res blocks per level, RMS norm, mid-block attention; tiling is "
                            "exact with halos around the mid block; scale_latents uses per-channel "
                            "latents_mean/latents_std")]

    def file_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
        # the original Wan 2.1 names, or AutoencoderKLQwenImage's
        return canonical_to_diffusers(sd, model.config.num_res_blocks) if layout == "diffusers" else sd

    def diffusers_config(self, model: nn.Module, fmt: LatentFormat) -> dict[str, Any]:
        c = model.config
        return {"_class_name": "AutoencoderKLQwenImage", "base_dim": c.base_dim, "z_dim": c.z_dim,
                "dim_mult": list(c.dim_mult), "num_res_blocks": c.num_res_blocks, "attn_scales": [],
                "temperal_downsample": list(c.temporal_down),
                "latents_mean": model.latents_mean.tolist(), "latents_std": model.latents_std.tolist()}


WAN = WanFamily("wan", "Qwen-Image / Wan 2.1-design VAE", WanImageVAE, WanConfig, fp16_fix_wan,
                found="a Qwen-Image / Wan 2.1-design VAE (causal 3-D convs, RMS norm)")
