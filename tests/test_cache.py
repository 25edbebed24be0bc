"""`python -m vae_core cache`: latent caching on CPU — one process and a 2-process torchrun (gloo) give the same
shards, index and manifest bit for bit; a run with one rank SIGKILLed mid-shard, then resumed, equals the
uninterrupted run; a re-run is a no-op; a changed dtype or tile re-encodes only the items it affects; the kohya and
musubi exports read back with the right names, keys and shapes; bad inputs land in the manifest with their reason
(and --strict stops at the first); --verify finds a corrupted shard."""
from __future__ import annotations

import io
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


def _index(out: Path) -> list[dict]:
    """Every entry of every shard index, each with the tar it is in."""
    return [json.loads(line) | {"tar": p.name.replace(".jsonl", ".tar")} for p in sorted(out.glob("shard-*.jsonl"))
            for line in p.read_text().splitlines()]


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
        z = load(tar.extractfile(e["member"] + ".safetensors").read())["latents"]
    x = load_image(dataset.parent / e["name"])
    assert [x.shape[-1], x.shape[-2]] == e["original_size"]
    px, crop, resized = fit(x, tuple(e["bucket"]), BucketSpec(96, 64, 256, 64), e["key"])
    assert list(crop) == e["crop_box"] and list(resized) == e["resized"] and list(z.shape) == e["latent_shape"] == [4, e["bucket"][1] // 8,
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
    untiled = _index(out)
    tiled = _cache(dataset, "--vae", MINI_LDM, "-o", out, *BUCKETS, "--tile", "64")
    m = json.loads((out / "manifest.json").read_text())
    after = _index(out)
    squares = [e["tar"] for e in after if e.get("bucket") == [64, 64]]  # 64² items run untiled: same keys
    kept = {e["tar"] for e in after} - {a["tar"] for a, e in zip(untiled, after) if a["key"] != e["key"]}
    assert squares and kept and f"{len(kept)} already done" in tiled.stdout  # shards of 64² items only: untouched
    assert _counts(tiled) == {"encoded": 40 - len(squares), "reused": sum(t not in kept for t in squares)}
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
    code = main(["cache-export", str(out), "--to", "kohya", "-o", str(tmp_path / "k")])
    assert code == 2 and not (tmp_path / "k").exists()  # checked before anything is written


def test_strict_stops_at_the_first_bad_item(dataset, tmp_path, capsys):
    code = main(["cache", str(dataset / "bad"), "--vae", str(MINI_LDM), "-o", str(tmp_path / "s"), *BUCKETS,
                 "--strict", "--quiet"])
    assert code == 2 and "--strict: stopped at the first bad item" in capsys.readouterr().err


def load_latents(cache: Path, e: dict) -> torch.Tensor:
    with tarfile.open(cache / e["tar"]) as tar:
        return load(tar.extractfile(e["member"] + ".safetensors").read())["latents"]


def test_kohya_export_reads_back_with_its_names_and_keys(single, dataset, tmp_path, capsys):
    from vae_core.caching.buckets import kohya_crop_ltrb

    out = tmp_path / "kohya"
    assert main(["cache-export", str(single), "--to", "kohya", "-o", str(out)]) == 0
    assert "skipped 4 item(s)" in capsys.readouterr().out
    m = json.loads((single / "manifest.json").read_text())
    files = sorted(out.rglob("*.npz"))
    assert len(files) == m["ok"] == 40
    e = next(e for e in _index(single) if e["name"] == "photos/a/img01.png")
    bw, bh = e["bucket"]
    ow, oh = e["original_size"]
    assert (bw, bh) != (ow, oh)  # the name is the original size, as sd-scripts looks it up, not the bucket
    f = out / "a" / f"img01_{ow:04d}x{oh:04d}_sd.npz"
    npz = np.load(f)
    assert set(npz.files) == {"latents", "original_size", "crop_ltrb"}
    assert npz["latents"].dtype == np.float32 and npz["latents"].shape == (4, bh // 8, bw // 8)
    assert npz["original_size"].tolist() == e["original_size"]
    assert npz["crop_ltrb"].tolist() == list(kohya_crop_ltrb(tuple(e["bucket"]), tuple(e["original_size"])))
    z = load_latents(single, e)
    assert np.array_equal(npz["latents"], z.numpy())  # sd1: raw latents, as sd-scripts reads them
    # sd3/flux caches key each resolution, as sd-scripts' multi-resolution strategies read them
    assert main(["cache-export", str(single), "--to", "kohya", "--arch", "flux", "-o", str(tmp_path / "f")]) == 0
    keyed = np.load(tmp_path / "f" / "a" / f"img01_{ow:04d}x{oh:04d}_flux.npz")
    res = f"_{bh // 8}x{bw // 8}"
    assert set(keyed.files) == {"latents" + res, "original_size" + res, "crop_ltrb" + res}
    assert np.array_equal(keyed["latents" + res], npz["latents"])


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
        t = load(tar.extractfile(clip["member"] + ".safetensors").read())
    assert set(t) == {"latents", "latents_flipped"} and not torch.equal(t["latents"], t["latents_flipped"])
    again = tmp_path / "again"
    assert _cache(*[a if a != out else again for a in args]).returncode == 0
    assert (again / "shard-000000.tar").read_bytes() == (out / "shard-000000.tar").read_bytes()  # seeded
    export = tmp_path / "musubi"
    assert main(["cache-export", str(out), "--to", "musubi", "-o", str(export)]) == 0
    f = export / "clip_00000-005_0096x0064_wan.safetensors"
    z = load_file(str(f))
    assert list(z) == ["latents_2x8x12_float32"] and z["latents_2x8x12_float32"].shape == (16, 2, 8, 12)
    from safetensors import safe_open

    with safe_open(str(f), "pt") as fh:
        meta = fh.metadata()
    assert meta == {"architecture": "wan", "width": "96", "height": "64", "format_version": "1.0.1",
                    "frame_count": "5"}
    assert sorted(p.name for p in export.iterdir()) == ["clip_00000-005_0096x0064_wan.safetensors",
                                                        "still0_0096x0064_wan.safetensors",
                                                        "still1_0096x0064_wan.safetensors"]
    code = main(["cache-export", str(out), "--to", "kohya", "-o", str(tmp_path / "k")])
    assert code == 2  # kohya has no Wan architecture


def test_hunyuanvideo_cache_exports_to_musubis_hv_architecture(tmp_path):
    """A HunyuanVideo 1.0 VAE's scaled-latent cache of a clip (whole-clip encode) exports under musubi-tuner's ``hv``
    / ``hunyuan_video`` names, latents × 0.476986."""
    from safetensors import safe_open
    from test_family_hv10 import reference
    from vae_core.io.video import save_video

    ref = reference()
    ref.save_pretrained(tmp_path / "hv")
    vae_file = tmp_path / "hunyuan_video_vae.safetensors"
    vae_core.save_vae(vae_core.load_vae(tmp_path / "hv"), vae_file)
    data = tmp_path / "clips"
    data.mkdir()
    clip = torch.rand(1, 3, 5, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_video(clip, data / "clip.mp4", fps=16)
    out = tmp_path / "cache"
    done = _cache(data, "--vae", vae_file, "-o", out, "--latents", "scaled", "--no-buckets")
    assert done.returncode == 0, done.stderr
    export = tmp_path / "musubi"
    assert main(["cache-export", str(out), "--to", "musubi", "-o", str(export)]) == 0
    f = export / "clip_00000-005_0096x0064_hv.safetensors"
    z = load_file(str(f))["latents_2x8x12_float32"]
    with safe_open(str(f), "pt") as fh:
        assert fh.metadata()["architecture"] == "hunyuan_video"
    with tarfile.open(out / "shard-000000.tar") as tar:
        member = json.loads((out / "shard-000000.jsonl").read_text().splitlines()[0])["member"]
        cached = load(tar.extractfile(member + ".safetensors").read())["latents"]
    assert z.shape == (4, 2, 8, 12) and torch.equal(z, cached)
    from vae_core.io.video import load_video

    with torch.no_grad():  # the clip as decoded from the file, encoded whole, scaled
        want = vae_core.load_vae(vae_file).encode(load_video(data / "clip.mp4")[0]) * 0.476986
    assert (z - want[0]).abs().max() < 1e-4


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


def _photos(folder: Path, n: int, seed: int) -> list[Path]:
    from PIL import Image

    photo = Image.open(ROOT / "tests" / "fixtures" / "sample.png").convert("RGB")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x, y = int(rng.integers(0, 400)), int(rng.integers(0, 400))
        out.append(folder / f"img{i}.png")
        photo.crop((x, y, x + 64 + 16 * (i % 3), y + 64)).save(out[-1])
    return out


def test_duplicates_renames_and_new_shard_sizes_reuse_latents(tmp_path):
    """Two files with the same bytes are two items; a renamed file and a new shard size re-encode nothing; shards
    the new layout no longer has are removed."""
    import shutil

    data = tmp_path / "photos"
    files = _photos(data, 5, seed=1)
    shutil.copy(files[0], data / "copy-of-img0.png")
    out = tmp_path / "cache"
    first = _cache(data, "--vae", MINI_LDM, "-o", out, *BUCKETS[:-1], "2")
    assert first.returncode == 0, first.stderr
    index = _index(out)
    assert len(index) == 6 and all(e["status"] == "ok" for e in index) and len(list(out.glob("*.tar"))) == 3
    dup = [e for e in index if e["name"] in ("photos/img0.png", "photos/copy-of-img0.png")]
    assert dup[0]["key"] == dup[1]["key"] and dup[0]["member"] != dup[1]["member"]
    files[3].rename(data / "renamed.png")
    moved = _cache(data, "--vae", MINI_LDM, "-o", out, *BUCKETS[:-1], "3")
    assert moved.returncode == 0, moved.stderr
    assert _counts(moved) == {"encoded": 0, "reused": 6}
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.jsonl", "shard-000000.tar",
                                                            "shard-000001.jsonl", "shard-000001.tar"]
    assert "photos/renamed.png" in [e["name"] for e in _index(out)]
    assert _cache("-o", out, "--verify").returncode == 0
    exported = tmp_path / "kohya"
    assert main(["cache-export", str(out), "--to", "kohya", "-o", str(exported)]) == 0
    assert len(list(exported.glob("*.npz"))) == 6


def test_inputs_inside_the_cache_folder_and_export_collisions_are_refused(tmp_path, capsys):
    _photos(tmp_path / "x" / "photos", 2, seed=2)
    _photos(tmp_path / "y" / "pics", 2, seed=3)  # the same file names, other pictures
    code = main(["cache", str(tmp_path / "x" / "photos"), "--vae", str(MINI_LDM), "-o", str(tmp_path / "x"),
                 "--quiet"])
    assert code == 2 and "inside the cache folder" in capsys.readouterr().err
    out = tmp_path / "cache"
    assert main(["cache", str(tmp_path / "x" / "photos"), str(tmp_path / "y" / "pics"), "--vae", str(MINI_LDM),
                 "-o", str(out), *BUCKETS, "--quiet"]) == 0
    code = main(["cache-export", str(out), "--to", "kohya", "-o", str(tmp_path / "k")])
    err = capsys.readouterr().err
    assert code == 2 and "'photos/img0.png'" in err and "'pics/img0.png'" in err and "would be exported to it" in err
    assert not (tmp_path / "k").exists()
    code = main(["cache", str(tmp_path / "y"), "--vae", str(MINI_LDM), "-o", str(tmp_path / "f"), "--frames", "0"])
    assert code == 2 and "--frames 0; expected at least 1" in capsys.readouterr().err


def test_stale_shards_foreign_manifests_and_recorded_failures_under_strict(tmp_path, capsys):
    """Shards left by a run killed after it removed the manifest are removed by the next complete run (and reported
    by --verify until then); a manifest.json this tool did not write is never replaced; --strict stops at a
    failure the previous run recorded before anything changes."""
    photos = tmp_path / "photos"
    _photos(photos, 6, seed=4)
    out = tmp_path / "cache"
    base = ["--vae", str(MINI_LDM), "-o", str(out), *BUCKETS[:-2], "--quiet"]
    assert main(["cache", str(photos), *base, "--shard-size", "1"]) == 0
    stray = out / "shard-000009.tar"
    stray.write_bytes((out / "shard-000000.tar").read_bytes())
    assert main(["cache", "-o", str(out), "--verify"]) == 1
    assert f"{stray}: not in the manifest" in capsys.readouterr().out
    (out / "manifest.json").unlink()  # what a run killed after its start leaves, old shards included
    assert main(["cache", str(photos), *base, "--shard-size", "3"]) == 0
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.jsonl", "shard-000000.tar",
                                                            "shard-000001.jsonl", "shard-000001.tar"]
    assert main(["cache", "-o", str(out), "--verify"]) == 0
    capsys.readouterr()

    (photos / "img5.png").write_bytes(b"not a png")
    assert main(["cache", str(photos), *base, "--shard-size", "3"]) == 0  # recorded, not fatal
    before = (out / "manifest.json").read_bytes()
    assert main(["cache", str(photos), *base, "--shard-size", "3", "--strict"]) == 2
    assert "recorded by an earlier run; the cache is unchanged" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"my": "project manifest"}')
    assert main(["cache", str(photos), "--vae", str(MINI_LDM), "-o", str(foreign), "--quiet"]) == 2
    assert "not replaced" in capsys.readouterr().err
    assert (foreign / "manifest.json").read_text() == '{"my": "project manifest"}'


def test_hand_edited_manifests_and_shards_missing_latents_are_refused_before_writing(single, tmp_path, capsys):
    import shutil
    import tarfile

    cache = tmp_path / "c"
    shutil.copytree(single, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    for edit, field in ((lambda m: m["shards"].__setitem__(0, "shard-000000.tar"), "shards[0]"),
                        (lambda m: m["settings"].pop("vae"), "settings"),
                        (lambda m: m["settings"].__setitem__("latents", "other"), "settings.latents")):
        m = json.loads(json.dumps(manifest))
        edit(m)
        (cache / "manifest.json").write_text(json.dumps(m))
        for argv in (["cache", "-o", str(cache), "--verify"], ["cache-export", str(cache), "--to", "kohya", "-o",
                                                               str(tmp_path / "k")]):
            assert main(argv) == 2, argv
            assert f"{field} is " in capsys.readouterr().err
    # a shard without one of its items' latents (its sha256 fixed in the manifest): nothing is written
    last = next(s for s in manifest["shards"] if s["ok"] >= 2)
    tar = cache / last["tar"]
    with tarfile.open(tar) as t:
        kept = [(m, t.extractfile(m).read()) for m in t.getmembers()][:-2]
    with tarfile.open(tar, "w") as t:
        for m, data in kept:
            t.addfile(m, io.BytesIO(data))
    from vae_core.caching.shards import file_sha256
    last["sha256"] = file_sha256(tar)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert main(["cache-export", str(cache), "--to", "kohya", "-o", str(tmp_path / "k")]) == 2
    assert "no latents for" in capsys.readouterr().err and not (tmp_path / "k").exists()


def test_exif_rotated_photos_are_cached_upright_and_not_exported_to_kohya(tmp_path, capsys):
    """A phone photo with EXIF orientation 6: cached upright (its recorded size is the upright one); sd-scripts
    reads files unrotated, so its kohya export is skipped with the reason, never written under a wrong name."""
    from PIL import Image

    photos = tmp_path / "photos"
    _photos(photos, 2, seed=5)
    turned = Image.open(photos / "img0.png").convert("RGB").transpose(Image.Transpose.ROTATE_90)  # stored sideways
    exif = Image.Exif()
    exif[0x0112] = 6
    turned.save(photos / "phone.jpg", exif=exif.tobytes())
    out = tmp_path / "cache"
    assert main(["cache", str(photos), "--vae", str(MINI_LDM), "-o", str(out), *BUCKETS, "--quiet"]) == 0
    e = next(e for e in _index(out) if e["name"].endswith("phone.jpg"))
    assert e["exif_turned"] and e["original_size"] == [turned.height, turned.width]
    assert not any(x.get("exif_turned") for x in _index(out) if x["name"] != e["name"])
    assert main(["cache-export", str(out), "--to", "kohya", "-o", str(tmp_path / "k")]) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 item(s)" in printed and "EXIF-rotated" in printed
    assert sorted(p.name.split("_")[0] for p in (tmp_path / "k").rglob("*.npz")) == ["img0", "img1"]
