"""A1111 runs this at launch (``launch_utils.run_extension_installer``); ComfyUI-Manager runs it too.

Installs what the pack needs with A1111's own pip helper, only inside A1111's launcher; elsewhere it does nothing.
Never touches torch (the host brings it).
"""
try:
    import launch  # A1111's launcher module
except ImportError:  # not inside A1111 (e.g. ComfyUI-Manager): nothing to do
    launch = None

if launch is not None and hasattr(launch, "is_installed") and hasattr(launch, "run_pip"):
    for package, spec in (("safetensors", "safetensors>=0.4"), ("numpy", "numpy"), ("PIL", "pillow")):
        if not launch.is_installed(package):
            launch.run_pip(f"install {spec}", f"{spec} for the VAE pack")
