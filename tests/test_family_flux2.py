"""Flux.2's VAE (diffusers AutoencoderKLFlux2): kl-f8 body with a decoder wider than its encoder, 32 latent channels
and BatchNorm statistics over 2×2-patchified latents. Detection in every container, exactness against diffusers,
the normalised latents against the Flux.2 pipeline's own formula, exact tiling, the fp16 fix and near misses."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import vae_core
from vae_core.lab.metrics import signed_psnr as psnr


def _flux2(seed: int = 0):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    model = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                               block_out_channels=(32, 32, 64), decoder_block_out_channels=(64, 64, 128),
                               layers_per_block=1, latent_channels=32, norm_num_groups=32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def reference():
    return _flux2()


@pytest.fixture(scope="module")
def containers(reference, tmp_path_factory):
    """The same VAE as a diffusers folder, a diffusers-keyed file, and Flux.2's original (BFL) layout."""
    base = tmp_path_factory.mktemp("flux2")
    reference.save_pretrained(base / "folder")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(base / "diffusers.safetensors"))
    vae_core.save_vae(vae_core.load_vae(base / "folder"), base / "flux2-ae.safetensors", layout="ldm")
    return {"diffusers-folder": base / "folder", "diffusers-file": base / "diffusers.safetensors",
            "bfl-file": base / "flux2-ae.safetensors"}


def test_original_layout_is_bfl_and_matches_diffusers_converter(containers, reference):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = load_file(str(containers["bfl-file"]))
    assert "encoder.quant_conv.weight" in sd and "decoder.post_quant_conv.weight" in sd  # nested, as BFL's ae
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= set(sd)
    flat = {k.replace("encoder.quant_conv.", "quant_conv.").replace("decoder.post_quant_conv.", "post_quant_conv."): v
            for k, v in sd.items()}
    converted = convert_ldm_vae_checkpoint(flat, dict(reference.config))  # diffusers' own LDM converter
    expected = reference.state_dict()
    body = {k for k in expected if not k.startswith("bn.")}
    assert body <= set(converted)
    assert all(torch.equal(converted[k], expected[k]) for k in body)
    assert all(torch.equal(sd[k], expected[k]) for k in ("bn.running_mean", "bn.running_var"))


@pytest.mark.parametrize("container", ["diffusers-folder", "diffusers-file", "bfl-file"])
def test_detected_and_exact_in_every_container(containers, reference, container):
    vae = vae_core.load_vae(containers[container])
    cfg = vae.model.config
    assert vae.info.family == "flux2" and vae.info.latent_channels == 32 and cfg.latent_bn
    assert cfg.decoder_widths == [64, 64, 128] and cfg.encoder_widths == [32, 32, 64]
    x = torch.rand(2, 3, 64, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z_ref = reference.encode(x).latent_dist.mean
        y_ref = reference.decode(z_ref).sample
    assert (vae.encode(x) - z_ref).abs().max() < 1e-4
    assert (vae.decode(z_ref) - y_ref).abs().max() < 1e-4


def test_normalised_latents_match_the_flux2_pipeline(containers, reference):
    """diffusers' Flux2Pipeline (which needs transformers, not a test dependency) patchifies with view/permute to
    channel ``4c + 2i + j``, which is torch's pixel_unshuffle order, then standardises with bn's statistics."""
    vae = vae_core.load_vae(containers["bfl-file"])
    z = torch.randn(1, 32, 10, 8)
    patched = torch.nn.functional.pixel_unshuffle(z, 2)
    mean = reference.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(reference.bn.running_var.view(1, -1, 1, 1) + reference.config.batch_norm_eps)
    assert (vae.scale_latents(z) - (patched - mean) / std).abs().max() < 1e-5
    assert (vae.unscale_latents(vae.scale_latents(z)) - z).abs().max() < 1e-5
    assert vae.scale_latents(z).shape == (1, 128, 5, 4)


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).square().mean().sqrt())


def test_exact_tiling_and_fp16_fix(containers):
    """Tiled = untiled to float32 rounding: ≥ 130 dB, and no further from a float64 run than untiled float32 is."""
    import copy

    vae = vae_core.load_vae(containers["diffusers-folder"])
    x = torch.rand(1, 3, 200, 136, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = vae.encode(x)
    z_tiled, y, y_tiled = vae.encode(x, tile=64), vae.decode(z), vae.decode(z, tile=64)
    with torch.no_grad():
        truth = copy.deepcopy(vae.model).double()
        z64, y64 = truth.encode(x.double()), truth.decode(z.double())
    assert psnr(z_tiled, z) >= 130 and _rms(z_tiled, z64) <= 1.25 * _rms(z, z64)
    assert psnr(y_tiled, y) >= 130 and _rms(y_tiled, y64) <= 1.25 * _rms(y, y64)



def test_fp16_fix_on_an_overflowing_flux2_vae(containers):
    """The random model's peaks are ~13 (every factor would be 1, a no-op): inflate its stream 2¹⁴× first (same fp32
    outputs), check fp16 really overflows, then that the fix brings it back without a fallback."""
    from vae_core.families.kl.fp16_fix import rescale_stream, stream_segments

    vae = vae_core.load_vae(containers["diffusers-folder"])
    big = vae.clone()
    enc, dec = stream_segments(big.model)
    rescale_stream(enc, big.model.encoder.norm_out, [16384.0] * len(enc))
    rescale_stream(dec, big.model.decoder.norm_out, [16384.0] * len(dec))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z = vae.encode(x)
    y = vae.decode(z)
    assert (big.decode(z) - y).abs().max() < 1e-3  # same function in fp32
    unfixed = big.clone().to(torch.float16)
    unfixed.decode(z)
    assert unfixed.guard.working_dtype == torch.float32  # overflowed: the guard had to fall back
    fixed = vae_core.make_fp16_safe(big)
    assert fixed.info.fp16_fix["peak_before"] > 65504 >= 4 * fixed.info.fp16_fix["peak_after"]
    assert (fixed.decode(z) - y).abs().max() < 1e-3  # the rescaling leaves fp32 outputs unchanged
    half = fixed.to(torch.float16)
    y16 = half.decode(z)
    assert half.guard.working_dtype is None and torch.isfinite(y16).all() and (y16 - y).abs().max() < 0.05


def test_save_as_diffusers_folder_loads_in_diffusers(containers, reference, tmp_path):
    from diffusers import AutoencoderKLFlux2

    vae_core.save_vae(vae_core.load_vae(containers["bfl-file"]), tmp_path / "out", layout="diffusers")
    again = AutoencoderKLFlux2.from_pretrained(tmp_path / "out").eval()
    assert again.config.decoder_block_out_channels == [64, 64, 128]
    assert all(torch.equal(again.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_near_misses(containers, tmp_path):
    sd = load_file(str(containers["bfl-file"]))
    half = {k: v for k, v in sd.items() if k != "bn.running_var"}
    save_file(half, str(tmp_path / "half.safetensors"))
    with pytest.raises(vae_core.VaeLoadError, match="bn.running_mean.*expected both"):
        vae_core.load_vae(tmp_path / "half.safetensors")
    wrong = dict(sd, **{"bn.running_mean": torch.zeros(32), "bn.running_var": torch.ones(32)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(vae_core.VaeLoadError, match=r"shape \(32,\).*\(128,\)"):
        vae_core.load_vae(tmp_path / "wrong.safetensors")
    bare = {k: v for k, v in sd.items() if not k.startswith("bn.")}
    save_file(bare, str(tmp_path / "no-bn.safetensors"))
    vae = vae_core.load_vae(tmp_path / "no-bn.safetensors")
    assert vae.info.family == "custom" and "without Flux.2's latent BatchNorm" in vae.info.sources["family"]
    with pytest.raises(vae_core.VaeInputError, match="family='flux2'.*bn.running_mean"):
        vae_core.load_vae(tmp_path / "no-bn.safetensors", family="flux2")
