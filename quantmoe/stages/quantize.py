"""Stage 2 and the whole pipeline: stream a checkpoint layer by layer through GPTQ,
export it as GPTQ v1 shards, and (optionally) evaluate it against the original.

Files handed between stages live in a work folder beside ``--out``
(``.<out>.quantmoe-work/``): ``calib.safetensors``, ``layers/layer-NNNNN.safetensors`` and
``.json`` per finished layer, and ``export/``, the staged output that is renamed to
``--out`` only once complete. A stopped run resumes from its finished layers (resume.py).

While a layer is quantized, a background thread reads the next layer's tensors from the
shards and another writes the previous layer's file, so disk time hides behind compute.
Under torchrun the experts of each layer are spread over the processes, on one node or
several (distributed.py, docs/distributed.md); rank 0 writes, and a stopped run resumes there too.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from ..base.errors import QuantMoeError
from ..base.files import (
    atomic_write_json,
    atomic_write_text,
    check_replaceable,
    replace_dir,
    versions,
    write_manifest,
)
from ..base.measure import PeakRSS, release_freed_memory, stage, steady_host_memory
from ..base.options import BLOCK_KERNELS, QuantConfig
from ..base.paths import (
    CALIB_DATA,
    DEFAULT_MODEL,
    EVAL_DATA,
    default_seqlen,
    published_name,
)
from ..base.version import __version__
from ..gptq.core import quantize_block
from ..gptq.cuda_graphs import GraphedBlocks
from ..gptq.triton_kernels import TritonBlocks
from ..gptq.triton_kernels import available as triton_available
from ..model.architectures import Architecture, architecture_for, plan_layer
from ..model.checkpoint import READ_WINDOW, Checkpoint
from ..model.distributed import Ranks, control_group, finish, join
from ..model.stream import Batch, LayerStream, default_batch_size, pick_device
from .calibrate import (
    calibration_tokens,
    check_count,
    check_seed,
    read_documents,
    write_calibration,
)
from .evaluate import evaluate
from .export import export_gptq, parse_size
from .layer import CAPTURE_CACHE_BYTES, HOST_CAPTURE_BYTES, LayerQuantizer
from .precision import check_recipe
from .report import model_card, ranges, render_markdown
from .resume import (
    fingerprint,
    fingerprint_parts,
    layer_file,
    lock_work,
    open_work_together,
    read_layer_log,
    replay_layer,
    write_layer,
)


def default_out(model: Path, qcfg: QuantConfig) -> Path:
    g = "" if qcfg.group_size == -1 else f"-g{qcfg.group_size}"
    layout = "" if qcfg.layout == "source" else f"-{qcfg.layout}"
    fmt = "-ct" if qcfg.format == "compressed-tensors" else ""
    return Path("quantmoe-out") / f"{model.name}-{qcfg.backend}-int{qcfg.bits}{g}{layout}{fmt}"


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.quantmoe-work"


def check_out(out: Path, model: Path, overwrite: bool) -> Path:
    out = out.expanduser().resolve()
    if out == model or model in out.parents:
        raise QuantMoeError(f"--out {out} is the model folder {model} or inside it; choose a folder outside it")
    if out in model.parents:
        raise QuantMoeError(f"the model folder {model} is inside --out {out}, which the export replaces; "
                            "choose an --out outside the model folder")
    check_replaceable(out, overwrite)  # now, before any work; and again when the export replaces it
    return out


def published_calibration(meta: dict) -> dict:
    """Calibration metadata as published files record it: its source and tokenizer by name, not local path."""
    return {**meta, **{k: published_name(meta[k]) for k in ("source", "tokenizer") if meta.get(k)}}


def check_shapes(ckpt: Checkpoint, arch: Architecture, qcfg: QuantConfig) -> list[str]:
    """Fail early when the group size or packing cannot fit a layer; return notes for narrow layers.

    A linear whose input is narrower than the group size (DeepSeek's low-rank q_b_proj and
    kv_b_proj in small models) is quantized as one group spanning its input; g_idx is all zeros.
    One note covers every layer and expert where that happens to the same linear.
    """
    narrow: dict[tuple[str, int, int], list[int]] = {}
    base = qcfg
    for i in range(ckpt.config.num_hidden_layers):
        prefix = ckpt.layer_prefix(i)
        shapes = {name[len(prefix):]: ckpt.shape(name) for name in ckpt.names(prefix)}
        plan = plan_layer(arch, ckpt.config, i, base.layout)
        kinds = plan.linear_kinds()
        for name, (rows, cols) in plan.linear_shapes(shapes).items():
            qcfg = base.module_config(prefix + name, kinds[name])  # its own under --recipe
            if qcfg is None:  # kept in 16 bits
                continue
            per = 32 // qcfg.bits
            full = f"{prefix}{name}.weight"
            if qcfg.group_size != -1 and cols < qcfg.group_size:
                narrow.setdefault((plan.pattern(name), cols, qcfg.group_size), []).append(i)
            elif qcfg.group_size != -1 and cols % qcfg.group_size:
                raise QuantMoeError(f"--group-size {qcfg.group_size} does not divide the input size {cols} of {full}; "
                                    "use a group size that divides it, or -1")
            if cols % per or rows % per:
                raise QuantMoeError(f"{full} has shape {rows}x{cols}, which {qcfg.bits}-bit packing cannot hold "
                                    f"(both sides must be multiples of {per}); this layer cannot be exported as GPTQ")
    return [f"model.layers.{{{ranges(layers)}}}.{pattern}.weight: input size {cols} < group size {size}; "
            "one group spans the input" for (pattern, cols, size), layers in narrow.items()]


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


def quantize(model: str | Path | None = None, out: str | Path | None = None, qcfg: QuantConfig = QuantConfig(),
             calib: str | Path | None = None, nsamples: int | None = None, seqlen: int | None = None,
             seed: int = 0, device: str = "auto", max_shard_size: str | int = "2GB", overwrite: bool = False,
             run_eval: bool = True, eval_data: str | Path | None = None, batch_size: int | None = None,
             quiet: bool = False, resume: bool = True, tf32: bool = False, prefetch: bool = True,
             block_kernel: str = "auto", gpu_memory: str | int | None = None, ranks: Ranks | None = None,
             record_paths: bool = False, host_memory: str | int | None = None) -> dict:
    """Quantize ``model`` into ``out``; returns the summary (report, paths, stage timings).

    Finished layers are kept in the work folder beside ``out``; re-running the same call
    after a crash or Ctrl-C continues from the first unfinished layer and writes the same
    bytes as an uninterrupted run (``resume=False`` starts from scratch). Every input is
    checked before the work folder is touched.

    ``tf32``: TF32 matrix products for Hessians and forward passes on CUDA (faster; changes
    results by rounding only, see benchmarks/README.md). ``prefetch``: read the next layer
    in a background thread. ``gpu_memory``: the device memory the run may use ("70GB"; default on CUDA:
    what the device has free now, less some headroom; on CPU: no limit); a layer's routed experts are
    worked on in groups that fit it (stages/experts.py), with the same bytes for any budget.
    ``host_memory``: the host memory the run may hold ("32GB"; default: what the machine has available
    now, less some headroom); the capture's pinned cache and the read-ahead of the next layer are sized
    to it (``host_plan``), with the same bytes for any budget.
    ``block_kernel``: how GPTQ's column loop runs, one of BLOCK_KERNELS
    (see block_function; every choice gives the same bits). ``ranks``: this process's place
    under torchrun (default: read from torchrun's environment variables; a single process
    without them). ``record_paths``: the published files (card, manifest, logs, eval report) name
    the model, data and output by their local paths, for private use; by default by Hub id or
    folder/file name (``published_name``).
    """

    ranks = ranks if ranks is not None else Ranks.from_env(os.environ)
    steady_host_memory()
    quiet = quiet or not ranks.writes
    check_seed(seed)
    if batch_size:  # 0 or None: the default
        check_count("--batch-size", batch_size)
    torch.manual_seed(seed)
    # Every input is checked, cheapest first, before the work folder (a resumable run) is touched.
    ckpt = Checkpoint(model if model is not None else DEFAULT_MODEL)
    arch = architecture_for(ckpt.config)  # "not a causal LM" / "unsupported" before any complaint about its files
    ckpt.check_layers()
    out = check_out(Path(out) if out is not None else default_out(ckpt.path, qcfg), ckpt.path, overwrite)
    shown = str if record_paths else published_name  # how published files name a path
    shard_bytes = parse_size(max_shard_size)
    if qcfg.layout == "gptqmodel" and not arch.gptqmodel:
        raise QuantMoeError(f"--layout gptqmodel is not available for {arch.model_type} (GPTQModel does not load "
                            "this family's experts as quantmoe writes them); use --layout source (see docs/interop.md)")
    ckpt.open_shards()
    check_recipe(arch, ckpt.config, qcfg)
    notes = check_shapes(ckpt, arch, qcfg)
    ckpt.quantized_linears  # an FP8 release's missing or misshapen scales fail here, from the headers alone
    tokenizer = ckpt.tokenizer()
    stages: dict = {}
    with stage(stages, "calibrate"):
        ids, calib_meta = calibration_tokens(tokenizer, calib if calib is not None else CALIB_DATA,
                                             nsamples, seqlen, seed, default_seqlen(ckpt.config))
    calib_meta = calib_meta if record_paths else published_calibration(calib_meta)
    if run_eval:
        read_documents(eval_data if eval_data is not None else EVAL_DATA)  # fail now, not after hours of work
    dev = join(ranks, pick_device(device))  # a no-op for a single process
    control = control_group(ranks)
    block_fn = block_function(block_kernel, dev)
    budget = memory_budget(gpu_memory, dev)
    host = host_budget(host_memory)
    stream = LayerStream(ckpt, dev)
    n = stream.num_layers
    batch_size = batch_size or default_batch_size(stream.config, ids.shape[1])

    parts = fingerprint_parts(ckpt, ids, qcfg, seed, dev, batch_size, tf32)
    fp = fingerprint(parts)
    work = work_dir(out)
    lock = lock_work(work) if ranks.writes else None  # held until the export is in place
    done = open_work_together(work, parts, n, resume, ranks, control)
    if ranks.writes:
        write_calibration(work / "calib.safetensors", ids, calib_meta)

    layers_log, layer_files = [], []
    reader = ThreadPoolExecutor(1, thread_name_prefix="quantmoe-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="quantmoe-write")
    with stage(stages, "quantize"), PeakRSS() as rss, reader, writer:
        batches = stream.embed(ids, batch_size) if done < n else []
        stream.release_embeddings()  # not needed again: their device memory goes to the layers' work
        # --fit stream: the full-precision model's activations, beside the quantized model's (their own
        # tensors: each layer's outputs overwrite its inputs).
        originals = [Batch(b.hidden.clone(), b.kwargs) for b in batches] \
            if qcfg.fit == "stream" and qcfg.backend != "rtn" else None
        for i in range(done):  # finished by an earlier, stopped run: replay them to rebuild the activations
            layers_log.append(read_layer_log(work, i, fp))
            layer_files.append(layer_file(work, i))
            if done < n:
                batches = replay_layer(stream, i, layer_files[-1], None, batches, ranks)  # bits: each linear's
                if originals is not None:
                    originals = stream.run_layer(stream.load_layer(i, stream.layer_state(i)), originals, ranks)
                    stream.release_layer(i)
        peak_gpu = _gpu_peak(dev, reset=True) or 0.0
        def pin(i: int) -> bool:
            """The prefetched layer in page-locked memory (a faster, asynchronous upload) unless it is larger
            than PIN_BYTES: pinning copies it, so host memory would briefly hold it twice."""
            return dev.type == "cuda" and layer_bytes(ckpt, i) <= PIN_BYTES

        def read_ahead(i: int) -> Future | None:
            return reader.submit(stream.layer_state, i, True, pin(i)) if prefetch and i < n else None

        # The MLP inputs' capture, kept in pinned host memory (LayerQuantizer._captured_pairs) on CUDA when
        # larger than the device may keep.
        captured = ids.numel() * stream.config.hidden_size * 4 * (2 if qcfg.fit in ("stream", "layer") else 1)
        captured = captured if dev.type == "cuda" and captured > CAPTURE_CACHE_BYTES else 0
        next_state: Future | None = read_ahead(done)
        written: Future | None = None
        for i in tqdm(range(done, n), desc="quantize", unit="layer", disable=quiet, initial=done, total=n):
            t0 = time.perf_counter()
            _gpu_peak(dev, reset=True)
            state = next_state.result() if next_state is not None else stream.layer_state(i, keep_dtype=True)
            waited = time.perf_counter() - t0
            quantizer = LayerQuantizer(stream, i, batches, qcfg, state, ranks, tf32, block_fn,
                                       batches if qcfg.fit == "layer" and qcfg.backend != "rtn" else originals,
                                       budget)
            del state  # on the device now
            plan = host_plan(host, psutil.Process().memory_info().rss, packed_bytes(ckpt, arch, qcfg, i),
                             captured,
                             layer_bytes(ckpt, i + 1) if prefetch and i + 1 < n else None)
            quantizer.host_capture = plan.capture
            next_state = read_ahead(i + 1) if plan.read_ahead else None
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
                     "expert_tokens": result.expert_tokens, "expert_groups": result.expert_groups,
                     "modules": result.log}
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
        finish(ranks, control)  # until rank 0 has written --out: see distributed.py
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
            "base_model": shown(ckpt.path), "options": options, "calibration": calib_meta, "notes": notes,
            "fallbacks": fallbacks, "layers": layers_log})

        report = None
        if run_eval:
            report = evaluate(staging, baseline=ckpt.path, data=eval_data, device=device, batch_size=batch_size,
                              quiet=quiet, record_paths=record_paths, tf32=tf32)
            report["model"] = shown(out)
            report["fallbacks"] = fallbacks
            report["stages"] = {**stages, **report["stages"]}
            atomic_write_json(staging / "eval_report.json", report)
            atomic_write_text(staging / "eval_report.md", render_markdown(report))
        info = {"name": out.name, "base_model": shown(ckpt.path), "model_type": stream.config.model_type,
                "version": __version__,
                "quantization_config": json.loads((staging / "config.json").read_text())["quantization_config"],
                "options": options, "fallback_count": len(fallbacks),
                "calibration": f"{ids.shape[0]} x {ids.shape[1]} tokens from `{calib_meta.get('source')}` (seed {seed})"}
        atomic_write_text(staging / "README.md", model_card(report, info))
        write_manifest(staging, {"options": options, "versions": versions(), "base_model": shown(ckpt.path),
                                 "inputs": parts, "fingerprint": fp, "calibration": calib_meta, "stages": stages})
        replace_dir(staging, out, overwrite)
    except BaseException:
        # Disk full, Ctrl-C, a failed eval: drop the partial export (it may be what filled the disk)
        # but keep the finished layers, so the same command resumes at the export.
        shutil.rmtree(staging, ignore_errors=True)
        finish(ranks, control, ok=False)
        raise
    shutil.rmtree(work, ignore_errors=True)
    lock.release()
    finish(ranks, control)
    return {"out": str(out), "report": report, "stages": stages, "fallbacks": fallbacks, "notes": notes, "rank": 0}


# Layers larger than this are prefetched in ordinary host memory (see quantize's ``pin``).
PIN_BYTES = 4 << 30
# What a default budget leaves free on the device: the caching allocator's fragmentation and the
# temporaries of a forward pass, which the experts' group sizing does not count.
BUDGET_HEADROOM = 4 << 30


def memory_budget(gpu_memory: str | int | None, dev: torch.device) -> int | None:
    """The bytes of device memory the run may use: ``gpu_memory`` ("40GB"), or on CUDA by default what
    the device has free (plus what this process already holds) less BUDGET_HEADROOM; None on CPU
    without one (no grouping)."""
    if gpu_memory is not None:
        try:
            return parse_size(gpu_memory)
        except QuantMoeError:
            raise QuantMoeError(f"--gpu-memory {gpu_memory!r} is not a size; write it like 70GB or 40GB") from None
    if dev.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    return free + torch.cuda.memory_reserved(dev) - BUDGET_HEADROOM


# What a default host budget leaves to the rest of the machine.
HOST_HEADROOM = 4 << 30


def host_budget(host_memory: str | int | None) -> int:
    """The bytes of host memory the run may hold: ``host_memory`` ("32GB"), or by default what the machine
    has available now plus what this process holds already, less HOST_HEADROOM."""
    if host_memory is not None:
        try:
            return parse_size(host_memory)
        except QuantMoeError:
            raise QuantMoeError(f"--host-memory {host_memory!r} is not a size; write it like 32GB or 64GB") from None
    return psutil.virtual_memory().available + psutil.Process().memory_info().rss - HOST_HEADROOM


@dataclass(frozen=True)
class HostPlan:
    capture: int       # bytes the layer's capture may pin in host memory (LayerQuantizer.host_capture)
    read_ahead: bool   # whether the next layer is read while this one is worked on


def host_plan(budget: int, resident: int, packed: int, capture: int, next_layer: int | None) -> HostPlan:
    """How a layer uses the host ``budget`` (bytes) beside what is ``resident`` once it is loaded: first its
    ``packed`` results (host copies until its layer file is written), then its MLP inputs' pinned
    ``capture`` (it saves a forward pass through attention for every group of experts), then the read of
    the ``next_layer``'s stored bytes (None: none to read) while it is worked on, with the shards' pages
    (READ_WINDOW), which saves only the read's time. Read after the layer instead, the next layer finds
    this one's capture freed."""
    room = budget - resident - packed
    limit = max(0, min(HOST_CAPTURE_BYTES, room))
    pinned = capture if capture <= limit else 0  # a capture that does not fit is not kept at all
    read_ahead = next_layer is not None and pinned + next_layer + READ_WINDOW <= room
    return HostPlan(limit, read_ahead)


def layer_bytes(ckpt: Checkpoint, i: int) -> int:
    """Bytes layer i takes in the shards (what reading it holds in host memory)."""
    return sum(ckpt.nbytes(name) for name in ckpt.names(ckpt.layer_prefix(i)))


def packed_bytes(ckpt: Checkpoint, arch: Architecture, qcfg: QuantConfig, i: int) -> int:
    """Bytes of layer i's packed GPTQ tensors (qweight, scales, qzeros, g_idx), from the shapes in the headers."""
    prefix = ckpt.layer_prefix(i)
    shapes = {name[len(prefix):]: ckpt.shape(name) for name in ckpt.names(prefix)}
    total = 0
    for rows, cols in plan_layer(arch, ckpt.config, i, qcfg.layout).linear_shapes(shapes).values():
        groups = 1 if qcfg.group_size == -1 else -(-cols // qcfg.group_size)
        total += rows * cols * qcfg.bits // 8 + groups * rows * 2 + groups * rows * qcfg.bits // 8 + cols * 4
    return total


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
