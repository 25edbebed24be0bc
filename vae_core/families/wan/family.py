"""The wan family: the Wan VAE design (causal 3-D convs, RMS norm) of Wan 2.1, Qwen-Image (its image case) and
Wan 2.2, on videos and images. Original Wan and diffusers ``AutoencoderKLWan``/``AutoencoderKLQwenImage`` keys;
per-channel latent statistics from ``config.json`` or the published defaults (16 channels: Wan 2.1's, which
Qwen-Image shares; 48: Wan 2.2's); the fp16 fix by RMS-norm stream rescaling; exact tiling by halos (images) and
by streamed halos with a causal state per tile (videos), the mid block's attention whole at latent resolution."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..base import Canonical, LatentFormat, LoadRequest, refuse_family
from ..scaling import check_factors
from ..video import PerChannelLatents, VideoFamily
from .convert import canonical_to_diffusers, is_wan, wan_config, wan_to_canonical
from .fp16_fix import fp16_fix_wan
from .model import WanConfig, WanVAE

__all__ = ["WAN", "QWEN_LATENTS_MEAN", "QWEN_LATENTS_STD", "WAN22_LATENTS_MEAN", "WAN22_LATENTS_STD"]

#: Wan 2.1's per-channel latent statistics, which Qwen-Image's VAE shares (their pipelines normalise raw latents
#: with them; diffusers' defaults for both).
QWEN_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                     -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
QWEN_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                    1.6382, 1.1253, 2.8251, 1.9160)
#: Wan 2.2's (TI2V-5B) per-channel latent statistics, as its diffusers config publishes them.
WAN22_LATENTS_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
                      0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
                      -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
                      -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
                      0.3573, -0.0548, -0.1681, -0.0667)
WAN22_LATENTS_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                     0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                     0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                     0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)
_STATS = ("latents_mean", "latents_std")
#: latent family names: a 16-channel Wan 2.1-design VAE is Wan 2.1's or Qwen-Image's (same keys, same statistics)
_NAMES = ("wan2.1", "qwen-image", "wan2.2")


def _latent_name(config: WanConfig, request: LoadRequest) -> tuple[str, str]:
    """``(family name, where it came from)``: the user's, Wan 2.2 by its design, else config.json's class or the
    file/folder name (``qwen``), else Wan 2.1."""
    if request.family is not None:
        return request.family, "given"
    if config.residual:
        return "wan2.2", "keys (Wan 2.2 design)"
    cls = str((request.config or {}).get("_class_name", ""))
    if cls:
        return ("qwen-image" if "Qwen" in cls else "wan2.1"), f"config.json _class_name {cls}"
    path = request.path
    names = f"{path.parent.name}/{path.name}".lower() if path is not None and hasattr(path, "parent") else ""
    if "qwen" in names:
        return "qwen-image", f"the name {path.name!r}"
    return "wan2.1", "keys (Wan 2.1 design; Qwen-Image's VAE has the same keys: family='qwen-image' names it so)"


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
        return QWEN_LATENTS_MEAN, QWEN_LATENTS_STD, "Wan 2.1 / Qwen-Image defaults (16 channels)"
    if z == len(WAN22_LATENTS_MEAN):
        return WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, "Wan 2.2 defaults (48 channels)"
    return None, None, f"none known for {z} channels"


class WanFamily(PerChannelLatents, VideoFamily):
    """The wan family (see the module docstring)."""

    def diffusers_peer(self, model: nn.Module) -> bool:
        return True  # diffusers' AutoencoderKLWan holds both versions (the lab's and bench's peer rows)

    def recognises(self, sd: Mapping[str, torch.Tensor]) -> bool:
        return is_wan(sd)

    def canonical(self, sd: Mapping[str, torch.Tensor], where: object, request: LoadRequest) -> Canonical:
        canon, layout, prefix = wan_to_canonical(sd, where)
        for stat in _STATS:  # per-channel statistics, when a host module keeps them (files: config.json's)
            if request.host and prefix + stat in sd:
                canon[stat] = sd[prefix + stat]
        return Canonical(canon, f"wan-{layout}", prefix)

    def config(self, canon: Canonical, where: object, request: LoadRequest) -> WanConfig:
        return wan_config(canon.state_dict, where)[0]

    def describe(self, config: WanConfig) -> str:
        return f"a Wan {config.version}-design VAE of base width {config.base_dim}"

    def latent_format(self, config: WanConfig, canon: Canonical, request: LoadRequest) -> LatentFormat:
        refuse_family(request, _NAMES[2:] if config.residual else _NAMES[:2], f"a Wan {config.version}-design VAE")
        name, named = _latent_name(config, request)
        mean, std, src = _latent_stats(request, config.z_dim)
        tensors = {"latents_mean": torch.tensor(mean) if mean else torch.zeros(config.z_dim),
                   "latents_std": torch.tensor(std) if std else torch.ones(config.z_dim)}
        sources = {"family": named}
        if not request.host:
            sources |= {"scaling_factor": f"per-channel statistics: {src}",
                        "shift_factor": f"per-channel statistics: {src}"}
        return LatentFormat(name, 1.0, None, sources, tensors)

    def summary(self, model: nn.Module, fmt: LatentFormat) -> list[tuple[str, str]]:
        cfg = model.config
        dec = f", decoder base width {cfg.decoder_base_dim}" if cfg.decoder_base_dim else ""
        return [("network", f"Wan {cfg.version} design (videos and images; {cfg.downscale}× in space, "
                            f"{cfg.temporal_scale}× in time): base width {cfg.base_dim} × {list(cfg.dim_mult)}{dec}, "
                            f"{cfg.num_res_blocks} res blocks per level, RMS norm, per-frame mid-block attention; "
                            "tiling is exact in space and time (halos, a causal state per tile); scale_latents uses "
                            "per-channel latents_mean/latents_std")]

    def file_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
        # the original Wan 2.1 names, or AutoencoderKLQwenImage's
        return canonical_to_diffusers(sd, model.config.num_res_blocks, model.config.residual) \
            if layout == "diffusers" else sd

    def diffusers_config(self, model: nn.Module, fmt: LatentFormat) -> dict[str, Any]:
        c = model.config
        meta = model.latents_mean.is_meta  # a meta twin (FLOP counting) has no statistics: diffusers' defaults
        out = {"_class_name": "AutoencoderKLQwenImage" if fmt.family == "qwen-image" else "AutoencoderKLWan",
               "base_dim": c.base_dim, "z_dim": c.z_dim, "dim_mult": list(c.dim_mult),
               "num_res_blocks": c.num_res_blocks, "attn_scales": [], "temperal_downsample": list(c.temporal_down),
               "latents_mean": [0.0] * c.z_dim if meta else model.latents_mean.tolist(),
               "latents_std": [1.0] * c.z_dim if meta else model.latents_std.tolist()}
        if c.residual or c.decoder_base_dim:
            out |= {"decoder_base_dim": c.decoder_base_dim or c.base_dim, "is_residual": c.residual,
                    "in_channels": c.in_channels * c.patch ** 2, "out_channels": c.out_channels * c.patch ** 2,
                    "patch_size": c.patch if c.patch > 1 else None, "scale_factor_spatial": c.downscale}
        return out


WAN = WanFamily("wan", "Wan-design VAE (Wan 2.1, Qwen-Image, Wan 2.2)", WanVAE, WanConfig, fp16_fix_wan,
                found="a Wan-design VAE (Wan 2.1 / Qwen-Image / Wan 2.2: causal 3-D convs, RMS norm)")
