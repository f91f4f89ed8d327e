"""Two quantmoe source trees timed against each other on one checkpoint in one device lease, then compared.

    python3 benchmarks/ab.py --a TREE_A --b TREE_B [--a-label REV] [--b-label REV] [--order ABBA] [--name NAME] \
        -- --shape mixtral-8x7b --layers 4 --tf32 --gpu-memory 24GB --work /tmp/ab

Everything after ``--`` goes to scale.py (the shape, depth and work folders, and quantize's options). The checkpoint
is written by the first run and reused by the others; the runs alternate the trees in ``--order``, after a run of
tree A that is recorded but not counted where ``--warmup`` asks for one (a lease's first run after writing a
checkpoint was its slowest in every stage); the first counted run of each tree keeps its output, and the two are
compared (scale.compare_outputs: how many levels differ, each one's weight error and GPTQ loss), then deleted. One
file, ``--results``/NAME.json (default $OUT or .), holds each run's layers and steady mean in the order they ran,
the trees' labels, and the compare. A tree is a folder holding
``quantmoe/`` (e.g. ``git archive REV quantmoe pyproject.toml | tar -x -C DIR``): its label names the commit, which
the folder itself may not know. Leases differ by more than most changes, so compare trees only within one file.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402

RUN_KEYS = ("steady_layer_mean", "steady_from_layer", "steady_to_layer", "peak_gpu_mb", "peak_rss_mb", "layers",
            "extrapolation")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="the first tree (a folder holding quantmoe/)")
    ap.add_argument("--b", type=Path, required=True, help="the second tree")
    ap.add_argument("--a-label", help="what tree A is, e.g. its commit [default: its path]")
    ap.add_argument("--b-label", help="what tree B is [default: its path]")
    ap.add_argument("--order", default="ABBA", help="the runs, one letter each [default: ABBA]")
    ap.add_argument("--warmup", action="store_true", help="first a run of tree A that the summary leaves out")
    ap.add_argument("--name", default="ab", help="the result file's name, without .json [default: ab]")
    ap.add_argument("--results", type=Path, default=Path(os.environ.get("OUT", ".")))
    args, rest = ap.parse_known_args(argv)
    if set(args.order) != {"A", "B"}:
        raise scale.QuantMoeError(f"--order {args.order!r} must run both trees and only them, e.g. ABBA")
    return args, [r for r in rest if r != "--"]


def main(argv: list[str] | None = None) -> dict:
    args, scale_args = parse_args(argv)
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    labels = {"A": args.a_label or str(args.a), "B": args.b_label or str(args.b)}
    scratch = args.results / f".{args.name}-runs"
    runs, kept, first = [], {}, None
    for i, label in enumerate(("W" if args.warmup else "") + args.order):
        warmup, label = label == "W", "A" if label == "W" else label
        keep = label not in kept and not warmup
        name = f"{args.name}-{i + 1}{'W' if warmup else label}"
        result = scale.main([*scale_args, "--quantmoe", str(trees[label]), "--name", name, "--results", str(scratch),
                             *(["--keep"] if keep else [])])
        if result["run"]["returncode"] != 0:
            raise scale.QuantMoeError(f"run {name} of {labels[label]} failed: {result['run']['output_tail'][-400:]}")
        if keep:
            kept[label] = Path(result["scale_options"]["out_work"]) / f"out-{name}"
        first = first or result
        runs.append({"order": i + 1, "tree": label, "label": labels[label], "warmup": warmup,
                     "command": result["run"]["command"],
                     **{k: result.get(k) for k in RUN_KEYS}})
    compare = scale.compare_outputs(kept["A"], kept["B"], model=Path(first["checkpoint"]["path"]))
    for out in kept.values():
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    counted = {t: [r for r in runs if r["tree"] == t and not r["warmup"]] for t in "AB"}
    steady = {t: [r["steady_layer_mean"]["seconds"] for r in counted[t]] for t in "AB"}
    totals = {t: [(r.get("extrapolation") or {}).get("total_seconds") for r in counted[t]] for t in "AB"}
    record = {
        "benchmark": "benchmarks/ab.py", "shape_name": first["shape_name"], "source": first["source"],
        "num_layers": first["num_layers"], "calibration_tokens": first["calibration_tokens"],
        "options": first["options"], "device": first["device"], "checkpoint": first["checkpoint"],
        "a": labels["A"], "b": labels["B"], "order": args.order, "warmup": args.warmup,
        "summary": {"a_steady_seconds": steady["A"], "b_steady_seconds": steady["B"],
                    "b_minus_a_mean_seconds": round(sum(steady["B"]) / len(steady["B"])
                                                    - sum(steady["A"]) / len(steady["A"]), 3),
                    "a_whole_model_seconds": totals["A"], "b_whole_model_seconds": totals["B"],
                    "levels_differ": compare["levels_differ"], "levels": compare["levels"],
                    "gptq_loss_ratio_b_over_a": compare.get("gptq_loss_ratio_b_over_a")},
        "runs": runs, "compare": compare,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    scale.atomic_write_json(args.results / f"{args.name}.json", record)
    print(json.dumps(record["summary"], indent=2))
    return record


if __name__ == "__main__":
    try:
        main()
    except scale.QuantMoeError as exc:
        sys.exit(f"error: {exc}")
