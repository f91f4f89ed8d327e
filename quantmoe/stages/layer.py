"""Quantize one decoder layer: attention first, then the MoE block, then shared/dense MLPs.

Order inside a layer (true-sequential): q/k/v share one Hessian; o_proj sees the
quantized q/k/v; every expert's gate and up share one Hessian built from exactly the
tokens the original router sends it; its down_proj's Hessian comes from the quantized
gate/up outputs of those tokens. Experts of a layer are solved together in one batch.

Activations are streamed batch by batch from the capture hook, never concatenated: the
input of the MoE block is captured once for the gate/up Hessians and again, once gate/up
are quantized, for the down Hessians. The second partial forward pass costs less than
keeping a (tokens, hidden) fp32 copy on the device (4.3 GB for 128 x 2048 tokens of
Mixtral). With several processes each holds, solves and runs only its share of the experts, and
holds the activations of its share of the batches: every pass over the tokens is then a collective
that all processes make alike (distributed.py). Time per stage is recorded in ``LayerResult.timings``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..base.measure import Stopwatch
from ..base.options import QuantConfig
from ..formats.gptq_v1 import pack_result
from ..gptq.core import (
    CHUNK_BYTES,
    ClipSearch,
    Operand,
    QuantResult,
    QuantSpec,
    accumulate_hessian,
    accumulate_moment,
    bf16_statistics,
    dequantize_grouped,
    finish_moment,
    fp32_operands,
    gptq_quantize,
    matrix_chunks,
    moment_add,
    moment_sum,
    operands,
    quantize_block,
    rtn_quantize,
    stat_mm,
    weight_count,
    weighted,
    weighted_rows,
)
from ..gptq.triton_kernels import dequantize_levels, search_grids, silu_mul
from ..model.architectures import MLP, LayerPlan, plan_layer
from ..model.distributed import SINGLE, Ranks, experts_to_writer, max_ints
from ..model.stream import Batch, LayerStream, tensor_core_passes
from .experts import (
    ExpertCosts,
    Levels,
    RoutedRows,
    Routes,
    StoredExperts,
    expert_groups,
    is_silu,
    layer_by_batch,
    routes,
    tail_by_expert,
)
from .precision import layer_units

TOKEN_CHUNK = 32768  # tokens per matmul when building Hessians, to bound temporary memory
# The routed experts' statistics run over an expert's rows in chunks whose temporaries take at most this
# (the budget counts it as part of one pass: ExpertCosts.passing).
STATS_CHUNK_BYTES = 1 << 30
# Inputs of the MLP stage of a row without an ``mlp_tail`` (GraniteMoE) are captured once and reused by the
# passes after (routing, the groups of experts' Hessians, the shared expert) when they take at most this
# much device memory; on CUDA, larger ones are kept in page-locked host memory up to HOST_CAPTURE_BYTES
# (copying them back is cheaper than a partial forward pass through attention); above that, each pass
# captures them again. A row with an mlp_tail keeps none: once its batches hold the residual after
# attention, each pass makes the MLP's input again with the norm alone (LayerStream.mlp_inputs), the same
# bits for less than a copy, and a group's gather pass only for the rows it gathers (_norm_scales).
CAPTURE_CACHE_BYTES = 1 << 30
HOST_CAPTURE_BYTES = 16 << 30
# A row with an mlp_tail keeps the input of its last attention group (the output projection's: attention's
# output before it) from the pass that builds that group's Hessian, when it takes at most this much memory on
# the host (CPU) or fits in the device budget beside ATTENTION_PASS_BYTES of a pass's temporaries (CUDA): the
# pass that turns the batches into the residual after attention (LayerStream.to_residual) then runs only the
# projection on it instead of attention once more (the same bits). Under several processes, never.
ATTENTION_OUTPUT_BYTES = 1 << 30
ATTENTION_PASS_BYTES = 4 << 30
# A rare expert's down_proj Hessian is blended with the mean over all tokens of its gate/up outputs' outer
# products. Each rare expert needs its own pass over the tokens for that, so the mean is estimated from the
# first batches holding at least this many times the rare-expert threshold in tokens (every batch when
# there are fewer): a full-rank estimate, set by the shapes alone.
BLEND_SAMPLE = 4


@dataclass
class LayerResult:
    tensors: dict[str, Tensor]                        # packed GPTQ tensors under full on-disk names (rank 0 only)
    log: list[dict] = field(default_factory=list)     # one entry per quantized module
    expert_tokens: list[int] = field(default_factory=list)
    expert_groups: int | None = None                     # groups the routed experts were solved in (budget)
    outputs: list[Batch] = field(default_factory=list)  # the next layer's inputs
    original_outputs: list[Batch] | None = None          # the same in the full-precision model (--fit stream)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: load, capture, hessians, solve, forward, write
    peak_gpu_mb: dict[str, float] = field(default_factory=dict)  # per stage, on CUDA
    packed: torch.cuda.Event | None = None  # on CUDA: reached once ``tensors`` are copied to the host
    expert_bytes_held: int | None = None  # bytes of routed experts' originals and levels this process held
    expert_bytes_loaded: int | None = None  # bytes of routed experts this process read for the layer's load
    activation_bytes_held: int = 0  # bytes of the hidden states entering the layer (both streams) this process held


def spec_of(qcfg: QuantConfig) -> QuantSpec:
    return QuantSpec(bits=qcfg.bits, group_size=qcfg.group_size, sym=qcfg.sym)


def search_of(qcfg: QuantConfig) -> ClipSearch:
    """The clipping search of ``qcfg``: one Triton kernel on CUDA where Triton is installed (``search_grids``
    itself says where it applies), else PyTorch's chain of kernels per ratio."""
    return ClipSearch(qcfg.clip_steps, qcfg.clip_min, qcfg.clip_max, qcfg.clip_weight, search_grids)


def solve(W: Tensor, H: Tensor | None, qcfg: QuantConfig, overwrite_H: bool = False,
          block_fn=quantize_block, target: Tensor | None = None, cross: Tensor | None = None,
          dequantized: bool = True, overwrite_W: bool = False, tf32: bool = False) -> QuantResult:
    """W (B, R, C) with Hessians H (B, C, C) (and the output moment ``target`` or the input
    moment ``cross``, see gptq.gptq_quantize); RTN when the backend is rtn or there is no Hessian.
    ``dequantized`` False: the result's W may be None (the caller rebuilds it from the levels).
    ``overwrite_W``/``overwrite_H``: W/H are handed over and become GPTQ's working storage. ``tf32``: see
    gptq.gptq_quantize."""
    if not qcfg.uses_hessians:  # the rtn baseline keeps plain min/max grids
        return rtn_quantize(W, spec_of(qcfg))
    if H is None:
        return rtn_quantize(W, spec_of(qcfg), search_of(qcfg))
    return gptq_quantize(W, H, spec_of(qcfg), qcfg.damp, qcfg.act_order, qcfg.block_size, overwrite_H, block_fn,
                         search_of(qcfg), target, qcfg.refine, cross, dequantized, overwrite_W, tf32)


def gated(x: Tensor, Wg: Tensor | Operand, Wu: Tensor | Operand, act, weights: Tensor | None = None) -> Tensor:
    """act(x Wg) * (x Wu) for a gated MLP's gate and up weights transposed, Wg and Wu (C, I), or their ``operands``
    (made once for many calls): what it feeds its down_proj, for its statistics (``stat_mm``); each row times its
    ``weights`` (T,) if given, as ``weighted`` multiplies them. SiLU's in one kernel where it applies
    (triton_kernels.silu_mul), with the same bits."""
    xo, = operands(x)
    g, u = stat_mm(xo, Wg), stat_mm(xo, Wu)
    h = silu_mul(g, u, weights) if is_silu(act) else None
    if h is None:
        h = act(g) * u
        h = h if weights is None else h * weights.float().reshape(-1, 1)
    return h


def fold_down(H: Tensor, P: Tensor | None, n: float, X: Tensor, weights: Tensor | None, Wg: Tensor, Wu: Tensor,
              act, original: tuple[Tensor, Tensor, Tensor] | None = None, X0: Tensor | None = None) -> float:
    """Fold the tokens X (T, C) entering a gated MLP into its down_proj's Hessian H (I, I), from the
    gate/up weights Wg, Wu it will run with (quantized), and, given the ``original`` (gate, up,
    down) weights, into P (C', I), the moment of the original MLP's outputs with those inputs
    (gptq.gptq_quantize's ``target``); the original MLP sees X0 (the same tokens in the
    full-precision model, default X). ``weights`` (T,) as in accumulate_hessian. Returns n."""
    X0 = X if X0 is None else X0
    Wg, Wu = operands(Wg.t(), Wu.t())
    if original is not None:
        original = operands(*(W.t() for W in original))
    for start in range(0, X.shape[0], TOKEN_CHUNK):
        x = X[start:start + TOKEN_CHUNK]
        w = None if weights is None else weights[start:start + TOKEN_CHUNK]
        h = gated(x, Wg, Wu, act)
        if original is not None:
            g0, u0, d0 = original
            accumulate_moment(P, stat_mm(gated(X0[start:start + TOKEN_CHUNK], g0, u0, act), d0), h, n, w)
        _, n = accumulate_hessian(H, h, n, w)
    return n


def _log(name: str, kind: str, res: QuantResult, b: int, shape, tokens: int, seconds: float,
         fallback: str | None = None) -> dict:
    """A linear's log entry; its ``loss`` and ``damp`` are 0-d device tensors until ``_read_logs``."""
    return {
        "module": name, "kind": kind, "shape": list(shape[-2:]), "groups": int(res.scales.shape[-1]),
        "tokens": int(tokens),
        "loss": res.loss[b].sum(), "damp": res.damp[b], "fallback": fallback,
        "seconds": round(seconds, 4),
    }


def _read_logs(entries: list[dict]) -> None:
    """The log entries' ``loss`` and ``damp`` as numbers, read from the device in one copy (a read per linear
    waits for the device each time: hundreds of times per layer with many experts)."""
    pending = [e for e in entries if isinstance(e["loss"], Tensor)]
    if not pending:
        return
    values = torch.stack([torch.stack([e["loss"].double(), e["damp"].double()]) for e in pending]).tolist()
    for e, (loss, damp) in zip(pending, values):
        e["loss"], e["damp"] = loss, damp


class LayerQuantizer:
    """Holds one materialised layer and writes quantized weights back into it as it goes."""

    def __init__(self, stream: LayerStream, index: int, batches: list[Batch], qcfg: QuantConfig,
                 state: dict[str, Tensor] | None = None, ranks: Ranks = SINGLE, tf32: bool = False,
                 block_fn=quantize_block, original_batches: list[Batch] | None = None, gpu_memory: int | None = None,
                 hessian_dtype: str = "float32"):
        """``state``: the layer's tensors if already read (by a prefetching thread), else read here.
        ``gpu_memory``: bytes of device memory the routed experts' work may bring the process to (their
        groups are sized to it, ``experts``); None: every expert of the layer at once.
        ``block_fn``: how GPTQ runs a block of columns (gptq_graphs.GraphedBlocks on CUDA).
        ``original_batches``: this layer's inputs in the full-precision model (``--fit stream``; for
        ``--fit layer``, ``batches`` themselves)."""
        self.stream, self.index, self.batches, self.qcfg = stream, index, batches, qcfg
        self.ranks, self.tf32, self.block_fn = ranks, tf32 and stream.device.type == "cuda", block_fn
        self.bf16_statistics = hessian_dtype == "bfloat16"
        self.gpu_memory = gpu_memory
        self.host_capture = HOST_CAPTURE_BYTES  # what the capture may pin in host memory (quantize: the host budget's)
        self.clock = Stopwatch(stream.device)
        self.arch = stream.arch
        self.plan: LayerPlan = plan_layer(self.arch, stream.config, index, qcfg.layout)
        # Each linear's settings under --recipe, one per unit (precision.py). The routed experts' code
        # reads self.qcfg, so it holds theirs; the other linears look theirs up (``_settings``).
        # Recipe rules match the checkpoint's own names.
        self.units = {n: u for u in layer_units(self.plan, qcfg, stream.ckpt.stored_layer_prefix(index)) for n in u.names}
        experts = self.units.get(self.plan.experts.linear("gate", 0)) if self.plan.experts is not None else None
        if experts is not None and experts.qcfg is not None:
            self.qcfg = experts.qcfg
        with self.clock("load"):
            # Under several processes only this process's share of the routed experts is read and loaded.
            share = stream.expert_share(index, ranks)
            if state is None:
                state = stream.layer_state(index, keep_dtype=True, experts=share)
            loaded = self._expert_bytes(state)
            # Routed experts stay as they are stored (StoredExperts: an FP8 release's as FP8); the rest is fp32.
            self.layer: nn.Module = stream.load_layer(index, state, experts_dtype=stream.experts_dtype(index, state),
                                                      keep_fp8=True, experts=share)
            self.experts_module: nn.Module | None = None  # the fused module StoredExperts stands in for
            if self.plan.experts is not None:
                self.experts_module = self.layer.get_submodule(self.plan.fused.module)
                gate_up, down = (getattr(self.experts_module, attr) for attr in (self.plan.fused.gate_up,
                                                                                 self.plan.fused.down))
                self.layer.set_submodule(self.plan.fused.module, StoredExperts(
                    gate_up.data if isinstance(gate_up, nn.Parameter) else gate_up,
                    down.data if isinstance(down, nn.Parameter) else down, self.experts_module.act_fn, ranks,
                    None if share is None else self.plan.num_experts, stream.experts_per_token))
                del gate_up, down
                if ranks.world > 1:  # StoredExperts holds this process's share: the fused module lets go of it
                    for attr in (self.plan.fused.gate_up, self.plan.fused.down):
                        _empty(self.experts_module, attr)
            # --fit stream/layer: the layer as it was, run on the full-precision stream beside the one quantized.
            self.original: nn.Module | None = None
            if original_batches is not None:
                self.original = self._original_copy()
        del state
        if original_batches is batches:  # --fit layer: each stream turns its own inputs into residuals
            original_batches = [Batch(b.hidden.clone(), b.kwargs) for b in batches]
        self.original_batches = original_batches
        # Whether each stream's batches hold the residual after attention (stream.to_residual), and the
        # captures that make them do so: the MLP's input, and for the full-precision stream the last
        # attention group's input (None: the row has no mlp_tail).
        self.residual = self.original_residual = False
        tail = self.arch.mlp_tail
        self._mlp_path = None if tail is None else tail[1]
        self._last_attention_path = None if tail is None or not self.plan.attention else \
            self.arch.to_memory(self.plan.attention[-1][0])
        self.prefix = f"model.layers.{index}."
        self.result = LayerResult(tensors={}, expert_bytes_loaded=loaded)
        self._kept: dict[str, list[tuple[Tensor, Tensor]]] = {}  # see _captured_pairs
        self._scales: list[tuple[Tensor, Tensor | None]] | None = None  # see _norm_scales
        self._scales_made = False
        self._attention_output: tuple[str, list[Tensor]] | None = None  # see ATTENTION_OUTPUT_BYTES

    def _expert_bytes(self, state: dict[str, Tensor]) -> int | None:
        """Bytes of the routed experts' tensors the layer's ``state`` holds, as read into host memory (the load
        puts as many on the device: a share's, with several processes); None for a layer without any."""
        if self.plan.experts is None:
            return None
        fused = self.plan.fused_disk_tensors()
        return sum(t.nbytes for n, t in state.items() if n in fused or self.arch.expert_of(n) is not None)

    def _original_copy(self) -> nn.Module:
        """The layer before quantization, for the full-precision stream: a copy of every module but the
        routed experts, whose original weights StoredExperts keeps anyway (in the checkpoint's dtype);
        ``_restore_original`` puts it all back into the layer for the full-precision stream's outputs."""
        if self.plan.experts is None:
            return copy.deepcopy(self.layer)
        store = self.layer.get_submodule(self.plan.fused.module)
        self.layer.set_submodule(self.plan.fused.module, nn.Identity())
        try:
            return copy.deepcopy(self.layer)
        finally:
            self.layer.set_submodule(self.plan.fused.module, store)

    def _restore_original(self) -> None:
        """The layer's weights back to those of ``_original_copy`` (once its quantized outputs are made)."""
        for name, p in self.original.named_parameters():
            if p.numel():
                self.layer.get_parameter(name).data.copy_(p.data)
        if self.plan.experts is not None:
            self.layer.get_submodule(self.plan.fused.module).use_quantized = False

    # -- bookkeeping ----------------------------------------------------------------
    @contextmanager
    def _stage(self, name: str):
        """Time a stage; under --tf32 forward passes and Hessians run as ``tensor_core_passes`` (TF32 products,
        fp16 attention; the solve as ``solve``'s ``tf32`` says: gptq.gptq_quantize); the Hessians' products
        take bf16 inputs under --hessian-dtype bfloat16 (gptq.core.bf16_statistics)."""
        with self.clock(name), tensor_core_passes(self.tf32 and name in ("capture", "hessians", "forward")), \
                bf16_statistics(self.bf16_statistics and name == "hessians"):
            yield

    def _inputs(self, module_path: str, original: bool = False) -> Iterator[Tensor]:
        """The input of ``<module_path>`` for every batch of the quantized (or the ``original``) stream.
        The MLP of a layer with an ``mlp_tail`` is fed from the residual after attention: the first
        such pass turns the batches into it; the full-precision stream's attention never changes, so
        its last attention capture does that already."""
        layer, batches = (self.original, self.original_batches) if original else (self.layer, self.batches)
        if module_path == self._mlp_path:
            if self.original_residual if original else self.residual:
                return self.stream.mlp_inputs(layer, batches, self.ranks)
            if not original and self._attention_output is not None:
                (path, outputs), self._attention_output = self._attention_output, None
                return self.stream.to_residual(layer, batches, self.ranks, outputs, path, self.plan.attention_outputs)
            return self.stream.to_residual(layer, batches, self.ranks)
        if original and module_path == self._last_attention_path:
            return self.stream.capture_to_residual(layer, batches, module_path, self.ranks)
        return self.stream.capture(layer, batches, module_path, self.ranks)

    def _captured(self, module_path: str) -> Iterator[Tensor]:
        """The input of ``layer.<module_path>``, batch by batch, (tokens, features); its forward passes timed as capture."""
        batches = self._inputs(module_path)
        while True:
            with self._stage("capture"):
                x = next(batches, None)
            if x is None:
                return
            yield x

    def _captured_pairs(self, module_path: str, keep: bool = False, originals: bool = True
                        ) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, x0) batch by batch: the input of ``layer.<module_path>`` in the model being quantized,
        and, under --fit stream, the same tokens' input in the full-precision model (else x0 is x).

        ``keep``: the input will not change before the next call for this path (the MLP stage:
        attention is done), so it is kept for that call if it fits in CAPTURE_CACHE_BYTES,
        which saves a partial forward pass (through attention) per reuse. ``originals`` False: the caller
        reads only x (a kept x0 is not brought to the device; x0 is x). The MLP's input of a row with an
        mlp_tail is never kept (see CAPTURE_CACHE_BYTES), and with ``originals`` False the full-precision stream's
        is not made once that stream holds the residual after attention."""
        keep = keep and module_path != self._mlp_path
        if module_path in self._kept:
            for x, x0 in self._kept[module_path]:
                with self._stage("capture"):
                    x_dev = x.to(self.stream.device, non_blocking=True)
                    x0_dev = x_dev if x0 is x or not originals else x0.to(self.stream.device, non_blocking=True)
                yield x_dev, x0_dev  # the caller's work is timed as its own stage, not as capture
            return
        # Under several processes a kept capture would hold every batch's input, which each process gets from
        # the others (the activations are spread by batch): each pass captures them again instead.
        kept, size, on_host = ([] if keep and self.ranks.world == 1 else None), 0, False
        unread = not originals and module_path == self._mlp_path and self.original_residual
        x0s = None if self.original is None or unread else self._inputs(module_path, original=True)
        for x in self._captured(module_path):
            x0 = x
            if x0s is not None:
                with self._stage("capture"):
                    x0 = next(x0s)
            if kept is not None:
                # Judged on the first batch: a cache that will not fit is not started (its growth is peak memory).
                size = max(size, x.numel() * x.element_size() * (1 if x0 is x else 2) * len(self.batches))
                on_host = size > CAPTURE_CACHE_BYTES and self.stream.device.type == "cuda"
                if size > (self.host_capture if on_host else CAPTURE_CACHE_BYTES):
                    kept = None
                elif on_host:
                    x_host = _pinned_copy(x)
                    kept.append((x_host, x_host if x0 is x else _pinned_copy(x0)))
                else:
                    kept.append((x, x0))
            yield x, x0
        if kept is not None:
            self._kept[module_path] = kept
        if module_path == self._mlp_path:
            self.residual = self.original_residual = True  # both streams hold the residual after attention
        elif x0s is not None and module_path == self._last_attention_path:
            self.original_residual = True  # see _inputs

    @property
    def blends_rare(self) -> bool:
        """A rare expert's Hessians are blended with those of all tokens (--rare-expert blend or all-tokens)."""
        return self.qcfg.uses_hessians and self.qcfg.rare_expert != "rtn"

    @property
    def fit_stream(self) -> bool:
        return self.original is not None and self.qcfg.uses_hessians

    @property
    def fit_down(self) -> bool:
        """Down projections are fitted to the original MLP's outputs (--fit mlp or stream)."""
        return self.qcfg.effective_fit in ("mlp", "stream")

    def _store(self, names: list[str], res: QuantResult, bits: int | None = None) -> None:
        """Pack ``res`` (``bits``: its linears' own, default the layer's) under ``names``."""
        if not self.ranks.writes:
            return
        with self.clock("write"):
            for name, packed in zip(names, pack_result(res, bits or self.qcfg.bits)):
                for suffix, t in packed.items():
                    self.result.tensors[f"{self.prefix}{name}.{suffix}"] = t

    def _settings(self, name: str) -> QuantConfig | None:
        """The settings of the layer-relative linear ``name`` (None: kept in 16 bits)."""
        return self.units[name].qcfg

    def _linear(self, name: str) -> nn.Module:
        return self.layer.get_submodule(self.arch.to_memory(name))

    def _set_linear(self, name: str, W: Tensor) -> None:
        self._linear(name).weight.data.copy_(W)

    def _solve_shared_input(self, W: Tensor, module_path: str, keep: bool = False,
                            qcfg: QuantConfig | None = None, inputs: list[Tensor] | None = None
                            ) -> tuple[QuantResult, float]:
        """Linears that share one input, stacked as W (R, C), solved as one matrix (rows are
        independent in GPTQ) with the Hessian of the captured input of ``module_path`` (and, under
        --fit stream, the cross moment with the full-precision stream's), with their settings ``qcfg``
        (default: the layer's). ``inputs``: a list that receives each batch's captured input (tokens, C).
        Returns the result and n."""
        qcfg = qcfg or self.qcfg
        H = X0 = None
        n = 0
        if self.qcfg.uses_hessians:
            H = torch.zeros(W.shape[1], W.shape[1], device=W.device)
            X0 = torch.zeros_like(H) if self.fit_stream else None  # the cross moment, see gptq_quantize
            for x, x0 in self._captured_pairs(module_path, keep):
                if inputs is not None:
                    inputs.append(x)
                with self._stage("hessians"):
                    if X0 is not None:
                        accumulate_moment(X0, x0, x, n)
                    H, n = accumulate_hessian(H, x, n)
            H, X0 = H[None], (None if X0 is None else X0[None])
        with self._stage("solve"):
            return solve(W[None], H, qcfg, overwrite_H=True, block_fn=self.block_fn, cross=X0, tf32=self.tf32), n

    # -- attention ------------------------------------------------------------------
    def attention(self) -> None:
        for k, group in enumerate(self.plan.attention):
            qcfg = self._settings(group[0])
            if qcfg is None:  # kept in 16 bits (--recipe)
                continue
            t0 = time.perf_counter()
            W = torch.cat([self._linear(name).weight.data for name in group])  # the original weights, copied
            rows = [self._linear(name).weight.shape[0] for name in group]
            path = self.arch.to_memory(group[0])
            kept = [] if k == len(self.plan.attention) - 1 and self._keeps_attention_output(W.shape[1]) else None
            res, n = self._solve_shared_input(W, path, qcfg=qcfg, inputs=kept)
            if kept:
                self._attention_output = (path, kept)
            parts = _split_rows(res, rows)
            seconds = time.perf_counter() - t0
            for name, part, r in zip(group, parts, rows):
                self._set_linear(name, part.W[0])
                self._store([name], part, qcfg.bits)
                self.result.log.append(_log(self.prefix + name, "attention", part, 0, (r, W.shape[1]), n,
                                            seconds / len(group)))

    def _keeps_attention_output(self, features: int) -> bool:
        """Whether the last attention group's input, ``features`` wide, is kept for ``to_residual``
        (see ATTENTION_OUTPUT_BYTES)."""
        if self._mlp_path is None or self.ranks.world > 1 or not self.qcfg.uses_hessians:
            return False
        size = sum(b.hidden.shape[:-1].numel() for b in self.batches) * features * 4
        dev = self.stream.device
        if dev.type == "cuda" and self.gpu_memory is not None:
            return torch.cuda.memory_allocated(dev) + size + ATTENTION_PASS_BYTES <= self.gpu_memory
        return size <= ATTENTION_OUTPUT_BYTES

    # -- MLPs -----------------------------------------------------------------------
    def mlps(self) -> None:
        plan, arch = self.plan, self.arch
        if plan.experts is not None:
            if self._settings(plan.experts.linear("gate", 0)) is not None:  # else kept in 16 bits (--recipe)
                self.experts()
            if plan.shared_expert is not None:
                self.dense(plan.shared_expert, arch.moe_module, "shared_expert")
        if plan.dense_mlp is not None:
            self.dense(plan.dense_mlp, arch.to_memory(plan.dense_mlp.prefix), "dense_mlp")

    @torch.no_grad()
    def route(self, X: Tensor) -> Routes:
        """Per expert, the indices of the tokens the original router sends it (top-k, as in the
        forward pass) and the router's score for each of them (what its output is multiplied by)."""
        router = self.layer.get_submodule(self.arch.router_module)
        args = [getattr(self.layer.get_submodule(module), attr)
                for module, _, attr in (path.rpartition(".") for path in self.arch.router_args)]
        out = router(X, *args)
        return routes(out[self.arch.router_indices], out[self.arch.router_weights], self.plan.num_experts)

    def rare_threshold(self, columns: int, inner: int) -> int:
        return self.qcfg.rare_expert_tokens or max(columns, inner)

    def _solve_local(self, W: Tensor, H: Tensor | None, rare: list[int], target: Tensor | None = None,
                     cross: Tensor | None = None, overwrite_W: bool = False) -> QuantResult:
        """Experts W (n, R, C) of this process solved with Hessians H (consumed), RTN for the ``rare``
        positions under ``--rare-expert rtn``. ``overwrite_W``: W becomes GPTQ's working copy. The
        result carries no dequantized W: the caller rebuilds each expert's from its levels (``_dequantized``)."""
        qcfg = self.qcfg
        with self._stage("solve"):
            fallback = None
            if H is not None and rare and qcfg.rare_expert == "rtn":
                fallback = rtn_quantize(W[rare], spec_of(qcfg), search_of(qcfg))
            res = solve(W, H, qcfg, overwrite_H=True, block_fn=self.block_fn, target=target, cross=cross,
                        dequantized=False, overwrite_W=overwrite_W, tf32=self.tf32)
            if fallback is not None:
                res = _replace(res, fallback, rare)
            del H
            res.W = None
            return res

    def experts(self) -> None:
        """All routed experts of the layer (this process's share of them), a group at a time: one pass over
        the tokens routes every batch (and counts each expert's tokens); then per group, one pass gathers
        the rows routed to its experts (``RoutedRows``), from which their gate/up statistics are built, a
        few large products per expert, and solved, then their down statistics from the same rows, and
        solved. Only one group's rows and statistics are resident at once (``expert_groups``: as many
        experts as ``gpu_memory`` leaves room for; all of them without a budget). Every expert's result is
        the same whatever the grouping."""
        store: StoredExperts = self.layer.get_submodule(self.plan.fused.module)
        E, I, C = store.shape
        own = store.own
        spec = spec_of(self.qcfg)
        dev = self.stream.device
        gate_up = Levels(len(own), 2 * I, C, spec.groups(C), spec.bits, dev)
        down = Levels(len(own), C, I, spec.groups(I), spec.bits, dev)
        t0 = time.perf_counter()
        with self.clock("experts:routing"):
            routed, counts, H_all, batch_tokens = self._routing()
        rows = [sum(batch_tokens) if self.qcfg.expert_hessian == "all" else counts[e] for e in own]
        blends = self.blends_rare and any(counts[e] < self.rare_threshold(C, I) for e in own)
        groups = self._expert_groups(store, rows, blends)
        self.result.expert_groups = len(groups)
        for g, blend in enumerate(self._blend_passes(groups, own, counts, self.rare_threshold(C, I))):
            if g >= len(groups):  # another process's group: its passes over the tokens are collectives
                self._join_passes(blend, self.rare_threshold(C, I))
                continue
            group = groups[g]
            experts = [own[j] for j in group]
            with self.clock("experts:gather"):
                gathered = self._routed_rows(routed, batch_tokens, experts, [rows[j] for j in group]) \
                    if self.qcfg.uses_hessians else None
            res_gu, res_d = self._solve_expert_group(store, experts, gathered, counts, H_all, blend)
            del gathered
            gate_up.put(group.start, res_gu)
            down.put(group.start, res_d)
            del res_gu, res_d
        del H_all, routed
        self.result.expert_tokens = counts
        store.quantized, store.use_quantized = (gate_up, down), True
        self._store_experts(store, counts, time.perf_counter() - t0)

    def _blend_passes(self, groups: list[range], own: range, counts: list[int], threshold: int) -> list[bool]:
        """Per group of experts, whether its down statistics make a pass over the tokens for a rare expert's
        blend (``_down_statistics``). Under several processes every pass over the tokens is a collective
        (each process holds only its share of the batches, distributed.spread), so all make the same passes:
        as many groups as the process with the most, each with a blend pass where any process makes one."""
        flags = [int(self.blends_rare and any(counts[own[j]] < threshold for j in group)) for group in groups]
        return [bool(f) for f in max_ints(flags, self.ranks, self.stream.device)]

    def _join_passes(self, blend: bool, threshold: int) -> None:
        """The passes over the tokens another process's group makes (``_routed_rows``, and a blend's in
        ``_down_statistics``), run for their collectives alone: this process has no group left."""
        if self.qcfg.uses_hessians:
            with self.clock("experts:gather"):
                for _ in self._captured_pairs(self.arch.moe_module, keep=True):
                    pass
        if blend:
            self._join_blend(threshold)

    def _blend_batches(self, threshold: int) -> Iterator[Tensor]:
        """A blend's pass over the tokens: the MoE block's inputs in the first batches, up to the batch that brings
        them to BLEND_SAMPLE * threshold (every batch when there are fewer); the pass stops after the next batch."""
        seen = 0
        for x, _ in self._captured_pairs(self.arch.moe_module, keep=True, originals=False):
            if seen >= BLEND_SAMPLE * threshold:
                break
            yield x
            seen += x.shape[0]

    def _blend_sample(self, threshold: int) -> Tensor:
        """The tokens a rare expert's all-token down Hessian is estimated from (``_down_statistics``), as one
        tensor, so that each rare expert's products run over all of them at once."""
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in self._blend_batches(threshold)])

    def _join_blend(self, threshold: int) -> None:
        """A blend's pass over the tokens (``_down_statistics``), made for its collectives alone."""
        for _ in self._blend_batches(threshold):
            pass

    def _expert_groups(self, store: StoredExperts, rows: list[int], blends: bool = False) -> list[range]:
        """Consecutive positions of this process's experts (routed ``rows`` each) making the groups, sized to
        ``self.gpu_memory``; ``blends``: some are rare, and their blends hold ``_blend_sample``'s tokens."""
        E, I, C = store.shape
        costs = ExpertCosts(C, I, hessians=self.qcfg.uses_hessians, cross=self.fit_stream,
                            fit_down=self.fit_down)
        in_use = 0
        if self.gpu_memory is not None and self.stream.device.type == "cuda":
            # What is resident (the layer with its experts as stored, the activations, the Levels, which
            # experts() allocates before it sizes the groups), the MLP inputs' capture if it will be kept
            # on the device, what one pass needs beside the groups' statistics, and the solve's chunks of
            # matrices (a few CHUNK_BYTES of temporaries, see gptq.core.matrix_chunks).
            tokens = [b.hidden.shape[:-1].numel() for b in self.batches]
            streams = 1 if self.original is None else 2
            cached = sum(tokens) * C * 4 * streams if self._mlp_path is None and self.ranks.world == 1 else 0
            sample = (BLEND_SAMPLE * self.rare_threshold(C, I) + max(tokens)) * C * 4 if blends else 0
            in_use = (torch.cuda.memory_allocated(self.stream.device) + costs.passing(max(tokens), streams)
                      + STATS_CHUNK_BYTES + 4 * CHUNK_BYTES + (cached if cached <= CAPTURE_CACHE_BYTES else 0)
                      + min(sample, sum(tokens) * C * 4))
        elif self.gpu_memory is not None:  # nothing is measured on the host: the budget counts the levels kept
            in_use = costs.levels(len(store.own))
        return expert_groups(self.gpu_memory, in_use, costs, rows, self.index)

    def _routing(self) -> tuple[list[Routes], list[int], Tensor | None, list[int]]:
        """One pass over the tokens entering the MoE block: per batch, where the router sends them
        (``route``); the routed tokens of every expert; (for --rare-expert blend/all-tokens) the Hessian
        of all of them; and how many tokens each batch holds."""
        blend = self.blends_rare
        counts = [0] * self.plan.num_experts
        C = self.layer.get_submodule(self.plan.fused.module).shape[2]
        H_all = torch.zeros(C, C, device=self.stream.device) if blend else None
        n_all, routed, batch_tokens = 0, [], []
        for x, _ in self._captured_pairs(self.arch.moe_module, keep=True, originals=False):
            with self._stage("hessians"):
                routed.append(self.route(x))
                counts = [c + n for c, n in zip(counts, routed[-1].counts)]
                batch_tokens.append(x.shape[0])
                if blend:
                    _, n_all = accumulate_hessian(H_all, x, n_all)
        return routed, counts, H_all, batch_tokens

    def _routed_rows(self, routed: list[Routes], batch_tokens: list[int], experts: list[int],
                     rows: list[int]) -> RoutedRows:
        """One pass over the tokens: the rows each of ``experts`` is sent (``routed`` and the tokens of each batch,
        ``batch_tokens``, from ``_routing``; ``rows`` of them each), gathered into one buffer with one copy per
        batch (``RoutedRows``)."""
        dev = self.stream.device
        C = self.layer.get_submodule(self.plan.fused.module).shape[2]
        starts = [0]
        for r in rows:
            starts.append(starts[-1] + r)
        X = torch.empty(starts[-1], C, device=dev)
        X0 = torch.empty_like(X) if self.fit_stream else None
        weighted = self.qcfg.expert_hessian == "weighted"
        w = torch.empty(starts[-1], device=dev) if weighted else None
        every = self.qcfg.expert_hessian == "all"  # every token of a batch for every expert (no weights read)
        sizes = [[batch_tokens[b] if every else routed[b].counts[e] for e in experts] for b in range(len(routed))]
        dest_all, ends = _destinations(starts, sizes, dev)  # every batch's rows' places, copied at once
        scales = self._norm_scales()  # the residual's rows are copied, then scaled as the norm scales them
        S = None if scales is None else torch.empty(starts[-1], 1, device=dev)
        S0 = None if S is None or X0 is None else torch.empty_like(S)
        for b, (x, x0) in enumerate(self._routed_inputs(scales is not None)):
            with self._stage("hessians"):
                first = ends[b - 1] if b else 0
                if ends[b] == first:
                    continue
                if every:
                    src, scores = torch.arange(x.shape[0], device=dev).repeat(len(experts)), None
                else:
                    src, scores = routed[b].pairs(experts)
                dest = dest_all[first:ends[b]]
                X.index_copy_(0, dest, x.index_select(0, src))
                if X0 is not None:
                    X0.index_copy_(0, dest, x0.index_select(0, src))
                if w is not None:
                    w.index_copy_(0, dest, scores.float())
                if S is not None:
                    S.index_copy_(0, dest, scales[b][0].index_select(0, src))
                if S0 is not None:
                    S0.index_copy_(0, dest, scales[b][1].index_select(0, src))
        if S is not None:
            with self._stage("hessians"):
                self.stream.norm_rows(self.layer, X, S)
                if S0 is not None:
                    self.stream.norm_rows(self.original, X0, S0)
        return RoutedRows(X, X0, w, list(zip(starts[:-1], starts[1:])))

    def _norm_scales(self) -> list[tuple[Tensor, Tensor | None]] | None:
        """Each batch's token scales in the post-attention norm, of this stream and (under --fit stream or layer)
        the full-precision one (LayerStream.norm_scales), made once per layer: a gather pass then copies the
        routed rows of the residual and scales them, the norm's bits for those rows, instead of norming every
        batch of both streams again. None where a stream's norm is not of that form, under several processes
        (each holds only its share of the batches), or for a row whose MoE block is not fed by its ``mlp_tail``."""
        if not self._scales_made:
            self._scales_made = True
            usable = self.ranks.world == 1 and self._mlp_path == self.arch.moe_module and self.residual \
                and (not self.fit_stream or self.original_residual)
            with self._stage("capture"):
                mine = self.stream.norm_scales(self.layer, self.batches) if usable else None
                theirs = self.stream.norm_scales(self.original, self.original_batches) \
                    if mine is not None and self.fit_stream else None
            if mine is not None and (theirs is not None or not self.fit_stream):
                self._scales = [(r, None if theirs is None else theirs[b]) for b, r in enumerate(mine)]
        return self._scales

    def _routed_inputs(self, residual: bool) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, x0) batch by batch for a gather pass: the MoE block's inputs (``_captured_pairs``), or with
        ``residual`` each stream's residual after attention, (tokens, features), which ``_norm_scales`` scales."""
        if not residual:
            yield from self._captured_pairs(self.arch.moe_module, keep=True)
            return
        for b, batch in enumerate(self.batches):
            x = batch.hidden.reshape(-1, batch.hidden.shape[-1])
            x0 = self.original_batches[b].hidden.reshape(x.shape) if self.fit_stream else x
            yield x, x0

    def _solve_expert_group(self, store: StoredExperts, experts: list[int], rows: RoutedRows | None,
                            counts: list[int], H_all: Tensor | None, blend_pass: bool = False
                            ) -> tuple[QuantResult, QuantResult]:
        """Gate/up, then down, of ``experts`` from the ``rows`` routed to them; their levels (no W).
        ``blend_pass``: another process blends a rare expert here (``_blend_passes``)."""
        qcfg = self.qcfg
        _, I, C = store.shape
        threshold = self.rare_threshold(C, I)
        rare = [k for k, e in enumerate(experts) if counts[e] < threshold]
        H_gu = X0_gu = None
        if rows is not None:
            with self.clock("experts:gate_up_statistics"):
                H_gu, X0_gu = self._gate_up_statistics(rows)
            for k in rare:
                if H_all is not None:
                    H_gu[k] = _blend(H_gu[k], H_all, counts[experts[k]], threshold, qcfg.rare_expert)
                    if X0_gu is not None:  # a blended Hessian has no matching moment: plain GPTQ (P = W H)
                        X0_gu[k] = H_gu[k]
        with self.clock("experts:gate_up_solve"):
            W = store.originals("gate_up", experts[0], experts[-1] + 1)  # GPTQ's working copy
            res_gu = self._solve_local(W, H_gu, rare, cross=X0_gu, overwrite_W=True)
        del W, H_gu, X0_gu
        H_d = P_d = None
        if rows is not None:
            H_d, P_d = self._down_statistics(store, experts, rows, res_gu, counts, threshold, rare, blend_pass)
        with self.clock("experts:down_solve"):
            W = store.originals("down", experts[0], experts[-1] + 1)
            res_d = self._solve_local(W, H_d, rare, P_d, overwrite_W=True)
        return res_gu, res_d

    def _gate_up_statistics(self, rows: RoutedRows) -> tuple[Tensor, Tensor | None]:
        """The gate/up Hessians of a group's experts (and under --fit stream the cross moments with the
        full-precision stream's inputs, see gptq_quantize), each from all the rows routed to it at once."""
        C = rows.x.shape[1]
        H = torch.zeros(len(rows.spans), C, C, device=self.stream.device)
        X0 = torch.zeros_like(H) if self.fit_stream else None
        with self._stage("hessians"):
            for k in range(len(rows.spans)):
                x, x0, w = rows.of(k)
                n = 0
                for xc, x0c, wc in _row_chunks(x, x0, w, 4 * 2 * C):  # the rows weighted, twice
                    if X0 is None:
                        xw, added = weighted_rows(xc, wc)
                    else:
                        xw, added = weighted(xc, wc)
                        x0w, xw = operands(weighted(x0c, wc)[0], xw)  # one read of both scales
                        moment_add(X0[k], x0w, xw)
                    moment_add(H[k], xw, xw, mirror=False)
                    n = n + added
                finish_moment(H[k], n, mirror=True)
                if X0 is not None:
                    finish_moment(X0[k], n)
        return H, X0

    def _down_statistics(self, store: StoredExperts, experts: list[int], rows: RoutedRows, res_gu: QuantResult,
                         counts: list[int], threshold: int, rare: list[int], blend_pass: bool = False
                         ) -> tuple[Tensor, Tensor | None]:
        """The down Hessians of a group's experts (and, for the fit, the moments P of the original MLP's
        outputs), from their routed ``rows`` run through the quantized gate/up (rebuilt once per expert from
        ``res_gu``'s levels, position k for experts[k]) or, without true-sequential, the original."""
        qcfg, fit = self.qcfg, self.fit_down
        _, I, C = store.shape
        dev, act = self.stream.device, store.act_fn
        H_d = torch.zeros(len(experts), I, I, device=dev)
        P_d = torch.zeros(len(experts), C, I, device=dev) if fit else None
        # Narrow experts (those whose forward keeps TF32 too: experts.half_forward) keep fp32 operands here.
        with self.clock("experts:down_statistics"), self._stage("hessians"), fp32_operands(not store.half):
            for k, e in enumerate(experts):
                x, x0, w = rows.of(k)
                Wg, Wu, original = self._expert_mlp(store, res_gu, k, e)
                # Every operand made as few times, and with as few reads of their scales, as it can be
                # (gptq.core.operands): the weights once per expert, then three reads per chunk.
                Wg, Wu, *original = operands(Wg.t(), Wu.t(), *(() if P_d is None else (W.t() for W in original)))
                n = 0
                for xc, x0c, wc in _row_chunks(x, x0, w, 4 * (6 * I + C)):  # gate, up, act, h, h w; output
                    added = weight_count(xc.shape[0], wc)
                    if P_d is None:
                        hw, = operands(gated(xc, Wg, Wu, act, wc))
                    else:
                        g0, u0, d0 = original
                        xo, x0o = operands(xc, x0c)
                        hw, a0 = operands(gated(xo, Wg, Wu, act, wc), gated(x0o, g0, u0, act))
                        y0w, _ = weighted_rows(stat_mm(a0, d0), wc)
                        moment_add(P_d[k], y0w, hw)
                    moment_add(H_d[k], hw, hw, mirror=False)
                    n = n + added
                finish_moment(H_d[k], n, mirror=True)
                if P_d is not None:
                    finish_moment(P_d[k], n)
        blended = rare if self.blends_rare else []
        if blended:  # a rare expert's Hessian is blended with that of all tokens through its gate/up
            with self.clock("experts:blend"):
                sample = self._blend_sample(threshold)
            with self.clock("experts:blend"), self._stage("hessians"):  # fp16 operands: few, large products
                for k in blended:
                    Wg, Wu, _ = self._expert_mlp(store, res_gu, k, experts[k], original=False)
                    Wg, Wu = operands(Wg.t(), Wu.t())
                    H_all = torch.zeros(I, I, device=dev)
                    n = 0
                    for xc, _, _ in _row_chunks(sample, sample, None, 4 * 4 * I):  # gate, up, act, h
                        h = gated(xc, Wg, Wu, act)
                        n = n + moment_sum(H_all, h, h, mirror=False)
                    H_all = finish_moment(H_all, n, mirror=True)
                    H_d[k] = _blend(H_d[k], H_all, counts[experts[k]], threshold, qcfg.rare_expert)
                    del H_all
                    if P_d is not None:  # a rare expert's blended Hessian has no matching moment: plain GPTQ
                        P_d[k] = store.original("down", experts[k]) @ H_d[k]
            del sample
        elif blend_pass:  # another process blends here: its pass over the tokens is a collective
            self._join_blend(threshold)
        return H_d, P_d

    def _expert_mlp(self, store: StoredExperts, res_gu: QuantResult, k: int, e: int, original: bool = True
                    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
        """Expert e's gate and up weights as its down_proj will see them (the quantized ones, position k of
        ``res_gu``, under true-sequential; else the originals), and (for the fit, if ``original``) its
        original (gate, up, down)."""
        _, I, _ = store.shape
        halves = self.plan.fused.halves

        def gate_and_up(W: Tensor) -> tuple[Tensor, Tensor]:  # W (2I, C): its halves in the order stored
            return tuple(W[halves.index(h) * I:(halves.index(h) + 1) * I] for h in ("gate", "up"))

        fit = original and self.fit_down
        W_gu = store.original("gate_up", e) if fit or not self.qcfg.true_sequential else None  # (2I, C)
        gate, up = gate_and_up(_dequantized(res_gu, k) if self.qcfg.true_sequential else W_gu)
        return gate, up, ((*gate_and_up(W_gu), store.original("down", e)) if fit else None)

    def _store_experts(self, store: StoredExperts, counts: list[int], seconds: float) -> None:
        """Every expert's packed tensors and log entries (gate, up, down per expert), on rank 0: one process packs
        a chunk of experts at a time (one packing and one copy to the host per tensor for the chunk); under
        several, rank 0 receives the other processes' experts one at a time (distributed.experts_to_writer)."""
        mlp, E = self.plan.experts, self.plan.num_experts
        _, I, C = store.shape
        threshold = self.rare_threshold(C, I)
        gate_up, down = store.quantized
        n = len(Levels.FIELDS)

        def held(e: int) -> list[Tensor]:  # expert e's levels, gate/up's then down's
            j = store.local(e)
            return gate_up.fields(j) + down.fields(j)

        if self.ranks.world == 1:  # chunks sized to the packing's int64 temporaries (gptq.core.matrix_chunks)
            chunks = ((s, gate_up.result(s), down.result(s)) for s in matrix_chunks(E, 2 * I * C * 8))
        else:  # rank 0 only: the other processes' loop sends their experts and ends without a turn
            chunks = ((slice(e, e + 1), gate_up.one(fields[:n]).result(0), down.one(fields[n:]).result(0))
                      for e, fields in enumerate(experts_to_writer(E, self.ranks, held)))
        for s, res_gu, res_d in chunks:
            parts = dict(zip(self.plan.fused.halves, _split_rows(res_gu, [I, I])))
            parts["down"] = res_d
            experts = range(s.start, s.stop)
            for w in ("gate", "up", "down"):
                self._store([mlp.linear(w, e) for e in experts], parts[w])
            for k, e in enumerate(experts):
                note = self._fallback_note(counts[e], threshold) if counts[e] < threshold else None
                for w in ("gate", "up", "down"):
                    self.result.log.append(_log(self.prefix + mlp.linear(w, e), "expert", parts[w], k,
                                                (C, I) if w == "down" else (I, C), counts[e], seconds / E / 3, note))

    def dense(self, mlp: MLP, module_path: str, kind: str) -> None:
        """A gated MLP fed every token entering ``module_path``: a shared expert or a dense layer's MLP.
        Gate/up and down take their own settings (``--recipe``); one kept in 16 bits is left as it is."""
        module = self.layer.get_submodule(self.arch.to_memory(mlp.prefix))
        names = [mlp.linear(w) for w in ("gate", "up", "down")]
        qcfg_gu, qcfg_d = self._settings(names[0]), self._settings(names[2])
        if qcfg_gu is None and qcfg_d is None:
            return
        Wg, Wu, Wd = (self._linear(n).weight.data.clone() for n in names)  # originals, kept
        I = Wg.shape[0]
        gptq = self.qcfg.uses_hessians
        t0 = time.perf_counter()
        done, n = [], 0
        src_g, src_u = Wg, Wu
        if qcfg_gu is not None:
            res_gu, n = self._solve_shared_input(torch.cat([Wg, Wu]), module_path, keep=True, qcfg=qcfg_gu)
            gq, uq = _split_rows(res_gu, [I, I])
            self._set_linear(names[0], gq.W[0])
            self._set_linear(names[1], uq.W[0])
            if qcfg_gu.true_sequential:
                src_g, src_u = gq.W[0], uq.W[0]
            half = (time.perf_counter() - t0) / 2
            done += [(names[0], gq, Wg, qcfg_gu, half), (names[1], uq, Wu, qcfg_gu, half)]
        t1 = time.perf_counter()
        if qcfg_d is not None:
            H_d = P_d = None
            if gptq:
                H_d, n_d = torch.zeros(I, I, device=Wg.device), 0
                fit = self.fit_down
                P_d = torch.zeros(Wd.shape[0], I, device=Wg.device) if fit else None
                for x, x0 in self._captured_pairs(module_path, keep=True):
                    with self._stage("hessians"):
                        n_d = fold_down(H_d, P_d, n_d, x, None, src_g, src_u, module.act_fn,
                                        (Wg, Wu, Wd) if fit else None, x0)
                H_d = H_d[None]
                P_d = None if P_d is None else P_d[None]
                n = n or n_d
            with self._stage("solve"):
                res_d = solve(Wd[None], H_d, qcfg_d, overwrite_H=True, block_fn=self.block_fn, target=P_d,
                              tf32=self.tf32)
            self._set_linear(names[2], res_d.W[0])
            done.append((names[2], res_d, Wd, qcfg_d, time.perf_counter() - t1))
        for name, part, W, qcfg, secs in done:
            self._store([name], part, qcfg.bits)
            self.result.log.append(_log(self.prefix + name, kind, part, 0, W.shape, n, secs))

    def _fallback_note(self, count: int, threshold: int) -> str:
        policy = self.qcfg.rare_expert
        if policy == "blend":
            return f"blend: {count} routed tokens < {threshold}; Hessian = {count}/{threshold} routed + rest all-token"
        if policy == "all-tokens":
            return f"all-tokens: {count} routed tokens < {threshold}; Hessian of all tokens entering the MoE block"
        return f"rtn: {count} routed tokens < {threshold}; round-to-nearest"

    def outputs(self) -> None:
        """The quantized layer's outputs (and under --fit stream the original layer's, on the
        full-precision stream): the next layer's inputs, written over this layer's, batch by batch
        (``layer_outputs``, which a resumed run's replay of this layer runs too)."""
        self._kept.clear()
        self._scales, self._scales_made = None, True  # the batches change: no gather pass follows
        self._attention_output = None  # kept for a to_residual that did not come (the MLP kept in 16 bits)
        with self._stage("forward"):
            self.result.outputs = layer_outputs(self.stream, self.layer, self.plan, self.batches, self.ranks,
                                                self.residual, self.gpu_memory, self.clock)
            if self.original is not None and self.qcfg.fit == "stream":
                self._restore_original()
                self.result.original_outputs = layer_outputs(self.stream, self.layer, self.plan,
                                                             self.original_batches, self.ranks,
                                                             self.original_residual, self.gpu_memory, self.clock)
        self.original = None

    def run(self) -> LayerResult:
        self.result.activation_bytes_held = sum(b.hidden.nbytes for b in [*self.batches, *(self.original_batches or [])]
                                                if not b.hidden.is_meta)
        self.attention()
        self.mlps()
        if self.plan.experts is not None:  # the originals and levels are all held by now
            self.result.expert_bytes_held = self.layer.get_submodule(self.plan.fused.module).held_bytes
        if self.stream.device.type == "cuda":  # the packed tensors' copies to the host are queued, not done
            self.result.packed = torch.cuda.Event()
            self.result.packed.record()
        self.outputs()
        if self.experts_module is not None:  # the fused module back in its place, for the skeleton
            self.layer.set_submodule(self.plan.fused.module, self.experts_module)
        self.stream.release_layer(self.index)
        with self.clock("write"):
            _read_logs(self.result.log)
        self.result.timings = self.clock.rounded()
        self.result.peak_gpu_mb = dict(self.clock.peak_gpu_mb)
        return self.result


def _empty(module: nn.Module, attr: str) -> None:
    """module.<attr> (a fused experts tensor, or an FP8 release's Fp8Experts) replaced by an empty parameter,
    as LayerStream.release_layer leaves it."""
    if not isinstance(getattr(module, attr), nn.Parameter):
        delattr(module, attr)
    setattr(module, attr, nn.Parameter(torch.empty(0, device="meta"), requires_grad=False))


def _pinned_copy(t: Tensor) -> Tensor:
    """A copy of the device tensor t in page-locked host memory (queued; the device's stream orders its use)."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


def _blend(H_routed: Tensor, H_all: Tensor, count: int, threshold: int, policy: str) -> Tensor:
    """The Hessian of a rare expert: routed tokens weighted count/threshold, the rest from all tokens."""
    if policy == "all-tokens" or count == 0:
        return H_all
    alpha = count / threshold
    return alpha * H_routed + (1 - alpha) * H_all


def _split_rows(res: QuantResult, rows: list[int]) -> list[QuantResult]:
    """Cut a result over concatenated linears back into one result per linear."""
    out, start = [], 0
    for r in rows:
        sl = slice(start, start + r)
        out.append(QuantResult(q=res.q[:, sl], scales=res.scales[:, sl], zeros=res.zeros[:, sl], g_idx=res.g_idx,
                               W=None if res.W is None else res.W[:, sl], loss=res.loss[:, sl], damp=res.damp))
        start += r
    return out


def _replace(res: QuantResult, sub: QuantResult, idx: list[int]) -> QuantResult:
    """res with the matrices at batch positions idx replaced by sub's (W only where res has it)."""
    for field_name in ("q", "scales", "zeros", "W", "loss", "damp"):
        if getattr(res, field_name) is not None:
            getattr(res, field_name)[idx] = getattr(sub, field_name)
    return res


def _dequantized(res: QuantResult, b: int) -> Tensor:
    """Matrix b's dequantized weights, rebuilt from its levels (GPTQ's layout: ``dequantize_grouped``; on CUDA in
    one kernel, with the same bits)."""
    fused = dequantize_levels(res.q[b], res.scales[b], res.zeros[b], res.q.shape[-1], packed=False)
    return fused if fused is not None else dequantize_grouped(res.q[b], res.scales[b], res.zeros[b])


def _row_chunks(x: Tensor, x0: Tensor, w: Tensor | None, per_row: int
                ) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """An expert's rows (and their full-precision twins and weights) in chunks whose temporaries, at
    ``per_row`` bytes a row, stay within STATS_CHUNK_BYTES: a size set by the shapes alone, so an expert's
    statistics are the same bits whatever the budget."""
    rows = max(256, STATS_CHUNK_BYTES // per_row)
    for start in range(0, x.shape[0], rows):
        stop = start + rows
        yield x[start:stop], (x[start:stop] if x0 is x else x0[start:stop]), (None if w is None else w[start:stop])


def _destinations(starts: list[int], sizes: list[list[int]], device: torch.device) -> tuple[Tensor, list[int]]:
    """Where a group's routed rows go in its buffer (``_routed_rows``): expert k's rows start at starts[k], and batch
    b brings sizes[b][k] of them, after the earlier batches'. Returns every batch's positions, batch after batch
    (each batch's expert after expert), made on the host and copied to ``device`` at once, and where each batch's
    positions end in them."""
    count = torch.tensor(sizes, dtype=torch.int64).reshape(len(sizes), len(starts) - 1)
    first = torch.tensor(starts[:-1], dtype=torch.int64) + count.cumsum(0) - count  # (batches, experts)
    flat = count.flatten()
    total = int(flat.sum())
    dest = torch.repeat_interleave(first.flatten() - (flat.cumsum(0) - flat), flat, output_size=total) \
        + torch.arange(total)
    ends = count.sum(1).cumsum(0).tolist()
    if device.type == "cuda":
        return dest.pin_memory().to(device, non_blocking=True), ends
    return dest.to(device), ends


def layer_outputs(stream: LayerStream, layer: nn.Module, plan: LayerPlan, batches: list[Batch], ranks: Ranks,
                  residual: bool = False, gpu_memory: int | None = None, clock: Stopwatch | None = None
                  ) -> list[Batch]:
    """The outputs of decoder layer ``layer`` (``plan``'s) for ``batches`` (this process's share of them),
    written over them: as a layer's quantization makes them, and a resumed run's replay of it
    (resume.run_stored) the same way, so that the products, and their bits, are the same.

    A row with an MLP tail: the batches are first turned into the residual after attention (unless
    ``residual``: they hold it already), then residual + MLP; with routed experts (a StoredExperts) by
    expert (``tail_by_expert``: ``gpu_memory`` sizes its chunks, ``clock`` times its parts). A row without
    one: the whole layer per batch, with routed experts under several processes every batch on every
    process (``layer_by_batch``)."""
    if stream.arch.mlp_tail is not None:
        if not residual:
            stream.residuals(layer, batches, ranks)
        if plan.experts is None:
            return stream.run_tail(layer, batches, ranks)
        return tail_by_expert(stream, layer, plan.fused.module, batches, ranks, gpu_memory, clock)
    if plan.experts is not None and ranks.world > 1:
        return layer_by_batch(stream, layer, batches, ranks)
    return stream.run_layer(layer, batches, ranks, in_place=True)
