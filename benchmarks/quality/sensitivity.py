"""Where a quantized model's KL to the original comes from: the original weights of one part put
back into the quantized model, one part at a time, and the KL(original || quantized) measured the
way benchmarks/quality/ideas.py measures it (held-out windows of 512 tokens, layer by layer).

    python benchmarks/quality/sensitivity.py ORIGINAL QUANTIZED PATTERN [PATTERN ...] [--windows N]

A PATTERN is a regular expression over full tensor names (``model.layers.0.mlp.down_proj.weight``):
``'layers\\.0\\.mlp'`` puts back layer 0's whole MLP, ``'self_attn'`` every attention. Prints one line
per pattern (the first line: nothing put back). docs/quality.md, "Where Qwen2-MoE's KL is".
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ideas import SEQLEN, final_hidden, score  # noqa: E402

from quantmoe.base.paths import EVAL_DATA  # noqa: E402
from quantmoe.model.checkpoint import Checkpoint  # noqa: E402
from quantmoe.stages.evaluate import eval_windows  # noqa: E402


def mixed_hidden(original: Path, quantized: Path, pattern: str | None, windows: torch.Tensor) -> torch.Tensor:
    """The last hidden states of the quantized model with the tensors whose names match ``pattern`` taken
    from the original (both read under the source's names: an export is dequantized when read)."""
    source = Checkpoint(original)

    def put_back(i: int) -> dict[str, torch.Tensor]:
        prefix = source.layer_prefix(i)
        return {k: v for k, v in source.read_prefix(prefix).items() if re.search(pattern, prefix + k)}

    return final_hidden(quantized, windows, replace=None if pattern is None else put_back)[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("original", type=Path)
    ap.add_argument("quantized", type=Path)
    ap.add_argument("patterns", nargs="+")
    ap.add_argument("--windows", type=int, default=80, help="held-out windows scored [default: 80]")
    args = ap.parse_args(argv)
    windows, _ = eval_windows(Checkpoint(args.original).tokenizer(), EVAL_DATA, SEQLEN)
    windows = windows[:args.windows]
    head, reference = final_hidden(args.original, windows)
    for pattern in (None, *args.patterns):
        kl = score(head, reference, mixed_hidden(args.original, args.quantized, pattern, windows), windows)["kl"]
        print(f"{'nothing put back' if pattern is None else 'put back ' + repr(pattern)}: KL {1000 * kl:.2f}e-3",
              flush=True)


if __name__ == "__main__":
    main()
