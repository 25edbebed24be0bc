"""``load_vae`` and ``save_vae``: any supported file or folder in, a ready :class:`~vae_core.vae.Vae` out."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch

from .atomic import atomic_write, same_file, save_safetensors
from .convert import MAX_NORM_GROUPS, diffusers_config, infer_config, ldm_to_diffusers, nest_flux2, to_ldm
from .errors import VaeInputError, VaeLoadError
from .families import check_factor, check_factors, resolve_family
from .formats import DIFFUSERS_NAMES, RawWeights, check_tensor_kinds, read_index, read_weights
from .convert_wan import canonical_to_diffusers as wan_to_diffusers
from .convert_wan import is_wan, wan_config, wan_to_canonical
from .convert_tiny import canonical_to_diffusers, is_tiny, merge_halves, tiny_config, tiny_family, tiny_to_canonical
from .model import AutoencoderKL, ModelConfig, count_parameters
from .model_tiny import TinyAutoencoder
from .model_wan import WanImageVAE
from .precision import parse_dtype
from .vae import Vae, VaeInfo

__all__ = ["load_vae", "save_vae", "ldm_state_dict_from_file", "vae_from_state_dict", "parse_dtype", "check_tensors"]

log = logging.getLogger(__name__)

#: float8 dtypes (weights stored in fp8 to halve files); torch has no isfinite for them, so they are checked (and run)
#: upcast: every float8 value is exact in float16 and float32.
FLOAT8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
               if hasattr(torch, name))


def weights_note(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """``info.sources`` entries about how stored tensors are run: float8 weights are upcast (exactly) on load."""
    f8 = sorted({str(v.dtype).replace("torch.", "") for v in sd.values() if v.dtype in FLOAT8})
    return {"dtype": f"{'/'.join(f8)} tensors upcast to float32 on load (every float8 value is exact there); "
                       "run in the precision asked for"} if f8 else {}


def check_tensors(sd: dict[str, torch.Tensor], path: object) -> None:
    """Refuse weights that would load wrong or blow up later, naming the tensors (first few).

    Checks, cheapest first: tensor kinds (:func:`~vae_core.formats.check_tensor_kinds`: no meta, sparse, nested,
    quantized or overlapping tensors), no zero-sized tensors, floating-point dtypes, and finite values
    (``torch.isfinite(t).all()`` per tensor).

    Raises:
        VaeLoadError: naming up to three offending tensors and what was wrong with them.
    """
    def fail(found: str, keys: list[str], expected: str) -> None:
        raise VaeLoadError(path, f"{found} in {len(keys)} tensor(s): {keys[:3]}", expected)

    check_tensor_kinds(sd, path)
    empty = [f"{k} {tuple(v.shape)}" for k, v in sd.items() if v.numel() == 0]
    if empty:
        fail("zero-sized tensors", empty, "non-empty weights")
    non_float = [f"{k} ({v.dtype})" for k, v in sd.items() if not v.is_floating_point()]
    if non_float:
        fail("non-float tensors", non_float, "floating-point weights")
    bad = [k for k, v in sd.items() if not bool(torch.isfinite(v.half() if v.dtype in FLOAT8 else v).all())]
    if bad:
        fail("NaN/inf values", bad, "finite weights (the file is corrupt or was saved from a diverged model)")


_CLASSES = ("AutoencoderKL", "AutoencoderKLFlux2")


def _check_config(raw: RawWeights) -> dict:
    """Settings a diffusers ``config.json`` gives that shapes cannot: ``norm_groups`` and (Flux.2) ``bn_eps``."""
    cfg = raw.config
    if not cfg:
        return {}
    where = raw.weights_file.parent / "config.json"
    if cfg.get("_class_name", "AutoencoderKL") not in _CLASSES:
        raise VaeLoadError(where, f"_class_name {cfg.get('_class_name')!r}", f"one of {_CLASSES}")
    if cfg.get("act_fn", "silu") != "silu":
        raise VaeLoadError(where, f"act_fn {cfg.get('act_fn')!r}", "'silu'")
    if cfg.get("mid_block_add_attention", True) is False:
        raise VaeLoadError(where, "mid_block_add_attention false", "a mid block with attention (SD-family VAE)")
    out: dict = {}
    groups = cfg.get("norm_num_groups")
    if groups is not None:
        if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= MAX_NORM_GROUPS:
            raise VaeLoadError(where, f"norm_num_groups {groups!r}", f"an integer from 1 to {MAX_NORM_GROUPS} "
                               "(SD-family VAEs use 32)")
        out["norm_groups"] = groups
    eps = cfg.get("batch_norm_eps")
    if eps is not None:
        value = check_factor(eps, "batch_norm_eps", "config.json", positive=True, path=where)
        if value is not None and value > 1.0:
            raise VaeLoadError(where, f"batch_norm_eps {eps!r}", "a small positive number (Flux.2 uses 1e-4)")
        out["bn_eps"] = value
    return out


def ldm_state_dict_from_file(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], RawWeights, str, str]:
    """Read any supported VAE file/folder and return its VAE weights with LDM keys.

    Returns:
        ``(ldm_state_dict, raw, layout, prefix)``; tensors keep their stored dtype.
    Raises:
        VaeLoadError: unreadable input or no VAE in it.
    """
    raw = read_weights(path)
    if is_tiny(raw.state_dict):
        raise VaeLoadError(raw.weights_file, "a tiny autoencoder (TAESD design: no quant convs, no mid attention)",
                           "an AutoencoderKL here (load_vae reads tiny autoencoders too)")
    if is_wan(raw.state_dict):
        raise VaeLoadError(raw.weights_file, "a Qwen-Image / Wan 2.1-design VAE (causal 3-D convs, RMS norm)",
                           "an AutoencoderKL here (load_vae reads Qwen-Image's VAE too)")
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
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _assemble(sd: dict[str, torch.Tensor], *, where: object, path: object, container: str, layout: str,
              prefix: str, all_keys, settings: dict, config: Optional[dict],
              metadata: Optional[dict], weights_file: str, family_kw: dict,
              config_path: Optional[Path] = None) -> Vae:
    check_tensors(sd, where)
    cfg = infer_config(sd, where, settings.get("norm_groups"))  # bounds levels/blocks before anything is built
    if "bn_eps" in settings:
        cfg = dataclasses.replace(cfg, bn_eps=settings["bn_eps"])
    fam, scale, shift, sources = resolve_family(
        cfg.latent_channels, config=config, metadata=metadata, checkpoint_keys=all_keys if prefix else (),
        path=Path(path) if isinstance(path, (str, os.PathLike)) else None, config_path=config_path,
        metadata_path=Path(weights_file) if weights_file else None, latent_bn=cfg.latent_bn, **family_kw)
    model = _build(sd, cfg, where)
    stored = {str(v.dtype).replace("torch.", "") for v in sd.values()}
    info = VaeInfo(path=str(path), container=container, layout=layout, prefix=prefix, family=fam,
                   latent_channels=cfg.latent_channels, scaling_factor=scale, shift_factor=shift,
                   stored_dtype="/".join(sorted(stored)), parameters=count_parameters(model), config=cfg,
                   sources=sources | weights_note(sd), weights_file=weights_file)
    log.info("loaded %s: %s VAE from %s (%s layout%s), %d latent channels", path, fam, container, layout,
             f", prefix {prefix!r}" if prefix else "", cfg.latent_channels)
    return Vae(model, info)


def vae_from_state_dict(sd: dict[str, torch.Tensor], *, name: str = "<state dict>", norm_groups: Optional[int] = None,
                        family: Optional[str] = None, scaling_factor: Optional[float] = None,
                        shift_factor: Optional[float] = None) -> Vae:
    """Build a float32 :class:`Vae` (on the tensors' device) from an in-memory LDM- or diffusers-keyed state dict,
    bare or prefixed, e.g. the weights of a VAE a host already holds."""
    check_tensor_kinds(sd, name)
    vae_sd, layout = to_ldm(sd, name)
    return _assemble(vae_sd, where=name, path=name, container="state dict", layout=layout.layout,
                     prefix=layout.prefix, all_keys=sd.keys(), settings={"norm_groups": norm_groups} if norm_groups
                     else {}, config=None, metadata=None,
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
    raw = read_weights(path)
    if is_tiny(raw.state_dict):
        return _load_tiny(raw, path, family).to(device=device, dtype=dtype)
    if is_wan(raw.state_dict):
        return _load_wan(raw, path, family).to(device=device, dtype=dtype)
    sd, raw, layout, prefix = ldm_state_dict_from_file(path)
    vae = _assemble(sd, where=raw.weights_file, path=path, container=raw.container, layout=layout, prefix=prefix,
                    all_keys=raw.state_dict.keys(), settings=_check_config(raw), config=raw.config,
                    metadata=raw.metadata, weights_file=str(raw.weights_file),
                    family_kw=dict(family=family, scaling_factor=scaling_factor, shift_factor=shift_factor),
                    config_path=raw.weights_file.parent / "config.json" if raw.config is not None else None)
    return vae.to(device=device, dtype=dtype)


def _other_half(path: Path, layout: str) -> Optional[Path]:
    """The sibling file holding the other half of a TAESD (``taesd_encoder.pth`` ↔ ``taesd_decoder.pth``, any suffix
    of the same kind), or None."""
    mine, other = ("encoder", "decoder") if layout == "original-encoder" else ("decoder", "encoder")
    if mine not in path.name:
        return None
    twin = path.with_name(path.name.replace(mine, other))
    return twin if twin.is_file() and twin != path else None


def _load_tiny(raw: RawWeights, path: Union[str, os.PathLike], family: Optional[str]) -> Vae:
    """A :class:`Vae` around a TAESD-design autoencoder; a half-file picks up its twin beside it."""
    where = raw.weights_file
    sd, layout = tiny_to_canonical(raw.state_dict, where)
    container, sources = raw.container, {}
    if layout.startswith("original-"):
        twin = _other_half(Path(where), layout)
        if twin is not None:
            other, other_layout = tiny_to_canonical(read_weights(twin).state_dict, twin)
            if other_layout != layout and other_layout.startswith("original-"):
                sd = merge_halves(sd, other) if layout == "original-encoder" else merge_halves(other, sd)
                sources["weights"] = f"{Path(where).name} + {twin.name}"
    check_tensors(sd, where)
    cfg = tiny_config(sd, where)
    fam, scale, shift, src = tiny_family(cfg.latent_channels, sd, family, name_hint=Path(where).name, pool=cfg.pool)
    sd.setdefault("vae_scale", torch.tensor(scale))
    sd.setdefault("vae_shift", torch.tensor(shift))
    with torch.device("meta"):
        model = TinyAutoencoder(cfg)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise VaeLoadError(where, f"{len(missing)} missing keys {missing[:4]} and {len(unexpected)} unexpected keys "
                           f"{unexpected[:4]} for a TAESD-design "
                           f"{'encoder+decoder' if cfg.has_encoder and cfg.has_decoder else 'half'}",
                           "exactly the keys of that autoencoder")
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in model.state_dict().items()
           if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise VaeLoadError(where, f"{len(bad)} shape mismatches ({'; '.join(bad[:3])})", "TAESD's shapes")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    model = model.eval().requires_grad_(False)
    stored = {str(v.dtype).replace("torch.", "") for v in raw.state_dict.values()}
    info = VaeInfo(path=str(path), container=container, layout=f"taesd-{layout}", prefix="", family=fam,
                   latent_channels=cfg.latent_channels, scaling_factor=scale, shift_factor=shift or None,
                   stored_dtype="/".join(sorted(stored)),
                   parameters=count_parameters(model), config=cfg,
                   sources={"family": src, "scaling_factor": src, "shift_factor": src, **sources, **weights_note(sd)},
                   weights_file=str(where))
    log.info("loaded %s: tiny autoencoder %s (%s layout), %d latent channels", path, fam, layout, cfg.latent_channels)
    return Vae(model, info)


#: Qwen-Image's per-channel latent statistics (its pipeline normalises raw latents with them; diffusers' defaults).
QWEN_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                     -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
QWEN_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                    1.6382, 1.1253, 2.8251, 1.9160)


def _latent_stats(raw: RawWeights, z: int) -> tuple[Optional[tuple], Optional[tuple], str]:
    cfg = raw.config or {}
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    where = raw.weights_file.parent / "config.json"
    if mean is not None or std is not None:
        mean = check_factors(mean, "latents_mean", "config.json", positive=False, count=z, path=where)
        std = check_factors(std, "latents_std", "config.json", positive=True, count=z, path=where)
        return mean, std, "config.json"
    if z == len(QWEN_LATENTS_MEAN):
        return QWEN_LATENTS_MEAN, QWEN_LATENTS_STD, "Qwen-Image's defaults (16 channels)"
    return None, None, f"none known for {z} channels"


def _load_wan(raw: RawWeights, path: Union[str, os.PathLike], family: Optional[str]) -> Vae:
    """A :class:`Vae` around Qwen-Image's (Wan 2.1-design) VAE, run on single images."""
    where = raw.weights_file
    sd, layout, prefix = wan_to_canonical(raw.state_dict, where)
    if family not in (None, "qwen-image"):
        raise VaeInputError(f"family={family!r} for a Qwen-Image / Wan 2.1-design VAE; expected 'qwen-image'")
    check_tensors(sd, where)
    cfg, temporal = wan_config(sd, where)
    with torch.device("meta"):
        model = WanImageVAE(cfg, temporal)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise VaeLoadError(where, f"{len(missing)} missing keys {missing[:4]} and {len(unexpected)} unexpected keys "
                           f"{unexpected[:4]} for a Wan 2.1-design VAE of base width {cfg.base_dim}",
                           "exactly the keys of that VAE")
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in model.state_dict().items()
           if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise VaeLoadError(where, f"{len(bad)} shape mismatches ({'; '.join(bad[:3])})", "shapes of that VAE")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    model.latents_mean = torch.zeros(cfg.z_dim)
    model.latents_std = torch.ones(cfg.z_dim)
    mean, std, src = _latent_stats(raw, cfg.z_dim)
    if mean is not None:
        model.latents_mean, model.latents_std = torch.tensor(mean), torch.tensor(std)
    model = model.eval().requires_grad_(False)
    stored = {str(v.dtype).replace("torch.", "") for v in raw.state_dict.values()}
    info = VaeInfo(path=str(path), container=raw.container, layout=f"wan-{layout}", prefix=prefix,
                   family="qwen-image", latent_channels=cfg.z_dim, scaling_factor=1.0, shift_factor=None,
                   stored_dtype="/".join(sorted(stored)), parameters=count_parameters(model), config=cfg,
                   sources={"family": "keys (Wan 2.1 design)", "scaling_factor": f"per-channel statistics: {src}",
                            "shift_factor": f"per-channel statistics: {src}", **weights_note(sd)},
                   weights_file=str(where))
    log.info("loaded %s: Qwen-Image / Wan 2.1-design VAE (%s layout), %d latent channels", path, layout, cfg.z_dim)
    return Vae(model, info)


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

    if isinstance(vae.model, TinyAutoencoder) and vae.model.config.pool and layout == "diffusers":
        raise VaeInputError(f"save_vae(layout='diffusers') of a {info.family} VAE ({info.path}): diffusers' "
                            "AutoencoderTiny has no pool (GroupNorm) blocks, so it could not load the file; expected "
                            "layout='ldm' (ComfyUI's taesd_* keys)")
    sd = {k: (v.to(target) if target else v).detach().to("cpu").contiguous() for k, v in vae.model.state_dict().items()}
    if isinstance(vae.model, TinyAutoencoder):  # ComfyUI's single-file form, or diffusers' AutoencoderTiny
        sd = canonical_to_diffusers(sd) if layout == "diffusers" else \
            {re.sub(r"^(encoder|decoder)\.", r"taesd_\1.", k): v for k, v in sd.items()}
    elif isinstance(vae.model, WanImageVAE):  # the original Wan 2.1 names, or AutoencoderKLQwenImage's
        if layout == "diffusers":
            sd = wan_to_diffusers(sd, vae.model.config.num_res_blocks)
    elif layout == "diffusers":
        sd = {k: v.contiguous() for k, v in ldm_to_diffusers(sd).items()}
    if getattr(vae.model.config, "latent_bn", False):  # Flux.2: BatchNorm bookkeeping as in the originals; BFL
        # nests the quant convs
        sd["bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
        if layout == "ldm":
            sd = nest_flux2(sd)
    meta = {"format": "pt", "vae_layout": layout, "family": info.family, "scaling_factor": repr(scale),
            "latent_channels": str(info.latent_channels)}
    if shift is not None:
        meta["shift_factor"] = repr(shift)
    if as_folder:
        m = vae.model
        if isinstance(m, TinyAutoencoder):
            config = {"_class_name": "AutoencoderTiny", "latent_channels": info.latent_channels, "scaling_factor": 1.0,
                      "shift_factor": 0.0}
        elif isinstance(m, WanImageVAE):
            c = m.config
            config = {"_class_name": "AutoencoderKLQwenImage", "base_dim": c.base_dim, "z_dim": c.z_dim,
                      "dim_mult": list(c.dim_mult), "num_res_blocks": c.num_res_blocks, "attn_scales": [],
                      "temperal_downsample": [hasattr(r, "time_conv") for r in m.encoder.downsamples
                                              if hasattr(r, "mode")],
                      "latents_mean": m.latents_mean.tolist(), "latents_std": m.latents_std.tolist()}
        else:
            config = diffusers_config(m.config, scale, shift)
        cfg_text = json.dumps(config, indent=2, allow_nan=False)
        out.mkdir(parents=True, exist_ok=True)
        save_safetensors(weights, sd, meta)
        atomic_write(out / "config.json", lambda tmp: tmp.write_text(cfg_text, encoding="utf-8"))
        _remove_stale_weights(out, weights)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(out, sd, meta)
    return out
