"""What both hosts share: :mod:`.attach` (the engine on a host's own VAE module), :mod:`.guard` (the one NaN-guard
wrapper for a host's encode/decode methods) and :mod:`.fp16_inplace` (the fp16 fix written into a host's own
tensors). Nothing here imports a host: the ComfyUI nodes and the A1111 extension pass their objects in."""
