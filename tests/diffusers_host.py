"""Host VAE modules for the stand-ins, built from an independent implementation: diffusers' ``AutoencoderKL`` and
its own LDM → diffusers checkpoint converter (never vae_core's network or key mapping), so a stand-in test compares
vae_core with diffusers, as the real hosts would compare it with their own networks."""
from __future__ import annotations

from typing import Mapping

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

LDM_MARK = "encoder.down.0.block.0.conv1.weight"


def config_from_ldm(sd: Mapping[str, torch.Tensor], ch: int, ch_mult: list[int], num_res_blocks: int) -> dict:
    """diffusers config for LDM widths ``ch × ch_mult`` (latent channels and quant convs read from ``sd``)."""
    n = len(ch_mult)
    quant = "quant_conv.weight" in sd
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=[ch * m for m in ch_mult],
                layers_per_block=num_res_blocks, latent_channels=int(sd["decoder.conv_in.weight"].shape[1]),
                norm_num_groups=32, use_quant_conv=quant, use_post_quant_conv=quant)


class HostAutoencoderKL(AutoencoderKL):
    """diffusers' AutoencoderKL that also accepts LDM-keyed state dicts in ``load_state_dict`` (converted with
    diffusers' own converter), as A1111's ``first_stage_model`` and ComfyUI's VAE accept LDM files."""

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        if LDM_MARK in state_dict:
            state_dict = convert_ldm_vae_checkpoint(dict(state_dict), dict(self.config))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def host_vae(sd: Mapping[str, torch.Tensor], ch: int, ch_mult: list[int], num_res_blocks: int) -> HostAutoencoderKL:
    """A float32 eval-mode :class:`HostAutoencoderKL` holding ``sd`` (LDM or diffusers keys)."""
    model = HostAutoencoderKL(**config_from_ldm(sd if LDM_MARK in sd else _ldm_shapes(sd), ch, ch_mult,
                                                num_res_blocks)).eval().requires_grad_(False)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model


def _ldm_shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"decoder.conv_in.weight": sd["decoder.conv_in.weight"], **({"quant_conv.weight": sd["quant_conv.weight"]}
                                                                        if "quant_conv.weight" in sd else {})}


def taesd_keys(diffusers_tiny_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderTiny`` keys → TAESD's original ``taesd_encoder.N``/``taesd_decoder.N`` keys (TAESD's
    decoder starts with a parameter-free Clamp that diffusers applies in ``forward``: indices shift by one)."""
    import re

    out = {}
    for k, v in diffusers_tiny_sd.items():
        k = re.sub(r"^encoder\.layers\.", "taesd_encoder.", k)
        k = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"taesd_decoder.{int(m.group(1)) + 1}.", k)
        out[k] = v
    return out


def tiny_from_taesd(sd: Mapping[str, torch.Tensor]):
    """A diffusers ``AutoencoderTiny`` holding TAESD-keyed weights (the inverse of :func:`taesd_keys`)."""
    import re
    from diffusers import AutoencoderTiny

    renamed = {}
    for k, v in sd.items():
        k = re.sub(r"^taesd_encoder\.", "encoder.layers.", k)
        k = re.sub(r"^taesd_decoder\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) - 1}.", k)
        renamed[k] = v
    model = AutoencoderTiny(latent_channels=int(sd["taesd_decoder.1.weight"].shape[1])).eval().requires_grad_(False)
    model.load_state_dict(renamed, strict=True)
    return model


WAN_MARK = "decoder.middle.0.residual.0.gamma"


def wan_host(sd: Mapping[str, torch.Tensor]):
    """diffusers' ``AutoencoderKLWan`` (Wan 2.1 design) from an original-layout Wan state dict, converted by
    diffusers' own converter; widths read from the shapes (2 res blocks per level, as the converter assumes)."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    z = int(sd["conv2.weight"].shape[0])
    model = AutoencoderKLWan(base_dim=int(sd["encoder.conv1.weight"].shape[0]), z_dim=z, num_res_blocks=2,
                             latents_mean=[0.0] * z, latents_std=[1.0] * z).eval().requires_grad_(False)
    model.load_state_dict({k: v.float() for k, v in convert_wan_vae_to_diffusers(dict(sd)).items()}, strict=True)
    return model
