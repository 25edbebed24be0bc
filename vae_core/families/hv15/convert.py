"""Key layouts of HunyuanVideo 1.5-design VAEs: detection, diffusers ``AutoencoderKLHunyuanVideo15`` ↔ the original
names of :class:`vae_core.families.hv15.model.HV15VAE`, and the config from shapes.

* original (Tencent's release, ComfyUI's ``hunyuanvideo15_vae`` files): ``encoder.down.<i>.block.<j>``,
  ``.downsample``, ``encoder.mid.{block_1, attn_1, block_2}`` (attention ``q``/``k``/``v``/``proj_out``),
  ``nin_shortcut``; the decoder with ``up.<i>.block.<j>`` and ``.upsample``;
* diffusers: ``encoder.down_blocks.<i>.resnets.<j>``, ``.downsamplers.0``, ``encoder.mid_block.{resnets.{0,1},
  attentions.0}`` (``to_q``/``to_k``/``to_v``/``proj_out``), ``conv_shortcut``; ``decoder.up_blocks.<i>.resnets.<j>``
  and ``.upsamplers.0``.

Both hold RMS norms (``gamma``) and 3-D convs under ``.conv``; HunyuanVideo 1.0 (GroupNorm ``weight``/``bias``) and
Wan (``residual.N``, ``to_qkv``) do not match.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from ..base import MAX_IMAGE_CHANNELS, MAX_LATENT_CHANNELS, MAX_WIDTH
from ...errors import VaeLoadError
from .model import HV15Config

__all__ = ["is_hv15", "hv15_to_canonical", "canonical_to_diffusers", "hv15_config", "PREFIXES"]

PREFIXES = ("", "vae.", "first_stage_model.")
_ORIGINAL = ("decoder.mid.attn_1.q.weight", "decoder.mid.block_1.norm1.gamma")
_DIFFUSERS = ("decoder.mid_block.attentions.0.to_q.weight", "decoder.mid_block.resnets.0.norm1.gamma")
_MID = {"block_1.": "resnets.0.", "block_2.": "resnets.1.", "attn_1.q.": "attentions.0.to_q.",
        "attn_1.k.": "attentions.0.to_k.", "attn_1.v.": "attentions.0.to_v.", "attn_1.": "attentions.0."}


def _prefix(sd: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    for p in PREFIXES:
        for layout, keys in (("original", _ORIGINAL), ("diffusers", _DIFFUSERS)):
            q = sd.get(p + keys[0])
            if q is not None and q.dim() == 5 and p + keys[1] in sd:
                return p, layout
    return None


def is_hv15(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``sd`` holds a HunyuanVideo 1.5-design VAE (any layout, maybe under ``vae.``/``first_stage_model.``)."""
    return _prefix(sd) is not None


#: original ↔ diffusers names of the down/up levels (``{}``: the level number)
_LEVELS = (("encoder.down.{}.block.", "encoder.down_blocks.{}.resnets."),
           ("encoder.down.{}.downsample.", "encoder.down_blocks.{}.downsamplers.0."),
           ("decoder.up.{}.block.", "decoder.up_blocks.{}.resnets."),
           ("decoder.up.{}.upsample.", "decoder.up_blocks.{}.upsamplers.0."))


def _rename(key: str, to_diffusers: bool) -> str:
    """One key from the original names to diffusers' (or back), by the one table of both directions."""
    pairs = [(f"{side}.mid.{o}", f"{side}.mid_block.{d}") for side in ("encoder", "decoder") for o, d in _MID.items()]
    k = key
    for o, d in pairs:
        k = k.replace(*((o, d) if to_diffusers else (d, o)))
    for o, d in _LEVELS:
        src, dst = (o, d) if to_diffusers else (d, o)
        k = re.sub("^" + re.escape(src).replace(r"\{\}", r"(\d+)"), dst.replace("{}", r"\1"), k)
    shortcut = (".nin_shortcut.", ".conv_shortcut.")
    return k.replace(*(shortcut if to_diffusers else shortcut[::-1]))


def _to_original(key: str) -> str:
    return _rename(key, to_diffusers=False)


def _to_diffusers(key: str) -> str:
    return _rename(key, to_diffusers=True)


def hv15_to_canonical(sd: Mapping[str, torch.Tensor], path: object = "<state dict>"
                      ) -> tuple[dict[str, torch.Tensor], str, str]:
    """Any layout → original names; returns ``(state dict, layout, prefix)`` (encoder and decoder keys only).

    Raises:
        VaeLoadError: not a HunyuanVideo 1.5-design VAE.
    """
    found = _prefix(sd)
    if found is None:
        raise VaeLoadError(path, f"{len(sd)} tensors without HunyuanVideo 1.5 VAE keys",
                           f"'{_ORIGINAL[0]}' or '{_DIFFUSERS[0]}' (a 5-D 1×1×1 conv)")
    prefix, layout = found
    out = {}
    for k, v in sd.items():
        if k.startswith(prefix + "encoder.") or k.startswith(prefix + "decoder."):
            out[_to_original(k[len(prefix):]) if layout == "diffusers" else k[len(prefix):]] = v
    return out, layout, prefix


def canonical_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original names → diffusers ``AutoencoderKLHunyuanVideo15`` names (the inverse of :func:`hv15_to_canonical`)."""
    return {_to_diffusers(k): v for k, v in sd.items()}


def _shape(sd: Mapping[str, torch.Tensor], key: str, path: object) -> tuple[int, ...]:
    if key not in sd:
        raise VaeLoadError(path, f"no tensor {key!r}", "a complete HunyuanVideo 1.5-design VAE (encoder and decoder)")
    return tuple(sd[key].shape)


def hv15_config(sd: Mapping[str, torch.Tensor], path: object = "<state dict>") -> HV15Config:
    """The config of a canonical state dict, from its shapes: level widths, blocks per level, latent channels, and
    which levels halve space and time (a downsampler's conv packs ×4 or ×8 into channels).

    Raises:
        VaeLoadError: a required tensor missing or shapes that do not fit the design (naming the key).
    """
    conv_in = _shape(sd, "encoder.conv_in.conv.weight", path)
    if len(conv_in) != 5 or conv_in[2:] != (3, 3, 3):
        raise VaeLoadError(path, f"'encoder.conv_in.conv.weight' of shape {conv_in}", "a 3-D conv weight [O, I, 3, 3, 3]")
    levels = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down\.(\d+)\.", k)] if m)
    num_res = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)] if m)
    widths = [_shape(sd, f"encoder.down.{i}.block.0.conv1.conv.weight", path)[0] for i in range(levels)]
    flags = []
    for i in range(levels):
        key = f"encoder.down.{i}.downsample.conv.conv.weight"
        if key not in sd:
            flags.append((False, False))
            continue
        if i + 1 >= levels:
            raise VaeLoadError(path, f"a downsampler at the last level ({key})", "downsamplers before the last level")
        factor = widths[i + 1] // _shape(sd, key, path)[0]
        if factor not in (4, 8) or _shape(sd, key, path)[0] * factor != widths[i + 1]:
            raise VaeLoadError(path, f"{key} of shape {_shape(sd, key, path)} before a level of width {widths[i + 1]}",
                               "a conv packing 2×2 (or 2×2×2) blocks into the next level's width")
        flags.append((True, factor == 8))
    spatial = sum(s for s, _ in flags)
    temporal = sum(t for _, t in flags)
    if [s for s, _ in flags] != [True] * spatial + [False] * (levels - spatial) or \
            [t for _, t in flags[:spatial]] != [False] * (spatial - temporal) + [True] * temporal:
        raise VaeLoadError(path, f"down flags {flags} (space, time) per level",
                           "the first levels halving space and the last of those also time")
    z2 = _shape(sd, "encoder.conv_out.conv.weight", path)[0]
    cout = _shape(sd, "decoder.conv_out.conv.weight", path)[0]
    for value, name, bound in ((max(widths), "channel width", MAX_WIDTH),
                               (max(conv_in[1], cout), "image channels", MAX_IMAGE_CHANNELS),
                               (z2 // 2, "latent channels", MAX_LATENT_CHANNELS)):
        if value > bound:
            raise VaeLoadError(path, f"{name} {value}", f"at most {bound} (HunyuanVideo 1.5: widths up to 1024, 3 image "
                               "channels, 32 latent channels)")
    return HV15Config(block_out_channels=tuple(widths), num_res_blocks=num_res, z_dim=z2 // 2,
                      in_channels=conv_in[1], out_channels=cout, spatial_levels=spatial, temporal_levels=temporal)
