"""Video in the benchmark and the lab: `python -m vae_core bench --frames N` (untiled streamed reference, our two
exact schedules, diffusers' AutoencoderKLWan untiled and tiled, with the temporal seam and FLOPs) and
`python -m vae_core eval` on clips (video files, frame folders with --clips; per-frame metrics, the worst frame,
the temporal seam of tiled runs; image VAEs frame by frame), with bad input named before any work."""
from __future__ import annotations

import json
import re

import pytest
import torch

import vae_core
from vae_core.cli.main import main
from vae_core.io.video import load_video, save_video
from vae_core.lab import metrics
from conftest import MINI_LDM


@pytest.fixture(scope="module")
def wan_file(tmp_path_factory):
    from test_family_wan_video import _reference

    path = tmp_path_factory.mktemp("wan-lab") / "wan_2.1_vae.safetensors"
    vae_core.save_vae(vae_core.vae_from_state_dict(_reference("2.1").state_dict()), path)
    return path


def _clip(frames: int = 5, h: int = 96, w: int = 128) -> torch.Tensor:
    """A clip panning across random texture, [1, 3, F, H, W] in [-1, 1]."""
    g = torch.Generator().manual_seed(3)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, h // 4, w // 4 + frames, generator=g) * 2 - 1,
                                           size=(h, w + 4 * frames), mode="bilinear", align_corners=False)
    return torch.stack([base[0, :, :, 4 * i:4 * i + w] for i in range(frames)], 1)[None]


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def _table(text: str, first: str) -> dict[str, list[str]]:
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith(f"| {first}")]
    return {r[2] if first in ("decode", "encode") else r[0]: r for r in rows}


def test_bench_frames_table_with_peers_seam_and_flops(wan_file, capsys):
    """Every implementation of a video decode in one run: ours equal to the untiled reference (≥ 100 dB on the worst
    frame, no seam beyond 8-bit rounding) in both schedules, level-major cheaper than tile-major, diffusers' tiling
    inexact with a visible seam (the figure can tell them apart)."""
    code, text = _run(capsys, "bench", "--vae", wan_file, "--frames", "5", "--size", "128x96", "--tile", "64",
                      "--op", "decode")
    assert code == 0, text
    rows = _table(text, "decode")
    assert set(rows) == {"untiled (streamed reference)", "vae_core exact, level-major", "vae_core exact, tile-major",
                         "diffusers untiled", "diffusers tiled"}, rows
    db = {k: float(re.match(r"(inf|[\d.]+) dB", r[6]).group(1)) for k, r in rows.items() if "dB" in r[6]}
    seam = {k: float(r[7]) for k, r in rows.items() if r[7] not in ("-", "")}
    flops = {k: float(r[8].rstrip("×")) for k, r in rows.items() if r[8] != "-"}
    for ours in ("vae_core exact, level-major", "vae_core exact, tile-major"):
        assert db[ours] >= 100 and seam[ours] <= 1, (ours, rows[ours])
    assert db["diffusers untiled"] >= 100  # the same weights in diffusers' network: float rounding
    assert db["diffusers tiled"] < 60 and seam["diffusers tiled"] > 8, rows["diffusers tiled"]
    assert 1.0 < flops["vae_core exact, level-major"] < flops["vae_core exact, tile-major"], flops
    assert flops["untiled (streamed reference)"] == 1.0 and "5 frames" in text


def test_bench_frames_refuses_what_it_cannot_run(wan_file, capsys):
    code, text = _run(capsys, "bench", "--vae", MINI_LDM, "--frames", "5")
    assert code != 0 and "takes images only" in text and "expected a video VAE" in text, text
    code, text = _run(capsys, "bench", "--vae", wan_file, "--frames", "6")
    assert code != 0 and "--frames 6: expected 1 + 4k frames" in text, text
    code, text = _run(capsys, "bench", "--vae", wan_file, "--frames", "5", "--size", "60x48")
    assert code != 0 and "multiples of 8" in text, text
    code, text = _run(capsys, "bench", "--vae", MINI_LDM, "--size", "64x48")
    assert code != 0 and "runs squares" in text, text
    code, text = _run(capsys, "bench", "--vae", MINI_LDM, "--tile", "32")
    assert code != 0 and "--tile 32: below the minimum of 64" in text, text


@pytest.fixture(scope="module")
def clip_report(wan_file, tmp_path_factory):
    """One clip (an .mp4 when PyAV is there, else a frame folder) through the Wan VAE and the kl-f8 test VAE,
    untiled and tiled (ours and diffusers')."""
    base = tmp_path_factory.mktemp("clip-lab")
    x = _clip()
    try:
        import av  # noqa: F401
        src = save_video(x, base / "pan.mp4", fps=16)
        extra: list[str] = []
    except ImportError:
        src = save_video(x, base / "pan")
        extra = ["--clips"]
    out = base / "report"
    code = main(["eval", str(src), "--vae", str(wan_file), "--vae", str(MINI_LDM), "--tile", "none", "64", "--mode",
                 "exact", "diffusers", "-o", str(out), *extra])
    assert code == 0
    return src, out, json.loads((out / "results.json").read_text())


def test_clip_metrics_are_per_frame_with_the_worst_frame_and_the_seam(clip_report):
    src, out, data = clip_report
    (im,) = data["images"]
    assert im["frames"] == 5 and (im["width"], im["height"]) == (128, 96) and 0 <= im["frame_shown"] < 5
    runs = {r["setting"]: r for r in data["runs"]}
    x, _ = load_video(src)
    vae = vae_core.load_vae(next(p for p in data["vaes"].values() if "wan" in p))
    with torch.no_grad():
        y = vae.decode(vae.encode(x))
    per = [metrics.psnr(metrics.to_unit(x[:, :, i]), metrics.to_unit(y[:, :, i])) for i in range(5)]
    wan = runs["wan_2.1_vae · fp32 · untiled"]
    assert wan["psnr"] == pytest.approx(sum(per) / 5, abs=1e-4) and wan["psnr_min_frame"] == pytest.approx(min(per),
                                                                                                            abs=1e-4)
    assert wan["seam_vs_untiled"] is None and wan["tiles"] == 0
    ours = runs["wan_2.1_vae · fp32 · tile 64 exact"]
    assert ours["tiles"] > 1 and float(ours["psnr_vs_untiled"]) > 100 and ours["seam_vs_untiled"] <= 1
    peer = runs["wan_2.1_vae · fp32 · tile 64 diffusers"]  # AutoencoderKLWan.enable_tiling on the same weights
    assert float(peer["psnr_vs_untiled"]) < 60 and peer["seam_vs_untiled"] > 8
    kl = runs["mini-vae-ldm · fp32 · untiled"]  # an image VAE: frame by frame
    y2 = torch.stack([vae_core.load_vae(MINI_LDM).decode(vae_core.load_vae(MINI_LDM).encode(x[:, :, i]))
                      for i in range(5)], 2)
    per2 = [metrics.psnr(metrics.to_unit(x[:, :, i]), metrics.to_unit(y2[:, :, i])) for i in range(5)]
    assert kl["psnr"] == pytest.approx(sum(per2) / 5, abs=1e-4) and kl["ran_as"] == "fp32"
    assert runs["mini-vae-ldm · fp32 · tile 64 exact"]["seam_vs_untiled"] <= 1
    html = (out / "report.html").read_text()
    assert "5 frames (pictures: frame" in html and "temporal seam vs untiled" in html
    assert "seam_vs_untiled" in (out / "results.csv").read_text().splitlines()[0]


def test_clips_a_video_vae_cannot_take_are_named_before_any_work(wan_file, tmp_path, capsys):
    six = save_video(_clip(6), tmp_path / "six")
    out = tmp_path / "report"
    code, text = _run(capsys, "eval", six, "--clips", "--vae", wan_file, "-o", out)
    assert code != 0 and f"{six}: wan_2.1_vae: encode input: 6 frames; expected 1 + 4k" in text, text
    assert not out.exists()
    code, text = _run(capsys, "eval", tmp_path / "six", "--vae", MINI_LDM, "-o", out)  # without --clips: images
    assert code == 0, text
    assert "6 image(s)" in text and '"frames"' not in (out / "results.json").read_text()
