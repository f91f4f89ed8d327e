"""Peer harness: quantmoe against GPTQModel and llm-compressor on the same MoE, same bits,
same calibration tokens, scored by quantmoe's evaluator on the same held-out tokens.

    python benchmarks/peers/run.py [MODEL ...] [--work DIR] [--venvs DIR] [--timeout S]

MODEL is a demo model name (mixtral-demo, qwen2moe-demo; default both) or a checkpoint
folder. Run it with the python of the venv where quantmoe is installed. Steps, each
leaving files in ``--work/<model>/`` (tool outputs in ``outputs/<tool>``):

1. ``quantmoe calibrate --tokenizer MODEL --nsamples 128 --seqlen 512 --seed 0``
   -> ``calib.safetensors``; every tool gets these exact ``input_ids`` rows.
2. Each tool quantizes MODEL (w4, g128, symmetric, routers left in full precision) in a
   subprocess: the peers in their own venvs (created by peer_tools.ensure_venv), quantmoe
   with its default recipe. Wall time and peak RSS (the process tree, sampled) are
   measured the same way for all three.
3. ``quantmoe.stages.evaluate.perplexity`` scores the original and every output on the same
   held-out windows; the outputs are read by quantmoe's one loader (GPTQ v1 in either
   naming, compressed-tensors).
4. ``eval/results/peers-<model>.json`` and ``.md``: versions, options, wall time, peak
   RSS, perplexity, gap, bits per weight, and what each tool did to rare experts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quality"))

from ideas import final_hidden, score  # noqa: E402
from peer_tools import HERE, PEERS, ensure_venv, installed_versions, venv_python  # noqa: E402

from quantmoe import __version__  # noqa: E402
from quantmoe.base.paths import DEMO_MODELS, EVAL_DATA  # noqa: E402
from quantmoe.model.checkpoint import Checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
from quantmoe.base.files import sha256_file, versions  # noqa: E402
from quantmoe.model.stream import LayerStream  # noqa: E402
from quantmoe.stages.evaluate import (  # noqa: E402
    Protocol,
    eval_windows,
    gap,
    perplexity,
    standard_error,
)
from quantmoe.stages.export import checkpoint_stats  # noqa: E402

NSAMPLES, SEQLEN, SEED = 128, 512, 0
TARGET = 0.7  # issue 6: quantmoe's relative gap at most 70% of the smaller peer gap
# quantmoe's runs: its default recipe (the one the verdict uses), and the same recipe with GPTQModel's
# layout, which also leaves dense-layer MLPs (Qwen2-MoE mlp_only_layers) in fp16 as GPTQModel's Qwen2-MoE
# definition does: the like-for-like row for the peer row gptqmodel-dense-fp16.
QUANTMOE_RUNS = {"quantmoe": [], "quantmoe-gptqmodel-layout": ["--layout", "gptqmodel"]}
TOOLS = (*QUANTMOE_RUNS, *PEERS)


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_measured(cmd: list[str], log_file: Path, env: dict | None = None, timeout: float = 7200,
                 interval: float = 0.2) -> dict:
    """Run ``cmd`` in the log file's folder (GPTQModel writes ./logs there), sampling the RSS of its
    whole process tree; output goes to ``log_file``."""
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    with open(log_file, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=log_file.parent)
        peak, cpu = [0], [0.0]
        stop = threading.Event()

        def sample():
            root = psutil.Process(proc.pid)
            while not stop.is_set():
                try:
                    tree = [root] + root.children(recursive=True)
                    peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
                    times = root.cpu_times()
                    cpu[0] = max(cpu[0], times.user + times.system + times.children_user + times.children_system)
                except psutil.Error:
                    pass
                stop.wait(interval)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            log(f"timed out after {timeout} s: {' '.join(cmd)}")
        stop.set()
        thread.join()
    return {"returncode": rc, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak[0] / 2**20, 1),
            "cpu_seconds": round(cpu[0], 1), "load_average_before": round(load_before, 2),
            "load_average_after": round(os.getloadavg()[0], 2)}


def make_calibration(model: Path, folder: Path, seed: int = SEED) -> Path:
    calib = folder / "calib.safetensors"
    if not calib.is_file():
        cmd = [sys.executable, "-m", "quantmoe", "calibrate", "--tokenizer", str(model), "--nsamples", str(NSAMPLES),
               "--seqlen", str(SEQLEN), "--seed", str(seed), "--out", str(calib)]
        log(" ".join(cmd[1:]))
        subprocess.run(cmd, check=True)
    return calib


def tokens_sha256(calib: Path) -> str:
    from quantmoe.stages.calibrate import read_calibration
    from quantmoe.stages.resume import hash_tokens

    return hash_tokens(read_calibration(calib)[0])


def quantize_command(tool: str, model: Path, calib: Path, out: Path, venvs: Path) -> tuple[list[str], dict]:
    if tool in QUANTMOE_RUNS:
        return ([sys.executable, "-m", "quantmoe", "quantize", str(model), "--out", str(out), "--calib", str(calib),
                 "--device", "cpu", "--no-eval", "--quiet", "--overwrite", *QUANTMOE_RUNS[tool]], {})
    peer = PEERS[tool]
    return ([str(venv_python(peer, venvs)), str(HERE / peer.script), str(model), str(calib), str(out),
             *peer.script_args], dict(peer.env))


def tool_record(tool: str, out: Path, venvs: Path) -> dict:
    """Version and options of a finished run, from what the tool wrote."""
    if tool in QUANTMOE_RUNS:
        qlog = json.loads((out / "quantization_log.json").read_text())
        flags = " ".join(QUANTMOE_RUNS[tool])
        return {"version": __version__, "versions": versions(), "options": qlog["options"],
                "call": f"quantmoe quantize MODEL --calib calib.safetensors --device cpu {flags}".rstrip()
                        + " (default recipe)",
                "output_format": f"GPTQ v1 ({'GPTQModel' if flags else 'source'} tensor names)",
                "rare_experts": {"policy": qlog["options"]["rare_expert"], "fallbacks": qlog["fallbacks"]}}
    peer = PEERS[tool]
    run = json.loads((out / "peer_run.json").read_text())
    names = (peer.version_of, "torch", "transformers", "compressed-tensors", "safetensors")
    return {"version": run["version"], "versions": installed_versions(venv_python(peer, venvs), names),
            "options": run["options"], "call": run["call"], "output_format": peer.output_format,
            "rare_experts": run.get("rare_experts", {}), "workaround": run.get("workaround")}


def gptqmodel_fallbacks(log_file: Path) -> list[dict]:
    """Modules GPTQModel quantized by its low-sample fallback instead of GPTQ (from its log)."""
    pattern = re.compile(r"Module `([^`]+)` -> Using `(\w+)` fallback quantization \(observed (\d+) samples")
    text = log_file.read_text(errors="replace") if log_file.is_file() else ""
    return [{"module": m.group(1), "fallback": m.group(2), "samples": int(m.group(3))} for m in pattern.finditer(text)]


def llmcompressor_fallbacks(log_file: Path) -> list[dict]:
    """Modules llm-compressor quantized by round-to-nearest after a failed Hessian inversion (from its log)."""
    text = log_file.read_text(errors="replace") if log_file.is_file() else ""
    m = re.search(r"Hessian inversion failed for \d+/\d+ modules.*?Affected modules: ([^\n]+)", text)
    names = [n.strip() for n in m.group(1).split(",")] if m else []
    return [{"module": n, "fallback": "rtn (Hessian inversion failed)"} for n in names if n and " more " not in n]


def expert_health(path: Path) -> dict:
    """All-zero or non-finite routed-expert projections in a checkpoint, read as quantmoe reads it."""
    stream = LayerStream(Checkpoint(path), torch.device("cpu"))
    arch, config = stream.arch, stream.config
    zero, nonfinite, checked = [], [], 0
    for i in range(stream.num_layers):
        if not arch.is_moe_layer(config, i):
            continue
        state = stream.layer_state(i)
        for e in range(arch.num_experts(config)):
            for which in ("gate", "up", "down"):
                name = f"{arch.experts.linear(which, e)}.weight"
                w = state[name]
                checked += 1
                if not torch.isfinite(w).all():
                    nonfinite.append(f"model.layers.{i}.{name}")
                elif w.abs().max() == 0:
                    zero.append(f"model.layers.{i}.{name}")
    return {"expert_projections_checked": checked, "all_zero": zero, "non_finite": nonfinite}


def routed_token_counts(out_quantmoe: Path) -> dict:
    """Calibration tokens routed to each expert (from quantmoe's log; the original router decides)."""
    qlog = json.loads((out_quantmoe / "quantization_log.json").read_text())
    return {str(layer["index"]): layer["expert_tokens"] for layer in qlog["layers"] if layer.get("expert_tokens")}


def run_model(name: str, args) -> dict:
    model = DEMO_MODELS.get(name, Path(name)).resolve()
    key = model.name
    folder = Path(args.work).resolve() / (key if args.seed == SEED else f"{key}-seed{args.seed}")
    folder.mkdir(parents=True, exist_ok=True)
    calib = make_calibration(model, folder, args.seed)
    ckpt = Checkpoint(model)
    windows, data_meta = eval_windows(ckpt.tokenizer(), args.eval_data, SEQLEN)
    log(f"{key}: eval {data_meta['windows']} windows x {SEQLEN} tokens")
    original = perplexity(model, windows, "cpu")
    original_windows = original.pop("window_nll")
    head, hidden0 = final_hidden(model, windows)  # the original's last hidden states, for the KL
    results: dict = {
        "model": key,
        "model_path": str(model.relative_to(REPO) if model.is_relative_to(REPO) else model),
        "settings": {"bits": 4, "group_size": 128, "sym": True, "routers": "not quantized (every tool)",
                     # The file's hash changes with the paths in its metadata; the tokens' hash says
                     # whether two runs calibrated on the same rows.
                     "calibration": {"file_sha256": sha256_file(calib), "tokens_sha256": tokens_sha256(calib),
                                     "nsamples": NSAMPLES, "seqlen": SEQLEN,
                                     "seed": args.seed, "made_by": f"quantmoe calibrate --tokenizer {key} --nsamples "
                                                                    f"{NSAMPLES} --seqlen {SEQLEN} --seed {args.seed}"}},
        "eval": {"protocol": Protocol(data=str(Path(args.eval_data).resolve().relative_to(REPO)) if
                                      Path(args.eval_data).resolve().is_relative_to(REPO) else str(args.eval_data),
                                      seqlen=SEQLEN).to_dict(),
                 "data": {k: v for k, v in data_meta.items() if k != "path"},
                 "original": {"perplexity": original["perplexity"], "mean_nll": original["mean_nll"],
                              "window_nll": _rounded(original_windows)}},
        "machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "note": "shared machine: wall times include waiting for CPU (see load averages, cpu_seconds)"},
        "tools": {},
    }
    for tool in args.tools:
        # Not folder/<tool>: a folder named "quantmoe" in the working directory would shadow the package.
        out = folder / "outputs" / tool
        log_file = folder / f"{tool}.log"
        done = (out / ("quantization_log.json" if tool in QUANTMOE_RUNS else "peer_run.json")).is_file()
        measured_file = folder / f"{tool}.measured.json"
        if tool in PEERS:
            ensure_venv(PEERS[tool], Path(args.venvs), log)
        if not (done and args.reuse and measured_file.is_file()):
            cmd, env = quantize_command(tool, model, calib, out, Path(args.venvs))
            log(f"{key}: quantizing with {tool} (log: {log_file})")
            measured = run_measured(cmd, log_file, env, args.timeout)
            measured_file.write_text(json.dumps(measured))
            if measured["returncode"] != 0:
                log(f"{key}: {tool} failed (exit {measured['returncode']}); see {log_file}")
                results["tools"][tool] = {"failed": measured, "log_tail": log_file.read_text(errors="replace")[-3000:]}
                continue
        measured = json.loads(measured_file.read_text())
        record = tool_record(tool, out, Path(args.venvs))
        if tool == "gptqmodel":
            record["rare_experts"]["fallbacks"] = gptqmodel_fallbacks(log_file)
        if tool == "llmcompressor":
            record["rare_experts"]["fallbacks"] = llmcompressor_fallbacks(log_file)
        log(f"{key}: evaluating {tool}")
        ppl = perplexity(out, windows, "cpu")
        tool_windows = ppl.pop("window_nll")
        stats = checkpoint_stats(out)
        kl = score(head, hidden0, final_hidden(out, windows)[1], windows)["kl"]
        results["tools"][tool] = {
            **record,
            "quantize": {k: measured[k] for k in ("seconds", "peak_rss_mb", "cpu_seconds", "load_average_before",
                                                  "load_average_after")},
            "perplexity": ppl["perplexity"],
            "gap": gap(original["perplexity"], ppl["perplexity"], original_windows, tool_windows),
            "window_nll": _rounded(tool_windows),
            "kl": kl,
            "bits_per_weight": stats["bits_per_weight"],
            "information_bits_per_weight": stats["information_bits_per_weight"],
            "fraction_quantized": stats["fraction_quantized"],
            "size_bytes": stats["size_bytes"],
            "experts": expert_health(out),
        }
    if "quantmoe" in results["tools"] and "failed" not in results["tools"]["quantmoe"]:
        results["routed_calibration_tokens"] = routed_token_counts(folder / "outputs" / "quantmoe")
    results["verdict"] = verdict(results["tools"], original_windows)
    return results


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 7) for v in values]


def margin(ours: list[float], peer: list[float], original: list[float]) -> dict:
    """The target as one paired statistic per window: quantmoe's log-perplexity gap minus TARGET times the
    peer's (for gaps this small the log of the perplexity ratio is the relative gap to 0.01 of itself),
    its mean over windows and the mean's standard error. Below zero: the target is met on this text."""
    d = [(q - o) - TARGET * (p - o) for q, p, o in zip(ours, peer, original)]
    return {"mean": sum(d) / len(d), "se": standard_error(d)}


def verdict(tools: dict, original_windows: list[float] | None = None) -> dict:
    ok = {t: r for t, r in tools.items() if "gap" in r}
    peers = {t: r["gap"]["relative"] for t, r in ok.items() if t in PEERS and PEERS[t].in_verdict}
    if "quantmoe" not in ok or not peers:
        return {"complete": False}
    best = min(peers, key=peers.get)
    ours = ok["quantmoe"]["gap"]["relative"]
    ratio = ours / peers[best] if peers[best] > 0 else float("inf")
    # Compared on the bits that carry information: GPTQ v1 also stores a g_idx and constant zero points
    # for its loaders, which compressed-tensors leaves out (export.checkpoint_stats).
    bpw_ok = all(ok["quantmoe"]["information_bits_per_weight"] <= r["information_bits_per_weight"] + 1e-9
                 for t, r in ok.items() if t in peers)
    fastest = min(ok[t]["quantize"]["seconds"] for t in peers)
    # Over every linear any tool quantizes, counting a linear a tool left in 16 bit at 16 bits: what a
    # tool that quantizes fewer modules (GPTQModel and Qwen2-MoE's dense layers) spends per weight.
    linears = max(r["fraction_quantized"] for r in ok.values())
    all_linears = {t: (r["information_bits_per_weight"] * r["fraction_quantized"]
                       + 16 * (linears - r["fraction_quantized"])) / linears for t, r in ok.items()}
    same = ok.get("quantmoe-gptqmodel-layout"), ok.get("gptqmodel-dense-fp16")
    like_for_like = (same[0]["gap"]["relative"] / same[1]["gap"]["relative"]
                     if all(same) and same[1]["gap"]["relative"] > 0 else None)
    paired = (margin(ok["quantmoe"]["window_nll"], ok[best]["window_nll"], original_windows)
              if original_windows is not None and "window_nll" in ok["quantmoe"] else None)
    paired_same = (margin(same[0]["window_nll"], same[1]["window_nll"], original_windows)
                   if original_windows is not None and all(same) and "window_nll" in same[0] else None)
    return {"complete": True, "best_peer": best, "best_peer_gap": peers[best], "quantmoe_gap": ours,
            "target_margin": paired, "gptqmodel_layout_target_margin": paired_same,
            "quantmoe_gptqmodel_layout_over_gptqmodel": like_for_like,
            "ratio": ratio, "target_ratio": TARGET, "gap_target_met": ratio <= TARGET,
            "bits_per_weight_not_higher": bpw_ok,
            "information_bits_per_linear_weight": all_linears,
            "kl_vs_best_peer": ok["quantmoe"]["kl"] / min(ok[t]["kl"] for t in peers),
            "quantize_seconds_vs_fastest_peer": ok["quantmoe"]["quantize"]["seconds"] / fastest}


def markdown(r: dict) -> str:
    e = r["eval"]
    lines = [f"# Peer comparison: {r['model']}", "",
             f"w4 g128 symmetric, routers in full precision; the same {r['settings']['calibration']['nsamples']} x "
             f"{r['settings']['calibration']['seqlen']} calibration tokens for every tool "
             f"(`{r['settings']['calibration']['made_by']}`); scored by quantmoe's evaluator on "
             f"{e['data']['windows']} held-out windows of {e['protocol']['seqlen']} tokens "
             f"(`{e['protocol']['data']}`, {e['data']['tokens_scored']} tokens scored).", "",
             f"Original perplexity: **{e['original']['perplexity']:.4f}**. KL: mean KL(original || quantized) "
             "per predicted token on the same windows, in nats: a steadier measure of closeness than the gap, "
             "whose sign can flip between calibration draws.", "",
             "| tool | version | perplexity | gap (rel) | KL (1e-3) | bits/weight (information) | bits/weight (stored) | "
             "quantized params | wall (s) | CPU (s) | peak RSS (MB) | all-zero experts |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for tool, t in r["tools"].items():
        if "failed" in t:
            lines.append(f"| {tool} | failed (exit {t['failed']['returncode']}) | | | | | | | "
                         f"{t['failed']['seconds']} | | {t['failed']['peak_rss_mb']} | |")
            continue
        q = t["quantize"]
        se = t["gap"].get("relative_se")
        lines.append(f"| {tool} | {t['version']} | {t['perplexity']:.4f} | {100 * t['gap']['relative']:+.2f}%"
                     f"{'' if se is None else f' ± {100 * se:.2f}%'} | "
                     f"{1000 * t['kl']:.2f} | "
                     f"{t['information_bits_per_weight']:.3f} | {t['bits_per_weight']:.3f} | "
                     f"{100 * t['fraction_quantized']:.1f}% | {q['seconds']} | "
                     f"{q['cpu_seconds']} | {q['peak_rss_mb']} | {len(t['experts']['all_zero'])} |")
    v = r["verdict"]
    if v.get("complete"):
        lines += ["", f"quantmoe's gap is **{v['ratio']:.2f}x** the best peer's ({v['best_peer']}); the target is "
                      f"at most {v['target_ratio']}x: **{'met' if v['gap_target_met'] else 'not met'}**. "
                      f"Bits per weight (information) not higher than the peers': {v['bits_per_weight_not_higher']}. "
                      f"Wall time vs the fastest peer: {v['quantize_seconds_vs_fastest_peer']:.2f}x. "
                      f"KL vs the peer with the least: {v['kl_vs_best_peer']:.2f}x."]
        m = v.get("target_margin")
        if m is not None:
            lines += ["", "How firm that verdict is on this text: per window, quantmoe's log-perplexity gap minus "
                          f"{v['target_ratio']}x {v['best_peer']}'s averages {100 * m['mean']:+.3f} points "
                          f"± {100 * m['se']:.3f} (one standard error, paired over the windows; below zero meets "
                          f"the target): {abs(m['mean']) / m['se']:.1f} standard errors "
                          f"{'inside' if m['mean'] <= 0 else 'outside'} the target. The ± after each gap is its "
                          "own standard error the same way. Neither covers another calibration draw, which "
                          "moves the gaps more (the harness's other seeds)."]
        spent = v.get("information_bits_per_linear_weight")
        if spent and len({round(b, 3) for b in spent.values()}) > 1:
            lines += ["", "Bits of information per weight over every linear any tool quantizes (a linear left in "
                          "16 bit counted at 16): " + ", ".join(f"{t} {b:.3f}" for t, b in spent.items()) + "."]
        if v.get("quantmoe_gptqmodel_layout_over_gptqmodel") is not None:
            lines += ["", "Both leaving dense-layer MLPs in fp16 (quantmoe `--layout gptqmodel`; GPTQModel's Qwen2-MoE "
                          "definition as it ships, `gptqmodel-dense-fp16`, which is not in the verdict): quantmoe's "
                          f"gap is {v['quantmoe_gptqmodel_layout_over_gptqmodel']:.2f}x GPTQModel's"
                          + ("." if v.get("gptqmodel_layout_target_margin") is None else
                             f"; per window, its log-perplexity gap minus {v['target_ratio']}x GPTQModel's averages "
                             f"{100 * v['gptqmodel_layout_target_margin']['mean']:+.3f} points "
                             f"± {100 * v['gptqmodel_layout_target_margin']['se']:.3f}.")]
    notes = [f"- **{tool}**: {t['workaround']}" for tool, t in r["tools"].items() if t.get("workaround")]
    notes += [f"- **{tool}** failed: see `log_tail` in the JSON" for tool, t in r["tools"].items() if "failed" in t]
    if notes:
        lines += ["", "## Notes", ""] + notes
    lines += ["", "## Rare experts", ""]
    for tool, t in r["tools"].items():
        if "failed" in t:
            continue
        fb = t["rare_experts"].get("fallbacks", [])
        lines.append(f"- **{tool}**: {t['rare_experts'].get('policy', '')}; {len(fb)} projections used a fallback; "
                     f"all-zero expert projections: {t['experts']['all_zero'] or 'none'}; "
                     f"non-finite: {t['experts']['non_finite'] or 'none'}.")
    if r.get("routed_calibration_tokens"):
        counts = r["routed_calibration_tokens"]
        lines += ["", "Calibration tokens routed to each expert (original routers), per layer:", ""]
        lines += [f"- layer {i}: {c}" for i, c in counts.items()]
    lines += ["", "## Options", ""]
    for tool, t in r["tools"].items():
        if "failed" not in t:
            lines += [f"- **{tool}** `{t['call']}`; versions {t['versions']}"]
    lines += ["", "Wall and CPU times come from a shared 2-core machine; load averages are in the JSON.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=list(DEMO_MODELS))
    parser.add_argument("--work", default="peers-work", help="where calibration tokens and outputs go")
    parser.add_argument("--venvs", default=str(HERE / ".venvs"), help="where the peer venvs are created")
    parser.add_argument("--results", default=str(REPO / "eval" / "results"))
    parser.add_argument("--eval-data", default=str(EVAL_DATA))
    parser.add_argument("--tools", default=",".join(TOOLS), type=lambda s: [t for t in s.split(",") if t])
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per quantization run")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="calibration draw; results of a seed other than 0 go to peers-<model>-seed<N>")
    parser.add_argument("--reuse", action="store_true", help="keep outputs of finished runs (re-evaluate only)")
    parser.add_argument("--render", action="store_true",
                        help="only recompute the verdict and the Markdown of results already written (all seeds)")
    args = parser.parse_args()
    if args.render:
        for path in sorted(Path(args.results).glob("peers-*.json")):
            r = json.loads(path.read_text())
            if "tools" not in r or "eval" not in r:  # not a harness run (e.g. the ablation file)
                continue
            r["verdict"] = verdict(r["tools"], r["eval"]["original"].get("window_nll"))
            path.write_text(json.dumps(r, indent=1) + "\n")
            path.with_suffix(".md").write_text(markdown(r))
            log(f"rendered {path.with_suffix('.md')}")
        return
    unknown = set(args.tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools {sorted(unknown)}; choose from {', '.join(TOOLS)}")
    Path(args.results).mkdir(parents=True, exist_ok=True)
    for name in args.models:
        r = run_model(name, args)
        base = Path(args.results) / f"peers-{r['model']}{'' if args.seed == SEED else f'-seed{args.seed}'}"
        base.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
        base.with_suffix(".md").write_text(markdown(r))
        log(f"wrote {base}.json and .md")
        print(markdown(r))


if __name__ == "__main__":
    main()
