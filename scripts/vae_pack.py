"""A1111 loads this file (the extension folder is on sys.path while it is imported)."""
from webui_extension.script import VaePackScript, setup  # noqa: F401  (A1111 finds the Script subclass here)

setup()
