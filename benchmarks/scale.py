"""Real-scale speed and memory: a checkpoint with Mixtral-8x7B's shapes, quantized by ``quantmoe quantize``.

The checkpoint is written here, layer by layer, as Hub-layout safetensors shards of random
bf16 weights (hidden 4096, intermediate 14336, 8 experts top-2, 32 heads / 8 KV heads,
vocab 32000); the generator holds one layer at a time. Calibration is a token file of
random ids (128 x 2048). The quantization runs as a child process through the normal
CLI with --no-eval, and is measured from outside (wall time, peak RSS sampled every
20 ms) and from inside (the per-layer ``timings``, ``peak_gpu_mb`` and ``peak_rss_mb`` that
the pipeline records in quantization_log.json).

    python benchmarks/scale.py                      # full size, 2 layers, on the GPU
    python benchmarks/scale.py --layers 4 --tf32    # pipeline options pass through
    python benchmarks/scale.py --reduced            # hidden 512 / intermediate 1792, 32 x 256 tokens, on CPU
    python benchmarks/scale.py --compare OUT_A OUT_B --model MODEL   # how far two outputs differ

Results go to benchmarks/results/<name>.json (--name; by default named after the device).
benchmarks/README.md indexes the files that back a published number; other runs are archived.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

MIXTRAL_8X7B = dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                    max_position_embeddings=32768, rms_norm_eps=1e-5)
REDUCED = {**MIXTRAL_8X7B, "hidden_size": 512, "intermediate_size": 1792}
FULL_TOKENS = (128, 2048)     # calibration sequences x length, as the issue asks
REDUCED_TOKENS = (32, 256)
INIT_STD = 0.02               # transformers' initializer_range


# -- the checkpoint -------------------------------------------------------------------------
def layer_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    """On-disk (Hub layout) tensor names of one Mixtral decoder layer, relative to the layer."""
    H, I, E = shape["hidden_size"], shape["intermediate_size"], shape["num_local_experts"]
    head_dim = H // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    out = {"input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
           "self_attn.q_proj.weight": (H, H), "self_attn.k_proj.weight": (kv, H),
           "self_attn.v_proj.weight": (kv, H), "self_attn.o_proj.weight": (H, H),
           "block_sparse_moe.gate.weight": (E, H)}
    for e in range(E):
        out[f"block_sparse_moe.experts.{e}.w1.weight"] = (I, H)
        out[f"block_sparse_moe.experts.{e}.w3.weight"] = (I, H)
        out[f"block_sparse_moe.experts.{e}.w2.weight"] = (H, I)
    return out


def random_tensors(shapes: dict[str, tuple[int, ...]], gen: torch.Generator, device: torch.device) -> dict:
    """bf16 N(0, INIT_STD) weights (norms are ones), drawn on ``device`` and returned on the host."""
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, device=device, dtype=torch.float32).normal_(0.0, INIT_STD, generator=gen)
            out[name] = t.to(torch.bfloat16).cpu()
    return out


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer with exactly ``vocab_size`` entries, so ids < vocab_size pass the calibration check."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def make_checkpoint(folder: Path, shape: dict, layers: int, seed: int = 0, device: str = "auto") -> Path:
    """Write a Mixtral checkpoint of ``shape`` with random weights: one shard per layer, plus one for embeddings and head."""
    import transformers
    from safetensors.torch import save_file

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = transformers.MixtralConfig(**shape, num_hidden_layers=layers, tie_word_embeddings=False, dtype="bfloat16")
    config.architectures = ["MixtralForCausalLM"]
    config.save_pretrained(folder)
    write_tokenizer(folder, shape["vocab_size"])
    gen = torch.Generator(device=dev).manual_seed(seed)
    n = layers + 1
    weight_map, total = {}, 0

    def write(i: int, tensors: dict) -> None:
        nonlocal total
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()

    H, V = shape["hidden_size"], shape["vocab_size"]
    write(0, random_tensors({"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,),
                             "lm_head.weight": (V, H)}, gen, dev))
    for layer in range(layers):
        shapes = {f"model.layers.{layer}.{k}": v for k, v in layer_shapes(shape).items()}
        write(layer + 1, random_tensors(shapes, gen, dev))  # one layer in memory at a time
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def make_view(src: Path, dst: Path, layers: int) -> Path:
    """The first ``layers`` layers of a checkpoint from make_checkpoint, as a folder of links (no copy)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    keep = {k: v for k, v in index["weight_map"].items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}, indent=2))
    for p in src.iterdir():
        if p.name not in ("config.json", "model.safetensors.index.json") and not (dst / p.name).exists():
            (dst / p.name).symlink_to(p.resolve())
    return dst


def make_calibration(path: Path, vocab_size: int, nsamples: int, seqlen: int, seed: int = 0) -> Path:
    """A token file of random ids in [0, vocab_size), in quantmoe's calibration format."""
    from quantmoe.stages.calibrate import write_calibration

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (nsamples, seqlen), generator=gen, dtype=torch.int64)
    meta = {"source": "random token ids (benchmarks/scale.py)", "seed": str(seed), "nsamples": str(nsamples),
            "seqlen": str(seqlen), "vocab_size": str(vocab_size)}
    return write_calibration(path, ids, meta)


# -- running and measuring ------------------------------------------------------------------
def run_quantize(model: Path, out: Path, calib: Path, device: str, options: list[str], quantmoe_path: Path,
                 timeout: float, nproc: int = 1) -> dict:
    """``python -m quantmoe quantize`` as a child process (under torchrun with ``nproc`` > 1);
    wall time, exit status and the sampled peak RSS: of the process tree, and of its largest process."""
    import psutil

    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", str(nproc)]
    cmd = [*launch, "-m", "quantmoe", "quantize", str(Path(model).resolve()), "--out", str(Path(out).resolve()),
           "--calib", str(Path(calib).resolve()), "--no-eval", "--quiet", "--overwrite", "--device", device, *options]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(quantmoe_path), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    t0 = time.perf_counter()
    # `python -m` puts the working folder first on sys.path: run inside the tree whose quantmoe is meant.
    child = subprocess.Popen(cmd, env=env, cwd=quantmoe_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    proc, peak, peak_one = psutil.Process(child.pid), 0, 0
    status = None
    while status is None:
        try:
            sizes = [p.memory_info().rss for p in (proc, *proc.children(recursive=True))]
            peak, peak_one = max(peak, sum(sizes)), max(peak_one, *sizes)
        except psutil.Error:
            pass
        if time.perf_counter() - t0 > timeout:
            for p in proc.children(recursive=True):
                p.kill()
            child.kill()
            status = "timeout"
            break
        try:
            child.wait(0.02)
            status = child.returncode
        except subprocess.TimeoutExpired:
            pass
    output = child.communicate()[0] or ""
    return {"command": " ".join(cmd[1:]), "processes": nproc, "returncode": status,
            "wall_seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb_sampled": round(peak / 2**20, 1),
            "peak_rss_mb_one_process": round(peak_one / 2**20, 1), "output_tail": output[-3000:]}


STAGES = ("load", "capture", "hessians", "solve", "forward", "write")


def read_layers(out: Path) -> tuple[list[dict], dict]:
    """The per-layer log entries and the stage records of an output (or, after a failure, of its work folder)."""
    log = out / "quantization_log.json"
    if log.is_file():
        layers = json.loads(log.read_text())["layers"]
        stages = json.loads((out / "manifest.json").read_text())["stages"]
        return layers, stages
    work = out.parent / f".{out.name}.quantmoe-work" / "layers"
    return [json.loads(p.read_text()) for p in sorted(work.glob("layer-*.json"))], {}


def summarise(layers: list[dict], stages: dict, total_layers: int = 32) -> dict:
    """Per-layer split by stage, steady-state means (layers after the first) and the extrapolation to ``total_layers``."""
    rows = []
    for e in layers:
        t = e.get("timings", {})
        row = {"index": e["index"], "seconds": e["seconds"], **{k: t.get(k) for k in STAGES},
               "write_background": t.get("write_background"), "peak_gpu_mb": e.get("peak_gpu_mb"),
               "stage_peak_gpu_mb": e.get("stage_peak_gpu_mb"), "peak_rss_mb": e.get("peak_rss_mb")}
        if t:
            row["other"] = round(e["seconds"] - sum(t.get(k, 0.0) for k in STAGES), 3)
        rows.append(row)
    if not rows:
        return {"layers": []}
    steady = rows[1:] or rows
    mean = {k: round(sum(r[k] or 0.0 for r in steady) / len(steady), 3)
            for k in ("seconds", *STAGES, "other") if any(r.get(k) is not None for r in steady)}
    out = {"layers": rows, "steady_layer_mean": mean}
    if stages:
        per_layer = mean["seconds"]
        quantize_s = stages["quantize"]["seconds"]
        outside = quantize_s - sum(r["seconds"] for r in rows)          # embedding the calibration tokens
        export_per_layer = stages["export"]["seconds"] / len(rows)
        out["extrapolation"] = {
            "layers": total_layers,
            "quantize_seconds": round(rows[0]["seconds"] + (total_layers - 1) * per_layer + outside, 1),
            "export_seconds": round(export_per_layer * total_layers, 1),
            "how": "first layer + (layers - 1) x mean of the later layers + embedding; export scaled per layer",
        }
        out["extrapolation"]["total_seconds"] = round(
            out["extrapolation"]["quantize_seconds"] + out["extrapolation"]["export_seconds"]
            + stages["calibrate"]["seconds"], 1)
        out["stages"] = stages
    return out


def device_info(device: str) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count()}
    if device != "cpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        info["gpu"] = None
        info["cpu"] = platform.processor() or platform.machine()
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


# -- comparing two outputs ------------------------------------------------------------------
def compare_outputs(a: Path, b: Path, model: Path | None = None, device: str = "auto") -> dict:
    """How far output ``b`` is from output ``a``: levels that differ, and (with the source ``model``)
    each one's weight error and GPTQ loss, to show a difference is rounding rather than quality."""
    from quantmoe.model.checkpoint import Checkpoint
    from quantmoe.formats.gptq_v1 import GPTQ_SUFFIXES, dequantize_linear, unpack_linear

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    A, B = Checkpoint(a), Checkpoint(b)
    src = Checkpoint(model) if model is not None else None
    bits = int(A.quantization["bits"])
    modules = sorted(n[: -len(".qweight")] for n in A.names() if n.endswith(".qweight"))  # a's; b may have more
    totals = {"levels": 0, "levels_differ": 0, "max_level_step": 0, "identical_modules": 0, "modules": len(modules)}
    err = {"a": 0.0, "b": 0.0, "ref": 0.0}
    for m in modules:
        pa = {s: A.tensor(f"{m}.{s}").to(dev) for s in GPTQ_SUFFIXES}
        pb = {s: B.tensor(f"{m}.{s}").to(dev) for s in GPTQ_SUFFIXES}
        if all(torch.equal(pa[s], pb[s]) for s in GPTQ_SUFFIXES):
            totals["identical_modules"] += 1
        qa, qb = unpack_linear(pa, bits)[0], unpack_linear(pb, bits)[0]
        totals["levels"] += qa.numel()
        totals["levels_differ"] += int((qa != qb).sum())
        totals["max_level_step"] = max(totals["max_level_step"], int((qa - qb).abs().max()))
        if src is not None:
            W = src.tensor(f"{m}.weight").to(dev).float()
            err["a"] += float((dequantize_linear(pa, bits) - W).pow(2).sum())
            err["b"] += float((dequantize_linear(pb, bits) - W).pow(2).sum())
            err["ref"] += float(W.pow(2).sum())
    for c in (A, B):
        c.close()
    out = {"a": str(a), "b": str(b), **totals,
           "levels_differ_fraction": totals["levels_differ"] / max(1, totals["levels"])}
    if src is not None:
        out["relative_weight_error_a"] = (err["a"] / err["ref"]) ** 0.5
        out["relative_weight_error_b"] = (err["b"] / err["ref"]) ** 0.5
    losses = []  # over the modules of a only, so a run of fewer layers compares with a longer one
    for folder in (a, b):
        log = json.loads((Path(folder) / "quantization_log.json").read_text())
        losses.append(sum(m["loss"] for e in log["layers"] for m in e["modules"] if m["module"] in modules))
    out["gptq_loss_a"], out["gptq_loss_b"] = losses
    out["gptq_loss_ratio_b_over_a"] = losses[1] / losses[0] if losses[0] else None
    return out


# -- the GPTQ solve alone -------------------------------------------------------------------
SOLVE_SHAPES = {"down": (8, 4096, 14336), "gate_up": (8, 28672, 4096), "qkv": (1, 6144, 4096)}  # (B, R, C)


def solve_bench(baseline: Path | None = None, device: str = "cuda", shapes: dict = SOLVE_SHAPES) -> dict:
    """Time gptq_quantize on one Mixtral layer's matrix shapes (random W, a full-rank Hessian of
    2C random correlated inputs): this tree's core, and the core of a ``baseline`` tree if given."""
    import importlib.util

    from quantmoe.gptq import core as gptq

    cores = {"new": gptq}
    if baseline is not None:
        old = Path(baseline) / "quantmoe" / "gptq.py"  # trees before the layered package kept the core there
        spec = importlib.util.spec_from_file_location(
            "baseline_gptq", old if old.is_file() else Path(baseline) / "quantmoe" / "gptq" / "core.py")
        cores["baseline"] = importlib.util.module_from_spec(spec)
        sys.modules["baseline_gptq"] = cores["baseline"]
        spec.loader.exec_module(cores["baseline"])
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    out = {}

    cuda = dev.type == "cuda"

    def timed(fn):
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) if cuda else 0
        t0 = time.perf_counter()
        res = fn()
        if cuda:
            torch.cuda.synchronize(dev)
        extra = round((torch.cuda.max_memory_allocated(dev) - base) / 2**20) if cuda else None
        return res, round(time.perf_counter() - t0, 3), extra

    for core in cores.values():  # warm up: library handles, kernels
        core.gptq_quantize(torch.randn(2, 64, 256, device=dev), torch.eye(256, device=dev).expand(2, 256, 256) * 1.0,
                           core.QuantSpec(4, 128, True))
    for name, (B, R, C) in shapes.items():
        X = torch.randn(2 * C, C, device=dev, generator=gen)
        X = X + 0.3 * X.roll(1, dims=1)  # correlated inputs, as activations are
        H1 = 2 * X.T @ X / X.shape[0]
        del X
        W = torch.randn(B, R, C, device=dev, generator=gen) * INIT_STD
        row, results = {}, {}
        for label, core in cores.items():
            H = H1.expand(B, C, C).contiguous()
            if label == "new":
                res, secs, mem = timed(partial(core.gptq_quantize, W, H, core.QuantSpec(4, 128, True),
                                               overwrite_H=True))
                Hc = H1.expand(B, C, C).contiguous()
                _, chol, _ = timed(partial(core.damped_inverse_cholesky, Hc, 0.01))
                row["new_inverse_seconds"] = chol
                del Hc
            else:
                res, secs, mem = timed(partial(core.gptq_quantize, W, H, core.QuantSpec(4, 128, True)))
                _, chol, _ = timed(partial(core.damped_inverse_cholesky, H1.expand(B, C, C), 0.01))
                row["baseline_inverse_seconds"] = chol
            del H
            row[f"{label}_seconds"], row[f"{label}_extra_gpu_mb"] = secs, mem
            results[label] = res.q
            del res
            if cuda:
                torch.cuda.empty_cache()
        if len(results) == 2:
            row["levels_differ_fraction"] = float((results["new"] != results["baseline"]).float().mean())
        out[name] = {"shape": [B, R, C], **row}
        print(name, out[name], flush=True)
        del W, H1, results
        if cuda:
            torch.cuda.empty_cache()
    return out


# -- the command line -----------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reduced", action="store_true", help="hidden 512, intermediate 1792, 32 x 256 tokens, on CPU")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs) under torchrun")
    ap.add_argument("--nsamples", type=int)
    ap.add_argument("--seqlen", type=int)
    ap.add_argument("--device", default=None, help="auto | cpu | cuda [default: cpu with --reduced, else auto]")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantmoe-scale"), help="where checkpoints and outputs go")
    ap.add_argument("--model", type=Path, help="reuse a checkpoint written earlier instead of writing one")
    ap.add_argument("--quantmoe", type=Path, default=REPO, help="the quantmoe source tree to run (e.g. a baseline)")
    ap.add_argument("--name", help="result file name [default: scale-<device>-<layers>L]")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("OUT_A", "OUT_B"))
    ap.add_argument("--keep", action="store_true", help="keep the quantized output")
    ap.add_argument("--solve-bench", action="store_true", help="time the GPTQ solve alone on Mixtral's shapes (CUDA)")
    ap.add_argument("--baseline", type=Path, help="with --solve-bench: a tree whose quantmoe/gptq.py to compare with")
    args, options = ap.parse_known_args(argv)  # unknown options go to `quantmoe quantize` (--tf32, --no-prefetch, ...)

    if args.compare or args.solve_bench:
        result = (compare_outputs(*args.compare, model=args.model) if args.compare
                  else {"device": device_info("cuda"), "solve": solve_bench(args.baseline)})
        if args.name:
            args.results.mkdir(parents=True, exist_ok=True)
            (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return result

    device = args.device or ("cpu" if args.reduced else "auto")
    shape = REDUCED if args.reduced else MIXTRAL_8X7B
    nsamples, seqlen = REDUCED_TOKENS if args.reduced else FULL_TOKENS
    nsamples, seqlen = args.nsamples or nsamples, args.seqlen or seqlen
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = args.model or make_checkpoint(work / f"mixtral-{'reduced' if args.reduced else 'full'}-{args.layers}L",
                                          shape, args.layers, device=device)
    make_seconds = round(time.perf_counter() - t0, 1)
    calib = make_calibration(work / f"calib-{nsamples}x{seqlen}.safetensors", shape["vocab_size"], nsamples, seqlen)

    from quantmoe.stages.calibrate import read_calibration
    from quantmoe.model.checkpoint import Checkpoint

    read_calibration(calib, Checkpoint(model).tokenizer())  # the vocabulary check passes

    out = work / f"out-{args.name or 'run'}"
    run = run_quantize(model, out, calib, device, options, args.quantmoe, args.timeout, args.nproc)
    layers, stages = read_layers(out)
    info = device_info(device)
    label = (info["gpu"] or "cpu").replace(" ", "-")
    n_layers = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
    result = {
        "benchmark": "benchmarks/scale.py", "reduced": args.reduced, "shape": shape, "num_layers": n_layers,
        "calibration_tokens": [nsamples, seqlen], "options": options, "processes": args.nproc, "device": info,
        "checkpoint_seconds": make_seconds, "run": run,
        "peak_gpu_mb": (stages.get("quantize") or {}).get("peak_gpu_mb"),
        "peak_rss_mb": run["peak_rss_mb_sampled"],
        **summarise(layers, stages),
    }
    name = args.name or f"scale-{label}-{n_layers}L{'-reduced' if args.reduced else ''}" \
        + (f"-{args.nproc}proc" if args.nproc > 1 else "")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result.get(k) for k in ("peak_gpu_mb", "peak_rss_mb", "steady_layer_mean",
                                                 "extrapolation")}, indent=2))
    print(f"wrote {args.results / f'{name}.json'} (returncode {run['returncode']})")
    if not args.keep and out.exists() and run["returncode"] == 0:
        import shutil

        shutil.rmtree(out)
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
