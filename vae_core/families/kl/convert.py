"""Key layouts of SD-family VAE state dicts: detection, LDM ↔ diffusers conversion, config inference.

Layouts are recognised from keys (never from file names):

* LDM / CompVis: ``encoder.down.0.block.0.norm1.weight``, ``mid.attn_1.q.weight`` as ``[C, C, 1, 1]`` convs;
* diffusers: ``encoder.down_blocks.0.resnets.0.norm1.weight``, attention as Linear ``[C, C]`` weights named
  ``to_q/to_k/to_v/to_out.0`` or the deprecated ``query/key/value/proj_attn``;

either of them bare, or inside a full checkpoint under ``first_stage_model.`` or ``vae.``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from ..base import MAX_IMAGE_CHANNELS, MAX_LATENT_CHANNELS, MAX_WIDTH
from ...errors import VaeInputError, VaeLoadError
from ..scaling import MAX_ABS_SHIFT, SCALE_RANGE
from ..sd_keys import MAX_BLOCKS, MAX_LEVELS, _index, _levels, diffusers_to_ldm, ldm_to_diffusers
from .model import ModelConfig

__all__ = ["Layout", "detect_layout", "extract_vae", "to_ldm", "diffusers_to_ldm", "ldm_to_diffusers", "infer_config",
           "check_bounds", "nest_flux2", "MAX_LEVELS", "MAX_BLOCKS"]

PREFIXES = ("", "first_stage_model.", "vae.")
_LDM_MARK = ("encoder.conv_in.weight", "decoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight")
_DIFF_MARK = ("encoder.conv_in.weight", "decoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight")
_IGNORED = ("model_ema.decay", "model_ema.num_updates")


@dataclass(frozen=True)
class Layout:
    """Where the VAE sits in a state dict: ``layout`` is ``"ldm"`` or ``"diffusers"``; ``prefix`` is stripped."""

    layout: str
    prefix: str

    @property
    def embedded(self) -> bool:
        return bool(self.prefix)


def detect_layout(sd: Mapping[str, torch.Tensor], path: object = "<state dict>") -> Layout:
    """Find the VAE inside ``sd`` by its keys.

    Raises:
        VaeLoadError: no VAE keys (e.g. a UNet- or CLIP-only file, or a checkpoint without a VAE).
    """
    for prefix in PREFIXES:
        if all(prefix + k in sd for k in _LDM_MARK):
            return Layout("ldm", prefix)
        if all(prefix + k in sd for k in _DIFF_MARK):
            return Layout("diffusers", prefix)
    sample = sorted(sd)[:5]
    hint = ""
    if any(k.startswith(("model.diffusion_model.", "input_blocks.", "down_blocks.", "double_blocks.")) for k in sd):
        hint = " (UNet/transformer weights without a VAE)"
    elif any(k.startswith(("cond_stage_model.", "text_model.", "conditioner.", "transformer.")) for k in sd):
        hint = " (text-encoder weights without a VAE)"
    partial = [p + m for p in PREFIXES for m in _LDM_MARK + _DIFF_MARK if p + m in sd]
    if partial:
        hint += f" (only part of a VAE: found {sorted(set(partial))})"
    raise VaeLoadError(path, f"{len(sd)} tensors with no VAE encoder+decoder keys{hint}; first keys {sample}",
                       "LDM keys like 'encoder.down.0.block.0.conv1.weight' or diffusers keys like "
                       "'encoder.down_blocks.0.resnets.0.conv1.weight', bare or under 'first_stage_model.'/'vae.'")


def extract_vae(sd: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Keep the VAE keys (prefix stripped), dropping ``loss.*`` and EMA bookkeeping entries."""
    n = len(layout.prefix)
    out = {}
    for k, v in sd.items():
        if not k.startswith(layout.prefix):
            continue
        name = k[n:]
        if name.startswith("loss") or name in _IGNORED:
            continue
        if layout.prefix == "" and not name.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.",
                                                         "bn.")):
            continue
        out[name] = v
    return _flatten_flux2(out)


#: Flux.2's original (BFL) layout nests the 1×1 quant convs in the encoder/decoder; diffusers and this package keep
#: them at the top level, as SD's LDM layout does. ``bn.num_batches_tracked`` is training bookkeeping.
_NESTED = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}


def _flatten_flux2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k == "bn.num_batches_tracked":
            continue
        for nested, flat in _NESTED.items():
            if k.startswith(nested):
                k = flat + k[len(nested):]
        out[k] = v
    return out


def nest_flux2(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Top-level quant convs → Flux.2's original nested names (for saving a Flux.2 VAE in its own layout)."""
    out = {}
    for k, v in sd.items():
        for nested, flat in _NESTED.items():
            if k.startswith(flat):
                k = nested + k[len(flat):]
        out[k] = v
    return out


#: Bound on GroupNorm groups (real VAEs: 32); the shape bounds every family shares are in :mod:`..base`.
MAX_NORM_GROUPS = 256


def check_bounds(sd: Mapping[str, torch.Tensor], path: object = "<state dict>") -> None:
    """Refuse LDM keys whose level or block indices exceed :data:`MAX_LEVELS`/:data:`MAX_BLOCKS` (decoder blocks:
    one more), before anything is inferred or built: a crafted ``encoder.down.0.block.10000000.conv1.weight`` must
    cost a key scan, not ten million modules.

    Raises:
        VaeLoadError: naming the first offending key.
    """
    for key in sd:
        m = re.match(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(?:block\.(\d+)\.)?", key)
        if not m:
            continue
        level = _index(m.group(3))
        block = _index(m.group(4)) if m.group(4) is not None else 0
        max_block = MAX_BLOCKS + (1 if m.group(1) == "decoder" else 0)
        if level >= MAX_LEVELS or block >= max_block:
            raise VaeLoadError(path, f"key {key!r} (level index {m.group(3)[:12]}, block index "
                               f"{(m.group(4) or '-')[:12]})", f"at most {MAX_LEVELS} levels of at most {MAX_BLOCKS} "
                               f"blocks ({MAX_BLOCKS + 1} in the decoder), as in SD-family VAEs")


def to_ldm(sd: Mapping[str, torch.Tensor], path: object = "<state dict>") -> tuple[dict[str, torch.Tensor], Layout]:
    """Find the VAE in any state dict and return it with bare LDM keys, plus where it was found."""
    layout = detect_layout(sd, path)
    vae = extract_vae(sd, layout)
    return (diffusers_to_ldm(vae) if layout.layout == "diffusers" else vae), layout


def _shape(sd: Mapping[str, torch.Tensor], key: str, path: object) -> torch.Size:
    if key not in sd:
        raise VaeLoadError(path, f"no tensor '{key}'", "a complete AutoencoderKL (encoder, decoder)")
    return sd[key].shape


def infer_config(sd: Mapping[str, torch.Tensor], path: object = "<state dict>",
                 norm_groups: Optional[int] = None) -> ModelConfig:
    """Infer widths, levels, blocks and latent channels of an LDM-keyed state dict from tensor shapes.

    Args:
        sd: LDM-keyed VAE state dict (prefix stripped).
        norm_groups: GroupNorm groups when known (diffusers ``norm_num_groups``); 32 otherwise.
    Raises:
        VaeLoadError: a required tensor is missing or widths are inconsistent.
    """
    check_bounds(sd, path)
    conv_in = _shape(sd, "encoder.conv_in.weight", path)
    ch, in_channels = int(conv_in[0]), int(conv_in[1])
    for key in ("encoder.conv_in.weight", "decoder.conv_in.weight", "encoder.conv_out.weight",
                "decoder.conv_out.weight"):
        shape = tuple(_shape(sd, key, path))
        if len(shape) != 4 or 0 in shape:
            raise VaeLoadError(path, f"'{key}' of shape {shape}", "a 4-d conv weight with no zero-sized dimension")
    n_levels = _levels(sd, r"encoder\.down\.(\d+)\.")
    widths = [int(_shape(sd, f"encoder.down.{i}.block.0.conv1.weight", path)[0]) for i in range(n_levels)]
    if not widths or any(w <= 0 or w % ch for w in widths):
        raise VaeLoadError(path, f"encoder level widths {widths} for conv_in width {ch}",
                           "level widths that are multiples of the conv_in width")
    dec_top = int(_shape(sd, "decoder.conv_in.weight", path)[0])  # the decoder's widest level
    mult = [w // ch for w in widths]
    if dec_top % mult[-1]:
        raise VaeLoadError(path, f"decoder.conv_in with {dec_top} output channels for level multipliers {mult}",
                           f"a multiple of {mult[-1]}")
    decoder_ch = dec_top // mult[-1]
    num_res = _levels(sd, r"encoder\.down\.0\.block\.(\d+)\.")
    dec_in = _shape(sd, "decoder.conv_in.weight", path)
    z = int(dec_in[1])
    enc_out = int(_shape(sd, "encoder.conv_out.weight", path)[0])
    if enc_out != 2 * z:
        raise VaeLoadError(path, f"encoder.conv_out with {enc_out} output channels and decoder.conv_in with {z} "
                           "input channels", "encoder output = 2 × latent channels (mean and log-variance)")
    use_quant = "quant_conv.weight" in sd
    embed = int(sd["quant_conv.weight"].shape[0]) // 2 if use_quant else z
    out_channels = int(_shape(sd, "decoder.conv_out.weight", path)[0])
    groups = norm_groups or 32
    all_widths = widths + [decoder_ch * m for m in mult]
    if any(w % groups for w in all_widths):
        raise VaeLoadError(path, f"channel widths {all_widths}, not divisible by {groups} GroupNorm groups",
                           "widths divisible by the group count (give a diffusers config.json with "
                           "norm_num_groups for unusual widths)")
    latent = embed if use_quant else z
    for value, name, bound in ((max(all_widths), "channel width", MAX_WIDTH), (in_channels, "image input channels",
                               MAX_IMAGE_CHANNELS), (out_channels, "image output channels", MAX_IMAGE_CHANNELS),
                               (max(z, latent), "latent channels", MAX_LATENT_CHANNELS)):
        if value > bound:
            raise VaeLoadError(path, f"{name} {value}", f"at most {bound} (real VAEs: widths up to 1024, 3 image "
                               "channels, up to 128 latent channels)")
    bn = [k for k in ("bn.running_mean", "bn.running_var") if k in sd]
    if len(bn) == 1:
        raise VaeLoadError(path, f"only {bn[0]!r} of Flux.2's latent BatchNorm statistics",
                           "both bn.running_mean and bn.running_var")
    if bn and any(tuple(sd[k].shape) != (4 * latent,) for k in bn):
        raise VaeLoadError(path, f"latent BatchNorm statistics of shape {tuple(sd[bn[0]].shape)} for {latent} latent "
                           "channels", f"({4 * latent},): one per channel of the 2×2-patchified latents (Flux.2)")
    if bn and not sd["bn.running_mean"].is_meta:  # values, where there are some (not a host's meta stand-ins)
        _check_latent_statistics(sd["bn.running_mean"], sd["bn.running_var"], path)
    return ModelConfig(ch=ch, ch_mult=tuple(mult), num_res_blocks=num_res, z_channels=z, embed_dim=embed,
                       use_quant_conv=use_quant, in_channels=in_channels, out_channels=out_channels,
                       norm_groups=groups, decoder_ch=None if decoder_ch == ch else decoder_ch,
                       latent_bn=bool(bn))


def _check_latent_statistics(mean: torch.Tensor, var: torch.Tensor, path: object) -> None:
    """Flux.2's BatchNorm statistics must standardise latents into finite numbers: |mean| ≤ MAX_ABS_SHIFT and the
    standard deviation √var within SCALE_RANGE, as for scalar factors."""
    lo, hi = SCALE_RANGE
    m, v = mean.detach().double(), var.detach().double()
    bad_mean = (m.abs() > MAX_ABS_SHIFT).nonzero().flatten().tolist()
    bad_var = ((v < lo * lo) | (v > hi * hi)).nonzero().flatten().tolist()
    if bad_mean or bad_var:
        i, key, t = (bad_var[0], "bn.running_var", v) if bad_var else (bad_mean[0], "bn.running_mean", m)
        raise VaeLoadError(path, f"{key}[{i}] = {float(t[i]):.6g} ({len(bad_mean) + len(bad_var)} out of range)",
                           f"latent means within ±{MAX_ABS_SHIFT:g} and variances from {lo * lo:g} to {hi * hi:g}")


def diffusers_config(cfg: ModelConfig, scaling_factor: float, shift_factor: Optional[float]) -> dict:
    """A diffusers ``config.json`` dict describing ``cfg`` (for :func:`vae_core.save_vae` folder output):
    ``AutoencoderKL``, or ``AutoencoderKLFlux2`` for a VAE with Flux.2's latent BatchNorm."""
    n = len(cfg.ch_mult)
    extra: dict = {}
    if cfg.latent_bn:
        extra = {"_class_name": "AutoencoderKLFlux2", "decoder_block_out_channels": cfg.decoder_widths,
                 "batch_norm_eps": cfg.bn_eps, "batch_norm_momentum": 0.1, "patch_size": [2, 2]}
        scaling_factor, shift_factor = None, None  # Flux.2 normalises with the BatchNorm statistics instead
    elif cfg.decoder_ch is not None:
        raise VaeInputError(f"a VAE with decoder widths {cfg.decoder_widths} unlike its encoder's "
                            f"{cfg.encoder_widths}; expected equal widths for diffusers' AutoencoderKL")
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "latent_channels": cfg.latent_channels,
        "layers_per_block": cfg.num_res_blocks,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": 512,
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "force_upcast": True,
        "mid_block_add_attention": True,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_quant_conv,
    } | extra
