"""ComfyUI nodes (classic V1 API): Load VAE (any format), Tiled VAE Decode/Encode (exact), VAE fp16 fix.

Each node translates ComfyUI types and calls vae_core; logic lives in vae_core and ``comfy_bridge``.
IMAGE is float32 ``[B, H, W, C]`` in 0..1; LATENT is ``{"samples": raw latents [B, C, H/8, W/8], ...}``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

import folder_paths

from ..vae_core import VaeLoadError, load_vae, make_fp16_safe
from ..vae_core.io.formats import find_diffusers_folder, is_weight_file
from ..vae_core.io.walk import walk_model_dirs
from ..vae_core.lab.run import compare_pair
from ..vae_core.precision.dtypes import DTYPES, HOST_CHOICES
from ..vae_core.tiling import TileReport
from .comfy_bridge import (comfy_roundtrip, comfy_tiled, engine_for, guard_comfy_vae, progress_and_cancel, run_engine,
                           to_comfy_vae)

log = logging.getLogger(__name__)

CATEGORY = "VAE Pack"
_TILE = ("INT", {"default": 0, "min": 0, "max": 8192, "step": 64,
                 "tooltip": "Tile edge in image pixels; 0 = auto (untiled when it fits in free memory)."})
_MODE = (["exact", "fast"], {"default": "exact", "tooltip": "exact: identical to untiled, about the untiled cost "
                             "(uses a cache in RAM). fast: no cache, approximate colours (for previews)."})


APPROX = "vae_approx/"


def _vae_dirs(kind: str = "vae") -> list[Path]:
    try:
        paths = folder_paths.get_folder_paths(kind)
    except KeyError:  # a ComfyUI without that folder kind
        return []
    return [Path(p) for p in paths if os.path.isdir(p)]


def list_vaes() -> list[str]:
    """Weight files in the vae folders plus one entry per diffusers folder (not its inner files).

    Walks with :func:`vae_core.io.walk.walk_model_dirs` (links followed, each real folder once, bounded), so a symlink
    loop in ``models/vae`` cannot hang the node list. File names are relative to their vae folder, as ComfyUI's
    ``get_full_path`` resolves them.
    """
    names: set[str] = set()
    for base in _vae_dirs():
        for root, dirs, files in walk_model_dirs(base):
            if root != base and find_diffusers_folder(root) is not None:  # a VAE or pipeline folder: one entry
                names.add(root.relative_to(base).as_posix())
                dirs[:] = []
                continue
            rel = root.relative_to(base)
            names.update(os.path.join(rel, f) if rel.parts else f for f in files if is_weight_file(f))
    for base in _vae_dirs("vae_approx"):  # TAESD files: a *_decoder file loads its *_encoder twin beside it
        names.update(APPROX + f.name for f in base.iterdir() if f.is_file() and is_weight_file(f.name)
                     and not ("_encoder" in f.name and (base / f.name.replace("_encoder", "_decoder")).is_file()))
    return sorted(names)


def resolve(name: str) -> Path:
    if name.startswith(APPROX):
        for base in _vae_dirs("vae_approx"):
            if (base / name[len(APPROX):]).is_file() and "/" not in name[len(APPROX):]:
                return base / name[len(APPROX):]
    full = folder_paths.get_full_path("vae", name)
    if full and os.path.isfile(full):
        return Path(full)
    for base in _vae_dirs():
        if (base / name).is_dir():
            return base / name
    raise VaeLoadError(name, "no file or diffusers folder of that name in the vae model folders",
                       f"one of {list_vaes()[:6]}")


def _to_model(images: torch.Tensor, ratio: int = 8) -> torch.Tensor:
    """IMAGE [B,H,W,C] 0..1 → [B,3,H,W] -1..1, centre-cropped to multiples of the VAE's ``ratio`` (8; 16 for
    Flux.2's patchified latents) like ComfyUI's own VAEEncode."""
    h, w = images.shape[1] // ratio * ratio, images.shape[2] // ratio * ratio
    y0, x0 = (images.shape[1] % ratio) // 2, (images.shape[2] % ratio) // 2
    return images[:, y0:y0 + h, x0:x0 + w, :3].movedim(-1, 1) * 2.0 - 1.0


def _to_image(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).float().cpu()


def describe(report: TileReport, tile: Any) -> str:
    if not report.tiles:
        return f"untiled (tile {tile}: the image fits)"
    text = f"{report.schedule} tiling, {report.tiles} tiles, {report.sweeps} sweeps"
    if report.flops_useful:  # the GroupNorm engine counts its FLOPs; halo tiling (TAESD, Qwen-Image) does not
        text += f", {report.flops_total / report.flops_useful:.2f}x the untiled convolution FLOPs"
    text += f", cache {report.cache_peak / 2**20:.0f} MiB"
    if report.pinned_peak:
        text += f" (of which {report.pinned_peak / 2**20:.0f} MiB pinned host memory, handed back after the call)"
    return text


def _tiled(vae: Any, method: str, t: torch.Tensor, tile_size: int, mode: str, image_shape: tuple[int, int, int],
           fallback: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, str, bool]:
    """Run the engine's encode/decode on the ComfyUI VAE with a progress bar and ComfyUI's cancel; for a VAE the
    engine does not know (TAESD, video/audio VAEs) run ComfyUI's own tiled call instead and say so.

    Returns ``(tensor, note, ran_engine)``: the engine's output (raw latents, or images ``[B, 3, H, W]`` in about
    -1..1) when ``ran_engine``, else ``fallback()``'s, already in ComfyUI's conventions (IMAGE / raw latents)."""
    video = getattr(vae, "latent_dim", 2) == 3  # core's Wan VAEs (and Qwen-Image's): latents [B, C, T, h, w]
    try:
        if video and not engine_for(vae).vae.family.video:
            raise VaeLoadError("latent", f"video latents of shape {tuple(t.shape)}", "a VAE family that runs videos")
        engine_for(vae)
    except VaeLoadError as exc:
        note = (f"not a VAE call the engine runs ({exc.found}); ran ComfyUI's own tiled {method} instead "
                "(approximate: per-tile colour shifts and blended seams are possible)")
        log.warning("VAE Pack tiled %s: %s", method, note)
        out = fallback()
        return (out.reshape(-1, *out.shape[-3:]) if method == "decode" and out.ndim == 5 else out), note, False
    if video and method == "encode":
        t = t.movedim(0, 1).unsqueeze(0)  # the frames of IMAGE are one clip [1, 3, F, H, W], as core's VAE Encode
    if video and method == "decode" and t.ndim == 4:
        t = t.unsqueeze(2)
    progress, cancel = progress_and_cancel()
    tile = tile_size or "auto"
    report = TileReport()
    # Flux.2 on an engine-backed VAE; LTX-Video anywhere (core's own LTX VAE normalises its latents too)
    normalised = (getattr(vae.first_stage_model, "normalised_latents", False)
                  or engine_for(vae).vae.family.host_normalised)

    def call(v: Any, planned: Any, schedule: str) -> torch.Tensor:
        kw = dict(tile=planned, mode=mode, progress=progress, cancel=cancel, report=report, schedule=schedule)
        if method == "decode":
            return v.decode(v.unscale_latents(t) if normalised else t, **kw)
        z = v.encode(t, **kw)
        return v.scale_latents(z) if normalised else z

    ft = getattr(engine_for(vae).vae.model.config, "temporal_scale", 1)
    frames = (t.shape[2] if method == "encode" else 1 + ft * (t.shape[2] - 1)) if video else None
    out = run_engine(vae, call, image_shape, tile, video=(method, frames) if video else None)
    if video and method == "decode":  # [B, 3, F, H, W] → frames as IMAGE batch entries, as core's VAE Decode
        out = out.movedim(2, 1).reshape(-1, out.shape[1], *out.shape[-2:])
    return out, f"{mode}: {describe(report, tile)}", True


class VaePackLoader:
    DESCRIPTION = "Loads any SD-family VAE (SD1/2, SDXL, SD3, Flux, Flux.2), Qwen-Image's and the tiny autoencoders " \
                  "(TAESD family, TAEF2, " \
                  "also from models/vae_approx): LDM/diffusers safetensors, .ckpt/.pt/.bin, diffusers folders, VAEs " \
                  "in full checkpoints. Returns a ComfyUI VAE that every node accepts."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE", "STRING")
    RETURN_NAMES = ("vae", "info")
    OUTPUT_TOOLTIPS = ("The VAE, usable by core VAEDecode/VAEEncode and any other node.",
                       "Detected format, family, latent channels and scaling, with their sources.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"vae_name": (list_vaes(), {"tooltip": "File or diffusers folder in models/vae, or a "
                                                               "TAESD file in models/vae_approx."})}}

    def load(self, vae_name: str) -> tuple[Any, str]:
        vae = load_vae(resolve(vae_name))
        i = vae.info
        text = (f"{Path(i.path).name}: {i.family} ({i.sources['family']}), {i.latent_channels} latent channels, "
                f"scaling {i.scaling_factor} ({i.sources['scaling_factor']}), shift {i.shift_factor}, "
                f"{i.layout} keys in {i.container}{' under ' + repr(i.prefix) if i.prefix else ''}")
        cvae = to_comfy_vae(vae)
        if getattr(cvae, "vae_pack_engine", False):
            form = ("normalised, 2×2-patchified" if vae.family.patched_latents(vae.model) else
                    "per-channel normalised" if cvae.first_stage_model.normalised_latents else "raw")
            text += (f"; this ComfyUI does not build such VAEs itself: the VAE runs vae_core's network (latents: "
                     f"{cvae.latent_channels} channels at 1/{cvae.spacial_compression_decode()}, {form})")
        return cvae, text


class VaePackDecodeTiled:
    DESCRIPTION = "Tiled VAE decode with bounded memory, identical to an untiled decode (no seams, no colour shift)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "report")
    OUTPUT_TOOLTIPS = ("The decoded images.", "What ran: tiles, sweeps and FLOPs, or the fallback used for a VAE "
                       "of a family vae_core does not know (video, audio VAEs).")
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"samples": ("LATENT",), "vae": ("VAE", {"tooltip": "Any VAE, e.g. from Load "
                                                                     "Checkpoint."}), "tile_size": _TILE, "mode": _MODE}}

    def decode(self, samples: dict, vae: Any, tile_size: int, mode: str) -> tuple[torch.Tensor, str]:
        z = samples["samples"]
        ratio = int(vae.spacial_compression_decode())
        out, note, ran = _tiled(vae, "decode", z, tile_size, mode, (z.shape[0], z.shape[-2] * ratio, z.shape[-1] * ratio),
                                lambda: comfy_tiled(vae, "decode", z, tile_size))
        return (_to_image(out) if ran else out.float().cpu()), note


class VaePackEncodeTiled:
    DESCRIPTION = "Tiled VAE encode with bounded memory, identical to an untiled encode."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "report")
    OUTPUT_TOOLTIPS = ("The raw latents.", "What ran: tiles, sweeps and FLOPs, or the fallback used for a VAE that "
                       "is of a family vae_core does not know (video, audio VAEs).")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",), "tile_size": _TILE, "mode": _MODE}}

    def encode(self, pixels: torch.Tensor, vae: Any, tile_size: int, mode: str) -> tuple[dict, str]:
        x = _to_model(pixels, int(vae.spacial_compression_encode()))
        batch = 1 if getattr(vae, "latent_dim", 2) == 3 else x.shape[0]  # a video VAE: the frames are one clip
        z, note, _ = _tiled(vae, "encode", x, tile_size, mode, (batch, x.shape[-2], x.shape[-1]),
                            lambda: comfy_tiled(vae, "encode", pixels, tile_size))
        return {"samples": z.float().cpu()}, note


class VaePackFp16Fix:
    DESCRIPTION = "Rescales the VAE so it runs in fp16 without NaNs (no training, same output) and adds a NaN guard " \
                  "that retries in bf16/fp32. Core VAE Decode/Encode then work in fp16."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE", "STRING")
    RETURN_NAMES = ("vae", "report")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"vae": ("VAE",),
                             "fix": ("BOOLEAN", {"default": True, "tooltip": "Apply the fp16 rescaling."}),
                             "precision": (["auto", *HOST_CHOICES], {"default": "auto",
                                           "tooltip": "auto: bf16 where supported, else fp16 with the fix."})}}

    def apply(self, vae: Any, fix: bool, precision: str) -> tuple[Any, str]:
        import comfy.model_management as mm

        with engine_for(vae).attached() as shared:  # an independent float32 copy: the fix makes a new VAE
            core = shared.clone().to("cpu", torch.float32)
        report = "fp16 fix off"
        if fix:
            core = make_fp16_safe(core)
            report = (f"fp16 fix: largest activation {core.info.fp16_fix['peak_before']:.4g} -> "
                      f"{core.info.fp16_fix['peak_after']:.4g}")
        new = to_comfy_vae(core)
        if precision == "auto":
            dtype = torch.bfloat16 if mm.should_use_bf16(new.device) else (
                torch.float16 if new.device.type == "cuda" else torch.float32)
        else:
            dtype = DTYPES[precision]
        new.first_stage_model.to(dtype)
        new.vae_dtype = dtype
        return guard_comfy_vae(new), f"{report}; running in {str(dtype).replace('torch.', '')} with a NaN guard"


class VaePackCompare:
    DESCRIPTION = "Round-trips an image through two VAEs (encode + decode) and shows both side by side, an error heat " \
                  "map against the original, and PSNR / SSIM / MS-SSIM (the VAE lab's metrics)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("round_trips", "heat_map", "metrics")
    OUTPUT_TOOLTIPS = ("A's round trip (left) and B's (right).", "|round trip - original| x4 for A (left) and B "
                       "(right): black = identical.", "PSNR, SSIM, MS-SSIM and time per VAE, and A vs B.")
    FUNCTION = "compare"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": ("IMAGE",), "vae_a": ("VAE",), "vae_b": ("VAE",)},
                "optional": {"tile_size": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 64,
                                                   "tooltip": "Tile edge in image pixels; 0 = untiled."}),
                             "mode": _MODE,
                             "precision": (["as loaded", *HOST_CHOICES], {"default": "as loaded"})}}

    def compare(self, image: torch.Tensor, vae_a: Any, vae_b: Any, tile_size: int = 0, mode: str = "exact",
                precision: str = "as loaded") -> tuple[torch.Tensor, torch.Tensor, str]:
        ratio = max(int(v.spacial_compression_encode()) for v in (vae_a, vae_b))
        x = _to_model(image, ratio).float().cpu()
        (ya, ta, how_a), (yb, tb, how_b) = (comfy_roundtrip(v, x, tile_size, mode, precision) for v in (vae_a, vae_b))
        pair, heat, text = compare_pair(x, ya, yb, (how_a, how_b), (ta, tb))
        return pair.movedim(1, -1), heat.movedim(1, -1), text


NODE_CLASS_MAPPINGS = {"VaePackLoader": VaePackLoader, "VaePackDecodeTiled": VaePackDecodeTiled,
                       "VaePackEncodeTiled": VaePackEncodeTiled, "VaePackFp16Fix": VaePackFp16Fix,
                       "VaePackCompare": VaePackCompare}
NODE_DISPLAY_NAME_MAPPINGS = {"VaePackLoader": "Load VAE (any format)", "VaePackDecodeTiled": "VAE Decode (Tiled, exact)",
                              "VaePackEncodeTiled": "VAE Encode (Tiled, exact)", "VaePackFp16Fix": "VAE fp16 Fix",
                              "VaePackCompare": "VAE Compare"}
