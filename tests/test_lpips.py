"""The lab's optional LPIPS (``--lpips-weights``) against the ``lpips`` package itself. LPIPS needs torchvision, which
cannot be installed beside this machine's CPU torch wheel in the test venv; the ComfyUI host venv (prepared by
``.ci/prepare_hosts.py``, which adds lpips) has both, so the comparison runs there (tests/lpips_probe.py). The
refusals need neither."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, real_host
from vae_core import VaeInputError
from vae_core.cli.lab import load_lpips


@real_host("COMFYUI_PATH", "a ComfyUI checkout (its venv has torchvision and lpips)")
def test_lpips_matches_the_lpips_package_without_downloading(tmp_path):
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    proc = subprocess.run([python, str(ROOT / "tests" / "lpips_probe.py"), str(ROOT), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    probe = json.loads(line[6:])
    assert probe["reference"] > 1e-3 and probe["ours"] == pytest.approx(probe["reference"], rel=1e-5, abs=1e-7)
    assert probe["ours_same"] == pytest.approx(0.0, abs=1e-7) and probe["downloaded"] == []


def test_lpips_refusals_name_the_problem(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # not installed
    with pytest.raises(VaeInputError, match="optional package 'lpips' is not importable.*pip install lpips"):
        load_lpips(tmp_path / "x.pth", torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "lpips", type(sys)("lpips"))  # installed, but the file is wrong
    with pytest.raises(VaeInputError, match="no such file"):
        load_lpips(tmp_path / "x.pth", torch.device("cpu"))
    torch.save({"features.0.weight": torch.zeros(1), "classifier.1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(VaeInputError, match=r"feature layers \[0\]; expected torchvision's AlexNet"):
        load_lpips(tmp_path / "other.pth", torch.device("cpu"))
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    with pytest.raises(VaeInputError, match="not a readable weights-only torch file"):
        load_lpips(tmp_path / "bad.pth", torch.device("cpu"))
