"""Hostile inputs for the CLI, the image loader, the host listings and attention: every case checks the typed error
(or the correct result) AND that nothing was written or lost. All crafted files are built here under tmp_path."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import sys
import threading
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vae_core
from vae_core.cli import main as cli
from vae_core.io import images
from vae_core.errors import VaeInputError
from conftest import MINI_DIFFUSERS, MINI_LDM
from test_comfy_nodes import comfy  # noqa: F401  (module fixture: the pack loaded like ComfyUI does)


# -- helpers -------------------------------------------------------------------------------------------------------
def snapshot(folder) -> dict[str, bytes]:
    """Every file below ``folder`` (not following links) → its bytes."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def cli_run(capsys, *argv) -> tuple[int, str, str]:
    """Run ``python -m vae_core`` in process; (exit status, stdout, stderr). argparse rejections exit the same way."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_clean_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert err.startswith("error: ") or "\nerror: " in err, err
    assert "; expected " in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


def photo(path, size=64, mode="RGB"):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode).save(path)
    return path


@pytest.fixture
def work(tmp_path):
    """A folder with a photo, a latent, an fp32 VAE file and a diffusers folder."""
    photo(tmp_path / "photo.png")
    save_file({"latent": torch.randn(1, 4, 8, 8)}, str(tmp_path / "z.safetensors"), metadata={"family": "sd1"})
    shutil.copy(MINI_LDM, tmp_path / "vae.safetensors")
    shutil.copytree(MINI_DIFFUSERS, tmp_path / "dfolder")
    return tmp_path


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading a VAE or an image (checks must come first)."""
    def boom(*a, **k):
        raise AssertionError("the CLI did work before refusing")

    monkeypatch.setattr(cli, "load_vae", boom)
    monkeypatch.setattr(cli, "load_image", boom)
    monkeypatch.setattr(cli, "load_latent", boom)


# -- 1. outputs that are inputs --------------------------------------------------------------------------------------
def _same_file_cases(w):
    os.symlink(w / "vae.safetensors", w / "link.safetensors")
    os.link(w / "vae.safetensors", w / "hard.safetensors")
    os.symlink(w / "photo.png", w / "photo-link.png")
    return {
        "encode onto its image": ["encode", w / "photo.png", "-o", w / "photo.png", "--vae", w / "vae.safetensors"],
        "encode onto its image via symlink": ["encode", w / "photo.png", "-o", w / "photo-link.png",
                                              "--vae", w / "vae.safetensors"],
        "roundtrip onto its image": ["roundtrip", w / "photo.png", "-o", w / "photo.png",
                                     "--vae", w / "vae.safetensors"],
        "decode onto its latent": ["decode", w / "z.safetensors", "-o", w / "z.safetensors",
                                   "--vae", w / "vae.safetensors"],
        "encode onto --vae": ["encode", w / "photo.png", "-o", w / "vae.safetensors", "--vae", w / "vae.safetensors"],
        "encode onto --vae hardlink": ["encode", w / "photo.png", "-o", w / "hard.safetensors",
                                       "--vae", w / "vae.safetensors"],
        "decode onto --vae weights in folder": ["decode", w / "z.safetensors", "-o",
                                                w / "dfolder" / "diffusion_pytorch_model.safetensors",
                                                "--vae", w / "dfolder"],
        "convert X X": ["convert", w / "vae.safetensors", w / "vae.safetensors"],
        "convert via symlink": ["convert", w / "link.safetensors", w / "vae.safetensors"],
        "convert via hardlink": ["convert", w / "vae.safetensors", w / "hard.safetensors"],
        "convert folder folder": ["convert", w / "dfolder", w / "dfolder", "--layout", "diffusers"],
        "convert folder folder (ldm)": ["convert", w / "dfolder", w / "dfolder"],
        "convert folder onto its weights": ["convert", w / "dfolder",
                                            w / "dfolder" / "diffusion_pytorch_model.safetensors"],
        "convert file into folder holding it": ["convert", w / "dfolder" / "diffusion_pytorch_model.safetensors",
                                                w / "dfolder", "--layout", "diffusers"],
    }


CASES = ["encode onto its image", "encode onto its image via symlink", "roundtrip onto its image",
         "decode onto its latent", "encode onto --vae", "encode onto --vae hardlink",
         "decode onto --vae weights in folder", "convert X X", "convert via symlink", "convert via hardlink",
         "convert folder folder", "convert folder folder (ldm)", "convert folder onto its weights", "convert file into folder holding it"]


@pytest.mark.parametrize("case", CASES)
def test_refuses_to_write_over_an_input_before_any_work(work, capsys, no_load, case):
    argv = _same_file_cases(work)[case]
    before = snapshot(work)
    rc, _out, err = cli_run(capsys, *argv)
    assert_clean_error(rc, err, "is the input", "expected an output path that is not one of the inputs")
    assert snapshot(work) == before


def test_overwriting_another_existing_file_is_allowed(work, capsys):
    (work / "other.safetensors").write_bytes(b"old")
    (work / "other.safetensors").chmod(0o640)
    rc, out, err = cli_run(capsys, "encode", work / "photo.png", "-o", work / "other.safetensors",
                           "--vae", work / "vae.safetensors")
    assert rc == 0, err
    assert load_file(str(work / "other.safetensors"))["latent"].shape == (1, 4, 8, 8)
    assert stat.S_IMODE(os.stat(work / "other.safetensors").st_mode) == 0o640  # mode kept by the atomic write
    assert not [f for f in os.listdir(work) if ".tmp" in f]


# -- 2. convert keeps the stored dtype ------------------------------------------------------------------------------
def test_convert_keeps_fp32_by_default_and_casts_only_when_asked(tmp_path, capsys):
    src = tmp_path / "fp32.safetensors"
    vae_core.save_vae(vae_core.load_vae(MINI_LDM), src, dtype="fp32")
    before = src.read_bytes()
    rc, out, err = cli_run(capsys, "convert", src, tmp_path / "kept.safetensors")
    assert rc == 0, err
    kept = load_file(str(tmp_path / "kept.safetensors"))
    assert {v.dtype for v in kept.values()} == {torch.float32} and "fp32" in out
    ref = load_file(str(src))
    assert all(torch.equal(kept[k], ref[k]) for k in ref)  # no precision lost
    rc, out, err = cli_run(capsys, "convert", src, tmp_path / "half.safetensors", "--dtype", "fp16")
    assert rc == 0 and {v.dtype for v in load_file(str(tmp_path / "half.safetensors")).values()} == {torch.float16}
    assert src.read_bytes() == before


def test_convert_of_full_checkpoint_says_only_the_vae_is_written(tmp_path, capsys):
    ldm = load_file(str(MINI_LDM))
    ckpt = tmp_path / "full.safetensors"
    save_file({f"first_stage_model.{k}": v for k, v in ldm.items()} | {"model.diffusion_model.x": torch.zeros(1)},
              str(ckpt))
    rc, out, err = cli_run(capsys, "convert", ckpt, tmp_path / "vae-only.safetensors")
    assert rc == 0, err
    assert "only its VAE part" in out and "first_stage_model." in out
    assert set(load_file(str(tmp_path / "vae-only.safetensors"))) == set(ldm)


# -- 3. atomic writes -------------------------------------------------------------------------------------------------
def _disk_full_after_some_bytes(path):
    with open(path, "wb") as fh:
        fh.write(b"half a file")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_on_latent_write_leaves_nothing(work, capsys, monkeypatch):
    import safetensors.torch

    (work / "out.safetensors").write_bytes(b"previous result")
    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda t, path, metadata=None: _disk_full_after_some_bytes(path))
    before = snapshot(work)
    rc, _out, err = cli_run(capsys, "encode", work / "photo.png", "-o", work / "out.safetensors",
                            "--vae", work / "vae.safetensors")
    assert_clean_error(rc, err, str(work / "out.safetensors"), "No space left on device",
                       "expected enough free disk space")
    assert snapshot(work) == before  # old output intact, no temp file


def test_disk_full_on_image_write_leaves_nothing(work, capsys, monkeypatch):
    monkeypatch.setattr(Image.Image, "save", lambda self, fp, format=None, **kw: _disk_full_after_some_bytes(fp))
    before = snapshot(work)
    rc, _out, err = cli_run(capsys, "decode", work / "z.safetensors", "-o", work / "y.png",
                            "--vae", work / "vae.safetensors")
    assert_clean_error(rc, err, str(work / "y.png"), "expected enough free disk space")
    assert snapshot(work) == before


def test_atomic_write_keeps_mode_and_removes_temp_on_failure(tmp_path):
    from vae_core.io.paths import atomic_write, same_file

    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    target.chmod(0o600)
    atomic_write(target, lambda p: p.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    with pytest.raises(RuntimeError):
        atomic_write(target, lambda p: (p.write_bytes(b"partial"), (_ for _ in ()).throw(RuntimeError("x"))))
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]
    os.symlink(target, tmp_path / "l")
    assert same_file(target, tmp_path / "l") and not same_file(target, tmp_path / "missing")


# -- 4. errors that are not errors ----------------------------------------------------------------------------------
def _bomb(w):
    Image.new("RGB", (64, 64)).save(w / "big.png")
    return ["encode", w / "big.png", "-o", w / "o.safetensors", "--vae", w / "vae.safetensors"]


ERRORS = {
    "unknown family": (lambda w: ["encode", w / "photo.png", "-o", w / "o.safetensors", "--family", "sd9"],
                       ["'sd9'", "unknown family", "sd1"]),
    "unknown family convert": (lambda w: ["convert", w / "vae.safetensors", w / "o.safetensors", "--family", "x"],
                               ["'x'", "unknown family"]),
    "output is a folder": (lambda w: ["encode", w / "photo.png", "-o", w / "dfolder", "--vae", w / "vae.safetensors"],
                           ["is a folder"]),
    "parent is a file": (lambda w: ["decode", w / "z.safetensors", "-o", w / "photo.png" / "y.png",
                                    "--vae", w / "vae.safetensors"], ["is a file"]),
    "unknown image extension": (lambda w: ["decode", w / "z.safetensors", "-o", w / "y.xyz",
                                           "--vae", w / "vae.safetensors"], ["'.xyz'", "e.g. .png"]),
    "roundtrip unknown extension": (lambda w: ["roundtrip", w / "photo.png", "-o", w / "y.notanimage",
                                               "--vae", w / "vae.safetensors"], ["'.notanimage'"]),
    "latent not safetensors": (lambda w: ["encode", w / "photo.png", "-o", w / "z.npy",
                                          "--vae", w / "vae.safetensors"], ["'.npy'", "'.safetensors'"]),
    "missing input image": (lambda w: ["encode", w / "nope.png", "-o", w / "o.safetensors",
                                       "--vae", w / "vae.safetensors"], ["nope.png", "no such file"]),
    "missing latent": (lambda w: ["decode", w / "nope.safetensors", "-o", w / "o.png",
                                  "--vae", w / "vae.safetensors"], ["nope.safetensors"]),
    "missing vae": (lambda w: ["encode", w / "photo.png", "-o", w / "o.safetensors", "--vae", w / "nope.sft"],
                    ["nope.sft"]),
    "tile below 64": (lambda w: ["encode", w / "photo.png", "-o", w / "o.safetensors", "--tile", "10"],
                      ["'10'", "'auto'"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_failures_are_one_error_line_with_exit_2(work, capsys, case):
    make, needles = ERRORS[case]
    argv = make(work)
    before = snapshot(work)
    rc, _out, err = cli_run(capsys, *argv)
    assert_clean_error(rc, err, *needles)
    assert snapshot(work) == before


def test_extension_checked_before_any_work(work, capsys, no_load):
    rc, _out, err = cli_run(capsys, "decode", work / "z.safetensors", "-o", work / "y.xyz", "--vae",
                            work / "vae.safetensors")
    assert_clean_error(rc, err, "'.xyz'")


def test_unreadable_image_and_decompression_bomb(work, capsys, monkeypatch):
    (work / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    before = snapshot(work)
    rc, _out, err = cli_run(capsys, "encode", work / "garbage.png", "-o", work / "o.safetensors", "--vae",
                            work / "vae.safetensors")
    assert_clean_error(rc, err, "garbage.png", "not a readable image")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 px: over the limit, and over 2x it
    rc, _out, err = cli_run(capsys, *_bomb(work))
    assert_clean_error(rc, err, "big.png", "decompression-bomb limit")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # over the limit, under 2x it: PIL only warns
    with pytest.raises(VaeInputError, match="decompression-bomb"):
        images.load_image(work / "big.png")
    assert snapshot(work) == before | {"big.png": (work / "big.png").read_bytes()}


def test_verbose_keeps_the_traceback(work, capsys):
    rc, _out, err = cli_run(capsys, "-v", "encode", work / "nope.png", "-o", work / "o.safetensors",
                            "--vae", work / "vae.safetensors")
    assert rc == 2 and "Traceback" in err and "error: " in err


# -- 5. batch decode and family mismatch -----------------------------------------------------------------------------
def test_decode_batch_writes_every_image_and_warns_on_family_mismatch(tmp_path, capsys):
    z = torch.randn(3, 4, 8, 8)
    save_file({"latent": z}, str(tmp_path / "zb.safetensors"), metadata={"family": "sdxl"})
    rc, out, err = cli_run(capsys, "decode", tmp_path / "zb.safetensors", "-o", tmp_path / "out.png")
    assert rc == 0, err
    names = [tmp_path / f"out-{i}.png" for i in range(3)]
    assert all(str(n) in out for n in names) and not (tmp_path / "out.png").exists()
    vae = vae_core.load_vae(MINI_LDM)
    ref = vae.decode(z)
    for i, n in enumerate(names):
        got = torch.from_numpy(np.asarray(Image.open(n), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
        assert (got - ref[i].clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-4, i  # image i is latent i
    assert "warning:" in err and "'sdxl'" in err and "'sd1'" in err


# -- 6. load_image: silently wrong images ---------------------------------------------------------------------------
def _expect(t: torch.Tensor, grey: np.ndarray) -> None:
    """``t`` [1,3,H,W] equals the greyscale map ``grey`` (in [-1, 1]) on all three channels."""
    assert t.shape == (1, 3, *grey.shape) and t.dtype == torch.float32
    for c in range(3):
        assert np.abs(t[0, c].numpy() - grey).max() < 1e-5


def test_16_bit_greyscale_is_scaled_not_white(tmp_path):
    a = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    _expect(images.load_image(tmp_path / "g16.png"), a / 32767.5 - 1)
    Image.frombytes("I;16B", (16, 16), a.astype(">u2").tobytes()).save(tmp_path / "g16b.tif")
    assert Image.open(tmp_path / "g16b.tif").mode == "I;16B"
    _expect(images.load_image(tmp_path / "g16b.tif"), a / 32767.5 - 1)
    Image.fromarray(a.astype(np.int32)).save(tmp_path / "gi.tif")
    assert Image.open(tmp_path / "gi.tif").mode == "I"
    _expect(images.load_image(tmp_path / "gi.tif"), a / 32767.5 - 1)
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "too-big.tif")
    with pytest.raises(VaeInputError, match=r"\[70000, 70000\].*\[0, 65535\]"):
        images.load_image(tmp_path / "too-big.tif")


def test_float_tiff_maps_0_1_and_refuses_other_ranges(tmp_path):
    a = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(a).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    _expect(images.load_image(tmp_path / "f.tif"), a * 2 - 1)
    Image.fromarray(a * 255).save(tmp_path / "f255.tif")
    with pytest.raises(VaeInputError, match=r"\[0, 255\].*expected values in \[0, 1\]"):
        images.load_image(tmp_path / "f255.tif")


@pytest.mark.parametrize("mode", ["P", "CMYK", "LA", "RGBA", "1", "L"])
def test_other_modes_match_pils_rgb_conversion(tmp_path, mode):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    im = rgb.convert(mode)
    if mode in ("RGBA", "LA"):
        im.putalpha(Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)))
    ext = "tif" if mode == "CMYK" else "png"
    im.save(tmp_path / f"x.{ext}")
    stored = Image.open(tmp_path / f"x.{ext}")
    want = np.asarray(stored.convert("RGB"), dtype=np.float32) / 127.5 - 1  # alpha dropped, colours as stored
    got = images.load_image(tmp_path / f"x.{ext}")
    assert got.shape == (1, 3, 16, 16)
    assert np.abs(got[0].permute(1, 2, 0).numpy() - want).max() < 1e-6


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10] = 255  # white stripe on the left of a landscape image
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90° CW to display"
    im.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    t = images.load_image(tmp_path / "portrait.jpg")
    assert t.shape == (1, 3, 40, 20)  # upright portrait
    assert t[0, :, :8].mean() > 0.8 and t[0, :, 12:].mean() < -0.8  # the stripe is now on top


def test_animated_image_uses_first_frame_and_logs(tmp_path, caplog):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    with caplog.at_level(logging.WARNING, logger="vae_core.io.images"):
        t = images.load_image(tmp_path / "anim.gif")
    assert t[0, 0].mean() > 0.9 and t[0, 2].mean() < -0.9  # red, the first frame
    assert "2 frames" in caplog.text and "first frame" in caplog.text


# -- 7. encode refuses 0..255 pixels -----------------------------------------------------------------------------------
def test_encode_refuses_0_255_pixels_but_accepts_overshoot(mini_vae):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with pytest.raises(VaeInputError, match=r"\[0, 255\].*expected images in \[-1, 1\]") as err:
        mini_vae.encode(torch.cat([torch.zeros(1, 3, 16, 8), torch.full((1, 3, 16, 8), 255.0)], dim=3))
    assert "255" in str(err.value)
    with pytest.raises(VaeInputError, match=r"\[-3, -1\]"):
        mini_vae.encode(torch.cat([torch.full((1, 3, 16, 8), -3.0), torch.full((1, 3, 16, 8), -1.0)], dim=3))
    overshoot = x * 1.05  # bicubic/Lanczos overshoot past [-1, 1] is legitimate
    assert mini_vae.encode(overshoot).shape == (1, 4, 2, 2)


# -- 8. host listings with symlink loops ------------------------------------------------------------------------------
def _loopy_models(tmp_path):
    vae_dir = tmp_path / "models" / "vae"
    (vae_dir / "sub").mkdir(parents=True)
    (vae_dir / "b").mkdir()
    shutil.copy(MINI_LDM, vae_dir / "mini-ldm.safetensors")
    (vae_dir / "b" / "x.bin").write_bytes(b"not loaded by listing")
    shutil.copytree(MINI_DIFFUSERS, vae_dir / "sub" / "mini-diffusers")
    os.symlink("..", vae_dir / "sub" / "a")  # sub/a -> vae: a loop back to the base
    os.symlink("../b", vae_dir / "b" / "c")  # b/c -> b: a loop onto itself
    os.symlink("..", vae_dir / "a")  # a -> models: leaves the base, then loops back into it
    return vae_dir


def _bounded(fn, seconds=60):
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("v", fn()), daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), "listing did not return: symlink loop not detected"
    return result["v"]


def test_walker_visits_each_real_folder_once_and_is_bounded(tmp_path):
    from vae_core.io.walk import walk_model_dirs

    vae_dir = _loopy_models(tmp_path)
    seen = _bounded(lambda: [(p, sorted(f)) for p, _d, f in walk_model_dirs(vae_dir)])
    real = [os.path.realpath(p) for p, _ in seen]
    assert len(real) == len(set(real))
    files = sorted(os.path.realpath(p / f) for p, fs in seen for f in fs)
    assert len(files) == len(set(files)) and str(vae_dir / "mini-ldm.safetensors") in files
    shallow = [p for p, _d, _f in walk_model_dirs(vae_dir, max_depth=0)]
    assert shallow == [vae_dir]
    assert sum(len(f) + len(d) for _p, d, f in walk_model_dirs(vae_dir, max_entries=3)) <= 3


def test_comfy_list_survives_symlink_loops(comfy, tmp_path, monkeypatch):  # noqa: F811
    import folder_paths

    vae_dir = _loopy_models(tmp_path)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "vae", [str(vae_dir)])
    nodes = sys.modules["vae_pack_under_test.nodes.vae_nodes"]
    names = _bounded(nodes.list_vaes)
    assert names == sorted(["b/x.bin", "mini-ldm.safetensors", "sub/mini-diffusers"]), names


def test_a1111_list_survives_symlink_loops(tmp_path):
    from webui_extension.vae_list import extra_entries

    vae_dir = _loopy_models(tmp_path)
    sd_vae = types.SimpleNamespace(vae_path=str(vae_dir),
                                   shared=types.SimpleNamespace(cmd_opts=types.SimpleNamespace(vae_dir=None)))
    entries = _bounded(lambda: extra_entries(sd_vae))
    assert [name for name, _ in entries] == ["x.bin", "mini-diffusers"], entries
    assert os.path.samefile(dict(entries)["x.bin"], vae_dir / "b" / "x.bin")


# -- 9. attention hook and cost log ----------------------------------------------------------------------------------
def test_attention_hook_called_per_chunk_and_can_stop_it(caplog, monkeypatch):
    from vae_core.families import layers as model

    q, k, v = (torch.randn(1, 64, 8) for _ in range(3))
    ref = model.attention(q, k, v, chunk_bytes=16 * 64 * 4)  # 16 queries per chunk: 4 chunks
    calls = []
    token = model.ATTENTION_HOOK.set(lambda done, total: calls.append((done, total)))
    try:
        out = model.attention(q, k, v, chunk_bytes=16 * 64 * 4)
    finally:
        model.ATTENTION_HOOK.reset(token)
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)] and torch.equal(out, ref)
    assert torch.allclose(ref, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-6)

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        calls.append(done)
        if done == 2:
            raise Cancelled

    calls.clear()
    token = model.ATTENTION_HOOK.set(cancel)
    try:
        with pytest.raises(Cancelled):
            model.attention(q, k, v, chunk_bytes=16 * 64 * 4)
    finally:
        model.ATTENTION_HOOK.reset(token)
    assert calls == [1, 2]  # stopped: chunks 3 and 4 never ran
    monkeypatch.setattr(model, "ATTENTION_LOG_FLOPS", 1e3)
    with caplog.at_level(logging.INFO, logger="vae_core.families.layers"):
        model.attention(q, k, v)
    assert "N=64" in caplog.text and "FLOPs" in caplog.text  # 4 * 64 * 64 * 8 = 131072


# -- 10. --tile 0 means auto ----------------------------------------------------------------------------------------
def test_tile_zero_means_auto_like_the_hosts():
    parse = cli.build_parser().parse_args
    assert parse(["encode", "x.png", "-o", "z.safetensors", "--tile", "0"]).tile == "auto"
    assert parse(["encode", "x.png", "-o", "z.safetensors", "--tile", "auto"]).tile == "auto"
    assert parse(["encode", "x.png", "-o", "z.safetensors", "--tile", "none"]).tile is None
    assert parse(["encode", "x.png", "-o", "z.safetensors", "--tile", "128"]).tile == 128


# -- 11. missing bundled fixtures -------------------------------------------------------------------------------------
def test_missing_bundled_vae_says_what_to_pass(work, capsys, monkeypatch):
    missing = work / "not-installed" / "mini-vae-ldm.safetensors"
    monkeypatch.setattr(images, "bundled_fixture", lambda name="mini-vae-ldm.safetensors": missing.with_name(name))
    before = snapshot(work)
    rc, _out, err = cli_run(capsys, "encode", work / "photo.png", "-o", work / "o.safetensors")
    assert rc == 2
    assert err.strip() == (f"error: no --vae given and the bundled test VAE {missing} is not installed (registry "
                           "installs leave tests/ out); expected --vae PATH")
    rc, _out, err = cli_run(capsys, "roundtrip", "--vae", work / "vae.safetensors", "-o", work / "rt.png")
    assert_clean_error(rc, err, "bundled sample photo", "expected an IMG argument")
    assert snapshot(work) == before
