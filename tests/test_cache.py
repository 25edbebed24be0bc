"""`python -m vae_core cache`: latent caching on CPU — one process and a 2-process torchrun (gloo) give the same
shards, index and manifest bit for bit; a run with one rank SIGKILLed mid-shard, then resumed, equals the
uninterrupted run; a re-run is a no-op; a changed dtype or tile re-encodes only the items it affects; the kohya and
musubi exports read back with the right names, keys and shapes; bad inputs land in the manifest with their reason
(and --strict stops at the first); --verify finds a corrupted shard."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load, load_file

import vae_core
from vae_core.cli.main import main
from conftest import MINI_LDM, ROOT

#: small buckets (target area 96², sides 64..256 in steps of 64) keep every encode at most 64×128 px
BUCKETS = ["--resolution", "96", "--bucket-min-side", "64", "--bucket-max-side", "256", "--shard-size", "4"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """40 photo crops of mixed sizes in two sub-folders, and four bad files."""
    from PIL import Image

    base = tmp_path_factory.mktemp("cache-data") / "photos"
    photo = Image.open(ROOT / "tests" / "fixtures" / "sample.png").convert("RGB")
    rng = np.random.default_rng(0)
    for i in range(40):
        w, h = int(rng.integers(64, 200)), int(rng.integers(64, 200))
        x, y = int(rng.integers(0, 512 - w)), int(rng.integers(0, 512 - h))
        sub = base / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        photo.crop((x, y, x + w, y + h)).save(sub / f"img{i:02d}.png")
    bad = base / "bad"
    bad.mkdir()
    good = (base / "a" / "img01.png").read_bytes()
    (bad / "truncated.png").write_bytes(good[: len(good) // 3])
    (bad / "not-an-image.jpg").write_text("hello")
    photo.crop((0, 0, 40, 40)).save(bad / "tiny.png")  # below the smallest bucket side (64)
    Image.new("1", (20000, 20000)).save(bad / "bomb.png")  # 400 Mpx: over twice PIL's decompression-bomb limit
    return base


def _cache(*argv: object, env: dict | None = None, procs: int = 1) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (one thread: results equal across process counts), or under torchrun."""
    runner = [sys.executable, "-m", "vae_core"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "vae_core"]
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([*runner, "cache", *map(str, argv), "--quiet"], capture_output=True, text=True, env=e,
                          timeout=600)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith(".")}


def _counts(done: subprocess.CompletedProcess) -> dict[str, int]:
    import re

    totals = {"encoded": 0, "reused": 0}
    for line in done.stdout.splitlines():
        for k in totals:
            m = re.search(rf"(\d+) {k}", line)
            if m and line.startswith("rank"):
                totals[k] += int(m.group(1))
    return totals


@pytest.fixture(scope="module")
def single(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "one"
    done = _cache(dataset, "--vae", MINI_LDM, "-o", out, *BUCKETS)
    assert done.returncode == 0, done.stderr
    return out


def test_two_processes_equal_one_bit_for_bit(dataset, single, tmp_path):
    out = tmp_path / "two"
    done = _cache(dataset, "--vae", MINI_LDM, "-o", out, *BUCKETS, procs=2)
    assert done.returncode == 0, done.stderr
    assert "rank 0/2" in done.stdout and "rank 1/2" in done.stdout
    assert _files(out) == _files(single)
    manifest = json.loads((single / "manifest.json").read_text())
    assert manifest["items"] == 44 and manifest["ok"] == 40 and len(manifest["shards"]) == 11


def test_manifest_records_provenance_and_bad_inputs(single):
    m = json.loads((single / "manifest.json").read_text())
    s = m["settings"]
    assert len(s["vae"]["sha256"]) == 64 and s["vae"]["family"] == "sd1" and s["vae"]["scaling_factor"] == 0.18215
    assert s["latents"] == "raw" and s["posterior"] == "mean" and s["dtype"] == "fp32" and s["tile"] is None
    assert s["buckets"]["resolution"] == 96 and s["flip"] is False
    reasons = {f["name"]: f["reason"] for f in m["failures"]}
    assert set(reasons) == {"photos/bad/truncated.png", "photos/bad/not-an-image.jpg", "photos/bad/tiny.png",
                            "photos/bad/bomb.png"}
    assert "below the smallest bucket side 64" in reasons["photos/bad/tiny.png"]
    assert "decompression" in reasons["photos/bad/bomb.png"].lower()
    assert "not a readable image" in reasons["photos/bad/not-an-image.jpg"]
    assert "photos/bad/truncated.png" in reasons["photos/bad/truncated.png"]


def test_latents_equal_a_direct_encode_of_the_recorded_crop(dataset, single):
    """An item read back: its latents are the VAE's mean of the bucketed crop its record names."""
    from vae_core.caching.buckets import BucketSpec, fit
    from vae_core.io.images import load_image

    index = [json.loads(line) for line in (single / "shard-000003.jsonl").read_text().splitlines()]
    e = next(e for e in index if e["status"] == "ok")
    with tarfile.open(single / "shard-000003.tar") as tar:
        z = load(tar.extractfile(e["key"] + ".safetensors").read())["latents"]
    x = load_image(dataset.parent / e["name"])
    assert [x.shape[-1], x.shape[-2]] == e["original_size"]
    px, crop = fit(x, tuple(e["bucket"]), BucketSpec(96, 64, 256, 64), e["key"])
    assert list(crop) == e["crop_ltrb"] and list(z.shape) == e["latent_shape"] == [4, e["bucket"][1] // 8,
                                                                                     e["bucket"][0] // 8]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the cache ran
    try:
        want = vae_core.load_vae(MINI_LDM).encode(px)[0]
    finally:
        torch.set_num_threads(threads)
    assert (z - want).abs().max() < 1e-5


def test_killed_rank_then_resume_equals_the_uninterrupted_run(dataset, single, tmp_path):
    out = tmp_path / "killed"
    done = _cache(dataset, "--vae", MINI_LDM, "-o", out, *BUCKETS, procs=2,
                  env={"VAE_PACK_TEST_KILL_AFTER": "1:6"})  # rank 1 dies mid-way through its second shard
    assert done.returncode != 0 and not (out / "manifest.json").exists()
    assert 0 < len(list(out.glob("shard-*.jsonl"))) < 11  # some shards done, the one in flight lost
    (out / ".shard-000003.1a2b3c4d.tmp.tar").write_bytes(b"half a shard")  # what a kill during a write leaves
    again = _cache(dataset, "--vae", MINI_LDM, "-o", out, *BUCKETS, procs=2)
    assert again.returncode == 0, again.stderr
    assert _files(out) == _files(single)  # no duplicate, no missing item: the same bytes
    assert not any(p.name.startswith(".") for p in out.iterdir())
    counts = _counts(again)
    assert 0 < counts["encoded"] < 40  # only what the killed run had not finished


def test_rerun_is_a_no_op_and_changes_reencode_only_what_they_affect(dataset, single, tmp_path):
    import shutil

    out = tmp_path / "work"
    shutil.copytree(single, out)
    before = _files(out)
    same = _cache(dataset, "--vae", MINI_LDM, "-o", out, *BUCKETS)
    assert same.returncode == 0 and _counts(same) == {"encoded": 0, "reused": 0} and "11 already done" in same.stdout
    assert _files(out) == before
    tiled = _cache(dataset, "--vae", MINI_LDM, "-o", out, *BUCKETS, "--tile", "64")
    m = json.loads((out / "manifest.json").read_text())
    squares = sum(1 for s in range(11) for line in (out / f"shard-{s:06d}.jsonl").read_text().splitlines()
                  if json.loads(line).get("bucket") == [64, 64])
    assert squares > 0 and _counts(tiled) == {"encoded": 40 - squares, "reused": squares}  # 64² items: untiled
    assert m["settings"]["tile"] == 64 and m["ok"] == 40
    stored = _cache(dataset, "--vae", MINI_LDM, "-o", out, *BUCKETS, "--tile", "64", "--store-dtype", "fp16")
    assert _counts(stored) == {"encoded": 40, "reused": 0}
    assert _cache("-o", out, "--verify").returncode == 0


def test_verify_finds_a_corrupted_shard(single, tmp_path):
    import shutil

    out = tmp_path / "corrupt"
    shutil.copytree(single, out)
    tar = out / "shard-000002.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    done = _cache("-o", out, "--verify")
    assert done.returncode == 1 and "shard-000002.tar: sha256 differs" in done.stdout


def test_strict_stops_at_the_first_bad_item(dataset, tmp_path, capsys):
    code = main(["cache", str(dataset / "bad"), "--vae", str(MINI_LDM), "-o", str(tmp_path / "s"), *BUCKETS,
                 "--strict", "--quiet"])
    assert code == 2 and "--strict: stopped at the first bad item" in capsys.readouterr().err


def test_kohya_export_reads_back_with_its_names_and_keys(single, dataset, tmp_path):
    out = tmp_path / "kohya"
    assert main(["cache-export", str(single), "--to", "kohya", "-o", str(out)]) == 0
    m = json.loads((single / "manifest.json").read_text())
    files = sorted(out.rglob("*.npz"))
    assert len(files) == m["ok"] == 40
    f = out / "a" / "img01.npz"
    index = [json.loads(line) for s in range(11) for line in (single / f"shard-{s:06d}.jsonl").read_text().splitlines()]
    e = next(e for e in index if e["name"] == "photos/a/img01.png")
    bw, bh = e["bucket"]
    f = out / "a" / f"img01_{bw:04d}x{bh:04d}_sd.npz"
    npz = np.load(f)
    assert set(npz.files) == {"latents", "original_size", "crop_ltrb"}
    assert npz["latents"].dtype == np.float32 and npz["latents"].shape == (4, bh // 8, bw // 8)
    assert npz["original_size"].tolist() == e["original_size"] and npz["crop_ltrb"].tolist() == e["crop_ltrb"]


def test_flip_sample_and_musubi_export_of_a_video_vae_cache(tmp_path):
    """A Wan VAE cache of images and a video, scaled latents, seeded samples and flips; the musubi export: one
    safetensors per item, ``latents_{F}x{h}x{w}_float32`` of [C, F, h, w], its metadata."""
    from test_family_wan_video import _reference
    from vae_core.io.images import save_image
    from vae_core.io.video import save_video

    vae_file = tmp_path / "wan_2.1_vae.safetensors"
    vae_core.save_vae(vae_core.vae_from_state_dict(_reference("2.1").state_dict()), vae_file)
    data = tmp_path / "clips"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        save_image(torch.rand(1, 3, 64, 96, generator=g) * 2 - 1, data / f"still{i}.png")
    save_video(torch.rand(1, 3, 7, 64, 96, generator=g) * 2 - 1, data / "clip.mp4", fps=16)
    out = tmp_path / "cache"
    args = [data, "--vae", vae_file, "-o", out, "--latents", "scaled", "--posterior", "sample", "--seed", "3",
            "--flip", "--no-buckets"]
    done = _cache(*args)
    assert done.returncode == 0, done.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["ok"] == 3 and m["settings"]["posterior"] == "sample" and m["settings"]["latents"] == "scaled"
    index = [json.loads(line) for line in (out / "shard-000000.jsonl").read_text().splitlines()]
    clip = next(e for e in index if e["name"] == "clips/clip.mp4")
    assert clip["frames"] == 5 and clip["latent_shape"] == [16, 2, 8, 12]  # 7 frames trimmed to 1 + 4k
    with tarfile.open(out / "shard-000000.tar") as tar:
        t = load(tar.extractfile(clip["key"] + ".safetensors").read())
    assert set(t) == {"latents", "latents_flipped"} and not torch.equal(t["latents"], t["latents_flipped"])
    again = tmp_path / "again"
    assert _cache(*[a if a != out else again for a in args]).returncode == 0
    assert (again / "shard-000000.tar").read_bytes() == (out / "shard-000000.tar").read_bytes()  # seeded
    export = tmp_path / "musubi"
    assert main(["cache-export", str(out), "--to", "musubi", "-o", str(export)]) == 0
    f = export / "clip_0096x0064_wan.safetensors"
    z = load_file(str(f))
    assert list(z) == ["latents_2x8x12_float32"] and z["latents_2x8x12_float32"].shape == (16, 2, 8, 12)
    from safetensors import safe_open

    with safe_open(str(f), "pt") as fh:
        meta = fh.metadata()
    assert meta == {"architecture": "wan", "width": "96", "height": "64", "format_version": "1.0.1",
                    "frame_count": "5"}
    assert sorted(p.name for p in export.iterdir()) == ["clip_0096x0064_wan.safetensors",
                                                        "still0_0096x0064_wan.safetensors",
                                                        "still1_0096x0064_wan.safetensors"]
    code = main(["cache-export", str(out), "--to", "kohya", "-o", str(tmp_path / "k")])
    assert code == 2  # kohya has no Wan architecture


def test_nan_latents_after_the_guard_are_recorded_not_zeroed(dataset, tmp_path):
    from vae_core.families.kl.fp16_fix import rescale_stream, stream_segments

    vae = vae_core.load_vae(MINI_LDM)
    enc, _ = stream_segments(vae.model)
    rescale_stream(enc, vae.model.encoder.norm_out, [2.0 ** 120] * len(enc))  # overflows even float32
    path = tmp_path / "overflowing.safetensors"
    vae_core.save_vae(vae, path)
    done = _cache(dataset / "b", "--vae", path, "-o", tmp_path / "nan", *BUCKETS)
    assert done.returncode == 0, done.stderr
    m = json.loads((tmp_path / "nan" / "manifest.json").read_text())
    assert m["ok"] == 0 and m["failed"] == 20 and all("NaN" in f["reason"] for f in m["failures"])


def test_cache_bench_times_one_and_two_processes_in_one_run(dataset):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "vae_core", "cache-bench", str(dataset / "a"), "--vae", str(MINI_LDM),
                           "--procs", "1", "2", "--cache-args", " ".join(BUCKETS)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| 1 ") or
            line.startswith("| 2 ")]
    assert [r[0].strip() for r in rows] == ["1", "2"] and rows[0][3].strip() == "1.00×"
    assert all(float(r[2]) > 0 for r in rows) and "20 items" in done.stdout


def test_tar_shards_and_file_lists_are_inputs_and_outputs_never_overwrite_them(dataset, tmp_path, capsys):
    shard = tmp_path / "data-000.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("img01.png", "img03.png"):
            tar.add(dataset / "a" / name, arcname=f"sample-{name}")
        caption = tmp_path / "caption.txt"
        caption.write_text("a photo")
        tar.add(caption, arcname="sample-img01.txt")  # not an image: not an item
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two files\n{dataset / 'b' / 'img00.png'}\n\n{dataset / 'b' / 'img02.png'}\n")
    out = tmp_path / "cache"
    assert main(["cache", str(shard), str(listing), "--vae", str(MINI_LDM), "-o", str(out), *BUCKETS, "--quiet"]) == 0
    names = [json.loads(line)["name"] for line in (out / "shard-000000.jsonl").read_text().splitlines()]
    assert names == sorted(names) and len(names) == 4
    assert "data-000.tar/sample-img01.png" in names and str(dataset / "b" / "img00.png") in names
    code = main(["cache", str(dataset), "--vae", str(MINI_LDM), "-o", str(dataset), "--quiet"])
    assert code == 2 and "is the input" in capsys.readouterr().err
    listing.write_text("notes.doc\n")
    code = main(["cache", str(listing), "--vae", str(MINI_LDM), "-o", str(tmp_path / "x"), "--quiet"])
    assert code == 2 and "list.txt:1: 'notes.doc'; expected an image" in capsys.readouterr().err
