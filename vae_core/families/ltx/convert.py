"""Key layouts of LTX-Video VAEs: detection, diffusers ``AutoencoderKLLTXVideo`` ↔ the original names of
:class:`vae_core.families.ltx.model.LTXVAE`, and the config (the block sequence) from shapes.

* original (Lightricks' files, the ``vae.`` part of LTX-Video checkpoints, ComfyUI's VAE files): a flat sequence
  ``encoder.down_blocks.<i>`` / ``decoder.up_blocks.<i>`` of residual runs (``res_blocks.<j>``), single
  channel-changing residual blocks, convs and resamplers; ``per_channel_statistics.*``;
* diffusers: the same blocks grouped (``down_blocks.<i>.{resnets, downsamplers.0, conv_out}``, ``mid_block``,
  ``up_blocks.<i>.{conv_in, upsamplers.0, resnets}``), ``conv_shortcut.conv``, ``norm3`` without ``.norm``,
  ``time_embedder``/``scale_shift_table`` for the decoder's last ones, ``latents_mean``/``latents_std``.

Norms carry no weights (RMS over channels), which sets LTX apart from every other 3-D conv VAE here (their ``norm1``
has ``gamma`` or ``weight``).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import torch

from ..base import MAX_IMAGE_CHANNELS, MAX_LATENT_CHANNELS, MAX_WIDTH
from ...errors import VaeLoadError
from .model import STAT_KEYS, LTXBlock, LTXConfig

__all__ = ["is_ltx", "ltx_to_canonical", "canonical_to_diffusers", "ltx_config", "original_config", "diffusers_config",
           "PREFIXES"]

PREFIXES = ("", "vae.", "first_stage_model.")
_ORIGINAL = ("decoder.up_blocks.0.res_blocks.0.conv1.conv.weight", "encoder.conv_in.conv.weight")
_DIFFUSERS = ("decoder.mid_block.resnets.0.conv1.conv.weight", "encoder.conv_in.conv.weight")
_STRIDES = {8: (2, 2, 2), 4: (1, 2, 2), 2: (2, 1, 1)}


def _found(sd: Mapping[str, torch.Tensor]) -> Optional[tuple[str, str]]:
    for p in PREFIXES:
        for layout, keys in (("original", _ORIGINAL), ("diffusers", _DIFFUSERS)):
            w = sd.get(p + keys[0])
            if w is None or w.dim() != 5 or p + keys[1] not in sd:
                continue
            norm = keys[0].replace("conv1.conv.weight", "norm1.")
            if not any(k.startswith(p + norm) for k in sd):  # RMS norms without weights: LTX alone
                return p, layout
    return None


def is_ltx(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``sd`` holds an LTX-Video VAE (either layout, maybe under ``vae.``/``first_stage_model.``)."""
    return _found(sd) is not None


def _leaf(k: str, to_diffusers: bool) -> str:
    pairs = ((".conv_shortcut.", ".conv_shortcut.conv."), (".norm3.norm.", ".norm3."), (".res_blocks.", ".resnets."))
    for o, d in pairs:
        k = k.replace(*((o, d) if to_diffusers else (d, o)))
    return k


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered children ``prefix<i>.`` the keys name."""
    return 1 + max((int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m),
                   default=-1)


def _group(kinds: list[str], encoder: bool) -> list[str]:
    """The diffusers prefix of each original block (``kinds``: their kinds in order)."""
    out, i, have = [], -1, set()
    last_res = max(j for j, k in enumerate(kinds) if k == "res")
    for j, kind in enumerate(kinds):
        if encoder:
            if kind == "res" and j == last_res:
                out.append("mid_block.")
                continue
            if kind == "res" or i < 0:
                i, have = i + 1, set()
            out.append(f"down_blocks.{i}." + {"res": "", "conv": "downsamplers.0.", "s2d": "downsamplers.0.",
                                               "res_xy": "conv_out."}[kind])
            continue
        if j == 0:
            out.append("mid_block.")
            continue
        part = {"res_xy": "conv_in", "d2s": "upsamplers", "res": "resnets"}[kind]
        order = ("conv_in", "upsamplers", "resnets")
        if i < 0 or any(order.index(h) >= order.index(part) for h in have):
            i, have = i + 1, set()
        have.add(part)
        out.append(f"up_blocks.{i}." + {"conv_in": "conv_in.", "upsamplers": "upsamplers.0.", "resnets": ""}[part])
    return out


def _kinds_original(sd: Mapping[str, torch.Tensor], side: str) -> list[str]:
    root = "encoder.down_blocks." if side == "encoder" else "decoder.up_blocks."
    kinds = []
    for i in range(_count(sd, root)):
        p = f"{root}{i}."
        if any(k.startswith(p + "res_blocks.") for k in sd):
            kinds.append("res")
        elif p + "conv1.conv.weight" in sd:
            kinds.append("res_xy")
        elif p + "conv.conv.weight" in sd:
            kinds.append("s2d" if side == "encoder" else "d2s")
        elif p + "conv.weight" in sd and side == "encoder":
            kinds.append("conv")
        else:
            found = sorted({k[len(p):].split(".")[0] for k in sd if k.startswith(p)})
            raise VaeLoadError("<state dict>", f"{side} block {i} with parts {found}", "an LTX-Video block: "
                               "res_blocks, a residual block (conv1), a resampler (conv.conv) or a stride-2 conv")
    return kinds


def _table(kinds_enc: list[str], kinds_dec: list[str]) -> list[tuple[str, str]]:
    """``(original prefix, diffusers prefix)`` per block, both sides."""
    pairs = [(f"encoder.down_blocks.{j}.", "encoder." + d) for j, d in enumerate(_group(kinds_enc, True))]
    return pairs + [(f"decoder.up_blocks.{j}.", "decoder." + d) for j, d in enumerate(_group(kinds_dec, False))]


_FIXED = (("decoder.last_time_embedder.", "decoder.time_embedder."),
          ("decoder.last_scale_shift_table", "decoder.scale_shift_table"),
          (f"per_channel_statistics.{STAT_KEYS[0]}", "latents_mean"),
          (f"per_channel_statistics.{STAT_KEYS[1]}", "latents_std"))


def _diffusers_kinds(sd: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """The original block kinds, read from diffusers keys (the grouping walked in forward order)."""
    enc: list[str] = []
    for i in range(_count(sd, "encoder.down_blocks.")):
        p = f"encoder.down_blocks.{i}."
        if any(k.startswith(p + "resnets.") for k in sd):
            enc.append("res")
        if p + "downsamplers.0.conv.conv.weight" in sd:
            enc.append("s2d")
        elif p + "downsamplers.0.conv.weight" in sd:
            enc.append("conv")
        if p + "conv_out.conv1.conv.weight" in sd:
            enc.append("res_xy")
    enc.append("res")  # the mid block
    dec = ["res"]
    for i in range(_count(sd, "decoder.up_blocks.")):
        p = f"decoder.up_blocks.{i}."
        if p + "conv_in.conv1.conv.weight" in sd:
            dec.append("res_xy")
        if p + "upsamplers.0.conv.conv.weight" in sd:
            dec.append("d2s")
        if any(k.startswith(p + "resnets.") for k in sd):
            dec.append("res")
    return enc, dec


def ltx_to_canonical(sd: Mapping[str, torch.Tensor], path: object = "<state dict>"
                     ) -> tuple[dict[str, torch.Tensor], str, str]:
    """Any layout → original names; returns ``(state dict, layout, prefix)`` (encoder, decoder and the two latent
    statistics; the other ``per_channel_statistics`` entries are dropped).

    Raises:
        VaeLoadError: not an LTX-Video VAE, or a block the design does not have.
    """
    found = _found(sd)
    if found is None:
        raise VaeLoadError(path, f"{len(sd)} tensors without LTX-Video VAE keys",
                           f"'{_ORIGINAL[0]}' or '{_DIFFUSERS[0]}' (a 5-D conv) and no norm weights")
    prefix, layout = found
    keep = ("encoder.", "decoder.", "per_channel_statistics.mean-of-means", "per_channel_statistics.std-of-means",
            "latents_mean", "latents_std")
    own = {k[len(prefix):]: v for k, v in sd.items()
           if k.startswith(prefix) and k[len(prefix):].startswith(keep)}
    if layout == "original":
        return own, layout, prefix
    try:
        table = _table(*_diffusers_kinds(own))
    except ValueError as exc:  # no residual run at all
        raise VaeLoadError(path, f"diffusers LTX keys without residual blocks ({exc})", "an LTX-Video VAE") from None
    return {_to_original(k, table): v for k, v in own.items()}, layout, prefix


_PARTS = ("conv_in.", "upsamplers.0.", "downsamplers.0.", "conv_out.")


def _to_original(key: str, table: list[tuple[str, str]]) -> str:
    """A diffusers key → its original name (a group prefix owns only its resnets and time embedder)."""
    for o, d in _FIXED:
        if key.startswith(d):
            return o + key[len(d):]
    best: Optional[tuple[str, str]] = None
    for o, d in table:
        rest = key[len(d):]
        if not key.startswith(d) or (not d.endswith(_PARTS) and not rest.startswith(("resnets.", "time_embedder."))):
            continue
        if best is None or len(d) > len(best[1]):
            best = (o, d)
    if best is None:
        return key
    return _leaf(best[0] + key[len(best[1]):], to_diffusers=False)


def canonical_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original names → diffusers ``AutoencoderKLLTXVideo`` names (the inverse of :func:`ltx_to_canonical`)."""
    table = _table(_kinds_original(sd, "encoder"), _kinds_original(sd, "decoder"))
    out = {}
    for k, v in sd.items():
        new = k
        for o, d in _FIXED:
            if k.startswith(o):
                new = d + k[len(o):]
                break
        else:
            for o, d in table:
                if k.startswith(o):
                    new = _leaf(d + k[len(o):], to_diffusers=True)
                    break
            else:
                new = _leaf(k, to_diffusers=True)
        out[new] = v
    return out


def _shape(sd: Mapping[str, torch.Tensor], key: str, path: object) -> tuple[int, ...]:
    if key not in sd:
        raise VaeLoadError(path, f"no tensor {key!r}", "a complete LTX-Video VAE (encoder and decoder)")
    return tuple(sd[key].shape)


def _blocks(sd: Mapping[str, torch.Tensor], side: str, end_width: int, residual: Optional[list[bool]],
            path: object) -> tuple[LTXBlock, ...]:
    """One side's block sequence from shapes (``end_width``: the width after the last block; ``residual``: the
    decoder upsamplers' shortcut flags when a config gives them)."""
    root = "encoder.down_blocks." if side == "encoder" else "decoder.up_blocks."
    try:
        kinds = _kinds_original(sd, side)
    except VaeLoadError as exc:
        raise VaeLoadError(path, exc.found, exc.expected) from None
    widths = []
    for i, kind in enumerate(kinds):
        p = f"{root}{i}."
        key = {"res": p + "res_blocks.0.conv1.conv.weight", "res_xy": p + "conv1.conv.weight",
               "conv": p + "conv.weight", "s2d": p + "conv.conv.weight", "d2s": p + "conv.conv.weight"}[kind]
        widths.append(_shape(sd, key, path)[1])
    widths.append(end_width)
    out, ups = [], 0
    for i, kind in enumerate(kinds):
        p, cin, cout = f"{root}{i}.", widths[i], widths[i + 1]
        if kind == "res":
            if cout != cin:
                raise VaeLoadError(path, f"{p}res_blocks of width {cin} followed by width {cout}",
                                   "a residual run that keeps its width")
            layers = _count(sd, p + "res_blocks.")
            out.append(LTXBlock("res", cin, cin, layers=layers, noise=p + "res_blocks.0.per_channel_scale1" in sd))
        elif kind == "res_xy":
            out.append(LTXBlock("res_xy", cin, _shape(sd, p + "conv1.conv.weight", path)[0],
                                noise=p + "per_channel_scale1" in sd))
        elif kind == "conv":
            o = _shape(sd, p + "conv.weight", path)[0]
            out.append(LTXBlock("conv", cin, o, stride=(2, 2, 2)))
        else:
            o = _shape(sd, p + "conv.conv.weight", path)[0]
            if kind == "s2d":
                prod, ok = cout // o if o else 0, o and cout % o == 0
                stride = _STRIDES.get(prod) if ok else None
                if stride is None or (cin * prod) % cout:
                    raise VaeLoadError(path, f"{p}conv.conv.weight with {o} outputs before width {cout}",
                                       "a downsampler packing 2, 4 or 8 positions into the next width")
                out.append(LTXBlock("s2d", cin, cout, stride=stride))
            else:
                prod = o // cout if cout else 0
                stride = _STRIDES.get(prod) if cout and o % cout == 0 else None
                if stride is None or cin % cout:
                    raise VaeLoadError(path, f"{p}conv.conv.weight with {o} outputs from width {cin} to {cout}",
                                       "an upsampler unpacking 2, 4 or 8 positions")
                res = residual[ups] if residual is not None and ups < len(residual) else cin // cout == 2
                out.append(LTXBlock("d2s", cin, cout, stride=stride, residual=res, reduction=cin // cout))
                ups += 1
        if max(cin, cout) > MAX_WIDTH:
            raise VaeLoadError(path, f"channel width {max(cin, cout)} at {p}", f"at most {MAX_WIDTH}")
    return tuple(out)


def ltx_config(sd: Mapping[str, torch.Tensor], layout: str, path: object = "<state dict>",
               config: Optional[Mapping[str, Any]] = None) -> tuple[LTXConfig, dict[str, str]]:
    """The config of a canonical state dict from its shapes, plus what shapes cannot say from ``config`` (a
    diffusers ``config.json`` or the ``vae`` part of an original file's metadata): the decoder's causality, its
    spatial padding (Lightricks' files: ``"reflect"`` unless said; diffusers: ``"zeros"``) and its upsamplers'
    shortcuts (unsaid: present where an upsampler halves the width, as in every release since 0.9.1). Returns the
    config and where each setting came from.

    Raises:
        VaeLoadError: a required tensor missing or shapes that do not fit the design (naming the key).
    """
    cfg = dict(config or {})
    sources: dict[str, str] = {}
    conv_in = _shape(sd, "encoder.conv_in.conv.weight", path)
    dec_out = _shape(sd, "decoder.conv_out.conv.weight", path)
    enc_out = _shape(sd, "encoder.conv_out.conv.weight", path)
    z = _shape(sd, "decoder.conv_in.conv.weight", path)[1]
    if len(conv_in) != 5 or conv_in[1] % 16 or dec_out[0] % 16:
        raise VaeLoadError(path, f"encoder.conv_in of shape {conv_in}, decoder.conv_out of shape {dec_out}",
                           "3-D convs taking and giving 4×4-pixel patches (channels a multiple of 16)")
    if enc_out[0] not in (z + 1, 2 * z):
        raise VaeLoadError(path, f"encoder.conv_out with {enc_out[0]} outputs for {z} latent channels",
                           f"{z + 1} (one shared log-variance) or {2 * z}")
    if z > MAX_LATENT_CHANNELS or max(conv_in[1], dec_out[0]) // 16 > MAX_IMAGE_CHANNELS:
        raise VaeLoadError(path, f"{z} latent channels, {conv_in[1] // 16} image channels",
                           f"at most {MAX_LATENT_CHANNELS} and {MAX_IMAGE_CHANNELS}")
    residual = cfg.get("upsample_residual")
    if residual is not None:
        # diffusers: one flag per up block (a bool for all), listed from the output end; only blocks with an
        # upsampler (decoder_spatio_temporal_scaling) have one to apply it to
        scaling = cfg.get("decoder_spatio_temporal_scaling")
        n = len(scaling) if isinstance(scaling, (list, tuple)) else None
        flags = [bool(residual)] * (n or 0) if isinstance(residual, bool) else [bool(r) for r in residual]
        if isinstance(scaling, (list, tuple)):
            flags = [f for f, up in zip(flags, scaling) if up]
        elif isinstance(scaling, bool) and not scaling:
            flags = []
        residual = flags[::-1]
    else:
        blocks = cfg.get("decoder_blocks") or cfg.get("blocks")
        if isinstance(blocks, list):
            # listed from the decoder's output end (Lightricks' code builds the decoder from them reversed)
            residual = [bool(b[1].get("residual", False)) for b in reversed(blocks)
                        if isinstance(b, (list, tuple)) and len(b) == 2 and str(b[0]).startswith("compress")
                        and isinstance(b[1], dict)] or None
    sources["upsample_residual"] = "config" if residual is not None else \
        "shapes (a shortcut where an upsampler halves the width: every release since 0.9.1)"
    if cfg.get("encoder_causal") is False:  # the reference's option; every release encodes causally
        raise VaeLoadError(path, "encoder_causal: false in its config", "a causal encoder (every released LTX VAE)")
    encoder = _blocks(sd, "encoder", enc_out[1], None, path)
    decoder = _blocks(sd, "decoder", dec_out[1], residual, path)
    conditioned = "decoder.timestep_scale_multiplier" in sd
    if conditioned and not all(b.kind != "res" or f"decoder.up_blocks.{i}.time_embedder.timestep_embedder."
                               "linear_1.weight" in sd for i, b in enumerate(decoder)):
        raise VaeLoadError(path, "a timestep scale without a time embedder in every residual run",
                           "a fully timestep-conditioned decoder, or none")
    ltx2 = "LTX2" in str(cfg.get("_class_name", ""))  # diffusers' AutoencoderKLLTX2Video: its own defaults
    causal = cfg.get("decoder_causal", cfg.get("causal_decoder"))
    sources["decoder_causal"] = "config" if causal is not None else "default (non-causal, as every release)"
    if causal is None:
        causal = ltx2  # AutoencoderKLLTX2Video's class default
    both = cfg.get("spatial_padding_mode")
    padding = cfg.get("decoder_spatial_padding_mode", both)
    enc_padding = cfg.get("encoder_spatial_padding_mode", both)
    if layout == "diffusers" and not ltx2:
        padding = enc_padding = "zeros"
        sources["decoder_padding"] = "diffusers (AutoencoderKLLTXVideo pads with zeros)"
    else:
        sources["decoder_padding"] = "config" if padding is not None else \
            "default of Lightricks' code and ComfyUI (reflect)"
        padding, enc_padding = padding or "reflect", enc_padding or "zeros"
    for value in (padding, enc_padding):
        if value not in ("zeros", "reflect"):
            raise VaeLoadError(path, f"spatial_padding_mode {value!r}", "'zeros' or 'reflect'")
    patch = int((conv_in[1] // 3) ** 0.5) if conv_in[1] % 3 == 0 else 4
    if patch * patch * 3 != conv_in[1]:
        raise VaeLoadError(path, f"encoder.conv_in taking {conv_in[1]} channels", "3·p² (RGB in p×p patches)")
    ups = [b.stride for b in decoder if b.kind == "d2s"]
    downs = [b.stride for b in encoder if b.kind in ("conv", "s2d")]
    for axis, name in ((0, "time"), (1, "space")):
        up, down = 2 ** sum(s[axis] == 2 for s in ups), 2 ** sum(s[axis] == 2 for s in downs)
        if up != down:
            raise VaeLoadError(path, f"a decoder that scales {name} by {up} and an encoder by {down}",
                               f"the same factor in {name} both ways (every released LTX VAE)")
    return LTXConfig(encoder=encoder, decoder=decoder, patch=patch, z_dim=z, in_channels=3,
                     out_channels=dec_out[0] // (patch * patch),
                     log_var="uniform" if enc_out[0] == z + 1 else "per_channel", conditioned=conditioned,
                     decoder_causal=bool(causal), decoder_padding=str(padding),
                     encoder_padding=str(enc_padding)), sources


_S2D = {(1, 2, 2): "compress_space_res", (2, 1, 1): "compress_time_res", (2, 2, 2): "compress_all_res"}
_D2S = {(1, 2, 2): "compress_space", (2, 1, 1): "compress_time", (2, 2, 2): "compress_all"}


def original_config(cfg: LTXConfig) -> dict[str, Any]:
    """The ``vae`` config Lightricks' files carry in their safetensors metadata (``{"config": {"vae": ...}}``), as
    Lightricks' code and ComfyUI read it: block lists (the decoder's from its output end), the decoder's causality,
    and the padding of each side (``spatial_padding_mode`` where both agree: ComfyUI reads only that key, for both
    sides; unsaid, it pads the encoder with zeros and reflects in the decoder)."""
    enc, dec = [], []
    for b in cfg.encoder:
        if b.kind == "res":
            enc.append(["res_x", {"num_layers": b.layers}])
        elif b.kind == "res_xy":
            enc.append(["res_x_y", {"multiplier": b.cout // b.cin}])
        elif b.kind == "conv":
            enc.append(["compress_all", {}])
        else:
            enc.append([_S2D[b.stride], {"multiplier": b.cout // b.cin}])
    for b in reversed(cfg.decoder):
        if b.kind == "res":
            dec.append(["res_x", {"num_layers": b.layers, "inject_noise": b.noise}])
        elif b.kind == "res_xy":
            dec.append(["res_x_y", {"multiplier": b.cin // b.cout}])
        else:
            dec.append([_D2S[b.stride], {"residual": b.residual, "multiplier": b.reduction}])
    out: dict[str, Any] = {"_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": cfg.in_channels,
                           "out_channels": cfg.out_channels, "latent_channels": cfg.z_dim, "encoder_blocks": enc,
                           "decoder_blocks": dec, "scaling_factor": 1.0, "norm_layer": "pixel_norm",
                           "patch_size": cfg.patch, "latent_log_var": cfg.log_var, "use_quant_conv": False,
                           "causal_decoder": cfg.decoder_causal, "timestep_conditioning": cfg.conditioned}
    out["encoder_spatial_padding_mode"] = cfg.encoder_padding
    out["decoder_spatial_padding_mode"] = cfg.decoder_padding
    if cfg.decoder_padding == cfg.encoder_padding:
        out["spatial_padding_mode"] = cfg.decoder_padding
    return out


def diffusers_config(cfg: LTXConfig) -> dict[str, Any]:
    """``AutoencoderKLLTXVideo``'s config for ``cfg`` (diffusers pads both sides with zeros: only such a config).

    diffusers lists the decoder's values from its output end and builds an up block of width ``w`` with an upsampler
    reducing channels by ``f`` from a listed width ``w·f``."""
    enc_groups, dec_groups = _group([b.kind for b in cfg.encoder], True), _group([b.kind for b in cfg.decoder], False)
    is095 = any(b.kind == "s2d" for b in cfg.encoder)
    res = [b for b in cfg.encoder if b.kind == "res"]
    down = {g.split(".")[1]: b for g, b in zip(enc_groups, cfg.encoder) if b.kind in ("conv", "s2d")}
    n = len(res) - 1  # down blocks (the last run is the mid block)
    kinds = {(1, 2, 2): "spatial", (2, 1, 1): "temporal", (2, 2, 2): "spatiotemporal"}
    out: dict[str, Any] = {"_class_name": "AutoencoderKLLTXVideo", "in_channels": cfg.in_channels,
                           "out_channels": cfg.out_channels, "latent_channels": cfg.z_dim, "patch_size": cfg.patch,
                           "patch_size_t": 1, "encoder_causal": True, "decoder_causal": cfg.decoder_causal,
                           "layers_per_block": [b.layers for b in res],
                           "spatio_temporal_scaling": [str(i) in down for i in range(n)],
                           "timestep_conditioning": cfg.conditioned, "scaling_factor": 1.0}
    if is095:
        out |= {"block_out_channels": [res[0].cin] + [b.cout for b in cfg.encoder if b.kind == "s2d"],
                "down_block_types": ["LTXVideo095DownBlock3D"] * n,
                "downsample_type": [kinds[down[str(i)].stride] if str(i) in down else "conv" for i in range(n)]}
    else:
        out |= {"block_out_channels": [b.cin for b in res[:n]], "down_block_types": ["LTXVideoDownBlock3D"] * n,
                "downsample_type": ["conv"] * n}
    blocks: list[dict[str, Any]] = []  # the decoder's up blocks, from its input end
    for g, b in zip(dec_groups, cfg.decoder):
        if g == "mid_block.":
            continue
        i = int(g.split(".")[1])
        if i == len(blocks):
            blocks.append({"width": None, "layers": 0, "noise": False, "up": False, "residual": False, "factor": 1})
        if b.kind == "res":
            blocks[i] |= {"width": b.cin, "layers": b.layers, "noise": b.noise}
        elif b.kind == "d2s":
            blocks[i] |= {"up": True, "residual": b.residual, "factor": b.reduction}
    mid = cfg.decoder[0]
    widths = [blk["width"] * blk["factor"] for blk in blocks]
    out |= {"decoder_block_out_channels": widths[::-1],
            "decoder_layers_per_block": ([mid.layers] + [blk["layers"] for blk in blocks])[::-1],
            "decoder_spatio_temporal_scaling": [blk["up"] for blk in blocks][::-1],
            "decoder_inject_noise": ([mid.noise] + [blk["noise"] for blk in blocks])[::-1],
            "upsample_residual": [blk["residual"] for blk in blocks][::-1],
            "upsample_factor": [blk["factor"] for blk in blocks][::-1]}
    return out
