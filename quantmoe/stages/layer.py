"""Quantize one decoder layer: attention first, then the MoE block, then shared/dense MLPs.

Order inside a layer (true-sequential): q/k/v share one Hessian; o_proj sees the
quantized q/k/v; every expert's gate and up share one Hessian built from exactly the
tokens the original router sends it; its down_proj's Hessian comes from the quantized
gate/up outputs of those tokens. Experts of a layer are solved together in one batch.

Activations are streamed batch by batch from the capture hook, never concatenated: the
input of the MoE block is captured once for the gate/up Hessians and again, once gate/up
are quantized, for the down Hessians. The second partial forward pass costs less than
keeping a (tokens, hidden) fp32 copy on the device (4.3 GB for 128 x 2048 tokens of
Mixtral). With several processes each solves only its share of the experts
(distributed.py). Time per stage is recorded in ``LayerResult.timings``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from ..base.measure import Stopwatch
from ..base.options import QuantConfig
from ..formats.gptq_v1 import pack_result
from ..gptq.core import (
    ClipSearch,
    QuantResult,
    QuantSpec,
    accumulate_hessian,
    accumulate_moment,
    dequantize,
    gptq_quantize,
    quantize_block,
    rtn_quantize,
    tf32_matmuls,
)
from ..gptq.triton_kernels import error_terms
from ..model.architectures import MLP, LayerPlan, plan_layer
from ..model.distributed import SINGLE, Ranks, gather_result
from ..model.stream import Batch, LayerStream

TOKEN_CHUNK = 32768  # tokens per matmul when building Hessians, to bound temporary memory
# The down Hessians (and fit moments) of a layer's experts are built and solved in groups of experts
# whose statistics take at most this much: 4 of Mixtral-8x7B's 8 (0.98 GiB each) per group.
DOWN_STATS_BYTES = 4 << 30
# Inputs of the MLP stage are captured once and reused by the passes after (down Hessians, shared
# expert) when they take at most this much memory; above it, each pass captures them again.
CAPTURE_CACHE_BYTES = 1 << 30


@dataclass
class LayerResult:
    tensors: dict[str, Tensor]                        # packed GPTQ tensors under full on-disk names (rank 0 only)
    log: list[dict] = field(default_factory=list)     # one entry per quantized module
    expert_tokens: list[int] = field(default_factory=list)
    outputs: list[Batch] = field(default_factory=list)  # the next layer's inputs
    original_outputs: list[Batch] | None = None          # the same in the full-precision model (--fit stream)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: load, capture, hessians, solve, forward, write
    peak_gpu_mb: dict[str, float] = field(default_factory=dict)  # per stage, on CUDA
    packed: torch.cuda.Event | None = None  # on CUDA: reached once ``tensors`` are copied to the host


def spec_of(qcfg: QuantConfig) -> QuantSpec:
    return QuantSpec(bits=qcfg.bits, group_size=qcfg.group_size, sym=qcfg.sym)


def search_of(qcfg: QuantConfig) -> ClipSearch:
    """The clipping search of ``qcfg``; its rounding errors come from one Triton kernel on CUDA where Triton
    is installed (``error_terms`` itself says where it applies), else from PyTorch: the same bits."""
    return ClipSearch(qcfg.clip_steps, qcfg.clip_min, qcfg.clip_max, qcfg.clip_weight, error_terms)


def solve(W: Tensor, H: Tensor | None, qcfg: QuantConfig, overwrite_H: bool = False,
          block_fn=quantize_block, target: Tensor | None = None, cross: Tensor | None = None,
          dequantized: bool = True, overwrite_W: bool = False, fit_tf32: bool = False) -> QuantResult:
    """W (B, R, C) with Hessians H (B, C, C) (and the output moment ``target`` or the input
    moment ``cross``, see gptq.gptq_quantize); RTN when the backend is rtn or there is no Hessian.
    ``dequantized`` False: the result's W may be None (the caller rebuilds it from the levels).
    ``overwrite_W``/``overwrite_H``: W/H are handed over and become GPTQ's working storage."""
    if not qcfg.uses_hessians:  # the rtn baseline keeps plain min/max grids
        return rtn_quantize(W, spec_of(qcfg))
    if H is None:
        return rtn_quantize(W, spec_of(qcfg), search_of(qcfg))
    return gptq_quantize(W, H, spec_of(qcfg), qcfg.damp, qcfg.act_order, qcfg.block_size, overwrite_H, block_fn,
                         search_of(qcfg), target, qcfg.refine, cross, dequantized, overwrite_W, fit_tf32)


def _chunks(X: Tensor) -> Iterable[Tensor]:
    for start in range(0, X.shape[0], TOKEN_CHUNK):
        yield X[start:start + TOKEN_CHUNK]


def gated(x: Tensor, Wg: Tensor, Wu: Tensor, act) -> Tensor:
    """act(x Wg^T) * (x Wu^T): what a gated MLP feeds its down_proj."""
    return act(x @ Wg.t()) * (x @ Wu.t())


def mlp_hidden(X: Tensor, Wg: Tensor, Wu: Tensor, act) -> Iterable[Tensor]:
    """``gated`` for X, chunk by chunk."""
    for x in _chunks(X):
        yield gated(x, Wg, Wu, act)


def fold_down(H: Tensor, P: Tensor | None, n: float, X: Tensor, weights: Tensor | None, Wg: Tensor, Wu: Tensor,
              act, original: tuple[Tensor, Tensor, Tensor] | None = None, X0: Tensor | None = None) -> float:
    """Fold the tokens X (T, C) entering a gated MLP into its down_proj's Hessian H (I, I), from the
    gate/up weights Wg, Wu it will run with (quantized), and, given the ``original`` (gate, up,
    down) weights, into P (C', I), the moment of the original MLP's outputs with those inputs
    (gptq.gptq_quantize's ``target``); the original MLP sees X0 (the same tokens in the
    full-precision model, default X). ``weights`` (T,) as in accumulate_hessian. Returns n."""
    X0 = X if X0 is None else X0
    for start in range(0, X.shape[0], TOKEN_CHUNK):
        x = X[start:start + TOKEN_CHUNK]
        w = None if weights is None else weights[start:start + TOKEN_CHUNK]
        h = gated(x, Wg, Wu, act)
        if original is not None:
            g0, u0, d0 = original
            accumulate_moment(P, gated(X0[start:start + TOKEN_CHUNK], g0, u0, act) @ d0.t(), h, n, w)
        _, n = accumulate_hessian(H, h, n, w)
    return n


def _log(name: str, kind: str, res: QuantResult, b: int, shape, tokens: int, seconds: float,
         fallback: str | None = None) -> dict:
    return {
        "module": name, "kind": kind, "shape": list(shape[-2:]), "groups": int(res.scales.shape[-1]),
        "tokens": int(tokens),
        "loss": float(res.loss[b].sum()), "damp": float(res.damp[b]), "fallback": fallback,
        "seconds": round(seconds, 4),
    }


class LayerQuantizer:
    """Holds one materialised layer and writes quantized weights back into it as it goes."""

    def __init__(self, stream: LayerStream, index: int, batches: list[Batch], qcfg: QuantConfig,
                 state: dict[str, Tensor] | None = None, ranks: Ranks = SINGLE, tf32: bool = False,
                 block_fn=quantize_block, original_batches: list[Batch] | None = None):
        """``state``: the layer's tensors if already read (by a prefetching thread), else read here.
        ``block_fn``: how GPTQ runs a block of columns (gptq_graphs.GraphedBlocks on CUDA).
        ``original_batches``: this layer's inputs in the full-precision model (``--fit stream``; for
        ``--fit layer``, ``batches`` themselves)."""
        self.stream, self.index, self.batches, self.qcfg = stream, index, batches, qcfg
        self.ranks, self.tf32, self.block_fn = ranks, tf32 and stream.device.type == "cuda", block_fn
        self.clock = Stopwatch(stream.device)
        self.arch = stream.arch
        self.plan: LayerPlan = plan_layer(self.arch, stream.config, index, qcfg.layout)
        with self.clock("load"):
            if state is None:
                state = stream.layer_state(index, keep_dtype=True)
            self.layer: nn.Module = stream.load_layer(index, state)
            # --fit stream/layer: the layer as it was, run on the full-precision stream beside the one quantized.
            self.original: nn.Module | None = None
            self.original_experts: tuple[Tensor, Tensor] | None = None  # (gate_up, down), see _original_copy
            if original_batches is not None:
                self.original, self.original_experts = self._original_copy(self._expert_dtype(state))
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
        self.result = LayerResult(tensors={})
        self._kept: dict[str, list[tuple[Tensor, Tensor]]] = {}  # see _captured_pairs

    def _expert_dtype(self, state: dict[str, Tensor]) -> torch.dtype:
        """The dtype the routed experts are stored in (fp32 where there are none)."""
        fused, mlp = self.plan.fused, self.plan.experts
        if fused is None or mlp is None:
            return torch.float32
        names = [fused.disk_gate_up] if fused.on_disk else []
        names.append(f"{mlp.linear(fused.halves[0], 0)}.weight")
        return next((state[n].dtype for n in names if n in state), torch.float32)

    def _original_copy(self, dtype: torch.dtype) -> tuple[nn.Module, tuple[Tensor, Tensor] | None]:
        """The layer before quantization, for the full-precision stream: a copy of every module but the
        routed experts, whose fused (gate_up, down) tensors are kept apart in the checkpoint's ``dtype``
        (they were converted from it, so converting back is exact): for Mixtral-8x7B 2.7 GiB instead
        of a 5.4 GiB fp32 copy. The copy's expert tensors are empty; ``_restore_original`` puts it all
        back into the layer for the full-precision stream's outputs."""
        if self.plan.fused is None:
            return copy.deepcopy(self.layer), None
        fused = self.layer.get_submodule(self.plan.fused.module)
        params = [getattr(fused, self.plan.fused.gate_up), getattr(fused, self.plan.fused.down)]
        data = [p.data for p in params]
        experts = (data[0].to(dtype, copy=True), data[1].to(dtype, copy=True))
        try:
            for p in params:
                p.data = p.data.new_empty(0)
            original = copy.deepcopy(self.layer)
        finally:
            for p, t in zip(params, data):
                p.data = t
        return original, experts

    def _restore_original(self) -> None:
        """The layer's weights back to those of ``_original_copy`` (once its quantized outputs are made)."""
        for name, p in self.original.named_parameters():
            if p.numel():
                self.layer.get_parameter(name).data.copy_(p.data)
        if self.original_experts is not None:
            fused = self.layer.get_submodule(self.plan.fused.module)
            for attr, t in zip((self.plan.fused.gate_up, self.plan.fused.down), self.original_experts):
                getattr(fused, attr).data.copy_(t)

    # -- bookkeeping ----------------------------------------------------------------
    @contextmanager
    def _stage(self, name: str):
        """Time a stage; forward passes and Hessians may use TF32, the solve never does."""
        with self.clock(name), tf32_matmuls(self.tf32 and name in ("capture", "hessians", "forward")):
            yield

    def _inputs(self, module_path: str, original: bool = False) -> Iterator[Tensor]:
        """The input of ``<module_path>`` for every batch of the quantized (or the ``original``) stream.
        The MLP of a layer with an ``mlp_tail`` is fed from the residual after attention: the first
        such pass turns the batches into it; the full-precision stream's attention never changes, so
        its last attention capture does that already."""
        layer, batches = (self.original, self.original_batches) if original else (self.layer, self.batches)
        if module_path == self._mlp_path:
            if self.original_residual if original else self.residual:
                return self.stream.mlp_inputs(layer, batches)
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

    def _captured_pairs(self, module_path: str, keep: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, x0) batch by batch: the input of ``layer.<module_path>`` in the model being quantized,
        and, under --fit stream, the same tokens' input in the full-precision model (else x0 is x).

        ``keep``: the input will not change before the next call for this path (the MLP stage:
        attention is done), so it is kept for that call if it fits in CAPTURE_CACHE_BYTES,
        which saves a partial forward pass (through attention) per reuse."""
        if module_path in self._kept:
            yield from self._kept[module_path]
            return
        kept, size = ([] if keep else None), 0
        originals = None if self.original is None else self._inputs(module_path, original=True)
        for x in self._captured(module_path):
            x0 = x
            if originals is not None:
                with self._stage("capture"):
                    x0 = next(originals)
            if kept is not None:
                # Judged on the first batch: a cache that will not fit is not started (its growth is peak memory).
                size = max(size, x.numel() * x.element_size() * (1 if x0 is x else 2) * len(self.batches))
                kept = kept + [(x, x0)] if size <= CAPTURE_CACHE_BYTES else None
            yield x, x0
        if kept is not None:
            self._kept[module_path] = kept
        if module_path == self._mlp_path:
            self.residual = self.original_residual = True  # both streams hold the residual after attention
        elif originals is not None and module_path == self._last_attention_path:
            self.original_residual = True  # see _inputs

    @property
    def fit_stream(self) -> bool:
        return self.original is not None and self.qcfg.uses_hessians

    @property
    def fit_down(self) -> bool:
        """Down projections are fitted to the original MLP's outputs (--fit mlp or stream)."""
        return self.qcfg.uses_hessians and self.qcfg.fit in ("mlp", "stream")

    def _store(self, names: list[str], res: QuantResult) -> None:
        if not self.ranks.writes:
            return
        with self.clock("write"):
            for name, packed in zip(names, pack_result(res, self.qcfg.bits)):
                for suffix, t in packed.items():
                    self.result.tensors[f"{self.prefix}{name}.{suffix}"] = t

    def _linear(self, name: str) -> nn.Module:
        return self.layer.get_submodule(self.arch.to_memory(name))

    def _set_linear(self, name: str, W: Tensor) -> None:
        self._linear(name).weight.data.copy_(W)

    def _solve_shared_input(self, W: Tensor, module_path: str, keep: bool = False) -> tuple[QuantResult, float]:
        """Linears that share one input, stacked as W (R, C), solved as one matrix (rows are
        independent in GPTQ) with the Hessian of the captured input of ``module_path`` (and, under
        --fit stream, the cross moment with the full-precision stream's). Returns the result and n."""
        H = X0 = None
        n = 0
        if self.qcfg.uses_hessians:
            H = torch.zeros(W.shape[1], W.shape[1], device=W.device)
            X0 = torch.zeros_like(H) if self.fit_stream else None  # the cross moment, see gptq_quantize
            for x, x0 in self._captured_pairs(module_path, keep):
                with self._stage("hessians"):
                    if X0 is not None:
                        accumulate_moment(X0, x0, x, n)
                    H, n = accumulate_hessian(H, x, n)
            H, X0 = H[None], (None if X0 is None else X0[None])
        with self._stage("solve"):
            return solve(W[None], H, self.qcfg, overwrite_H=True, block_fn=self.block_fn, cross=X0), n

    # -- attention ------------------------------------------------------------------
    def attention(self) -> None:
        for group in self.plan.attention:
            t0 = time.perf_counter()
            W = torch.cat([self._linear(name).weight.data for name in group])  # the original weights, copied
            rows = [self._linear(name).weight.shape[0] for name in group]
            res, n = self._solve_shared_input(W, self.arch.to_memory(group[0]))
            parts = _split_rows(res, rows)
            seconds = time.perf_counter() - t0
            for name, part, r in zip(group, parts, rows):
                self._set_linear(name, part.W[0])
                self._store([name], part)
                self.result.log.append(_log(self.prefix + name, "attention", part, 0, (r, W.shape[1]), n,
                                            seconds / len(group)))

    # -- MLPs -----------------------------------------------------------------------
    def mlps(self) -> None:
        plan, arch = self.plan, self.arch
        if plan.experts is not None:
            self.experts()
            if plan.shared_expert is not None:
                self.dense(plan.shared_expert, arch.moe_module, "shared_expert")
        if plan.dense_mlp is not None:
            self.dense(plan.dense_mlp, arch.to_memory(plan.dense_mlp.prefix), "dense_mlp")

    @torch.no_grad()
    def route(self, X: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per expert, the indices of the tokens the original router sends it (top-k, as in the
        forward pass) and the router's score for each of them (what its output is multiplied by)."""
        router = self.layer.get_submodule(self.arch.router_module)
        out = router(X)
        top_k_index = out[self.arch.router_indices]   # (T, k)
        top_k_weight = out[self.arch.router_weights]  # (T, k)
        routes = []
        for e in range(self.plan.num_experts):
            hit = top_k_index == e
            rows = hit.any(dim=-1).nonzero().squeeze(-1)
            routes.append((rows, (top_k_weight * hit).sum(-1)[rows]))
        return routes

    def expert_rows(self, x: Tensor, route: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The rows of x (T, C) that make an expert's Hessian, and their weights (see --expert-hessian)."""
        rows, weights = route
        policy = self.qcfg.expert_hessian
        if policy == "all":
            return x, None
        return x[rows], (weights if policy == "weighted" else None)

    def expert_pairs(self, x: Tensor, x0: Tensor, route: tuple[Tensor, Tensor]
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
        """expert_rows of x, the same rows of x0 (x itself unless --fit stream), and their weights."""
        rows, w = self.expert_rows(x, route)
        return rows, (rows if x0 is x else self.expert_rows(x0, route)[0]), w

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
                        dequantized=False, overwrite_W=overwrite_W, fit_tf32=self.tf32)
            if fallback is not None:
                res = _replace(res, fallback, rare)
            del H
            res.W = None
            return res

    def _gathered(self, res: QuantResult) -> QuantResult:
        """This process's experts' result -> every expert's (distributed.gather_result)."""
        with self._stage("solve"):
            return gather_result(res, self.plan.num_experts, self.ranks)

    def experts(self) -> None:
        """All routed experts of the layer (this process's share of them), solved as one batch."""
        qcfg, arch, mlp, ranks = self.qcfg, self.arch, self.plan.experts, self.ranks
        E = self.plan.num_experts
        own = ranks.share(E)
        mine = slice(own.start, own.stop)
        layout = self.plan.fused
        fused = self.layer.get_submodule(layout.module)
        act = fused.act_fn
        gate_up_proj, down_proj = getattr(fused, layout.gate_up), getattr(fused, layout.down)
        _, I2, C = gate_up_proj.shape  # (E, 2I, H), the halves in layout.halves order
        I = I2 // 2
        half = {name: slice(k * I, (k + 1) * I) for k, name in enumerate(layout.halves)}
        dev = gate_up_proj.device
        gptq = qcfg.uses_hessians
        blend = gptq and qcfg.rare_expert != "rtn"
        fit = self.fit_down
        t0 = time.perf_counter()

        # Pass 1: route every token; the gate/up Hessians of this process's experts, and the
        # all-token Hessian that rare experts blend in.
        counts = [0] * E
        H_gu = torch.zeros(len(own), C, C, device=dev) if gptq else None
        X0_gu = torch.zeros_like(H_gu) if self.fit_stream else None  # cross moments, see gptq_quantize
        n_gu = [0] * len(own)
        H_all = torch.zeros(C, C, device=dev) if blend else None
        n_all = 0
        for x, x0 in self._captured_pairs(arch.moe_module, keep=True):
            with self._stage("hessians"):
                routes = self.route(x)
                counts = [c + int(t.numel()) for c, (t, _) in zip(counts, routes)]
                if gptq:
                    for j, e in enumerate(own):
                        rows, rows0, w = self.expert_pairs(x, x0, routes[e])
                        if X0_gu is not None:
                            accumulate_moment(X0_gu[j], rows0, rows, n_gu[j], w)
                        _, n_gu[j] = accumulate_hessian(H_gu[j], rows, n_gu[j], w)
                if blend:
                    _, n_all = accumulate_hessian(H_all, x, n_all)
        self.result.expert_tokens = counts
        threshold = self.rare_threshold(C, I)
        rare = [j for j, e in enumerate(own) if counts[e] < threshold]
        fallback = {e: self._fallback_note(counts[e], threshold) for e in range(E) if counts[e] < threshold}
        if blend:
            for j in rare:
                H_gu[j] = _blend(H_gu[j], H_all, counts[own[j]], threshold, qcfg.rare_expert)
                if X0_gu is not None:  # a blended Hessian has no matching moment: plain GPTQ (P = W H)
                    X0_gu[j] = H_gu[j]
        del H_all

        # Pass 2 runs the quantized gate/up (true-sequential) and, for the fit or without true-sequential,
        # the original ones. Where the originals are kept elsewhere (the full-precision copy of --fit
        # stream/layer) or not needed, the layer's gate/up become GPTQ's working copy and then hold the
        # quantized weights; otherwise the layer keeps its originals until the down Hessians are built
        # and the quantized ones are rebuilt from the levels per batch (--fit mlp: no second fp32 copy).
        original_gu = None if self.original_experts is None else self.original_experts[0]
        quantized_in = original_gu is not None or (qcfg.true_sequential and not fit)
        res_gu = self._gathered(self._solve_local(gate_up_proj.data[mine], H_gu, rare, cross=X0_gu,
                                                  overwrite_W=quantized_in))
        del H_gu, X0_gu
        if quantized_in:
            for e in range(E):
                gate_up_proj.data[e].copy_(_dequantized(res_gu, e))
        else:
            original_gu = gate_up_proj.data

        t1 = time.perf_counter()
        log_gu = {}
        for name_of, part in zip(layout.halves, _split_rows(res_gu, [I, I])):
            for e in range(E):
                self._store([mlp.linear(name_of, e)], _select(part, e))
                log_gu[name_of, e] = _log(self.prefix + mlp.linear(name_of, e), "expert", part, e, (I, C), counts[e],
                                          (t1 - t0) / E / 2, fallback.get(e))
        del part
        if quantized_in:
            del res_gu  # packed; what follows needs room for the down statistics

        # Pass 2: the down Hessians, from the outputs of the (quantized) gate/up of the routed tokens,
        # built and solved a group of experts at a time (DOWN_STATS_BYTES).
        if gptq and self.original_experts is not None:
            # The original down weights are in the full-precision copy: the layer's fp32 ones are freed
            # until the quantized ones go in, and each group's solve works in an fp32 copy of its own.
            Wd = self.original_experts[1][mine]
            down_proj.data = down_proj.data.new_empty(0)
        else:
            Wd = down_proj.data[mine]  # still the original; each group's becomes its solve's working copy
        if gptq:
            per = max(1, DOWN_STATS_BYTES // ((I * I + (C * I if fit else 0)) * 4))
            parts = []
            for start in range(0, max(len(own), 1), per):
                group = range(start, min(start + per, len(own)))
                H_d, P_d = self._down_statistics(group, own, Wd, original_gu, None if quantized_in else res_gu,
                                                 counts, threshold, rare, act, half)
                # A copy even where Wd is fp32 already: Wd may be the full-precision stream's originals.
                W_group = Wd[group.start:group.stop].to(torch.float32, copy=True)
                parts.append(self._solve_local(W_group, H_d, [j - start for j in rare if j in group], P_d,
                                               overwrite_W=True))
                del W_group
                del H_d, P_d
            res_d = _concat(parts)
            del parts
        else:
            res_d = self._solve_local(Wd, None, rare)
        res_d = self._gathered(res_d)
        if not quantized_in:
            for e in range(E):
                gate_up_proj.data[e].copy_(_dequantized(res_gu, e))
            del res_gu
        del original_gu, Wd
        if down_proj.data.numel() == 0:
            down_proj.data = torch.empty(E, C, I, device=dev, dtype=gate_up_proj.dtype)
        for e in range(E):
            down_proj.data[e].copy_(_dequantized(res_d, e))
        t2 = time.perf_counter()
        for e in range(E):
            self._store([mlp.linear("down", e)], _select(res_d, e))

        for e in range(E):
            self.result.log += [log_gu["gate", e], log_gu["up", e],
                                _log(self.prefix + mlp.linear("down", e), "expert", res_d, e, (C, I), counts[e],
                                     (t2 - t1) / E, fallback.get(e))]

    def _down_statistics(self, group: range, own: range, Wd: Tensor, original_gu: Tensor,
                         res_gu: QuantResult | None, counts: list[int], threshold: int, rare: list[int], act,
                         half: dict[str, slice]) -> tuple[Tensor, Tensor | None]:
        """Pass 2 for the experts at positions ``group`` of this process's share ``own``: their down
        Hessians (and, for the fit, the moments P of the original MLP's outputs), from the routed
        tokens run through the quantized gate/up (in the layer, or rebuilt from ``res_gu``'s levels).
        ``original_gu`` (E, 2I, C) holds the original gate/up and ``Wd`` the original down of ``own``,
        both in any float dtype."""
        qcfg, fit = self.qcfg, self.fit_down
        gate_up_proj = getattr(self.layer.get_submodule(self.plan.fused.module), self.plan.fused.gate_up)
        C, I = Wd.shape[1], Wd.shape[2]
        dev = Wd.device
        H_d = torch.zeros(len(group), I, I, device=dev)
        P_d = torch.zeros(len(group), C, I, device=dev) if fit else None
        n_d = [0] * len(group)
        H_all_d = {k: torch.zeros(I, I, device=dev) for k, j in enumerate(group) if j in rare} \
            if qcfg.rare_expert != "rtn" else {}
        n_all_d = dict.fromkeys(H_all_d, 0)
        for x, x0 in self._captured_pairs(self.arch.moe_module, keep=True):
            with self._stage("hessians"):
                routes = self.route(x)
                for k, j in enumerate(group):
                    e = own[j]
                    rows, rows0, w = self.expert_pairs(x, x0, routes[e])
                    W_gu = original_gu[e].float() if fit or not qcfg.true_sequential else None  # (2I, C)
                    if not qcfg.true_sequential:
                        src = W_gu
                    else:  # the quantized gate/up, in the layer or rebuilt from the levels
                        src = gate_up_proj.data[e] if res_gu is None else _dequantized(res_gu, e)
                    Wg, Wu = src[half["gate"]], src[half["up"]]
                    original = (W_gu[half["gate"]], W_gu[half["up"]], Wd[j].float()) if fit else None
                    n_d[k] = fold_down(H_d[k], None if P_d is None else P_d[k], n_d[k], rows, w, Wg, Wu,
                                       act, original, rows0)
                    if k in H_all_d:
                        for h in mlp_hidden(x, Wg, Wu, act):
                            _, n_all_d[k] = accumulate_hessian(H_all_d[k], h, n_all_d[k])
        for k, H_all_k in H_all_d.items():
            j = group[k]
            H_d[k] = _blend(H_d[k], H_all_k, counts[own[j]], threshold, qcfg.rare_expert)
            if P_d is not None:  # a rare expert's blended Hessian has no matching moment: plain GPTQ
                P_d[k] = Wd[j].float() @ H_d[k]
        return H_d, P_d

    def dense(self, mlp: MLP, module_path: str, kind: str) -> None:
        """A gated MLP fed every token entering ``module_path``: a shared expert or a dense layer's MLP."""
        qcfg = self.qcfg
        module = self.layer.get_submodule(self.arch.to_memory(mlp.prefix))
        names = [mlp.linear(w) for w in ("gate", "up", "down")]
        Wg, Wu, Wd = (self._linear(n).weight.data.clone() for n in names)  # originals, kept
        I = Wg.shape[0]
        gptq = qcfg.uses_hessians
        t0 = time.perf_counter()
        res_gu, n = self._solve_shared_input(torch.cat([Wg, Wu]), module_path, keep=True)
        gq, uq = _split_rows(res_gu, [I, I])
        self._set_linear(names[0], gq.W[0])
        self._set_linear(names[1], uq.W[0])
        t1 = time.perf_counter()
        src_g, src_u = (gq.W[0], uq.W[0]) if qcfg.true_sequential else (Wg, Wu)
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
        with self._stage("solve"):
            res_d = solve(Wd[None], H_d, qcfg, overwrite_H=True, block_fn=self.block_fn, target=P_d)
        self._set_linear(names[2], res_d.W[0])
        t2 = time.perf_counter()
        for name, part, W, secs in ((names[0], gq, Wg, (t1 - t0) / 2), (names[1], uq, Wu, (t1 - t0) / 2),
                                    (names[2], res_d, Wd, t2 - t1)):
            self._store([name], part)
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
        full-precision stream): the next layer's inputs, written over this layer's, batch by batch."""
        self._kept.clear()
        with self._stage("forward"):
            forward = self.stream.run_tail if self.residual else partial(self.stream.run_layer, in_place=True)
            self.result.outputs = forward(self.layer, self.batches, self.ranks)
            if self.original is not None and self.qcfg.fit == "stream":
                self._restore_original()
                self.result.original_outputs = forward(self.layer, self.original_batches, self.ranks)
        self.original = self.original_experts = None

    def run(self) -> LayerResult:
        self.attention()
        self.mlps()
        if self.stream.device.type == "cuda":  # the packed tensors' copies to the host are queued, not done
            self.result.packed = torch.cuda.Event()
            self.result.packed.record()
        self.outputs()
        self.stream.release_layer(self.index)
        self.result.timings = self.clock.rounded()
        self.result.peak_gpu_mb = dict(self.clock.peak_gpu_mb)
        return self.result


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


def _select(res: QuantResult, b: int) -> QuantResult:
    return QuantResult(q=res.q[b:b + 1], scales=res.scales[b:b + 1], zeros=res.zeros[b:b + 1], g_idx=res.g_idx,
                       W=None if res.W is None else res.W[b:b + 1], loss=res.loss[b:b + 1], damp=res.damp[b:b + 1])


def _replace(res: QuantResult, sub: QuantResult, idx: list[int]) -> QuantResult:
    """res with the matrices at batch positions idx replaced by sub's (W only where res has it)."""
    for field_name in ("q", "scales", "zeros", "W", "loss", "damp"):
        if getattr(res, field_name) is not None:
            getattr(res, field_name)[idx] = getattr(sub, field_name)
    return res


def _concat(parts: list[QuantResult]) -> QuantResult:
    """Results over consecutive groups of matrices (without W) as one result."""
    if len(parts) == 1:
        return parts[0]
    return QuantResult(**{name: torch.cat([getattr(r, name) for r in parts])
                          for name in ("q", "scales", "zeros", "loss", "damp")}, g_idx=parts[0].g_idx, W=None)


def _dequantized(res: QuantResult, b: int) -> Tensor:
    """Matrix b's dequantized weights, rebuilt from its levels."""
    return dequantize(res.q[b], res.scales[b], res.zeros[b], res.g_idx)
