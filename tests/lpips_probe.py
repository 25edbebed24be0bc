"""Run by tests/test_lpips.py with a Python that has torchvision and lpips (the ComfyUI host venv): the lab's LPIPS
(``vae_core.cli.lab.load_lpips``) against the ``lpips`` package's own network, built the package's way with torchvision
handing it the same AlexNet, on random images. Prints ``PROBE <json>``.

    python tests/lpips_probe.py REPO_ROOT WORK_DIR
"""
import json
import os
import sys
from pathlib import Path

root, work = Path(sys.argv[1]), Path(sys.argv[2])
os.environ["TORCH_HOME"] = str(work / "torch-home")  # an empty hub cache: anything downloaded would land here
sys.path.insert(0, str(root))

import torch  # noqa: E402
import torchvision  # noqa: E402

torch.manual_seed(0)
alex = torchvision.models.alexnet(weights=None).eval()  # random ImageNet-shaped backbone (no download)
weights = work / "alexnet-random.pth"
torch.save(alex.state_dict(), weights)

from vae_core.cli.lab import load_lpips  # noqa: E402

ours = load_lpips(weights, torch.device("cpu"))

import lpips  # noqa: E402

real_alexnet = lpips.pretrained_networks.tv.alexnet
lpips.pretrained_networks.tv.alexnet = lambda *a, **k: alex  # the package slices torchvision's own module
reference = lpips.LPIPS(net="alex", pretrained=True, verbose=False).eval()
lpips.pretrained_networks.tv.alexnet = real_alexnet

g = torch.Generator().manual_seed(1)
a = torch.rand(2, 3, 96, 80, generator=g) * 2 - 1
b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
with torch.no_grad():
    ref = float(reference(a, b).mean())
    same = float(reference(a, a).mean())
result = {"ours": ours(a, b), "reference": ref, "ours_same": ours(a, a), "reference_same": same,
          "downloaded": sorted(str(p) for p in (work / "torch-home").rglob("*") if p.is_file())}
print("PROBE " + json.dumps(result))
