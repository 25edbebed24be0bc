"""Integration test against a REAL ComfyUI checkout (runs only when COMFYUI_PATH points at one).

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/its/venv/bin/python python -m pytest tests/test_comfy_real.py

Starts ``main.py --cpu`` on 127.0.0.1 with this pack as a custom node (through a base directory of its own), checks
``/object_info``, posts the example workflows (API format, and the UI-format ones converted with the server's own
widget order), waits on ``/history`` and compares the saved images with a direct vae_core round trip.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

import vae_core
from conftest import MINI_DIFFUSERS, MINI_LDM, ROOT, SAMPLE, real_host

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = real_host("COMFYUI_PATH", "a ComfyUI checkout")
EXAMPLES = ROOT / "examples"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
            return json.loads(body) if body.strip() else {}
    except urllib.error.HTTPError as err:
        raise AssertionError(f"POST {url}: {err.code} {err.read().decode()[:2000]}") from err


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    (base / "custom_nodes").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / "vae-pack")
    (base / "models" / "vae").mkdir(parents=True)
    shutil.copy(MINI_LDM, base / "models" / "vae")
    shutil.copytree(MINI_DIFFUSERS, base / "models" / "vae" / "mini-vae")
    for d in ("input", "output", "temp", "user", "frontend"):
        (base / d).mkdir()
    shutil.copy(SAMPLE, base / "input" / "sample.png")
    from safetensors.torch import save_file

    save_file(_taesd(), str(base / "models" / "vae" / "tiny-taesd.safetensors"))  # core's loader builds a TAESD
    save_file({"pixel_space_vae": torch.tensor(1.0)}, str(base / "models" / "vae" / "pixel.safetensors"))  # unknown
    from test_family_flux2 import _flux2

    _flux2().save_pretrained(base / "flux2-diffusers")  # v0.3.64 predates Flux.2: our loader runs vae_core's network
    vae_core.save_vae(vae_core.load_vae(base / "flux2-diffusers"), base / "models" / "vae" / "flux2-ae.safetensors")
    from test_family_qwen import _qwen

    _qwen().save_pretrained(base / "qwen-diffusers")  # a tiny random Qwen-Image VAE, saved in its original layout
    vae_core.save_vae(vae_core.load_vae(base / "qwen-diffusers"), base / "models" / "vae" / "qwen_image_vae.safetensors")
    save_file(_qwen_full_size(), str(base / "models" / "vae" / "qwen-full-random.safetensors"))
    os.symlink(base / "models" / "vae" / "qwen-full-random.safetensors",  # the same design: a Wan 2.1 VAE for core
               base / "models" / "vae" / "wan_2.1_vae.safetensors")
    from test_family_hv15 import reference as _hv15

    _hv15().save_pretrained(base / "hv15-diffusers")  # v0.3.64 predates HunyuanVideo 1.5: an engine video VAE
    vae_core.save_vae(vae_core.load_vae(base / "hv15-diffusers"), base / "models" / "vae" / "hunyuanvideo15_vae.safetensors")
    save_file(_ltx_full_size(), str(base / "models" / "vae" / "ltxv-0.9.0-random.safetensors"))
    save_file(_hv10_full_size(), str(base / "models" / "vae" / "hunyuan-video-random.safetensors"))
    from test_family_ltx import reference as _ltx

    _ltx("2").save_pretrained(base / "ltx2-diffusers")  # v0.3.64 predates LTX-2: an engine video VAE
    vae_core.save_vae(vae_core.load_vae(base / "ltx2-diffusers"), base / "models" / "vae" / "ltx-2-vae.safetensors")
    from test_family_taef2 import DEC_POOL, ENC_POOL, _pool_tensors
    from test_family_tiny import _original_halves, _tiny

    enc, dec = _original_halves(_tiny(32))  # a random TAEF2 in ComfyUI's single-file TAESD keys
    taef2 = {f"taesd_encoder.{k}": v for k, v in (enc | _pool_tensors(ENC_POOL, 1)).items()}
    taef2 |= {f"taesd_decoder.{k}": v for k, v in (dec | _pool_tensors(DEC_POOL, 2)).items()}
    save_file({k: v.contiguous() for k, v in taef2.items()}, str(base / "models" / "vae" / "taef2-random.safetensors"))
    port = _port()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
         "--front-end-root", str(base / "frontend"), "--disable-auto-launch", "--output-directory",
         str(base / "output"), "--input-directory", str(base / "input")],
        cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                break
            try:
                info = _get(f"{url}/object_info")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        else:
            info = None
        if proc.poll() is not None or info is None:
            raise AssertionError("ComfyUI did not start:\n" + (base / "server.log").read_text()[-4000:])
        yield url, info, base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        print((base / "server.log").read_text()[-3000:])


def _taesd() -> dict:
    """A random TAESD in its original key layout (what core's VAELoader loads from models/vae)."""
    from diffusers import AutoencoderTiny
    from diffusers_host import taesd_keys

    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in taesd_keys(AutoencoderTiny().state_dict()).items()}


def _qwen_full_size() -> dict:
    """A random Qwen-Image VAE at its real widths (127 M parameters, fp16: 254 MB), in the original Wan layout:
    ComfyUI v0.3.64's loader builds its Wan VAE at those widths only."""
    from vae_core.families.wan.model import WanConfig, WanVAE

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanVAE(WanConfig()).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("gamma"):
            out[k] = torch.ones(shape, dtype=torch.float16)
        elif len(shape) > 1:  # fan-in scaled: a non-trivial image
            fan_in = int(torch.tensor(shape[1:]).prod()) // (shape[2] if len(shape) == 5 else 1)
            out[k] = (torch.randn(shape, generator=g) / fan_in ** 0.5).half()
        else:
            out[k] = torch.zeros(shape, dtype=torch.float16)
    return out


def _hv10_full_size() -> dict:
    """A random HunyuanVideo 1.0 VAE at its real widths (246 M parameters, fp16: 493 MB) in ComfyUI's layout:
    v0.3.64's VAELoader builds it at those widths only (GroupNorm gains 1)."""
    from vae_core.families.hv10.model import HV10Config, HV10VAE

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in HV10VAE(HV10Config()).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, shape in shapes.items():
        if len(shape) > 1:  # fan-in scaled: a non-trivial image
            out[k] = (torch.randn(shape, generator=g) / int(torch.tensor(shape[1:]).prod()) ** 0.5).half()
        elif "norm" in k and k.endswith("weight"):
            out[k] = torch.ones(shape, dtype=torch.float16)
        else:
            out[k] = (torch.randn(shape, generator=g) * 0.05).half()
    return out


def _ltx_full_size() -> dict:
    """A random LTX-Video 0.9.0 VAE at its real widths (419 M parameters, fp16: 838 MB), in Lightricks' layout:
    v0.3.64's VAELoader reads no metadata and builds LTX from its own guess of the released configs, so only real
    widths load there (its decoder reflects at the borders: our default for files that do not say)."""
    from vae_core.families.ltx.model import LTXVAE, release_config

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LTXVAE(release_config("0.9.0")).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("std-of-means"):
            out[k] = (torch.rand(shape, generator=g) + 0.5).half()
        elif len(shape) > 1:  # fan-in scaled: a non-trivial image
            fan_in = int(torch.tensor(shape[1:]).prod())
            out[k] = (torch.randn(shape, generator=g) / fan_in ** 0.5).half()
        else:
            out[k] = (torch.randn(shape, generator=g) * 0.05).half()
    return out


def _submit(url: str, graph: dict) -> str:
    return _post(f"{url}/prompt", {"prompt": graph, "client_id": "vae-pack-test"})["prompt_id"]


def _wait(url: str, base: Path, pid: str) -> dict:
    for _ in range(1200):
        hist = _get(f"{url}/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
            return hist[pid]
        time.sleep(0.5)
    raise AssertionError("workflow did not finish: " + (base / "server.log").read_text()[-3000:])


def _run(url: str, base: Path, graph: dict) -> dict:
    entry = _wait(url, base, _submit(url, graph))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    return entry["outputs"]


def _saved(base: Path, outputs: dict, node: str) -> np.ndarray:
    from PIL import Image

    img = outputs[node]["images"][0]
    return np.asarray(Image.open(base / "output" / img["subfolder"] / img["filename"]), dtype=np.float32)


def _direct_roundtrip(path: Path) -> np.ndarray:
    from PIL import Image

    vae = vae_core.load_vae(path)
    x = torch.from_numpy(np.asarray(Image.open(SAMPLE).convert("RGB"), dtype=np.float32).copy())[None] / 255.0
    y = vae.decode(vae.encode(x.movedim(-1, 1) * 2 - 1))
    return (((y + 1) / 2).clamp(0, 1).movedim(1, -1)[0].numpy() * 255.0)


def ui_to_api(workflow: dict, info: dict) -> dict:
    """Convert a UI-format workflow to API format with the server's own widget order (as the frontend does)."""
    links = {lk[0]: lk for lk in workflow["links"]}
    graph = {}
    for node in workflow["nodes"]:
        spec = info[node["type"]]["input"]
        order = info[node["type"]]["input_order"]["required"] + info[node["type"]]["input_order"].get("optional", [])
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        widgets = iter(node.get("widgets_values", []))
        inputs = {}
        for name in order:
            if name in linked:
                lk = links[linked[name]]
                inputs[name] = [str(lk[1]), lk[2]]
            else:
                kind = {**spec.get("required", {}), **spec.get("optional", {})}[name][0]
                inputs[name] = next(widgets)
                if kind == "IMAGEUPLOAD" or (isinstance(kind, list) and name == "image"):
                    next(widgets, None)  # LoadImage's upload widget value
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return graph


def test_object_info_lists_our_nodes(server):
    _, info, _ = server
    for name in ("VaePackLoader", "VaePackDecodeTiled", "VaePackEncodeTiled", "VaePackFp16Fix", "VaePackCompare"):
        assert name in info and info[name]["category"] == "VAE Pack"
    choices = info["VaePackLoader"]["input"]["required"]["vae_name"][0]
    assert "mini-vae" in choices and "mini-vae-ldm.safetensors" in choices
    assert not any("diffusion_pytorch_model" in c for c in choices)


def test_tiled_workflow_and_core_decode_match_direct_roundtrip(server):
    url, _, base = server
    graph = json.loads((EXAMPLES / "tiled_roundtrip.api.json").read_text())
    outputs = _run(url, base, graph)
    direct = _direct_roundtrip(MINI_LDM)
    for node in ("5", "7"):  # our tiled decode, and core VAEDecode with our VAE
        assert np.abs(_saved(base, outputs, node) - direct).max() <= 2.0


def test_fp16_fix_workflow_runs_core_nodes(server):
    url, _, base = server
    outputs = _run(url, base, json.loads((EXAMPLES / "fp16_fix.api.json").read_text()))
    assert np.abs(_saved(base, outputs, "6") - _direct_roundtrip(MINI_DIFFUSERS)).max() <= 2.0


def test_vae_compare_example_compares_two_layouts_of_one_vae(server):
    url, _, base = server
    outputs = _run(url, base, json.loads((EXAMPLES / "vae_compare.api.json").read_text()))
    pair = _saved(base, outputs, "5")
    assert pair.shape == (512, 1024, 3) and np.abs(pair[:, :512] - _direct_roundtrip(MINI_LDM)).max() <= 2.0
    assert "A vs B: PSNR inf dB, largest difference 0/255" in outputs["7"]["text"][0]  # the same weights


def test_ui_format_examples_run(server):
    url, info, base = server
    for name in ("tiled_roundtrip.workflow.json", "fp16_fix.workflow.json", "vae_compare.workflow.json"):
        graph = ui_to_api(json.loads((EXAMPLES / name).read_text()), info)
        assert graph == json.loads((EXAMPLES / name.replace(".workflow.", ".api.")).read_text()), name
        assert _run(url, base, graph)


def test_interrupt_stops_a_tiled_decode_and_the_next_prompt_runs(server):
    url, _, base = server
    big = {"1": {"class_type": "VaePackLoader", "inputs": {"vae_name": "mini-vae-ldm.safetensors"}},
           "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 2048, "height": 2048, "batch_size": 1}},
           "3": {"class_type": "VaePackDecodeTiled", "inputs": {"samples": ["2", 0], "vae": ["1", 0],
                                                                  "tile_size": 128, "mode": "exact"}},
           "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "interrupted"}}}
    small = dict(big, **{"2": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128,
                                                                             "batch_size": 1}}})
    assert _run(url, base, small)["4"]["images"]  # the loader's output is now cached: the big run starts decoding
    pid = _submit(url, big)
    for _ in range(200):  # wait until it runs, then give it a moment to be inside the tiled decode (~10 s long)
        if any(item[1] == pid for item in _get(f"{url}/queue")["queue_running"]):
            break
        time.sleep(0.1)
    time.sleep(3)
    _post(f"{url}/interrupt", {})
    entry = _wait(url, base, pid)
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[:2000]
    kinds = {m[0]: m[1] for m in entry["status"]["messages"]}
    assert "execution_interrupted" in kinds, kinds
    assert kinds["execution_interrupted"]["node_type"] == "VaePackDecodeTiled"
    assert entry["outputs"] == {}  # nothing saved
    small["2"]["inputs"]["width"] = 192
    assert _run(url, base, small)["4"]["images"]  # the server goes on


def test_unknown_vae_from_core_loader_falls_back_with_a_note(server):
    """ComfyUI's pixel-space VAE (no network) is one vae_core does not know: ComfyUI's own tiler, a note, one log line."""
    url, _, base = server
    graph = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel.safetensors"}},
             "2": {"class_type": "LoadImage", "inputs": {"image": "sample.png"}},
             "3": {"class_type": "VaePackEncodeTiled", "inputs": {"pixels": ["2", 0], "vae": ["1", 0],
                                                                    "tile_size": 256, "mode": "exact"}},
             "4": {"class_type": "VaePackDecodeTiled", "inputs": {"samples": ["3", 0], "vae": ["1", 0],
                                                                    "tile_size": 256, "mode": "exact"}},
             "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "pixel"}},
             "6": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
             "7": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}}}
    seen = len((base / "server.log").read_text())
    outputs = _run(url, base, graph)
    assert "ComfyUI's own tiled decode" in outputs["6"]["text"][0], outputs["6"]
    assert "ComfyUI's own tiled encode" in outputs["7"]["text"][0], outputs["7"]
    assert _saved(base, outputs, "5").shape == (512, 512, 3)
    log = (base / "server.log").read_text()[seen:]  # this prompt's log: one line from us per call, no traceback
    assert log.count("VAE Pack tiled decode: not a VAE call the engine runs") == 1 and "Traceback" not in log, log


def test_taesd_from_core_loader_runs_exact_tiling(server):
    url, _, base = server
    graph = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny-taesd.safetensors"}},
             "2": {"class_type": "LoadImage", "inputs": {"image": "sample.png"}},
             "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 0]}},
             "4": {"class_type": "VaePackDecodeTiled", "inputs": {"samples": ["3", 0], "vae": ["1", 0],
                                                                    "tile_size": 128, "mode": "exact"}},
             "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "taesd-tiled"}},
             "6": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
             "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "taesd-core"}},
             "8": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}}}
    outputs = _run(url, base, graph)
    assert "halo tiling" in outputs["8"]["text"][0], outputs["8"]
    assert np.abs(_saved(base, outputs, "5") - _saved(base, outputs, "7")).max() <= 1.0  # = core VAE Decode


def test_engine_runs_on_comfy_weights_through_model_management(tmp_path):
    """In-process with ComfyUI's own modules (tests/comfy_real_probe.py): no second copy, model management."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    proc = subprocess.run([python, str(ROOT / "tests" / "comfy_real_probe.py"), COMFYUI, str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    probe = json.loads(line[6:])
    assert probe["shared"]["all_shared"] and probe["shared"]["engine_params"] == probe["shared"]["comfy_params"]
    assert probe["managed"], "ComfyUI's model management does not list the VAE after our tiled decode"
    assert probe["core_decode_std"] > 0.05 and probe["max_diff_vs_core_decode"] < 1e-4, probe
    assert "4 tiles" in probe["report"], probe["report"]
    # Load VAE keeps one fp32 copy (335 MB for SD widths) and the tiled decode keeps nothing more
    assert probe["rss"]["after_tiled_decode"] - probe["rss"]["after_load"] < 150, probe["rss"]


@pytest.mark.parametrize("name,family", [("flux2-ae.safetensors", "flux2"), ("qwen_image_vae.safetensors",
                                                                           "qwen-image"),
                                         ("taef2-random.safetensors", "taef2")])
def test_new_families_through_our_loader_into_core_and_tiled_nodes(server, name, family):
    url, _, base = server
    graph = {"1": {"class_type": "VaePackLoader", "inputs": {"vae_name": name}},
             "2": {"class_type": "LoadImage", "inputs": {"image": "sample.png"}},
             "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 0]}},
             "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
             "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": f"{family}-core"}},
             "6": {"class_type": "VaePackDecodeTiled", "inputs": {"samples": ["3", 0], "vae": ["1", 0],
                                                                    "tile_size": 256, "mode": "exact"}},
             "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"{family}-tiled"}},
             "8": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}
    outputs = _run(url, base, graph)
    assert family in outputs["8"]["text"][0] and "runs vae_core's network" in outputs["8"]["text"][0]
    direct = _direct_roundtrip(base / "models" / "vae" / name)
    for node in ("5", "7"):  # core VAE Encode/Decode, and our tiled decode, on the engine-backed VAE
        assert np.abs(_saved(base, outputs, node) - direct).max() <= 2.0, node


def test_taesd_through_our_loader_into_core_and_tiled_nodes(server):
    url, _, base = server
    graph = {"1": {"class_type": "VaePackLoader", "inputs": {"vae_name": "tiny-taesd.safetensors"}},
             "2": {"class_type": "LoadImage", "inputs": {"image": "sample.png"}},
             "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 0]}},
             "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
             "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "taesd-ours-core"}},
             "6": {"class_type": "VaePackDecodeTiled", "inputs": {"samples": ["3", 0], "vae": ["1", 0],
                                                                    "tile_size": 128, "mode": "exact"}},
             "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "taesd-ours-tiled"}},
             "8": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}
    outputs = _run(url, base, graph)
    assert "taesd" in outputs["8"]["text"][0]
    direct = _direct_roundtrip(base / "models" / "vae" / "tiny-taesd.safetensors")
    for node in ("5", "7"):  # ComfyUI's own TAESD built by our loader, and our exact tiled decode on it
        assert np.abs(_saved(base, outputs, node) - direct).max() <= 2.0, node


def test_qwen_image_vae_from_core_loader_runs_exact_tiling(server):
    """Core's VAELoader builds its Wan VAE for a Qwen-Image VAE file (video latents [B, 16, T, h, w]); our tiled nodes
    run the exact engine on a one-frame latent and equal core VAE Decode."""
    url, _, base = server
    graph = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen-full-random.safetensors"}},
             "2": {"class_type": "LoadImage", "inputs": {"image": "sample.png"}},
             "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "area", "width": 128,
                                                          "height": 128, "crop": "disabled"}},
             "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 0]}},
             "5": {"class_type": "VaePackDecodeTiled", "inputs": {"samples": ["4", 0], "vae": ["1", 0],
                                                                    "tile_size": 64, "mode": "exact"}},
             "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "qwen-tiled"}},
             "7": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 0]}},
             "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "qwen-core"}},
             "9": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}},
             "10": {"class_type": "VaePackEncodeTiled", "inputs": {"pixels": ["3", 0], "vae": ["1", 0],
                                                                     "tile_size": 64, "mode": "exact"}},
             "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 0]}},
             "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "qwen-enc"}}}
    outputs = _run(url, base, graph)
    assert re.search(r"stream(-levels)? tiling", outputs["9"]["text"][0]), outputs["9"]  # a one-frame clip
    core = _saved(base, outputs, "8")
    assert core.std() > 5  # a non-trivial image
    assert np.abs(_saved(base, outputs, "6") - core).max() <= 1.0  # our exact tiled decode = core VAE Decode
    assert np.abs(_saved(base, outputs, "12") - core).max() <= 1.0  # our tiled encode = core VAE Encode's latent


def test_vae_compare_node_in_a_real_graph(server):
    """VAE Compare with our loader's VAE (A, exact tiling) and core's TAESD (B): A's half equals a direct vae_core
    round trip, B's half core VAE Encode + Decode, and the metrics text gives A's PSNR against the photo."""
    url, info, base = server
    assert "VaePackCompare" in info and info["VaePackCompare"]["display_name"] == "VAE Compare"
    graph = {"1": {"class_type": "VaePackLoader", "inputs": {"vae_name": "mini-vae-ldm.safetensors"}},
             "2": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny-taesd.safetensors"}},
             "3": {"class_type": "LoadImage", "inputs": {"image": "sample.png"}},
             "4": {"class_type": "VaePackCompare", "inputs": {"image": ["3", 0], "vae_a": ["1", 0], "vae_b": ["2", 0],
                                                                "tile_size": 128, "mode": "exact",
                                                                "precision": "as loaded"}},
             "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "compare-pair"}},
             "6": {"class_type": "SaveImage", "inputs": {"images": ["4", 1], "filename_prefix": "compare-heat"}},
             "7": {"class_type": "PreviewAny", "inputs": {"source": ["4", 2]}},
             "8": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["2", 0]}},
             "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["2", 0]}},
             "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "compare-core"}}}
    outputs = _run(url, base, graph)
    pair, heat = _saved(base, outputs, "5"), _saved(base, outputs, "6")
    assert pair.shape == heat.shape == (512, 1024, 3)
    direct = _direct_roundtrip(base / "models" / "vae" / "mini-vae-ldm.safetensors")
    assert np.abs(pair[:, :512] - direct).max() <= 2.0
    assert np.abs(pair[:, 512:] - _saved(base, outputs, "10")).max() <= 2.0  # B = core VAE Encode + Decode
    text = outputs["7"]["text"][0]
    from vae_core.lab import metrics

    photo = torch.from_numpy(np.asarray(__import__("PIL.Image").Image.open(SAMPLE).convert("RGB"),
                                        dtype=np.float64).copy()).permute(2, 0, 1)[None] / 255
    expected = metrics.psnr(photo, torch.from_numpy(direct.astype(np.float64)).permute(2, 0, 1)[None] / 255)
    found = float(re.search(r"A .*?PSNR ([0-9.]+) dB", text).group(1))
    assert abs(found - expected) < 0.05, text
    assert text.count("tile 128 exact") == 2 and "tiny" in text and heat.max() > 100, text


def _saved_frames(base: Path, outputs: dict, node: str) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(base / "output" / i["subfolder"] / i["filename"]), dtype=np.float32)
                     for i in outputs[node]["images"]])


def _clip_graph(loader: str, vae_name: str, frames: int, tile: int,
                size: Optional[tuple[int, int]] = None) -> dict:
    """A graph over a clip of ``frames`` (1 + 2^k) alternating photo / inverted photo frames (``size``: scaled to W×H,
    else the 512² photo's 8-bit values exactly), node ``"c"``: core VAE Encode "8" and Decode "9", our tiled decode
    "10" (its report "11") and tiled encode "12" decoded by core "13", each saved as ``"s<node>"``; ``loader``:
    ``VAELoader`` (core's) or ``VaePackLoader`` (ours) as node "1"."""
    graph = {"1": {"class_type": loader, "inputs": {"vae_name": vae_name}},
             "2": {"class_type": "LoadImage", "inputs": {"image": "sample.png"}}}
    src = "2"
    if size is not None:
        graph["3"] = {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "area",
                                                             "width": size[0], "height": size[1], "crop": "disabled"}}
        src = "3"
    graph["4"] = {"class_type": "ImageInvert", "inputs": {"image": [src, 0]}}
    last, n, step = "b1", 2, 1
    graph["b1"] = {"class_type": "ImageBatch", "inputs": {"image1": [src, 0], "image2": ["4", 0]}}
    while n < frames - 1:
        step += 1
        graph[f"b{step}"] = {"class_type": "ImageBatch", "inputs": {"image1": [last, 0], "image2": [last, 0]}}
        last, n = f"b{step}", 2 * n
    assert n == frames - 1, frames
    graph["c"] = {"class_type": "ImageBatch", "inputs": {"image1": [last, 0], "image2": [src, 0]}}
    tiled = {"vae": ["1", 0], "tile_size": tile, "mode": "exact"}
    graph |= {"8": {"class_type": "VAEEncode", "inputs": {"pixels": ["c", 0], "vae": ["1", 0]}},
              "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 0]}},
              "10": {"class_type": "VaePackDecodeTiled", "inputs": {"samples": ["8", 0], **tiled}},
              "11": {"class_type": "PreviewAny", "inputs": {"source": ["10", 1]}},
              "12": {"class_type": "VaePackEncodeTiled", "inputs": {"pixels": ["c", 0], **tiled}},
              "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["1", 0]}}}
    graph |= {f"s{k}": {"class_type": "SaveImage", "inputs": {"images": [k, 0], "filename_prefix": f"clip-{k}"}}
              for k in ("c", "9", "10", "13")}
    return graph


def _check_clip(base: Path, outputs: dict, shape: tuple[int, ...]) -> np.ndarray:
    """Our tiled decode and encode of a :func:`_clip_graph` equal core's VAE Decode within 1/255 on every frame, over
    several tiles; returns core's frames."""
    found = re.search(r"(stream|stream-levels|clip-ops) tiling, (\d+) tiles", outputs["11"]["text"][0])
    assert found and int(found.group(2)) >= 2, outputs["11"]
    core = _saved_frames(base, outputs, "s9")
    assert core.shape == shape and core.std() > 5
    assert np.abs(_saved_frames(base, outputs, "s10") - core).max() <= 1.0  # our tiled decode = core VAE Decode
    assert np.abs(_saved_frames(base, outputs, "s13") - core).max() <= 1.0  # our tiled encode = core VAE Encode
    return core


def _direct_clip(base: Path, outputs: dict, vae_name: str) -> np.ndarray:
    """vae_core's own round trip of the clip core encoded (its saved 8-bit frames), in 0..255."""
    frames = torch.from_numpy(_saved_frames(base, outputs, "sc").astype(np.float64) / 255).float()
    vae = vae_core.load_vae(base / "models" / "vae" / vae_name)
    with torch.no_grad():
        direct = vae.decode(vae.encode(frames.permute(3, 0, 1, 2)[None] * 2 - 1))[0].permute(1, 2, 3, 0)
    return ((direct.clamp(-1, 1) + 1) * 127.5).numpy()


def _peer(base: Path, outputs: dict, core: np.ndarray, what: str) -> None:
    peer = np.abs(_saved_frames(base, outputs, "speer") - core)
    print(f"{what}: max {peer.max():.0f}/255, per frame {[round(float(f.max())) for f in peer]}")


def _core_tiled(tile: int, overlap: int) -> dict:
    """Core's VAE Decode (Tiled) of the clip's latents (the peer, printed), saved as ``"speer"``."""
    peer = {"samples": ["8", 0], "vae": ["1", 0], "tile_size": tile, "overlap": overlap, "temporal_size": 8,
            "temporal_overlap": 4}
    return {"peer": {"class_type": "VAEDecodeTiled", "inputs": peer},
            "speer": {"class_type": "SaveImage", "inputs": {"images": ["peer", 0], "filename_prefix": "clip-peer"}}}


def test_wan21_video_from_core_loader_runs_exact_streamed_tiling(server):
    """A full-width random Wan 2.1 VAE built by core's VAELoader (core's own WanVAE) on a 5-frame clip
    (alternating photo / inverted photo): our tiled decode of core's 2-latent-frame encode gives core VAE Decode's
    5 frames, and our tiled encode decodes (by core) to the same frames, all within 1/255; core's VAE Decode
    (Tiled) runs alongside as the peer (its deviation is printed, not asserted)."""
    url, _, base = server
    graph = _clip_graph("VAELoader", "qwen-full-random.safetensors", 5, 64, (96, 64)) | _core_tiled(64, 32)
    outputs = _run(url, base, graph)
    core = _check_clip(base, outputs, (5, 64, 96, 3))
    _peer(base, outputs, core, "core VAE Decode (Tiled), 64 px / 32 overlap")


def test_hv15_video_through_our_loader_into_core_and_tiled_nodes(server):
    """A HunyuanVideo 1.5 VAE (v0.3.64 predates it) through our Load VAE: core VAE Encode takes the 5 IMAGE frames as
    one clip and core VAE Decode gives 5 frames (core's video conventions on an engine VAE), equal to a direct
    vae_core round trip; our tiled decode and encode equal core's within 1/255 on every frame."""
    url, _, base = server
    graph = _clip_graph("VaePackLoader", "hunyuanvideo15_vae.safetensors", 5, 256)
    graph["14"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}
    outputs = _run(url, base, graph)
    assert "hunyuanvideo1.5" in outputs["14"]["text"][0] and "runs vae_core's network" in outputs["14"]["text"][0]
    core = _check_clip(base, outputs, (5, 512, 512, 3))
    direct = _direct_clip(base, outputs, "hunyuanvideo15_vae.safetensors")
    assert np.abs(core - direct).max() <= 2.0  # core's Encode/Decode run the clip as one video, not 5 images


def test_wan_video_example_runs_exact(server):
    """examples/wan_video_tiled.api.json (a 5-frame clip through our tiled encode and decode, core VAE Decode beside
    it) at a small size: our decode equals core's on every frame within 1/255."""
    url, _, base = server
    graph = json.loads((EXAMPLES / "wan_video_tiled.api.json").read_text())
    graph["2"]["inputs"] |= {"width": 96, "height": 64}
    for node in ("5", "6"):
        graph[node]["inputs"]["tile_size"] = 64
    outputs = _run(url, base, graph)
    ours, core = _saved_frames(base, outputs, "7"), _saved_frames(base, outputs, "9")
    assert ours.shape == core.shape == (5, 64, 96, 3) and np.abs(ours - core).max() <= 1.0
    assert re.search(r"stream(-levels)? tiling", outputs["10"]["text"][0]), outputs["10"]


def test_ltx_video_from_core_loader_runs_exact_streamed_tiling(server):
    """A full-width LTX-Video 0.9.0 VAE built by core's VAELoader (core's own VideoVAE) on a 9-frame clip: our tiled
    decode (non-causal layers lagging, per-channel normalised latents as core's encode gives them) of core's
    2-latent-frame encode gives core VAE Decode's 9 frames, and our tiled encode decodes (by core) to the same frames,
    all within 1/255; core's VAE Decode (Tiled) runs alongside as the peer (printed; it fails below 4 latent px per
    tile, reflect padding of a 2-px tile: 128 px, 1/4 overlap)."""
    url, _, base = server
    graph = _clip_graph("VAELoader", "ltxv-0.9.0-random.safetensors", 9, 64, (192, 128)) | _core_tiled(128, 32)
    outputs = _run(url, base, graph)
    core = _check_clip(base, outputs, (9, 128, 192, 3))
    _peer(base, outputs, core, "LTX-Video, core VAE Decode (Tiled), 128 px / 32 overlap, 8 frames / 4")


def test_hv10_video_from_core_loader_runs_exact_tiling(server):
    """A full-width HunyuanVideo 1.0 VAE built by core's VAELoader (core's AutoencoderKL with 3-D convs, unmasked
    mid-block attention, whole-clip GroupNorm) on a 9-frame clip: our tiled decode of core's 3-latent-frame encode
    gives core VAE Decode's 9 frames, and our tiled encode decodes (by core) to the same frames, all within 1/255 —
    the whole-clip statistics pooled over our pieces, the attention unmasked as core's module says; core's VAE
    Decode (Tiled) runs alongside as the peer (printed). Our Load VAE gives core's own VAE for the same file."""
    url, _, base = server
    graph = _clip_graph("VAELoader", "hunyuan-video-random.safetensors", 9, 64, (192, 128)) | _core_tiled(64, 32)
    graph |= {"20": {"class_type": "VaePackLoader", "inputs": {"vae_name": "hunyuan-video-random.safetensors"}},
              "21": {"class_type": "PreviewAny", "inputs": {"source": ["20", 1]}},
              "22": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["20", 0]}},
              "s22": {"class_type": "SaveImage", "inputs": {"images": ["22", 0], "filename_prefix": "clip-22"}}}
    outputs = _run(url, base, graph)
    core = _check_clip(base, outputs, (9, 128, 192, 3))
    assert "clip-ops" in outputs["11"]["text"][0]
    # our Load VAE hands the released widths to core's own HunyuanVideo VAE: core VAE Decode on it is core's decode
    assert "hunyuanvideo" in outputs["21"]["text"][0], outputs["21"]
    assert np.abs(_saved_frames(base, outputs, "s22") - core).max() <= 1.0
    _peer(base, outputs, core, "HunyuanVideo 1.0, core VAE Decode (Tiled), 64 px / 32 overlap, 8 frames / 4")


def test_ltx2_video_through_our_loader_into_core_and_tiled_nodes(server):
    """An LTX-2 VAE (v0.3.64 predates it) through our Load VAE: core VAE Encode takes the 9 IMAGE frames as one clip
    (normalised latents, core's LTX convention) and core VAE Decode gives 9 frames, equal to a direct vae_core round
    trip; our tiled decode and encode equal core's within 1/255 on every frame."""
    url, _, base = server
    graph = _clip_graph("VaePackLoader", "ltx-2-vae.safetensors", 9, 256)
    graph["14"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}
    outputs = _run(url, base, graph)
    info = outputs["14"]["text"][0]
    assert "ltx2" in info and "runs vae_core's network" in info and "per-channel normalised" in info, info
    core = _check_clip(base, outputs, (9, 512, 512, 3))
    # core's Encode/Decode run the clip as one video, not 9 images (SaveImage truncates to 8 bits, and core's latents
    # pass through the normalisation and back: up to 3 levels on this random network)
    assert np.abs(core - _direct_clip(base, outputs, "ltx-2-vae.safetensors")).max() <= 3.0
