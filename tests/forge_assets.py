"""Writes what a real Forge (main, dfdcbab6) server needs to load an SD1.5-shaped model offline, in seconds, on a CPU.

Run with Forge's own interpreter (it builds the parts from Forge's own classes and bundled configs, and checks the
checkpoint the way Forge recognises models):

    FORGE_PYTHON forge_assets.py FORGE_DIR DATA_DIR

Forge recognises SD1.5 only with the UNet's real ``model_channels`` (320) and ``context_dim`` (768), reads the depth
from the keys, and builds the text encoder and the VAE from its bundled SD1.5 configs, so those need SD's real shapes
(CLIP-L; VAE widths 128/256/512/512). The checkpoint's tensors are strided views into a few small random pools (one
per fan-in), which ``torch.save`` stores once: the ~230 M-parameter checkpoint is a file of ~27 MB. The VAE files hold
dense fp16 copies (~170 MB each), since vae_core refuses tensors that share their elements. It writes

* ``DATA_DIR/models/Stable-diffusion/tiny-sd15.ckpt``: UNet with one level, one res block and depth-1 transformers
  (output layer zero: it predicts no noise), CLIP-L, and a random VAE;
* ``DATA_DIR/models/VAE``: ``sd-vae-a/`` (a diffusers folder, ``.bin`` weights), ``more/sd-vae-a/`` (another VAE in a
  folder of the same name), ``sd-vae-b.ckpt`` (LDM keys), ``overflow.ckpt`` (a VAE whose decoder's residual stream is
  scaled by 1e4: same images in fp32, inf then NaN in fp16) with a link to it, ``overflow-link.ckpt``, and
  ``mini-vae.sft`` (the bundled ch-32 test VAE as safetensors under Forge's unlisted suffix: too small for SD1.5).

Prints one line, ``ASSETS {json}``.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import torch

POOL = 1 << 18
FACTOR = 1e4  # decoder residual stream scale of overflow.ckpt: activations ~1e4-1e5 > fp16's 65504
_pools: dict[tuple, torch.Tensor] = {}


def _pool(seed: int, std: float) -> torch.Tensor:
    key = (seed, std)
    if key not in _pools:
        g = torch.Generator().manual_seed(seed * 1000003 + int(std * 1e6))
        _pools[key] = torch.randn(POOL, generator=g) * std
    return _pools[key]


def _view(pool: torch.Tensor, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """A tensor of ``shape`` whose values all come from ``pool`` (its storage is the pool's)."""
    numel = math.prod(shape)
    if numel <= POOL:
        start = int(torch.randint(0, POOL - numel + 1, (1,), generator=g))
        return pool[start:start + numel].view(shape)
    inner = math.prod(shape[1:])
    assert inner <= POOL, shape
    step = max(1, (POOL - inner) // shape[0])
    strides = [step] + [math.prod(shape[i + 1:]) for i in range(1, len(shape))]
    return pool.as_strided(shape, strides, 0)


def fill(shapes: dict[str, tuple[int, ...]], seed: int, *, zero: tuple[str, ...] = (),
         scaled: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Random weights for ``shapes`` as views into pools: norms 1, biases 0, weights N(0, 1/fan-in) (times
    ``scaled[name]``), ``zero`` prefixes all zero."""
    g = torch.Generator().manual_seed(seed)
    ones, zeros = torch.ones(POOL), torch.zeros(POOL)
    out = {}
    for name, shape in shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        if any(name.startswith(z) for z in zero) or leaf == "bias" or len(shape) == 0:
            out[name] = _view(zeros, shape, g) if shape else torch.zeros(())
        elif len(shape) == 1:  # norm weights, embeddings' 1-D tensors
            out[name] = _view(ones, shape, g)
        else:
            fan_in = math.prod(shape[1:])
            std = (0.02 if "embedding" in name else 1.0 / math.sqrt(fan_in)) * (scaled or {}).get(name, 1.0)
            out[name] = _view(_pool(seed, std), shape, g)
    return out


def dense(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor with a storage of its own, in fp16: what a VAE file holds (vae_core refuses tensors whose elements
    overlap in storage, so the pooled views are for Forge's own loader only)."""
    return {k: v.to(torch.float16).contiguous() for k, v in sd.items()}


def shapes_of(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def overflow_scales(vae_shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """Weights to scale by FACTOR so the decoder's residual stream is FACTOR times larger and every GroupNorm takes
    it back: conv_in (input unscaled), each res block's conv2 and each attention's proj_out (inputs normalised); the
    shortcuts and upsampling convs take the scaled stream as it is (their biases are zero)."""
    return {k: FACTOR for k in vae_shapes if k.startswith("decoder.") and k.endswith(".weight") and (
        k == "decoder.conv_in.weight" or ".conv2." in k or ".proj_out." in k)}


def main() -> None:
    forge, data = Path(sys.argv[1]), Path(sys.argv[2])
    sys.argv[1:] = ["--always-cpu"]  # backend.args parses the command line at import
    sys.path[:0] = [str(forge), str(forge / "packages_3rdparty"), str(forge / "repositories" / "huggingface_guess")]
    import huggingface_guess
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vae_core.families.kl.convert import ldm_to_diffusers

    repo = forge / "backend" / "huggingface" / "runwayml" / "stable-diffusion-v1-5"
    unet_cfg = dict(in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1], channel_mult=[1],
                    num_heads=8, use_spatial_transformer=True, transformer_depth=[1], transformer_depth_output=[1, 1],
                    transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False)
    vae_config = json.loads((repo / "vae" / "config.json").read_text())
    with torch.device("meta"):
        unet = IntegratedUNet2DConditionModel(**unet_cfg)
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(repo / "text_encoder"))
        vae = IntegratedAutoencoderKL.from_config(vae_config)
    vae_shapes = shapes_of(vae)
    sd = fill(shapes_of(unet, "model.diffusion_model."), 1, zero=("model.diffusion_model.out.2.",))
    sd.update(fill(shapes_of(clip, "cond_stage_model.transformer."), 2))
    sd.update({"first_stage_model." + k: v for k, v in fill(vae_shapes, 3).items()})
    guess = huggingface_guess.guess(dict(sd))
    assert guess.huggingface_repo == "runwayml/stable-diffusion-v1-5", guess.huggingface_repo
    for key, value in unet_cfg.items():
        assert guess.unet_config.get(key) == value, (key, guess.unet_config.get(key), value)

    ckpt = data / "models" / "Stable-diffusion" / "tiny-sd15.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd}, ckpt)

    vae_dir = data / "models" / "VAE"
    for folder, seed in ((vae_dir / "sd-vae-a", 4), (vae_dir / "more" / "sd-vae-a", 5)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(vae_config))
        torch.save(ldm_to_diffusers(dense(fill(vae_shapes, seed))), folder / "diffusion_pytorch_model.bin")
    torch.save({"state_dict": dense(fill(vae_shapes, 6))}, vae_dir / "sd-vae-b.ckpt")
    torch.save(dense(fill(vae_shapes, 7, scaled=overflow_scales(vae_shapes))), vae_dir / "overflow.ckpt")
    (vae_dir / "overflow-link.ckpt").symlink_to("overflow.ckpt")  # the same weights under a second name
    shutil.copy(Path(__file__).resolve().parent / "fixtures" / "mini-vae-ldm.safetensors", vae_dir / "mini-vae.sft")
    sizes = {str(p.relative_to(data)): p.stat().st_size for p in sorted(data.rglob("*")) if p.is_file()}
    print("ASSETS " + json.dumps({"checkpoint": str(ckpt), "files": sizes}))


if __name__ == "__main__":
    main()
