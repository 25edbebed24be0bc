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

import base64
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pytest
from PIL import Image

from conftest import MINI_DIFFUSERS, MINI_LDM, ROOT, SAMPLE, real_host

A1111 = os.environ.get("A1111_PATH")
pytestmark = real_host("A1111_PATH", "an A1111 v1.10.1 tree")

STARTUP_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 300
TILE = 64  # px; smaller than the compared images (128 px and up), so the tiled runs really tile
FOLDER, LDM_FILE = "mini-vae", MINI_LDM.name
OFF = (False, TILE, TILE, "exact")  # the accordion's args: enabled, encoder tile, decoder tile, mode
EXACT = (True, TILE, TILE, "exact")
#: larger than the fast mode's default proxy (256² px), so fast tiling's statistics are approximate there
FAST_SIZE = (320, 256)
BASE_JOB = {"prompt": "a photo of a red house", "negative_prompt": "", "seed": 1234, "steps": 4, "cfg_scale": 5.0,
            "sampler_name": "Euler", "scheduler": "Automatic", "batch_size": 1, "n_iter": 1}
#: a traceback through the pack's code anywhere in the log, or A1111's own report of a failing pack script
PACK_ERROR = re.compile(r'File ".*(webui_extension|vae_core|vae_pack\.py)|Error (loading|running|calling).*vae_pack')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _snapshot(root: Path) -> dict[str, tuple[bool, int, int]]:
    """(is a folder, size, mtime) of everything under ``root``, to show that nothing there was written."""
    out = {".": (True, 0, root.stat().st_mtime_ns)}
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(here) / name
            st = path.lstat()
            folder = stat.S_ISDIR(st.st_mode)
            out[str(path.relative_to(root))] = (folder, 0 if folder else st.st_size, st.st_mtime_ns)
    return out


def _env(hf_home: Path, tmp: Path) -> dict[str, str]:
    """The caller's environment without A1111 arguments or Hugging Face paths of its own, offline."""
    dropped = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "COMMANDLINE_ARGS", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONDONTWRITEBYTECODE="1",  # else Python writes __pycache__ folders into the A1111 tree
               TMPDIR=str(tmp), GRADIO_ANALYTICS_ENABLED="False")
    return env


@dataclass
class Server:
    """A running ``webui.py --api``: its URL, log file and process, and the A1111 tree as it was before."""

    url: str
    log: Path
    proc: subprocess.Popen
    tree: dict[str, tuple[bool, int, int]] = field(default_factory=dict)
    startup_log: str = ""

    def text(self, start: int = 0) -> str:
        return self.log.read_bytes()[start:].decode("utf-8", "replace")

    def tail(self, chars: int = 4000) -> str:
        return f"\n--- A1111 server log ({self.log}), last {chars} characters ---\n{self.text()[-chars:]}"

    def explain(self, message: str) -> str:
        """An assertion message with the server log's tail."""
        return message + self.tail()

    def call(self, path: str, body: Optional[dict] = None) -> Any:
        """GET (no body) or POST JSON; fails with the server log when the request fails or the server logged an
        error while handling it (A1111 catches a script's exceptions, prints them and carries on)."""
        mark = self.log.stat().st_size
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
                out = json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:3000]
            raise AssertionError(f"{path}: HTTP {err.code}: {detail}{self.tail()}") from err
        logged = self.text(mark)
        assert "Traceback" not in logged and "*** Error" not in logged, \
            f"{path}: the server logged an error while handling the request:\n{logged[-6000:]}"
        return out


def _start(data: Path, ckpt: Path, env: dict[str, str]) -> Server:
    port = _free_port()
    log = data.parent / "server.log"
    args = [os.environ.get("A1111_PYTHON", sys.executable), "webui.py", "--api", "--port", str(port),
            "--data-dir", str(data), "--ckpt", str(ckpt), "--skip-torch-cuda-test", "--use-cpu", "all",
            "--no-half", "--no-half-vae", "--skip-prepare-environment", "--skip-install", "--skip-version-check",
            "--no-download-sd-model", "--do-not-download-clip"]
    with open(log, "wb") as out:  # the child keeps its own handle
        proc = subprocess.Popen(args, cwd=A1111, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", log, proc)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while "Startup time:" not in server.text():  # printed once the UI and the API routes are up
            if proc.poll() is not None:
                raise AssertionError(f"webui.py exited with code {proc.returncode} before start-up{server.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"webui.py not up after {STARTUP_TIMEOUT_S} s{server.tail()}")
            time.sleep(0.5)
    except BaseException:
        _stop(proc)
        raise
    server.startup_log = server.text()
    return server


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


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
    env = _env(hf_home, tmp)
    tree = _snapshot(Path(A1111))
    built = subprocess.run([os.environ.get("A1111_PYTHON", sys.executable), str(ROOT / "tests" / "a1111_assets.py"),
                            A1111, str(ckpt.with_suffix("")), str(hf_home)],
                           capture_output=True, text=True, timeout=600, env=env)
    assert built.returncode == 0 and "ASSETS " in built.stdout, built.stdout[-3000:] + built.stderr[-3000:]
    server = _start(data, ckpt, env)
    server.tree = tree
    try:
        yield server
    finally:
        _stop(server.proc)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def _sample_b64(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.open(SAMPLE).convert("RGB").resize(size, Image.LANCZOS).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _select_vae(server: Server, name: str) -> None:
    """Set "SD VAE" the way the API does and check A1111 kept it (it reverts the setting when loading fails)."""
    server.call("/sdapi/v1/options", {"sd_vae": name})
    got = server.call("/sdapi/v1/options")["sd_vae"]
    assert got == name, server.explain(f"sd_vae set to {name!r} reads back as {got!r}")


def _generate(server: Server, kind: str, size: tuple[int, int], tiling: Optional[tuple] = None,
              **extra: Any) -> tuple[np.ndarray, dict]:
    """One image from ``/sdapi/v1/{kind}`` (txt2img or img2img) and the job's info (``processed.js()``); ``size``
    is the requested (width, height), scaled by ``hr_scale`` with hires fix."""
    body = {**BASE_JOB, "width": size[0], "height": size[1], **extra}
    if tiling is not None:
        body["alwayson_scripts"] = {"VAE Pack": {"args": list(tiling)}}  # A1111 matches titles lowercased
    out = server.call(f"/sdapi/v1/{kind}", body)
    assert len(out["images"]) == 1, server.explain(f"{kind}: {len(out['images'])} images")
    image, info = _decode(out["images"][0]), json.loads(out["info"])
    scale = extra.get("hr_scale", 1) if extra.get("enable_hr") else 1
    assert image.shape == (size[1] * scale, size[0] * scale, 3), server.explain(f"{kind}: {image.shape} for {size}")
    return image, info


def _tiling_of(server: Server, info: dict) -> Optional[str]:
    """The pack's infotext entry, checked to be in the visible parameters text exactly when it is set."""
    value = info["extra_generation_params"].get("VAE tiling")
    text = info["infotexts"][0]
    assert ("VAE tiling" in text) == (value is not None), server.explain(f"extra {value!r} vs infotext {text!r}")
    return value


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def _assert_same(server: Server, a: np.ndarray, b: np.ndarray, what: str) -> None:
    diff = np.abs(a - b)
    assert diff.max() <= 1, server.explain(
        f"{what}: max |difference| {diff.max()}/255, {int((diff > 1).sum())} values over 1/255")


def _assert_informative(server: Server, image: np.ndarray, what: str) -> None:
    """An image worth comparing: not flat, and not mostly clipped (where any two decoders would agree)."""
    clipped = float(np.mean((image == 0) | (image == 255)))
    assert image.std() > 8 and clipped < 0.2, server.explain(f"{what}: std {image.std():.1f}, {clipped:.0%} clipped")


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
        image, info = _generate(server, "txt2img", (64, 64))
        expected = None if name == "None" else name
        text = info["infotexts"][0]
        assert info["sd_vae_name"] == expected and (f"VAE: {name}" in text) == (expected is not None), \
            server.explain(f"after selecting {name!r}: {info['sd_vae_name']!r} loaded; infotext {text!r}")
        _assert_informative(server, image, name)
        images.append(image)
    base, folder, ldm, base2, folder2 = images
    for a, b, what in ((base, folder, "None → folder"), (ldm, base2, "LDM file → None"),
                       (base2, folder2, "None → folder again")):
        change = float(np.abs(a - b).mean())
        assert change > 5, server.explain(f"{what}: the image did not change ({change:.2f}/255 on average)")
    _assert_same(server, ldm, folder, "LDM file vs diffusers folder of the same VAE")
    assert _max_diff(base2, base) == 0 and _max_diff(folder2, folder) == 0, \
        server.explain(f"switching back changed the image: {_max_diff(base2, base)}, {_max_diff(folder2, folder)}")
    # per request, as API callers do: override_settings loads the folder for one job and puts the setting back
    _select_vae(server, "None")
    image, info = _generate(server, "txt2img", (64, 64), override_settings={"sd_vae": FOLDER})
    assert info["sd_vae_name"] == FOLDER and _max_diff(image, folder) == 0, \
        server.explain(f"override_settings: {info['sd_vae_name']!r} loaded, {_max_diff(image, folder)}/255 off")
    after = server.call("/sdapi/v1/options")["sd_vae"]
    assert after == "None", server.explain(f"sd_vae is {after!r} after a job with override_settings")


def test_txt2img_exact_tiling_equals_untiled(server: Server) -> None:
    _select_vae(server, FOLDER)
    off, info_off = _generate(server, "txt2img", (128, 128), OFF)
    on, info_on = _generate(server, "txt2img", (128, 128), EXACT)
    _assert_informative(server, off, "untiled txt2img")
    assert _tiling_of(server, info_off) is None, server.explain("VAE tiling in the infotext of an untiled job")
    assert _tiling_of(server, info_on) == f"exact, enc {TILE}, dec {TILE}", server.explain(str(info_on))
    _assert_same(server, on, off, "txt2img, exact tiles vs untiled")


def test_txt2img_fast_tiling_runs_in_the_hook_and_is_undone(server: Server) -> None:
    _select_vae(server, FOLDER)
    off, _ = _generate(server, "txt2img", FAST_SIZE, OFF)
    fast, info = _generate(server, "txt2img", FAST_SIZE, (True, TILE, TILE, "fast"))
    after, _ = _generate(server, "txt2img", FAST_SIZE, OFF)
    assert _tiling_of(server, info) == f"fast, enc {TILE}, dec {TILE}", server.explain(str(info))
    assert _max_diff(fast, off) > 1, server.explain("fast tiling gave the untiled image: decoder forward not swapped")
    psnr = 10 * np.log10(255.0 ** 2 / np.mean((fast - off).astype(np.float64) ** 2))
    assert psnr > 20, server.explain(f"fast tiling is {psnr:.1f} dB from untiled: broken, not approximate")
    assert _max_diff(after, off) == 0, server.explain("the untiled forward was not restored after the fast job")


def test_img2img_tiled_encode_and_decode(server: Server) -> None:
    """img2img samples the posterior with torch's global RNG, whose state is whatever the previous job left, so a
    first job with the same settings puts it in the same state before each of the compared jobs."""
    _select_vae(server, FOLDER)
    job = {"init_images": [_sample_b64(FAST_SIZE)], "denoising_strength": 0.3}
    _generate(server, "img2img", FAST_SIZE, OFF, **job)
    off, info_off = _generate(server, "img2img", FAST_SIZE, OFF, **job)
    exact, info_exact = _generate(server, "img2img", FAST_SIZE, EXACT, **job)
    enc_fast, info_fast = _generate(server, "img2img", FAST_SIZE, (True, TILE, 0, "fast"), **job)
    again, _ = _generate(server, "img2img", FAST_SIZE, OFF, **job)
    assert _max_diff(again, off) == 0, server.explain(  # else nothing below could be compared
        "img2img with the accordion off gave two different images: not reproducible, or tiling left installed")
    _assert_informative(server, off, "untiled img2img")
    assert _tiling_of(server, info_off) is None, server.explain("VAE tiling in the infotext of an untiled job")
    assert _tiling_of(server, info_exact) == f"exact, enc {TILE}, dec {TILE}", server.explain(str(info_exact))
    _assert_same(server, exact, off, "img2img, exact tiles (encode and decode) vs untiled")
    assert _tiling_of(server, info_fast) == f"fast, enc {TILE}, dec auto", server.explain(str(info_fast))
    assert _max_diff(enc_fast, off) > 1, \
        server.explain("fast tiled encode gave the untiled image: the encoder forward was not swapped")


def test_hires_fix_exact_tiling_equals_untiled(server: Server) -> None:
    """Hires fix with an image upscaler: decode, upscale, encode at twice the size, second pass, decode."""
    _select_vae(server, FOLDER)
    job = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Lanczos", "hr_second_pass_steps": 2,
           "denoising_strength": 0.3}
    off, _ = _generate(server, "txt2img", (64, 64), OFF, **job)
    on, info = _generate(server, "txt2img", (64, 64), EXACT, **job)
    assert _tiling_of(server, info) == f"exact, enc {TILE}, dec {TILE}", server.explain(str(info))
    _assert_informative(server, off, "untiled hires fix")
    _assert_same(server, on, off, "hires fix, exact tiles vs untiled")


def test_interrupt_during_sampling_still_decodes_tiled(server: Server) -> None:
    """A1111's Interrupt stops the sampler and decodes what it has; with tiling on it must too (the pack raised
    "VAE call cancelled" there, failing the job). The tiny UNet predicts no noise, so the latent never changes
    during sampling and the interrupted job's image is the 4-step job's image."""
    _select_vae(server, FOLDER)
    steps = 400
    off, _ = _generate(server, "txt2img", (128, 128), OFF)
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
    image, info = _generate(server, "txt2img", (128, 128), EXACT, steps=steps)
    thread.join(REQUEST_TIMEOUT_S)
    assert seen.get("step", steps) < steps - 100, server.explain(f"not interrupted while sampling: {seen}")
    assert _tiling_of(server, info) == f"exact, enc {TILE}, dec {TILE}", server.explain(str(info))
    _assert_same(server, image, off, "interrupted tiled job vs the untiled 4-step job")


def test_a1111_tree_untouched(server: Server) -> None:
    """Everything the server wrote went to its data dir (run last: it covers the requests above)."""
    now = _snapshot(Path(A1111))
    changed = sorted(k for k in set(now) | set(server.tree) if now.get(k) != server.tree.get(k))
    assert not changed, server.explain(f"written inside the A1111 tree {A1111}: {changed[:20]}")
