"""The lab's HTML report rendered in a real headless Chromium (Debian's package; ``.ci/run`` installs it): the
screenshot shows the embedded images and the charts. Skipped with a reason when no browser is installed, unless
``VAE_PACK_BROWSER=required`` (set by ``.ci/run``), which makes a missing browser a failure."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

import vae_core
from vae_core.lab.run import run_lab
from vae_core.lab.report import make_panels, write_report
from conftest import MINI_LDM

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
REQUIRED = os.environ.get("VAE_PACK_BROWSER") == "required"
MAGENTA = np.array([255, 0, 255])
BAR = np.array([0x3B, 0x6F, 0xB6])  # the first VAE's bar colour in the charts


def _screenshot(html, png, tmp_path, height=2600):
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", f"--window-size=1280,{height}", f"--screenshot={png}",
           html.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file(), proc.stderr[-2000:]


@pytest.mark.skipif(BROWSER is None and not REQUIRED, reason="no headless browser (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    assert BROWSER, "VAE_PACK_BROWSER=required but no chromium on PATH"
    rng = np.random.default_rng(0)
    img = (rng.random((192, 192, 3)) * 80 + 90).astype(np.uint8)
    img[40:100, 60:120] = MAGENTA  # a colour nothing else on the page uses
    Image.fromarray(img).save(tmp_path / "probe.png")
    vaes = {"mini": vae_core.load_vae(MINI_LDM)}
    result = run_lab([tmp_path / "probe.png"], vaes, ["fp32"], [None, 64], ["exact", "fast"], panels=make_panels)
    paths = write_report(result, tmp_path / "rep")
    shot = tmp_path / "shot.png"
    _screenshot(paths["html"], shot, tmp_path)
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert px.shape[1] == 1280
    assert (np.abs(px - 255).sum(-1) > 30).mean() > 0.03  # not a blank page
    magenta = (np.abs(px - MAGENTA).sum(-1) < 40).sum()
    assert magenta > 0.8 * 60 * 60  # the original crop, embedded as a data URI, is drawn at 1:1
    bars = (np.abs(px - BAR).sum(-1) < 12).sum()
    assert bars > 2000  # the SVG charts' bars
