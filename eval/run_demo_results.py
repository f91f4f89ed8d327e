"""Regenerate eval/results/demo-<model>.{json,md}: original vs GPTQ int4 g128 vs RTN int4 g128 on the
bundled demo models, with the bundled calibration and held-out text (the README's default run).

    python eval/run_demo_results.py [--models mixtral-demo qwen2moe-demo]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
from pathlib import Path

import psutil

import quantmoe
from quantmoe.base.options import QuantConfig
from quantmoe.base.paths import DEMO_MODELS

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    return (f"{psutil.cpu_count()} CPU cores, {round(psutil.virtual_memory().total / 2**30)} GiB RAM, "
            f"{platform.machine()}, {platform.system()}; device cpu")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(DEMO_MODELS))
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=RESULTS.parent).stdout.strip()
    for name in args.models:
        runs = {}
        with tempfile.TemporaryDirectory() as tmp:
            for backend in ("gptq", "rtn"):
                summary = quantmoe.quantize(DEMO_MODELS[name], Path(tmp) / backend, QuantConfig(backend=backend),
                                            quiet=True)
                runs[backend] = summary["report"]
        g, r = runs["gptq"], runs["rtn"]
        result = {
            "model": name, "commit": commit, "machine": machine(),
            "protocol": g["protocol"], "data": g["data"],
            "original_perplexity": g["results"]["original"]["perplexity"],
            "gptq_int4_g128": {"perplexity": g["results"]["quantized"]["perplexity"], "gap": g["gap"],
                               "quantization": g["quantization"], "stages": g["stages"]},
            "rtn_int4_g128": {"perplexity": r["results"]["quantized"]["perplexity"], "gap": r["gap"],
                              "quantization": r["quantization"], "stages": r["stages"]},
            "gptq_over_rtn_relative_gap": g["gap"]["relative"] / r["gap"]["relative"],
            "target": "gptq relative gap <= 0.70 x rtn relative gap",
        }
        result["passed"] = result["gptq_over_rtn_relative_gap"] <= 0.70
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"demo-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        md = [f"# {name}: original vs GPTQ int4 g128 vs RTN int4 g128", "",
              f"Commit `{commit}`, machine: {result['machine']}.", "",
              "| model | perplexity | gap (rel) | bits/weight | size (MB) | quantize wall (s) |",
              "| --- | ---: | ---: | ---: | ---: | ---: |",
              f"| original (fp16) | {result['original_perplexity']:.4f} | | 16 | {g.get('original_size_bytes', 0) / 1e6:.2f} | |"]
        for label, rep in (("GPTQ int4 g128", g), ("RTN int4 g128", r)):
            q = rep["quantization"]
            md.append(f"| {label} | {rep['results']['quantized']['perplexity']:.4f} | {100 * rep['gap']['relative']:+.2f}% | "
                      f"{q['bits_per_weight']:.3f} | {q['size_bytes'] / 1e6:.2f} | {rep['stages']['quantize']['seconds']:.1f} |")
        md += ["", f"GPTQ's relative gap is {result['gptq_over_rtn_relative_gap']:.2f} x RTN's (target <= 0.70).", "",
               "Protocol: " + json.dumps(g["protocol"]), ""]
        (RESULTS / f"demo-{name}.md").write_text("\n".join(md))
        print("\n".join(md))


if __name__ == "__main__":
    main()
