"""``load_vae`` and ``save_vae``: any supported file or folder in, a ready :class:`~vae_core.vae.Vae` out."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch

from .convert import diffusers_config, infer_config, ldm_to_diffusers, to_ldm
from .errors import VaeLoadError
from .families import resolve_family
from .formats import RawWeights, read_weights
from .model import AutoencoderKL, ModelConfig, count_parameters
from .precision import DTYPES
from .vae import Vae, VaeInfo

__all__ = ["load_vae", "save_vae", "ldm_state_dict_from_file", "vae_from_state_dict"]

log = logging.getLogger(__name__)
def parse_dtype(value: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """``"fp16"|"bf16"|"fp32"`` (or a torch dtype) → torch dtype; None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"dtype {value!r}: unknown; expected one of fp16, bf16, fp32")
    return DTYPES[value]


def _check_config(raw: RawWeights) -> Optional[int]:
    cfg = raw.config
    if not cfg:
        return None
    where = raw.weights_file.parent / "config.json"
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise VaeLoadError(where, f"_class_name {cfg.get('_class_name')!r}", "'AutoencoderKL'")
    if cfg.get("act_fn", "silu") != "silu":
        raise VaeLoadError(where, f"act_fn {cfg.get('act_fn')!r}", "'silu'")
    if cfg.get("mid_block_add_attention", True) is False:
        raise VaeLoadError(where, "mid_block_add_attention false", "a mid block with attention (SD-family VAE)")
    groups = cfg.get("norm_num_groups")
    return int(groups) if isinstance(groups, int) and groups > 0 else None


def ldm_state_dict_from_file(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], RawWeights, str, str]:
    """Read any supported VAE file/folder and return its VAE weights with LDM keys.

    Returns:
        ``(ldm_state_dict, raw, layout, prefix)``; tensors keep their stored dtype.
    Raises:
        VaeLoadError: unreadable input or no VAE in it.
    """
    raw = read_weights(path)
    sd, layout = to_ldm(raw.state_dict, raw.weights_file)
    return sd, raw, layout.layout, layout.prefix


def _build(sd: dict[str, torch.Tensor], cfg: ModelConfig, path: object) -> AutoencoderKL:
    with torch.device("meta"):  # no random init: it would cost time and consume the caller's RNG
        model = AutoencoderKL(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise VaeLoadError(path, f"{len(missing)} missing keys {missing[:4]} and {len(unexpected)} unexpected keys "
                           f"{unexpected[:4]} for an AutoencoderKL with {cfg.ch_mult} levels × "
                           f"{cfg.num_res_blocks} blocks", "exactly the keys of that AutoencoderKL")
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if bad:
        raise VaeLoadError(path, f"{len(bad)} shape mismatches ({'; '.join(bad[:3])})",
                           "tensor shapes consistent with the inferred config")
    non_float = [k for k, v in sd.items() if not v.is_floating_point()]
    if non_float:
        raise VaeLoadError(path, f"non-float tensors {non_float[:3]}", "floating-point weights")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _assemble(sd: dict[str, torch.Tensor], *, where: object, path: object, container: str, layout: str,
              prefix: str, all_keys, norm_groups: Optional[int], config: Optional[dict],
              metadata: Optional[dict], weights_file: str, family_kw: dict) -> Vae:
    cfg = infer_config(sd, where, norm_groups)
    model = _build(sd, cfg, where)
    fam, scale, shift, sources = resolve_family(
        cfg.latent_channels, config=config, metadata=metadata, checkpoint_keys=all_keys if prefix else (),
        path=Path(path) if isinstance(path, (str, os.PathLike)) else None, **family_kw)
    stored = {str(v.dtype).replace("torch.", "") for v in sd.values()}
    info = VaeInfo(path=str(path), container=container, layout=layout, prefix=prefix, family=fam,
                   latent_channels=cfg.latent_channels, scaling_factor=scale, shift_factor=shift,
                   stored_dtype="/".join(sorted(stored)), parameters=count_parameters(model), config=cfg,
                   sources=sources, weights_file=weights_file)
    log.info("loaded %s: %s VAE from %s (%s layout%s), %d latent channels", path, fam, container, layout,
             f", prefix {prefix!r}" if prefix else "", cfg.latent_channels)
    return Vae(model, info)


def vae_from_state_dict(sd: dict[str, torch.Tensor], *, name: str = "<state dict>", norm_groups: Optional[int] = None,
                        family: Optional[str] = None, scaling_factor: Optional[float] = None,
                        shift_factor: Optional[float] = None) -> Vae:
    """Build a float32 :class:`Vae` (on the tensors' device) from an in-memory LDM- or diffusers-keyed state dict,
    bare or prefixed, e.g. the weights of a VAE a host already holds."""
    vae_sd, layout = to_ldm(sd, name)
    return _assemble(vae_sd, where=name, path=name, container="state dict", layout=layout.layout,
                     prefix=layout.prefix, all_keys=sd.keys(), norm_groups=norm_groups, config=None, metadata=None,
                     weights_file="", family_kw=dict(family=family, scaling_factor=scaling_factor,
                                                     shift_factor=shift_factor))


def load_vae(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
             dtype: Union[str, torch.dtype, None] = torch.float32, *, family: Optional[str] = None,
             scaling_factor: Optional[float] = None, shift_factor: Optional[float] = None) -> Vae:
    """Load any SD-family VAE file or folder, detecting its format from its keys.

    Args:
        path: ``.safetensors``/``.sft`` (LDM or diffusers keys, bare or in a full checkpoint), ``.ckpt``/``.pt``/
            ``.pth``/``.bin`` pickles (read with ``weights_only=True``), or a diffusers (pipeline) folder.
        device, dtype: where and in which precision the model runs (``"fp16"``/``"bf16"``/``"fp32"``/``"auto"``).
        family, scaling_factor, shift_factor: override what the file says (e.g. ``family="sdxl"``).
    Returns:
        a :class:`Vae` whose ``info`` says what was found and where each value came from.
    Raises:
        VaeLoadError: the path holds no loadable SD-family VAE (message names path, finding and expectation).
    """
    sd, raw, layout, prefix = ldm_state_dict_from_file(path)
    vae = _assemble(sd, where=raw.weights_file, path=path, container=raw.container, layout=layout, prefix=prefix,
                    all_keys=raw.state_dict.keys(), norm_groups=_check_config(raw), config=raw.config,
                    metadata=raw.metadata, weights_file=str(raw.weights_file),
                    family_kw=dict(family=family, scaling_factor=scaling_factor, shift_factor=shift_factor))
    return vae.to(device=device, dtype=dtype)


def save_vae(vae: Vae, path: Union[str, os.PathLike], layout: str = "ldm",
             dtype: Union[str, torch.dtype, None] = None) -> Path:
    """Write ``vae`` as a ``.safetensors`` file (``layout="ldm"`` or ``"diffusers"`` keys) or, when ``path`` has
    no ``.safetensors`` suffix and ``layout="diffusers"``, as a diffusers folder (config.json + weights).

    Returns:
        the path written. Scaling/shift factors and the family go into safetensors metadata (and config.json).
    """
    from safetensors.torch import save_file

    if layout not in ("ldm", "diffusers"):
        raise ValueError(f"layout={layout!r}: expected 'ldm' or 'diffusers'")
    target = parse_dtype(dtype)
    sd = {k: (v.to(target) if target else v).detach().to("cpu").contiguous() for k, v in vae.model.state_dict().items()}
    if layout == "diffusers":
        sd = {k: v.contiguous() for k, v in ldm_to_diffusers(sd).items()}
    info = vae.info
    meta = {"format": "pt", "vae_layout": layout, "family": info.family, "scaling_factor": repr(info.scaling_factor),
            "latent_channels": str(info.latent_channels)}
    if info.shift_factor is not None:
        meta["shift_factor"] = repr(info.shift_factor)
    out = Path(path)
    if layout == "diffusers" and out.suffix.lower() not in (".safetensors", ".sft"):
        out.mkdir(parents=True, exist_ok=True)
        cfg = diffusers_config(vae.model.config, info.scaling_factor, info.shift_factor)
        (out / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        save_file(sd, str(out / "diffusion_pytorch_model.safetensors"), metadata=meta)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata=meta)
    return out
