"""The hv15 family: the HunyuanVideo 1.5 VAE design (causal 3-D convs with replicate padding, RMS norm, a
frame-causal mid-block attention; 32 latent channels, 16× in space, 4× in time), on videos and images. Original and
diffusers ``AutoencoderKLHunyuanVideo15`` keys; the latent scaling factor from ``config.json`` or the published
1.03682; the fp16 fix by RMS-norm stream rescaling; exact tiling by halos (images) and by streamed halos with a causal
state per tile (videos), the latent-resolution part (mid block, attention over every frame so far) whole."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..base import Canonical, LatentFormat, LoadRequest, scale_only_format
from ..video import VideoFamily
from ...errors import VaeInputError
from .convert import canonical_to_diffusers, hv15_config, hv15_to_canonical, is_hv15
from .fp16_fix import fp16_fix_hv15
from .model import SHORTCUT_SCALES, HV15Config, HV15VAE

__all__ = ["HV15", "HV15_SCALING_FACTOR"]

#: HunyuanVideo 1.5's latent scaling factor (diffusion latents = raw · factor), as diffusers' config publishes it.
HV15_SCALING_FACTOR = 1.03682
_NAME = "hunyuanvideo1.5"


class HV15Family(VideoFamily):
    """The hv15 family (see the module docstring)."""

    def recognises(self, sd: Mapping[str, torch.Tensor]) -> bool:
        return is_hv15(sd)

    def canonical(self, sd: Mapping[str, torch.Tensor], where: object, request: LoadRequest) -> Canonical:
        canon, layout, prefix = hv15_to_canonical(sd, where)
        for name in SHORTCUT_SCALES:  # a host module's fp16-fix factors travel with its weights
            if request.host and prefix + name in sd:
                canon[name] = sd[prefix + name]
        return Canonical(canon, f"hv15-{layout}", prefix)

    def config(self, canon: Canonical, where: object, request: LoadRequest) -> HV15Config:
        return hv15_config(canon.state_dict, where)

    def describe(self, config: HV15Config) -> str:
        return f"a HunyuanVideo 1.5-design VAE of widths {list(config.block_out_channels)}"

    def latent_format(self, config: HV15Config, canon: Canonical, request: LoadRequest) -> LatentFormat:
        return scale_only_format(request, _NAME, HV15_SCALING_FACTOR, "HunyuanVideo 1.5",
                                 {n: torch.ones(()) for n in SHORTCUT_SCALES})

    def summary(self, model: nn.Module, fmt: LatentFormat) -> list[tuple[str, str]]:
        cfg = model.config
        return [("network", f"HunyuanVideo 1.5 design (videos and images; {cfg.downscale}× in space, "
                            f"{cfg.temporal_scale}× in time): widths {list(cfg.block_out_channels)}, "
                            f"{cfg.num_res_blocks} res blocks per level, RMS norm, frame-causal mid-block attention "
                            "over every frame so far; tiling is exact in space and time (halos, a causal state per "
                            "tile)")]

    def check_sides(self, model: nn.Module, t: torch.Tensor, kind: str) -> None:
        f = model.config.downscale  # the resamplers pack exact 2×2 blocks: the reference cannot floor either
        if kind == "encode" and (t.shape[-2] % f or t.shape[-1] % f):
            raise VaeInputError(f"encode input of {t.shape[-1]}x{t.shape[-2]} px; expected sides that are multiples "
                                f"of {f} for a HunyuanVideo 1.5 VAE (crop or resize first)")

    def diffusers_peer(self, model: nn.Module) -> bool:
        c = model.config  # diffusers' AutoencoderKLHunyuanVideo15 holds the 5-level, 16×/4× layout
        return (c.spatial_levels, c.temporal_levels, len(c.block_out_channels)) == (4, 2, 5)

    def check_save(self, model: nn.Module, layout: str, what: str) -> None:
        if any(float(getattr(model, n)) != 1.0 for n in SHORTCUT_SCALES):
            raise VaeInputError(f"{what}: a HunyuanVideo 1.5 VAE with the fp16 fix applied (shortcut factors "
                                f"{float(model.encoder_shortcut_scale):g}, {float(model.decoder_shortcut_scale):g}); "
                                "expected the weights as released: the fix's factors are not weights, save the "
                                "original and apply the fix after loading")

    def file_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
        return canonical_to_diffusers(sd) if layout == "diffusers" else sd

    def diffusers_config(self, model: nn.Module, fmt: LatentFormat) -> dict[str, Any]:
        c = model.config
        if (c.spatial_levels, c.temporal_levels, len(c.block_out_channels)) != (4, 2, 5):
            raise VaeInputError(f"a HunyuanVideo 1.5-design VAE with {c.spatial_levels} spatial and "
                                f"{c.temporal_levels} temporal levels of {len(c.block_out_channels)}; expected 4 and 2 "
                                "of 5 for diffusers' AutoencoderKLHunyuanVideo15 config")
        return {"_class_name": "AutoencoderKLHunyuanVideo15", "in_channels": c.in_channels,
                "out_channels": c.out_channels, "latent_channels": c.z_dim,
                "block_out_channels": list(c.block_out_channels), "layers_per_block": c.num_res_blocks,
                "spatial_compression_ratio": c.downscale, "temporal_compression_ratio": c.temporal_scale,
                "downsample_match_channel": True, "upsample_match_channel": True,
                "scaling_factor": fmt.scaling_factor}


HV15 = HV15Family("hv15", "HunyuanVideo 1.5-design VAE", HV15VAE, HV15Config, fp16_fix_hv15,
                  found="a HunyuanVideo 1.5-design VAE (causal 3-D convs, RMS norm, 32 latent channels)")
