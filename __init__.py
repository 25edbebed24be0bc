"""ComfyUI entry point of the VAE plugin pack.

Registers the nodes only when imported inside ComfyUI (``comfy`` and ``folder_paths`` importable); anywhere else
(pytest, A1111, a plain ``import``) it defines empty mappings and imports nothing of a host. The node package is
reached only by relative import: ComfyUI has a top-level module called ``nodes`` too.
"""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

try:
    import comfy.model_management  # noqa: F401
    import folder_paths  # noqa: F401
except ImportError:  # not inside ComfyUI
    pass
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
