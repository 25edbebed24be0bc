"""The tiny family: TAESD-design autoencoders (TAESD, TAESDXL, TAESD3, TAEF1, TAEF2). madebyollin's encoder/decoder
halves (a half picks up its twin beside it), ComfyUI's ``taesd_*`` keys, diffusers' ``AutoencoderTiny``; latent
scaling from ``vae_scale``/``vae_shift``, TAEF2's pool blocks or the file name; no fp16 fix (none needed); exact
tiling by halos (TAEF2's pool blocks run whole, at latent resolution)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ...errors import VaeInputError
from ..base import Canonical, HaloFamily, LatentFormat, LoadRequest
from .convert import canonical_to_diffusers, is_tiny, merge_halves, tiny_config, tiny_family, tiny_to_canonical
from .model import TinyAutoencoder, TinyConfig

__all__ = ["TINY"]

#: prefixes under which a host module may hold a tiny autoencoder (ComfyUI's engine-backed VAE: ``vae.``)
_HOST_PREFIXES = ("vae.", "first_stage_model.")


def _other_half(path: Path, layout: str) -> Optional[Path]:
    """The sibling file holding the other half of a TAESD (``taesd_encoder.pth`` ↔ ``taesd_decoder.pth``, any suffix
    of the same kind), or None."""
    mine, other = ("encoder", "decoder") if layout == "original-encoder" else ("decoder", "encoder")
    if mine not in path.name:
        return None
    twin = path.with_name(path.name.replace(mine, other))
    return twin if twin.is_file() and twin != path else None


def _unprefixed(sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if is_tiny(sd):
        return sd
    for prefix in _HOST_PREFIXES:
        sub = {k[len(prefix):]: t for k, t in sd.items() if k.startswith(prefix)}
        if sub and is_tiny(sub):
            return sub
    return sd


_NO_FIX = ("a tiny autoencoder has no normalisation and small activations in its main stream, TAEF2's GroupNorms sit "
           "in side branches: run it in fp16 as it is")


class TinyFamily(HaloFamily):
    """The tiny family (see the module docstring)."""

    deterministic = True

    def recognises(self, sd: Mapping[str, torch.Tensor]) -> bool:
        return is_tiny(_unprefixed(sd))

    def canonical(self, sd: Mapping[str, torch.Tensor], where: object, request: LoadRequest) -> Canonical:
        canon, layout = tiny_to_canonical(_unprefixed(sd), where)
        sources: dict[str, str] = {}
        if layout.startswith("original-") and request.read_sibling is not None and request.weights_file is not None:
            twin = _other_half(Path(request.weights_file), layout)
            if twin is not None:
                other, other_layout = tiny_to_canonical(request.read_sibling(twin), twin)
                if other_layout != layout and other_layout.startswith("original-"):
                    canon = merge_halves(canon, other) if layout == "original-encoder" else merge_halves(other, canon)
                    sources["weights"] = f"{Path(request.weights_file).name} + {twin.name}"
        return Canonical(canon, f"taesd-{layout}", "", sources)

    def config(self, canon: Canonical, where: object, request: LoadRequest) -> TinyConfig:
        return tiny_config(canon.state_dict, where)

    def describe(self, config: TinyConfig) -> str:
        return f"a TAESD-design {'encoder+decoder' if config.has_encoder and config.has_decoder else 'half'}"

    def latent_format(self, config: TinyConfig, canon: Canonical, request: LoadRequest) -> LatentFormat:
        sd = canon.state_dict
        if request.host:  # a host without TAESD's latent scaling (AutoencoderTiny) speaks TAESD's own latents
            scalars = {k: sd[k].float().cpu() for k in ("vae_scale", "vae_shift") if k in sd}
            fam, scale, shift, src = tiny_family(config.latent_channels, scalars or {"vae_scale": torch.tensor(1.0)},
                                                 pool=config.pool)
        else:
            name = Path(str(request.weights_file or request.path or "")).name
            fam, scale, shift, src = tiny_family(config.latent_channels, sd, request.family, name_hint=name,
                                                 pool=config.pool)
        tensors = {"vae_scale": torch.tensor(float(scale)), "vae_shift": torch.tensor(float(shift))}
        return LatentFormat(fam, scale, shift or None, {"family": src, "scaling_factor": src, "shift_factor": src},
                            tensors)

    def summary(self, model: nn.Module, fmt: LatentFormat) -> list[tuple[str, str]]:
        cfg = model.config
        halves = " + ".join(h for h, ok in (("encoder", cfg.has_encoder), ("decoder", cfg.has_decoder)) if ok)
        if cfg.pool:
            return [("network", f"tiny autoencoder (TAEF2: TAESD design, 64 channels, GroupNorm pool branches in the "
                                f"six latent-resolution blocks): {halves}; tiling is exact with halos, the pool "
                                "blocks run untiled at latent resolution; TAEF2's own latents in and out")]
        return [("network", f"tiny autoencoder (TAESD design, 64 channels, no norm, no attention): {halves}; tiling "
                            "is exact with halos; raw latents in and out (vae_scale/vae_shift at the boundary)")]

    def check_save(self, model: nn.Module, layout: str, what: str) -> None:
        if model.config.pool and layout == "diffusers":
            raise VaeInputError(f"save_vae(layout='diffusers') of {what}: diffusers' AutoencoderTiny has no pool "
                                "(GroupNorm) blocks, so it could not load the file; expected layout='ldm' (ComfyUI's "
                                "taesd_* keys)")

    def file_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
        # ComfyUI's single-file form, or diffusers' AutoencoderTiny
        if layout == "diffusers":
            return canonical_to_diffusers(sd)
        return {re.sub(r"^(encoder|decoder)\.", r"taesd_\1.", k): v for k, v in sd.items()}

    def diffusers_config(self, model: nn.Module, fmt: LatentFormat) -> dict[str, Any]:
        return {"_class_name": "AutoencoderTiny", "latent_channels": model.config.latent_channels,
                "scaling_factor": 1.0, "shift_factor": 0.0}


TINY = TinyFamily("tiny", "tiny autoencoder (TAESD design)", TinyAutoencoder, TinyConfig,
                  no_fp16_fix=_NO_FIX,
                  found="a tiny autoencoder (TAESD design: no quant convs, no mid attention)")
