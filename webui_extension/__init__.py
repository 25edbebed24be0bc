"""AUTOMATIC1111 glue of the VAE pack (loaded through ``scripts/vae_pack.py``). Logic lives in vae_core."""
