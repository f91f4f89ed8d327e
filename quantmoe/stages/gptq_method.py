"""The gptq and rtn method of the pipeline: calibration activations streamed through the decoder
layers, each layer quantized by ``LayerQuantizer`` (layer.py) into GPTQ v1 tensors.

While a layer is quantized, a background thread reads the next layer's tensors from the shards
(the pipeline's writer thread writes the previous layer's file), so disk time hides behind
compute. Under torchrun the experts of each layer are spread over the processes (distributed.py).
A layer's routed experts are worked on in groups that fit the device memory budget
(``memory_budget``, stages/experts.py), with the same bytes for any budget. A resumed run first
replays its finished layers, from their files, to rebuild the activations entering the first
unfinished one (resume.replay_layer).
"""

from __future__ import annotations

import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import psutil
import torch

from ..base.errors import QuantMoeError, note
from ..base.measure import (
    PeakRSS,
    cached_pinned_bytes,
    release_freed_memory,
    release_pinned_memory,
)
from ..base.options import BLOCK_KERNELS, QuantConfig, RunOptions
from ..base.version import __version__
from ..formats import compressed_tensors, gptq_v1
from ..formats.gptq_v1 import quantization_config
from ..gptq.core import quantize_block
from ..gptq.cuda_graphs import GraphedBlocks
from ..gptq.triton_kernels import TritonBlocks
from ..gptq.triton_kernels import available as triton_available
from ..model.architectures import Architecture, plan_layer
from ..model.checkpoint import READ_WINDOW, Checkpoint
from ..model.distributed import Ranks, join
from ..model.stream import (
    Batch,
    LayerStream,
    default_batch_size,
    pick_device,
    tensor_core_passes,
)
from .export import QUANTIZE_CONFIG, FinishedLayers, compressed_config, parse_size
from .layer import CAPTURE_CACHE_BYTES, HOST_CAPTURE_BYTES, LayerQuantizer
from .method import Calibration, LayerOutput, Source, unquantized_prefixes
from .precision import Unit, check_recipe, kept_patterns, layer_units, recipe_patterns
from .report import model_card, ranges
from .resume import layer_file, replay_layer, run_stored


def default_out(model: Path, qcfg: QuantConfig) -> Path:
    g = "" if qcfg.group_size == -1 else f"-g{qcfg.group_size}"
    layout = "" if qcfg.layout == "source" else f"-{qcfg.layout}"
    fmt = "-ct" if qcfg.format == "compressed-tensors" else ""
    return Path("quantmoe-out") / f"{model.name}-{qcfg.backend}-int{qcfg.bits}{g}{layout}{fmt}"


def check_shapes(ckpt: Checkpoint, arch: Architecture, qcfg: QuantConfig) -> list[str]:
    """Fail early when the group size or packing cannot fit a layer; return notes for narrow layers.

    A linear whose input is narrower than the group size (DeepSeek's low-rank q_b_proj and
    kv_b_proj in small models) is quantized as one group spanning its input; g_idx is all zeros.
    One note covers every layer and expert where that happens to the same linear.
    """
    narrow: dict[tuple[str, int, int], list[int]] = {}
    base = qcfg
    for i in range(ckpt.config.num_hidden_layers):
        prefix = ckpt.stored_layer_prefix(i)  # the checkpoint's own names, which recipes match
        plan = plan_layer(arch, ckpt.config, i, base.layout)
        kinds = plan.linear_kinds()
        for name, (rows, cols) in plan.linear_shapes(ckpt.layer_shapes(i)).items():
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
    return [f"{ckpt.stored_name('model.layers.')}{{{ranges(layers)}}}.{pattern}.weight: input size {cols} < group size {size}; "
            "one group spans the input" for (pattern, cols, size), layers in narrow.items()]


# The tensor-parallel sizes vLLM is commonly served at, beside 1.
VLLM_TENSOR_PARALLEL = (2, 4, 8)


def tensor_parallel_note(ckpt: Checkpoint, arch: Architecture, qcfg: QuantConfig) -> str | None:
    """Where vLLM would not serve the routed experts with its Marlin MoE kernels: at a tensor-parallel size that
    splits their intermediate size into shares the group size does not divide (``check_moe_marlin_supports_layer``
    in vLLM's quantization/auto_gptq.py), it falls back to its MoeWNA16 method, which reads no ``dynamic`` rule and
    refuses grouped 8-bit weights. None where every size of VLLM_TENSOR_PARALLEL serves them, and for
    compressed-tensors, whose fallback (its Triton WNA16 MoE method) keeps the export's ``ignore`` and settings."""
    if qcfg.format != "gptq":
        return None
    widths: dict[tuple[int, int], int] = {}  # (intermediate size, group size) -> bits
    for i in range(ckpt.config.num_hidden_layers):
        plan = plan_layer(arch, ckpt.config, i, qcfg.layout)
        if plan.experts is None:
            continue
        down = plan.experts.linear("down", 0)
        own = qcfg.module_config(ckpt.stored_layer_prefix(i) + down, "expert")
        shape = plan.linear_shapes(ckpt.layer_shapes(i)).get(down)
        if own is not None and own.group_size != -1 and shape is not None:
            widths[(shape[1], own.group_size)] = own.bits
    bad = sorted({tp for (width, group) in widths for tp in VLLM_TENSOR_PARALLEL
                  if width % tp or (width // tp) % group})
    if not bad:
        return None
    width, group = next((w, g) for (w, g) in widths if any(w % tp or (w // tp) % g for tp in bad))
    good = ", ".join(str(tp) for tp in (1, *VLLM_TENSOR_PARALLEL) if tp not in bad)
    eight = " and refuses grouped 8-bit weights" if 8 in widths.values() else ""
    return (f"vLLM serves the routed experts with its Marlin MoE kernels at --tensor-parallel-size {good}; at "
            f"{', '.join(map(str, bad))} a rank's share of their intermediate size {width} ({width / bad[0]:g} at "
            f"{bad[0]}) is not a multiple of the group size {group}, and vLLM falls back to its MoeWNA16 method, which "
            f"ignores this export's dynamic rules (the MTP layer's, a recipe's){eight}: serve there with "
            "--enable-expert-parallel (whole experts per rank), or quantize with a group size that divides the share")


def served(ckpt: Checkpoint, rename: Callable[[dict, Callable[[str], str], Callable[[str], str]], dict],
           config: dict) -> dict:
    """An export's quantization_config under the names loaders match it against: as built for a checkpoint read
    under its own names; a nested release's rewritten by its format's ``rename`` (served_names)."""
    if ckpt.nesting is None:
        return config
    return rename(config, ckpt.nesting.served_pattern, ckpt.stored_name)


def not_quantized_modules(arch: Architecture, config, layout: str) -> list[str]:
    """Exact paths (in the export's naming) of the decoder modules left in full precision:
    routers always, and dense MLPs in the gptqmodel layout."""
    out = []
    for i in range(config.num_hidden_layers):
        plan = plan_layer(arch, config, i, layout)
        kept = list(plan.routers)
        if arch.dense_mlp is not None and plan.dense_mlp is None and not arch.is_moe_layer(config, i):
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


@dataclass(frozen=True)
class GptqMethod:
    """gptq (Hessian-corrected rounding) or rtn (round-to-nearest), as ``config.backend`` says."""

    config: QuantConfig
    needs_calibration: bool = True  # rtn too: its layers run forward to give the next layer its inputs
    in_place: bool = False  # the export: a layer's quantized tensors after its other tensors, sorted

    def __post_init__(self):
        if not isinstance(self.config, QuantConfig):
            raise QuantMoeError(f"the gptq/rtn pipeline takes a QuantConfig, not {type(self.config).__name__}; for "
                                "another backend use quantmoe.backends.get(name).quantize(model, out, options, config)")

    @property
    def name(self) -> str:
        return self.config.backend

    @property
    def layout(self) -> str:
        return self.config.layout

    @property
    def config_files(self) -> tuple[str, ...]:
        # quantize_config.json: what AutoGPTQ-era loaders read; a compressed-tensors export has none.
        return () if self.config.format == "compressed-tensors" else (QUANTIZE_CONFIG,)

    def default_out(self, model: Path) -> Path:
        return default_out(model, self.config)

    def check(self, ckpt: Checkpoint, arch: Architecture, ranks: Ranks) -> list[str]:
        if self.layout == "gptqmodel" and not arch.gptqmodel:
            raise QuantMoeError(f"--layout gptqmodel is not available for {arch.model_type} (GPTQModel is not known "
                                "to load this family's experts as quantmoe writes them); use --layout source (see docs/interop.md)")
        check_recipe(arch, ckpt.config, self.config, ckpt.stored_name)
        note = tensor_parallel_note(ckpt, arch, self.config)
        return check_shapes(ckpt, arch, self.config) + ([note] if note else [])

    def start(self, source: Source, calibration: Calibration, options: RunOptions, ranks: Ranks) -> GptqRun:
        dev = join(ranks, pick_device(options.device))  # a no-op for a single process
        block_fn = block_function(options.block_kernel, dev)
        budget = memory_budget(options.gpu_memory, dev)
        host = host_budget(options.host_memory)
        stream = LayerStream(source.ckpt, dev)
        batch_size = options.batch_size or default_batch_size(stream.config, calibration.ids.shape[1])
        return GptqRun(self.config, stream, calibration.ids, batch_size, block_fn, ranks, options.tf32,
                       options.prefetch, budget, host, options.hessian_dtype)

    def units(self, ckpt: Checkpoint, arch: Architecture, index: int) -> list[Unit]:
        """Layer ``index``'s linears grouped by their settings under the recipe (precision.layer_units)."""
        return layer_units(plan_layer(arch, ckpt.config, index, self.layout), self.config, ckpt.stored_layer_prefix(index))

    def quantization_config(self, ckpt: Checkpoint, arch: Architecture, extra_layers: dict[int, list[str]]) -> dict:
        """GPTQ's (with the recipe's dynamic overrides and skips), or compressed-tensors' with ``format``."""
        qcfg, not_quantized = self.config, not_quantized_modules(arch, ckpt.config, self.layout)
        units = {i: self.units(ckpt, arch, i) for i in range(ckpt.config.num_hidden_layers)}
        patterns = recipe_patterns(units, qcfg) + [(f"^{re.escape(p)}", None) for p in unquantized_prefixes(ckpt, arch)
                                                   if ckpt.names(p)]
        if qcfg.format == "compressed-tensors":
            return served(ckpt, compressed_tensors.served_names,
                          compressed_config(qcfg, not_quantized, __version__, sorted(extra_layers), patterns))
        skipped = [ckpt.layer_prefix(i) + n for i, us in units.items() for u in us if u.qcfg is None for n in u.names]
        overrides = [(rx, None if c is None else {"bits": c.bits, "group_size": c.group_size, "sym": c.sym})
                     for rx, c in patterns]
        if self.layout == "source":  # kept linears a server might build quantized (gptqmodel's lists every one)
            overrides += [(rf"^model\.layers\.\d+\.{k}$", None) for k in kept_patterns(arch.kept_linears())]
        return served(ckpt, gptq_v1.served_names,
                      quantization_config(qcfg, not_quantized, __version__, extra_layers, overrides, skipped))

    def export_layer(self, ckpt: Checkpoint, arch: Architecture, index: int,
                     tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
        """The layer file's GPTQ tensors, repacked as compressed-tensors ones with ``format`` (the same levels
        and scales); the linears the recipe keeps in 16 bits."""
        prefix, units = ckpt.layer_prefix(index), self.units(ckpt, arch, index)
        if self.config.format == "compressed-tensors":
            sym = {prefix + n: u.qcfg.sym for u in units if u.qcfg for n in u.names}
            tensors = compressed_tensors.from_gptq_state(tensors, sym.__getitem__)
        return tensors, frozenset(n for u in units if u.qcfg is None for n in u.names)

    def versions(self) -> dict[str, str]:
        return {}

    def model_card(self, report: dict | None, info: dict) -> str:
        return model_card(report, info)


@dataclass(frozen=True)
class GptqRun:
    """The calibration tokens, streamed through the model layer by layer."""

    qcfg: QuantConfig
    stream: LayerStream
    ids: torch.Tensor               # (nsamples, seqlen) calibration tokens
    batch_size: int
    block_fn: Callable              # GPTQ's column loop (block_function)
    ranks: Ranks
    tf32: bool
    prefetch: bool
    budget: int | None              # device memory the layer may use (memory_budget); None: no limit
    host: int                       # host memory the run may hold (host_budget)
    hessian_dtype: str = "float32"  # the inputs of the statistics' products (gptq.core.bf16_statistics)

    @property
    def device(self) -> torch.device:
        return self.stream.device

    @property
    def fingerprint(self) -> dict:
        # The device type and the batch size (and TF32) change the floating-point summation order, hence the bytes;
        # bf16 statistics round them (named only then: a float32 run's fingerprint is as it always was).
        return {"device": self.device.type, "batch_size": self.batch_size, "tf32": self.tf32, **self._statistics}

    @property
    def _statistics(self) -> dict:
        return {} if self.hessian_dtype == "float32" else {"hessian_dtype": self.hessian_dtype}

    @property
    def record(self) -> dict:
        return {"device": str(self.device), "tf32": self.tf32, "processes": self.ranks.world,
                "batch_size": self.batch_size, **self._statistics}

    def layers(self, work: Path, done: int, rss: PeakRSS, export: FinishedLayers | None = None
               ) -> Iterator[LayerOutput]:
        stream, qcfg, dev, n = self.stream, self.qcfg, self.device, self.stream.num_layers
        if done == n:
            return
        batches = stream.embed(self.ids, self.batch_size, self.ranks)  # this process's share of the batches
        stream.release_embeddings()  # not needed again: their device memory goes to the layers' work
        # --fit stream: the full-precision model's activations, beside the quantized model's (their own
        # tensors: each layer's outputs overwrite its inputs).
        originals = [Batch(b.hidden.clone(), b.kwargs) for b in batches] if qcfg.effective_fit == "stream" else None
        def share(i: int) -> range | None:
            """The routed experts of layer i this process reads and holds (None: all)."""
            return stream.expert_share(i, self.ranks)

        replay_start = time.perf_counter()
        for i in range(done):  # finished by an earlier, stopped run: replay them to rebuild the activations
            with tensor_core_passes(self.tf32 and dev.type == "cuda"):  # as the run's own passes were made
                batches = replay_layer(stream, i, layer_file(work, i), None, batches, self.ranks,  # bits: each linear's
                                       self.budget)
                if originals is not None:  # the original layer, its routed experts as stored (FP8's as FP8)
                    originals = run_stored(stream, i, stream.layer_state(i, keep_dtype=True, experts=share(i)),
                                           originals, self.ranks, gpu_memory=self.budget)
        setup_peak = _gpu_peak(dev, reset=True)
        # the first layer this run quantizes records the replay of those before it (a resumed run's)
        replay = {"replay": {"layers": done, "seconds": round(time.perf_counter() - replay_start, 3),
                             "peak_gpu_mb": setup_peak}} if done else {}

        # The MLP inputs' capture, kept in pinned host memory (LayerQuantizer._captured_pairs) on CUDA when
        # larger than the device may keep; never under several processes, which capture them again instead.
        captured = self.ids.numel() * stream.config.hidden_size * 4 * (2 if qcfg.fit in ("stream", "layer") else 1)
        captured = captured if dev.type == "cuda" and captured > CAPTURE_CACHE_BYTES and stream.arch.mlp_tail is None \
            and self.ranks.world == 1 else 0

        with ThreadPoolExecutor(1, thread_name_prefix="quantmoe-read") as reader:
            def read_ahead(i: int) -> Future | None:
                return reader.submit(stream.read_ahead_state, i, share(i)) if self.prefetch and i < n else None

            next_state = read_ahead(done)
            end = time.perf_counter()  # of the previous layer (its entry made), or of the setup
            for i in range(done, n):
                t0 = time.perf_counter()
                # between the previous layer's end and this one's start (the previous layer handed to its writer,
                # its memory freed): counted by no layer's seconds
                before = t0 - end
                _gpu_peak(dev, reset=True)
                state = next_state.result() if next_state is not None else \
                    stream.layer_state(i, keep_dtype=True, experts=share(i))
                waited = time.perf_counter() - t0
                pinned = pinned_bytes(state)
                quantizer = LayerQuantizer(stream, i, batches, qcfg, state, self.ranks, self.tf32, self.block_fn,
                                           batches if qcfg.effective_fit == "layer" else originals, self.budget,
                                           self.hessian_dtype)
                del state  # on the device now
                # What is resident, less the page-locked blocks PyTorch keeps cached for reuse (this layer's
                # pinned read, the packed results' copies), which the next read or packing takes again instead
                # of new memory: as torch counts them, or (a torch that does not) this layer's read at least.
                reusable = max(cached_pinned_bytes(), pinned)
                plan = host_plan(self.host, psutil.Process().memory_info().rss - reusable,
                                 packed_bytes(stream.ckpt, stream.arch, qcfg, i), captured,
                                 stream.layer_bytes(i + 1, share(i + 1)) if self.prefetch and i + 1 < n else None,
                                 None if export is None else export.host_bytes)
                quantizer.host_capture = plan.capture
                if export is not None:
                    export.hold(not plan.export)
                next_state = read_ahead(i + 1) if plan.read_ahead else None
                if next_state is None and pinned and i + 1 < n:  # the next layer is read after this one, into
                    release_pinned_memory()  # ordinary memory: this one's cached pinned blocks would only be held
                    # beside it (after the last layer, the stage lets them go once the layers are written)
                result = quantizer.run()
                del quantizer
                batches, originals = result.outputs, result.original_outputs
                layer_peak = _gpu_peak(dev)
                if layer_peak is not None:
                    layer_peak = max(layer_peak, *result.peak_gpu_mb.values())
                timings = {**result.timings, "load": round(waited + result.timings.get("load", 0.0), 3)}
                end = time.perf_counter()
                entry = {"index": i, "seconds": round(end - t0, 3), "before_seconds": round(before, 3),
                         "timings": timings, "peak_gpu_mb": layer_peak, "stage_peak_gpu_mb": result.peak_gpu_mb,
                         "peak_rss_mb": rss.take(), "expert_tokens": result.expert_tokens,
                         "expert_groups": result.expert_groups, "expert_bytes_held": result.expert_bytes_held,
                         "expert_bytes_loaded": result.expert_bytes_loaded,
                         "activation_bytes_held": result.activation_bytes_held,
                         **(replay if i == done else {}), "modules": result.log}
                peak = layer_peak if i > done or setup_peak is None else max(layer_peak, setup_peak)
                yield LayerOutput(i, result.tensors, entry, result.packed, peak)
                del result
                release_freed_memory()


# What a default budget leaves free on the device: the caching allocator's fragmentation and the
# temporaries of a forward pass, which the experts' group sizing does not count.
BUDGET_HEADROOM = 4 << 30


def memory_budget(gpu_memory: str | int | None, dev: torch.device) -> int | None:
    """The bytes of device memory the run may use: ``gpu_memory`` ("40GB"), or on CUDA by default (and, with a
    note, in place of a ``gpu_memory`` beyond it) what the device has free (plus what this process already
    holds) less BUDGET_HEADROOM; None on CPU without one (no grouping)."""
    asked = None
    if gpu_memory is not None:
        try:
            asked = parse_size(gpu_memory)
        except QuantMoeError:
            raise QuantMoeError(f"--gpu-memory {gpu_memory!r} is not a size; write it like 70GB or 40GB") from None
    if dev.type != "cuda":
        return asked
    free, _ = torch.cuda.mem_get_info(dev)
    room = free + torch.cuda.memory_reserved(dev)
    return _within(asked, room, BUDGET_HEADROOM, f"--gpu-memory {gpu_memory}", f"{dev} has free")


def _within(asked: int | None, room: int, headroom: int, option: str, where: str) -> int:
    """A memory budget: ``asked``, unless more than the ``room`` there is (the budget would size the work for
    memory that is not there, to run out of it partway), then, as by default, ``room`` less ``headroom``."""
    if asked is not None and asked <= room:
        return asked
    if asked is not None:
        note(f"{option} is more than {where} ({room / 1e9:.1f} GB); the run keeps to {(room - headroom) / 1e9:.1f} GB")
    return room - headroom


# What a default host budget leaves to the rest of the machine.
HOST_HEADROOM = 4 << 30


def host_budget(host_memory: str | int | None) -> int:
    """The bytes of host memory the run may hold: ``host_memory`` ("32GB"), or by default (and, with a note, in
    place of a ``host_memory`` beyond it) what the machine has available now plus what this process holds
    already, less HOST_HEADROOM."""
    asked = None
    if host_memory is not None:
        try:
            asked = parse_size(host_memory)
        except QuantMoeError:
            raise QuantMoeError(f"--host-memory {host_memory!r} is not a size; write it like 32GB or 64GB") from None
    room = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    return _within(asked, room, HOST_HEADROOM, f"--host-memory {host_memory}", "this machine has available")


@dataclass(frozen=True)
class HostPlan:
    capture: int       # bytes the layer's capture may pin in host memory (LayerQuantizer.host_capture)
    read_ahead: bool   # whether the next layer is read while this one is worked on
    export: bool       # whether the export beside the layers may take layer files while this one is worked on


def host_plan(budget: int, resident: int, packed: int, capture: int, next_layer: int | None,
              export: int | None = None) -> HostPlan:
    """How a layer uses the host ``budget`` (bytes) beside what is ``resident`` once it is loaded: first its
    ``packed`` results (host copies until its layer file is written), then its MLP inputs' pinned
    ``capture`` (it saves a forward pass through attention for every group of experts), then the read of
    the ``next_layer``'s stored bytes (None: none to read) while it is worked on, with the shards' pages
    (READ_WINDOW), which saves only the read's time; read after the layer instead, the next layer finds
    this one's capture freed. Then the ``export`` beside the layers (the most it holds: FinishedLayers.host_bytes;
    None: there is none), which saves its time after the layers; held back, it waits for room or the last layer."""
    room = budget - resident - packed
    limit = max(0, min(HOST_CAPTURE_BYTES, room))
    pinned = capture if capture <= limit else 0  # a capture that does not fit is not kept at all
    read_ahead = next_layer is not None and pinned + next_layer + READ_WINDOW <= room
    left = room - pinned - (next_layer + READ_WINDOW if read_ahead else 0)
    return HostPlan(limit, read_ahead, export is not None and export <= left)


def pinned_bytes(state: dict) -> int:
    """Bytes of a layer's ``state`` read into page-locked memory (LayerStream.read_ahead_state): once the layer is
    on the device, PyTorch keeps those blocks cached, and the next pinned read of the same sizes reuses them."""
    return sum(t.nbytes for t in state.values() if t.is_pinned())


def packed_bytes(ckpt: Checkpoint, arch: Architecture, qcfg: QuantConfig, i: int) -> int:
    """Bytes of layer i's packed GPTQ tensors (qweight, scales, qzeros, g_idx), from the shapes in the headers."""
    total = 0
    for rows, cols in plan_layer(arch, ckpt.config, i, qcfg.layout).linear_shapes(ckpt.layer_shapes(i)).values():
        groups = 1 if qcfg.group_size == -1 else -(-cols // qcfg.group_size)
        total += rows * cols * qcfg.bits // 8 + groups * rows * 2 + groups * rows * qcfg.bits // 8 + cols * 4
    return total


def _gpu_peak(dev: torch.device, reset: bool = False) -> float | None:
    """Peak GPU memory allocated (MB) since the last reset; None on CPU."""
    if dev.type != "cuda":
        return None
    peak = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    if reset:
        torch.cuda.reset_peak_memory_stats(dev)
    return peak
