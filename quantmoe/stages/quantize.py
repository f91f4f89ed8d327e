"""Stage 2 and the whole pipeline: stream a checkpoint layer by layer through GPTQ,
export it as GPTQ v1 shards, and (optionally) evaluate it against the original.

Files handed between stages live in a work folder beside ``--out``
(``.<out>.quantmoe-work/``): ``calib.safetensors``, ``layers/layer-NNNNN.safetensors`` and
``.json`` per finished layer, and ``export/``, the staged output that is renamed to
``--out`` only once complete. A stopped run resumes from its finished layers (resume.py).

While a layer is quantized, a background thread reads the next layer's tensors from the
shards and another writes the previous layer's file, so disk time hides behind compute.
Under torchrun the experts of each layer are spread over the processes (distributed.py).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..base.errors import QuantMoeError, note
from ..base.files import (
    atomic_write_json,
    atomic_write_text,
    replace_dir,
    versions,
    write_manifest,
)
from ..base.measure import PeakRSS, release_freed_memory, stage, steady_host_memory
from ..base.options import BLOCK_KERNELS, QuantConfig, run_options
from ..base.paths import CALIB_DATA, DEFAULT_MODEL, EVAL_DATA, default_seqlen
from ..base.version import __version__
from ..gptq.core import quantize_block
from ..gptq.cuda_graphs import GraphedBlocks
from ..gptq.triton_kernels import TritonBlocks
from ..gptq.triton_kernels import available as triton_available
from ..model.architectures import Architecture, architecture_for, plan_layer
from ..model.checkpoint import Checkpoint
from ..model.distributed import Ranks, join
from ..model.stream import Batch, LayerStream, default_batch_size, pick_device
from .calibrate import calibration_tokens, read_documents, write_calibration
from .evaluate import evaluate
from .export import export_gptq, parse_size
from .layer import LayerQuantizer
from .report import model_card, ranges, render_markdown
from .resume import (
    fingerprint,
    fingerprint_parts,
    layer_file,
    open_work,
    read_layer_log,
    replay_layer,
    write_layer,
)


def default_out(model: Path, qcfg: QuantConfig) -> Path:
    g = "" if qcfg.group_size == -1 else f"-g{qcfg.group_size}"
    layout = "" if qcfg.layout == "source" else f"-{qcfg.layout}"
    return Path("quantmoe-out") / f"{model.name}-{qcfg.backend}-int{qcfg.bits}{g}{layout}"


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.quantmoe-work"


def check_out(out: Path, model: Path, overwrite: bool) -> Path:
    out = out.expanduser().resolve()
    if out == model or model in out.parents:
        raise QuantMoeError(f"--out {out} is the model folder {model} or inside it; choose a folder outside it")
    if out in model.parents:
        raise QuantMoeError(f"the model folder {model} is inside --out {out}, which the export replaces; "
                            "choose an --out outside the model folder")
    if out.exists() and not overwrite:
        raise QuantMoeError(f"{out} already exists; pass --overwrite or choose another --out")
    if out.exists() and not out.is_dir():
        raise QuantMoeError(f"--out {out} is a file; choose a folder path")
    return out


def check_shapes(ckpt: Checkpoint, arch: Architecture, qcfg: QuantConfig) -> list[str]:
    """Fail early when the group size or packing cannot fit a layer; return notes for narrow layers.

    A linear whose input is narrower than the group size (DeepSeek's low-rank q_b_proj and
    kv_b_proj in small models) is quantized as one group spanning its input; g_idx is all zeros.
    One note covers every layer and expert where that happens to the same linear.
    """
    per = 32 // qcfg.bits
    narrow: dict[tuple[str, int], list[int]] = {}
    for i in range(ckpt.config.num_hidden_layers):
        prefix = ckpt.layer_prefix(i)
        shapes = {name[len(prefix):]: ckpt.shape(name) for name in ckpt.names(prefix)}
        plan = plan_layer(arch, ckpt.config, i, qcfg.layout)
        for name, (rows, cols) in plan.linear_shapes(shapes).items():
            full = f"{prefix}{name}.weight"
            if qcfg.group_size != -1 and cols < qcfg.group_size:
                narrow.setdefault((plan.pattern(name), cols), []).append(i)
            elif qcfg.group_size != -1 and cols % qcfg.group_size:
                raise QuantMoeError(f"--group-size {qcfg.group_size} does not divide the input size {cols} of {full}; "
                                    "use a group size that divides it, or -1")
            if cols % per or rows % per:
                raise QuantMoeError(f"{full} has shape {rows}x{cols}, which {qcfg.bits}-bit packing cannot hold "
                                    f"(both sides must be multiples of {per}); this layer cannot be exported as GPTQ")
    return [f"model.layers.{{{ranges(layers)}}}.{pattern}.weight: input size {cols} < group size {qcfg.group_size}; "
            "one group spans the input" for (pattern, cols), layers in narrow.items()]


def not_quantized_modules(stream: LayerStream, layout: str) -> list[str]:
    """Exact paths (in the export's naming) of the decoder modules left in full precision:
    routers always, and dense MLPs in the gptqmodel layout."""
    arch, out = stream.arch, []
    for i in range(stream.num_layers):
        plan = plan_layer(arch, stream.config, i, layout)
        kept = list(plan.routers)
        if arch.dense_mlp is not None and plan.dense_mlp is None and not arch.is_moe_layer(stream.config, i):
            kept.append(arch.dense_mlp.prefix)
        name = arch.gptqmodel_name if layout == "gptqmodel" else (lambda n: n)
        out += [f"model.layers.{i}.{name(m + '.weight')[:-len('.weight')]}" for m in kept]
    return out


def block_function(kernel: str, dev: torch.device):
    """GPTQ's block loop for ``kernel`` (one of BLOCK_KERNELS) on ``dev``; every one gives the same bits.
    auto: the Triton kernel on CUDA where Triton is installed, else the CUDA-graph replay; eager on CPU."""
    if kernel not in BLOCK_KERNELS:
        raise QuantMoeError(f"--block-kernel {kernel!r} is unknown; use one of {', '.join(BLOCK_KERNELS)}")
    if kernel in ("triton", "cuda-graphs") and dev.type != "cuda":
        raise QuantMoeError(f"--block-kernel {kernel} needs a CUDA device and this run is on {dev.type}; "
                            "use --block-kernel auto")
    if kernel == "triton" and not triton_available(dev):
        raise QuantMoeError("--block-kernel triton needs Triton, which is not installed (pip install triton); "
                            "use --block-kernel auto")
    if dev.type != "cuda" or kernel == "eager":
        return quantize_block
    if kernel == "triton" or (kernel == "auto" and triton_available(dev)):
        return TritonBlocks()
    return GraphedBlocks()


def quantize(model: str | Path | None = None, out: str | Path | None = None, qcfg: QuantConfig = QuantConfig(), *,
             ranks: Ranks | None = None, **options) -> dict:
    """Quantize ``model`` into ``out``; returns the summary (report, paths, stage timings).

    ``options`` are the fields of ``RunOptions`` (calib, nsamples, seqlen, seed, device,
    max_shard_size, overwrite, resume, run_eval, eval_data, batch_size, quiet, tf32, prefetch,
    block_kernel); any other keyword is a QuantMoeError naming it.

    Finished layers are kept in the work folder beside ``out``; re-running the same call
    after a crash or Ctrl-C continues from the first unfinished layer and writes the same
    bytes as an uninterrupted run (``resume=False`` starts from scratch). Every input is
    checked before the work folder is touched.

    ``tf32``: TF32 matrix products for Hessians and forward passes on CUDA (faster; changes
    results by rounding only, see benchmarks/README.md). ``prefetch``: read the next layer
    in a background thread. ``block_kernel``: how GPTQ's column loop runs, one of BLOCK_KERNELS
    (see block_function; every choice gives the same bits). ``ranks``: this process's place
    under torchrun (default: read from torchrun's environment variables; a single process
    without them).
    """
    o = run_options(**options)
    calib, nsamples, seqlen, seed, device = o.calib, o.nsamples, o.seqlen, o.seed, o.device
    max_shard_size, overwrite, run_eval, eval_data, batch_size = o.max_shard_size, o.overwrite, o.run_eval, \
        o.eval_data, o.batch_size
    quiet, resume, tf32, prefetch, block_kernel = o.quiet, o.resume, o.tf32, o.prefetch, o.block_kernel
    ranks = ranks if ranks is not None else Ranks.from_env(os.environ)
    steady_host_memory()
    quiet = quiet or not ranks.writes
    torch.manual_seed(seed)
    # Every input is checked, cheapest first, before the work folder (a resumable run) is touched.
    ckpt = Checkpoint(model if model is not None else DEFAULT_MODEL)
    arch = architecture_for(ckpt.config)  # "not a causal LM" / "unsupported" before any complaint about its files
    out = check_out(Path(out) if out is not None else default_out(ckpt.path, qcfg), ckpt.path, overwrite)
    shard_bytes = parse_size(max_shard_size)
    if qcfg.layout == "gptqmodel" and not arch.gptqmodel:
        raise QuantMoeError(f"--layout gptqmodel is not available for {arch.model_type} (GPTQModel names its "
                            "experts differently); use --layout source (see docs/interop.md)")
    ckpt.open_shards()
    notes = check_shapes(ckpt, arch, qcfg)
    tokenizer = ckpt.tokenizer()
    stages: dict = {}
    with stage(stages, "calibrate"):
        ids, calib_meta = calibration_tokens(tokenizer, calib if calib is not None else CALIB_DATA,
                                             nsamples, seqlen, seed, default_seqlen(ckpt.config))
    if run_eval:
        read_documents(eval_data if eval_data is not None else EVAL_DATA)  # fail now, not after hours of work
    dev = join(ranks, pick_device(device))  # a no-op for a single process
    block_fn = block_function(block_kernel, dev)
    stream = LayerStream(ckpt, dev)
    n = stream.num_layers
    batch_size = batch_size or default_batch_size(stream.config, ids.shape[1])

    parts = fingerprint_parts(ckpt, ids, qcfg, seed, dev, batch_size, tf32)
    fp = fingerprint(parts)
    work = work_dir(out)
    if ranks.world > 1 and resume:
        resume = False  # every process would have to agree on where to resume; start over instead
        if ranks.writes:
            note("resume is not supported under torchrun yet; starting from the first layer")
    done = open_work(work, parts, n, resume) if ranks.writes else 0
    if ranks.writes:
        write_calibration(work / "calib.safetensors", ids, calib_meta)

    layers_log, layer_files = [], []
    reader = ThreadPoolExecutor(1, thread_name_prefix="quantmoe-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="quantmoe-write")
    with stage(stages, "quantize"), PeakRSS() as rss, reader, writer:
        batches = stream.embed(ids, batch_size) if done < n else []
        # --fit stream: the full-precision model's activations, beside the quantized model's (their own
        # tensors: each layer's outputs overwrite its inputs).
        originals = [Batch(b.hidden.clone(), b.kwargs) for b in batches] \
            if qcfg.effective_fit == "stream" else None
        for i in range(done):  # finished by an earlier, stopped run: replay them to rebuild the activations
            layers_log.append(read_layer_log(work, i, fp))
            layer_files.append(layer_file(work, i))
            if done < n:
                batches = replay_layer(stream, i, layer_files[-1], qcfg.bits, batches)
                if originals is not None:
                    originals = stream.run_layer(stream.load_layer(i, stream.layer_state(i)), originals)
                    stream.release_layer(i)
        peak_gpu = _gpu_peak(dev, reset=True) or 0.0
        pin = dev.type == "cuda"  # the prefetched layer in page-locked memory: a faster, asynchronous upload
        next_state: Future | None = reader.submit(stream.layer_state, done, True, pin) if prefetch and done < n else None
        written: Future | None = None
        for i in tqdm(range(done, n), desc="quantize", unit="layer", disable=quiet, initial=done, total=n):
            t0 = time.perf_counter()
            _gpu_peak(dev, reset=True)
            state = next_state.result() if next_state is not None else stream.layer_state(i, keep_dtype=True)
            waited = time.perf_counter() - t0
            next_state = reader.submit(stream.layer_state, i + 1, True, pin) if prefetch and i + 1 < n else None
            quantizer = LayerQuantizer(stream, i, batches, qcfg, state, ranks, tf32, block_fn,
                                       batches if qcfg.effective_fit == "layer" else originals)
            del state  # on the device now; host memory holds only the layer being prefetched
            result = quantizer.run()
            del quantizer
            batches, originals = result.outputs, result.original_outputs
            timings = {**result.timings, "load": round(waited + result.timings.get("load", 0.0), 3)}
            if ranks.writes:
                w0 = time.perf_counter()
                if written is not None:
                    written.result()  # one layer file in flight at a time bounds host memory
                timings["write"] = round(timings.get("write", 0.0) + time.perf_counter() - w0, 3)
            layer_peak = _gpu_peak(dev)
            if layer_peak is not None:
                layer_peak = max(layer_peak, *result.peak_gpu_mb.values())
                peak_gpu = max(peak_gpu, layer_peak)
            entry = {"index": i, "seconds": round(time.perf_counter() - t0, 3), "timings": timings,
                     "peak_gpu_mb": layer_peak, "stage_peak_gpu_mb": result.peak_gpu_mb, "peak_rss_mb": rss.take(),
                     "expert_tokens": result.expert_tokens, "modules": result.log}
            if ranks.writes:
                written = writer.submit(_write_when_packed, result.packed, work, i, result.tensors, entry, fp)
            layers_log.append(entry)
            layer_files.append(layer_file(work, i))
            del result
            release_freed_memory()
        del batches, originals
        if written is not None:
            written.result()
    if dev.type == "cuda":
        stages["quantize"]["peak_gpu_mb"] = round(max(peak_gpu, stages["quantize"]["peak_gpu_mb"] or 0), 1)
    if not ranks.writes:
        return {"out": str(out), "report": None, "stages": stages, "fallbacks": [], "notes": notes, "rank": ranks.rank}

    staging = work / "export"
    shutil.rmtree(staging, ignore_errors=True)  # a half-written export of an earlier, stopped run
    try:
        with stage(stages, "export"):
            export_gptq(ckpt, stream.arch, layer_files, staging, qcfg, shard_bytes,
                        not_quantized_modules(stream, qcfg.layout), __version__)
        fallbacks = [{"module": m["module"], "fallback": m["fallback"]}
                     for e in layers_log for m in e["modules"] if m["fallback"]]
        options = {**qcfg.to_dict(), "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "seed": seed,
                   "device": str(dev), "max_shard_size": shard_bytes, "tf32": tf32, "processes": ranks.world,
                   "batch_size": batch_size}
        atomic_write_json(staging / "quantization_log.json", {
            "base_model": str(ckpt.path), "options": options, "calibration": calib_meta, "notes": notes,
            "fallbacks": fallbacks, "layers": layers_log})

        report = None
        if run_eval:
            report = evaluate(staging, baseline=ckpt.path, data=eval_data, device=device, batch_size=batch_size,
                              quiet=quiet)
            report["model"] = str(out)
            report["fallbacks"] = fallbacks
            report["stages"] = {**stages, **report["stages"]}
            atomic_write_json(staging / "eval_report.json", report)
            atomic_write_text(staging / "eval_report.md", render_markdown(report))
        info = {"name": out.name, "base_model": str(ckpt.path), "model_type": stream.config.model_type,
                "version": __version__,
                "quantization_config": json.loads((staging / "config.json").read_text())["quantization_config"],
                "options": options, "fallback_count": len(fallbacks),
                "calibration": f"{ids.shape[0]} x {ids.shape[1]} tokens from `{calib_meta.get('source')}` (seed {seed})"}
        atomic_write_text(staging / "README.md", model_card(report, info))
        write_manifest(staging, {"options": options, "versions": versions(), "base_model": str(ckpt.path),
                                 "inputs": parts, "fingerprint": fp, "calibration": calib_meta, "stages": stages})
        replace_dir(staging, out, overwrite)
    except BaseException:
        # Disk full, Ctrl-C, a failed eval: drop the partial export (it may be what filled the disk)
        # but keep the finished layers, so the same command resumes at the export.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return {"out": str(out), "report": report, "stages": stages, "fallbacks": fallbacks, "notes": notes, "rank": 0}


def _write_when_packed(packed: torch.cuda.Event | None, *args) -> Path:
    """write_layer(*args) once the layer's packed tensors have reached the host (LayerResult.packed)."""
    if packed is not None:
        packed.synchronize()
    return write_layer(*args)


def _gpu_peak(dev: torch.device, reset: bool = False) -> float | None:
    """Peak GPU memory allocated (MB) since the last reset; None on CPU."""
    if dev.type != "cuda":
        return None
    peak = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    if reset:
        torch.cuda.reset_peak_memory_stats(dev)
    return peak
