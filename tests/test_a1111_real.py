"""The extension against the REAL A1111 v1.10.1 modules, initialised offline (runs only when A1111_PATH is set).

    A1111_PATH=/path/to/stable-diffusion-webui A1111_PYTHON=/path/to/its/venv/bin/python \\
        python -m pytest tests/test_a1111_real.py

The tree needs its repositories/ at the commits v1.10.1 pins and a venv per shared/notes/a1111-offline.md.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import MINI_DIFFUSERS, MINI_LDM, ROOT, real_host

A1111 = os.environ.get("A1111_PATH")
pytestmark = real_host("A1111_PATH", "an A1111 v1.10.1 tree")


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    data = tmp_path_factory.mktemp("a1111-data")
    (data / "extensions").mkdir()
    os.symlink(ROOT, data / "extensions" / "vae-pack")
    vae_dir = data / "models" / "VAE"
    vae_dir.mkdir(parents=True)
    shutil.copy(MINI_LDM, vae_dir / "mini-ldm.safetensors")
    shutil.copytree(MINI_DIFFUSERS, vae_dir / "mini-vae")
    from safetensors.torch import load_file, save_file

    ldm = load_file(str(MINI_LDM))
    torch.save({"state_dict": ldm}, vae_dir / "as-bin.bin")
    save_file({f"first_stage_model.{k}": v for k, v in ldm.items()}, str(vae_dir / "full-checkpoint.safetensors"))
    python = os.environ.get("A1111_PYTHON", sys.executable)
    proc = subprocess.run([python, str(ROOT / "tests" / "a1111_real_probe.py"), A1111, str(data), str(MINI_LDM)],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))  # no __pycache__ in the A1111 tree
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[6:])


def test_scripts_load_without_errors(probe):
    assert any(s.endswith(os.path.join("scripts", "vae_pack.py")) for s in probe["scripts"]), probe["scripts"]
    assert probe["wrapped"] and not probe["errors"], probe["errors"]


def test_diffusers_folder_listed_under_its_name(probe):
    assert "mini-vae" in probe["entries"] and "mini-vae" in probe["items"]
    assert probe["entries"]["mini-vae"].endswith("diffusion_pytorch_model.safetensors")
    assert "diffusion_pytorch_model.safetensors" not in probe["entries"]
    assert {"as-bin.bin", "mini-ldm.safetensors", "full-checkpoint.safetensors"} <= set(probe["entries"])


def test_every_entry_strict_loads_into_real_ldm_autoencoder(probe):
    assert probe["loads"] and all(v["ok"] for v in probe["loads"].values()), probe["loads"]
    assert probe["loads"]["mini-vae"]["loaded_name"] == "mini-vae"
    assert all(v["class"].startswith("ldm.models.autoencoder") for v in probe["loads"].values())
