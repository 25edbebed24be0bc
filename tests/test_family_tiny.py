"""The tiny autoencoders (TAESD design) against diffusers' AutoencoderTiny: detection in every layout (the original
separate encoder/decoder files, ComfyUI's combined keys, diffusers file and folder), exactness, raw-latent
conventions per variant, exact tiling with halos, half files, saving, and clear errors for near misses."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors.torch import save_file

import vae_core
from vae_core.lab.metrics import signed_psnr as psnr


def _tiny(latent: int = 4, seed: int = 0):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(latent_channels=latent).eval()


def _original_halves(model) -> tuple[dict, dict]:
    """madebyollin's file layout, built from diffusers' names by the documented index shift (decoder: +1)."""
    enc, dec = {}, {}
    for k, v in model.state_dict().items():
        if k.startswith("encoder.layers."):
            enc[k[len("encoder.layers."):]] = v
        else:
            dec[re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"{int(m.group(1)) + 1}.", k)] = v
    return enc, dec


@pytest.fixture(scope="module", params=[4, 16])
def case(request, tmp_path_factory):
    latent = request.param
    model = _tiny(latent)
    base = tmp_path_factory.mktemp(f"tiny{latent}")
    name = "taesd" if latent == 4 else "taef1"
    enc, dec = _original_halves(model)
    torch.save(enc, base / f"{name}_encoder.pth")
    torch.save(dec, base / f"{name}_decoder.pth")
    scale, shift = {4: (0.18215, 0.0), 16: (0.3611, 0.1159)}[latent]
    comfy = {f"taesd_encoder.{k}": v for k, v in enc.items()} | {f"taesd_decoder.{k}": v for k, v in dec.items()}
    comfy |= {"vae_scale": torch.tensor(scale), "vae_shift": torch.tensor(shift)}
    save_file({k: v.contiguous() for k, v in comfy.items()}, str(base / "comfy-combined.safetensors"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base / f"{name}-diffusers.safetensors"))
    model.save_pretrained(base / "folder")
    (base / "solo").mkdir()
    torch.save(dec, base / "solo" / f"{name}_decoder.pth")
    return dict(model=model, base=base, name=name, scale=scale, shift=shift, latent=latent)


@pytest.mark.parametrize("entry", ["original", "comfy", "diffusers-file"])
def test_detected_and_exact_in_every_layout(case, entry):
    base, name = case["base"], case["name"]
    path = {"original": base / f"{name}_decoder.pth", "comfy": base / "comfy-combined.safetensors",
            "diffusers-file": base / f"{name}-diffusers.safetensors"}[entry]
    vae = vae_core.load_vae(path)  # the original decoder file picks up its encoder twin
    assert vae.info.family == name and vae.info.latent_channels == case["latent"]
    assert vae.info.scaling_factor == pytest.approx(case["scale"]) and (vae.info.shift_factor or 0) == \
        pytest.approx(case["shift"])
    x = torch.rand(2, 3, 64, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        own = case["model"].encode(x).latents  # TAESD's own (diffusion-space) latents
        y_ref = case["model"].decode(own).sample
    raw = vae.encode(x)  # raw latents of the matching full VAE
    assert (vae.scale_latents(raw) - own).abs().max() < 1e-4
    assert (vae.decode(vae.unscale_latents(own)) - y_ref).abs().max() < 1e-4


def test_diffusers_folder_loads(case):
    vae = vae_core.load_vae(case["base"] / "folder")
    assert vae.info.latent_channels == case["latent"] and vae.model.config.has_encoder


def _rms(a, b):
    return float((a.double() - b.double()).square().mean().sqrt())


def test_tiling_with_halos_is_exact(case):
    vae = vae_core.load_vae(case["base"] / "comfy-combined.safetensors")
    x = torch.rand(1, 3, 200, 136, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = vae.encode(x)
    from vae_core import tiling

    report = tiling.TileReport()
    z_t, y, y_t = vae.encode(x, tile=64), vae.decode(z), vae.decode(z, tile=64, report=report)
    assert report.schedule == "halo" and report.tiles == 12
    with torch.no_grad():
        truth = copy.deepcopy(vae.model).double()
        z64, y64 = truth.encode(x.double()), truth.decode(z.double())
    assert psnr(z_t, z) >= 130 and _rms(z_t, z64) <= 1.25 * _rms(z, z64) + 1e-12
    assert psnr(y_t, y) >= 130 and _rms(y_t, y64) <= 1.25 * _rms(y, y64) + 1e-12


def test_halo_matters():
    """No halo at the decoder's first stage (10 latent px needed) breaks exactness: the test can fail."""
    from vae_core.tiling.halo import Local, run_stages

    model = vae_core.load_vae(_save_comfy(_tiny(seed=3))).model
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 4:  # fan-in scaled weights: no dead ReLUs, so a wrong halo shows
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    z = torch.randn(1, 4, 25, 17)
    stages = model.decode_stages()
    shrunk = [Local(stages[0].fn, radius=0)] + stages[1:]
    with torch.no_grad():
        ref = model.decode(z)
        assert (run_stages(stages, z, 64, 8)[0] - ref).abs().max() < 1e-5
        assert (run_stages(shrunk, z, 64, 8)[0] - ref).abs().max() > 1e-4


def _save_comfy(model):
    import tempfile
    from pathlib import Path

    enc, dec = _original_halves(model)
    path = Path(tempfile.mkdtemp()) / "t.safetensors"
    save_file({f"taesd_encoder.{k}": v.contiguous() for k, v in enc.items()} |
              {f"taesd_decoder.{k}": v.contiguous() for k, v in dec.items()}, str(path))
    return path


def test_half_file_alone_decodes_and_refuses_to_encode(case):
    vae = vae_core.load_vae(case["base"] / "solo" / f"{case['name']}_decoder.pth")
    assert vae.model.config.has_decoder and not vae.model.config.has_encoder
    assert vae.decode(torch.randn(1, case["latent"], 4, 4)).shape == (1, 3, 32, 32)
    with pytest.raises(vae_core.VaeInputError, match="encoder of a tiny autoencoder loaded without it"):
        vae.encode(torch.zeros(1, 3, 32, 32))


def test_fp16_fix_is_refused_clearly(case):
    vae = vae_core.load_vae(case["base"] / "comfy-combined.safetensors")
    with pytest.raises(vae_core.VaeInputError, match="no normalisation and small activations"):
        vae_core.make_fp16_safe(vae)


def test_save_in_comfy_and_diffusers_forms(case, tmp_path):
    from diffusers import AutoencoderTiny

    vae = vae_core.load_vae(case["base"] / "comfy-combined.safetensors")
    vae_core.save_vae(vae, tmp_path / "single.safetensors")
    again = vae_core.load_vae(tmp_path / "single.safetensors")
    assert again.info.family == case["name"] and again.info.layout == "taesd-comfyui"
    vae_core.save_vae(vae, tmp_path / "folder", layout="diffusers")
    d = AutoencoderTiny.from_pretrained(tmp_path / "folder").eval()
    assert all(torch.equal(d.state_dict()[k], v) for k, v in case["model"].state_dict().items())


def test_near_misses(case, tmp_path):
    enc, dec = _original_halves(case["model"])
    broken = {k: v for k, v in dec.items() if k != "3.conv.2.weight"}
    torch.save(broken, tmp_path / "x_decoder.pth")
    with pytest.raises(vae_core.VaeLoadError, match="x_decoder.pth.*missing keys.*decoder.3.conv.2.weight"):
        vae_core.load_vae(tmp_path / "x_decoder.pth")
    wrong = dict(dec, **{"19.weight": torch.zeros(4, 64, 3, 3)})
    torch.save(wrong, tmp_path / "y_decoder.pth")
    with pytest.raises(vae_core.VaeLoadError, match=r"decoder convs of shapes.*\(4, 64, 3, 3\)"):
        vae_core.load_vae(tmp_path / "y_decoder.pth")
    with pytest.raises(vae_core.VaeLoadError, match="tiny autoencoder"):
        vae_core.loading.ldm_state_dict_from_file(case["base"] / "comfy-combined.safetensors")
