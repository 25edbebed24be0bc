"""The wan family: Qwen-Image's VAE, Wan 2.1 design (network, key layouts, fp16 fix, :mod:`.family`)."""
