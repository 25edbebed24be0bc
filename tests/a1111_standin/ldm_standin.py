"""A first-stage model for the A1111 stand-in, from an independent implementation: diffusers' AutoencoderKL (its
``encoder``/``decoder``/``quant_conv``/``post_quant_conv`` play ldm's), loading LDM state dicts strictly through
diffusers' own converter (tests/diffusers_host.py), with ldm's ``encode`` → posterior and ``decode`` conventions."""
import torch

from diffusers_host import HostAutoencoderKL


class DiagonalGaussianDistribution:
    def __init__(self, parameters):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)

    def sample(self):
        return self.mean + torch.exp(0.5 * self.logvar.clamp(-30, 20)) * torch.randn_like(self.mean)


class FirstStageModel(HostAutoencoderKL):
    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def first_stage(widths: list[int], num_res_blocks: int, latent_channels: int = 4) -> FirstStageModel:
    n = len(widths)
    return FirstStageModel(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                           up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(widths),
                           layers_per_block=num_res_blocks, latent_channels=latent_channels,
                           norm_num_groups=32).eval().requires_grad_(False)


class SdModel:
    """What processing needs of ``shared.sd_model``: first_stage_model, checkpoint info, decode_first_stage."""

    def __init__(self, widths: list[int], num_res_blocks: int):
        self.first_stage_model = first_stage(widths, num_res_blocks)
        self.sd_checkpoint_info = object()
        self.scale_factor = 0.18215

    def decode_first_stage(self, z):
        from modules import devices

        with torch.no_grad():
            return self.first_stage_model.decode(z.to(devices.dtype_vae) / self.scale_factor)

    def encode_first_stage(self, x):
        from modules import devices

        with torch.no_grad():
            return self.first_stage_model.encode(x.to(devices.dtype_vae))
