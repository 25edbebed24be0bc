"""Key layouts of Wan-design VAEs (Wan 2.1, Qwen-Image, Wan 2.2): detection, diffusers ``AutoencoderKLWan`` /
``AutoencoderKLQwenImage`` ↔ the original names of :class:`vae_core.families.wan.model.WanVAE`, and config inference
from shapes.

* original (Wan 2.1, ComfyUI's ``qwen_image_vae.safetensors``): ``encoder.conv1``, ``encoder.downsamples.<i>.residual.
  {0,2,3,6}``, ``.shortcut``, ``.resample.1``, ``.time_conv``, ``encoder.middle.{0,1,2}``, ``encoder.head.{0,2}``,
  ``conv1``/``conv2``, and ``decoder.upsamples.<i>`` as one flat list;
* diffusers: ``encoder.conv_in``, ``encoder.down_blocks.<i>.{norm1,conv1,norm2,conv2,conv_shortcut}``,
  ``encoder.mid_block.{resnets,attentions}``, ``norm_out``/``conv_out``, ``quant_conv``/``post_quant_conv``, and
  ``decoder.up_blocks.<b>.resnets.<r>`` / ``.upsamplers.0`` (``num_res_blocks + 2`` flat entries per level);
* Wan 2.2 (``wan2.2_vae.safetensors``): levels nested as ``encoder.downsamples.<i>.downsamples.<j>`` and
  ``decoder.upsamples.<i>.upsamples.<j>``; in diffusers ``encoder.down_blocks.<i>.resnets.<j>`` / ``.downsampler``
  and ``decoder.up_blocks.<i>.resnets.<j>`` / ``.upsampler``.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from ..base import MAX_IMAGE_CHANNELS, MAX_LATENT_CHANNELS, MAX_WIDTH
from ...errors import VaeLoadError
from .model import WanConfig

__all__ = ["is_wan", "wan_to_canonical", "canonical_to_diffusers", "wan_config", "WAN_PREFIXES"]

WAN_PREFIXES = ("", "vae.", "first_stage_model.")
_ORIGINAL = "decoder.middle.0.residual.0.gamma"
_DIFFUSERS = "decoder.mid_block.resnets.0.norm1.gamma"
_WAN22 = ("decoder.upsamples.0.upsamples.0.residual.2.weight", "encoder.down_blocks.0.resnets.0.conv1.weight")
_RES = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
        "conv2": "residual.6", "conv_shortcut": "shortcut"}


def _prefix(sd: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    for p in WAN_PREFIXES:
        if p + _ORIGINAL in sd:
            return p, "original"
        if p + _DIFFUSERS in sd:
            return p, "diffusers"
    return None


def is_wan(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``sd`` holds a Wan-design VAE (Wan 2.1 / Qwen-Image, or Wan 2.2)."""
    return _prefix(sd) is not None


def _res_leaf(rest: str) -> str:
    for d, o in _RES.items():
        if rest.startswith(d):
            return o + rest[len(d):]
    return rest


def wan_to_canonical(sd: Mapping[str, torch.Tensor], path: object = "<state dict>"
                     ) -> tuple[dict[str, torch.Tensor], str, str]:
    """Any layout → original Wan names; returns ``(state dict, layout, prefix)``.

    Raises:
        VaeLoadError: not a Wan-design VAE, or Wan 2.2's VAE.
    """
    found = _prefix(sd)
    if found is None:
        raise VaeLoadError(path, f"{len(sd)} tensors without Wan/Qwen-Image VAE keys", f"'{_ORIGINAL}' or '{_DIFFUSERS}'")
    prefix, layout = found
    vae = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    wan22 = any(k in vae for k in _WAN22)
    if layout == "original":
        return {k: v for k, v in vae.items() if k.startswith(("encoder.", "decoder.", "conv1.", "conv2."))}, \
            layout + ("-2.2" if wan22 else ""), prefix
    if wan22:
        return _diffusers22_to_canonical(vae), "diffusers-2.2", prefix
    n_res = 1 + max((int(m.group(1)) for k in vae for m in [re.match(r"decoder\.up_blocks\.\d+\.resnets\.(\d+)\.", k)]
                     if m), default=0)  # decoder levels have num_res_blocks + 1 resnets
    per_level = n_res + 1
    out: dict[str, torch.Tensor] = {}
    for key, v in vae.items():
        k = _shared_to_canonical(key)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.(.+)$",
                   lambda m: f"encoder.downsamples.{m.group(1)}.{_res_leaf(m.group(2))}", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$",
                   lambda m: f"decoder.upsamples.{int(m.group(1)) * per_level + int(m.group(2))}."
                             f"{_res_leaf(m.group(3))}", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$",
                   lambda m: f"decoder.upsamples.{int(m.group(1)) * per_level + n_res}.{m.group(2)}", k)
        out[k] = v
    return out, layout, prefix


_QUANT = {"quant_conv.weight": "conv1.weight", "quant_conv.bias": "conv1.bias",
          "post_quant_conv.weight": "conv2.weight", "post_quant_conv.bias": "conv2.bias"}


def _shared_to_canonical(key: str) -> str:
    """The names both Wan versions share: conv_in/out, norm_out, the mid block, the quant convs."""
    k = key
    for side in ("encoder", "decoder"):
        k = k.replace(f"{side}.conv_in.", f"{side}.conv1.").replace(f"{side}.norm_out.gamma", f"{side}.head.0.gamma")
        k = k.replace(f"{side}.conv_out.", f"{side}.head.2.")
        k = re.sub(rf"^{side}\.mid_block\.resnets\.(\d+)\.(.+)$",
                   lambda m, s=side: f"{s}.middle.{2 * int(m.group(1))}.{_res_leaf(m.group(2))}", k)
        k = k.replace(f"{side}.mid_block.attentions.0.", f"{side}.middle.1.")
    return _QUANT.get(k, k)


def _diffusers22_to_canonical(vae: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def count(pattern: str) -> int:
        return 1 + max((int(m.group(1)) for k in vae for m in [re.match(pattern, k)] if m), default=-1)

    n_enc = count(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    n_dec = count(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, v in vae.items():
        k = _shared_to_canonical(key)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$",
                   lambda m: f"encoder.downsamples.{m.group(1)}.downsamples.{m.group(2)}.{_res_leaf(m.group(3))}", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsampler\.(.+)$",
                   lambda m: f"encoder.downsamples.{m.group(1)}.downsamples.{n_enc}.{m.group(2)}", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$",
                   lambda m: f"decoder.upsamples.{m.group(1)}.upsamples.{m.group(2)}.{_res_leaf(m.group(3))}", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsampler\.(.+)$",
                   lambda m: f"decoder.upsamples.{m.group(1)}.upsamples.{n_dec}.{m.group(2)}", k)
        out[k] = v
    return out


def canonical_to_diffusers(sd: Mapping[str, torch.Tensor], num_res_blocks: int, residual: bool = False
                           ) -> dict[str, torch.Tensor]:
    """Original Wan names → diffusers ``AutoencoderKLWan``/``AutoencoderKLQwenImage`` names (the inverse of
    :func:`wan_to_canonical`); ``residual``: the Wan 2.2 nesting."""
    back = {o: d for d, o in _RES.items()}
    per_level = num_res_blocks + 2

    def leaf(rest: str) -> str:
        for o, d in sorted(back.items(), key=lambda kv: -len(kv[0])):
            if rest.startswith(o):
                return d + rest[len(o):]
        return rest

    def nested(side: str, blocks: str, sampler: str):
        def fn(m: re.Match) -> str:
            i, j, rest = m.group(1), m.group(2), m.group(3)
            if rest.startswith(("residual.", "shortcut.")):
                return f"{side}.{blocks}.{i}.resnets.{j}.{leaf(rest)}"
            return f"{side}.{blocks}.{i}.{sampler}.{rest}"
        return fn

    def up(m: re.Match) -> str:
        i, rest = int(m.group(1)), m.group(2)
        b, r = divmod(i, per_level)
        if r == num_res_blocks + 1:
            return f"decoder.up_blocks.{b}.upsamplers.0.{rest}"
        return f"decoder.up_blocks.{b}.resnets.{r}.{leaf(rest)}"

    quant = {v: k for k, v in _QUANT.items()}
    out = {}
    for key, v in sd.items():
        k = key
        for side in ("encoder", "decoder"):
            k = k.replace(f"{side}.conv1.", f"{side}.conv_in.").replace(f"{side}.head.0.gamma", f"{side}.norm_out.gamma")
            k = k.replace(f"{side}.head.2.", f"{side}.conv_out.").replace(f"{side}.middle.1.", f"{side}.mid_block."
                                                                                               "attentions.0.")
            k = re.sub(rf"^{side}\.middle\.([02])\.(.+)$",
                       lambda m, s=side: f"{s}.mid_block.resnets.{int(m.group(1)) // 2}.{leaf(m.group(2))}", k)
        if residual:
            k = re.sub(r"^encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.(.+)$",
                       nested("encoder", "down_blocks", "downsampler"), k)
            k = re.sub(r"^decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.(.+)$",
                       nested("decoder", "up_blocks", "upsampler"), k)
        else:
            k = re.sub(r"^encoder\.downsamples\.(\d+)\.(.+)$", lambda m: f"encoder.down_blocks.{m.group(1)}."
                                                                         f"{leaf(m.group(2))}", k)
            k = re.sub(r"^decoder\.upsamples\.(\d+)\.(.+)$", up, k)
        out[quant.get(k, k)] = v
    return out


def _shape(sd: Mapping[str, torch.Tensor], key: str, path: object) -> tuple[int, ...]:
    if key not in sd:
        raise VaeLoadError(path, f"no tensor {key!r}", "a complete Wan-design VAE (encoder and decoder)")
    return tuple(sd[key].shape)


def _levels(sd: Mapping[str, torch.Tensor], path: object) -> tuple[list[str], list[str]]:
    """The encoder's residual-block prefixes and resampler prefixes, in order (either nesting)."""
    nested = any(re.match(r"encoder\.downsamples\.\d+\.downsamples\.", k) for k in sd)
    pat = r"(encoder\.downsamples\.\d+\.downsamples\.\d+)\." if nested else r"(encoder\.downsamples\.\d+)\."
    found = {m.group(1) for k in sd for m in [re.match(pat, k)] if m}
    order = sorted(found, key=lambda p: [int(x) for x in re.findall(r"\d+", p)])
    blocks = [p for p in order if f"{p}.residual.6.weight" in sd]
    resamplers = [p for p in order if f"{p}.resample.1.weight" in sd]
    if not blocks:
        raise VaeLoadError(path, "no encoder.downsamples residual blocks", "a Wan-design encoder")
    return blocks, resamplers


def wan_config(sd: Mapping[str, torch.Tensor], path: object = "<state dict>") -> tuple[WanConfig, tuple[bool, ...]]:
    """Config and the encoder's temporal-downsample flags, from a canonical state dict's shapes (Wan 2.1 or 2.2).

    Raises:
        VaeLoadError: a required tensor missing or shapes that do not fit the design (naming the key).
    """
    conv_in = _shape(sd, "encoder.conv1.weight", path)
    if len(conv_in) != 5:
        raise VaeLoadError(path, f"'encoder.conv1.weight' of shape {conv_in}", "a 3-D conv weight [O, I, 3, 3, 3]")
    residual = "decoder.upsamples.0.upsamples.0.residual.2.weight" in sd
    patch = 2 if residual else 1
    base, cin = conv_in[0], conv_in[1] // (patch * patch)
    z2 = _shape(sd, "conv1.weight", path)[0]
    blocks, resamplers = _levels(sd, path)
    levels = len(resamplers) + 1
    num_res = len(blocks) // levels
    widths = [int(sd[f"{b}.residual.6.weight"].shape[0]) for b in blocks]
    mult = tuple(w // base for w in widths[num_res - 1::num_res])
    if base <= 0 or len(mult) != levels or len(blocks) != num_res * levels or any(w % base for w in widths):
        raise VaeLoadError(path, f"encoder widths {widths} for base width {base} and {levels} levels",
                           "multiples of the base width, num_res_blocks per level")
    temporal = tuple(f"{r}.time_conv.weight" in sd for r in resamplers)
    cout = _shape(sd, "decoder.head.2.weight", path)[0] // (patch * patch)
    dec_out = _shape(sd, "decoder.head.0.gamma", path)[0]
    dec_base = dec_out // mult[0] if mult[0] else 0
    if dec_base <= 0 or dec_base * mult[0] != dec_out:
        raise VaeLoadError(path, f"decoder output width {dec_out} for width multipliers {list(mult)}",
                           "a multiple of the first multiplier")
    for value, name, bound in ((max(widths + [dec_base * max(mult)]), "channel width", MAX_WIDTH),
                               (max(cin, cout), "image channels", MAX_IMAGE_CHANNELS),
                               (z2 // 2, "latent channels", MAX_LATENT_CHANNELS)):
        if value > bound:
            raise VaeLoadError(path, f"{name} {value}", f"at most {bound} (Wan-design VAEs: widths up to 1024, 3 image "
                               "channels, 16 or 48 latent channels)")
    return WanConfig(base_dim=base, z_dim=z2 // 2, dim_mult=mult, num_res_blocks=num_res, in_channels=cin,
                     out_channels=cout, temporal_down=temporal,
                     decoder_base_dim=None if dec_base == base else dec_base, residual=residual, patch=patch), temporal
