"""An ldm-like first-stage model for the A1111 stand-in: LDM parameter names, posterior from encode."""
import torch
from torch import nn

from vae_core.model import Decoder, Encoder, ModelConfig


class DiagonalGaussianDistribution:
    def __init__(self, parameters):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)

    def sample(self):
        return self.mean + torch.exp(0.5 * self.logvar.clamp(-30, 20)) * torch.randn_like(self.mean)


class FirstStageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


class SdModel:
    """What processing needs of ``shared.sd_model``: first_stage_model, checkpoint info, decode_first_stage."""

    def __init__(self, cfg: ModelConfig):
        self.first_stage_model = FirstStageModel(cfg).eval().requires_grad_(False)
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
