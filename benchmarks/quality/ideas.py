"""Issue 6's recipe ideas, each measured on the demo models the way the peer harness measures.

    python benchmarks/quality/ideas.py [MODEL ...] [--only NAME,...] [--work DIR] [--reuse]

Every idea is a set of ``quantmoe quantize`` flags (and, for the calibration ideas, a token
file) applied to the same 128 x 512 calibration tokens as ``benchmarks/peers/run.py``
(``quantmoe calibrate --tokenizer MODEL --nsamples 128 --seqlen 512 --seed 0``). Each run is
a subprocess, timed; its output is scored on the held-out windows (512 tokens, the demo
models' context) by

* the perplexity gap, the number the peer harness and issue 6 judge by, and
* KL(original || quantized), the mean over the scored tokens of the divergence between the
  two models' next-token distributions. The gap moves by about +-0.1 points between recipes
  of equal KL (whether a recipe's errors happen to help or hurt on this text); KL does not, so
  ideas are kept or dropped by KL, and the gap is reported beside it.

Writes ``eval/results/quality-ideas-<model>.json`` and ``.md``; docs/quality.md collects them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from quantmoe.base.paths import DEMO_MODELS, EVAL_DATA
from quantmoe.model.checkpoint import Checkpoint

REPO = Path(__file__).resolve().parents[2]
from quantmoe.model.stream import LayerStream
from quantmoe.stages.evaluate import eval_windows
from quantmoe.stages.export import checkpoint_stats

SEQLEN = 512
# The recipe of quantmoe 0.1.0 before issue 6, spelled out so that its rows do not follow the default.
BEFORE = ["--act-order", "static", "--damp", "0.01", "--clip-steps", "0", "--expert-hessian", "routed", "--fit", "none"]
DEFAULT: list[str] = []


@dataclass(frozen=True)
class Idea:
    name: str
    what: str
    flags: list[str]
    calib: str = "calib.safetensors"  # a token file in the work folder (see calibration_files)


IDEAS = (
    Idea("before", "quantmoe 0.1.0: act-order (static groups), damp 0.01, routed-token Hessians, min/max grids", BEFORE),
    Idea("act-order-none", "natural column order, grids found as each group starts", BEFORE + ["--act-order", "none"]),
    Idea("act-order-group", "group-aware act-order (GPTQModel's act_group_aware)", BEFORE + ["--act-order", "group"]),
    Idea("damp-0.05", "dampening 0.05 (GPTQModel's default)", BEFORE + ["--damp", "0.05"]),
    Idea("damp-0.001", "dampening 0.001", BEFORE + ["--damp", "0.001"]),
    Idea("not-true-sequential", "down_proj Hessians from the original gate/up outputs (llm-compressor's order)",
         BEFORE + ["--no-true-sequential"]),
    Idea("experts-all-tokens", "every expert's Hessians from all tokens (llm-compressor's moe_calibrate_all_experts)",
         BEFORE + ["--expert-hessian", "all"]),
    Idea("experts-weighted", "routed tokens weighted by the router's score for the expert",
         BEFORE + ["--expert-hessian", "weighted"]),
    Idea("rare-blend-half", "the rare-expert blend for experts under 16,000 routed tokens (about half of them)",
         BEFORE + ["--rare-expert-tokens", "16000"]),
    Idea("rare-all-tokens-half", "the all-token Hessian for experts under 16,000 routed tokens",
         BEFORE + ["--rare-expert-tokens", "16000", "--rare-expert", "all-tokens"]),
    Idea("clip-hessian", "clipping search, 20 ratios in [0.6, 1], errors weighted by the Hessian diagonal",
         BEFORE + ["--clip-steps", "20", "--clip-weight", "hessian"]),
    Idea("clip-residual", "clipping search, errors weighted by what GPTQ cannot spread (1/U_cc^2)",
         BEFORE + ["--clip-steps", "20", "--clip-weight", "residual"]),
    Idea("clip-residual-wide", "clipping search, 40 ratios in [0.5, 1.07]",
         BEFORE + ["--clip-steps", "40", "--clip-min", "0.5", "--clip-max", "1.07"]),
    Idea("fit-mlp", "down_proj fitted to the original MLP outputs from the quantized gate/up outputs",
         BEFORE + ["--fit", "mlp"]),
    Idea("fit-layer", "also o_proj and gate/up fitted to the original layer's outputs, on the layer's own inputs",
         BEFORE + ["--fit", "layer"]),
    Idea("fit-stream", "every linear fitted to the original model's outputs (a full-precision stream beside)",
         BEFORE + ["--fit", "stream"]),
    Idea("default", "this version's default: clip-residual + experts-weighted + fit-stream", DEFAULT),
    Idea("default-fit-mlp", "the default with --fit mlp (the lighter fit: down_proj only, no second stream)",
         ["--fit", "mlp"]),
    Idea("default-group", "the default with group-aware act-order", ["--act-order", "group"]),
    Idea("default-damp-0.05", "the default with dampening 0.05", ["--damp", "0.05"]),
    Idea("default-refine-2", "the default with 2 coordinate-descent passes over GPTQ's levels", ["--refine", "2"]),
    Idea("default-no-clip", "the default without the clipping search", ["--clip-steps", "0"]),
    Idea("default-routed", "the default with routed-token (unweighted) expert Hessians", ["--expert-hessian", "routed"]),
    Idea("before-seed1", "`before` on another calibration draw (seed 1): how much the gap moves by chance",
         BEFORE, "calib-seed1.safetensors"),
    Idea("default-seed1", "the default on another calibration draw (seed 1)", DEFAULT, "calib-seed1.safetensors"),
    Idea("default-nsamples-64", "the default on 64 x 512 calibration tokens", DEFAULT, "calib-512.safetensors:64"),
    Idea("default-nsamples-256", "the default on 256 x 512 calibration tokens", DEFAULT, "calib-512.safetensors:256"),
    Idea("default-nsamples-512", "the default on 512 x 512 calibration tokens", DEFAULT, "calib-512.safetensors:512"),
    Idea("default-seqlen-256", "the default on 256 x 256 calibration tokens (as many tokens, shorter rows)",
         DEFAULT, "calib-512.safetensors:256:256"),
    Idea("default-balanced", "the default on 128 rows of 512 chosen to even out the tokens routed to each expert",
         DEFAULT, "calib-balanced.safetensors"),
    Idea("default-gptqmodel-layout", "the default with --layout gptqmodel (dense-layer MLPs left in fp16, as GPTQModel)",
         ["--layout", "gptqmodel"]),
)


def log(msg: str) -> None:
    print(f"[ideas {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def calibrate(model: Path, out: Path, nsamples: int, seed: int = 0) -> Path:
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "quantmoe", "calibrate", "--tokenizer", str(model), "--nsamples",
                        str(nsamples), "--seqlen", str(SEQLEN), "--seed", str(seed), "--out", str(out)], check=True)
    return out


@torch.no_grad()
def routed_counts(model: Path, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Tokens of each row routed to each (layer, expert) by the original model: (rows, layers * experts)."""
    stream = LayerStream(Checkpoint(model), torch.device("cpu"))
    arch, config = stream.arch, stream.config
    batches = stream.embed(ids, batch_size)
    counts = []
    for i in range(stream.num_layers):
        layer = stream.load_layer(i, stream.layer_state(i))
        if arch.is_moe_layer(config, i):
            E = arch.num_experts(config)
            router = layer.get_submodule(arch.router_module)
            per_layer = []
            for x in stream.capture(layer, batches, arch.moe_module):
                index = router(x)[arch.router_indices]                       # (b * L, k)
                one_hot = torch.nn.functional.one_hot(index, E).sum(1)       # (b * L, E)
                per_layer.append(one_hot.reshape(-1, ids.shape[1], E).sum(1))  # (b, E)
            counts.append(torch.cat(per_layer))
        batches = stream.run_layer(layer, batches)
        stream.release_layer(i)
    return torch.cat(counts, dim=1).float()


def balanced_rows(counts: torch.Tensor, keep: int) -> list[int]:
    """Greedily pick ``keep`` rows so that the least-served (layer, expert) gets as many tokens as it can."""
    chosen: list[int] = []
    total = torch.zeros(counts.shape[1])
    free = torch.ones(counts.shape[0], dtype=torch.bool)
    for _ in range(keep):
        # Each candidate's total, sorted ascending: compare the least-served entries first.
        scores = (total[None] + counts).sort(dim=1).values
        scores[~free] = -1
        best = max(range(counts.shape[0]), key=lambda r: tuple(scores[r, :8].tolist()))
        chosen.append(best)
        free[best] = False
        total += counts[best]
    return sorted(chosen)


def calibration_files(model: Path, folder: Path) -> None:
    """calib.safetensors (the harness's), calib-seed1.safetensors (another draw), calib-512.safetensors (512 rows, the same seed) and
    calib-balanced.safetensors (128 of those 512 rows, see balanced_rows)."""
    from quantmoe.stages.calibrate import read_calibration, write_calibration

    calibrate(model, folder / "calib.safetensors", 128)
    calibrate(model, folder / "calib-seed1.safetensors", 128, seed=1)
    pool = calibrate(model, folder / "calib-512.safetensors", 512)
    balanced = folder / "calib-balanced.safetensors"
    if not balanced.is_file():
        ids, meta = read_calibration(pool)
        rows = balanced_rows(routed_counts(model, ids), 128)
        write_calibration(balanced, ids[rows], {**meta, "nsamples": "128", "selected": "balanced experts"})


def calib_args(folder: Path, spec: str) -> list[str]:
    """FILE[:NSAMPLES[:SEQLEN]] -> quantize options."""
    name, *limits = spec.split(":")
    args = ["--calib", str(folder / name)]
    if limits:
        args += ["--nsamples", limits[0]]
    if len(limits) > 1:
        args += ["--seqlen", limits[1]]
    return args


@torch.no_grad()
def final_hidden(path: Path, windows: torch.Tensor, batch_size: int = 8,
                 replace: Callable[[int], dict[str, torch.Tensor]] | None = None) -> tuple[LayerStream, torch.Tensor]:
    """The model's last hidden states for ``windows``, layer by layer; ``replace(i)``: tensors (layer-relative
    names) that stand in for layer i's own."""
    stream = LayerStream(Checkpoint(path), torch.device("cpu"))
    batches = stream.embed(windows, batch_size)
    for i in range(stream.num_layers):
        state = stream.layer_state(i)
        if replace is not None:
            state.update(replace(i))
        batches = stream.run_layer(stream.load_layer(i, state), batches)
        stream.release_layer(i)
    stream.load_head()
    return stream, torch.cat([b.hidden for b in batches])


@torch.no_grad()
def score(stream: LayerStream, original: torch.Tensor, quantized: torch.Tensor, windows: torch.Tensor,
          batch_size: int = 8) -> dict:
    """Perplexities of both models and the mean KL(original || quantized) over the predicted positions."""
    nll0 = nll1 = kl = 0.0
    count = 0
    for start in range(0, windows.shape[0], batch_size):
        target = windows[start:start + batch_size, 1:].reshape(-1)
        lp0 = torch.log_softmax(stream.logits(original[start:start + batch_size])[:, :-1].flatten(0, 1), -1)
        lp1 = torch.log_softmax(stream.logits(quantized[start:start + batch_size])[:, :-1].flatten(0, 1), -1)
        nll0 -= float(lp0.gather(1, target[:, None]).sum())
        nll1 -= float(lp1.gather(1, target[:, None]).sum())
        kl += float((lp0.exp() * (lp0 - lp1)).sum())
        count += target.numel()
    p0, p1 = math.exp(nll0 / count), math.exp(nll1 / count)
    return {"perplexity": p1, "original_perplexity": p0, "gap_relative": (p1 - p0) / p0, "kl": kl / count}


def run_model(name: str, ideas: list[Idea], work: Path, reuse: bool) -> dict:
    model = DEMO_MODELS.get(name, Path(name)).resolve()
    folder = work / model.name
    folder.mkdir(parents=True, exist_ok=True)
    calibration_files(model, folder)
    windows, _ = eval_windows(Checkpoint(model).tokenizer(), EVAL_DATA, SEQLEN)
    stream, original = final_hidden(model, windows)
    results_file = REPO / "eval" / "results" / f"quality-ideas-{model.name}.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"model": model.name, "ideas": {}}
    known = {i.name for i in IDEAS}  # rows of ideas since removed or renamed are dropped
    results["ideas"] = {k: v for k, v in results["ideas"].items() if k in known}
    for idea in ideas:
        out = folder / "outputs" / idea.name
        cmd = [sys.executable, "-m", "quantmoe", "quantize", str(model), "--out", str(out), "--device", "cpu",
               "--no-eval", "--quiet", "--overwrite", *calib_args(folder, idea.calib), *idea.flags]
        measured = folder / f"{idea.name}.seconds"
        if not (reuse and measured.is_file() and (out / "quantization_log.json").is_file()):
            log(f"{model.name}: {idea.name}")
            t0 = time.perf_counter()
            load = os.getloadavg()[0]
            with open(folder / f"{idea.name}.log", "w") as f:
                subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
            measured.write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "load_average": load}))
        _, quantized = final_hidden(out, windows)
        options = json.loads((out / "quantization_log.json").read_text())["options"]
        results["ideas"][idea.name] = {
            "what": idea.what, "flags": idea.flags, "calibration": idea.calib,
            "command": "quantmoe quantize " + " ".join(["MODEL", "--calib", f"WORK/{model.name}/{idea.calib.split(':')[0]}",
                                                        *calib_args(Path(), idea.calib)[2:], *idea.flags]),
            "options": options, **score(stream, original, quantized, windows),
            "bits_per_weight": checkpoint_stats(out)["bits_per_weight"],
            "quantize": json.loads(measured.read_text()),
        }
        r = results["ideas"][idea.name]
        log(f"{model.name}: {idea.name}: gap {100 * r['gap_relative']:+.3f}%  KL {1000 * r['kl']:.2f}e-3")
        results_file.write_text(json.dumps(results, indent=1) + "\n")
    results_file.with_suffix(".md").write_text(markdown(results))
    return results


def markdown(results: dict) -> str:
    ideas = results["ideas"]
    before = ideas.get("before")
    lines = [f"# Recipe ideas on {results['model']}", "",
             "Held-out perplexity gap and KL(original || quantized) per token, both on the 220 windows of "
             "512 tokens of `eval/data/python_docs_heldout.jsonl`; calibration 128 x 512 tokens unless the row "
             "says otherwise (`benchmarks/quality/ideas.py`). KL change is relative to `before`.", "",
             "| idea | what | gap | KL (1e-3) | KL vs before | bits/weight | quantize (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in ideas.items():
        change = f"{100 * (r['kl'] / before['kl'] - 1):+.1f}%" if before else ""
        lines.append(f"| `{name}` | {r['what']} | {100 * r['gap_relative']:+.3f}% | {1000 * r['kl']:.2f} | {change} | "
                     f"{r['bits_per_weight']:.3f} | {r['quantize']['seconds']} |")
    return "\n".join(lines) + "\n"


def combined_table(models: list[str]) -> str:
    """One row per idea, the gap and KL on each model side by side (docs/quality.md's table)."""
    results = {}
    for name in models:
        path = REPO / "eval" / "results" / f"quality-ideas-{DEMO_MODELS.get(name, Path(name)).name}.json"
        results[name] = json.loads(path.read_text())["ideas"]
    head = "| idea | " + " | ".join(f"{m} gap | {m} KL (1e-3), vs before" for m in models) + " | flags |"
    lines = [head, "| --- |" + " ---: | ---: |" * len(models) + " --- |"]
    for idea in IDEAS:
        cells = []
        for m in models:
            r, before = results[m].get(idea.name), results[m].get("before")
            if r is None:
                cells += ["", ""]
                continue
            cells += [f"{100 * r['gap_relative']:+.3f}%",
                      f"{1000 * r['kl']:.2f}, {100 * (r['kl'] / before['kl'] - 1):+.1f}%" if before else f"{1000 * r['kl']:.2f}"]
        if idea.flags[:len(BEFORE)] == BEFORE and idea.name != "before":
            flags = f"`before` + `{' '.join(idea.flags[len(BEFORE):])}`"
        else:
            flags = f"`{' '.join(idea.flags)}`" if idea.flags else "default"
        calib = "" if idea.calib == "calib.safetensors" else f", calibration `{idea.calib}`"
        lines.append(f"| `{idea.name}` | " + " | ".join(cells) + f" | {flags}{calib} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=list(DEMO_MODELS))
    parser.add_argument("--only", type=lambda s: [n for n in s.split(",") if n], help="comma-separated idea names")
    parser.add_argument("--work", default="quality-work", help="calibration files and outputs")
    parser.add_argument("--reuse", action="store_true", help="re-score finished outputs instead of quantizing again")
    parser.add_argument("--table", action="store_true", help="only print the combined table of the results written")
    args = parser.parse_args()
    if args.table:
        print(combined_table(args.models))
        return
    names = {i.name for i in IDEAS}
    if args.only and set(args.only) - names:
        parser.error(f"unknown ideas {sorted(set(args.only) - names)}; choose from {', '.join(sorted(names))}")
    ideas = [i for i in IDEAS if not args.only or i.name in args.only]
    for name in args.models:
        run_model(name, ideas, Path(args.work).resolve(), args.reuse)


if __name__ == "__main__":
    main()
