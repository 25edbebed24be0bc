"""vae_core: a host-free library to load, run, tile and fix image and video VAEs: SD1/2, SDXL, SD3, Flux, Flux.2,
Qwen-Image, Wan 2.1/2.2, HunyuanVideo 1.0/1.5, LTX-Video/LTX-2 and the tiny autoencoders (TAESD family): one folder
per network family (``vae_core.families``), listed in ``vae_core.REGISTRY``.

Imports only the standard library, torch, safetensors, numpy and PIL; never ComfyUI or A1111.

    vae = vae_core.load_vae("sdxl_vae.safetensors")            # file or diffusers folder, format from the keys
    z = vae.encode(images, tile="auto")                          # [B,3,H,W] in [-1,1] -> raw latents
    images = vae.decode(z, tile=512)                             # raw latents -> [B,3,8h,8w] about [-1,1]
    safe = vae_core.make_fp16_safe(vae).to(dtype=torch.float16)  # training-free fp16 fix
"""
from .engine import cache_needed
from .errors import Cancelled, NonFiniteOutputError, VaeError, VaeInputError, VaeLoadError
from .families.registry import REGISTRY
from .families.scaling import FAMILIES
from .loading import load_vae, parse_dtype, save_vae, vae_from_state_dict
from .families.kl.model import AutoencoderKL, ModelConfig
from .tiling import TileReport
from .vae import Vae, VaeInfo, make_fp16_safe

__all__ = [
    "load_vae", "save_vae", "vae_from_state_dict", "make_fp16_safe", "parse_dtype", "Vae", "VaeInfo",
    "AutoencoderKL", "ModelConfig", "FAMILIES", "VaeError", "VaeLoadError", "VaeInputError", "NonFiniteOutputError",
    "Cancelled", "TileReport", "cache_needed", "REGISTRY",
]
__version__ = "0.1.0"
