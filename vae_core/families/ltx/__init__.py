"""The ltx family: the LTX-Video VAE design (network, key layouts, :mod:`.family`)."""
