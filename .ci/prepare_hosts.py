#!/usr/bin/env python3
"""Prepare the real hosts for the real-host tests: ComfyUI v0.3.64, AUTOMATIC1111 v1.10.1 and Forge (main at dfdcbab6)
from the archives in ``shared/hosts/``, each unpacked with a virtual environment of its own built from the package
registries.

    eval "$(python3 .ci/prepare_hosts.py)"     # prints: export COMFYUI_PATH=... A1111_PATH=... FORGE_PATH=...

Everything goes in a cache folder outside the repository (``$VAE_PACK_HOST_CACHE``, default
``~/.cache/vae-pack-hosts``), one sub-folder per host whose name is a hash of the archive and of the recipe below, so
a changed recipe or archive builds afresh and an unchanged one is reused between local runs; a folder is used only
once its build finished (an ``ok`` marker written last). From nothing, both builds take a few minutes (they run side
by side; pip's downloads dominate). Nothing of the hosts is copied into the repository.

The shared folder is ``$VAE_PACK_SHARED``, else ``shared/`` beside the repository, else beside the repository this
clone was cloned from (a clean CI clone of a local checkout). Exits 2 with one line naming what is missing.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # the local CPU wheel; torchvision of the matching release, patched below
HOSTS = {
    "comfyui": {
        "archive": "ComfyUI-v0.3.64-a125cd84.tar.gz", "folder": "ComfyUI",
        "constraints": ["torch==2.13.0+cpu"],
        # lpips: the VAE lab's optional LPIPS metric needs torchvision, which only the hosts' venvs have here
        "steps": [[TORCH, "torchvision==0.28.0"], ["-r", "{src}/requirements.txt.vae-pack", "requests", "lpips==0.1.4"]],
        "drop": ("torch", "torchvision", "torchaudio"),
        "requirements": "requirements.txt",
        "check": "import torchvision; from comfy.cli_args import args; args.cpu = True; import comfy.sd",
    },
    "a1111": {
        "archive": "a1111-v1.10.1-82a973c0.tar.gz", "folder": "a1111",
        # v1.10.1 pins setuptools 69.5.1; torch 2.13 needs >= 77.0.3; < 81 keeps pkg_resources for lightning_fabric
        "constraints": ["torch==2.13.0+cpu", "setuptools>=77.0.3,<81"],
        "steps": [[TORCH], ["-r", "{src}/requirements.txt.vae-pack", "torchvision", "clip-anytorch", "torchdiffeq",
                            "torchsde"]],
        "drop": ("torch", "setuptools"),
        "requirements": "requirements_versions.txt",
        "check": "import torch, torchvision, gradio, ldm.models.autoencoder",
    },
}
HOSTS["forge"] = {
    "archive": "forge-dfdcbab6.tar.gz", "folder": "forge",
    # as for A1111 (setuptools for torch 2.13 and lightning), torchvision without its deps (the CUDA torch pin);
    # joblib: the built-in soft inpainting script imports it
    "constraints": ["torch==2.13.0+cpu", "setuptools>=77.0.3,<81"],
    "steps": [[TORCH], ["torchvision==0.28.0", "--no-deps"], ["-r", "{src}/requirements.txt.vae-pack", "joblib"]],
    "drop": ("torch", "setuptools"),
    "requirements": "requirements_versions.txt",
    "check": "import sys; sys.argv.append('--always-cpu'); import torch, torchvision, gradio, backend.loader",
    # what its first launch creates in its own tree (A1111's archive ships it), so the tests' check that a server
    # writes nothing there holds on a fresh build too
    "dirs": ["config_states"],
}
RECIPE_VERSION = "1"


def fail(message: str) -> "None":
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def shared_dir() -> Path:
    candidates = [Path(os.environ["VAE_PACK_SHARED"])] if os.environ.get("VAE_PACK_SHARED") else []
    candidates.append(ROOT.parent / "shared")
    origin = subprocess.run(["git", "-C", str(ROOT), "remote", "get-url", "origin"], capture_output=True, text=True)
    if origin.returncode == 0 and origin.stdout.strip() and "://" not in origin.stdout:
        candidates.append(Path(origin.stdout.strip()).expanduser().resolve().parent / "shared")
    for c in candidates:
        if (c / "hosts").is_dir():
            return c
    fail(f"no shared/hosts folder with the host archives in {[str(c) for c in candidates]}; expected the project's "
         "shared folder (set VAE_PACK_SHARED)")
    raise AssertionError


def _patch_torchvision(venv: Path) -> None:
    """PyPI's torchvision is a CUDA build: with CPU torch its two ``register_fake`` decorators for ``nms``/``qnms`` fail
    at import. Register them only when torchvision's compiled ops loaded (nothing VAE-related uses them)."""
    for meta in venv.glob("lib/python3*/site-packages/torchvision/_meta_registrations.py"):
        text = meta.read_text()
        for op in ("nms", "qnms"):
            old = f'@torch.library.register_fake("torchvision::{op}")'
            new = (f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() '
                   "else (lambda f: f))")
            text = text.replace(old, new)
        meta.write_text(text)


def build(name: str, spec: dict, archive: Path, work: Path, log) -> None:
    """Unpack into ``work``, make ``work/venv``, install the recipe, check the host imports."""
    work.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    src = work / spec["folder"]
    for d in spec.get("dirs", ()):
        (src / d).mkdir(exist_ok=True)
    reqs = [line for line in (src / spec["requirements"]).read_text().splitlines()
            if line.split("==")[0].split(">=")[0].split("<")[0].strip().lower() not in spec["drop"]]
    (src / "requirements.txt.vae-pack").write_text("\n".join(reqs) + "\n")
    (work / "constraints.txt").write_text("\n".join(spec["constraints"]) + "\n")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=log, stderr=subprocess.STDOUT)
    env = dict(os.environ, PIP_CONSTRAINT="", PIP_DISABLE_PIP_VERSION_CHECK="1")
    for step in spec["steps"]:
        args = [a.format(src=src) for a in step]
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c",
                        str(work / "constraints.txt"), *args], check=True, stdout=log, stderr=subprocess.STDOUT,
                       env=env)
    _patch_torchvision(venv)
    subprocess.run([str(venv / "bin" / "python"), "-c", spec["check"]], cwd=src, check=True, stdout=log,
                   stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=":".join(
                       [str(src)] + [str(p) for p in (src / "repositories").glob("*")])))


def main() -> int:
    shared = shared_dir()
    cache = Path(os.environ.get("VAE_PACK_HOST_CACHE", Path.home() / ".cache" / "vae-pack-hosts"))
    cache.mkdir(parents=True, exist_ok=True)
    ready: dict[str, Path] = {}
    running = {}
    for name, spec in HOSTS.items():
        archive = shared / "hosts" / spec["archive"]
        if not archive.is_file():
            fail(f"{archive}: missing; expected the {name} source archive")
        digest = hashlib.sha256(f"{RECIPE_VERSION}{spec}{archive.stat().st_size}{archive.name}".encode())
        final = cache / f"{name}-{digest.hexdigest()[:16]}"
        if (final / "ok").is_file():
            ready[name] = final
            continue
        shutil.rmtree(final, ignore_errors=True)
        log_path = cache / f"{name}.log"
        print(f"building {name} from {archive.name} (log: {log_path})", file=sys.stderr)
        # each build in a child process of this script, so the two pip runs overlap
        proc = subprocess.Popen([sys.executable, __file__, "--build", name, str(archive), str(final)],
                                stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))
        running[name] = (proc, final, log_path)
    for name, (proc, final, log_path) in running.items():
        if proc.wait() != 0:
            tail = log_path.read_text()[-3000:]
            fail(f"building the real {name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
        ready[name] = final
    exports = {
        "COMFYUI_PATH": ready["comfyui"] / HOSTS["comfyui"]["folder"],
        "COMFYUI_PYTHON": ready["comfyui"] / "venv" / "bin" / "python",
        "A1111_PATH": ready["a1111"] / HOSTS["a1111"]["folder"],
        "A1111_PYTHON": ready["a1111"] / "venv" / "bin" / "python",
        "FORGE_PATH": ready["forge"] / HOSTS["forge"]["folder"],
        "FORGE_PYTHON": ready["forge"] / "venv" / "bin" / "python",
    }
    print(" ".join(f"export {k}={shlex.quote(str(v))};" for k, v in exports.items()))
    return 0


def _build_one(name: str, archive: str, final: str) -> int:
    build(name, HOSTS[name], Path(archive), Path(final), sys.stderr)
    (Path(final) / "ok").write_text("built\n")  # last: a half-built folder is never used
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--build":
        sys.exit(_build_one(*sys.argv[2:5]))
    sys.exit(main())
