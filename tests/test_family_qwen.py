"""Qwen-Image's VAE (diffusers AutoencoderKLQwenImage, the Wan 2.1 causal 3-D design) on single images: detection
in both layouts and every container, exactness against diffusers at T=1, the original layout checked with diffusers'
own Wan converter, per-channel latent normalisation, exact halo tiling around the global mid block, near misses."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import vae_core
from vae_core.lab.metrics import signed_psnr as psnr


def _qwen(num_res_blocks: int = 2, seed: int = 0):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    z = 16
    model = AutoencoderKLQwenImage(base_dim=8, z_dim=z, dim_mult=[1, 2, 4, 4], num_res_blocks=num_res_blocks,
                                   latents_mean=[0.1 * i for i in range(z)],
                                   latents_std=[1.0 + 0.05 * i for i in range(z)]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.add_(torch.randn_like(p) * 0.2)  # a wrong norm mapping cannot hide behind ones
    return model


@pytest.fixture(scope="module")
def reference():
    return _qwen()


@pytest.fixture(scope="module")
def containers(reference, tmp_path_factory):
    base = tmp_path_factory.mktemp("qwen")
    reference.save_pretrained(base / "folder")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(base / "diffusers.safetensors"))
    vae_core.save_vae(vae_core.load_vae(base / "folder"), base / "qwen_image_vae.safetensors")  # original layout
    save_file({f"vae.{k}": v for k, v in load_file(str(base / "qwen_image_vae.safetensors")).items()},
              str(base / "in-checkpoint.safetensors"))
    return {"diffusers-folder": base / "folder", "diffusers-file": base / "diffusers.safetensors",
            "original-file": base / "qwen_image_vae.safetensors", "prefixed": base / "in-checkpoint.safetensors"}


def test_original_layout_matches_diffusers_own_wan_converter(containers, reference):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    original = load_file(str(containers["original-file"]))
    assert "decoder.middle.0.residual.0.gamma" in original and original["encoder.conv1.weight"].ndim == 5
    converted = convert_wan_vae_to_diffusers(original)  # diffusers' converter (it assumes 2 res blocks, as here)
    expected = reference.state_dict()
    assert set(converted) == set(expected)
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


@pytest.mark.parametrize("container", ["diffusers-folder", "diffusers-file", "original-file", "prefixed"])
def test_detected_and_exact_in_every_container(containers, reference, container):
    vae = vae_core.load_vae(containers[container])
    assert vae.info.family == "qwen-image" and vae.info.latent_channels == 16
    x = torch.rand(2, 3, 64, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z_ref = reference.encode(x[:, :, None]).latent_dist.mean[:, :, 0]  # a single frame, T = 1
        y_ref = reference.decode(z_ref[:, :, None]).sample[:, :, 0]
    assert (vae.encode(x) - z_ref).abs().max() < 1e-4
    assert (vae.decode(z_ref) - y_ref).abs().max() < 1e-4


def test_latent_normalisation_per_channel(containers, reference):
    vae = vae_core.load_vae(containers["diffusers-folder"])  # statistics from config.json
    z = torch.randn(1, 16, 4, 4)
    mean = torch.tensor(reference.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(reference.config.latents_std).view(1, -1, 1, 1)
    assert (vae.scale_latents(z) - (z - mean) / std).abs().max() < 1e-6  # the Qwen-Image pipeline's formula
    assert (vae.unscale_latents(vae.scale_latents(z)) - z).abs().max() < 1e-5
    plain = vae_core.load_vae(containers["original-file"])  # no config: Qwen-Image's published statistics
    assert "Qwen-Image defaults" in plain.info.sources["scaling_factor"]


def _rms(a, b):
    return float((a.double() - b.double()).square().mean().sqrt())


def test_exact_tiling_around_the_global_mid_block(containers):
    from vae_core import tiling

    vae = vae_core.load_vae(containers["original-file"])
    x = torch.rand(1, 3, 136, 200, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = vae.encode(x)
    report = tiling.TileReport()
    z_t, y, y_t = vae.encode(x, tile=64), vae.decode(z), vae.decode(z, tile=64, report=report)
    assert report.schedule == "halo" and report.tiles > 4
    with torch.no_grad():
        truth = copy.deepcopy(vae.model).double()
        z64, y64 = truth.encode(x.double()), truth.decode(z.double())
    assert psnr(z_t, z) >= 130 and _rms(z_t, z64) <= 1.25 * _rms(z, z64) + 1e-12
    assert psnr(y_t, y) >= 130 and _rms(y_t, y64) <= 1.25 * _rms(y, y64) + 1e-12


def test_too_small_halo_is_not_exact(containers):
    from vae_core.tiling.halo import Local, run_stages

    model = vae_core.load_vae(containers["original-file"]).model
    stages = model.decode_stages()
    shrunk = [Local(s.fn, radius=0, up=s.up, down=s.down) if isinstance(s, Local) else s for s in stages]
    z = torch.randn(1, 16, 17, 25)
    with torch.no_grad():
        ref = model.decode(z)
        assert (run_stages(stages, z, 64, 8)[0] - ref).abs().max() < 1e-5
        assert (run_stages(shrunk, z, 64, 8)[0] - ref).abs().max() > 1e-3


def test_save_as_diffusers_folder_loads_in_diffusers(containers, reference, tmp_path):
    from diffusers import AutoencoderKLQwenImage

    vae_core.save_vae(vae_core.load_vae(containers["original-file"]), tmp_path / "out", layout="diffusers")
    again = AutoencoderKLQwenImage.from_pretrained(tmp_path / "out").eval()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_near_misses(containers, tmp_path):
    sd = load_file(str(containers["original-file"]))
    save_file({k: v for k, v in sd.items() if k != "decoder.middle.1.proj.weight"}, str(tmp_path / "m.safetensors"))
    with pytest.raises(vae_core.VaeLoadError, match="missing keys.*decoder.middle.1.proj.weight"):
        vae_core.load_vae(tmp_path / "m.safetensors")
    wan22 = dict(sd, **{"decoder.upsamples.0.upsamples.0.residual.2.weight": torch.zeros(1)})
    save_file(wan22, str(tmp_path / "w22.safetensors"))
    with pytest.raises(vae_core.VaeLoadError, match="unexpected keys.*for a Wan 2.2-design VAE"):
        vae_core.load_vae(tmp_path / "w22.safetensors")  # a stray Wan 2.2 key in a Wan 2.1 file: named, not guessed
    with pytest.raises(vae_core.VaeInputError, match="family='sdxl'.*'qwen-image'"):
        vae_core.load_vae(containers["original-file"], family="sdxl")
    with pytest.raises(vae_core.VaeLoadError, match="Wan-design VAE"):
        vae_core.loading.ldm_state_dict_from_file(containers["original-file"])  # what A1111's dropdown reads


def test_fp16_fix_by_rms_norm_scale_invariance(containers):
    """A Qwen-Image VAE whose stream is 2¹⁶× larger (same outputs in fp32) overflows fp16 (the NaN guard has to fall
    back to fp32); the fix brings it back into range, so fp16 runs without a fallback."""
    from vae_core.families.wan.fp16_fix import rescale_wan_stream

    big = vae_core.load_vae(containers["original-file"])
    with torch.no_grad():
        for side in (big.model.encoder, big.model.decoder):
            rescale_wan_stream(side, 65536.0)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ref = vae_core.load_vae(containers["original-file"])
    z_ref, y_ref = ref.encode(x), ref.decode(ref.encode(x))
    assert (big.encode(x) - z_ref).abs().max() < 1e-3  # the rescaling is exact in fp32
    unfixed = big.clone().to(torch.float16)
    assert torch.isfinite(unfixed.decode(z_ref)).all() and unfixed.guard.working_dtype == torch.float32  # overflowed
    fixed = vae_core.make_fp16_safe(big)
    assert fixed.info.fp16_fix["peak_after"] < fixed.info.fp16_fix["peak_before"]
    assert (fixed.decode(z_ref) - y_ref).abs().max() < 1e-3  # unchanged in fp32
    half = fixed.to(torch.float16)
    y16 = half.decode(z_ref)
    assert torch.isfinite(y16).all() and half.dtype == torch.float16 and half.guard.working_dtype is None
    assert (y16 - y_ref).abs().max() < 0.05
