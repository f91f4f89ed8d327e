"""Where each tool's gap comes from: perplexity of the original model with only one part
(attention, routed experts, shared expert, dense MLP) replaced by a tool's dequantized weights.

    python benchmarks/peers/ablate.py MODEL --work DIR [--tools quantmoe,gptqmodel,llmcompressor]

Reads the outputs run.py left in ``DIR/<model>/outputs/<tool>`` and the same held-out windows, and
writes ``DIR/<model>/ablation.json`` and ``eval/results/peers-<model>-ablation.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import SEQLEN, TOOLS  # noqa: E402

from quantmoe.base.paths import DEMO_MODELS, EVAL_DATA  # noqa: E402
from quantmoe.model.architectures import plan_layer  # noqa: E402
from quantmoe.model.checkpoint import Checkpoint  # noqa: E402
from quantmoe.model.stream import LayerStream  # noqa: E402
from quantmoe.stages.evaluate import eval_windows  # noqa: E402


def layer_parts(stream: LayerStream, index: int) -> dict[str, str]:
    """Layer-relative linear path -> the part it belongs to, from the architecture row."""
    plan = plan_layer(stream.arch, stream.config, index)
    parts = {m: "attention" for group in plan.attention for m in group}
    if plan.experts is not None:
        parts.update({plan.experts.linear(w, e): "experts" for e in range(plan.num_experts) for w in ("gate", "up", "down")})
    for mlp, label in ((plan.shared_expert, "shared_expert"), (plan.dense_mlp, "dense_mlp")):
        if mlp is not None:
            parts.update({mlp.linear(w): label for w in ("gate", "up", "down")})
    return parts


@torch.no_grad()
def mixed_perplexity(original: Path, quantized: Path, part: str, windows: torch.Tensor, batch_size: int = 8) -> float:
    base = LayerStream(Checkpoint(original), torch.device("cpu"))
    other = LayerStream(Checkpoint(quantized), torch.device("cpu"))
    batches = base.embed(windows, batch_size)
    replaced = [0]
    for i in range(base.num_layers):
        state = base.layer_state(i)
        theirs = other.layer_state(i)
        for module, which in layer_parts(base, i).items():
            if which == part and not torch.equal(theirs[f"{module}.weight"], state[f"{module}.weight"]):
                state[f"{module}.weight"] = theirs[f"{module}.weight"]
                replaced[0] += 1
        layer = base.load_layer(i, state)
        batches = base.run_layer(layer, batches)
        base.release_layer(i)
    base.load_head()
    nll, count = 0.0, 0
    for start, b in zip(range(0, windows.shape[0], batch_size), batches):
        ids = windows[start:start + batch_size]
        logits = base.logits(b.hidden)
        nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(nll / count), replaced[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--work", default="peers-work")
    parser.add_argument("--tools", default=",".join(TOOLS), type=lambda s: s.split(","))
    args = parser.parse_args()
    model = DEMO_MODELS.get(args.model, Path(args.model)).resolve()
    folder = Path(args.work).resolve() / model.name
    windows, _ = eval_windows(Checkpoint(model).tokenizer(), EVAL_DATA, SEQLEN)
    results = json.loads((Path(__file__).resolve().parents[2] / "eval" / "results" / f"peers-{model.name}.json").read_text())
    original = results["eval"]["original"]["perplexity"]
    stream = LayerStream(Checkpoint(model), torch.device("cpu"))
    parts = sorted({p for i in range(stream.num_layers) for p in layer_parts(stream, i).values()})
    out = {"original": original, "tools": {}}
    for tool in args.tools:
        out["tools"][tool] = {}
        for part in parts:
            ppl, replaced = mixed_perplexity(model, folder / "outputs" / tool, part, windows)
            out["tools"][tool][part] = {"perplexity": ppl, "gap_relative": (ppl - original) / original,
                                        "linears_replaced": replaced}
            print(f"{model.name} {tool:26s} {part:14s} {ppl:.4f} {100 * (ppl - original) / original:+.3f}% "
                  f"({replaced} linears differ from the original)", flush=True)
    (folder / "ablation.json").write_text(json.dumps(out, indent=1))
    write_results(model.name, out)


def write_results(name: str, out: dict) -> None:
    """eval/results/peers-<model>-ablation.json and .md beside the comparison."""
    base = Path(__file__).resolve().parents[2] / "eval" / "results" / f"peers-{name}-ablation"
    base.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    parts = sorted({p for t in out["tools"].values() for p in t})
    lines = [f"# Where each tool's gap comes from: {name}", "",
             "Perplexity gap of the original model with only one part replaced by the tool's dequantized "
             "weights (`benchmarks/peers/ablate.py`; same held-out windows as the comparison; original "
             f"perplexity {out['original']:.4f}). Parts are not additive exactly.", "",
             "| tool | " + " | ".join(parts) + " |", "| --- |" + " ---: |" * len(parts)]
    for tool, t in out["tools"].items():
        cells = [f"{100 * t[p]['gap_relative']:+.3f}%" + ("" if t[p]["linears_replaced"] else " (fp16)")
                 if p in t else "" for p in parts]
        lines.append(f"| {tool} | " + " | ".join(cells) + " |")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
