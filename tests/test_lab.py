"""The VAE lab (``python -m vae_core eval``): on the bundled fixture, every combination asked for with its
references, metrics consistent with an independent computation, aggregates, honest dtype reporting when the NaN
guard falls back, outputs written atomically, and clear errors."""
from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
import torch

import vae_core
from vae_core.cli.main import main
from vae_core.io.images import load_image
from vae_core.lab.run import find_images, make_settings, prepare_image
from conftest import MINI_LDM, SAMPLE



def _skimage_metrics():
    """scikit-image's metrics, the independent reference (only the tests that compare with it skip without it)."""
    return pytest.importorskip("skimage.metrics")


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab") / "report"
    # fp16 runs ~60x slower than fp32 on an AVX2 CPU (no native half kernels), so half precision gets the cheap
    # modes here and `fast` (whose proxy run is the slowest in fp16) is measured in fp32 by its own fixture
    code = main(["eval", str(SAMPLE), "--vae", str(MINI_LDM), "--dtype", "fp32", "fp16-fix", "--tile", "none", "128",
                 "--mode", "exact", "diffusers", "--size", "288", "-o", str(out)])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def fast_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab") / "fast"
    code = main(["eval", str(SAMPLE), "--vae", str(MINI_LDM), "--tile", "128", "--mode", "fast", "--size", "288",
                 "-o", str(out)])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_every_combination_and_its_references(report):
    out, data = report
    labels = {s["label"]: s for s in data["settings"]}
    asked = {s for s, v in labels.items() if v["requested"]}
    # fp32 × {untiled, 128 exact/diffusers} + fp16-fix × {untiled, 128 exact}; diffusers × fp16-fix left out
    assert len(asked) == 5 and not any("fp16-fix · tile 128 diffusers" in s for s in labels)
    assert any("diffusers" in n and "fp16-fix" in n for n in data["notes"])
    assert {r["setting"] for r in data["runs"]} == set(labels) and len(data["runs"]) == len(labels)
    assert len(data["summary"]) == 5 and all(row["images"] == 1 for row in data["summary"])
    for kind in ("report.html", "results.csv", "summary.csv"):
        assert (out / kind).stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_metrics_match_a_direct_round_trip(report):
    skm = _skimage_metrics()
    _, data = report
    x = prepare_image(load_image(SAMPLE), 288, 8)  # fast differs above its 256² proxy
    vae = vae_core.load_vae(MINI_LDM)
    y = vae.decode(vae.encode(x))
    a = ((x.double() + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    b = ((y.double() + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    run = next(r for r in data["runs"] if r["setting"] == "mini-vae-ldm · fp32 · untiled")
    assert run["psnr"] == pytest.approx(skm.peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-6)
    assert run["ssim"] == pytest.approx(skm.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=1.0, channel_axis=2), abs=1e-6)
    assert 10 < run["psnr"] < 30 and run["ms_ssim"] is not None and run["seconds"] > 0
    assert run["ran_as"] == "fp32" and run["tiles"] == 0


def test_tilers_and_dtypes_against_their_references(report, fast_report):
    _, data = report
    runs = {r["setting"]: r for r in data["runs"]}
    exact = runs["mini-vae-ldm · fp32 · tile 128 exact"]
    fast = next(r for r in fast_report[1]["runs"] if r["setting"] == "mini-vae-ldm · fp32 · tile 128 fast")
    peer = runs["mini-vae-ldm · fp32 · tile 128 diffusers"]
    assert exact["tiles"] > 1 and float(exact["psnr_vs_untiled"]) > 100 and exact["max_diff_255"]["untiled"] <= 1
    assert float(fast["psnr_vs_untiled"]) < 60 and fast["max_diff_255"]["untiled"] > 1  # fast is approximate
    assert float(peer["psnr_vs_untiled"]) < 60 and peer["psnr_vs_fp32"] is None
    half = runs["mini-vae-ldm · fp16-fix · untiled"]
    assert half["ran_as"] == "fp16" and 40 < float(half["psnr_vs_fp32"]) < 120 and half["psnr_vs_untiled"] is None
    tiled_half = runs["mini-vae-ldm · fp16-fix · tile 128 exact"]
    assert tiled_half["psnr_vs_fp32"] is not None and tiled_half["psnr_vs_untiled"] is not None


def test_csv_and_summary_agree_with_json(report):
    out, data = report
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(data["runs"])
    by = {(r["dtype"], r["tile"], r["mode"]): r for r in rows}
    j = next(r for r in data["runs"] if r["setting"] == "mini-vae-ldm · fp32 · tile 128 diffusers")
    assert float(by[("fp32", "128", "diffusers")]["psnr"]) == pytest.approx(j["psnr"])
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert len(summary) == 5 and all(s["images"] == "1" for s in summary)


def test_html_is_self_contained_with_crops_and_heat_maps(report):
    out, data = report
    html = (out / "report.html").read_text()
    assert "<svg" in html and html.count("<svg") >= 5  # a chart per metric
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", html)  # nothing fetched from elsewhere
    images = re.findall(r'src="data:image/png;base64,', html)
    # original + per requested setting: crop and heat map vs original; + a crop and a thumbnail per reference
    refs = sum(1 for s in data["settings"] if s["requested"] and s["tile"]) + \
        sum(1 for s in data["settings"] if s["requested"] and s["dtype"] != "fp32")
    assert len(images) == 1 + 2 * 5 + 2 * refs
    assert "mean ± std" in html and "VAE lab report" in html


def test_aggregate_over_a_folder_is_mean_and_std(tmp_path, capsys):
    from PIL import Image

    photos = tmp_path / "photos" / "sub"
    photos.mkdir(parents=True)
    full = Image.open(SAMPLE).convert("RGB")
    for i, box in enumerate([(0, 0, 192, 176), (200, 100, 350, 250), (300, 300, 500, 500)]):
        full.crop(box).save(photos / f"crop{i}.png")
    (photos / "notes.txt").write_text("not an image")
    out = tmp_path / "rep"
    code, stdout, _ = _run(["eval", str(tmp_path / "photos"), "-o", str(out)], capsys)
    assert code == 0 and "no --vae given" in stdout and "| mini-vae-ldm · fp32 · untiled | fp32 |" in stdout
    data = json.loads((out / "results.json").read_text())
    assert [im["name"] for im in data["images"]] == ["crop0.png", "crop1.png", "crop2.png"]
    assert [(im["width"], im["height"]) for im in data["images"]] == [(192, 176), (144, 144), (200, 200)]
    vals = [r["psnr"] for r in data["runs"]]
    (row,) = data["summary"]
    assert row["psnr"]["mean"] == pytest.approx(np.mean(vals)) and row["psnr"]["std"] == pytest.approx(np.std(vals))
    assert row["psnr"]["std"] > 0 and row["images"] == 3
    assert row["ms_ssim"]["n"] == 2 and "(2 of 3 images)" in stdout  # 144 px is too small for MS-SSIM


def _overflowing_vae(path):
    """The fixture VAE with its residual stream scaled ×256: same fp32 outputs, fp16 overflows."""
    from vae_core.families.kl.fp16_fix import rescale_stream, stream_segments

    big = vae_core.load_vae(MINI_LDM)
    enc, dec = stream_segments(big.model)
    rescale_stream(enc, big.model.encoder.norm_out, [256.0] * len(enc))
    rescale_stream(dec, big.model.decoder.norm_out, [256.0] * len(dec))
    vae_core.save_vae(big, path)
    return path


def test_an_fp16_row_that_fell_back_says_so(tmp_path, capsys):
    vae = _overflowing_vae(tmp_path / "overflow.safetensors")
    out = tmp_path / "rep"
    code, stdout, _ = _run(["eval", str(SAMPLE), "--vae", str(vae), "--dtype", "fp16", "fp16-fix", "--size", "64",
                            "-o", str(out)], capsys)
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    runs = {r["setting"]: r for r in data["runs"]}
    plain, fixed = runs["overflow · fp16 · untiled"], runs["overflow · fp16-fix · untiled"]
    assert "fp32" in plain["ran_as"]  # the guard re-ran it: reported, not passed off as fp16
    assert fixed["ran_as"] == "fp16" and 30 < float(fixed["psnr_vs_fp32"]) < 120
    assert "class=warn" in (out / "report.html").read_text()


def test_two_vaes_compared(tmp_path, capsys):
    other = tmp_path / "other"
    vae_core.save_vae(vae_core.load_vae(MINI_LDM), other, layout="diffusers")
    out = tmp_path / "rep"
    code, stdout, _ = _run(["eval", str(SAMPLE), "--vae", str(MINI_LDM), "--vae", str(other), "--size", "64", "-o",
                            str(out)], capsys)
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    a, b = (next(r for r in data["runs"] if r["setting"].startswith(n)) for n in ("mini-vae-ldm ·", "other ·"))
    assert a["psnr"] == pytest.approx(b["psnr"], abs=1e-4)  # the same weights in two layouts


def _cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv,message", [
    (["eval", "nope.png"], "nope.png: no such file or folder"),
    (["eval", "--tile", "32"], "'32': not a tile size"),
    (["eval", "--size", "4"], "expected an integer from 8 to 16384"),
    (["eval", "--size", "1000000"], "expected an integer from 8 to 16384"),
    (["eval", "--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["eval", "--device", "foo"], "--device 'foo': not a device"),
    (["eval", "--device", "meta"], "device type 'meta'; expected one of cpu, cuda"),
    (["eval", "--lpips-weights", "x.pth"], "--lpips-weights x.pth"),
] + ([(["eval", "--device", "cuda"], "sees 0 cuda device(s); expected 'cpu'")] if not torch.cuda.is_available() else []))
def test_bad_arguments_are_one_clear_line(argv, message, capsys, tmp_path):
    code, _, err = _cli(argv + ["-o", str(tmp_path / "r")], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and message in last and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_inputs_and_outputs_are_checked_before_any_work(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _cli(["eval", str(empty), "-o", str(tmp_path / "r")], capsys)
    assert code == 2 and "a folder with no images" in err
    (tmp_path / "file").write_text("x")
    code, _, err = _cli(["eval", "-o", str(tmp_path / "file")], capsys)
    assert code == 2 and "is an existing file; expected a folder" in err
    inside = tmp_path / "rep"
    inside.mkdir()
    clash = inside / "results.csv"
    clash.write_bytes(SAMPLE.read_bytes())
    code, _, err = _cli(["eval", str(clash), "-o", str(inside)], capsys)
    assert code == 2 and "is the input" in err and clash.read_bytes() == SAMPLE.read_bytes()
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(SAMPLE.read_bytes())
    (photos / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, _, err = _cli(["eval", str(photos), "-o", str(tmp_path / "n1" / "n2" / "r2")], capsys)
    assert code == 2 and "zz-broken.png: not a readable image" in err
    assert "[#" not in err and not (tmp_path / "n1").exists()  # found before the first run, no folder left behind
    code, _, err = _cli(["eval", "-o", "/proc/vae-lab-report"], capsys)  # a folder nobody can create
    assert code == 2 and err.startswith("error: /proc/vae-lab-report:") and "[#" not in err


def test_combinations_a_vae_cannot_run_are_left_out_with_a_note(tmp_path, capsys):
    from test_family_tiny import _tiny

    tiny = tmp_path / "taesd"
    _tiny().save_pretrained(tiny)
    out = tmp_path / "t"
    code, stdout, _ = _cli(["eval", "--vae", str(tiny), "--dtype", "fp32", "fp16-fix", "--tile", "none", "64",
                            "--mode", "exact", "diffusers", "--size", "64", "-o", str(out)], capsys)
    assert code == 0
    assert "note: taesd · fp16-fix: not run" in stdout and "note: taesd · diffusers tiling: not run" in stdout
    data = json.loads((out / "results.json").read_text())
    assert [s["label"] for s in data["settings"]] == ["taesd · fp32 · untiled", "taesd · fp32 · tile 64 exact"]
    code, _, err = _cli(["eval", "--vae", str(tiny), "--dtype", "fp16-fix", "-o", str(tmp_path / "none")], capsys)
    assert code == 2 and "error: nothing to run: every combination asked for was left out" in err
    assert not (tmp_path / "none").exists()


def test_a_nan_peer_row_is_reported_not_fatal(tmp_path, capsys):
    vae = _overflowing_vae(tmp_path / "overflow.safetensors")
    out = tmp_path / "rep"
    code, _, err = _cli(["eval", str(SAMPLE), "--vae", str(vae), "--dtype", "fp16", "--tile", "64", "--mode",
                         "diffusers", "--size", "96", "-o", str(out)], capsys)
    assert code == 0, err
    data = json.loads((out / "results.json").read_text())  # strict JSON: allow_nan=False when written
    peer = next(r for r in data["runs"] if r["setting"] == "overflow · fp16 · tile 64 diffusers")
    assert peer["psnr"] == "nan" and peer["max_diff_255"]["untiled"] is None  # diffusers has no NaN guard
    ours = next(r for r in data["runs"] if r["setting"] == "overflow · fp16 · untiled")
    assert math.isfinite(ours["psnr"]) and "fp32" in ours["ran_as"]  # ours: guarded, and says so
    assert "NaN metrics" in err and "(not finite)" in (out / "report.html").read_text()


def test_identical_images_do_not_turn_a_summary_into_inf(tmp_path, capsys):
    from PIL import Image

    full = Image.open(SAMPLE).convert("RGB")
    full.crop((0, 0, 64, 64)).save(tmp_path / "a-one-tile.png")  # one 64-px tile: identical to untiled
    full.crop((100, 100, 260, 196)).save(tmp_path / "b-many-tiles.png")
    out = tmp_path / "rep"
    code, stdout, _ = _cli(["eval", str(tmp_path / "a-one-tile.png"), str(tmp_path / "b-many-tiles.png"), "--tile",
                            "64", "-o", str(out)], capsys)
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    runs = [r for r in data["runs"] if r["setting"].endswith("tile 64 exact")]
    assert runs[0]["psnr_vs_untiled"] == "inf" and math.isfinite(runs[1]["psnr_vs_untiled"])
    row = next(r for r in data["summary"] if r["setting"].endswith("tile 64 exact"))["psnr_vs_untiled"]
    assert row["mean"] == pytest.approx(runs[1]["psnr_vs_untiled"]) and row["identical"] == 1 and row["n"] == 2
    ms = next(r for r in data["summary"] if r["setting"].endswith("tile 64 exact"))["ms_ssim"]
    assert ms is None  # both images are under MS-SSIM's 161 px: no value rather than a partial mean
    assert "(+1 identical)" in stdout


def test_a_bf16_retry_leaves_the_fp16_weights_as_they_were(tmp_path, monkeypatch):
    """On GPUs with bf16 the guard retries fp16 in bf16; fp16 → bf16 → fp16 would round the weights. The guard keeps
    them aside and the round trip puts them back (bf16 support is simulated here: bf16 runs on this CPU)."""
    import vae_core.lab.run as lab
    import vae_core.lab.measure as lm
    import vae_core.precision.dtypes as prec

    monkeypatch.setattr(prec, "bf16_supported", lambda device: True)
    monkeypatch.setattr(lab, "bf16_supported", lambda device: True)
    vae = vae_core.load_vae(_overflowing_vae(tmp_path / "o.safetensors")).to("fp16")
    before = {k: v.clone() for k, v in vae.model.state_dict().items()}
    x = prepare_image(load_image(SAMPLE), 64, 8)
    y, ran = lm.roundtrip(vae, x, None)
    assert "bf16" in ran and torch.isfinite(y).all() and vae.dtype == torch.float16
    assert all(torch.equal(before[k], v) for k, v in vae.model.state_dict().items())
    assert vae.guard.working_dtype is None  # what the guard remembered before is back
    from vae_core.lab.run import run_lab

    (tmp_path / "x.png").write_bytes(SAMPLE.read_bytes())
    result = run_lab([tmp_path / "x.png"] * 2, {"o": vae_core.load_vae(tmp_path / "o.safetensors")}, ["fp16"],
                     [None], ["exact"], size=64)
    runs = [r for r in result.runs if r.setting.dtype == "fp16"]
    assert ["bf16" in r.ran_as for r in runs] == [True, True]  # the second image saw the same fp16 weights
    assert runs[0].values["psnr"] == runs[1].values["psnr"]


def test_compare_pair_means_per_image_values():
    from vae_core.lab import metrics
    from vae_core.lab.run import compare_pair

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    a = x + torch.tensor([0.01, 0.2]).view(2, 1, 1, 1) * torch.randn(x.shape, generator=g)
    _, heat, text = compare_pair(x, a, x.clone(), ("a", "b"), (0.1, 0.2))
    per = [metrics.psnr(metrics.to_unit(x[i:i + 1]), metrics.to_unit(a[i:i + 1])) for i in range(2)]
    assert f"A a: PSNR {sum(per) / 2:.2f} dB" in text and "B b: PSNR inf dB" in text
    assert heat.shape == (2, 3, 32, 64) and float(heat[..., 32:].max()) < 0.02  # B identical: black


def test_settings_and_inputs_helpers(tmp_path):
    needed, requested, notes = make_settings(["v"], ["fp16"], [256], ["fast"])
    assert [s.label for s in needed] == ["v · fp32 · untiled", "v · fp16 · untiled", "v · fp32 · tile 256 fast",
                                         "v · fp16 · tile 256 fast"]
    assert [s.label for s in requested] == ["v · fp16 · tile 256 fast"] and not notes
    x = torch.zeros(1, 3, 300, 500)
    assert prepare_image(x, 256, 8).shape == (1, 3, 256, 256)
    assert prepare_image(x, None, 16).shape == (1, 3, 288, 496)
    with pytest.raises(vae_core.VaeInputError, match="at least 8 px"):
        prepare_image(torch.zeros(1, 3, 5, 40), None, 8)
    (tmp_path / "a.PNG").write_bytes(SAMPLE.read_bytes())
    assert find_images([tmp_path]) == [tmp_path / "a.PNG"]
    assert math.isfinite(float(load_image(tmp_path / "a.PNG").mean()))


def test_roundtrip_names_the_dtype_it_ran():
    from vae_core.lab.run import roundtrip

    vae = vae_core.load_vae(MINI_LDM).to("bf16")
    y, ran = roundtrip(vae, torch.zeros(1, 3, 16, 16), None)
    assert ran == "bf16" and y.dtype == torch.float32 and vae.dtype == torch.bfloat16


def test_images_too_small_for_ssim_get_none_not_an_error(tmp_path):
    from PIL import Image

    from vae_core.lab.run import run_lab

    Image.new("RGB", (9, 300), (200, 30, 90)).save(tmp_path / "thin.png")
    result = run_lab([tmp_path / "thin.png"], {"v": vae_core.load_vae(MINI_LDM)}, ["fp32"], [None], ["exact"])
    (run,) = result.runs
    assert result.images[0]["width"] == 8 and run.values["ssim"] is None and run.values["ms_ssim"] is None
    assert math.isfinite(run.values["psnr"])
