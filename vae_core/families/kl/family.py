"""The kl family: the AutoencoderKL of SD1/2, SDXL, SD3, Flux.1 and Flux.2 (and Qwen-Image-free kl-f8 VAEs) as
configs of one network. Original (LDM) and diffusers keys, bare or inside a full checkpoint; latent scaling from the
file, its config or its other keys (:mod:`vae_core.families.scaling`); Flux.2's latent BatchNorm statistics; the fp16
fix by GroupNorm stream rescaling; exact tiling by GroupNorm sweeps."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ...errors import VaeLoadError
from ..base import Canonical, Family, LatentFormat, LoadRequest, replace_config
from ..scaling import check_factor, resolve_family
from .convert import (MAX_NORM_GROUPS, PREFIXES, diffusers_config, infer_config, ldm_to_diffusers, nest_flux2,
                      to_ldm)
from .fp16_fix import fp16_fix_model
from .model import AutoencoderKL, ModelConfig
from .tiling import cache_needed, decode_tiled, encode_tiled

__all__ = ["KL"]

_CLASSES = ("AutoencoderKL", "AutoencoderKLFlux2")
_MARKS = ("encoder.conv_in.weight", "decoder.conv_in.weight")


def _settings(config: Mapping[str, Any], where: object) -> dict[str, Any]:
    """Settings a diffusers ``config.json`` gives that shapes cannot: ``norm_groups`` and (Flux.2) ``bn_eps``;
    refuses a config for another network (``_class_name``, ``act_fn``, no mid attention)."""
    if config.get("_class_name", "AutoencoderKL") not in _CLASSES:
        raise VaeLoadError(where, f"_class_name {config.get('_class_name')!r}", f"one of {_CLASSES}")
    if config.get("act_fn", "silu") != "silu":
        raise VaeLoadError(where, f"act_fn {config.get('act_fn')!r}", "'silu'")
    if config.get("mid_block_add_attention", True) is False:
        raise VaeLoadError(where, "mid_block_add_attention false", "a mid block with attention (SD-family VAE)")
    out: dict[str, Any] = {}
    groups = config.get("norm_num_groups")
    if groups is not None:
        if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= MAX_NORM_GROUPS:
            raise VaeLoadError(where, f"norm_num_groups {groups!r}", f"an integer from 1 to {MAX_NORM_GROUPS} "
                               "(SD-family VAEs use 32)")
        out["norm_groups"] = groups
    eps = config.get("batch_norm_eps")
    if eps is not None:
        value = check_factor(eps, "batch_norm_eps", "config.json", positive=True, path=where)
        if value is not None and value > 1.0:
            raise VaeLoadError(where, f"batch_norm_eps {eps!r}", "a small positive number (Flux.2 uses 1e-4)")
        out["bn_eps"] = value
    return out


class KLFamily(Family):
    """The kl family (see the module docstring)."""

    user_settings = ("norm_groups",)

    def recognises(self, sd: Mapping[str, torch.Tensor]) -> bool:
        return any(p + m in sd for p in PREFIXES for m in _MARKS)

    def canonical(self, sd: Mapping[str, torch.Tensor], where: object, request: LoadRequest) -> Canonical:
        ldm, layout = to_ldm(sd, where)
        return Canonical(ldm, layout.layout, layout.prefix)

    def config(self, canon: Canonical, where: object, request: LoadRequest) -> ModelConfig:
        settings = dict(request.settings)
        if request.config:
            settings |= _settings(request.config, request.config_path or where)
        cfg = infer_config(canon.state_dict, where, settings.get("norm_groups"))  # bounds sizes before building
        return replace_config(cfg, **({"bn_eps": settings["bn_eps"]} if "bn_eps" in settings else {}))

    def describe(self, config: ModelConfig) -> str:
        return f"an AutoencoderKL with {config.ch_mult} levels × {config.num_res_blocks} blocks"

    def latent_format(self, config: ModelConfig, canon: Canonical, request: LoadRequest) -> LatentFormat:
        fam, scale, shift, sources = resolve_family(
            config.latent_channels, family=request.family, scaling_factor=request.scaling_factor,
            shift_factor=request.shift_factor, config=request.config, metadata=request.metadata,
            checkpoint_keys=request.all_keys if canon.prefix else (),
            path=Path(request.path) if request.path is not None and not request.host else None,
            config_path=request.config_path, metadata_path=request.weights_file, latent_bn=config.latent_bn)
        return LatentFormat(fam, scale, shift, sources)

    def scale_latents(self, model: nn.Module, fmt: LatentFormat, z: torch.Tensor) -> torch.Tensor:
        if model.bn is not None:  # Flux.2: 2×2 patchify, then its BatchNorm statistics
            return model.bn.normalize(z)
        return super().scale_latents(model, fmt, z)

    def unscale_latents(self, model: nn.Module, fmt: LatentFormat, z: torch.Tensor) -> torch.Tensor:
        if model.bn is not None:
            return model.bn.denormalize(z)
        return super().unscale_latents(model, fmt, z)

    def tiled(self, kind: str):
        return decode_tiled if kind == "decode" else encode_tiled

    def cache_needed(self, model: nn.Module, op: str, height: int, width: int, tile: int,
                     dtype: torch.dtype = torch.float32) -> int:
        return cache_needed(model, op, height, width, tile, dtype)

    def patched_latents(self, model: nn.Module) -> bool:
        return model.config.latent_bn

    def diffusers_peer(self, model: nn.Module) -> bool:
        return not model.config.latent_bn and model.config.decoder_ch is None

    def summary(self, model: nn.Module, fmt: LatentFormat) -> list[tuple[str, str]]:
        cfg = model.config
        widths = (cfg.encoder_widths if cfg.decoder_ch is None
                  else f"{cfg.encoder_widths} (decoder {cfg.decoder_widths})")
        lines = [("channels", f"{widths}, {cfg.num_res_blocks} res blocks per level, quant convs: "
                              f"{'yes' if cfg.use_quant_conv else 'no'}, GroupNorm groups {cfg.norm_groups}")]
        if cfg.latent_bn:
            lines.append(("latent norm", f"BatchNorm statistics over 2×2-patchified latents "
                                         f"({4 * cfg.latent_channels} channels, eps {cfg.bn_eps}): scale_latents "
                                         "gives the Flux.2 transformer's latents"))
        return lines

    def file_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
        if layout == "diffusers":
            sd = {k: v.contiguous() for k, v in ldm_to_diffusers(sd).items()}
        if model.config.latent_bn:  # Flux.2: BatchNorm bookkeeping as in the originals; BFL nests the quant convs
            sd["bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
            if layout == "ldm":
                sd = nest_flux2(sd)
        return sd

    def diffusers_config(self, model: nn.Module, fmt: LatentFormat) -> dict[str, Any]:
        return diffusers_config(model.config, fmt.scaling_factor, fmt.shift_factor)


KL = KLFamily("kl", "AutoencoderKL (SD1/2, SDXL, SD3, Flux.1, Flux.2)", AutoencoderKL, ModelConfig, fp16_fix_model)
