"""Entry point of ``python -m vae_core``."""
import sys

from .cli.main import main

sys.exit(main())
