"""LTX-Video's VAE (diffusers ``AutoencoderKLLTXVideo``, random tiny configs of the 0.9.0, 0.9.1 and 0.9.5 designs):
detection in every container and near misses named, the original layout checked against diffusers' own converter,
exactness against diffusers' whole-clip pass (causal encoder; non-causal decoder, timestep conditioning and injected
noise), exact tiling in space and time in both schedules with negative controls (a missing halo, layers that forget
their frames at every chunk), the decode noise drawn once per seed, the memory bound, and bad input named before any
work."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vae_core
from vae_core.families.ltx.blocks import TimeConv
from vae_core.tiling import TileOptions
from vae_core.tiling.halo import Local
from vae_core.tiling.stream import run_segments
from video_checks import check_tiled_vs_float64, peak_in_subprocess, per_frame_error

#: tiny diffusers configs of the three released designs (8 latent channels)
DESIGNS = {
    "0.9.0": dict(block_out_channels=(8, 16, 32, 32), decoder_block_out_channels=(8, 16, 32, 32),
                  layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1)),
    "0.9.1": dict(block_out_channels=(8, 16, 32, 32), decoder_block_out_channels=(16, 32, 64),
                  layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 2),
                  decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(True, True, True, False),
                  upsample_residual=(True, True, True), upsample_factor=(2, 2, 2), timestep_conditioning=True),
    "0.9.5": dict(block_out_channels=(8, 16, 32, 64, 64), down_block_types=("LTXVideo095DownBlock3D",) * 4,
                  spatio_temporal_scaling=(True, True, True, True), layers_per_block=(1, 1, 1, 1, 1),
                  downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
                  decoder_block_out_channels=(16, 32, 64), decoder_layers_per_block=(1, 1, 1, 1),
                  decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(False,) * 4,
                  upsample_residual=(True,) * 3, upsample_factor=(2, 2, 2), timestep_conditioning=True),
    # LTX-2 (diffusers AutoencoderKLLTX2Video): the 0.9.5 blocks, the encoder's first width its latent channels, the
    # decoder reflecting at the borders and non-causal (as in Lightricks' configs)
    "2": dict(block_out_channels=(16, 32, 64, 64), decoder_block_out_channels=(16, 32, 64),
              layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1), decoder_causal=False),
}


def reference(design: str, seed: int = 0):
    """A random tiny diffusers AutoencoderKLLTXVideo (weights perturbed so that zero-initialised noise scales and
    timestep tables matter; latent statistics set, so a wrong mapping of them shows)."""
    from diffusers import AutoencoderKLLTX2Video, AutoencoderKLLTXVideo

    torch.manual_seed(seed)
    cls = AutoencoderKLLTX2Video if design == "2" else AutoencoderKLLTXVideo
    model = cls(latent_channels=8, **DESIGNS[design]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.latents_mean.copy_(torch.randn(8) * 0.3)
        model.latents_std.copy_(torch.rand(8) + 0.5)
    return model


@pytest.fixture(scope="module")
def ltx(tmp_path_factory):
    """``(diffusers reference of the 0.9.1 design, {container: path})``."""
    ref = reference("0.9.1")
    base = tmp_path_factory.mktemp("ltx")
    ref.save_pretrained(base / "folder")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(base / "diffusers.safetensors"))
    original = base / "ltxv_vae.safetensors"
    vae_core.save_vae(vae_core.load_vae(base / "folder"), original)
    osd = load_file(str(original))
    with safe_open(str(original), "pt") as fh:
        meta = fh.metadata()
    other = {"model.diffusion_model.patchify_proj.weight": torch.ones(2, 2)}  # the transformer's part
    save_file({f"vae.{k}": v for k, v in osd.items()} | other, str(base / "checkpoint.safetensors"),
              metadata={"config": meta["config"]})
    return ref, {"diffusers-folder": base / "folder", "diffusers-file": base / "diffusers.safetensors",
                 "original-file": original, "in-checkpoint": base / "checkpoint.safetensors"}


def _video(frames: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, 32 * h, 32 * w, generator=g) * 2 - 1


def _reference_decode(ref, z: torch.Tensor, seed: int = 0, noise_scale: float = 0.025) -> torch.Tensor:
    """diffusers' decode of what our decode runs on: the latent noise ComfyUI mixes in (``(1 − s)·z + s·n`` on the
    normalised latents) from a generator seeded ``seed``, then timestep 0.05, its blocks' noise maps drawn from the
    global generator continuing that stream, in float32 (float64 for float64 latents, as both draw them)."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(z.shape, generator=g, dtype=z.dtype)
    mean, std = ref.latents_mean.view(1, -1, 1, 1, 1), ref.latents_std.view(1, -1, 1, 1, 1)
    zn = (1 - noise_scale) * z + noise_scale * (n * std + mean)
    torch.set_rng_state(g.get_state())
    return ref.decode(zn, temb=torch.tensor([0.05])).sample


@pytest.mark.parametrize("container", ["diffusers-folder", "diffusers-file", "original-file", "in-checkpoint"])
def test_detected_in_every_container(ltx, container):
    ref, paths = ltx
    vae = vae_core.load_vae(paths[container])
    assert vae.info.family == "ltxv" and vae.family.name == "ltx" and vae.info.latent_channels == 8
    assert vae.model.config.downscale == 32 and vae.model.config.temporal_scale == 8
    assert vae.model.config.conditioned and vae.model.config.decoder_padding == "zeros"  # the file says so
    z = torch.randn(1, 8, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # float64 (the noise is drawn in the call's dtype, as diffusers'; diffusers' RMS norm takes
        # its mean square in float32 even then, hence 1e-6)
        want = _reference_decode(copy.deepcopy(ref).double(), z.double())
        assert (copy.deepcopy(vae.model).double().decode(z.double()) - want).abs().max() < 1e-6
        # the public fp32 call (diffusers' own fp32 result varies by ~2e-4 between calls on this CPU: see below)
        assert (vae.decode(z) - _reference_decode(ref, z)).abs().max() < 1e-3
        assert (vae.scale_latents(z) - (z - ref.latents_mean.view(1, -1, 1, 1, 1))
                / ref.latents_std.view(1, -1, 1, 1, 1)).abs().max() < 1e-6


@pytest.mark.parametrize("design", list(DESIGNS))
def test_original_layout_is_what_diffusers_converts(design, tmp_path):
    """Our original file, under ``vae.`` as in Lightricks' checkpoints, is what diffusers' own single-file converter
    (``convert_ltx_vae_checkpoint_to_diffusers``; LTX-2: ``convert_ltx2_vae_to_diffusers``) maps back to exactly the
    diffusers class's keys and tensors; the metadata config is the shape Lightricks' code reads (block lists, the
    decoder's from its output end, each side's padding)."""
    from diffusers.loaders.single_file_utils import (convert_ltx2_vae_to_diffusers,
                                                     convert_ltx_vae_checkpoint_to_diffusers)

    ref = reference(design)
    ref.save_pretrained(tmp_path / "folder")
    vae_core.save_vae(vae_core.load_vae(tmp_path / "folder"), tmp_path / "o.safetensors")
    osd = load_file(str(tmp_path / "o.safetensors"))
    assert not any("resnets" in k or "mid_block" in k for k in osd)
    assert "decoder.up_blocks.0.res_blocks.0.conv1.conv.weight" in osd
    ckpt = {f"vae.{k}": v for k, v in osd.items()}
    conv_out = ckpt["vae.encoder.conv_out.conv.weight"]
    if design == "0.9.5":  # diffusers picks its 0.9.5 table by the released width (2048) of this tensor
        ckpt["vae.encoder.conv_out.conv.weight"] = torch.zeros(1, 2048, 1, 1, 1)
    convert = convert_ltx2_vae_to_diffusers if design == "2" else convert_ltx_vae_checkpoint_to_diffusers
    back = convert(ckpt)
    back["encoder.conv_out.conv.weight"] = conv_out
    want = ref.state_dict()
    assert set(back) == set(want)
    assert all(torch.equal(back[k], want[k]) for k in want)
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as fh:
        cfg = json.loads(fh.metadata()["config"])["vae"]
    assert cfg["latent_channels"] == 8 and cfg["encoder_spatial_padding_mode"] == "zeros"
    assert cfg["decoder_spatial_padding_mode"] == ("reflect" if design == "2" else "zeros")
    assert [b[0] for b in cfg["decoder_blocks"]][0] == "res_x" and \
        cfg["decoder_blocks"][0][1]["num_layers"] == DESIGNS[design]["decoder_layers_per_block"][0]
    again = vae_core.load_vae(tmp_path / "o.safetensors")  # the metadata read back
    assert again.model.config == vae_core.load_vae(tmp_path / "folder").model.config


@pytest.mark.parametrize("design", list(DESIGNS))
@pytest.mark.parametrize("frames", [1, 9, 25])
def test_exact_against_diffusers_whole_clip(design, frames, tmp_path):
    """Encode (frame 0, then 8-frame chunks) and decode (one latent frame at a time, the non-causal layers lagging)
    equal diffusers' single pass over the whole clip, ≤ 1e-4, on an odd-sized (3 × 5 latent) frame, both the mean and
    the log-variance, for the three LTX-Video designs and LTX-2 (its folder's config.json gives its padding); one frame
    is the image case. Both run in float64: diffusers' own fp32 result varies by ~2e-4 between its first and later
    calls in a process on this CPU (oneDNN), ours does not."""
    ref = reference(design)
    ref.save_pretrained(tmp_path / "folder")
    vae = vae_core.load_vae(tmp_path / "folder")
    assert vae.info.family == ("ltx2" if design == "2" else "ltxv")
    model, ref = vae.model.double(), ref.double()
    x = _video(frames, 3, 5).double()
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        got = model.encode(x)
        assert got.shape == post.mean.shape == (1, 8, 1 + (frames - 1) // 8, 3, 5)
        assert (got - post.mean).abs().max() < 1e-4
        moments = model.encode_moments(x)
        assert (moments[:, 8:] - post.logvar).abs().max() < 1e-4 and (moments[:, :8] - post.mean).abs().max() < 1e-4
        z = post.mean + 0.5 * torch.randn_like(post.mean)
        want = _reference_decode(ref, z) if model.config.conditioned else ref.decode(z).sample
        assert (model.decode(z) - want).abs().max() < 1e-4
        assert (model.whole_clip("decode", *model.decode_context(z)) - want).abs().max() < 1e-4  # no state at all
        if frames == 1:
            assert (model.encode(x[:, :, 0]) - got[:, :, 0]).abs().max() < 1e-5
    with torch.no_grad():  # and the public call in fp32, against our own float64 run
        assert (vae.to(torch.float32).encode(x.float()) - got).abs().max() < 1e-4


@pytest.mark.parametrize("schedule,cache_bytes", [("stream", 0), ("stream-levels", 1 << 30)])
@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_tiled_equals_untiled_in_space_and_time(ltx, kind, schedule, cache_bytes):
    """Several tiles and chunks: per frame, the tiled error against a float64 run is at most twice the untiled
    float32 error (plus 1e-6), in both schedules; the decode's noise is the same draw tiled and untiled."""
    _, paths = ltx
    vae = vae_core.load_vae(paths["original-file"])
    t = (torch.randn(1, 8, 3, 5, 6, generator=torch.Generator().manual_seed(2)) if kind == "decode"
         else _video(9, 9, 10))  # a latent tile is at least 8 px: 9×10 latent px make 4 tiles
    check_tiled_vs_float64(vae, copy.deepcopy(vae.model).double(), kind, t, schedule, cache_bytes,
                           17 if kind == "decode" else 2)


@pytest.mark.parametrize("kind,schedule", [("decode", "tile"), ("decode", "level"), ("encode", "level")])
def test_negative_controls_missing_halo_or_no_look_ahead_fail(ltx, kind, schedule):
    """Chains without halos fail, and so does a decoder streamed as if it were causal (no look at the next frame:
    what a causal streamer does with LTX); the real plan is exact."""
    _, paths = ltx
    model = vae_core.load_vae(paths["original-file"]).model
    t = (torch.randn(1, 8, 3, 5, 6, generator=torch.Generator().manual_seed(2)) if kind == "decode"
         else _video(17, 5, 6))

    def error(m=model) -> torch.Tensor:
        with torch.no_grad():
            if kind == "decode":
                z, ctx = m.decode_context(t)  # the call's noise, drawn as decode draws it
                plan = m.video_plan("decode", t.shape[2], ctx=ctx)
            else:
                z, plan = t, m.video_plan("encode", t.shape[2])
            got = run_segments(plan, z, 64, TileOptions(), schedule=schedule)
        return per_frame_error(got, want)

    with torch.no_grad():
        want = getattr(model, kind)(t)
    assert error().max() < 1e-4  # the control's control
    chain = "decode_chain" if kind == "decode" else "encode_chain"
    original = getattr(model, chain)
    try:
        setattr(model, chain, lambda *a, **k: [Local(s.fn, 0, s.up, s.down, s.blocks) for s in original(*a, **k)])
        assert error().max() > 1e-3
    finally:
        delattr(model, chain)
    if kind == "decode":
        causal = copy.deepcopy(model)
        for m in causal.decoder.modules():
            if isinstance(m, TimeConv):
                m.causal, m.left, m.right = True, m.kernel - 1, 0
        assert error(causal).max() > 1e-3


def test_decode_noise_is_one_draw_per_seed(ltx):
    """A timestep-conditioned decode mixes in seeded noise: the same seed gives the same video tiled or not, another
    seed another video, no noise a third; the injected maps are whole-frame draws (a tile sees its slice)."""
    _, paths = ltx
    model = vae_core.load_vae(paths["original-file"]).model
    z = torch.randn(1, 8, 2, 4, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model.decode(z, seed=7), model.decode(z, seed=8)
        quiet = model.decode(z, noise_scale=0.0, seed=7)
        ctx = model.decode_context(z, seed=7)[1]
    assert (a - b).abs().max() > 1e-3 and (a - quiet).abs().max() > 1e-3
    assert {tuple(m[0].shape) for m in ctx.noise.values()} >= {(8, 10), (16, 20), (32, 40)}
    with pytest.raises(vae_core.VaeInputError, match="noise_scale=1.5"):
        model.decode(z, noise_scale=1.5)


def test_near_misses_and_bad_input_named(ltx, tmp_path):
    _, paths = ltx
    sd = load_file(str(paths["original-file"]))
    gone = "decoder.up_blocks.2.res_blocks.0.conv2.conv.weight"
    save_file({k: v for k, v in sd.items() if k != gone}, str(tmp_path / "m.safetensors"))
    with pytest.raises(vae_core.VaeLoadError, match="missing keys.*up_blocks.2.res_blocks.0.conv2"):
        vae_core.load_vae(tmp_path / "m.safetensors")
    bad = dict(sd)
    bad["decoder.up_blocks.1.conv.conv.weight"] = torch.zeros(100, 64, 3, 3, 3)
    save_file(bad, str(tmp_path / "b.safetensors"))
    with pytest.raises(vae_core.VaeLoadError, match="up_blocks.1.conv.conv.weight with 100 outputs"):
        vae_core.load_vae(tmp_path / "b.safetensors")
    odd = {k: v for k, v in sd.items() if not k.startswith("encoder.down_blocks.1.")}
    odd["encoder.down_blocks.1.attn.weight"] = torch.zeros(8, 8)
    save_file(odd, str(tmp_path / "o.safetensors"))
    with pytest.raises(vae_core.VaeLoadError, match="encoder block 1 with parts \\['attn'\\]"):
        vae_core.load_vae(tmp_path / "o.safetensors")
    with pytest.raises(vae_core.VaeInputError, match="family='wan2.1' for an LTX-Video VAE"):
        vae_core.load_vae(paths["original-file"], family="wan2.1")
    vae = vae_core.load_vae(paths["original-file"])
    with pytest.raises(vae_core.VaeInputError, match="10 frames; expected 1 \\+ 8k"):
        vae.encode(torch.zeros(1, 3, 10, 32, 32))
    with pytest.raises(vae_core.VaeInputError, match="encode input of 48x32 px; expected sides that are multiples of "
                                                     "32"):
        vae.encode(torch.zeros(1, 3, 9, 32, 48))
    with pytest.raises(vae_core.VaeInputError, match="expected \\[B, 8, H, W\\].*\\[B, 8, T, H, W\\]"):
        vae.decode(torch.zeros(1, 5, 2, 2, 2))


def test_reflect_padded_original_is_not_saved_as_diffusers(tmp_path):
    """Lightricks' files reflect at the decoder's borders unless their config says otherwise; that decoder is not
    diffusers' (zeros) and is not saved as if it were."""
    from vae_core.families.ltx.convert import canonical_to_diffusers

    ref = reference("0.9.0")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, str(tmp_path / "d.safetensors"))
    vae = vae_core.load_vae(tmp_path / "d.safetensors")
    orig = {k: v for k, v in vae.model.state_dict().items()}
    assert set(canonical_to_diffusers(orig)) == set(sd)
    save_file({k: v.contiguous() for k, v in orig.items()}, str(tmp_path / "bare.safetensors"))  # no metadata
    bare = vae_core.load_vae(tmp_path / "bare.safetensors")
    assert bare.model.config.decoder_padding == "reflect"
    assert "reflect" in bare.info.sources["ltx decoder_padding"]
    z = torch.randn(1, 8, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (bare.decode(z) - vae.decode(z)).abs().max() > 1e-3
    with pytest.raises(vae_core.VaeInputError, match="pads with 'zeros' \\(encoder\\) and 'reflect' \\(decoder\\)"):
        vae_core.save_vae(bare, tmp_path / "out", layout="diffusers")
    assert not (tmp_path / "out").exists()


def test_peers_side_by_side_diffusers_tiling(ltx, capsys):
    """Same weights, same latents, 64-px tiles: ours tiled vs our untiled, diffusers' ``enable_tiling()`` (the
    bench's and lab's peer builder, overlap 1/4) vs its untiled. Ours: ≥ 100 dB on every frame and no temporal seam;
    diffusers' is inexact."""
    from vae_core.lab.bench_video import diffusers_video
    from vae_core.lab.metrics import frame_psnrs, temporal_seam

    ref, paths = ltx
    vae = vae_core.load_vae(paths["original-file"])
    z = torch.randn(1, 8, 3, 4, 6, generator=torch.Generator().manual_seed(5))
    peer_untiled = diffusers_video(vae.model, torch.device("cpu"), torch.float32, None)
    peer_tiled = diffusers_video(vae.model, torch.device("cpu"), torch.float32, 64)
    with torch.no_grad():
        ours, ours_tiled = vae.decode(z), vae.decode(z, tile=64)
        t = torch.tensor([0.05])
        torch.manual_seed(0)
        theirs = peer_untiled.decode(z, temb=t).sample
        torch.manual_seed(0)
        theirs_tiled = peer_tiled.decode(z, temb=t).sample
    mine = (min(frame_psnrs(ours_tiled, ours)), temporal_seam(ours_tiled, ours))
    peer = (min(frame_psnrs(theirs_tiled, theirs)), temporal_seam(theirs_tiled, theirs))
    with capsys.disabled():
        print(f"\nLTX-Video decode, 64-px tiles, 17 frames 192x128: ours min {mine[0]:.1f} dB, seam {mine[1]:.0f}; "
              f"diffusers enable_tiling min {peer[0]:.1f} dB, seam {peer[1]:.0f} levels")
    assert mine[0] >= 100 and mine[1] <= 1
    assert peer[0] < mine[0] - 40


LTX_MEMORY = {"family": "ltx", "release": {"version": "0.9.0", "width_div": 8, "layers": 1}}


def test_memory_grows_with_the_tile_not_the_frame_or_the_clip():
    """Narrow 0.9.0 widths, 128-px tiles, decode: peak RSS at 4× the area and 2× the frames grows < 1.5× tiled
    (tile-major), while the untiled (streamed) call's grows more than 1.5× at 16× the area, so the test can fail
    (measured 81 → 82 MB and 81 → 204 MB; at these widths every call holds ~80 MB of conv3d workspace, so 9× the
    area grew the untiled peak only 1.46×)."""
    small, big = (peak_in_subprocess(LTX_MEMORY, "decode", f, s, "tiled") for f, s in ((17, 128), (33, 256)))
    un_small, un_big = (peak_in_subprocess(LTX_MEMORY, "decode", 17, s, "untiled") for s in (128, 512))
    assert big["peak"] < 1.5 * small["peak"], (small, big)
    assert un_big["peak"] > 1.5 * un_small["peak"], (un_small, un_big)


def test_host_module_settings_come_from_the_module(ltx):
    """A host's live LTX module (here our own, zero-padded from its file's metadata) is read with the padding, the
    causality and the upsampler shortcuts its modules were built with, which its tensors do not show (without them a
    host module would be taken for Lightricks' reflecting default)."""
    from vae_core.hosts.attach import HostEngine

    _, paths = ltx
    vae = vae_core.load_vae(paths["original-file"])
    engine = HostEngine(vae.model, name="host LTX")
    assert engine.vae.model.config == vae.model.config
    z = torch.randn(1, 8, 2, 2, 3, generator=torch.Generator().manual_seed(4))
    with engine.attached() as hosted, torch.no_grad():
        assert torch.equal(hosted.decode(z), vae.decode(z))


def test_config_settings_apply_to_the_right_blocks(tmp_path):
    """diffusers gives one upsampler shortcut flag per up block, also to blocks without an upsampler (the 0.9.0
    layout's first): the flags land on the right upsamplers; a non-causal encoder (a reference option no release
    uses) and a decoder that scales time differently from the encoder are refused by name, not run wrong."""
    from diffusers import AutoencoderKLLTX2Video, AutoencoderKLLTXVideo

    torch.manual_seed(0)
    ref = AutoencoderKLLTXVideo(latent_channels=8, **DESIGNS["0.9.0"], upsample_residual=(True, True, True, False))
    ref.eval().save_pretrained(tmp_path / "shifted")
    vae = vae_core.load_vae(tmp_path / "shifted")
    assert [b.residual for b in vae.model.config.decoder if b.kind == "d2s"] == [True, True, True]
    z = torch.randn(1, 8, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (vae.model.double().decode(z.double()) - ref.double().decode(z.double()).sample).abs().max() < 1e-6
    AutoencoderKLLTXVideo(latent_channels=8, **DESIGNS["0.9.0"], encoder_causal=False).save_pretrained(
        tmp_path / "acausal")
    with pytest.raises(vae_core.VaeLoadError, match="encoder_causal: false"):
        vae_core.load_vae(tmp_path / "acausal")
    AutoencoderKLLTX2Video(latent_channels=8, **DESIGNS["2"], upsample_type=("spatial", "temporal", "spatiotemporal")
                           ).save_pretrained(tmp_path / "uneven")
    with pytest.raises(vae_core.VaeLoadError, match="a decoder that scales time by 4 and an encoder by 8"):
        vae_core.load_vae(tmp_path / "uneven")


@pytest.mark.parametrize("dtype,worst", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_half_precision_by_value(ltx, dtype, worst):
    """bf16 and fp16 (the hosts' working dtypes, and fp16 for GPUs without bf16) stay close to the fp32 video,
    encode and decode, tiled as untiled: worst pixel within ``worst`` of [-1, 1] (bf16 keeps 8 mantissa bits; this
    random network measured 0.053 bf16, 0.007 fp16), mean within a tenth of that; the decode's seeded noise is the
    fp32 draw rounded (a half-precision generator draws other numbers for the same seed)."""
    _, paths = ltx
    vae = vae_core.load_vae(paths["original-file"])
    half = vae.clone().to(dtype)
    x = _video(9, 3, 4)
    with torch.no_grad():
        z = vae.encode(x)
        y = vae.decode(z)
        for tile in (None, 64):
            zh, yh = half.encode(x, tile=tile).float(), half.decode(z, tile=tile).float()
            assert torch.isfinite(zh).all() and torch.isfinite(yh).all()
            for got, want in ((zh, z), (yh, y)):
                err = (got - want).abs()
                assert err.max() < worst * max(1.0, float(want.abs().max())) and err.mean() < worst / 10, \
                    (tile, float(err.max()), float(err.mean()))
    assert half.guard.working_dtype is None  # ran in half precision, no fp32 retry
    with torch.no_grad():  # the noisy latents a decode runs on: the fp32 ones, rounded
        noisy = vae.model.decode_context(z)[0]
        assert (half.model.decode_context(z.to(dtype))[0].float() - noisy).abs().max() < 0.01 * noisy.abs().max()


@pytest.mark.parametrize("design", ["0.9.1", "2"])
def test_image_calls_plan_their_memory(design):
    """An image (one frame) with ``tile="auto"`` and the image memory estimate the out-of-memory fallback uses: the
    widths per resolution level (patchified levels at the image's own channels) give an estimate that grows with the
    area, and the call equals the untiled one (it crashed without the widths)."""
    from vae_core.tiling.memory import estimate_bytes

    vae = vae_core.vae_from_state_dict({k: v.clone() for k, v in reference(design).state_dict().items()})
    cfg = vae.model.config
    assert len(cfg.encoder_widths) == len(cfg.decoder_widths) == cfg.downscale.bit_length()
    assert cfg.encoder_widths[0] == 3 and max(cfg.encoder_widths) >= 32
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x, tile="auto")
        assert (z - vae.encode(x)).abs().max() < 1e-5
        assert (vae.decode(z, tile="auto") - vae.decode(z)).abs().max() < 1e-5
    small, big = (estimate_bytes(vae.model, p, torch.float32) for p in (64 * 64, 256 * 256))
    assert 0 < small and big == pytest.approx(16 * small, rel=0.01)
