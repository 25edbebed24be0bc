"""vae_core.hosts.attach.HostEngine: the engine on a host's own module (here diffusers' AutoencoderKL, an independent
implementation with diffusers' parameter names), no second copy, exact, and never changing the host's tensors."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import vae_core
from conftest import MINI_LDM, diffusers_vae
from vae_core.hosts.attach import HostEngine


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_engine_matches_the_host_network_on_the_host_tensors():
    host = diffusers_vae("sd")
    engine = HostEngine(host, "diffusers host")
    assert engine.vae.info.layout == "diffusers" and engine.vae.info.latent_channels == 4
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        z_ref = host.encode(x).latent_dist.mean
        y_ref = host.decode(z_ref).sample
    with engine.attached() as vae:
        assert _storages(vae.model.parameters()) == _storages(host.parameters())
        z = vae.encode(x)
        y_untiled = vae.decode(z_ref)
        y_tiled = vae.decode(z_ref, tile=64)
    assert (z - z_ref).abs().max() < 1e-4 and (y_untiled - y_ref).abs().max() < 1e-4
    assert (y_tiled - y_ref).abs().max() < 1e-4
    assert all(p.is_meta for p in engine.vae.model.parameters())  # emptied: keeps no host tensor alive


def test_engine_follows_the_host_weights_and_device_moves():
    host = diffusers_vae("sd")
    engine = HostEngine(host, "diffusers host")
    z = torch.randn(1, 4, 8, 8)
    with engine.attached() as vae:
        before = vae.decode(z)
    host.load_state_dict(diffusers_vae("sd", seed=1).state_dict())  # the host loads other weights in place
    host.to(torch.float64).to(torch.float32)  # and moves them (new storage)
    with engine.attached() as vae:
        after = vae.decode(z)
        assert _storages(vae.model.parameters()) == _storages(host.parameters())
    with torch.no_grad():
        ref = host.decode(z).sample
    assert (after - ref).abs().max() < 1e-4 and (after - before).abs().max() > 1e-2


def test_rebuilds_when_the_host_changes_shapes():
    host = diffusers_vae("sd")
    engine = HostEngine(host, "diffusers host")
    host.decoder = diffusers_vae("sd3").decoder  # a host swapping in another architecture's decoder
    with pytest.raises(vae_core.VaeLoadError, match="latent channels"):
        with engine.attached():
            pass


def test_nan_fallback_casts_a_temporary_copy_not_the_host():
    from diffusers_host import host_vae
    from vae_core.families.kl.fp16_fix import rescale_stream, stream_segments

    big = vae_core.load_vae(MINI_LDM)
    enc, dec = stream_segments(big.model)
    rescale_stream(dec, big.model.decoder.norm_out, [256.0] * len(dec))  # overflows fp16, same fp32 output
    host = host_vae(big.model.state_dict(), 32, [1, 2, 4, 4], 2).half()
    ptrs = _storages(host.parameters())
    engine = HostEngine(host, "fp16 host")
    z = vae_core.load_vae(MINI_LDM).encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    with torch.no_grad():
        assert not torch.isfinite(host.decode(z.half()).sample).all()  # really overflows in fp16
    with engine.attached() as vae:
        y = vae.decode(z)  # retried in fp32 by the guard
    assert torch.isfinite(y).all() and engine.vae.guard.working_dtype == torch.float32
    assert all(p.dtype == torch.float16 for p in host.parameters()) and _storages(host.parameters()) == ptrs
    ref = vae_core.load_vae(MINI_LDM)
    assert (y - ref.decode(z)).abs().max() < 1e-3


def test_tiny_host_runs_exactly_and_unknown_modules_are_clear_errors():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tiny = AutoencoderTiny().eval()
    engine = HostEngine(tiny, "TAESD host")  # diffusers' AutoencoderTiny: TAESD's own latents (scale 1)
    x = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        ref = tiny.decode(tiny.encode(x).latents).sample
    with engine.attached() as vae:
        assert _storages(vae.model.encoder.parameters()) <= _storages(tiny.parameters())
        assert (vae.decode(vae.encode(x), tile=64) - ref).abs().max() < 1e-4
    with pytest.raises(vae_core.VaeLoadError, match="video host.*no VAE encoder\\+decoder keys"):
        HostEngine(torch.nn.Conv3d(3, 3, 3), "video host")
    host = diffusers_vae("sd")
    del host.decoder.mid_block.attentions[0].to_q  # a part missing
    with pytest.raises(vae_core.VaeLoadError, match="missing"):
        HostEngine(host, "broken host")


def test_freed_host_is_a_clear_error():
    host = diffusers_vae("sd")
    engine = HostEngine(host, "gone")
    del host
    import gc

    gc.collect()
    with pytest.raises(vae_core.VaeLoadError, match="freed"):
        with engine.attached():
            pass


def test_ldm_named_host_shares_every_tensor():
    from torch import nn

    ldm = vae_core.load_vae(MINI_LDM).model  # any module with ldm names (ComfyUI's and A1111's first stages)
    wrapper = nn.Module()
    wrapper.first_stage_model = ldm  # under a checkpoint-style prefix
    engine = HostEngine(wrapper, "prefixed host")
    assert engine.vae.info.prefix == "first_stage_model."
    with engine.attached() as vae:
        assert [p.untyped_storage().data_ptr() for p in vae.model.parameters()] == \
               [p.untyped_storage().data_ptr() for p in ldm.parameters()]
    assert set(load_file(str(MINI_LDM))) == set(dict(ldm.named_parameters()))
