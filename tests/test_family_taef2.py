"""TAEF2 (FLUX.2's tiny autoencoder: TAESD's design plus GroupNorm "pool" branches in the six latent-resolution
blocks). diffusers 0.42's AutoencoderTiny has no pool branches, so exactness is checked two ways: with the pool
branches switched off (last 1×1 conv zero) TAEF2 must equal AutoencoderTiny on the same weights in every container;
with them on, it must equal AutoencoderTiny's own blocks run one by one with the pool branch added before each of the
six blocks, written here with torch.nn.functional from the published design. Then: exact tiling (halos plus untiled
GroupNorm stages), family and latent convention, and clear errors for near misses."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import vae_core
from vae_core.lab.metrics import signed_psnr as psnr
from test_family_tiny import _original_halves

ENC_POOL, DEC_POOL = (11, 12, 13), (3, 4, 5)  # indices in the original nn.Sequential files


def _pool_tensors(blocks, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for b in blocks:
        out[f"{b}.pool.0.weight"] = torch.randn(256, 64, 1, 1, generator=g) / 8
        out[f"{b}.pool.1.weight"] = 1 + 0.2 * torch.randn(256, generator=g)
        out[f"{b}.pool.1.bias"] = 0.2 * torch.randn(256, generator=g)
        out[f"{b}.pool.3.weight"] = scale * torch.randn(64, 256, 1, 1, generator=g) / 16
    return out


@pytest.fixture(scope="module")
def taef2(tmp_path_factory):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    model = AutoencoderTiny(latent_channels=32).eval()
    enc, dec = _original_halves(model)
    base = tmp_path_factory.mktemp("taef2")

    def write(tag, pool_scale):
        e = enc | _pool_tensors(ENC_POOL, 1, pool_scale)
        d = dec | _pool_tensors(DEC_POOL, 2, pool_scale)
        folder = base / tag
        folder.mkdir()
        torch.save(e, folder / "taef2_encoder.pth")
        torch.save(d, folder / "taef2_decoder.pth")
        save_file({k: v.contiguous() for k, v in e.items()}, str(folder / "taef2_encoder.safetensors"))
        save_file({k: v.contiguous() for k, v in d.items()}, str(folder / "taef2_decoder.safetensors"))
        comfy = {f"taesd_encoder.{k}": v for k, v in e.items()} | {f"taesd_decoder.{k}": v for k, v in d.items()}
        save_file({k: v.contiguous() for k, v in comfy.items()}, str(folder / "taef2-comfy.safetensors"))
        return folder, e, d

    return dict(model=model, off=write("off", 0.0), on=write("on", 1.0), base=base)


def _containers(folder):
    return {"original .pth": folder / "taef2_decoder.pth", "original .safetensors": folder / "taef2_encoder.safetensors",
            "comfy": folder / "taef2-comfy.safetensors"}


@pytest.mark.parametrize("entry", ["original .pth", "original .safetensors", "comfy", "saved"])
def test_pool_off_equals_diffusers_autoencoder_tiny_in_every_container(taef2, entry, tmp_path):
    folder = taef2["off"][0]
    path = _containers(folder).get(entry)
    if entry == "saved":  # what save_vae writes (ComfyUI's single-file keys), read back
        path = vae_core.save_vae(vae_core.load_vae(folder / "taef2_decoder.pth"), tmp_path / "taef2.safetensors")
    vae = vae_core.load_vae(path)
    assert vae.info.family == "taef2" and vae.info.latent_channels == 32 and vae.model.config.pool
    assert vae.model.config.has_encoder and vae.model.config.has_decoder  # a half picks up its twin
    x = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        own = taef2["model"].encode(x).latents
        ref = taef2["model"].decode(own).sample
    assert (vae.encode(x) - own).abs().max() < 1e-4  # TAEF2 speaks its own latents (scale 1, shift 0)
    assert (vae.decode(own) - ref).abs().max() < 1e-4


def _pool(h, t, b):
    y = F.conv2d(h, t[f"{b}.pool.0.weight"])
    y = F.relu(F.group_norm(y, 4, t[f"{b}.pool.1.weight"], t[f"{b}.pool.1.bias"], eps=1e-5))
    return h + F.conv2d(y, t[f"{b}.pool.3.weight"])


def _reference(model, enc, dec, x):
    """AutoencoderTiny's layers one by one, with the pool branch added before each pool block."""
    with torch.no_grad():
        h = (x + 1) / 2
        for i, layer in enumerate(model.encoder.layers):
            h = layer(_pool(h, enc, i) if i in ENC_POOL else h)
        z = h
        h = torch.tanh(z / 3) * 3
        for i, layer in enumerate(model.decoder.layers):  # diffusers' decoder index = original index - 1
            h = layer(_pool(h, dec, i + 1) if i + 1 in DEC_POOL else h)
        return z, h * 2 - 1


@pytest.mark.parametrize("entry", ["original .pth", "comfy"])
def test_pool_on_matches_the_published_design(taef2, entry):
    folder, enc, dec = taef2["on"]
    vae = vae_core.load_vae(_containers(folder)[entry])
    x = torch.rand(2, 3, 64, 40, generator=torch.Generator().manual_seed(4)) * 2 - 1
    z_ref, y_ref = _reference(taef2["model"], enc, dec, x)
    z = vae.encode(x)
    _, y_off = _reference(taef2["model"], enc | _pool_tensors(ENC_POOL, 1, 0.0), dec | _pool_tensors(DEC_POOL, 2, 0.0),
                          x)
    assert (y_ref - y_off).abs().max() > 1e-2  # the pool branches matter in this case
    assert (z - z_ref).abs().max() < 1e-4
    assert (vae.decode(z_ref) - y_ref).abs().max() < 1e-4


def test_tiling_is_exact_with_untiled_groupnorm_stages(taef2):
    vae = vae_core.load_vae(taef2["on"][0] / "taef2-comfy.safetensors")
    x = torch.rand(1, 3, 200, 136, generator=torch.Generator().manual_seed(5)) * 2 - 1
    from vae_core import tiling

    report = tiling.TileReport()
    z = vae.encode(x)
    z_t = vae.encode(x, tile=64, report=report)
    assert report.schedule == "halo" and report.tiles > 1
    y, y_t = vae.decode(z), vae.decode(z, tile=64)
    with torch.no_grad():
        truth = copy.deepcopy(vae.model).double()
        z64, y64 = truth.encode(x.double()), truth.decode(z.double())

    def rms(a, b):
        return float((a.double() - b.double()).square().mean().sqrt())

    assert psnr(z_t, z) >= 130 and rms(z_t, z64) <= 1.25 * rms(z, z64) + 1e-12
    assert psnr(y_t, y) >= 130 and rms(y_t, y64) <= 1.25 * rms(y, y64) + 1e-12
    stages = vae.model.decode_stages()
    assert type(stages[0]).__name__ == "Whole"  # the GroupNorm blocks see the whole latent


def test_near_misses_are_named(taef2, tmp_path):
    folder, enc, dec = taef2["on"]
    missing = {k: v for k, v in dec.items() if k != "4.pool.1.bias"}
    torch.save(missing, tmp_path / "taef2_decoder.pth")
    with pytest.raises(vae_core.VaeLoadError, match=r"pool \(GroupNorm\) tensors missing \['decoder.4.pool.1.bias'\]"):
        vae_core.load_vae(tmp_path / "taef2_decoder.pth")
    elsewhere = dec | {f"7.pool.{n}": v for n, v in (("0.weight", dec["3.pool.0.weight"]),)}
    torch.save(elsewhere, tmp_path / "taef2_decoder.pth")
    with pytest.raises(vae_core.VaeLoadError, match=r"unexpected \['decoder.7.pool.0.weight'\]"):
        vae_core.load_vae(tmp_path / "taef2_decoder.pth")
    torch.save(dec | {"3.pool.1.weight": torch.ones(128)}, tmp_path / "taef2_decoder.pth")
    with pytest.raises(vae_core.VaeLoadError, match=r"pool tensors of shapes \['decoder.3.pool.1.weight: \(128,\)'\]"):
        vae_core.load_vae(tmp_path / "taef2_decoder.pth")
    plain_dec = {k: v for k, v in dec.items() if ".pool." not in k}  # a TAESD-design decoder beside a TAEF2 encoder
    torch.save(plain_dec, tmp_path / "taef2_decoder.pth")
    torch.save(enc, tmp_path / "taef2_encoder.pth")
    with pytest.raises(vae_core.VaeLoadError, match="the encoder with TAEF2's pool blocks and the decoder without"):
        vae_core.load_vae(tmp_path / "taef2_decoder.pth")
    vae = vae_core.load_vae(folder / "taef2-comfy.safetensors")
    with pytest.raises(vae_core.VaeInputError, match="AutoencoderTiny has no pool"):
        vae_core.save_vae(vae, tmp_path / "out", layout="diffusers")
    with pytest.raises(vae_core.VaeLoadError, match="'taesd' for a tiny autoencoder with 32 latent channels"):
        vae_core.load_vae(folder / "taef2-comfy.safetensors", family="taesd")
    with pytest.raises(vae_core.VaeInputError, match="no normalisation and small activations"):
        vae_core.make_fp16_safe(vae)


def test_inspect_names_it(taef2, capsys):
    from vae_core.cli.main import main

    assert main(["inspect", str(taef2["on"][0] / "taef2_decoder.pth")]) == 0
    out = capsys.readouterr().out
    assert "taef2" in out and "latent channels 32" in out and "pool" in out
