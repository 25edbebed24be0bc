"""ComfyUI harness: load the pack as ComfyUI loads a custom-node folder (its ``__init__`` from its path, relative
imports, mappings), validate the V1 node contract, and run every node on real tensors with the fixture VAE.

The stand-in's VAE network is diffusers' (tests/diffusers_host.py), so "the node matches core VAEDecode" compares
vae_core's engine with an independent implementation. The real ComfyUI runs in tests/test_comfy_real.py."""
from __future__ import annotations

import importlib.util
import shutil
import sys

import pytest
import torch

import vae_core
from conftest import MINI_DIFFUSERS, MINI_LDM, ROOT, SAMPLE

STANDIN = ROOT / "tests" / "comfy_standin"
CORE_NAMES = {"VAELoader", "VAEDecode", "VAEEncode", "VAEDecodeTiled", "VAEEncodeTiled", "VAEEncodeForInpaint",
              "CheckpointLoaderSimple", "DiffusersLoader"}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """The pack imported like ComfyUI's load_custom_node does, with a models/vae folder of every kind of entry."""
    vae_dir = tmp_path_factory.mktemp("models") / "vae"
    (vae_dir / "sub").mkdir(parents=True)
    shutil.copy(MINI_LDM, vae_dir / "mini-ldm.safetensors")
    shutil.copytree(MINI_DIFFUSERS, vae_dir / "sub" / "mini-diffusers")
    torch.save(vae_core.load_vae(MINI_LDM).model.state_dict(), vae_dir / "as-bin.bin")
    (vae_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    sys.path.insert(0, str(STANDIN))
    for name in [m for m in sys.modules if m == "comfy" or m.startswith("comfy.") or m == "folder_paths"]:
        del sys.modules[name]
    import folder_paths

    folder_paths.folder_names_and_paths["vae"] = [str(vae_dir)]
    spec = importlib.util.spec_from_file_location("vae_pack_under_test", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["vae_pack_under_test"] = pack
    spec.loader.exec_module(pack)
    yield pack
    sys.path.remove(str(STANDIN))
    for name in [m for m in sys.modules if m.startswith(("comfy", "folder_paths", "vae_pack_under_test"))]:
        del sys.modules[name]


def _node(comfy, name):
    return comfy.NODE_CLASS_MAPPINGS[name]()


def _photo(size=128) -> torch.Tensor:
    from vae_core.io.images import load_image

    x = torch.nn.functional.interpolate(load_image(SAMPLE), size=(size, size), mode="area")
    return ((x + 1) / 2).movedim(1, -1).contiguous()  # IMAGE [1,H,W,3] in 0..1


def test_mappings_and_contract(comfy):
    maps, names = comfy.NODE_CLASS_MAPPINGS, comfy.NODE_DISPLAY_NAME_MAPPINGS
    assert set(maps) == {"VaePackLoader", "VaePackDecodeTiled", "VaePackEncodeTiled", "VaePackFp16Fix",
                         "VaePackCompare"}
    assert not set(maps) & CORE_NAMES and set(names) == set(maps)
    for cls in maps.values():
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
        for inp in spec["required"].values():
            assert isinstance(inp, tuple) and isinstance(inp[0], (str, list))
            assert len(inp) == 1 or isinstance(inp[1], dict)
        assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
        assert callable(getattr(cls, cls.FUNCTION)) and cls.CATEGORY == "VAE Pack" and cls.DESCRIPTION
        assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)


def test_loader_lists_one_entry_per_diffusers_folder(comfy):
    choices = comfy.NODE_CLASS_MAPPINGS["VaePackLoader"].INPUT_TYPES()["required"]["vae_name"][0]
    assert "sub/mini-diffusers" in choices and "mini-ldm.safetensors" in choices and "as-bin.bin" in choices
    assert not any("diffusion_pytorch_model" in c or c.endswith("config.json") for c in choices)


def test_loader_returns_native_vae_that_core_nodes_use(comfy):
    import comfy.sd as csd

    loader = _node(comfy, "VaePackLoader")
    img = _photo()
    ref = vae_core.load_vae(MINI_LDM)
    z_ref = ref.encode(img.movedim(-1, 1) * 2 - 1)
    y_ref = ((ref.decode(z_ref) + 1) / 2).clamp(0, 1).movedim(1, -1)
    for name in ("mini-ldm.safetensors", "sub/mini-diffusers", "as-bin.bin"):
        vae, info = loader.load(name)
        assert isinstance(vae, csd.VAE) and "sd1" in info and "4 latent channels" in info
        z = vae.encode(img)  # what core VAEEncode does
        assert (z - z_ref).abs().max() < 1e-4
        assert (vae.decode(z) - y_ref).abs().max() < 1e-4  # what core VAEDecode does


def test_loader_error_is_the_vaeloaderror_text(comfy):
    with pytest.raises(ValueError) as err:
        _node(comfy, "VaePackLoader").load("broken.safetensors")
    assert "broken.safetensors" in str(err.value) and "expected" in str(err.value)
    assert type(err.value).__name__ == "VaeLoadError"


def test_tiled_nodes_match_direct_round_trip_on_any_vae(comfy):
    import comfy.sd as csd
    import comfy.utils as cu
    from safetensors.torch import load_file

    core_vae = csd.VAE(sd={k: v.float() for k, v in load_file(str(MINI_LDM)).items()},  # e.g. from Load Checkpoint
                       config=sys.modules["vae_pack_under_test.nodes.comfy_bridge"].comfy_config(vae_core.load_vae(MINI_LDM)))
    img = _photo(256)
    ref = vae_core.load_vae(MINI_LDM)
    z_ref = ref.encode(img.movedim(-1, 1) * 2 - 1)
    cu.updates.clear()
    latent, note = _node(comfy, "VaePackEncodeTiled").encode(img, core_vae, 128, "exact")
    assert latent["samples"].shape == (1, 4, 32, 32) and (latent["samples"] - z_ref).abs().max() < 1e-3
    assert note.startswith("exact: ") and "tiles" in note
    image, note = _node(comfy, "VaePackDecodeTiled").decode({"samples": z_ref, "batch_index": [0]}, core_vae, 128,
                                                            "exact")
    direct = core_vae.decode(z_ref)  # core VAEDecode on the same VAE: diffusers' network
    assert image.shape == (1, 256, 256, 3) and image.dtype == torch.float32
    assert (image - direct).abs().max() < 1e-4
    assert "4 tiles" in note and "x the untiled convolution FLOPs" in note
    assert cu.updates and cu.updates[-1][0] == cu.updates[-1][1]  # per-tile progress reached the end
    auto, note = _node(comfy, "VaePackDecodeTiled").decode({"samples": z_ref}, core_vae, 0, "exact")
    assert (auto - direct).abs().max() < 1e-4 and "untiled" in note


def test_interrupt_between_tiles(comfy):
    import comfy.model_management as mm
    import comfy.sd as csd

    vae, _ = _node(comfy, "VaePackLoader").load("mini-ldm.safetensors")
    mm.interrupt_requested = True
    with pytest.raises(mm.InterruptProcessingException):
        _node(comfy, "VaePackDecodeTiled").decode({"samples": torch.randn(1, 4, 24, 24)}, vae, 64, "exact")
    assert isinstance(vae, csd.VAE)


def test_encode_crops_like_core_vaeencode(comfy):
    vae, _ = _node(comfy, "VaePackLoader").load("mini-ldm.safetensors")
    latent, _ = _node(comfy, "VaePackEncodeTiled").encode(_photo(100), vae, 64, "fast")
    assert latent["samples"].shape == (1, 4, 12, 12)


def test_fp16_fix_node_makes_core_decode_finite_in_fp16(comfy):
    from vae_core.families.kl.fp16_fix import rescale_stream, stream_segments

    big = vae_core.load_vae(MINI_LDM)
    enc, dec = stream_segments(big.model)
    rescale_stream(enc, big.model.encoder.norm_out, [256.0] * len(enc))
    rescale_stream(dec, big.model.decoder.norm_out, [256.0] * len(dec))
    bridge = sys.modules["vae_pack_under_test.nodes.comfy_bridge"]
    pack_core = sys.modules["vae_pack_under_test.vae_core"]
    overflowing = bridge.to_comfy_vae(pack_core.vae_from_state_dict(big.model.state_dict()))
    img = _photo(64)
    overflowing.first_stage_model.half()
    overflowing.vae_dtype = torch.float16
    assert not torch.isfinite(overflowing.decode(overflowing.encode(img).half())).all()  # really overflows
    fixed, report = _node(comfy, "VaePackFp16Fix").apply(overflowing, True, "fp16")
    assert "fp16 fix: largest activation" in report and fixed.vae_dtype == torch.float16
    # the fix rescales GroupNorm eps with the weights: carried to the host's (diffusers-named) norms
    assert len({m.eps for m in fixed.first_stage_model.modules() if isinstance(m, torch.nn.GroupNorm)}) > 1
    y = fixed.decode(fixed.encode(img))
    assert torch.isfinite(y).all() and fixed.vae_dtype == torch.float16  # no retry was needed
    ref = vae_core.load_vae(MINI_LDM)
    y_ref = ((ref.decode(ref.encode(img.movedim(-1, 1) * 2 - 1)) + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert (y - y_ref).abs().max() < 0.02
    # without the fix the guard catches the overflow and retries in fp32
    guarded, _ = _node(comfy, "VaePackFp16Fix").apply(overflowing, False, "fp16")
    assert torch.isfinite(guarded.decode(guarded.encode(img))).all() and guarded.vae_dtype == torch.float32


def test_compare_node_round_trips_side_by_side_with_heat_map_and_metrics(comfy):
    import comfy.sd as csd
    from safetensors.torch import load_file

    from vae_core.lab import metrics

    ours, _ = _node(comfy, "VaePackLoader").load("mini-ldm.safetensors")
    bridge = sys.modules["vae_pack_under_test.nodes.comfy_bridge"]
    core_vae = csd.VAE(sd={k: v.float() for k, v in load_file(str(MINI_LDM)).items()},  # diffusers' network
                       config=bridge.comfy_config(vae_core.load_vae(MINI_LDM)))
    img = _photo(200)  # cropped to 200 (a multiple of 8) like VAE Encode
    x = img.movedim(-1, 1) * 2 - 1
    ref = vae_core.load_vae(MINI_LDM)
    y = ((ref.decode(ref.encode(x)) + 1) / 2).clamp(0, 1)
    pair, heat, text = _node(comfy, "VaePackCompare").compare(img, ours, core_vae, 64, "exact", "as loaded")
    assert pair.shape == heat.shape == (1, 200, 400, 3)
    assert (pair[:, :, :200] - y.movedim(1, -1)).abs().max() < 1e-4  # A: exact tiling = untiled round trip
    assert (pair[:, :, 200:] - y.movedim(1, -1)).abs().max() < 1e-4  # B: the same weights in core's VAE
    expected = metrics.heatmap(metrics.to_unit(x)[0], y[0].double(), 4.0).float().movedim(0, -1)
    assert (heat[0, :, :200] - expected).abs().max() < 1e-3 and heat.max() > 0.5  # |A - original| × 4
    psnr = metrics.psnr(metrics.to_unit(x), y.double())
    assert f"PSNR {psnr:.2f} dB" in text and text.count("tile 64 exact") == 2 and "A vs B: PSNR" in text
    _, _, text = _node(comfy, "VaePackCompare").compare(img[:, :64, :64], ours, ours, 0, "exact", "fp16")
    assert text.count("fp16, untiled") == 2 and "A vs B: PSNR inf dB, largest difference 0/255" in text
    pixel = csd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})  # one vae_core does not know: ComfyUI's own calls
    pair, _, text = _node(comfy, "VaePackCompare").compare(img[:, :64, :64], ours, pixel)
    assert "B ComfyUI's own encode/decode" in text and (pair[:, :, 64:] - img[:, :64, :64]).abs().max() < 1e-6


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_engine_runs_on_the_comfy_vae_own_tensors_through_model_management(comfy):
    import comfy.model_management as mm

    bridge = sys.modules["vae_pack_under_test.nodes.comfy_bridge"]
    vae, _ = _node(comfy, "VaePackLoader").load("mini-ldm.safetensors")
    host = _storages(vae.first_stage_model.parameters())
    seen = {}
    engine = bridge.engine_for(vae)
    with engine.attached() as attached:
        seen["ptrs"] = _storages(attached.model.parameters())
        seen["n"] = sum(1 for _ in attached.model.parameters())
    assert seen["n"] == sum(1 for _ in vae.first_stage_model.parameters())
    assert seen["ptrs"] == host  # every engine parameter is one of the VAE's own tensors: no second copy
    assert all(p.is_meta for p in engine.vae.model.parameters())  # emptied after the call: holds nothing alive
    mm.load_calls.clear()
    image, _ = _node(comfy, "VaePackDecodeTiled").decode({"samples": torch.randn(1, 4, 16, 16)}, vae, 64, "exact")
    assert image.shape == (1, 128, 128, 3)
    (patchers, need, full), = mm.load_calls
    assert patchers == [vae.patcher] and need > 0 and full  # loaded through ComfyUI's model management
    assert not any(isinstance(v, vae_core.Vae) for v in vars(vae).values())


def _taesd_state_dict(latent: int = 4) -> dict:
    from diffusers import AutoencoderTiny
    from diffusers_host import taesd_keys

    torch.manual_seed(0)
    return taesd_keys(AutoencoderTiny(latent_channels=latent).state_dict())


def test_tiled_nodes_fall_back_to_comfy_tiler_for_unknown_vae(comfy, caplog):
    import comfy.sd as csd

    pixel = csd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})  # a VAE vae_core does not know
    z = torch.rand(1, 3, 96, 96) * 2 - 1
    with caplog.at_level("WARNING"):
        image, note = _node(comfy, "VaePackDecodeTiled").decode({"samples": z}, pixel, 64, "exact")
    assert "not a VAE call the engine runs" in note and "ComfyUI's own tiled decode" in note
    assert sum("VAE Pack tiled decode" in r.getMessage() for r in caplog.records) == 1
    assert pixel.tiled_calls == [("decode", 64, 64, 16)]  # 64 px tiles at ratio 1, a quarter overlap
    assert image.shape == (1, 96, 96, 3)


def test_taesd_from_core_loader_runs_exact_halo_tiling(comfy):
    import comfy.sd as csd

    taesd = csd.VAE(sd=_taesd_state_dict())  # what core's VAELoader builds from a TAESD file
    z = torch.randn(1, 4, 24, 16)
    image, note = _node(comfy, "VaePackDecodeTiled").decode({"samples": z}, taesd, 64, "exact")
    assert "halo tiling" in note and taesd.tiled_calls == []  # our engine, not ComfyUI's tiler
    assert image.shape == (1, 192, 128, 3) and (image - taesd.decode(z)).abs().max() < 1e-4
    latent, note = _node(comfy, "VaePackEncodeTiled").encode(image, taesd, 64, "exact")
    assert "halo tiling" in note and (latent["samples"] - taesd.encode(image)).abs().max() < 1e-4


def _load_from_vae_approx(comfy, approx, name):
    """Load VAE lists ``<name>_decoder.pth`` in ``approx`` (as models/vae_approx) once, without its encoder twin,
    and loads it (picking the twin up)."""
    import folder_paths

    folder_paths.folder_names_and_paths["vae_approx"] = [str(approx)]
    try:
        choices = comfy.NODE_CLASS_MAPPINGS["VaePackLoader"].INPUT_TYPES()["required"]["vae_name"][0]
        assert f"vae_approx/{name}_decoder.pth" in choices and f"vae_approx/{name}_encoder.pth" not in choices
        return _node(comfy, "VaePackLoader").load(f"vae_approx/{name}_decoder.pth")
    finally:
        del folder_paths.folder_names_and_paths["vae_approx"]


def test_loader_lists_and_loads_taesd_from_vae_approx(comfy, tmp_path):
    import comfy.sd as csd
    from diffusers import AutoencoderTiny

    approx = tmp_path / "vae_approx"
    approx.mkdir()
    torch.manual_seed(0)
    tiny = AutoencoderTiny().eval()
    enc = {k[len("encoder.layers."):]: v for k, v in tiny.state_dict().items() if k.startswith("encoder.")}
    dec = {f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v for k, v in tiny.state_dict().items()
           if k.startswith("decoder.")}
    torch.save(enc, approx / "taesdxl_encoder.pth")
    torch.save(dec, approx / "taesdxl_decoder.pth")
    vae, info = _load_from_vae_approx(comfy, approx, "taesdxl")
    assert isinstance(vae, csd.VAE) and vae.tiny and "taesdxl" in info  # ComfyUI's own TAESD, SDXL scaling
    assert vae.vae_scale == pytest.approx(0.13025)
    x = _photo(64)
    with torch.no_grad():
        own = tiny.encode(x.movedim(-1, 1) * 2 - 1).latents
    assert (vae.encode(x) - own / 0.13025).abs().max() < 1e-4  # raw SDXL-VAE latents, as ComfyUI's TAESD gives


def test_taef2_from_vae_approx_runs_on_the_engine(comfy, tmp_path):
    """TAEF2's pool blocks are newer than v0.3.64's TAESD: Load VAE returns ComfyUI's VAE class running vae_core's
    network (TAEF2's own 32-channel latents), which core-style encode/decode and our tiled nodes use."""
    import comfy.sd as csd
    from test_family_taef2 import DEC_POOL, ENC_POOL, _pool_tensors
    from test_family_tiny import _original_halves, _tiny

    approx = tmp_path / "vae_approx"
    approx.mkdir()
    enc, dec = _original_halves(_tiny(32))
    torch.save(enc | _pool_tensors(ENC_POOL, 1), approx / "taef2_encoder.pth")
    torch.save(dec | _pool_tensors(DEC_POOL, 2), approx / "taef2_decoder.pth")
    vae, info = _load_from_vae_approx(comfy, approx, "taef2")
    assert isinstance(vae, csd.VAE) and vae.vae_pack_engine and "taef2" in info and "runs vae_core's network" in info
    ref = vae_core.load_vae(approx / "taef2_decoder.pth")
    x = _photo(128)
    z = vae.encode(x)  # what core VAE Encode does
    assert z.shape == (1, 32, 16, 16) and (z - ref.encode(x.movedim(-1, 1) * 2 - 1)).abs().max() < 1e-4
    direct = vae.decode(z)  # core VAE Decode
    image, note = _node(comfy, "VaePackDecodeTiled").decode({"samples": z}, vae, 64, "exact")
    assert "halo tiling" in note and (image - direct).abs().max() < 1e-4


def test_flux2_vae_runs_on_the_engine_with_normalised_latents(comfy, tmp_path):
    """ComfyUI v0.3.64 predates Flux.2: Load VAE returns a ComfyUI VAE object running vae_core's network with
    Flux.2's normalised 2×2-patchified latents (128 ch at 1/16), which core VAE Decode/Encode and our tiled nodes use."""
    import comfy.sd as csd
    import folder_paths
    from test_family_flux2 import _flux2

    reference = _flux2()
    reference.save_pretrained(tmp_path / "flux2")
    vae_dir = folder_paths.folder_names_and_paths["vae"][0]
    dest = __import__("pathlib").Path(vae_dir) / "flux2-ae.safetensors"
    vae_core.save_vae(vae_core.load_vae(tmp_path / "flux2"), dest, layout="ldm")
    try:
        vae, info = _node(comfy, "VaePackLoader").load("flux2-ae.safetensors")
    finally:
        dest.unlink()
    assert isinstance(vae, csd.VAE) and "flux2" in info and "runs vae_core's network" in info
    assert vae.latent_channels == 128 and vae.spacial_compression_decode() == 8  # the test VAE is f4 (× 2 patch)
    img = _photo(128)
    z = vae.encode(img)  # core VAEEncode's call
    with torch.no_grad():
        raw = reference.encode(img.movedim(-1, 1) * 2 - 1).latent_dist.mean
        mean = reference.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(reference.bn.running_var.view(1, -1, 1, 1) + reference.config.batch_norm_eps)
        expected = (torch.nn.functional.pixel_unshuffle(raw, 2) - mean) / std
        image_ref = ((reference.decode(raw).sample + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert z.shape == (1, 128, 16, 16) and (z - expected).abs().max() < 1e-4
    assert (vae.decode(z) - image_ref).abs().max() < 1e-4  # core VAEDecode's call
    image, note = _node(comfy, "VaePackDecodeTiled").decode({"samples": z}, vae, 64, "exact")
    assert (image - image_ref).abs().max() < 1e-4 and "tiles" in note
    latent, _ = _node(comfy, "VaePackEncodeTiled").encode(img, vae, 64, "exact")
    assert (latent["samples"] - expected).abs().max() < 1e-3


def test_qwen_image_vae_runs_on_the_engine(comfy, tmp_path):
    """Load VAE on a Qwen-Image VAE: v0.3.64's own Wan VAE assumes Wan's widths and video latents, so the VAE runs
    vae_core's network on raw 16-channel image latents; core VAE Decode and our tiled nodes take it."""
    import comfy.sd as csd
    import folder_paths
    from test_family_qwen import _qwen

    reference = _qwen()
    reference.save_pretrained(tmp_path / "qwen")
    dest = __import__("pathlib").Path(folder_paths.folder_names_and_paths["vae"][0]) / "qwen_image_vae.safetensors"
    vae_core.save_vae(vae_core.load_vae(tmp_path / "qwen"), dest)
    try:
        vae, info = _node(comfy, "VaePackLoader").load("qwen_image_vae.safetensors")
    finally:
        dest.unlink()
    assert isinstance(vae, csd.VAE) and "qwen-image" in info and "runs vae_core's network" in info
    img = _photo(128)
    with torch.no_grad():
        z_ref = reference.encode((img.movedim(-1, 1) * 2 - 1)[:, :, None]).latent_dist.mean[:, :, 0]
        y_ref = ((reference.decode(z_ref[:, :, None]).sample[:, :, 0] + 1) / 2).clamp(0, 1).movedim(1, -1)
    z = vae.encode(img)
    assert z.shape == (1, 16, 16, 16) and (z - z_ref).abs().max() < 1e-4
    assert (vae.decode(z) - y_ref).abs().max() < 1e-4
    image, note = _node(comfy, "VaePackDecodeTiled").decode({"samples": z}, vae, 64, "exact")
    assert "halo tiling, 4 tiles" in note and (image - y_ref).abs().max() < 1e-4  # the chain after the mid block


def test_hv15_video_vae_runs_on_the_engine_as_a_video_vae(comfy, tmp_path):
    """Load VAE on a HunyuanVideo 1.5 VAE (v0.3.64 predates it): a ComfyUI VAE object running vae_core's network with
    core's video conventions (5-D latents, IMAGE frames as one clip): core VAE Encode/Decode equal diffusers' network
    on the same weights, and our tiled nodes equal them, exact in space and time."""
    import comfy.sd as csd
    import folder_paths
    from test_family_hv15 import reference as hv15_reference

    reference = hv15_reference()
    reference.save_pretrained(tmp_path / "hv15")
    dest = __import__("pathlib").Path(folder_paths.folder_names_and_paths["vae"][0]) / "hunyuanvideo15_vae.safetensors"
    vae_core.save_vae(vae_core.load_vae(tmp_path / "hv15"), dest)
    try:
        vae, info = _node(comfy, "VaePackLoader").load("hunyuanvideo15_vae.safetensors")
    finally:
        dest.unlink()
    assert isinstance(vae, csd.VAE) and "hunyuanvideo1.5" in info and "runs vae_core's network" in info
    assert vae.latent_dim == 3 and vae.spacial_compression_decode() == 16
    frames = torch.stack([_photo(144)[0].roll(4 * i, dims=1) for i in range(5)])  # IMAGE: 5 frames, one clip
    with torch.no_grad():
        z_ref = reference.encode(frames.movedim(-1, 0)[None] * 2 - 1).latent_dist.mean
        y_ref = ((reference.decode(z_ref).sample[0] + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0)
    z = vae.encode(frames)  # core VAEEncode's call
    assert z.shape == (1, 4, 2, 9, 9) and (z - z_ref).abs().max() < 1e-4
    decoded = vae.decode(z)  # core VAEDecode's call: [B, F, H, W, C], which the node flattens to frames
    assert (decoded.reshape(-1, 144, 144, 3) - y_ref).abs().max() < 1e-4
    image, note = _node(comfy, "VaePackDecodeTiled").decode({"samples": z}, vae, 64, "exact")
    assert image.shape == (5, 144, 144, 3) and (image - y_ref).abs().max() < 1e-4 and "stream" in note, note
    latent, note = _node(comfy, "VaePackEncodeTiled").encode(frames, vae, 64, "exact")
    assert (latent["samples"] - z_ref).abs().max() < 1e-4 and "stream" in note, note


def test_auto_tile_is_planned_against_the_devices_total_memory(comfy, monkeypatch):
    """tile_size 0 (auto): when the untiled decode cannot fit even an empty device, the node tiles from the start and
    asks model management only for one tile's working set (asking for the whole image evicted the UNet and text
    encoders for nothing); when it fits, it asks for the untiled working set and runs untiled."""
    import comfy.model_management as mm

    from vae_core.tiling.memory import estimate_bytes

    vae, _ = _node(comfy, "VaePackLoader").load("mini-ldm.safetensors")
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(0))
    model = sys.modules["vae_pack_under_test.nodes.comfy_bridge"].engine_for(vae).vae.model
    untiled = estimate_bytes(model, 384 * 384, torch.float32)
    weights = mm.module_size(vae.first_stage_model)
    monkeypatch.setattr(mm, "total_memory", weights + untiled // 2)  # a card too small for the untiled call
    mm.load_calls.clear()
    image, note = _node(comfy, "VaePackDecodeTiled").decode({"samples": z}, vae, 0, "exact")
    (_, need, _), = mm.load_calls
    assert need < untiled // 2 and "tiles" in note and not note.startswith("exact: untiled"), (need, untiled, note)
    monkeypatch.setattr(mm, "total_memory", 64 * 2**30)
    mm.load_calls.clear()
    again, note = _node(comfy, "VaePackDecodeTiled").decode({"samples": z}, vae, 0, "exact")
    (_, need, _), = mm.load_calls
    assert need == untiled and note.startswith("exact: untiled") and (again - image).abs().max() < 1e-4


def test_comfy_guard_retries_from_the_loaded_weights(comfy, monkeypatch):
    """fp16 → bf16 → fp32 in the fp16-fix node's guard: the fp32 retry runs the fp16 weights as loaded, not
    bf16-rounded ones (bf16 simulated as native)."""
    monkeypatch.setattr("vae_pack_under_test.vae_core.precision.dtypes.bf16_supported", lambda device: True)
    vae, _ = _node(comfy, "VaePackLoader").load("mini-ldm.safetensors")
    guarded, _ = _node(comfy, "VaePackFp16Fix").apply(vae, False, "fp16")
    fsm = guarded.first_stage_model
    loaded = {k: v.clone() for k, v in fsm.state_dict().items()}
    real = fsm.decode
    seen = []

    def nan_below_fp32(z, *args, **kwargs):
        seen.append({k: v.clone() for k, v in fsm.state_dict().items()})
        out = real(z, *args, **kwargs)
        y = getattr(out, "sample", out)  # the stand-in's network is diffusers'
        if y.dtype != torch.float32:
            y.view(-1)[-1] = float("nan")
        return out

    fsm.decode = nan_below_fp32
    y = guarded.decode(torch.randn(1, 4, 8, 8))
    assert torch.isfinite(y).all() and guarded.vae_dtype == torch.float32 and len(seen) == 3
    assert all(torch.equal(seen[2][k], v.float()) for k, v in loaded.items())


def test_report_says_how_much_was_pinned(comfy):
    from vae_core.tiling import TileReport

    nodes = sys.modules["vae_pack_under_test.nodes.vae_nodes"]
    text = nodes.describe(TileReport(schedule="level-major", tiles=4, sweeps=22, cache_peak=300 * 2**20,
                                     pinned_peak=200 * 2**20), 512)
    assert "cache 300 MiB" in text and "200 MiB pinned host memory, handed back" in text
    assert "pinned" not in nodes.describe(TileReport(schedule="level-major", tiles=4, sweeps=22), 512)


@pytest.mark.parametrize("memory", ["large", "small"])
def test_wan_video_through_core_style_vae_runs_the_exact_streamed_engine(comfy, tmp_path, monkeypatch, memory):
    """A Wan 2.1 VAE as core builds it (original keys, video latents [B, C, T, h, w]): our tiled decode of a
    3-latent-frame clip gives core's 9 frames (IMAGE batch), our tiled encode of 9 frames core's latent clip,
    both within 1e-4, tiled in space and streamed in time (progress per tile and chunk). Planned against the
    device's total memory: level-major (the whole frame's causal states) where its working set fits, and model
    management asked for that; else tile-major, asking only for one tile's working set."""
    import comfy.model_management as mm
    import comfy.sd as csd
    from safetensors.torch import load_file
    from test_family_wan_video import _reference

    ref = _reference("2.1")
    path = tmp_path / "wan_2.1_vae.safetensors"
    vae_core.save_vae(vae_core.vae_from_state_dict(ref.state_dict()), path)
    cvae = csd.VAE(sd=load_file(str(path)))
    assert cvae.latent_dim == 3
    z = torch.randn(1, 16, 3, 10, 12, generator=torch.Generator().manual_seed(4))
    want = cvae.decode(z).reshape(-1, 80, 96, 3)
    model = sys.modules["vae_pack_under_test.nodes.comfy_bridge"].engine_for(cvae).vae.model
    family = sys.modules["vae_pack_under_test.nodes.comfy_bridge"].engine_for(cvae).vae.family
    level, tile = (family.video_working_set(model, "decode", 9, 80, 96, 64, torch.float32, s)["total"]
                   for s in ("level", "tile"))
    assert tile < level
    total = 64 * 2**30 if memory == "large" else mm.module_size(cvae.first_stage_model) + (tile + level) // 2
    monkeypatch.setattr(mm, "total_memory", total)
    mm.load_calls.clear()
    image, note = _node(comfy, "VaePackDecodeTiled").decode({"samples": z}, cvae, 64, "exact")
    (_, need, _), = mm.load_calls
    assert image.shape == (9, 80, 96, 3) and (image - want).abs().max() < 1e-4
    if memory == "large":
        assert need == level and "stream-levels tiling" in note, (need, level, note)
    else:
        assert need == tile and "stream tiling, 4 tiles" in note, (need, tile, note)
    frames = want[:5]  # IMAGE: 5 frames, one clip
    latent, note = _node(comfy, "VaePackEncodeTiled").encode(frames, cvae, 64, "exact")
    core = cvae.encode(frames)
    assert latent["samples"].shape == core.shape == (1, 16, 2, 10, 12)
    assert (latent["samples"] - core).abs().max() < 1e-4 and "stream" in note
    with pytest.raises(Exception, match="6 frames; expected 1 \\+ 4k") as err:  # the pack's own copy of vae_core
        _node(comfy, "VaePackEncodeTiled").encode(want[:6], cvae, 64, "exact")
    assert type(err.value).__name__ == "VaeInputError"
