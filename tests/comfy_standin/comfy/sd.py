"""Stand-in for ``comfy.sd.VAE`` (tests only): ComfyUI's constructor and call conventions around a network from an
independent implementation, diffusers (``AutoencoderKL`` from an LDM or diffusers state dict, converted by diffusers'
own converter; ``AutoencoderTiny`` for TAESD's ``taesd_encoder.``/``taesd_decoder.`` keys), never vae_core's."""
import torch

from comfy import model_management
from comfy.model_patcher import ModelPatcher
from diffusers_host import WAN_MARK, host_vae, tiny_from_taesd, wan_host

_SD_WIDTHS = dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2)  # what ComfyUI assumes without a config


class VAE:
    def __init__(self, sd=None, device=None, config=None, dtype=None, metadata=None):
        self.tiny = "taesd_decoder.1.weight" in sd
        ratio = 8
        self.vae_scale, self.vae_shift = 1.0, 0.0
        self.latent_dim = 2
        if WAN_MARK in sd:  # like ComfyUI's Wan 2.1 VAE: video latents [B, C, T, h, w]
            self.first_stage_model = wan_host(sd)
            self.latent_channels, self.latent_dim = self.first_stage_model.config.z_dim, 3
        elif "pixel_space_vae" in sd:  # ComfyUI's trivial pixel-space VAE (identity)
            self.first_stage_model = torch.nn.Identity()
            self.latent_channels, ratio = 3, 1
        elif self.tiny:  # like ComfyUI's TAESD: raw latents in, (z - vae_shift) * vae_scale for the network
            self.vae_scale = float(sd.get("vae_scale", torch.tensor(1.0)))
            self.vae_shift = float(sd.get("vae_shift", torch.tensor(0.0)))
            self.first_stage_model = tiny_from_taesd({k: v for k, v in sd.items() if k.startswith("taesd_")})
            self.latent_channels = int(sd["taesd_decoder.1.weight"].shape[1])
        else:
            widths = dict(_SD_WIDTHS)
            if config is not None:
                dd = config["params"]["ddconfig"]
                widths = dict(ch=dd["ch"], ch_mult=list(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"])
            self.first_stage_model = host_vae(sd, **widths)  # raises on a width mismatch, like ComfyUI's load
            self.latent_channels = self.first_stage_model.config.latent_channels
        self.downscale_ratio = self.upscale_ratio = ratio
        self.output_channels = 3
        self.device = device if device is not None else model_management.vae_device()
        self.vae_dtype = dtype or torch.float32
        self.output_device = torch.device("cpu")
        self.working_dtypes = [torch.bfloat16, torch.float32]
        self.metadata = metadata
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
        self.first_stage_model.to(self.vae_dtype)
        self.patcher = ModelPatcher(self.first_stage_model, load_device=self.device,
                                    offload_device=model_management.vae_offload_device())
        self.tiled_calls = []

    def throw_exception_if_invalid(self):
        if self.first_stage_model is None:
            raise RuntimeError("ERROR: VAE is invalid: None")

    def spacial_compression_decode(self):  # as ComfyUI: a video VAE's ratio is (time formula, h, w)
        return self.upscale_ratio[-1] if isinstance(self.upscale_ratio, tuple) else self.upscale_ratio

    def spacial_compression_encode(self):
        return self.downscale_ratio[-1] if isinstance(self.downscale_ratio, tuple) else self.downscale_ratio

    def _decode(self, z):
        model_management.load_models_gpu([self.patcher], memory_required=1)
        if self.tiny:
            z = (z - self.vae_shift) * self.vae_scale
        if isinstance(self.first_stage_model, torch.nn.Identity):
            return self.process_output(z.float()).movedim(1, -1)
        with torch.no_grad():
            out = self.first_stage_model.decode(z.to(self.device, self.vae_dtype))
        out = getattr(out, "sample", out).float()  # diffusers returns DecoderOutput, ComfyUI's networks a tensor
        out = out.movedim(1, -1)  # video: [B, F, H, W, C], which core's VAE Decode node flattens to frames
        return self.process_output(out).to(self.output_device)

    def _encode(self, pixel_samples):
        model_management.load_models_gpu([self.patcher], memory_required=1)
        x = self.process_input(pixel_samples[..., :3]).movedim(-1, 1).to(self.device, self.vae_dtype)
        if self.latent_dim == 3 and x.ndim == 4:  # the IMAGE frames are one clip [1, C, F, H, W]
            x = x.movedim(1, 0).unsqueeze(0)
        if isinstance(self.first_stage_model, torch.nn.Identity):  # pixel space: the "latent" is the image in -1..1
            return x.float().to(self.output_device)
        with torch.no_grad():
            out = self.first_stage_model.encode(x)
        z = out.latents / self.vae_scale + self.vae_shift if self.tiny else \
            out.latent_dist.mean if hasattr(out, "latent_dist") else out
        return z.float().to(self.output_device)

    def decode(self, samples_in, vae_options={}):
        return self._decode(samples_in)

    def encode(self, pixel_samples):
        return self._encode(pixel_samples)

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        self.tiled_calls.append(("decode", tile_x, tile_y, overlap))  # stand-in: untiled, records the arguments
        return self._decode(samples)

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        self.tiled_calls.append(("encode", tile_x, tile_y, overlap))
        return self._encode(pixel_samples)

    def get_sd(self):
        return self.first_stage_model.state_dict()
