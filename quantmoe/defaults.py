"""Where the bundled demo model, calibration text and held-out eval text live."""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent

DEMO_MODELS = {
    "mixtral-demo": PACKAGE / "demo_models" / "mixtral-demo",
    "qwen2moe-demo": PACKAGE / "demo_models" / "qwen2moe-demo",
}
DEFAULT_MODEL = DEMO_MODELS["mixtral-demo"]
CALIB_DATA = REPO / "calibration_data" / "python_docs_calib.jsonl"
EVAL_DATA = REPO / "eval" / "data" / "python_docs_heldout.jsonl"

NSAMPLES = 128
MAX_SEQLEN = 2048


def default_seqlen(config) -> int:
    """min(2048, the model's context)."""
    return min(MAX_SEQLEN, int(getattr(config, "max_position_embeddings", MAX_SEQLEN) or MAX_SEQLEN))
