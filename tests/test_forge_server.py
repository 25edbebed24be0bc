"""The pack in a REAL Forge (main at dfdcbab6, "Forge2") server, over HTTP (runs only when FORGE_PATH is set).

    FORGE_PATH=/path/to/forge FORGE_PYTHON=/path/to/its/venv/bin/python python -m pytest tests/test_forge_server.py

The tree and venv come from ``.ci/prepare_hosts.py`` (``shared/hosts/README.md``: Forge offline on CPU). Two servers,
offline on the CPU, on 127.0.0.1 and free ports, each writing only to a data dir of its own: this repository linked as
``extensions/vae-pack`` and the SD1.5-shaped checkpoint and VAEs that ``forge_assets.py`` writes with Forge's own
classes (a diffusers folder, a second folder of the same name, an LDM ``.ckpt``, a ``.sft`` too small for SD1.5, and
a VAE that overflows fp16). The first runs the VAE in fp32 (Forge's CPU default), the second with ``--vae-in-fp16``.
Checked, with Forge's own API (``/sdapi/v1/sd-modules``, ``forge_additional_modules``, txt2img, img2img): every
format listed under a unique name of its own and loadable; a VAE of the wrong shape refused with HTTP 422 naming the
file; txt2img and img2img with the accordion's exact tiling equal to untiled (≤ 1/255) with the encode and decode
really tiled (the pack's log lines, ``SD_WEBUI_LOG_LEVEL=INFO``); a failed job's tiling removed when Forge closes
it; in fp16, the NaN guard giving the fp32 image and the fp16 fix a finite one without a retry. The Forge tree is left
as it was. About 2 minutes on 2 cores, most of it model loads (Forge reloads the whole model for each VAE).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from conftest import ROOT, real_host
from webui_server import (EXACT, OFF, PACK_ERROR, TILE, Server, assert_informative, assert_same, env_for, free_port,
                          generate, max_diff, sample_b64, snapshot, start, stop, tiling_of)

FORGE = os.environ.get("FORGE_PATH")
pytestmark = real_host("FORGE_PATH", "a Forge (main, dfdcbab6) tree")

NAMES = {"sd-vae-a", "sd-vae-a (2)", "sd-vae-b.ckpt", "overflow.ckpt", "overflow-link.ckpt", "mini-vae.sft"}
TILED = re.compile(r"VAE pack: tiled (encode|decode) of \(([\d, ]+)\) \(exact, tile \d+\): (\d+) tiles")
REMOVED = "VAE pack: tiling removed from Forge's VAE"
RETRY = re.compile(r"VAE decode produced NaN/inf in float16; retrying in float32")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The models folder (checkpoint and VAEs), written once with Forge's interpreter."""
    base = tmp_path_factory.mktemp("forge-assets")
    built = subprocess.run([os.environ.get("FORGE_PYTHON", sys.executable), str(ROOT / "tests" / "forge_assets.py"),
                            FORGE, str(base)], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert built.returncode == 0 and "ASSETS " in built.stdout, built.stdout[-3000:] + built.stderr[-3000:]
    return base / "models"


def _server(base: Path, models: Path, *extra: str) -> Server:
    data, tmp = base / "data", base / "tmp"
    (data / "extensions").mkdir(parents=True)
    (data / "models").mkdir()
    tmp.mkdir()
    os.symlink(ROOT, data / "extensions" / "vae-pack")
    for part in ("Stable-diffusion", "VAE"):
        os.symlink(models / part, data / "models" / part)
    env = {**env_for(base / "hf", tmp), "SD_WEBUI_LOG_LEVEL": "INFO"}
    args = [os.environ.get("FORGE_PYTHON", sys.executable), "launch.py", "--data-dir", str(data), "--always-cpu",
            "--api", "--server-name", "127.0.0.1", "--port", str(free_port()), "--skip-prepare-environment",
            "--skip-install", "--skip-python-version-check", "--skip-torch-cuda-test", "--skip-version-check",
            "--no-download-sd-model", "--ckpt", str(models / "Stable-diffusion" / "tiny-sd15.ckpt"), *extra]
    return start(args, FORGE, env, base / "server.log", host="Forge")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Iterator[Server]:
    tree = snapshot(Path(FORGE))
    server = _server(tmp_path_factory.mktemp("forge-fp32"), assets)
    server.tree = tree
    try:
        yield server
    finally:
        stop(server.proc)


def _select(server: Server, name: str | None) -> None:
    """Choose ``name`` (None: the checkpoint's own VAE) the way API callers do, and check Forge kept it (it ignores
    names it does not list)."""
    listed = {e["model_name"]: e["filename"] for e in server.call("/sdapi/v1/sd-modules")}
    server.call("/sdapi/v1/options", {"forge_additional_modules": [] if name is None else [name]})
    got = server.call("/sdapi/v1/options")["forge_additional_modules"]
    assert got == ([] if name is None else [listed[name]]), server.explain(f"{name!r} selected, options say {got}")


def _logged(server: Server, start: int, needle: str) -> str:
    """The log from ``start`` once ``needle`` is in it: Forge logs a failed job's traceback after answering, and
    the next request must not take it for its own."""
    deadline = time.monotonic() + 30
    while needle not in server.text(start) and time.monotonic() < deadline:
        time.sleep(0.2)
    return server.text(start)


def _tiled_calls(server: Server, start: int) -> list[tuple[str, tuple[int, ...], int]]:
    return [(m[1], tuple(int(v) for v in m[2].split(",")), int(m[3])) for m in TILED.finditer(server.text(start))]


# ----------------------------------------------------------------------------------------------------------------

def test_pack_loads_and_lists_every_vae_under_its_own_name(server: Server) -> None:
    ours = [line for line in server.startup_log.splitlines() if PACK_ERROR.search(line)]
    assert not ours, server.explain("errors from the pack at start-up:\n" + "\n".join(ours))
    assert "vae pack" in server.call("/sdapi/v1/scripts")["txt2img"], server.explain("no VAE Pack script")
    entries = {e["model_name"]: e["filename"] for e in server.call("/sdapi/v1/sd-modules")}
    vae_dir = Path(entries["sd-vae-b.ckpt"]).parent
    assert set(entries) == NAMES, server.explain(f"listed: {sorted(entries)}")
    assert Path(entries["sd-vae-a"]) == vae_dir / "sd-vae-a" and (vae_dir / "sd-vae-a").is_dir(), str(entries)
    # the deeper folder of the same name: a virtual path whose base name is its entry name (Forge resolves by it)
    assert Path(entries["sd-vae-a (2)"]) == vae_dir / "more" / "sd-vae-a (2)", str(entries)


def test_a_vae_added_after_start_up_is_listed_on_refresh(server: Server) -> None:
    """Forge sees new files only at a UI refresh; the API's refresh-vae re-lists its VAE folders too."""
    vae_dir = Path(server.call("/sdapi/v1/sd-modules")[0]["filename"]).parent
    vae_dir = next(p for p in [vae_dir, *vae_dir.parents] if p.name == "VAE")
    late = vae_dir / "late-vae"
    late.mkdir()
    try:
        shutil.copy(vae_dir / "sd-vae-a" / "config.json", late / "config.json")
        (late / "diffusion_pytorch_model.bin").symlink_to(vae_dir / "sd-vae-a" / "diffusion_pytorch_model.bin")
        server.call("/sdapi/v1/refresh-vae", {})
        names = {e["model_name"] for e in server.call("/sdapi/v1/sd-modules")}
        assert names == NAMES | {"late-vae"}, server.explain(f"after refresh-vae: {sorted(names)}")
    finally:
        shutil.rmtree(late)
        server.call("/sdapi/v1/refresh-vae", {})
    assert {e["model_name"] for e in server.call("/sdapi/v1/sd-modules")} == NAMES


def test_selecting_folders_and_files_loads_each(server: Server) -> None:
    """The checkpoint's VAE, the folder, the same-named folder and the LDM file: four different VAEs, four images;
    selecting the folder again gives its image again."""
    images = {}
    for name in (None, "sd-vae-a", "sd-vae-a (2)", "sd-vae-b.ckpt"):
        _select(server, name)
        images[name], _ = generate(server, "txt2img", (64, 64))
        assert_informative(server, images[name], str(name))
    names = list(images)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            change = float(np.abs(images[a] - images[b]).mean())
            assert change > 5, server.explain(f"{a} vs {b}: the same image ({change:.2f}/255 apart on average)")
    assert "read as diffusers keys" in server.text(), server.explain("the folder was not read by the pack")
    _select(server, "sd-vae-a")
    again, _ = generate(server, "txt2img", (64, 64))
    assert max_diff(again, images["sd-vae-a"]) == 0, server.explain("the folder's image changed on reselecting it")


def test_a_vae_of_the_wrong_shape_is_refused_by_name(server: Server) -> None:
    _select(server, "mini-vae.sft")
    mark = server.log.stat().st_size
    status, body = server.request("/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "width": 64, "height": 64})
    text = str(body)
    assert status == 422 and "mini-vae.sft" in text and "[32, 64, 128, 128]" in text and "[128, 256, 512, 512]" \
        in text, server.explain(f"HTTP {status}: {text[:2000]}")
    assert "VaeLoadError" in _logged(server, mark, "VaeLoadError"), server.explain("Forge's error, not ours")
    _select(server, "sd-vae-b.ckpt")  # Forge retries the failed load until another choice
    image, _ = generate(server, "txt2img", (64, 64))
    assert_informative(server, image, "after the refused VAE")


def test_txt2img_exact_tiling_equals_untiled(server: Server) -> None:
    _select(server, "sd-vae-a")
    off, info_off = generate(server, "txt2img", (128, 128), OFF)
    mark = server.log.stat().st_size
    on, info_on = generate(server, "txt2img", (128, 128), EXACT)
    assert_informative(server, off, "untiled txt2img")
    assert tiling_of(server, info_off) is None and tiling_of(server, info_on) == f"exact, enc {TILE}, dec {TILE}", \
        server.explain(f"{info_off['extra_generation_params']} / {info_on['extra_generation_params']}")
    calls = _tiled_calls(server, mark)
    assert [c[0] for c in calls] == ["decode"] and calls[0][1] == (1, 4, 16, 16) and calls[0][2] > 1, \
        server.explain(f"tiled calls in the job: {calls}")
    assert_same(server, on, off, "txt2img, exact tiles vs untiled")
    assert REMOVED in server.text(mark), server.explain("tiling not removed at the end of the job")


def test_img2img_encode_and_decode_tiled_equal_untiled(server: Server) -> None:
    """img2img samples the posterior with torch's global RNG; each compared job is preceded by the same job."""
    _select(server, "sd-vae-a")
    job = {"init_images": [sample_b64((128, 128))], "denoising_strength": 0.3}
    generate(server, "img2img", (128, 128), OFF, **job)
    off, _ = generate(server, "img2img", (128, 128), OFF, **job)
    again, _ = generate(server, "img2img", (128, 128), OFF, **job)
    assert max_diff(again, off) == 0, server.explain("img2img untiled twice: two different images")
    mark = server.log.stat().st_size
    on, info = generate(server, "img2img", (128, 128), EXACT, **job)
    calls = _tiled_calls(server, mark)
    assert [c[0] for c in calls] == ["encode", "decode"] and calls[0][1] == (1, 3, 128, 128) and \
        min(c[2] for c in calls) > 1, server.explain(f"tiled calls in the job: {calls}")
    assert tiling_of(server, info) == f"exact, enc {TILE}, dec {TILE}", server.explain(str(info))
    assert_informative(server, off, "untiled img2img")
    assert_same(server, on, off, "img2img, exact tiles (encode and decode) vs untiled")


def test_a_failed_job_leaves_no_tiling_behind(server: Server) -> None:
    """A hires-fix upscaler that does not exist fails in ``p.init``, after ``process()`` installed the tiling:
    Forge skips ``postprocess`` but closes the job, and the tiling goes then. Were it left, the next job would find
    and remove it (logging so)."""
    _select(server, "sd-vae-a")
    mark = server.log.stat().st_size
    status, body = server.request("/sdapi/v1/txt2img", {
        "prompt": "x", "steps": 2, "width": 64, "height": 64, "enable_hr": True, "hr_upscaler": "no such upscaler",
        "alwayson_scripts": {"VAE Pack": {"args": list(EXACT)}}})
    assert status >= 400, server.explain(f"the job did not fail: HTTP {status}")
    assert REMOVED in _logged(server, mark, "could not find upscaler"), \
        server.explain(f"HTTP {status} {str(body)[:500]}; tiling not removed")
    mark = server.log.stat().st_size
    generate(server, "txt2img", (64, 64), OFF)
    assert REMOVED not in server.text(mark) and not _tiled_calls(server, mark), \
        server.explain("the failed job's tiling was still installed at the next job")


def test_fp16_nan_guard_and_fp16_fix(server: Server, tmp_path_factory: pytest.TempPathFactory, assets: Path) -> None:
    """``overflow.ckpt`` decodes to a normal image in fp32 and to inf/NaN in fp16. With ``--vae-in-fp16``: the fix
    off, the guard retries in fp32 and gives the fp32 image; the fix on (a fresh load of the same weights, through
    a link), fp16 runs finite without a retry. Each fp16 decode takes ~1 min on this CPU (no fast fp16 kernels)."""
    _select(server, "overflow.ckpt")
    ref, _ = generate(server, "txt2img", (64, 64))
    assert_informative(server, ref, "overflow.ckpt in fp32")
    half = _server(tmp_path_factory.mktemp("forge-fp16"), assets, "--vae-in-fp16")
    try:
        half.call("/sdapi/v1/options", {"vae_pack_fp16_fix": False})
        _select(half, "overflow.ckpt")
        mark = half.log.stat().st_size
        guarded, _ = generate(half, "txt2img", (64, 64))
        assert RETRY.search(half.text(mark)), half.explain("no NaN-guard retry: the fp16 decode did not overflow?")
        assert_same(half, guarded, ref, "fp16 with the guard's fp32 retry vs the fp32 server")
        half.call("/sdapi/v1/options", {"vae_pack_fp16_fix": True})
        _select(half, "overflow-link.ckpt")
        mark = half.log.stat().st_size
        fixed, _ = generate(half, "txt2img", (64, 64))
        log = half.text(mark)
        assert "fp16 fix: largest activation" in log and not RETRY.search(log), half.explain("fix not applied/used")
        psnr = 10 * np.log10(255.0 ** 2 / max(np.mean((fixed - ref).astype(np.float64) ** 2), 1e-12))
        assert psnr > 30, half.explain(f"fp16 with the fix is {psnr:.1f} dB from fp32")
    finally:
        stop(half.proc)


def test_forge_tree_untouched(server: Server) -> None:
    """Everything the servers wrote went to their data dirs (run last: it covers the requests above)."""
    now = snapshot(Path(FORGE))
    changed = sorted(k for k in set(now) | set(server.tree) if now.get(k) != server.tree.get(k))
    assert not changed, server.explain(f"written inside the Forge tree {FORGE}: {changed[:20]}")
