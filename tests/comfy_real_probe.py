"""Run with a REAL ComfyUI's own interpreter (see tests/test_comfy_real.py): ComfyUI's modules in-process, this pack
loaded by ComfyUI's own ``nodes.load_custom_node``, and an SD-width VAE (83.7 M parameters, random, built with
ComfyUI's own AutoencoderKL and saved as a file). Prints one JSON line:

* ``shared``: whether every parameter of the engine the tiled node ran on is one of the ComfyUI VAE's own tensors
  (compared by storage), and how many parameters each side has;
* ``managed``: whether ComfyUI's model management lists the VAE's patcher as loaded after our tiled decode;
* ``rss``: process RSS in MiB after Load VAE, after our tiled decode, and the same for core's VAELoader + tiled
  decode in a fresh process (``--core``), to compare what each keeps in RAM.

Usage: python comfy_real_probe.py COMFYUI_DIR WORK_DIR PACK_ROOT [--core]
"""
import asyncio
import ctypes
import gc
import json
import os
import sys

comfy_dir, work, pack = sys.argv[1:4]
core_only = "--core" in sys.argv[4:]
os.chdir(comfy_dir)
sys.path.insert(0, comfy_dir)

import psutil  # noqa: E402  (a ComfyUI requirement)
import torch  # noqa: E402

from comfy.cli_args import args  # noqa: E402

args.cpu = True  # as main.py --cpu (a CUDA build of torch on a machine without a GPU would look for one)
import comfy.model_management as mm  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402
from comfy.ldm.models.autoencoder import AutoencoderKL  # noqa: E402


def rss() -> float:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so RSS shows what is still held
    except OSError:
        pass
    return psutil.Process().memory_info().rss / 2**20


vae_dir = os.path.join(work, "vae")
os.makedirs(vae_dir, exist_ok=True)
path = os.path.join(vae_dir, "sd-width.safetensors")
if not os.path.exists(path):
    torch.manual_seed(0)
    dd = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    model = AutoencoderKL(ddconfig=dd, embed_dim=4)
    sd = {k: torch.randn_like(v) / (v[0].numel() ** 0.5) if v.ndim > 1 else  # fan-in scaled: a non-trivial output
          (torch.ones_like(v) if "norm" in k and k.endswith("weight") else torch.zeros_like(v))
          for k, v in model.state_dict().items()}
    comfy.utils.save_torch_file(sd, path)
    del model, sd
folder_paths.folder_names_and_paths["vae"] = ([vae_dir], folder_paths.supported_pt_extensions)

z = torch.randn(1, 4, 32, 32)
result = {"rss": {"start": rss()}}
if core_only:
    vae = nodes.VAELoader().load_vae("sd-width.safetensors")[0]
    result["rss"]["after_load"] = rss()
    vae.decode_tiled(z, tile_x=16, tile_y=16, overlap=4)
    result["rss"]["after_tiled_decode"] = rss()
else:
    custom = os.path.join(work, "custom_nodes")
    os.makedirs(custom, exist_ok=True)
    link = os.path.join(custom, "vae-pack")
    if not os.path.exists(link):
        os.symlink(pack, link)
    assert asyncio.run(nodes.load_custom_node(link)), "ComfyUI could not load the pack"
    classes = nodes.NODE_CLASS_MAPPINGS
    vae, info = classes["VaePackLoader"]().load("sd-width.safetensors")
    result["rss"]["after_load"] = rss()
    image, report = classes["VaePackDecodeTiled"]().decode({"samples": z}, vae, 128, "exact")
    result["rss"]["after_tiled_decode"] = rss()
    result["report"] = report
    bridge = next(m for n, m in sys.modules.items() if n.endswith(".nodes.comfy_bridge"))
    with bridge.engine_for(vae).attached() as engine:
        mine = [p.untyped_storage().data_ptr() for p in engine.model.parameters()]
    theirs = {p.untyped_storage().data_ptr() for p in vae.first_stage_model.parameters()}
    result["shared"] = {"engine_params": len(mine), "comfy_params": len(theirs),
                        "all_shared": bool(mine) and all(p in theirs for p in mine)}
    result["managed"] = any(lm.model is vae.patcher for lm in mm.current_loaded_models)
    with torch.no_grad():
        core = vae.decode(z)  # core VAEDecode's call on the same VAE
    result["max_diff_vs_core_decode"] = float((image - core).abs().max())
    result["core_decode_std"] = float(core.std())  # a non-trivial image, so the comparison means something
    result["image_shape"] = list(image.shape)
print("PROBE " + json.dumps(result))
