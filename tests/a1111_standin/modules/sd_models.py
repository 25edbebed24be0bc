import os

import torch

from modules import paths

model_path = os.path.join(paths.models_path, "Stable-diffusion")


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    if checkpoint_file.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(checkpoint_file, device=map_location or "cpu")
    else:
        sd = torch.load(checkpoint_file, map_location=map_location or "cpu", weights_only=True)
    return sd.pop("state_dict", sd) if isinstance(sd.get("state_dict"), dict) else sd
