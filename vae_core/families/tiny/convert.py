"""Key layouts of the tiny autoencoders (TAESD design): detection, conversion to the canonical names of
:class:`vae_core.families.tiny.model.TinyAutoencoder`, and the latent scaling of each variant.

Layouts, recognised from keys (never from file names):

* ``original-encoder`` / ``original-decoder``: madebyollin's ``taesd*_encoder.pth`` (``0.weight``, ``1.conv.0.weight``,
  ..., ``14.weight``) and ``taesd*_decoder.pth`` (``1.weight``, ``3.conv.0.weight``, ..., ``19.weight``; index 0 is
  the clamp), one half per file (also as ``.safetensors``);
* ``comfyui``: ``taesd_encoder.<i>.…`` and ``taesd_decoder.<i>.…`` plus ``vae_scale``/``vae_shift`` (ComfyUI's TAESD);
* ``diffusers``: ``AutoencoderTiny``'s ``encoder.layers.<i>.…`` and ``decoder.layers.<i-1>.…`` (no clamp layer);
* ``canonical``: ``encoder.<i>.…``, ``decoder.<i>.…``, ``vae_scale``, ``vae_shift`` (what :func:`vae_core.save_vae`
  writes in the original layout).
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import torch

from ...errors import VaeLoadError
from ..scaling import check_factor
from .model import DECODER_POOL_BLOCKS, ENCODER_POOL_BLOCKS, POOL_GROUPS, POOL_WIDTH, WIDTH, TinyConfig

__all__ = ["TINY_FAMILIES", "is_tiny", "tiny_to_canonical", "canonical_to_diffusers", "tiny_config", "merge_halves",
           "tiny_family"]

#: variant -> (latent channels, vae_scale, vae_shift): TAESD latents = (raw - shift) · scale of the matching VAE.
#: TAEF2 (FLUX.2, recognised by its pool blocks) speaks its own latents: no published scaling, 1/0 as in
#: madebyollin's taesd.py, which feeds the decoder what the encoder gives.
TINY_FAMILIES = {"taesd": (4, 0.18215, 0.0), "taesdxl": (4, 0.13025, 0.0), "taesd3": (16, 1.5305, 0.0609),
                 "taef1": (16, 0.3611, 0.1159), "taef2": (32, 1.0, 0.0)}
_DEFAULT = {4: "taesd", 16: "taef1"}

_ENC_FIRST, _ENC_LAST = "0.weight", "14.weight"      # conv(3, 64) and conv(64, latent) of the encoder
_DEC_FIRST, _DEC_LAST = "1.weight", "19.weight"      # conv(latent, 64) and conv(64, 3) of the decoder


def _layout(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    keys = set(sd)
    if "taesd_decoder.1.weight" in keys or "taesd_encoder.0.weight" in keys:
        return "comfyui"
    if "decoder.layers.0.weight" in keys or "encoder.layers.0.weight" in keys:
        return "diffusers"
    if ("encoder.1.conv.0.weight" in keys or "decoder.3.conv.0.weight" in keys) and "encoder.conv_in.weight" not in keys:
        return "canonical"
    if "1.conv.0.weight" in keys and _ENC_FIRST in keys:
        return "original-encoder"
    if "3.conv.0.weight" in keys and _DEC_FIRST in keys and _ENC_FIRST not in keys:
        return "original-decoder"
    return None


def is_tiny(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``sd`` holds a TAESD-design autoencoder (or one half of it) in any known layout."""
    return _layout(sd) is not None


def tiny_to_canonical(sd: Mapping[str, torch.Tensor], path: object = "<state dict>"
                      ) -> tuple[dict[str, torch.Tensor], str]:
    """Rename any layout to the canonical names; returns ``(state dict, layout)``. ``vae_scale``/``vae_shift`` are
    kept when present (ComfyUI, canonical) and added by :func:`tiny_family` otherwise.

    Raises:
        VaeLoadError: not a TAESD-design state dict.
    """
    layout = _layout(sd)
    if layout is None:
        raise VaeLoadError(path, f"{len(sd)} tensors without TAESD keys (first {sorted(sd)[:4]})",
                           "a TAESD-design autoencoder: taesd_encoder/taesd_decoder files, ComfyUI's taesd_* keys "
                           "or diffusers' AutoencoderTiny")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = key
        if layout == "comfyui":
            k = re.sub(r"^taesd_(encoder|decoder)\.", r"\1.", k)
        elif layout == "diffusers":
            k = re.sub(r"^encoder\.layers\.", "encoder.", k)
            k = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.{int(m.group(1)) + 1}.", k)
        elif layout == "original-encoder":
            k = "encoder." + k
        elif layout == "original-decoder":
            k = "decoder." + k
        out[k] = value
    return out, layout


def canonical_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical names → diffusers ``AutoencoderTiny`` names (``vae_scale``/``vae_shift`` dropped: diffusers keeps
    TAESD's own latents)."""
    out = {}
    for k, v in sd.items():
        if k in ("vae_scale", "vae_shift"):
            continue
        k = re.sub(r"^encoder\.", "encoder.layers.", k)
        k = re.sub(r"^decoder\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) - 1}.", k)
        out[k] = v
    return out


def _shape(sd: Mapping[str, torch.Tensor], key: str, path: object, expected: str) -> tuple[int, ...]:
    if key not in sd:
        raise VaeLoadError(path, f"no tensor {key!r}", expected)
    return tuple(sd[key].shape)


#: TAEF2's pool-branch tensors per block, with their shapes.
_POOL_SHAPES = {"pool.0.weight": (POOL_WIDTH, WIDTH, 1, 1), "pool.1.weight": (POOL_WIDTH,),
                "pool.1.bias": (POOL_WIDTH,), "pool.3.weight": (WIDTH, POOL_WIDTH, 1, 1)}


def _pool_half(sd: Mapping[str, torch.Tensor], half: str, path: object) -> bool:
    """Whether a canonical half has TAEF2's pool blocks, checking that it has all of them, in the right blocks, with
    the right shapes (a half with some of them is a near miss, named)."""
    keys = {k for k in sd if k.startswith(half + ".") and ".pool." in k}
    if not keys:
        return False
    blocks = ENCODER_POOL_BLOCKS if half == "encoder" else DECODER_POOL_BLOCKS
    expected = {f"{half}.{b}.{name}": shape for b in blocks for name, shape in _POOL_SHAPES.items()}
    extra, missing = sorted(keys - set(expected)), sorted(set(expected) - keys)
    if extra or missing:
        raise VaeLoadError(path, f"a TAEF2-style {half} with pool (GroupNorm) tensors missing {missing[:4]} and "
                           f"unexpected {extra[:4]}", f"all four pool tensors in each of the {half} blocks {list(blocks)} "
                           "(TAEF2), or none (TAESD, TAEF1)")
    bad = [f"{k}: {tuple(sd[k].shape)}" for k, shape in expected.items() if tuple(sd[k].shape) != shape]
    if bad:
        raise VaeLoadError(path, f"TAEF2 pool tensors of shapes {bad[:3]}", f"{POOL_WIDTH}×{WIDTH} 1×1 convs and a "
                           f"GroupNorm({POOL_GROUPS}, {POOL_WIDTH}) (TAEF2's pool branch)")
    return True


def tiny_config(sd: Mapping[str, torch.Tensor], path: object = "<state dict>") -> TinyConfig:
    """Latent channels, which halves exist and whether they have TAEF2's pool blocks, from a canonical state dict.

    Raises:
        VaeLoadError: first/last convs missing or of the wrong shape (naming the key); pool tensors incomplete, in
            other blocks or of other shapes; halves of different designs.
    """
    enc = any(k.startswith("encoder.") for k in sd)
    dec = any(k.startswith("decoder.") for k in sd)
    latent = None
    if enc:
        first = _shape(sd, "encoder." + _ENC_FIRST, path, "the encoder's first conv (64, 3, 3, 3)")
        last = _shape(sd, "encoder." + _ENC_LAST, path, "the encoder's last conv (latent, 64, 3, 3)")
        if first != (64, 3, 3, 3) or len(last) != 4 or last[1:] != (64, 3, 3):
            raise VaeLoadError(path, f"encoder convs of shapes {first} and {last}",
                               "(64, 3, 3, 3) first and (latent channels, 64, 3, 3) last (TAESD design)")
        latent = last[0]
    if dec:
        first = _shape(sd, "decoder." + _DEC_FIRST, path, "the decoder's first conv (64, latent, 3, 3)")
        last = _shape(sd, "decoder." + _DEC_LAST, path, "the decoder's last conv (3, 64, 3, 3)")
        if len(first) != 4 or first[0] != 64 or first[2:] != (3, 3) or last != (3, 64, 3, 3):
            raise VaeLoadError(path, f"decoder convs of shapes {first} and {last}",
                               "(64, latent channels, 3, 3) first and (3, 64, 3, 3) last (TAESD design)")
        if latent is not None and latent != first[1]:
            raise VaeLoadError(path, f"an encoder with {latent} latent channels and a decoder with {first[1]}",
                               "two halves of the same autoencoder")
        latent = first[1]
    if latent is None or latent <= 0 or latent > 256:
        raise VaeLoadError(path, f"latent channels {latent}", "an encoder or decoder with 1..256 latent channels")
    pools = {h: _pool_half(sd, h, path) for h, present in (("encoder", enc), ("decoder", dec)) if present}
    if len(set(pools.values())) > 1:
        has, lacks = ("encoder", "decoder") if pools["encoder"] else ("decoder", "encoder")
        raise VaeLoadError(path, f"the {has} with TAEF2's pool blocks and the {lacks} without",
                           "two halves of one design")
    return TinyConfig(latent_channels=int(latent), has_encoder=enc, has_decoder=dec, pool=any(pools.values()))


def merge_halves(encoder_sd: Mapping[str, torch.Tensor], decoder_sd: Mapping[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """One canonical state dict from a canonical encoder half and a canonical decoder half."""
    out = {k: v for k, v in encoder_sd.items() if k.startswith("encoder.")}
    out.update({k: v for k, v in decoder_sd.items() if k.startswith("decoder.")})
    for k in ("vae_scale", "vae_shift"):
        if k in decoder_sd or k in encoder_sd:
            out[k] = decoder_sd.get(k, encoder_sd.get(k))
    return out


def _scalar(sd: Mapping[str, torch.Tensor], key: str, path: object) -> float:
    t = sd[key]
    if t.numel() != 1:
        raise VaeLoadError(path, f"{key} of shape {tuple(t.shape)}", "a single number (the latent scaling)")
    return float(t.reshape(-1)[0].float())


def tiny_family(latent_channels: int, sd: Mapping[str, torch.Tensor], family: Optional[str] = None,
                name_hint: str = "", pool: bool = False) -> tuple[str, float, float, str]:
    """``(family, vae_scale, vae_shift, source)``: from an explicit ``family``, the file's own ``vae_scale``/
    ``vae_shift`` (ComfyUI), TAEF2's pool blocks (``pool``), the file name (``taesdxl``, ``taesd3``, ``taef1``),
    else the default per channels."""
    if family is not None:
        if family not in TINY_FAMILIES or TINY_FAMILIES[family][0] != latent_channels or pool != (family == "taef2"):
            known = [f for f, v in TINY_FAMILIES.items() if v[0] == latent_channels and pool == (f == "taef2")]
            raise VaeLoadError("family", f"{family!r} for a tiny autoencoder with {latent_channels} latent channels",
                               f"one of {known}")
        return family, TINY_FAMILIES[family][1], TINY_FAMILIES[family][2], "argument"
    if "vae_scale" in sd:
        where = name_hint or "TAESD"
        scale = check_factor(_scalar(sd, "vae_scale", where), "vae_scale", "the file", positive=True, path=where)
        shift = check_factor(_scalar(sd, "vae_shift", where), "vae_shift", "the file", positive=False,
                             path=where) if "vae_shift" in sd else 0.0
        for name, (ch, s, h) in TINY_FAMILIES.items():
            if ch == latent_channels and pool == (name == "taef2") and abs(s - scale) < 1e-6 and abs(h - shift) < 1e-6:
                return name, scale, shift, "vae_scale/vae_shift in the file"
        return "custom-tiny", scale, shift, "vae_scale/vae_shift in the file"
    if pool:
        if latent_channels == TINY_FAMILIES["taef2"][0]:
            return "taef2", 1.0, 0.0, "TAEF2's pool (GroupNorm) blocks and 32 latent channels"
        return "custom-tiny", 1.0, 0.0, f"pool blocks like TAEF2's but {latent_channels} latent channels"
    tokens = set(re.split(r"[^a-z0-9]+", name_hint.lower()))
    for name in ("taesdxl", "taesd3", "taef1", "taesd"):
        if any(t.startswith(name) for t in tokens) and TINY_FAMILIES[name][0] == latent_channels:
            return name, TINY_FAMILIES[name][1], TINY_FAMILIES[name][2], f"file name hint ({name_hint})"
    name = _DEFAULT.get(latent_channels)
    if name is None:
        return "custom-tiny", 1.0, 0.0, f"no known tiny autoencoder has {latent_channels} latent channels"
    return name, TINY_FAMILIES[name][1], TINY_FAMILIES[name][2], f"default for {latent_channels}-channel TAESDs"
