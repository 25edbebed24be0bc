"""The SD VAE's key names in its two layouts — LDM/CompVis (``encoder.down.0.block.0``, ``mid.attn_1.q``) and
diffusers (``encoder.down_blocks.0.resnets.0``, ``mid_block.attentions.0.to_q``) — renamed either way: the kl
family's layouts, and HunyuanVideo 1.0's (the same names with 3-D convs under ``.conv``)."""
from __future__ import annotations

import re
from typing import Mapping

import torch

__all__ = ["diffusers_to_ldm", "ldm_to_diffusers", "MAX_LEVELS", "MAX_BLOCKS"]


_ATTN_D2L = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_ATTN_L2D = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


#: Bounds checked before any module is built: SD-family VAEs have 4 levels of 2 blocks (decoder: one more).
MAX_LEVELS = 8
MAX_BLOCKS = 8
_HUGE = 10**6


def _index(digits: str) -> int:
    # a crafted 5000-digit index must not reach int() (Python refuses > 4300 digits with a bare ValueError)
    return int(digits) if len(digits) <= 6 else _HUGE


def _levels(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = {_index(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def diffusers_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename diffusers VAE keys to LDM keys; Linear attention weights ``[C, C]`` become ``[C, C, 1, 1]``.

    Keys that match no rule are kept unchanged, so the strict load reports them as unexpected.
    """
    n_up = _levels(sd, r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = key
        k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.", k)
        k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
                   lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", k)
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", k)
        if m and m.group(2) in _ATTN_D2L:
            leaf = _ATTN_D2L[m.group(2)]
            k = f"{m.group(1)}.mid.attn_1.{leaf}.{m.group(3)}"
            if leaf != "norm" and m.group(3) == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        k = re.sub(r"\.conv_shortcut\.", ".nin_shortcut.", k)
        out[k] = value
    return out


def ldm_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename LDM VAE keys to current diffusers keys; 1×1-conv attention weights become Linear ``[C, C]``."""
    n_up = _levels(sd, r"decoder\.up\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = key
        k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", k)
        k = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", k)
        k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
        k = re.sub(r"^decoder\.up\.(\d+)\.block\.(\d+)\.",
                   lambda m: f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.resnets.{m.group(2)}.", k)
        k = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                   lambda m: f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.upsamplers.0.", k)
        k = re.sub(r"^(encoder|decoder)\.mid\.block_(\d+)\.",
                   lambda m: f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.", k)
        m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)$", k)
        if m and m.group(2) in _ATTN_L2D:
            k = f"{m.group(1)}.mid_block.attentions.0.{_ATTN_L2D[m.group(2)]}.{m.group(3)}"
            if m.group(2) != "norm" and m.group(3) == "weight" and value.ndim == 4:
                value = value[:, :, 0, 0]
        k = re.sub(r"\.nin_shortcut\.", ".conv_shortcut.", k)
        out[k] = value
    return out
