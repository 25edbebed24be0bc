"""Stand-in for ``comfy.sd.VAE`` (tests only): same constructor and call conventions; the LDM network comes from
vae_core's model, whose parameter names are ComfyUI's LDM names."""
import torch

from vae_core.convert import infer_config
from vae_core.model import AutoencoderKL, ModelConfig


class VAE:
    def __init__(self, sd=None, device=None, config=None, dtype=None, metadata=None):
        if "decoder.up_blocks.0.resnets.0.norm1.weight" in sd:
            raise NotImplementedError("stand-in: diffusers keys are converted by the real ComfyUI only")
        inferred = infer_config(sd)
        if config is None and inferred.ch != 128:
            raise RuntimeError("stand-in: like ComfyUI, a config-less VAE is built with SD's widths (ch 128)")
        if config is not None:
            dd = config["params"]["ddconfig"]
            inferred = ModelConfig(ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                                   z_channels=dd["z_channels"], embed_dim=config["params"]["embed_dim"])
        self.first_stage_model = AutoencoderKL(inferred).eval()
        self.first_stage_model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        self.downscale_ratio = self.upscale_ratio = 8
        self.latent_channels = self.first_stage_model.config.latent_channels
        self.latent_dim = 2
        self.output_channels = 3
        self.device = torch.device("cpu") if device is None else device
        self.vae_dtype = dtype or torch.float32
        self.output_device = torch.device("cpu")
        self.working_dtypes = [torch.bfloat16, torch.float32]
        self.metadata = metadata
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
        self.first_stage_model.to(self.vae_dtype)

    def throw_exception_if_invalid(self):
        if self.first_stage_model is None:
            raise RuntimeError("ERROR: VAE is invalid: None")

    def spacial_compression_decode(self):
        return self.upscale_ratio

    def spacial_compression_encode(self):
        return self.downscale_ratio

    def decode(self, samples_in, vae_options={}):
        with torch.no_grad():
            out = self.first_stage_model.decode(samples_in.to(self.device, self.vae_dtype)).float()
        return self.process_output(out).movedim(1, -1).to(self.output_device)

    def encode(self, pixel_samples):
        x = self.process_input(pixel_samples[..., :3]).movedim(-1, 1).to(self.device, self.vae_dtype)
        with torch.no_grad():
            return self.first_stage_model.encode(x).float().to(self.output_device)

    def get_sd(self):
        return self.first_stage_model.state_dict()
