"""HunyuanVideo 1.0's chunked schedule (newer ComfyUI, #10995): the chunked network against an independent
implementation written in ComfyUI's own order (carries as a first-in-first-out list), exact tiling of it with a
negative control (carries dropped), memory that does not grow with the clip, the choice made by a host's module or
the caller (typed, named), the report, and the cache key."""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vae_core
from vae_core.families.hv10.chunked import SCHEDULE, run_chunked
from vae_core.tiling import TileOptions, TileReport
from vae_core.tiling import clip as clip_engine
from test_family_hv10 import reference
from video_checks import check_tiled_vs_float64


@pytest.fixture(scope="module")
def sd():
    return {k: v.clone() for k, v in reference().state_dict().items()}


def _vae(sd, **settings) -> "vae_core.Vae":
    return vae_core.vae_from_state_dict(dict(sd), settings=settings)


# -- an independent chunked network, in ComfyUI's order ---------------------------------------------------------------
def _causal(conv: torch.nn.Conv3d, x: torch.Tensor, carry_in, carry_out) -> torch.Tensor:
    """A replicate-padded causal conv; ``carry_in``: frames popped from the front of the previous chunk's list
    (None: the first chunk pads by replicating); ``carry_out``: the list this chunk appends its last 2 frames to."""
    if conv.kernel_size[0] == 1:
        return F.conv3d(x, conv.weight, conv.bias)
    if carry_in is None:
        x = F.pad(x, (1, 1, 1, 1, 2, 0), mode="replicate")
    else:
        x = torch.cat([carry_in.pop(0), F.pad(x, (1, 1, 1, 1, 0, 0), mode="replicate")], dim=2)
    if carry_out is not None:
        carry_out.append(x[:, :, -2:])
    return F.conv3d(x, conv.weight, conv.bias, stride=conv.stride)


def _act(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return F.silu(F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps))


def _res(block, x, cin, cout):
    h = _causal(block.conv1.conv, _act(block.norm1, x), cin, cout)
    h = _causal(block.conv2.conv, _act(block.norm2, h), cin, cout)
    short = x if block.nin_shortcut is None else F.conv3d(x, block.nin_shortcut.conv.weight, block.nin_shortcut.conv.bias)
    return short + h


def comfy_order_decode(model, z):
    d = model.decoder
    h = _causal(d.conv_in.conv, F.conv3d(z, model.post_quant_conv.weight, model.post_quant_conv.bias), None, None)
    h = d.mid.block_2(d.mid.attn_1(d.mid.block_1(h)))
    chunks, out, cin = torch.split(h, 2, dim=2), [], None
    for i, h1 in enumerate(chunks):
        cout = [] if i < len(chunks) - 1 else None
        for level in reversed(d.up):
            for block in level.block:
                h1 = _res(block, h1, cin, cout)
            if hasattr(level, "upsample"):
                t = 2.0 if level.upsample.time else 1.0
                if cin is None:  # the first chunk keeps frame 0 single
                    parts = [F.interpolate(h1[:, :, :1], scale_factor=(1.0, 2.0, 2.0), mode="nearest")]
                    if h1.shape[2] > 1:
                        parts.append(F.interpolate(h1[:, :, 1:], scale_factor=(t, 2.0, 2.0), mode="nearest"))
                    h1 = torch.cat(parts, dim=2)
                else:
                    h1 = F.interpolate(h1, scale_factor=(t, 2.0, 2.0), mode="nearest")
                h1 = _causal(level.upsample.conv.conv, h1, cin, cout)
        out.append(_causal(d.conv_out.conv, _act(d.norm_out, h1), cin, cout))
        cin = cout
    return torch.cat(out, dim=2)


def comfy_order_encode_moments(model, x):
    e = model.encoder
    xs = [x[:, :, :1]]
    if x.shape[2] > 4:
        xs += list(torch.split(x[:, :, 1:1 + ((x.shape[2] - 1) // 4) * 4], 8, dim=2))
    out, cin = [], None
    for i, x1 in enumerate(xs):
        cout = [] if i < len(xs) - 1 else None
        h = _causal(e.conv_in.conv, x1, cin, cout)
        for level in e.down:
            for block in level.block:
                h = _res(block, h, cin, cout)
            if hasattr(level, "downsample"):
                h = _causal(level.downsample.conv.conv, h, cin, cout)
        out.append(h)
        cin = cout
    h = torch.cat(out, dim=2)
    h = e.mid.block_2(e.mid.attn_1(e.mid.block_1(h)))
    h = _causal(e.conv_out.conv, _act(e.norm_out, h), None, None)
    return F.conv3d(h, model.quant_conv.weight, model.quant_conv.bias)


@pytest.mark.parametrize("latent_frames", [1, 2, 3, 6])
def test_chunked_decode_is_comfyuis_order(sd, latent_frames):
    """The chunked network = the independent ComfyUI-order implementation (float64, ≤ 1e-10; 1 to 3 chunks, a
    1-frame last chunk); and it is another function than the whole-clip reference once there are two chunks."""
    chunked, whole = _vae(sd, chunked=True).model.double(), _vae(sd).model.double()
    z = torch.randn(1, 4, latent_frames, 5, 7, generator=torch.Generator().manual_seed(latent_frames), dtype=torch.float64)
    with torch.no_grad():
        ours, theirs, ref = chunked.decode(z), comfy_order_decode(chunked, z), whole.decode(z)
    assert ours.shape == theirs.shape == (1, 3, 1 + 4 * (latent_frames - 1), 40, 56)
    assert (ours - theirs).abs().max() <= 1e-10
    differs = (ours - ref).abs().max()
    assert differs > 1e-2 if latent_frames > 2 else differs <= 1e-10


@pytest.mark.parametrize("frames", [1, 5, 9, 13, 21])
def test_chunked_encode_is_comfyuis_order(sd, frames):
    """Encoder: frame 0, then 8-frame chunks (13 frames: a 4-frame last chunk), = the ComfyUI-order implementation;
    another function than the whole-clip reference from the second chunk on."""
    chunked, whole = _vae(sd, chunked=True).model.double(), _vae(sd).model.double()
    x = torch.rand(1, 3, frames, 40, 48, generator=torch.Generator().manual_seed(frames), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        ours, theirs, ref = chunked.encode_moments(x), comfy_order_encode_moments(chunked, x), whole.encode_moments(x)
    assert ours.shape == theirs.shape == (1, 8, 1 + (frames - 1) // 4, 5, 6)
    assert (ours - theirs).abs().max() <= 1e-10
    differs = (ours - ref).abs().max()
    assert differs > 1e-2 if frames > 1 else differs <= 1e-10


@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_chunked_tiled_equals_untiled(sd, kind):
    """Pieces in space and time over several chunks: per frame, the tiled error against a float64 chunked run is at
    most twice the untiled float32 error; the report names the chunked schedule."""
    vae = _vae(sd, chunked=True)
    t = (torch.randn(1, 4, 5, 17, 18, generator=torch.Generator().manual_seed(2)) if kind == "decode"
         else torch.rand(1, 3, 13, 136, 144, generator=torch.Generator().manual_seed(3)) * 2 - 1)
    check_tiled_vs_float64(vae, copy.deepcopy(vae.model).double(), kind, t, SCHEDULE, "auto",
                           17 if kind == "decode" else 4)


@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_negative_control_carries_dropped(sd, kind, monkeypatch):
    """Without the carried frames (each chunk replicate-pads as if it were the first) the tiled call is far from
    the chunked network, so the equality above depends on them."""
    model = _vae(sd, chunked=True).model.double()
    t = (torch.randn(1, 4, 5, 6, 7, dtype=torch.float64) if kind == "decode"
         else torch.rand(1, 3, 13, 40, 48, dtype=torch.float64) * 2 - 1)
    with torch.no_grad():
        ref = model.decode(t) if kind == "decode" else model.encode_moments(t)
        good = run_chunked(model, kind, t, 64, t.shape[-1] * (8 if kind == "decode" else 1), TileOptions(),
                           moments=True)
        monkeypatch.setattr(clip_engine.Carries, "advance", lambda self: self.next.clear())
        bad = run_chunked(model, kind, t, 64, t.shape[-1] * (8 if kind == "decode" else 1), TileOptions(),
                          moments=True)
    assert (good - ref).abs().max() <= 1e-10
    assert (bad - ref).abs().max() > 1e-2


def test_memory_does_not_grow_with_the_clip(sd):
    """The chunked call's registers and carried frames are the same at 17 and 65 frames (only the latent-resolution
    clip between its parts grows, about two thirds of the video's own size), the piece tensors too; the whole-clip
    schedule's registers grow with the clip (> 3× here). The estimate tile="auto" plans with is that dry run."""
    from vae_core.families.hv10.family import HV10

    chunked, whole = _vae(sd, chunked=True).model, _vae(sd).model
    fig = {}
    for frames in (17, 65):
        for kind in ("decode", "encode"):
            x = (torch.randn(1, 4, 1 + (frames - 1) // 4, 8, 8) if kind == "decode"
                 else torch.rand(1, 3, frames, 64, 64) * 2 - 1)
            got: dict = {}
            with torch.no_grad():
                run_chunked(chunked, kind, x, 64, 64, TileOptions(), figures=got)
            fig[kind, frames] = got
            latent = 64 * (1 + (frames - 1) // 4) * 8 * 8 * 4  # the mid block's width, fp32
            assert got["latents"] == latent
            est = HV10.video_working_set(chunked, kind, frames, 64, 64, 64)
            assert est["stores"] == got["store_peak"], (est, got)
            fig["whole", kind, frames] = HV10.video_working_set(whole, kind, frames, 64, 64, 64)["stores"]
    for kind in ("decode", "encode"):
        small, big = fig[kind, 17], fig[kind, 65]
        assert big["store_peak"] == small["store_peak"], (small, big)
        assert big["largest"] == small["largest"] and big["widest"] == small["widest"]
        assert fig["whole", kind, 65] > 3 * fig["whole", kind, 17]
        assert big["store_peak"] < fig["whole", kind, 65] / 2
        # the compute device holds pieces (the carried frames are built piece by piece too) and the latent clip
        pieces = [HV10.video_working_set(chunked, kind, 17, 512, 512, tile)["activations"] for tile in (64, 256)]
        assert pieces[1] > 4 * pieces[0], pieces


def test_host_module_and_caller_choose(sd):
    """A host module whose encoder and decoder say ``carried`` (newer ComfyUI) gives the chunked network, one without
    (ComfyUI v0.3.64) the whole clip; the caller's setting is typed and named, and a family without it refuses it."""
    from vae_core.families.hv10.family import HV10
    from vae_core.hosts.attach import HostEngine

    module = _vae(sd).model
    assert HV10.host_settings(module).get("chunked") is None
    module.encoder.carried = module.decoder.carried = True
    with HostEngine(module, name="newer ComfyUI VAE").attached() as vae:
        assert vae.model.config.chunked is True
        z = torch.randn(1, 4, 3, 6, 7)
        report = TileReport()
        with torch.no_grad():
            tiled = vae.decode(z, tile=64, report=report)
    assert report.schedule == SCHEDULE
    with torch.no_grad():
        assert (tiled - _vae(sd, chunked=True).decode(z)).abs().max() < 1e-4
    module.decoder.carried = False
    module.encoder.carried = False
    assert HostEngine(module).vae.model.config.chunked is False

    with pytest.raises(vae_core.VaeLoadError, match=r"chunked = 'yes'.*one of \[True, False\]"):
        _vae(sd, chunked="yes")
    with pytest.raises(vae_core.VaeInputError, match=r"'chunkd'.*HunyuanVideo 1.0.*chunked, causal_attention"):
        _vae(sd, chunkd=True)
    kl_sd = load_file(str(Path(__file__).parent / "fixtures" / "mini-vae-ldm.safetensors"))
    with pytest.raises(vae_core.VaeInputError, match=r"'chunked' for AutoencoderKL.*norm_groups"):
        vae_core.vae_from_state_dict(kl_sd, settings={"chunked": True})
    assert "per chunk" in HV10.summary(_vae(sd, chunked=True).model, None)[0][1]
    with pytest.raises(vae_core.VaeInputError, match=r"'chunked' = None; expected a value"):
        _vae(sd, chunked=None)
    for bad in (True, 16.0, "x", 0):
        with pytest.raises(vae_core.VaeInputError, match=r"'norm_groups' = .*expected a positive int"):
            vae_core.vae_from_state_dict(kl_sd, settings={"norm_groups": bad})


def test_cli_set_and_cache_key(sd, tmp_path):
    """``--set chunked=true`` parses to a typed setting; a cache records the setting and keys its items by it
    (the default leaves earlier caches' keys unchanged)."""
    from vae_core.caching.run import CacheSettings, item_key, run_settings
    from vae_core.cli.args import setting_arg, settings_of

    assert setting_arg("chunked=true") == ("chunked", True) and setting_arg("norm_groups=16") == ("norm_groups", 16)
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        setting_arg("chunked")
    with pytest.raises(vae_core.VaeInputError, match="given twice"):
        settings_of([("chunked", True), ("chunked", False)])
    settings = CacheSettings()
    whole, chunked = run_settings(_vae(sd), settings), run_settings(_vae(sd, chunked=True), settings)
    assert "settings" not in whole["vae"] and chunked["vae"]["settings"] == {"chunked": True}
    assert item_key("0" * 64, whole, {}) != item_key("0" * 64, chunked, {})
    # a VAE whose GroupNorm groups are not the default (a fact of its file) keys its items as before: no settings
    kl_sd = load_file(str(Path(__file__).parent / "fixtures" / "mini-vae-ldm.safetensors"))
    kl16 = vae_core.vae_from_state_dict(kl_sd, norm_groups=16)
    assert kl16.model.config.norm_groups == 16 and "settings" not in run_settings(kl16, settings)["vae"]


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_by_value(sd, chunked, dtype):
    """bf16 and fp16 (the hosts' working dtypes), whole clip and chunked: the tiled call is as close to the fp32 one as
    the untiled half-precision call (worst pixel within 2× its error + 1e-3), both finite and near (< 0.25 of the
    range), encode and decode, run in half precision (no fp32 retry)."""
    vae = _vae(sd, chunked=chunked)
    half = vae.clone().to(dtype)
    x = torch.rand(1, 3, 13, 64, 72, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x)
        want = {"encode": z, "decode": vae.decode(z)}
        for kind, arg in (("encode", x), ("decode", z)):
            untiled = getattr(half, kind)(arg).float()
            tiled = getattr(half, kind)(arg, tile=64).float()
            assert torch.isfinite(untiled).all() and torch.isfinite(tiled).all()
            e_un, e_tiled = ((t - want[kind]).abs().max().item() for t in (untiled, tiled))
            scale = max(1.0, want[kind].abs().max().item())
            assert e_un < 0.25 * scale and e_tiled <= 2 * e_un + 1e-3 * scale, (kind, e_un, e_tiled)
    assert half.guard.working_dtype is None
