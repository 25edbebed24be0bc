"""ComfyUI glue of the VAE pack. Reached only by relative import from the pack's root ``__init__``."""
from .vae_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
