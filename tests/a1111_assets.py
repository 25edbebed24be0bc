"""Writes what a real A1111 v1.10.1 server needs to load an SD1-style model offline, in seconds, on a CPU.

Run with A1111's own interpreter (it imports ``ldm`` from the tree's ``repositories/`` and ``transformers``):

    A1111_PYTHON a1111_assets.py A1111_DIR CHECKPOINT_STEM HF_HOME

and it writes

* ``CHECKPOINT_STEM.yaml``: an SD1 ``LatentDiffusion`` config with a shrunk UNet and text encoder and the bundled
  test VAE's real widths (A1111 uses a same-named ``.yaml`` next to a checkpoint as its config);
* ``CHECKPOINT_STEM.safetensors``: a complete state dict for it (UNet, CLIP text model, first-stage VAE), randomly
  initialised the way ldm initialises (so the UNet's output layers are zero and it predicts no noise; the VAE is
  an untrained one, so an external VAE changes the images);
* ``HF_HOME/hub/models--openai--clip-vit-large-patch14``: a Hugging Face cache entry with the tiny text model's
  config and the real CLIP tokenizer files, built from the BPE merges the ``clip`` package ships
  (``ldm``'s ``FrozenCLIPEmbedder`` loads its tokenizer from there; ``HF_HUB_OFFLINE=1`` keeps it local).

The yaml is written as JSON (a subset of YAML), so nothing here needs PyYAML. Prints one line, ``ASSETS {json}``.
"""
from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path
from typing import Any

CLIP_REPO = "openai/clip-vit-large-patch14"
SNAPSHOT = "0" * 40  # the commit name of our local snapshot; any 40 hex digits
TEXT_WIDTH = 32
#: sigma_max of the SD1 noise schedule below is ~14.6; a zero-noise UNet leaves the initial noise in place, so this
#: scale factor turns it back into latents of the size the test VAE produces (raw std ~5).
SCALE_FACTOR = 3.0

UNET = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [2],
        "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16, "use_spatial_transformer": True,
        "transformer_depth": 1, "context_dim": TEXT_WIDTH, "use_checkpoint": False, "legacy": False}
#: the bundled test VAE (tests/fixtures/mini-vae-ldm.safetensors): ch 32, ch_mult 1,2,4,4, 2 res blocks, 4 latents
FIRST_STAGE = {"embed_dim": 4, "monitor": "val/rec_loss",
               "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                            "ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                            "dropout": 0.0},
               "lossconfig": {"target": "torch.nn.Identity"}}
TEXT_CONFIG = {"model_type": "clip_text_model", "architectures": ["CLIPTextModel"], "vocab_size": 49408,
               "hidden_size": TEXT_WIDTH, "intermediate_size": 2 * TEXT_WIDTH, "num_hidden_layers": 2,
               "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
               "projection_dim": TEXT_WIDTH, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}


def model_config() -> dict[str, Any]:
    """The checkpoint's config, in the shape of SD1's ``v1-inference.yaml`` with small parts."""
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 64, "channels": 4,
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": SCALE_FACTOR, "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": UNET},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": FIRST_STAGE},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}}}


def clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """The CLIP BPE vocabulary (token → id) and merges, from the gzipped merges file the ``clip`` (or ``open_clip``)
    package ships: 256 byte symbols, the same with ``</w>``, one token per merge, then the two special tokens."""
    for package in ("clip", "open_clip"):
        try:
            module = __import__(package)
        except ImportError:
            continue
        path = Path(module.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            break
    else:
        raise FileNotFoundError("bpe_simple_vocab_16e6.txt.gz: neither `clip` nor `open_clip` is installed")
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    merges = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_cache(hf_home: Path) -> Path:
    """A cache entry for ``openai/clip-vit-large-patch14`` holding the tiny config and the tokenizer files."""
    repo = hf_home / "hub" / ("models--" + CLIP_REPO.replace("/", "--"))
    snap = repo / "snapshots" / SNAPSHOT
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    (hf_home / "hub" / "version.txt").write_text("1")  # transformers' cache layout version: no "old cache" warning
    vocab, merges = clip_vocabulary()
    (snap / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (snap / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (snap / "special_tokens_map.json").write_text(json.dumps(special))
    (snap / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}))
    (snap / "config.json").write_text(json.dumps(TEXT_CONFIG))
    return snap


def write_checkpoint(a1111: Path, stem: Path, seed: int = 0) -> dict[str, int]:
    """``stem``.yaml and ``stem``.safetensors: every parameter the config's modules have, under their SD1 prefixes."""
    sys.path.insert(0, str(a1111 / "repositories" / "stable-diffusion-stability-ai"))
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    parts = {"model.diffusion_model.": UNetModel(**UNET), "first_stage_model.": AutoencoderKL(**FIRST_STAGE),
             "cond_stage_model.transformer.": CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))}
    state = {prefix + k: v.detach().contiguous() for prefix, m in parts.items() for k, v in m.state_dict().items()}
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".yaml").write_text(json.dumps(model_config(), indent=1))
    save_file(state, str(stem.with_suffix(".safetensors")))
    return {prefix: sum(p.numel() for p in m.parameters()) for prefix, m in parts.items()}


def main(argv: list[str]) -> None:
    a1111, stem, hf_home = (Path(a) for a in argv[1:4])
    snap = write_clip_cache(hf_home)
    counts = write_checkpoint(a1111, stem)
    print("ASSETS " + json.dumps({"clip_snapshot": str(snap), "parameters": counts}))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv)
