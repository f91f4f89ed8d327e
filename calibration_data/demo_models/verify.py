"""Re-measure the demo models' held-out perplexity and check it against their model cards.

Loads each folder the way a user would (``AutoModelForCausalLM`` / ``AutoTokenizer``,
offline), runs the protocol of ``train.py`` in float32 on whatever device is here
(usually the CPU), and compares with the perplexity in the folder's
``training_report.json``, which was measured on the GPU that trained it.

Usage:
    python calibration_data/demo_models/verify.py                 # both shipped models
    python calibration_data/demo_models/verify.py path/to/folder  # any folder train.py wrote
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the folders are local; never reach for the Hub

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402  (same folder; shares the protocol code rather than copying it)

TOLERANCE = 0.01  # relative; bf16-free float32 on both sides, so only kernel order differs


def verify(folder: Path) -> dict:
    report = json.loads((folder / "training_report.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    device = torch.device("cpu")
    held = train.read_jsonl(train.HELDOUT_JSONL)
    stream = train.encode(tokenizer, train.DOC_SEPARATOR.join(d["text"] for d in held))
    windows = train.windows(stream, report["heldout"]["context"])
    t0 = time.time()
    nll = train.mean_nll(model, windows, 8, device)
    ppl, card = math.exp(nll), report["heldout"]["perplexity"]
    rel = abs(ppl - card) / card
    result = {
        "folder": str(folder),
        "model_class": type(model).__name__,
        "tokens": stream.numel(),
        "windows": windows.shape[0],
        "perplexity_here": ppl,
        "perplexity_card": card,
        "relative_difference": rel,
        "within_tolerance": rel <= TOLERANCE,
        "seconds": time.time() - t0,
        "transformers_here": transformers.__version__,
        "transformers_card": report["environment"]["transformers"],
    }
    if stream.numel() != report["heldout"]["tokens"]:
        result["warning"] = f"tokenized to {stream.numel()} tokens here, {report['heldout']['tokens']} in the card"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path, default=[train.DEMO_DIR / "mixtral-demo", train.DEMO_DIR / "qwen2moe-demo"])
    args = parser.parse_args()
    failed = False
    for folder in args.folders:
        result = verify(folder)
        print(json.dumps(result, indent=2))
        failed |= not result["within_tolerance"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
