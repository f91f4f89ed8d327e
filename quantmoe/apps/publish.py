"""Publishing an export on the Hugging Face Hub, after checking that it is whole and documented.

``push`` checks, in this order, and refuses on the first problem:
1. ``quantmoe verify`` finds nothing (``stages.verify``): no link, hidden or stray file (upload_folder
   would send them too), every file matches ``manifest.json`` (sha256), the tensors have the layout
   the config says, no NaN/Inf, no all-zero module, at least one quantized module;
2. ``config.json`` has a ``quantization_config``;
3. ``README.md`` (the model card) names the base model recorded in the manifest and has every
   entry of ``report.CARD_SECTIONS`` (method, calibration data, eval protocol, perplexity table,
   bits per weight, loading in vLLM / transformers / GPTQModel).
Then it lists what will be uploaded and uploads exactly those files with
``HfApi.create_repo(exist_ok=True)`` + ``upload_folder``. The token is huggingface_hub's own
lookup: ``HF_TOKEN``, or the one saved by ``hf auth login``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..base.errors import QuantMoeError
from ..base.files import MANIFEST, read_manifest
from ..stages.report import CARD_SECTIONS, base_model_name
from ..stages.verify import verify

CARD = "README.md"
HUB_EXTRA = "pip install 'quantmoe[hub]'"


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _fix(problems: list[str]) -> str:
    if all("stray file" in p for p in problems):
        return "move the stray files out of the folder"
    return "the export is damaged or was edited after export; run quantmoe quantize again with --overwrite"


def check_card(folder: Path) -> list[str]:
    """What the model card fails to state (empty when it states everything push requires)."""
    card = folder / CARD
    if not card.is_file():
        return [f"{CARD} (the model card) is missing"]
    text = card.read_text(encoding="utf-8", errors="replace")
    missing = [f"{CARD} does not state {what} (no line with {marker!r})"
               for what, marker in CARD_SECTIONS.items() if marker not in text]
    base = (read_manifest(folder)[0] or {}).get("base_model")
    if isinstance(base, str) and base and base_model_name(base) not in text:
        missing.append(f"{CARD} does not name the base model {base_model_name(base)!r} recorded in {MANIFEST}")
    return missing


def validate(folder: str | Path) -> list[tuple[str, int]]:
    """Check ``folder`` for publishing; returns the files to upload as (relative path, bytes), sorted.

    Raises QuantMoeError naming the first problem (and how many more) and the fix.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise QuantMoeError(f"{folder} is not a folder; pass the output folder of quantmoe quantize")
    problems = verify(folder).problems
    if problems:
        more = f" (and {len(problems) - 1} more; quantmoe verify lists them all)" if len(problems) > 1 else ""
        raise QuantMoeError(f"refusing to push {folder}: {problems[0]}{more}; {_fix(problems)}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise QuantMoeError(f"refusing to push {folder}: config.json is missing or unreadable ({exc}); "
                            "push the output folder of quantmoe quantize") from None
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or "quant_method" not in qc:
        raise QuantMoeError(f"refusing to push {folder}: config.json has no quantization_config; "
                            "this is not a quantized export (push the output of quantmoe quantize)")
    missing = check_card(folder)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise QuantMoeError(f"refusing to push {folder}: {missing[0]}{more}; re-run quantmoe quantize with --eval "
                            "(it writes the card), or complete the card and rewrite the manifest")
    listed = read_manifest(folder)[0]["files"]
    files = [(name, (folder / name).stat().st_size) for name in listed]
    files.append((MANIFEST, (folder / MANIFEST).stat().st_size))
    return sorted(files)


def push(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         dry_run: bool = False, log: Callable[[str], None] = print) -> str | None:
    """Validate ``folder``, list what will be uploaded, then upload it to ``repo_id`` (unless ``dry_run``).

    Returns the commit URL of the upload, or None for a dry run.
    """
    folder = Path(folder).expanduser()
    files = validate(folder)
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise QuantMoeError(f"push needs huggingface_hub: {HUB_EXTRA}") from None
    target = f"{repo_id}" + (f" (branch {revision})" if revision else "") + (" [private]" if private else "")
    log(f"{folder} is valid; {'would upload' if dry_run else 'uploading'} {len(files)} files "
        f"({_human(sum(b for _, b in files))}) to {target}:")
    width = max(len(n) for n, _ in files)
    for name, size in files:
        log(f"  {name:<{width}}  {_human(size):>9}")
    if dry_run:
        log("dry run: nothing uploaded")
        return None
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                   allow_patterns=[name for name, _ in files],
                                   commit_message=f"Upload {folder.name} (quantmoe)")
    except Exception as exc:  # network, auth, permissions: one line, never a traceback
        detail = " ".join(str(exc).split())[:300]
        raise QuantMoeError(f"upload to {repo_id} failed ({type(exc).__name__}: {detail}); check the network, "
                            "the token (HF_TOKEN or `hf auth login`) and that you may write to that repo") from None
    return getattr(commit, "commit_url", None) or str(commit)
