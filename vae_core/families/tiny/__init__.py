"""The tiny family: TAESD-design autoencoders (network, key layouts, :mod:`.family`)."""
