"""What the real-server tests of A1111 (test_a1111_server.py) and Forge (test_forge_server.py) share: starting a
server offline on 127.0.0.1, calling its HTTP API with the server log in every failure, one image per job, and the
image checks (exact: at most 1/255 apart; informative: not flat, not clipped)."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from conftest import SAMPLE

STARTUP_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 300
TILE = 64  # px; smaller than the compared images (128 px and up), so the tiled runs really tile
OFF = (False, TILE, TILE, "exact")  # the accordion's args: enabled, encoder tile, decoder tile, mode
EXACT = (True, TILE, TILE, "exact")
#: larger than the fast mode's default proxy (256² px), so fast tiling's statistics are approximate there
FAST_SIZE = (320, 256)
BASE_JOB = {"prompt": "a photo of a red house", "negative_prompt": "", "seed": 1234, "steps": 4, "cfg_scale": 5.0,
            "sampler_name": "Euler", "scheduler": "Automatic", "batch_size": 1, "n_iter": 1}
#: a traceback through the pack's code anywhere in the log, or A1111's own report of a failing pack script
PACK_ERROR = re.compile(r'File ".*(webui_extension|vae_core|vae_pack\.py)|Error (loading|running|calling).*vae_pack')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(root: Path) -> dict[str, tuple[bool, int, int]]:
    """(is a folder, size, mtime) of everything under ``root``, to show that nothing there was written."""
    out = {".": (True, 0, root.stat().st_mtime_ns)}
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(here) / name
            st = path.lstat()
            folder = stat.S_ISDIR(st.st_mode)
            out[str(path.relative_to(root))] = (folder, 0 if folder else st.st_size, st.st_mtime_ns)
    return out


def env_for(hf_home: Path, tmp: Path) -> dict[str, str]:
    """The caller's environment without web UI arguments or Hugging Face paths of its own, offline."""
    dropped = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "COMMANDLINE_ARGS", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONDONTWRITEBYTECODE="1",  # else Python writes __pycache__ folders into the A1111 tree
               TMPDIR=str(tmp), GRADIO_ANALYTICS_ENABLED="False")
    return env


@dataclass
class Server:
    """A running A1111-style server: its URL, log file and process, and its tree as it was before."""

    url: str
    log: Path
    proc: subprocess.Popen
    host: str = "A1111"
    tree: dict[str, tuple[bool, int, int]] = field(default_factory=dict)
    startup_log: str = ""

    def text(self, start: int = 0) -> str:
        return self.log.read_bytes()[start:].decode("utf-8", "replace")

    def tail(self, chars: int = 4000) -> str:
        return f"\n--- {self.host} server log ({self.log}), last {chars} characters ---\n{self.text()[-chars:]}"

    def explain(self, message: str) -> str:
        """An assertion message with the server log's tail."""
        return message + self.tail()

    def request(self, path: str, body: Optional[dict] = None) -> tuple[int, Any]:
        """(HTTP status, decoded JSON body) of a GET (no body) or POST, failing or not."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def call(self, path: str, body: Optional[dict] = None) -> Any:
        """GET (no body) or POST JSON; fails with the server log when the request fails or the server logged an
        error while handling it (the host catches a script's exceptions, prints them and carries on)."""
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


def start(args: list[str], cwd: str, env: dict[str, str], log: Path, host: str = "A1111") -> Server:
    """Start a web UI server (``args`` must include ``--port N`` on 127.0.0.1) and wait for its ``Startup time:``
    line, printed once the UI and the API routes are up."""
    port = args[args.index("--port") + 1]
    with open(log, "wb") as out:  # the child keeps its own handle
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", log, proc, host=host)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while "Startup time:" not in server.text():
            if proc.poll() is not None:
                raise AssertionError(f"{host} exited with code {proc.returncode} before start-up{server.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{host} not up after {STARTUP_TIMEOUT_S} s{server.tail()}")
            time.sleep(0.5)
    except BaseException:
        stop(proc)
        raise
    server.startup_log = server.text()
    return server


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def sample_b64(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.open(SAMPLE).convert("RGB").resize(size, Image.LANCZOS).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def generate(server: Server, kind: str, size: tuple[int, int], tiling: Optional[tuple] = None,
              **extra: Any) -> tuple[np.ndarray, dict]:
    """One image from ``/sdapi/v1/{kind}`` (txt2img or img2img) and the job's info (``processed.js()``); ``size``
    is the requested (width, height), scaled by ``hr_scale`` with hires fix."""
    body = {**BASE_JOB, "width": size[0], "height": size[1], **extra}
    if tiling is not None:
        body["alwayson_scripts"] = {"VAE Pack": {"args": list(tiling)}}  # A1111 matches titles lowercased
    out = server.call(f"/sdapi/v1/{kind}", body)
    assert len(out["images"]) == 1, server.explain(f"{kind}: {len(out['images'])} images")
    image, info = decode(out["images"][0]), json.loads(out["info"])
    scale = extra.get("hr_scale", 1) if extra.get("enable_hr") else 1
    assert image.shape == (size[1] * scale, size[0] * scale, 3), server.explain(f"{kind}: {image.shape} for {size}")
    return image, info


def tiling_of(server: Server, info: dict) -> Optional[str]:
    """The pack's infotext entry, checked to be in the visible parameters text exactly when it is set."""
    value = info["extra_generation_params"].get("VAE tiling")
    text = info["infotexts"][0]
    assert ("VAE tiling" in text) == (value is not None), server.explain(f"extra {value!r} vs infotext {text!r}")
    return value


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def assert_same(server: Server, a: np.ndarray, b: np.ndarray, what: str) -> None:
    diff = np.abs(a - b)
    assert diff.max() <= 1, server.explain(
        f"{what}: max |difference| {diff.max()}/255, {int((diff > 1).sum())} values over 1/255")


def assert_informative(server: Server, image: np.ndarray, what: str) -> None:
    """An image worth comparing: not flat, and not mostly clipped (where any two decoders would agree)."""
    clipped = float(np.mean((image == 0) | (image == 255)))
    assert image.std() > 8 and clipped < 0.2, server.explain(f"{what}: std {image.std():.1f}, {clipped:.0%} clipped")
