"""The pack in a REAL AUTOMATIC1111 v1.10.1 ``webui.py --api`` server, over HTTP (runs only when A1111_PATH is set).

    A1111_PATH=/path/to/stable-diffusion-webui A1111_PYTHON=/path/to/its/venv/bin/python \\
        python -m pytest tests/test_a1111_server.py

The tree and venv are those of tests/test_a1111_real.py (shared/notes/a1111-offline.md). One server per module,
offline on the CPU, on 127.0.0.1 and a free port, writing only to a data dir of its own: this repository linked as
``extensions/vae-pack``, the bundled test VAE in ``models/VAE`` both as an LDM file and as the diffusers folder
``mini-vae``, and a tiny SD1 checkpoint (random VAE) with a tiny CLIP cache written by ``a1111_assets.py``.
Checked: the "SD VAE" list, switching VAEs through ``/sdapi/v1/options``, and txt2img, img2img, hires fix and an
interrupted job with the "VAE Pack" accordion off and on. Exact tiling must give the untiled image (≤ 1/255 per
value); fast tiling, whose statistics come from a 256² proxy, must give a different one on a larger image, which
shows that A1111 really ran the swapped encoder/decoder forwards. The A1111 tree must be left as it was.
40 s on 2 idle cores (half of it start-up), up to ~2.5 min when they are shared with other work.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from conftest import MINI_DIFFUSERS, MINI_LDM, ROOT, real_host
from webui_server import (EXACT, FAST_SIZE, OFF, PACK_ERROR, REQUEST_TIMEOUT_S, TILE, Server, assert_informative,
                          assert_same, env_for, free_port, generate, max_diff, sample_b64, snapshot, start, stop,
                          tiling_of)

A1111 = os.environ.get("A1111_PATH")
pytestmark = real_host("A1111_PATH", "an A1111 v1.10.1 tree")

FOLDER, LDM_FILE = "mini-vae", MINI_LDM.name


def _start(data: Path, ckpt: Path, env: dict[str, str]) -> Server:
    args = [os.environ.get("A1111_PYTHON", sys.executable), "webui.py", "--api", "--port", str(free_port()),
            "--data-dir", str(data), "--ckpt", str(ckpt), "--skip-torch-cuda-test", "--use-cpu", "all",
            "--no-half", "--no-half-vae", "--skip-prepare-environment", "--skip-install", "--skip-version-check",
            "--no-download-sd-model", "--do-not-download-clip"]
    return start(args, A1111, env, data.parent / "server.log")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("a1111-server")
    data, hf_home, tmp = base / "data", base / "hf", base / "tmp"
    (data / "extensions").mkdir(parents=True)
    tmp.mkdir()
    os.symlink(ROOT, data / "extensions" / "vae-pack")
    vae_dir = data / "models" / "VAE"
    vae_dir.mkdir(parents=True)
    shutil.copy(MINI_LDM, vae_dir / LDM_FILE)
    shutil.copytree(MINI_DIFFUSERS, vae_dir / FOLDER)
    ckpt = data / "models" / "Stable-diffusion" / "tiny.safetensors"
    env = env_for(hf_home, tmp)
    tree = snapshot(Path(A1111))
    built = subprocess.run([os.environ.get("A1111_PYTHON", sys.executable), str(ROOT / "tests" / "a1111_assets.py"),
                            A1111, str(ckpt.with_suffix("")), str(hf_home)],
                           capture_output=True, text=True, timeout=600, env=env)
    assert built.returncode == 0 and "ASSETS " in built.stdout, built.stdout[-3000:] + built.stderr[-3000:]
    server = _start(data, ckpt, env)
    server.tree = tree
    try:
        yield server
    finally:
        stop(server.proc)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

def _select_vae(server: Server, name: str) -> None:
    """Set "SD VAE" the way the API does and check A1111 kept it (it reverts the setting when loading fails)."""
    server.call("/sdapi/v1/options", {"sd_vae": name})
    got = server.call("/sdapi/v1/options")["sd_vae"]
    assert got == name, server.explain(f"sd_vae set to {name!r} reads back as {got!r}")


# ----------------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------------

def test_pack_loads_with_accordion_and_settings(server: Server) -> None:
    ours = [line for line in server.startup_log.splitlines() if PACK_ERROR.search(line)]
    assert not ours, server.explain("errors from the pack at start-up:\n" + "\n".join(ours))
    listed = server.call("/sdapi/v1/scripts")
    assert "vae pack" in listed["txt2img"] and "vae pack" in listed["img2img"], server.explain(str(listed))
    infos = [s for s in server.call("/sdapi/v1/script-info") if s["name"] == "vae pack"]
    assert sorted(s["is_img2img"] for s in infos) == [False, True] and all(s["is_alwayson"] for s in infos), \
        server.explain(str(infos))
    for info in infos:  # the argument order API callers rely on: enabled, encoder tile, decoder tile, mode
        args = info["args"]
        assert [a["label"].split()[0] for a in args] == ["Enable", "Encoder", "Decoder", "Mode"], str(args)
        assert args[0]["value"] is False and args[3]["choices"] == ["exact", "fast"], str(args)
    options = server.call("/sdapi/v1/options")
    ours_opts = {k: options.get(k) for k in ("vae_pack_fp16_fix", "vae_pack_nan_guard", "vae_pack_tiled")}
    assert ours_opts == {"vae_pack_fp16_fix": True, "vae_pack_nan_guard": True, "vae_pack_tiled": False}, \
        server.explain(f"the pack's settings: {ours_opts}")


def test_vae_list_names_the_diffusers_folder(server: Server) -> None:
    for refresh in (False, True):  # as listed at start-up, and after the API's refresh
        if refresh:
            server.call("/sdapi/v1/refresh-vae", {})
        entries = {e["model_name"]: e["filename"] for e in server.call("/sdapi/v1/sd-vae")}
        # exactly these two: no inner diffusion_pytorch_model.safetensors entry
        assert set(entries) == {FOLDER, LDM_FILE}, server.explain(f"refresh={refresh}: {entries}")
        folder_file, ldm_file = Path(entries[FOLDER]), Path(entries[LDM_FILE])
        assert folder_file.parent.name == FOLDER and folder_file.is_file() and ldm_file.name == LDM_FILE, \
            server.explain(f"refresh={refresh}: {entries}")


def test_switching_vaes_through_options(server: Server) -> None:
    """None (the checkpoint's random VAE) → folder → LDM file → None → folder: every switch to or from None
    changes the image, folder and LDM file (the same weights in two formats) give the same one, and A1111 reports
    the one it loaded each time."""
    images: list[np.ndarray] = []
    for name in ("None", FOLDER, LDM_FILE, "None", FOLDER):
        _select_vae(server, name)
        image, info = generate(server, "txt2img", (64, 64))
        expected = None if name == "None" else name
        text = info["infotexts"][0]
        assert info["sd_vae_name"] == expected and (f"VAE: {name}" in text) == (expected is not None), \
            server.explain(f"after selecting {name!r}: {info['sd_vae_name']!r} loaded; infotext {text!r}")
        assert_informative(server, image, name)
        images.append(image)
    base, folder, ldm, base2, folder2 = images
    for a, b, what in ((base, folder, "None → folder"), (ldm, base2, "LDM file → None"),
                       (base2, folder2, "None → folder again")):
        change = float(np.abs(a - b).mean())
        assert change > 5, server.explain(f"{what}: the image did not change ({change:.2f}/255 on average)")
    assert_same(server, ldm, folder, "LDM file vs diffusers folder of the same VAE")
    assert max_diff(base2, base) == 0 and max_diff(folder2, folder) == 0, \
        server.explain(f"switching back changed the image: {max_diff(base2, base)}, {max_diff(folder2, folder)}")
    # per request, as API callers do: override_settings loads the folder for one job and puts the setting back
    _select_vae(server, "None")
    image, info = generate(server, "txt2img", (64, 64), override_settings={"sd_vae": FOLDER})
    assert info["sd_vae_name"] == FOLDER and max_diff(image, folder) == 0, \
        server.explain(f"override_settings: {info['sd_vae_name']!r} loaded, {max_diff(image, folder)}/255 off")
    after = server.call("/sdapi/v1/options")["sd_vae"]
    assert after == "None", server.explain(f"sd_vae is {after!r} after a job with override_settings")


def test_txt2img_exact_tiling_equals_untiled(server: Server) -> None:
    _select_vae(server, FOLDER)
    off, info_off = generate(server, "txt2img", (128, 128), OFF)
    on, info_on = generate(server, "txt2img", (128, 128), EXACT)
    assert_informative(server, off, "untiled txt2img")
    assert tiling_of(server, info_off) is None, server.explain("VAE tiling in the infotext of an untiled job")
    assert tiling_of(server, info_on) == f"exact, enc {TILE}, dec {TILE}", server.explain(str(info_on))
    assert_same(server, on, off, "txt2img, exact tiles vs untiled")


def test_txt2img_fast_tiling_runs_in_the_hook_and_is_undone(server: Server) -> None:
    _select_vae(server, FOLDER)
    off, _ = generate(server, "txt2img", FAST_SIZE, OFF)
    fast, info = generate(server, "txt2img", FAST_SIZE, (True, TILE, TILE, "fast"))
    after, _ = generate(server, "txt2img", FAST_SIZE, OFF)
    assert tiling_of(server, info) == f"fast, enc {TILE}, dec {TILE}", server.explain(str(info))
    assert max_diff(fast, off) > 1, server.explain("fast tiling gave the untiled image: decoder forward not swapped")
    psnr = 10 * np.log10(255.0 ** 2 / np.mean((fast - off).astype(np.float64) ** 2))
    assert psnr > 20, server.explain(f"fast tiling is {psnr:.1f} dB from untiled: broken, not approximate")
    assert max_diff(after, off) == 0, server.explain("the untiled forward was not restored after the fast job")


def test_img2img_tiled_encode_and_decode(server: Server) -> None:
    """img2img samples the posterior with torch's global RNG, whose state is whatever the previous job left, so a
    first job with the same settings puts it in the same state before each of the compared jobs."""
    _select_vae(server, FOLDER)
    job = {"init_images": [sample_b64(FAST_SIZE)], "denoising_strength": 0.3}
    generate(server, "img2img", FAST_SIZE, OFF, **job)
    off, info_off = generate(server, "img2img", FAST_SIZE, OFF, **job)
    exact, info_exact = generate(server, "img2img", FAST_SIZE, EXACT, **job)
    enc_fast, info_fast = generate(server, "img2img", FAST_SIZE, (True, TILE, 0, "fast"), **job)
    again, _ = generate(server, "img2img", FAST_SIZE, OFF, **job)
    assert max_diff(again, off) == 0, server.explain(  # else nothing below could be compared
        "img2img with the accordion off gave two different images: not reproducible, or tiling left installed")
    assert_informative(server, off, "untiled img2img")
    assert tiling_of(server, info_off) is None, server.explain("VAE tiling in the infotext of an untiled job")
    assert tiling_of(server, info_exact) == f"exact, enc {TILE}, dec {TILE}", server.explain(str(info_exact))
    assert_same(server, exact, off, "img2img, exact tiles (encode and decode) vs untiled")
    assert tiling_of(server, info_fast) == f"fast, enc {TILE}, dec auto", server.explain(str(info_fast))
    assert max_diff(enc_fast, off) > 1, \
        server.explain("fast tiled encode gave the untiled image: the encoder forward was not swapped")


def test_hires_fix_exact_tiling_equals_untiled(server: Server) -> None:
    """Hires fix with an image upscaler: decode, upscale, encode at twice the size, second pass, decode."""
    _select_vae(server, FOLDER)
    job = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Lanczos", "hr_second_pass_steps": 2,
           "denoising_strength": 0.3}
    off, _ = generate(server, "txt2img", (64, 64), OFF, **job)
    on, info = generate(server, "txt2img", (64, 64), EXACT, **job)
    assert tiling_of(server, info) == f"exact, enc {TILE}, dec {TILE}", server.explain(str(info))
    assert_informative(server, off, "untiled hires fix")
    assert_same(server, on, off, "hires fix, exact tiles vs untiled")


def test_interrupt_during_sampling_still_decodes_tiled(server: Server) -> None:
    """A1111's Interrupt stops the sampler and decodes what it has; with tiling on it must too (the pack raised
    "VAE call cancelled" there, failing the job). The tiny UNet predicts no noise, so the latent never changes
    during sampling and the interrupted job's image is the 4-step job's image."""
    _select_vae(server, FOLDER)
    steps = 400
    off, _ = generate(server, "txt2img", (128, 128), OFF)
    seen: dict[str, int] = {}

    def interrupt_while_sampling() -> None:
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while time.monotonic() < deadline:
            state = server.call("/sdapi/v1/progress?skip_current_image=true")["state"]
            if state["sampling_steps"] == steps and state["sampling_step"] >= 2:
                server.call("/sdapi/v1/interrupt", {})
                seen["step"] = state["sampling_step"]
                return
            time.sleep(0.05)

    thread = threading.Thread(target=interrupt_while_sampling, daemon=True)
    thread.start()
    image, info = generate(server, "txt2img", (128, 128), EXACT, steps=steps)
    thread.join(REQUEST_TIMEOUT_S)
    assert seen.get("step", steps) < steps - 100, server.explain(f"not interrupted while sampling: {seen}")
    assert tiling_of(server, info) == f"exact, enc {TILE}, dec {TILE}", server.explain(str(info))
    assert_same(server, image, off, "interrupted tiled job vs the untiled 4-step job")


def test_a1111_tree_untouched(server: Server) -> None:
    """Everything the server wrote went to its data dir (run last: it covers the requests above)."""
    now = snapshot(Path(A1111))
    changed = sorted(k for k in set(now) | set(server.tree) if now.get(k) != server.tree.get(k))
    assert not changed, server.explain(f"written inside the A1111 tree {A1111}: {changed[:20]}")
