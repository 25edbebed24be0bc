"""Forge's VAE object with the pack's tiling and guard (webui_extension/forge_hooks.py), on objects shaped like Forge
main's ``backend/patcher/vae.py`` VAE (``decode`` looks up the patcher's wrapper) and Neo's (it does not), holding
vae_core's model of the bundled test VAE (LDM names, as Forge's IntegratedAutoencoderKL). The real Forge server runs
the wrapper mode in tests/test_forge_server.py."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

import vae_core
from conftest import MINI_LDM, ROOT

sys.path.insert(0, str(ROOT))
from webui_extension import forge_hooks, host  # noqa: E402


class ForgeVAE:
    """Forge main's shape: decode/encode go through ``model_vae_*_wrapper`` when one is set."""

    def __init__(self, fsm: torch.nn.Module) -> None:
        self.first_stage_model, self.vae_dtype = fsm, torch.float32
        self.patcher = SimpleNamespace(model_options={})

    def decode_inner(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(z.to(self.vae_dtype))

    def encode_inner(self, x: torch.Tensor) -> torch.Tensor:
        fsm = self.first_stage_model
        return fsm.quant_conv(fsm.encoder(x.to(self.vae_dtype)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        wrapper = self.patcher.model_options.get("model_vae_decode_wrapper", None)
        return self.decode_inner(z) if wrapper is None else wrapper(self.decode_inner, z)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        wrapper = self.patcher.model_options.get("model_vae_encode_wrapper", None)
        return self.encode_inner(x) if wrapper is None else wrapper(self.encode_inner, x)


class NeoVAE(ForgeVAE):
    """Neo's stored methods: no wrapper lookup."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_inner(z)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_inner(x)


@pytest.fixture()
def fsm():
    model = vae_core.load_vae(MINI_LDM).model.eval()
    model.decode = lambda z: model.decoder(model.post_quant_conv(z))  # IntegratedAutoencoderKL.decode
    return model


def test_wrappers_tile_exactly_chain_and_are_removed(fsm):
    vae = ForgeVAE(fsm)
    seen = []
    theirs = lambda inner, x: (seen.append(x.shape), inner(x))[1]  # noqa: E731 - another extension's wrapper
    vae.patcher.model_options["model_vae_decode_wrapper"] = theirs
    g = torch.Generator().manual_seed(0)
    z, x = torch.randn(1, 4, 16, 16, generator=g), torch.rand(1, 3, 128, 128, generator=g) * 2 - 1
    with torch.no_grad():
        ref_dec, ref_enc = vae.decode(z), vae.encode(x)
        assert forge_hooks.install_tiled(vae, 64, 64, "exact") == "wrappers"
        assert forge_hooks.is_tiled(vae) and "_vae_pack_saved_forwards" not in fsm.__dict__  # only during a call
        dec, enc = vae.decode(z), vae.encode(x)
    assert len(seen) == 2  # theirs ran inside ours
    assert (dec - ref_dec).abs().max() < 1e-4 and (enc - ref_enc).abs().max() < 1e-4
    forge_hooks.restore(vae)
    assert vae.patcher.model_options == {"model_vae_decode_wrapper": theirs} and not forge_hooks.is_tiled(vae)


def test_a_wrapper_set_by_another_extension_during_the_job_stays(fsm):
    vae = ForgeVAE(fsm)
    forge_hooks.install_tiled(vae, 64, 64, "exact")
    later = lambda inner, x: inner(x)  # noqa: E731
    vae.patcher.model_options["model_vae_encode_wrapper"] = later
    forge_hooks.restore(vae)
    assert vae.patcher.model_options == {"model_vae_encode_wrapper": later}


def test_without_wrapper_lookup_the_forwards_are_swapped_for_the_job(fsm):
    vae = NeoVAE(fsm)
    assert not host.looks_up_wrappers(vae) and host.looks_up_wrappers(ForgeVAE(fsm))
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = vae.decode(z)
        assert forge_hooks.install_tiled(vae, 64, 64, "exact") == "forwards"
        assert "_vae_pack_saved_forwards" in fsm.__dict__ and vae.patcher.model_options == {}
        out = vae.decode(z)
    assert (out - ref).abs().max() < 1e-4
    forge_hooks.restore(vae)
    assert "forward" not in fsm.decoder.__dict__ and not forge_hooks.is_tiled(vae)


def test_guard_retries_in_fp32_and_sets_vae_dtype(fsm):
    """fp16 weights whose decode overflows: the guard's retry casts the weights as loaded and tells Forge."""
    vae = ForgeVAE(fsm.half())
    vae.vae_dtype = torch.float16  # Forge with --vae-in-fp16
    with torch.no_grad():
        fsm.decoder.conv_in.weight.mul_(1e5)  # activations ~1e5: inf in fp16, finite in fp32
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert not torch.isfinite(vae.decode(z)).all()  # the control: fp16 really overflows
        forge_hooks.install_guard(vae)
        out = vae.decode(z)
    assert torch.isfinite(out).all() and vae.vae_dtype == torch.float32 and out.dtype == torch.float32
