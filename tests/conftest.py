"""Shared fixtures: paths of the bundled trained VAE, small random diffusers VAEs, and writers for every format."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIXTURES = ROOT / "tests" / "fixtures"
MINI_DIFFUSERS = FIXTURES / "mini-vae"
MINI_LDM = FIXTURES / "mini-vae-ldm.safetensors"
SAMPLE = FIXTURES / "sample.png"

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

#: ``.ci/run`` sets this to ``required``: a real-host test whose host is not configured then fails instead of skipping,
#: so CI cannot go green without having run the real ComfyUI and A1111.
REAL_HOSTS_REQUIRED = os.environ.get("VAE_PACK_REAL_HOSTS") == "required"


def real_host(var: str, what: str) -> "pytest.MarkDecorator":
    """Module mark for a real-host test: skip (or, under ``VAE_PACK_REAL_HOSTS=required``, fail) when the
    environment variable ``var`` (a host checkout) is unset."""
    if os.environ.get(var) or not REAL_HOSTS_REQUIRED:
        return pytest.mark.skipif(not os.environ.get(var), reason=f"set {var} to {what} to run")
    return pytest.mark.usefixtures("_real_host_missing_" + var.lower())


def _missing(var: str):
    @pytest.fixture(scope="session", name="_real_host_missing_" + var.lower())
    def fixture():
        pytest.fail(f"VAE_PACK_REAL_HOSTS=required but {var} is not set (.ci/run prepares the real hosts)")
    return fixture


_real_host_missing_comfyui_path = _missing("COMFYUI_PATH")
_real_host_missing_a1111_path = _missing("A1111_PATH")

# Small random-weight configs in diffusers terms: SD-, SDXL- and SD3-style (widths divisible by 32 groups).
TINY_CONFIGS = {
    "sd": dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, latent_channels=4, scaling_factor=0.18215),
    "sdxl": dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, latent_channels=4,
                 scaling_factor=0.13025),
    "sd3": dict(block_out_channels=[32, 32, 64, 64], layers_per_block=2, latent_channels=16, scaling_factor=1.5305,
                shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
}


def diffusers_vae(kind: str, seed: int = 0):
    """A random-weight diffusers AutoencoderKL of a tiny config, in eval mode (fp32)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(TINY_CONFIGS[kind]["block_out_channels"])
    model = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                          norm_num_groups=32, **TINY_CONFIGS[kind]).eval()
    # random-but-nontrivial GroupNorm affine params, so a wrong key mapping cannot hide behind ones/zeros
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def image_512() -> torch.Tensor:
    from vae_core.io.images import load_image

    return load_image(SAMPLE)


@pytest.fixture(scope="session")
def mini_vae():
    import vae_core

    return vae_core.load_vae(MINI_LDM)


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")
