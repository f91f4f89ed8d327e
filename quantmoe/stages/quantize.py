"""The pipeline, the same for every backend: check the inputs, calibrate, open the work folder,
quantize the decoder layers one at a time, export, finalize.

``run`` reads as those steps; each is a function below that takes data and returns data. What
differs between backends is a ``Method`` (method.py): gptq/rtn's is ``gptq_method.GptqMethod``
(which ``quantize``, the Python API's entry, runs), bitsandbytes' is in ``quantmoe.backends.bnb``.

Files handed between stages live in a work folder beside ``--out``
(``.<out>.quantmoe-work/``): ``calib.safetensors``, ``layers/layer-NNNNN.safetensors`` and
``.json`` per finished layer, and ``export/``, the staged output that is renamed to
``--out`` only once complete (finalize.py). The export is written beside the layers, each layer's
shards as soon as its file is (export.BackgroundExport). A stopped run resumes from its finished layers
(resume.py). Under torchrun the experts of each layer are spread over the processes, on one
node or several (distributed.py, docs/distributed.md); rank 0 writes, and a stopped run
resumes there too.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from shutil import disk_usage

import torch
from tqdm.auto import tqdm

from ..base.errors import QuantMoeError, note
from ..base.files import RunLock, check_replaceable, versions
from ..base.measure import (
    PeakRSS,
    frozen_collector,
    release_pinned_memory,
    stage,
    steady_host_memory,
)
from ..base.options import QuantConfig, RunOptions, run_options
from ..base.paths import (
    CALIB_DATA,
    DEFAULT_MODEL,
    EVAL_DATA,
    beyond_context,
    default_seqlen,
    published_name,
)
from ..base.version import __version__
from ..model.architectures import (
    Architecture,
    architecture_for,
    plan_layer,
    reused_keys_window,
)
from ..model.checkpoint import Checkpoint
from ..model.distributed import Ranks, control_group, finish
from .calibrate import (
    calibration_tokens,
    check_count,
    check_seed,
    read_documents,
    write_calibration,
)
from .export import (
    BackgroundExport,
    export_checkpoint,
    export_host_bytes,
    extra_layer_modules,
    parse_size,
)
from .finalize import finalize, staging_dir
from .gptq_method import GptqMethod
from .method import Calibration, Method, Run, Source
from .resume import (
    fingerprint,
    fingerprint_parts,
    layer_file,
    lock_work,
    open_work_together,
    read_layer_log,
    write_layer,
)


def quantize(model: str | Path | None = None, out: str | Path | None = None, qcfg: QuantConfig = QuantConfig(), *,
             ranks: Ranks | None = None, **options) -> dict:
    """Quantize ``model`` into ``out`` with gptq or rtn (``qcfg.backend``); returns the summary
    (report, paths, stage timings).

    ``options`` are the fields of ``RunOptions`` (calib, nsamples, seqlen, seed, device,
    max_shard_size, mtp, overwrite, record_paths, resume, run_eval, eval_data, batch_size, quiet, tf32,
    hessian_dtype, prefetch, block_kernel, gpu_memory, host_memory); any other keyword is a QuantMoeError naming it.

    Finished layers are kept in the work folder beside ``out``; re-running the same call
    after a crash or Ctrl-C continues from the first unfinished layer and writes the same
    bytes as an uninterrupted run (``resume=False`` starts from scratch). Every input is
    checked before the work folder is touched.

    ``tf32``: TF32 matrix products for Hessians, forward passes and the evaluation on CUDA (faster;
    changes results by rounding only, see benchmarks/README.md). ``hessian_dtype``: "bfloat16" rounds the
    inputs of the statistics' products to bf16 (summed in fp32; faster on CUDA; docs/method.md says what it
    changes), "float32" (the default) does not. ``prefetch``: read the next layer
    in a background thread. ``gpu_memory``: the device memory the run may use ("70GB"; default on CUDA:
    what the device has free now, less some headroom; on CPU: no limit); a layer's routed experts are
    worked on in groups that fit it (stages/experts.py), with the same bytes for any budget.
    ``host_memory``: the host memory the run may hold ("32GB"; default: what the machine has available
    now, less some headroom); the capture's pinned cache and the read-ahead of the next layer are sized
    to it (``gptq_method.host_plan``), with the same bytes for any budget.
    ``block_kernel``: how GPTQ's column loop runs, one of BLOCK_KERNELS (see
    gptq_method.block_function; every choice gives the same bits). ``ranks``: this process's
    place under torchrun (default: read from torchrun's environment variables; a single process
    without them). ``record_paths``: the published files (card, manifest, logs, eval report) name
    the model, data and output by their local paths, for private use; by default by Hub id or
    folder/file name (``published_name``).
    """
    return run(model, out, GptqMethod(qcfg), run_options(**options), ranks)


def run(model: str | Path | None, out: str | Path | None, method: Method, options: RunOptions = RunOptions(),
        ranks: Ranks | None = None) -> dict:
    """Quantize ``model`` with ``method`` into ``out``; returns the summary: out, report (None
    without eval), stages (timings), fallbacks, notes, rank."""
    ranks = ranks if ranks is not None else Ranks.from_env(os.environ)
    steady_host_memory()
    check_seed(options.seed)
    if options.batch_size:  # 0 or None: the default
        check_count("--batch-size", options.batch_size)
    torch.manual_seed(options.seed)
    stages: dict = {}
    source = check_inputs(model, out, method, options, ranks)
    calibration = calibrate(source, options, stages) if method.needs_calibration else None
    if options.run_eval:  # fail now, not after hours of work
        read_documents(options.eval_data if options.eval_data is not None else EVAL_DATA)
    layers = method.start(source, calibration, options, ranks)  # joins the torchrun processes' group
    control = control_group(ranks)  # right after the join, on every process
    work = open_work_folder(source, method, calibration, layers, options, ranks, control)
    export = start_export(source, method, work, options) if ranks.writes else None
    try:
        entries = quantize_layers(layers, work, ranks, options.quiet or not ranks.writes, stages, export)
    except BaseException:
        if export is not None:
            export.stop()
        raise
    report = None
    if not ranks.writes:
        finish(ranks, control)  # until rank 0 has written --out: see distributed.py
    else:
        try:
            report = export_and_finalize(source, method, calibration, layers, work, entries, options, stages,
                                         export)
        except BaseException:
            finish(ranks, control, ok=False)
            raise
        work.lock.release()
        finish(ranks, control)
    return {"out": str(source.out), "report": report, "stages": stages,
            "fallbacks": fallbacks(entries) if ranks.writes else [], "notes": list(source.notes), "rank": ranks.rank}


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


def check_inputs(model: str | Path | None, out: str | Path | None, method: Method, options: RunOptions,
                 ranks: Ranks) -> Source:
    """Stage 0: the model (its config, architecture and layer count), --out, the shard size and what the
    method cannot do with the checkpoint, checked cheapest first and before anything is written (the
    calibration and eval data come next, still before the work folder). An FP8 release's missing or
    misshapen scales fail here too, from the headers alone."""
    ckpt = Checkpoint(model if model is not None else DEFAULT_MODEL)
    arch = architecture_for(ckpt.config)  # "not a causal LM" / "unsupported" before any complaint about its files
    ckpt.check_layers()
    out = check_out(Path(out) if out is not None else method.default_out(ckpt.path), ckpt.path, options.overwrite)
    shard_bytes = parse_size(options.max_shard_size)
    ckpt.open_shards()
    notes = method.check(ckpt, arch, ranks)
    ckpt.quantized_linears  # noqa: B018 - reading it checks an FP8 release's scales
    if ranks.writes:
        check_room(ckpt, arch, out)
    return Source(ckpt, arch, out, shard_bytes, tuple(notes))


def check_room(ckpt: Checkpoint, arch: Architecture, out: Path) -> None:
    """Refuse, before any work, a run that cannot fit the disk of ``out``: every layer's quantized linears are
    written to the work folder beside it and again into the export, each time at least half a byte a weight (4
    bits, the fewest any backend stores), less what an earlier run's work folder already holds there."""
    weights = sum(rows * cols for i in range(ckpt.config.num_hidden_layers)
                  for rows, cols in plan_layer(arch, ckpt.config, i).linear_shapes(ckpt.layer_shapes(i)).values())
    work = work_dir(out)
    held = sum(os.lstat(os.path.join(root, f)).st_size for root, _, files in os.walk(work) for f in files)
    disk = next(p for p in (out, *out.parents) if p.exists())
    try:
        free = disk_usage(disk).free
    except OSError:  # a filesystem that does not say: the writes will
        return
    if weights - held > free:
        raise QuantMoeError(
            f"{disk} has {free / 1e9:.1f} GB free, but this run writes at least {(weights - held) / 1e9:.1f} GB there "
            f"(each quantized layer in the work folder beside --out, then the export); free space on that disk or "
            "choose an --out on a disk with room")


def calibrate(source: Source, options: RunOptions, stages: dict) -> Calibration:
    """Stage 1: the calibration tokens, from a token file or sampled from text (calibrate.py); their
    metadata names the source and tokenizer as published files do (by path with --record-paths)."""
    tokenizer = source.ckpt.tokenizer()
    with stage(stages, "calibrate"):
        ids, meta = calibration_tokens(tokenizer, options.calib if options.calib is not None else CALIB_DATA,
                                       options.nsamples, options.seqlen, options.seed,
                                       default_seqlen(source.ckpt.config))
    refused = reused_keys_window(source.arch, source.ckpt.config, ids.shape[1])
    if refused is not None:  # before the work folder exists
        raise QuantMoeError(refused)
    beyond = beyond_context(source.ckpt.config, ids.shape[1])
    if beyond is not None:
        note(beyond)
    return Calibration(ids, meta if options.record_paths else published_calibration(meta))


@dataclass(frozen=True)
class Work:
    """The work folder of a run (resume.py)."""

    folder: Path
    parts: dict[str, str]       # what the layers are computed from, one hash per input (resume.fingerprint_parts)
    fingerprint: str
    done: int                   # leading layers finished by an earlier run of the same inputs
    num_layers: int             # decoder layers in all
    lock: RunLock | None        # rank 0's lock on the folder, held until the export is in place


def open_work_folder(source: Source, method: Method, calibration: Calibration | None, layers: Run,
                     options: RunOptions, ranks: Ranks, control=None) -> Work:
    """The work folder beside --out, private and locked (rank 0), keeping the layers an earlier run of
    the same inputs finished (unless ``options.resume`` is False), with the calibration tokens written
    into it. Under torchrun every process starts from the same layer (``control``: the control group)."""
    parts = fingerprint_parts(source.ckpt, method.config.to_dict(), layers.fingerprint,
                              None if calibration is None else calibration.ids, options.seed, method.versions())
    folder = work_dir(source.out)
    n = source.ckpt.config.num_hidden_layers
    lock = lock_work(folder) if ranks.writes else None
    done = open_work_together(folder, parts, n, options.resume, ranks, control)
    if ranks.writes and calibration is not None:
        write_calibration(folder / "calib.safetensors", calibration.ids, calibration.meta)
    return Work(folder, parts, fingerprint(parts), done, n, lock)


def start_export(source: Source, method: Method, work: Work, options: RunOptions) -> BackgroundExport:
    """Stage 3, started before the layers: the export, on a thread of its own into the staging folder, taking
    each layer file once it is finished and the layers leave it room in the host budget (export.BackgroundExport),
    with its own reader of the checkpoint."""
    ckpt, arch = source.ckpt.reader(), source.arch
    extra = ckpt.extra_layers() if options.mtp == "keep" else []  # multi-token prediction, exported unquantized
    export = partial(export_checkpoint, ckpt, arch, [layer_file(work.folder, i) for i in range(work.num_layers)],
                     quantization_config=method.quantization_config(ckpt, arch, extra_layer_modules(ckpt, extra)),
                     max_shard_size=source.shard_bytes, layout=method.layout, config_files=method.config_files,
                     extra_layers=extra, in_place=method.in_place,
                     layer_export=partial(method.export_layer, ckpt, arch))
    return BackgroundExport(lambda folder, finished: export(folder, layers=finished), staging_dir(work.folder),
                            work.done, export_host_bytes(ckpt, source.shard_bytes))


def quantize_layers(layers: Run, work: Work, ranks: Ranks, quiet: bool, stages: dict,
                    export: BackgroundExport | None = None) -> list[dict]:
    """Stage 2: every layer's log entry, read back for the layers finished earlier and made now for
    the others, each of which is written to the work folder by a background thread (one layer in
    flight at a time bounds host memory) and then handed to the ``export`` beside the layers, whose
    failure stops the run at the next layer."""
    entries = [read_layer_log(work.folder, i, work.fingerprint) for i in range(work.done)]
    peak_gpu = None
    bar = tqdm(desc="quantize", unit="layer", disable=quiet, initial=work.done, total=work.num_layers)
    writer = ThreadPoolExecutor(1, thread_name_prefix="quantmoe-write")
    with stage(stages, "quantize"), PeakRSS() as rss, writer, bar, frozen_collector():
        written: Future | None = None
        for layer in layers.layers(work.folder, work.done, rss, None if export is None else export.layers):
            if ranks.writes:
                w0 = time.perf_counter()
                if written is not None:
                    written.result()
                timings = layer.entry["timings"]
                timings["write"] = round(timings.get("write", 0.0) + time.perf_counter() - w0, 3)
                written = writer.submit(_write_when_packed, layer.packed, export, work.folder, layer.index,
                                        layer.tensors, layer.entry, work.fingerprint)
            if export is not None:
                export.check()
            entries.append(layer.entry)
            if layer.peak_gpu_mb is not None:
                peak_gpu = max(peak_gpu or 0.0, layer.peak_gpu_mb)
            del layer  # its tensors are the writer's now
            bar.update()
        if written is not None:
            written.result()
    if export is not None:
        export.layers.hold(False)  # the layers are done: the rest of the host budget is the export's
    release_pinned_memory()  # the captures' page-locked blocks, cached for the next layer: there is none
    if peak_gpu is not None:  # the layers reset the peak, so the stage's own reading covers the last one only
        stages["quantize"]["peak_gpu_mb"] = round(max(peak_gpu, stages["quantize"]["peak_gpu_mb"] or 0), 1)
    return entries


def _write_when_packed(packed: torch.cuda.Event | None, export: BackgroundExport | None, work: Path, index: int,
                       *args) -> Path:
    """write_layer(work, index, *args) once the layer's packed tensors have reached the host
    (LayerResult.packed); then the ``export`` may take the file."""
    if packed is not None:
        packed.synchronize()
    file = write_layer(work, index, *args)
    if export is not None:
        export.layers.finished(index)
    return file


def fallbacks(entries: list[dict]) -> list[dict]:
    """The expert projections quantized with the rare-expert fallback, from the layers' log entries."""
    return [{"module": m["module"], "fallback": m["fallback"]} for e in entries for m in e["modules"]
            if m.get("fallback")]


def export_and_finalize(source: Source, method: Method, calibration: Calibration | None, layers: Run, work: Work,
                        entries: list[dict], options: RunOptions, stages: dict, export: BackgroundExport
                        ) -> dict | None:
    """Stages 3 to 5: the end of the ``export`` (its "export" stage: the time it takes after the layers, with
    its whole time beside them), the log, the optional eval, the model card and the manifest, renamed over
    --out (finalize.py); returns the eval report. Published files name the model and --out by Hub id or
    folder name (``published_name``), or by local path with ``record_paths``."""
    try:
        with stage(stages, "export"):
            hashed = export.result()
    except BaseException:
        export.stop()
        raise
    stages["export"].update(export.timings())
    ckpt, arch = source.ckpt, source.arch
    shown = str if options.record_paths else published_name
    calibrated = {} if calibration is None else {"nsamples": int(calibration.ids.shape[0]),
                                                 "seqlen": int(calibration.ids.shape[1]), "seed": options.seed}
    record = {**method.config.to_dict(), **calibrated, **layers.record, "max_shard_size": source.shard_bytes,
              "mtp": options.mtp}
    meta = None if calibration is None else calibration.meta
    found = fallbacks(entries)
    log = {"base_model": shown(ckpt.path), "backend": method.name, "options": record, "calibration": meta,
           "notes": list(source.notes), "fallbacks": found, "layers": entries}
    manifest = {"options": record, "versions": {**versions(), **method.versions()}, "base_model": shown(ckpt.path),
                "inputs": work.parts, "fingerprint": work.fingerprint, "calibration": meta}
    card_info = {
        "name": source.out.name, "base_model": shown(ckpt.path), "model_type": ckpt.model_label,
        "version": __version__, "backend": method.name, "config": method.config, "options": record,
        "fallback_count": len(found), "linears": sum(len(e["modules"]) for e in entries), "notes": list(source.notes),
        "moe": arch.experts is not None,
        "fused_on_disk": arch.experts is not None and arch.fused.on_disk,
        "experts_unread": arch.experts is not None and arch.fused.on_disk and not arch.fused.transformers_reads_per_expert,
        "calibration": None if calibration is None else
        f"{calibrated['nsamples']} x {calibrated['seqlen']} tokens from `{meta.get('source')}` (seed {options.seed})"}
    evaluation = None if not options.run_eval else {
        "baseline": ckpt.path, "data": options.eval_data, "device": options.device, "batch_size": layers.batch_size,
        "quiet": options.quiet, "record_paths": options.record_paths, "tf32": options.tf32}
    return finalize(work.folder, source.out, hashed, log, manifest, method.model_card, card_info, evaluation,
                    options.overwrite, stages, shown(source.out))
