"""Key layouts of HunyuanVideo 1.0-design VAEs: detection, diffusers ``AutoencoderKLHunyuanVideo`` ↔ ComfyUI's names
(those of :class:`vae_core.families.hv10.model.HV10VAE`), and the config from shapes and ``config.json``.

* ComfyUI (``hunyuan_video_vae_bf16.safetensors``): the SD VAE's names with 3-D convs under ``.conv``
  (``decoder.conv_in.conv.weight``, ``decoder.mid.block_1.norm1.weight``, attention ``q``/``k``/``v``/``proj_out``
  as ``[C, C, 1, 1, 1]`` convs);
* diffusers and Tencent's release: ``decoder.up_blocks.<i>.resnets.<j>``, ``decoder.mid_block.attentions.0.to_q``
  (Linear ``[C, C]``), ``conv_shortcut``, ``conv_norm_out``;

either bare or under ``vae.``/``first_stage_model.``. The renames are the SD VAE's
(:mod:`vae_core.families.sd_keys`), the attention weights reshaped between ``[C, C]`` and ``[C, C, 1, 1, 1]``.
GroupNorm ``weight``/``bias`` and 5-D convs tell this design apart from SD's (4-D convs), HunyuanVideo 1.5's (RMS
``gamma``) and LTX's (norms without weights).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import torch

from ..base import MAX_IMAGE_CHANNELS, MAX_LATENT_CHANNELS, MAX_WIDTH
from ..sd_keys import MAX_BLOCKS, MAX_LEVELS, diffusers_to_ldm, ldm_to_diffusers
from ...errors import VaeLoadError
from .model import HV10Config

__all__ = ["is_hv10", "hv10_to_canonical", "canonical_to_diffusers", "hv10_config", "PREFIXES"]

PREFIXES = ("", "vae.", "first_stage_model.")
_COMFY = ("decoder.conv_in.conv.weight", "decoder.mid.block_1.norm1.weight")
_DIFFUSERS = ("decoder.conv_in.conv.weight", "decoder.mid_block.resnets.0.norm1.weight")
_ATTN = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _prefix(sd: Mapping[str, torch.Tensor]) -> Optional[tuple[str, str]]:
    for p in PREFIXES:
        for layout, keys in (("comfyui", _COMFY), ("diffusers", _DIFFUSERS)):
            conv = sd.get(p + keys[0])
            if conv is not None and conv.dim() == 5 and p + keys[1] in sd:
                return p, layout
    return None


def is_hv10(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``sd`` holds a HunyuanVideo 1.0-design VAE (any layout, maybe under ``vae.``/``first_stage_model.``)."""
    return _prefix(sd) is not None


def hv10_to_canonical(sd: Mapping[str, torch.Tensor], path: object = "<state dict>"
                      ) -> tuple[dict[str, torch.Tensor], str, str]:
    """Any layout → ComfyUI's names; returns ``(state dict, layout, prefix)`` (encoder, decoder and the two 1×1×1
    quant convs; renames and views only).

    Raises:
        VaeLoadError: not a HunyuanVideo 1.0-design VAE.
    """
    found = _prefix(sd)
    if found is None:
        raise VaeLoadError(path, f"{len(sd)} tensors without HunyuanVideo 1.0 VAE keys",
                           f"'{_COMFY[0]}' (a 5-D conv) beside '{_COMFY[1]}' or '{_DIFFUSERS[1]}'")
    prefix, layout = found
    own = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    bare = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and k[len(prefix):].startswith(own)}
    if layout == "comfyui":
        return bare, layout, prefix
    out = diffusers_to_ldm(bare)
    for k, v in out.items():
        if _ATTN.match(k) and v.dim() == 4:  # the SD renames make [C, C, 1, 1]; these are 3-D convs
            out[k] = v.unsqueeze(-1)
    return out, layout, prefix


def canonical_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's names → diffusers ``AutoencoderKLHunyuanVideo`` names (the inverse of :func:`hv10_to_canonical`)."""
    flat = {k: (v.flatten(1) if _ATTN.match(k) else v) for k, v in sd.items()}
    return ldm_to_diffusers(flat)


def _shape(sd: Mapping[str, torch.Tensor], key: str, path: object) -> tuple[int, ...]:
    """The shape of 3-D conv weight ``key`` (5 dims), or a VaeLoadError naming it."""
    if key not in sd:
        raise VaeLoadError(path, f"no tensor {key!r}", "a complete HunyuanVideo 1.0-design VAE (encoder and decoder)")
    shape = tuple(sd[key].shape)
    if len(shape) != 5:
        raise VaeLoadError(path, f"{key!r} of shape {list(shape)}", "a 3-D conv weight [O, I, k, k, k]")
    return shape


def _count(sd: Mapping[str, torch.Tensor], pattern: str, bound: int, what: str, path: object) -> int:
    found = [int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m and len(m.group(1)) <= 3]
    if not found:
        raise VaeLoadError(path, f"no {what}", "a complete HunyuanVideo 1.0-design VAE (encoder and decoder)")
    n = 1 + max(found)
    if n > bound:
        raise VaeLoadError(path, f"{n} {what}", f"at most {bound}")
    return n


def _setting(config: Optional[Mapping[str, Any]], key: str, default: Any, allowed: tuple, path: object) -> Any:
    """``config[key]`` (``default`` when absent), of ``default``'s type exactly (no ``4.0`` for 4, no ``1`` for
    True) and one of ``allowed``; else a VaeLoadError naming the key and the value."""
    value = default if not config or config.get(key) is None else config[key]
    if type(value) is not type(default) or value not in allowed:
        raise VaeLoadError(path, f"{key} = {value!r}", f"one of {list(allowed)} for a HunyuanVideo 1.0-design VAE")
    return value


def hv10_config(sd: Mapping[str, torch.Tensor], path: object = "<state dict>",
                config: Optional[Mapping[str, Any]] = None) -> HV10Config:
    """The config of a canonical state dict: widths, blocks per level and channels from its shapes; the GroupNorm
    groups and the time compression from ``config`` (diffusers' ``norm_num_groups``, ``temporal_compression_ratio``;
    defaults 32 and 4, the only ones diffusers and ComfyUI build; ``act_fn`` must be SiLU), ``causal_attention``
    (a host's setting; default True, the released model's frame-causal mask) and ``chunked`` (a host's or the
    caller's; default False, the whole-clip reference).

    Raises:
        VaeLoadError: a required tensor missing, or shapes or settings that do not fit the design (naming them).
    """
    conv_in = _shape(sd, "encoder.conv_in.conv.weight", path)
    if conv_in[2:] != (3, 3, 3):
        raise VaeLoadError(path, f"'encoder.conv_in.conv.weight' of shape {conv_in}",
                           "a 3-D conv weight [O, I, 3, 3, 3]")
    levels = _count(sd, r"encoder\.down\.(\d+)\.", MAX_LEVELS, "encoder levels", path)
    num_res = _count(sd, r"encoder\.down\.0\.block\.(\d+)\.", MAX_BLOCKS, "blocks per level", path)
    widths = [_shape(sd, f"encoder.down.{i}.block.0.conv1.conv.weight", path)[0] for i in range(levels)]
    z2 = _shape(sd, "encoder.conv_out.conv.weight", path)[0]
    z = _shape(sd, "decoder.conv_in.conv.weight", path)[1]
    cout = _shape(sd, "decoder.conv_out.conv.weight", path)[0]
    for value, name, bound in ((max(widths), "channel width", MAX_WIDTH),
                               (max(conv_in[1], cout), "image channels", MAX_IMAGE_CHANNELS),
                               (z, "latent channels", MAX_LATENT_CHANNELS)):
        if value > bound:
            raise VaeLoadError(path, f"{name} {value}", f"at most {bound} (HunyuanVideo 1.0: widths up to 512, 3 image "
                               "channels, 16 latent channels)")
    if z2 != 2 * z:
        raise VaeLoadError(path, f"an encoder giving {z2} moment channels and a decoder taking {z} latent channels",
                           "twice the decoder's latent channels (mean and log-variance)")
    if levels < 2:
        raise VaeLoadError(path, f"{levels} level(s)", "at least 2 (HunyuanVideo 1.0 has 4)")
    ft = _setting(config, "temporal_compression_ratio", 4, (4,), path)
    _setting(config, "spatial_compression_ratio", 2 ** (levels - 1), (2 ** (levels - 1),), path)
    groups = _setting(config, "norm_num_groups", 32, tuple(g for g in (1, 2, 4, 8, 16, 32, 64)
                                                             if all(w % g == 0 for w in widths)), path)
    causal = _setting(config, "causal_attention", True, (True, False), path)
    chunked = _setting(config, "chunked", False, (True, False), path)
    if config and config.get("act_fn") not in (None, "silu", "swish"):
        raise VaeLoadError(path, f"act_fn = {config['act_fn']!r}", "'silu' (HunyuanVideo 1.0's activation)")
    temporal = {4: 2}[ft]
    if temporal > levels - 1:
        raise VaeLoadError(path, f"{levels} levels with time compression {ft}",
                           f"at least {temporal + 1} levels (one resampler per halving of the frame count)")
    return HV10Config(block_out_channels=tuple(widths), num_res_blocks=num_res, z_dim=z, in_channels=conv_in[1],
                      out_channels=cout, temporal_levels=temporal, norm_groups=groups, causal_attention=causal,
                      chunked=chunked)
