"""Entry point of ``python -m vae_core``."""
import sys

from .cli import main

sys.exit(main())
