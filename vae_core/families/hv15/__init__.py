"""The hv15 family: the HunyuanVideo 1.5 VAE design (network, key layouts, fp16 fix, :mod:`.family`)."""
