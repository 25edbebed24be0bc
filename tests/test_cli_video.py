"""`python -m vae_core encode/decode/roundtrip` on videos: folders of numbered frames and video files (PyAV), the
latent clip with its frame rate, and bad input named before any work (gaps, mixed sizes, frame counts, variable
frame rate, a missing PyAV, an image output for a video)."""
from __future__ import annotations

import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vae_core
from vae_core.cli.main import main
from vae_core.io.images import save_image
from vae_core.io.video import load_video


@pytest.fixture(scope="module")
def wan_file(tmp_path_factory):
    from test_family_wan_video import _reference

    path = tmp_path_factory.mktemp("wan-cli") / "wan_2.1_vae.safetensors"
    vae_core.save_vae(vae_core.vae_from_state_dict(_reference("2.1").state_dict()), path)
    return path


def _frames(folder, n: int, h: int = 32, w: int = 48, start: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(n)
    base = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    for i in range(n):
        save_image((base.roll(2 * i, dims=3) * 0.9), folder / f"frame_{start + i:03d}.png")
    return folder


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_frame_folder_encode_decode_roundtrip(tmp_path, wan_file, capsys):
    """A 5-frame folder → a [1, 16, 2, 4, 6] latent clip (fps in its metadata) → 5 PNG frames equal to the Python
    API's decode (8-bit rounding); roundtrip prints per-frame PSNR."""
    src = _frames(tmp_path / "in", 5)
    code, text = _run(capsys, "encode", src, "--vae", wan_file, "-o", tmp_path / "clip.safetensors", "--tile", 64)
    assert code == 0, text
    z = load_file(str(tmp_path / "clip.safetensors"))["latent"]
    vae = vae_core.load_vae(wan_file)
    x, fps = load_video(src)
    assert fps is None and x.shape == (1, 3, 5, 32, 48)
    assert z.shape == (1, 16, 2, 4, 6) and (z - vae.encode(x)).abs().max() < 1e-4
    code, text = _run(capsys, "decode", tmp_path / "clip.safetensors", "--vae", wan_file, "-o", tmp_path / "out")
    assert code == 0 and "5 frames of 48x32" in text, text
    got, _ = load_video(tmp_path / "out")
    want = ((vae.decode(z).clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    assert got.shape == want.shape and (got - want).abs().max() < 1.5 / 127.5
    code, text = _run(capsys, "roundtrip", src, "--vae", wan_file, "-o", tmp_path / "rt")
    assert code == 0 and "PSNR per frame: min" in text and len(list((tmp_path / "rt").iterdir())) == 5, text


def test_video_file_in_and_out(tmp_path, wan_file, capsys):
    av = pytest.importorskip("av")
    src = _frames(tmp_path / "in", 5)
    code, text = _run(capsys, "roundtrip", src, "--vae", wan_file, "-o", tmp_path / "rt.mp4", "--fps", 24)
    assert code == 0, text
    with av.open(str(tmp_path / "rt.mp4")) as box:
        stream = box.streams.video[0]
        assert stream.average_rate == 24 and stream.width == 48 and stream.height == 32
    clip, fps = load_video(tmp_path / "rt.mp4")
    assert clip.shape == (1, 3, 5, 32, 48) and fps == 24.0
    code, text = _run(capsys, "encode", tmp_path / "rt.mp4", "--vae", wan_file, "-o", tmp_path / "z.safetensors")
    assert code == 0 and vae_core.io.images.latent_metadata(tmp_path / "z.safetensors")["fps"] == "24.0", text


def _vfr(path):
    import av

    with av.open(str(path), "w", format="mp4") as box:
        stream = box.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 24)
        for i, pts in enumerate([0, 1, 2, 5, 6]):  # a pause: variable frame rate
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 40 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 24)
            box.mux(stream.encode(frame))
        box.mux(stream.encode(None))


def test_bad_video_input_is_named_before_any_work(tmp_path, wan_file, capsys, monkeypatch):
    gap = _frames(tmp_path / "gap", 5)
    (gap / "frame_002.png").unlink()
    mixed = _frames(tmp_path / "mixed", 5)
    _frames(tmp_path / "other", 1, h=40)
    (tmp_path / "other" / "frame_000.png").replace(mixed / "frame_003.png")
    six = _frames(tmp_path / "six", 6)
    cases = [(gap, "frames 0..4 with 1 missing \\(first: 2\\)"), (mixed, "frame_003.png: frame of 48x40 px; expected "
             "48x32"), (six, "6 frames; expected 1 \\+ 4k")]
    try:
        import av  # noqa: F401
    except ImportError:  # the rest runs without PyAV
        av = None
    if av is not None:
        _vfr(tmp_path / "vfr.mp4")
        cases.append((tmp_path / "vfr.mp4", "variable frame rate"))
    for src, message in cases:
        code, text = _run(capsys, "encode", src, "--vae", wan_file, "-o", tmp_path / "z.safetensors")
        assert code != 0 and __import__("re").search(message, text), (src, text)
        assert not (tmp_path / "z.safetensors").exists()
    ok = _frames(tmp_path / "ok", 5)
    code, text = _run(capsys, "encode", ok, "--vae", wan_file, "-o", tmp_path / "z.safetensors")
    assert code == 0, text
    code, text = _run(capsys, "decode", tmp_path / "z.safetensors", "--vae", wan_file, "-o", tmp_path / "z.png")
    assert code != 0 and "a video needs a video output" in text and not (tmp_path / "z.png").exists()
    code, text = _run(capsys, "decode", tmp_path / "z.safetensors", "--vae", wan_file, "-o", tmp_path / "ok")
    assert code != 0 and "existing folder with files in it" in text  # the input frames are not overwritten
    assert len(list((tmp_path / "ok").iterdir())) == 5
    monkeypatch.setitem(sys.modules, "av", None)  # as without PyAV
    code, text = _run(capsys, "decode", tmp_path / "z.safetensors", "--vae", wan_file, "-o", tmp_path / "v.mp4")
    assert code != 0 and "pip install av" in text and not (tmp_path / "v.mp4").exists(), text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files or folders left
