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


def beyond_context(config, seqlen: int) -> str | None:
    """Where ``seqlen`` tokens exceed the model's context (its config's max_position_embeddings), what to tell the
    user; else None."""
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and 0 < context < seqlen:
        return (f"--seqlen {seqlen} is longer than the model's context ({context} positions, its "
                "max_position_embeddings): positions beyond it were never trained, so this runs the model outside "
                f"its context; use --seqlen {min(context, MAX_SEQLEN)} or less to stay within it")
    return None


def published_name(path: str | Path) -> str:
    """How a published file (model card, manifest, logs, eval reports) names a model or data source:
    ``org/name`` for a Hub download (its cache folder ``models--org--name/snapshots/<sha>``), the
    folder or file name for anything else local, and a Hub id or datasets name unchanged. Never a
    local path: those tell the world a user name and a folder layout (``--record-paths`` keeps them)."""
    text = str(path)
    for part in Path(text).parts:
        for kind in ("models--", "datasets--"):
            if part.startswith(kind):
                return part[len(kind):].replace("--", "/", 1)
    local = Path(text).expanduser()
    if local.is_absolute() or text.startswith((".", "~")) or local.exists():
        return local.resolve().name if local.name in ("", ".", "..") else local.name
    return text  # not a local path: a Hub id (org/name) or a datasets name
