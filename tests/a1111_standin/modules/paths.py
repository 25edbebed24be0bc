import os
import tempfile

models_path = os.environ.get("A1111_STANDIN_MODELS", os.path.join(tempfile.gettempdir(), "a1111-standin-models"))
