"""HunyuanVideo 1.0's VAE (diffusers ``AutoencoderKLHunyuanVideo``, random tiny configs): detection in every container
and near misses named, exactness against diffusers' whole-clip pass (framewise decoding off) for several frame
counts and odd sizes, the mid block's attention frame-causal (diffusers, Tencent) or unmasked (ComfyUI), exact
tiling of the whole clip op by op with negative controls (tile-local GroupNorm statistics, pieces without halos), the
memory it holds, the fp16 fix, bad input named before any work, and the peers side by side."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import vae_core
from vae_core.families.hv10.model import program
from vae_core.tiling import TileOptions
from vae_core.tiling import clip as clip_engine
from vae_core.tiling.clip import Axis, run_program
from video_checks import check_tiled_vs_float64, per_frame_error

WIDTHS = (32, 32, 64, 64)


def reference(seed: int = 0, **kw):
    """A random tiny diffusers AutoencoderKLHunyuanVideo (4 latent channels; norm gains perturbed, so a wrong mapping
    shows), whole-clip (framewise off)."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    cfg = dict(block_out_channels=WIDTHS, layers_per_block=1, latent_channels=4, scaling_factor=0.9) | kw
    model = AutoencoderKLHunyuanVideo(**cfg).eval()
    model.use_framewise_encoding = model.use_framewise_decoding = False
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module")
def hv(tmp_path_factory):
    """``(diffusers reference, {container: path})``."""
    ref = reference()
    base = tmp_path_factory.mktemp("hv10")
    ref.save_pretrained(base / "folder")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(base / "diffusers.safetensors"))
    comfy = base / "hunyuan_video_vae.safetensors"
    vae_core.save_vae(vae_core.load_vae(base / "folder"), comfy)
    csd = load_file(str(comfy))
    save_file({f"vae.{k}": v for k, v in csd.items()}, str(base / "vae-prefixed.safetensors"))
    save_file({f"first_stage_model.{k}": v for k, v in csd.items()} | {"model.diffusion_model.x": torch.zeros(1)},
              str(base / "in-checkpoint.safetensors"))
    return ref, {"diffusers-folder": base / "folder", "diffusers-file": base / "diffusers.safetensors",
                 "comfyui-file": comfy, "vae-prefixed": base / "vae-prefixed.safetensors",
                 "first_stage_model-prefixed": base / "in-checkpoint.safetensors"}


def _configured(sd: dict, config: dict) -> "vae_core.Vae":
    """A Vae from ``sd`` with ``config`` as a host's settings (or a config.json) give it."""
    from vae_core.families.base import LoadRequest
    from vae_core.families.registry import detect
    from vae_core.loading import assemble

    return assemble(detect(sd), sd, "<state dict>", LoadRequest(path="<state dict>", config=config, host=True),
                    container="state dict")


def _video(frames: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, 8 * h, 8 * w, generator=g) * 2 - 1


@pytest.mark.parametrize("container", ["diffusers-folder", "diffusers-file", "comfyui-file", "vae-prefixed",
                                       "first_stage_model-prefixed"])
def test_detected_in_every_container(hv, container):
    ref, paths = hv
    vae = vae_core.load_vae(paths[container])
    assert vae.info.family == "hunyuanvideo" and vae.family.name == "hv10" and vae.info.latent_channels == 4
    assert vae.model.config.downscale == 8 and vae.model.config.temporal_scale == 4
    assert vae.model.config.causal_attention  # as released (diffusers, Tencent)
    assert vae.info.scaling_factor == (0.9 if container == "diffusers-folder" else 0.476986)
    z = torch.randn(1, 4, 2, 3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (vae.decode(z) - ref.decode(z).sample).abs().max() < 1e-4


def test_comfyui_keys_are_what_comfyui_builds(hv):
    """The ComfyUI-layout file holds the names (and 5-D attention convs) of ComfyUI's ``AutoencoderKL(conv3d=True)``;
    the diffusers layout round-trips key for key."""
    from vae_core.families.hv10.convert import canonical_to_diffusers, hv10_to_canonical

    ref, paths = hv
    sd = load_file(str(paths["comfyui-file"]))
    for k in ("encoder.conv_in.conv.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.2.block.0"
              ".nin_shortcut.conv.weight", "encoder.down.2.downsample.conv.conv.weight", "encoder.mid.attn_1.q.weight",
              "encoder.norm_out.weight", "quant_conv.weight", "post_quant_conv.weight", "decoder.conv_in.conv.weight",
              "decoder.up.3.upsample.conv.conv.weight", "decoder.up.0.block.1.conv2.conv.bias",
              "decoder.mid.attn_1.proj_out.weight"):
        assert k in sd, k
    assert sd["decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1, 1)
    assert not any("mid_block" in k or "resnets" in k for k in sd)
    theirs = ref.state_dict()
    back = canonical_to_diffusers(hv10_to_canonical(theirs)[0])
    assert set(back) == set(theirs) and all(torch.equal(back[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_exact_against_diffusers_whole_clip(hv, frames):
    """Encode (mean and log-variance) and decode equal diffusers' single whole-clip pass, ≤ 1e-4 in fp32, on an
    odd-sized (3 × 5 latent) frame; one frame is the image case."""
    ref, paths = hv
    vae = vae_core.load_vae(paths["comfyui-file"])
    x = _video(frames, 3, 5)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = vae.posterior(x)
        assert mean.shape == dist.mean.shape == (1, 4, 1 + (frames - 1) // 4, 3, 5)
        assert (mean - dist.mean).abs().max() < 1e-4 and (logvar.clamp(-30, 20) - dist.logvar).abs().max() < 1e-4
        z = dist.mean + 0.5 * torch.randn_like(dist.mean)
        got = vae.decode(z)
        assert got.shape == (1, 3, frames, 24, 40)
        assert (got - ref.decode(z).sample).abs().max() < 1e-4
    if frames == 1:
        assert (vae.encode(x[:, :, 0]) - mean[:, :, 0]).abs().max() < 1e-5


def test_attention_mask_follows_the_host(hv, monkeypatch):
    """``causal_attention`` (a host's setting; ComfyUI attends unmasked) changes every frame, and without
    the mask the decode equals diffusers' network with its causal mask replaced by zeros; our module tells the host
    what it runs."""
    import diffusers.models.autoencoders.autoencoder_kl_hunyuan_video as dmod

    ref, paths = hv
    causal = vae_core.load_vae(paths["comfyui-file"])
    sd = {k: v for k, v in load_file(str(paths["comfyui-file"])).items()}
    full = _configured(sd, {"causal_attention": False})
    assert not full.model.config.causal_attention
    assert full.family.host_settings(full.model) == {"causal_attention": False, "norm_num_groups": 32}
    assert causal.family.host_settings(causal.model) == {"causal_attention": True, "norm_num_groups": 32}
    z = torch.randn(1, 4, 3, 3, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = causal.decode(z), full.decode(z)
        assert per_frame_error(a, b).min() > 1e-3  # frame 0 too: it attends to later frames, and norms span the clip
        monkeypatch.setattr(dmod, "prepare_causal_attention_mask",
                            lambda t, hw, dtype, device, batch_size=None: torch.zeros(batch_size, t * hw, t * hw,
                                                                                      dtype=dtype, device=device))
        assert (ref.decode(z).sample - b).abs().max() < 1e-4
        assert (full.decode(z, tile=64) - b).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_tiled_equals_untiled_in_space_and_time(hv, kind):
    """Several pieces in space and time: per frame, the tiled error against a float64 run is at most twice the
    untiled float32 error (plus 1e-6), every frame."""
    _, paths = hv
    vae = vae_core.load_vae(paths["comfyui-file"])
    t = (torch.randn(1, 4, 3, 17, 18, generator=torch.Generator().manual_seed(2)) if kind == "decode"
         else _video(9, 17, 18))
    check_tiled_vs_float64(vae, copy.deepcopy(vae.model).double(), kind, t, "clip-ops", "auto",
                           9 if kind == "decode" else 3)


def _gather_by_index(halo: bool):
    """The engine's window gather written the slow, literal way — the source indices ``Axis.sources`` lists, picked
    one by one — with its halos (``halo``) or with every piece reading only its own input range, clamped like the
    clip's edge (what a tiler that pads each tile, or restarts causality per temporal tile, as if it were the whole
    clip does)."""
    def gather(reg, axes, ranges, device):
        idx = []
        for a, (o0, o1), n in zip(axes, ranges, reg.shape[2:]):
            got = a.sources(o0, o1, n)
            if not halo:
                own = Axis(1, a.s, 0, 0, a.up, a.first).sources(o0, o1, n)
                got = [min(max(i, own[0]), own[-1]) for i in got]
            idx.append(got)
        box = [(min(i), max(i) + 1) for i in idx]
        win = reg.window(*box)
        for axis, (ids, b) in enumerate(zip(idx, box)):
            win = win.index_select(2 + axis, torch.tensor([i - b[0] for i in ids]))
        return win.to(device)
    return gather


@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_negative_controls_tile_local_norms_or_no_halo_fail(hv, kind, monkeypatch):
    """The control's control: the real program is exact (float64), and so is the window gather written literally
    from the index maps. Statistics of each piece instead of the clip's (what every peer's tiler does), or pieces
    without their halos (in space, and in time: each group of frames starting over), are not."""
    _, paths = hv
    model = vae_core.load_vae(paths["comfyui-file"]).model.double()
    t = (torch.randn(1, 4, 3, 17, 18, generator=torch.Generator().manual_seed(2)) if kind == "decode"
         else _video(9, 17, 18)).double()
    f = 8 if kind == "decode" else 1

    def error() -> torch.Tensor:
        with torch.no_grad():
            got = run_program(program(model, kind), t, 64, t.shape[-1] * f, TileOptions())
        return per_frame_error(got, want)

    with torch.no_grad():
        want = getattr(model, kind)(t)
    assert error().max() < 1e-10
    real_gather, real_norm = clip_engine._gather, clip_engine.apply_norm
    monkeypatch.setattr(clip_engine, "_gather", _gather_by_index(halo=True))
    assert error().max() < 1e-10
    monkeypatch.setattr(clip_engine, "_gather", _gather_by_index(halo=False))
    assert error().max() > 1e-3
    monkeypatch.setattr(clip_engine, "_gather", real_gather)

    def tile_local(m, x, mean, var):  # the window's own statistics
        v = x.reshape(x.shape[0], m.num_groups, -1)
        return real_norm(m, x, v.mean(-1), v.var(-1, unbiased=False))

    monkeypatch.setattr(clip_engine, "apply_norm", tile_local)
    assert error().max() > 1e-3


def test_memory_registers_and_pieces(hv):
    """What the engine holds: its largest piece tensor depends on the tile, not on the frame count; the registers
    alive at once grow with the clip, at most about three whole-clip tensors of the widest resolution (the input the
    op reads, its output and a block's shortcut), and the estimate the hosts plan with is that dry run."""
    from vae_core.families.hv10.family import HV10

    _, paths = hv
    model = vae_core.load_vae(paths["comfyui-file"]).model
    figures = {}
    for frames in (9, 17):
        z = torch.randn(1, 4, 1 + (frames - 1) // 4, 16, 16)
        for tile in (64, 128):
            got: dict = {}
            with torch.no_grad():
                y = run_program(program(model, "decode"), z, tile, 128, TileOptions(), figures=got)
            widest = 32 * frames * 128 * 128 * 4  # the full-resolution register: 32 channels, fp32
            assert widest <= got["store_peak"] <= 3 * widest + 64 * 1024 * 128 * 4, (frames, tile, got)
            figures[frames, tile] = got
            est = HV10.video_working_set(model, "decode", frames, 128, 128, tile)
            assert est["stores"] == got["store_peak"] and est["output"] == y.numel() * 4
            assert est["activations"] == got["kv"] + 3 * 4 * got["largest"]  # keys/values, 3 piece tensors
            assert est["total"] == est["stores"] + est["activations"] and est["widest"] == got["widest"]
    for tile in (64, 128):
        assert figures[9, tile]["largest"] == figures[17, tile]["largest"]
        assert figures[17, tile]["store_peak"] > 1.5 * figures[9, tile]["store_peak"]
    assert figures[9, 128]["largest"] > 2 * figures[9, 64]["largest"]
    untiled = HV10.video_working_set(model, "decode", 17, 128, 128, None)  # the reference pass: all on the device
    assert untiled["total"] == 5 * figures[17, 64]["widest"] > figures[17, 64]["store_peak"]


def test_fp16_fix_rescales_the_stream(hv):
    """The kl family's fix on the 3-D network: a stream 2¹⁶× larger (same function in fp32) overflows fp16; the fix
    brings it into range with the fp32 outputs kept, and then runs in fp16 as close to fp32 as the plain weights do
    (this random tiny network is far from fp32 in half precision either way: diffusers' own fp16 decode is ~0.09
    off, its bf16 ~0.6)."""
    from vae_core.families.kl.fp16_fix import rescale_stream, stream_segments

    _, paths = hv
    plain = vae_core.load_vae(paths["comfyui-file"])
    big = vae_core.load_vae(paths["comfyui-file"])
    enc, dec = stream_segments(big.model)
    with torch.no_grad():
        rescale_stream(enc, big.model.encoder.norm_out, [65536.0] * len(enc))
        rescale_stream(dec, big.model.decoder.norm_out, [65536.0] * len(dec))
    x = _video(5, 2, 3)
    with torch.no_grad():
        z = plain.encode(x)
        y = plain.decode(z)
        assert (big.encode(x) - z).abs().max() < 1e-3 and (big.decode(z) - y).abs().max() < 1e-3
        unfixed = big.clone().to(torch.float16)
        assert torch.isfinite(unfixed.decode(z)).all() and unfixed.guard.working_dtype == torch.float32  # overflowed
        fixed = vae_core.make_fp16_safe(big)
        assert fixed.info.fp16_fix["peak_before"] > 65504 >= 1024 >= fixed.info.fp16_fix["peak_after"]
        assert (fixed.decode(z) - y).abs().max() < 1e-3 and (fixed.encode(x) - z).abs().max() < 1e-3
        half, plain_half = fixed.to(torch.float16), plain.clone().to(torch.float16)
        y16, p16 = half.decode(z), plain_half.decode(z)
        assert half.guard.working_dtype is None and plain_half.guard.working_dtype is None
        assert (y16 - y).abs().max() <= 1.5 * (p16 - y).abs().max() + 1e-3


def test_near_misses_and_bad_input_named(hv, tmp_path):
    _, paths = hv
    sd = load_file(str(paths["comfyui-file"]))
    gone = "decoder.mid.attn_1.proj_out.weight"
    save_file({k: v for k, v in sd.items() if k != gone}, str(tmp_path / "m.safetensors"))
    with pytest.raises(vae_core.VaeLoadError, match=f"missing keys.*{gone}"):
        vae_core.load_vae(tmp_path / "m.safetensors")
    bad = dict(sd)
    bad["encoder.down.1.downsample.conv.conv.weight"] = torch.zeros(5, 32, 3, 3, 3)
    save_file(bad, str(tmp_path / "b.safetensors"))
    with pytest.raises(vae_core.VaeLoadError, match="downsample.conv.conv.weight"):
        vae_core.load_vae(tmp_path / "b.safetensors")
    save_file(sd, str(tmp_path / "g.safetensors"), metadata={"hunyuanvideo_vae": json.dumps({"norm_num_groups": 3})})
    with pytest.raises(vae_core.VaeLoadError, match="norm_num_groups = 3; expected one of"):
        vae_core.load_vae(tmp_path / "g.safetensors")
    with pytest.raises(vae_core.VaeLoadError, match="temporal_compression_ratio = 8"):
        _configured(sd, {"temporal_compression_ratio": 8})
    with pytest.raises(vae_core.VaeInputError, match="family='wan2.1' for a HunyuanVideo 1.0-design VAE"):
        vae_core.load_vae(paths["comfyui-file"], family="wan2.1")
    vae = vae_core.load_vae(paths["comfyui-file"])
    with pytest.raises(vae_core.VaeInputError, match="6 frames; expected 1 \\+ 4k"):
        vae.encode(torch.zeros(1, 3, 6, 16, 16))
    with pytest.raises(vae_core.VaeInputError, match="encode input of 20x16 px; expected sides that are multiples"):
        vae.encode(torch.zeros(1, 3, 5, 16, 20))
    with pytest.raises(vae_core.VaeInputError, match="expected \\[B, 4, H, W\\].*\\[B, 4, T, H, W\\]"):
        vae.decode(torch.zeros(1, 5, 2, 2, 2))


def test_settings_are_typed_and_shapes_checked(hv):
    """Settings of the wrong type (4.0 groups, 1 for True), an activation other than SiLU and a 0-d conv weight are
    refused naming the value, before anything runs."""
    _, paths = hv
    sd = load_file(str(paths["comfyui-file"]))
    for bad, named in (({"norm_num_groups": 32.0}, "norm_num_groups = 32.0"), ({"causal_attention": 1},
                       "causal_attention = 1"), ({"act_fn": "gelu"}, "act_fn = 'gelu'")):
        with pytest.raises(vae_core.VaeLoadError, match=named):
            _configured(sd, bad)
    with pytest.raises(vae_core.VaeLoadError, match="'decoder.conv_out.conv.weight' of shape \\[\\]"):
        _configured(sd | {"decoder.conv_out.conv.weight": torch.zeros(())}, {})


def test_image_calls_plan_their_memory(hv):
    """An image (one frame) with ``tile="auto"`` and the image memory estimate the out-of-memory fallback uses."""
    from vae_core.tiling.memory import estimate_bytes

    _, paths = hv
    vae = vae_core.load_vae(paths["comfyui-file"])
    z = torch.randn(1, 4, 9, 10, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (vae.decode(z, tile="auto") - vae.decode(z)).abs().max() < 1e-5
    assert estimate_bytes(vae.model, 64 * 64, torch.float32) > 0


def test_groups_other_than_32_survive_a_comfyui_layout_file(tmp_path):
    """Shapes cannot say the GroupNorm groups: a file (either layout) carries them in its metadata when they are not
    the released 32 (a diffusers folder in config.json), a host module in its norms, a caller as ``norm_groups``."""
    ref = reference(block_out_channels=(8, 16, 16, 16), norm_num_groups=4)
    ref.save_pretrained(tmp_path / "f")
    vae = vae_core.load_vae(tmp_path / "f")
    assert vae.model.config.norm_groups == 4
    z = torch.randn(1, 4, 2, 3, 3)
    for name, layout in (("c.safetensors", "ldm"), ("d.safetensors", "diffusers")):
        vae_core.save_vae(vae, tmp_path / name, layout=layout)
        again = vae_core.load_vae(tmp_path / name)
        with torch.no_grad():
            assert again.model.config.norm_groups == 4 and (again.decode(z) - ref.decode(z).sample).abs().max() < 1e-4
    # a host's module says its groups (the engine rebuilds the network from its tensors and settings)
    assert vae.family.host_settings(vae.model) == {"causal_attention": True, "norm_num_groups": 4}
    sd = {k: v for k, v in vae.model.state_dict().items()}
    assert vae_core.vae_from_state_dict(sd, norm_groups=4).model.config.norm_groups == 4


def test_peers_side_by_side_diffusers_tiling(hv, capsys):
    """Same weights, same latents, 64-px tiles: ours tiled vs our untiled (the whole clip), diffusers'
    ``enable_tiling()`` (built by the bench's and lab's peer builder) and its default call (16-frame temporal tiles
    blended 4 frames) vs the whole clip. Ours: ≥ 100 dB on every frame and no temporal seam; diffusers' are
    inexact."""
    from vae_core.lab.bench_video import diffusers_video
    from vae_core.lab.metrics import frame_psnrs, temporal_seam

    _, paths = hv
    vae = vae_core.load_vae(paths["comfyui-file"])
    z = torch.randn(1, 4, 7, 8, 12, generator=torch.Generator().manual_seed(5))
    whole = diffusers_video(vae.model, torch.device("cpu"), torch.float32, None)
    whole.use_framewise_decoding = False
    framewise = diffusers_video(vae.model, torch.device("cpu"), torch.float32, None)
    tiled = diffusers_video(vae.model, torch.device("cpu"), torch.float32, 64)
    with torch.no_grad():
        ours, ours_tiled = vae.decode(z), vae.decode(z, tile=64)
        theirs, theirs_framewise, theirs_tiled = (d.decode(z).sample for d in (whole, framewise, tiled))
    assert (theirs - ours).abs().max() < 1e-4  # the peer builder put our weights into diffusers' network
    mine = (min(frame_psnrs(ours_tiled, ours)), temporal_seam(ours_tiled, ours))
    peers = {name: (min(frame_psnrs(v, ours)), temporal_seam(v, ours))
             for name, v in (("framewise", theirs_framewise), ("enable_tiling", theirs_tiled))}
    with capsys.disabled():
        print(f"\nHunyuanVideo 1.0 decode, 64-px tiles, 25 frames 96x64: ours min {mine[0]:.1f} dB, seam "
              f"{mine[1]:.0f}; diffusers " + ", ".join(f"{k} min {v[0]:.1f} dB, seam {v[1]:.0f}"
                                                     for k, v in peers.items()))
    assert mine[0] >= 100 and mine[1] <= 1
    assert all(v[0] < mine[0] - 40 for v in peers.values())
