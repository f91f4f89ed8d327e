"""Where the bundled demo models, calibration text and held-out eval text live: inside the
installed package (package data, found with importlib.resources), so a wheel install finds them."""

from importlib.resources import files
from pathlib import Path

# The package's own folder: an installed wheel unpacks its data next to the code, so this is a plain path.
PACKAGE = Path(str(files("quantmoe")))
DATA = PACKAGE / "data"

DEMO_MODELS = {
    "mixtral-demo": PACKAGE / "demo_models" / "mixtral-demo",
    "qwen2moe-demo": PACKAGE / "demo_models" / "qwen2moe-demo",
}
DEFAULT_MODEL = DEMO_MODELS["mixtral-demo"]
CALIB_DATA = DATA / "python_docs_calib.jsonl"
EVAL_DATA = DATA / "python_docs_heldout.jsonl"

NSAMPLES = 128
MAX_SEQLEN = 2048


def default_seqlen(config) -> int:
    """min(2048, the model's context)."""
    return min(MAX_SEQLEN, int(getattr(config, "max_position_embeddings", MAX_SEQLEN) or MAX_SEQLEN))
