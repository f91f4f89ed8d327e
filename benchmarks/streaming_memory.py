"""Peak RSS of `quantmoe quantize` on synthetic Mixtral-style checkpoints of equal width and
different depth: streaming means the deeper model must not need more memory.

    python benchmarks/streaming_memory.py --layers 2 8 --out benchmarks/results/streaming-memory-cpu-2core-mixtral-h512-2L-vs-8L-default.json

Each run is a separate `python -m quantmoe quantize` process whose RSS (including its
children) is sampled every 20 ms. The shard size is fixed so that the writer's one-shard
buffer is the same for every depth.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

import quantmoe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build(folder: Path, layers: int, hidden: int, intermediate: int, experts: int) -> Path:
    import torch
    import transformers
    from tiny import make_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    config = transformers.MixtralConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_local_experts=experts, num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.MixtralForCausalLM(config).to(torch.float16)
    model.save_pretrained(folder, max_shard_size="200MB")
    return folder


def peak_rss(cmd: list[str]) -> tuple[float, float, int]:
    """Run cmd; return (peak RSS in MB over the process tree, wall seconds, exit code)."""
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            peak = max(peak, rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.02)
    err = proc.stderr.read().decode()
    if proc.returncode:
        print(err, file=sys.stderr)
    return peak / 2**20, time.perf_counter() - t0, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--out", type=Path,
                    default=Path("benchmarks/results/streaming-memory-cpu-2core-mixtral-h512-2L-vs-8L-default.json"))
    args = ap.parse_args()
    calib = Path(__file__).resolve().parents[1] / "calibration_data" / "python_docs_calib.jsonl"
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.layers:
            src = build(Path(tmp) / f"mixtral-{n}l", n, args.hidden, args.intermediate, args.experts)
            size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            # Tokenize once, outside the measured process: the peak should be the quantizer's.
            tokens = quantmoe.calibrate(calib, tokenizer=src, nsamples=args.nsamples, seqlen=args.seqlen,
                                        out=Path(tmp) / f"calib-{n}l.safetensors")
            cmd = [sys.executable, "-m", "quantmoe", "quantize", str(src), "--out", str(Path(tmp) / f"q-{n}l"),
                   "--calib", str(tokens),
                   "--no-eval", "--quiet", "--device", "cpu", "--max-shard-size", "10MB"]
            peak, wall, rc = peak_rss(cmd)
            runs.append({"layers": n, "checkpoint_mb": round(size / 2**20, 1), "peak_rss_mb": round(peak, 1),
                         "wall_s": round(wall, 1), "exit_code": rc})
            print(runs[-1], flush=True)
    peaks = [r["peak_rss_mb"] for r in runs]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or None
    result = {
        "benchmark": "streaming_memory",
        "commit": commit,
        "machine": f"{platform.node() or 'cpu'}: {psutil.cpu_count()} CPU cores, "
                   f"{round(psutil.virtual_memory().total / 2**30)} GiB RAM, {platform.machine()}, no GPU (device cpu)",
        "model": f"synthetic Mixtral, hidden {args.hidden}, intermediate {args.intermediate}, {args.experts} experts, fp16",
        "calibration": f"{args.nsamples} x {args.seqlen} tokens",
        "runs": runs,
        "max_over_min_peak": round(max(peaks) / min(peaks), 3),
        "target": "deepest/shallowest peak RSS within 1.15",
        "passed": max(peaks) / min(peaks) <= 1.15 and all(r["exit_code"] == 0 for r in runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
