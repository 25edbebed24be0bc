"""``load_vae`` and ``save_vae``: any supported file or folder in, a ready :class:`~vae_core.vae.Vae` out. The format
comes from the keys: the family registry (:mod:`vae_core.families.registry`) recognises the family, and the family
renames, configures, builds and describes it; this module only reads files and assembles the result."""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from .errors import VaeInputError, VaeLoadError
from .families.base import (Canonical, Family, LatentFormat, LoadRequest, build_exact, check_tensors, count_parameters,
                            weights_note)
from .families.kl.family import KL
from .families.registry import detect
from .families.scaling import check_factor
from .io.atomic import atomic_write, same_file, save_safetensors
from .io.formats import DIFFUSERS_NAMES, RawWeights, check_tensor_kinds, read_index, read_weights
from .precision.dtypes import parse_dtype
from .vae import Vae, VaeInfo

__all__ = ["load_vae", "save_vae", "ldm_state_dict_from_file", "kl_family_of", "vae_from_state_dict", "parse_dtype",
           "check_tensors"]

log = logging.getLogger(__name__)


def assemble(family: Family, sd: Mapping[str, torch.Tensor], where: object, request: LoadRequest, *,
             container: str) -> Vae:
    """One loader for every family: canonical keys, checked tensors, config from shapes, latent format, an exactly
    loaded float32 network on the CPU and the :class:`VaeInfo` saying where each fact came from.

    Args:
        sd: the tensors as found (any layout of ``family``); ``where``: what errors name (the weights file).
    Raises:
        VaeLoadError / VaeInputError: naming the file, what was found and what was expected.
    """
    canon = family.canonical(sd, where, request)
    check_tensors(canon.state_dict, where)
    cfg = family.config(canon, where, request)  # bounds sizes before anything is built
    fmt = family.latent_format(cfg, canon, request)
    model = build_exact(family, cfg, canon.state_dict, fmt, where)
    dtypes = {str(v.dtype).replace("torch.", "") for v in canon.state_dict.values()}
    info = VaeInfo(path=str(request.path), container=container, layout=canon.layout, prefix=canon.prefix,
                   family=fmt.family, latent_channels=cfg.latent_channels, scaling_factor=fmt.scaling_factor,
                   shift_factor=fmt.shift_factor, stored_dtype="/".join(sorted(dtypes)),
                   parameters=count_parameters(model), config=cfg,
                   sources=fmt.sources | canon.sources | weights_note(canon.state_dict),
                   weights_file=str(request.weights_file or ""))
    log.info("loaded %s: %s %s VAE from %s (%s layout%s), %d latent channels", request.path, family.label,
             fmt.family, container, canon.layout, f", prefix {canon.prefix!r}" if canon.prefix else "",
             cfg.latent_channels)
    return Vae(model, info)


def ldm_state_dict_from_file(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], RawWeights, str, str]:
    """Read any supported file/folder holding an AutoencoderKL and return its VAE weights with LDM keys (what A1111
    loads into its own VAE).

    Returns:
        ``(ldm_state_dict, raw, layout, prefix)``; tensors keep their stored dtype.
    Raises:
        VaeLoadError: unreadable input, no VAE in it, or a VAE of another family (named).
    """
    raw = read_weights(path)
    family = detect(raw.state_dict)
    if family is not KL:
        raise VaeLoadError(raw.weights_file, family.found, "an AutoencoderKL here (load_vae reads this family "
                           f"too: {family.label})")
    canon = KL.canonical(raw.state_dict, raw.weights_file, LoadRequest())
    return canon.state_dict, raw, canon.layout, canon.prefix


def kl_family_of(sd: Mapping[str, torch.Tensor], path: object) -> tuple[Any, str]:
    """``(config, latent family)`` of an LDM-keyed AutoencoderKL state dict (e.g. from
    :func:`ldm_state_dict_from_file`), decided as :func:`load_vae` decides them (``sd1``, ``sd3``, ``flux2``, ...).

    Raises:
        VaeLoadError: shapes that are no AutoencoderKL, naming the key.
    """
    canon = Canonical(dict(sd), "ldm")
    request = LoadRequest(path=Path(str(path)))
    cfg = KL.config(canon, path, request)
    return cfg, KL.latent_format(cfg, canon, request).family


def _user_settings(family: Family, settings: Optional[Mapping[str, Any]], where: object) -> dict[str, Any]:
    """``settings`` checked against what ``family`` takes (a setting another family would take is refused by name,
    not ignored)."""
    out = dict(settings or {})
    unknown = sorted(set(out) - set(family.user_settings))
    if unknown:
        allowed = ", ".join(family.user_settings) or "none"
        raise VaeInputError(f"{where}: setting(s) {', '.join(map(repr, unknown))} for {family.label}; expected "
                            f"settings this family takes: {allowed}")
    for key, value in out.items():
        if value is None:
            raise VaeInputError(f"{where}: setting {key!r} = None; expected a value (leave it out for the default)")
    groups = out.get("norm_groups")
    if groups is not None and (type(groups) is not int or groups < 1):
        raise VaeInputError(f"{where}: setting 'norm_groups' = {groups!r}; expected a positive int (GroupNorm groups)")
    return out


def vae_from_state_dict(sd: dict[str, torch.Tensor], *, name: str = "<state dict>", norm_groups: Optional[int] = None,
                        family: Optional[str] = None, scaling_factor: Optional[float] = None,
                        shift_factor: Optional[float] = None, settings: Optional[Mapping[str, Any]] = None) -> Vae:
    """Build a float32 :class:`Vae` (on the CPU) from an in-memory state dict of any family, bare or prefixed
    (LDM or diffusers keys for an AutoencoderKL), e.g. the weights of a VAE a host already holds; ``settings`` as
    :func:`load_vae` takes them."""
    check_tensor_kinds(sd, name)
    fam = detect(sd)
    chosen = _user_settings(fam, settings, name) | ({"norm_groups": norm_groups} if norm_groups else {})
    request = LoadRequest(family=family, scaling_factor=scaling_factor, shift_factor=shift_factor, path=name,
                          all_keys=sd.keys(), settings=chosen)
    return assemble(fam, sd, name, request, container="state dict")


def load_vae(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
             dtype: Union[str, torch.dtype, None] = torch.float32, *, family: Optional[str] = None,
             scaling_factor: Optional[float] = None, shift_factor: Optional[float] = None,
             settings: Optional[Mapping[str, Any]] = None) -> Vae:
    """Load any supported VAE file or folder, detecting its format from its keys.

    Args:
        path: ``.safetensors``/``.sft`` (LDM or diffusers keys, bare or in a full checkpoint), ``.ckpt``/``.pt``/
            ``.pth``/``.bin`` pickles (read with ``weights_only=True``), or a diffusers (pipeline) folder; any
            family (:mod:`vae_core.families.registry`): AutoencoderKL, Qwen-Image's, the tiny autoencoders.
        device, dtype: where and in which precision the model runs (``"fp16"``/``"bf16"``/``"fp32"``/``"auto"``).
        family, scaling_factor, shift_factor: override what the file says (e.g. ``family="sdxl"``).
        settings: what the weights cannot say, per family (``Family.user_settings``): HunyuanVideo 1.0
            ``chunked=True`` runs newer ComfyUI's chunked schedule (GroupNorm per 2-latent-frame chunk; memory
            independent of the clip length) instead of the whole-clip reference, ``causal_attention=False`` its
            unmasked mid-block attention; an AutoencoderKL's ``norm_groups``. Other keys are refused by name.
    Returns:
        a :class:`Vae` whose ``info`` says what was found and where each value came from.
    Raises:
        VaeLoadError: the path holds no loadable VAE (message names path, finding and expectation).
        VaeInputError: a setting the family does not take, or of the wrong type (named).
    """
    raw = read_weights(path)
    fam = detect(raw.state_dict)
    request = LoadRequest(family=family, scaling_factor=scaling_factor, shift_factor=shift_factor, path=path,
                          settings=_user_settings(fam, settings, raw.weights_file),
                          weights_file=raw.weights_file, config=raw.config,
                          config_path=raw.weights_file.parent / "config.json" if raw.config is not None else None,
                          metadata=raw.metadata, all_keys=raw.state_dict.keys(),
                          read_sibling=lambda twin: read_weights(twin).state_dict)
    vae = assemble(fam, raw.state_dict, raw.weights_file, request, container=raw.container)
    return vae.to(device=device, dtype=dtype)


_SHARD_NAME = re.compile(r"^diffusion_pytorch_model(\.fp16)?-\d{5}-of-\d{5}\.(safetensors|bin)$")


def _refuse_own_input(vae: Vae, targets: list[Path], folder: Optional[Path]) -> None:
    """Raise VaeInputError when a file about to be written (or the folder written into) is what ``vae`` was read
    from (through symlinks and hardlinks too)."""
    info = vae.info
    sources = [Path(p) for p in (info.weights_file, info.path) if p and not str(p).startswith("<")]
    for src in sources:
        for out in targets + ([folder] if folder is not None else []):
            if same_file(out, src):
                raise VaeInputError(f"{out}: this is the file/folder the VAE was loaded from ({src}); expected an "
                                    "output path other than the input (writing it would destroy the input)")
    if folder is not None and info.container == "diffusers-folder" and info.weights_file:
        if same_file(folder, Path(info.weights_file).parent):
            raise VaeInputError(f"{folder}: the diffusers folder the VAE was loaded from ({info.weights_file}); "
                                "expected another output folder")


def _remove_stale_weights(folder: Path, written: Path) -> None:
    """After ``written`` is in place, delete shard indexes in ``folder`` (which the loader reads before a single
    file) and the diffusers-named shards they list; warn about other weight variants left in place."""
    for name in DIFFUSERS_NAMES:
        index = folder / (name + ".index.json")
        if not index.is_file():
            continue
        try:
            shards = set(read_index(index).values())
        except VaeLoadError as exc:
            log.warning("removing unreadable stale shard index %s (%s); its shards are left alone", index, exc)
            shards = set()
        index.unlink()
        removed = []
        for shard in sorted(shards):
            cand = folder / shard
            if _SHARD_NAME.match(shard) and cand.is_file() and not same_file(cand, written):
                cand.unlink()
                removed.append(shard)
        log.info("%s: removed the stale shard index %s and %d shards it named", folder, index.name, len(removed))
    others = [n for n in DIFFUSERS_NAMES if (folder / n).is_file() and not same_file(folder / n, written)]
    if others:
        log.warning("%s: other weight variants from before are left in place: %s (the loader reads %s first)",
                    folder, others, written.name)


def save_vae(vae: Vae, path: Union[str, os.PathLike], layout: str = "ldm",
             dtype: Union[str, torch.dtype, None] = None) -> Path:
    """Write ``vae`` as a ``.safetensors`` file (``layout="ldm"`` or ``"diffusers"`` keys) or, when ``path`` has
    no ``.safetensors``/``.sft`` suffix and ``layout="diffusers"``, as a diffusers folder (config.json + weights).

    Every file is written atomically (temp file in the same folder, fsync, ``os.replace``; an existing file keeps
    its permission bits; on failure nothing changes). Into an existing diffusers folder, a stale shard index and the
    shards it names are removed afterwards, so the folder loads the new weights.

    Args:
        dtype: ``"fp16"``/``"bf16"``/``"fp32"`` or a floating torch dtype to cast to; None keeps the model's dtype.
    Returns:
        the path written. Scaling/shift factors and the family go into safetensors metadata (and config.json).
    Raises:
        VaeInputError (a ValueError): unknown layout/dtype, non-finite or non-positive scaling factor, non-finite
            shift factor, or a target that is the file/folder the VAE was loaded from.
    """
    if layout not in ("ldm", "diffusers"):
        raise VaeInputError(f"layout={layout!r}: unknown; expected 'ldm' or 'diffusers'")
    target = parse_dtype(dtype, allow_auto=False)
    info = vae.info
    scale = check_factor(info.scaling_factor, "scaling_factor", "vae.info.scaling_factor", positive=True)
    shift = check_factor(info.shift_factor, "shift_factor", "vae.info.shift_factor", positive=False)
    out = Path(path)
    as_folder = layout == "diffusers" and out.suffix.lower() not in (".safetensors", ".sft")
    if not as_folder and out.is_dir():
        raise VaeInputError(f"{out}: is a folder; expected a file path for a {layout} .safetensors file "
                            "(layout='diffusers' with a path without .safetensors writes a diffusers folder)")
    if as_folder and out.exists() and not out.is_dir():
        raise VaeInputError(f"{out}: is an existing file; expected a folder (or a new path) for a diffusers folder")
    weights = out / "diffusion_pytorch_model.safetensors" if as_folder else out
    _refuse_own_input(vae, [weights] + ([out / "config.json"] if as_folder else []), out if as_folder else None)

    family = vae.family
    family.check_save(vae.model, layout, f"a {info.family} VAE ({info.path})")
    sd = {k: (v.to(target) if target else v).detach().to("cpu").contiguous() for k, v in vae.model.state_dict().items()}
    sd = family.file_state_dict(vae.model, sd, layout)
    meta = {"format": "pt", "vae_layout": layout, "family": info.family, "scaling_factor": repr(scale),
            "latent_channels": str(info.latent_channels)}
    if shift is not None:
        meta["shift_factor"] = repr(shift)
    meta |= family.file_metadata(vae.model, layout)
    if as_folder:
        config = family.diffusers_config(vae.model, LatentFormat(info.family, scale, shift, info.sources))
        cfg_text = json.dumps(config, indent=2, allow_nan=False)
        out.mkdir(parents=True, exist_ok=True)
        save_safetensors(weights, sd, meta)
        atomic_write(out / "config.json", lambda tmp: tmp.write_text(cfg_text, encoding="utf-8"))
        _remove_stale_weights(out, weights)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(out, sd, meta)
    return out
