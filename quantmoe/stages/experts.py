"""A layer's routed experts while they are quantized: held compactly, routed once per batch, and
worked on a group at a time within a memory budget.

- ``StoredExperts`` stands in for transformers' fused experts module during quantization. It keeps
  the original weights as the checkpoint stores them (bf16 for most releases: half of fp32; an FP8
  release's as FP8 codes and scales, half of that, dequantized an expert at a time) and,
  once quantized, GPTQ's integer levels (one byte a weight) instead of fp32 copies of either; each
  forward pass rebuilds one expert's fp32 weights at a time. Its forward is transformers' own eager
  loop over the experts (the same for every family), on the same fp32 values the fused fp32
  tensors would hold, so the outputs are bit for bit those of the fused module; under --tf32 on CUDA,
  for wide experts (``half_forward``), its products take fp16 operands instead (gptq.core.half_rows), and
  a resumed run replays a finished layer's experts through it too (resume.run_stored). Under torchrun it
  holds only this process's share of the experts, and its forward is a collective (``slot_sum``).
- ``routes`` sorts a batch's (token, expert) pairs by expert once, instead of comparing every
  expert with the router's choices: one host synchronisation per batch rather than one per expert, and
  the pairs stay one tensor (``Routes``) from which a group of consecutive experts takes one slice.
- ``RoutedRows`` holds the rows routed to a group of experts, gathered once from every batch, so each
  expert's statistics are a few large products over all its rows instead of one small one per batch.
- ``ExpertCosts`` and ``expert_groups`` size the groups of experts whose Hessians, cross moments, routed
  rows and working copies are resident at once (``--gpu-memory``).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.activations import SiLUActivation

from ..base.errors import QuantMoeError
from ..base.measure import Stopwatch
from ..formats.fp8 import Fp8Experts
from ..gptq.core import (
    OUTER_BLOCK,
    OUTER_MIN,
    QuantResult,
    dequantize_grouped,
    half_rows,
)
from ..gptq.triton_kernels import (
    add_scaled_rows,
    dequantize_levels,
    silu_mul_half_rows,
    silu_mul_rows,
)
from ..model.distributed import SINGLE, Ranks, all_reduce_sum, spread
from ..model.stream import Batch, LayerStream

# An expert's forward products (StoredExperts.run_deferred) take at most this many bytes of temporaries: its
# rows are cut into blocks of a size set by the shapes alone.
PRODUCT_BYTES = 1 << 30
# The MLP tail of a layer with routed experts (tail_by_expert) runs each expert once over the rows of
# several batches: TAIL_PRODUCT_BYTES of them, counted TAIL_COPIES times (the MLP's input, the experts'
# input end to end and their outputs, the rest of the MLP's, the sum, the outputs gathered), a number of
# batches set by the shapes alone, so the products' rounding is the same under any budget. As many of those
# as the budget leaves room for make a chunk, for which each expert's weights are rebuilt once.
TAIL_PRODUCT_BYTES = 4 << 30
TAIL_COPIES = 6
# Under --tf32 the routed experts' forward products, and their down statistics (layer._down_statistics), take
# fp16 operands (StoredExperts.half) where an expert's products over the rows routed to it from TAIL_PRODUCT_BYTES
# of batches come to at least this many flops (``half_forward``): the scaling of the operands adds a dozen small
# operations per expert and product, which cost more than fp16's rate saves where many narrow experts each get
# few rows (benchmarks/README.md).
HALF_FORWARD_FLOPS = 1e12


def half_forward(num_experts: int, top_k: int, width: int, hidden: int) -> bool:
    """Whether a layer's routed experts (``num_experts`` of ``width``, ``top_k`` per token, on ``hidden`` features)
    run their forward products on fp16 operands under --tf32: from the shapes alone, so that a resumed run's
    replay (resume.run_stored) decides as the run that finished the layer did."""
    tokens = TAIL_PRODUCT_BYTES // (TAIL_COPIES * hidden * 4)
    return tokens * top_k / num_experts * 6 * width * hidden >= HALF_FORWARD_FLOPS


class Levels:
    """GPTQ's results for n matrices (R, C), filled a group at a time, kept compactly: 4-bit levels two to
    a byte (an even C), 8-bit ones a byte each; grids as GPTQ gives them. No dequantized W."""

    def __init__(self, n: int, rows: int, columns: int, groups: int, bits: int, device: torch.device):
        self.columns, self.bits = columns, bits
        self.packed = bits == 4 and columns % 2 == 0
        self.q = torch.empty(n, rows, columns // 2 if self.packed else columns, dtype=torch.uint8, device=device)
        self.scales = torch.empty(n, rows, groups, dtype=torch.float16, device=device)
        self.zeros = torch.empty(n, rows, groups, dtype=torch.uint8, device=device)
        self.loss = torch.empty(n, rows, device=device)
        self.damp = torch.empty(n, device=device)
        self.g_idx: Tensor | None = None

    def put(self, start: int, res: QuantResult) -> None:
        """Matrices start.. of a group's result (whose W is not needed)."""
        stop = start + res.q.shape[0]
        self.q[start:stop] = (res.q[..., 0::2] | (res.q[..., 1::2] << 4)) if self.packed else res.q
        for name in ("scales", "zeros", "loss", "damp"):
            getattr(self, name)[start:stop] = getattr(res, name)
        self.g_idx = res.g_idx

    def levels(self, b: int | slice) -> Tensor:
        """Matrix b's levels (R, C) (or a slice's, (n, R, C)), uint8."""
        q = self.q[b]
        return torch.stack((q & 15, q >> 4), dim=-1).reshape(*q.shape[:-1], self.columns) if self.packed else q

    def result(self, b: int | slice) -> QuantResult:
        """Matrix b (or a slice of them) as a QuantResult (levels unpacked)."""
        s = b if isinstance(b, slice) else slice(b, b + 1)
        return QuantResult(q=self.levels(s), scales=self.scales[s], zeros=self.zeros[s], g_idx=self.g_idx, W=None,
                           loss=self.loss[s], damp=self.damp[s])

    def weight(self, b: int) -> Tensor:
        """Matrix b's fp32 weights, scale * (level - zero): what the dequantized export holds (on CUDA in one
        kernel from the packed levels, with the same bits)."""
        fused = dequantize_levels(self.q[b], self.scales[b], self.zeros[b], self.columns, self.packed)
        return fused if fused is not None else dequantize_grouped(self.levels(b), self.scales[b], self.zeros[b])

    FIELDS = ("q", "scales", "zeros", "loss", "damp")

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in self.FIELDS)

    def fields(self, b: int) -> list[Tensor]:
        """Matrix b's tensors as held (``FIELDS``), for sending it to another process."""
        return [getattr(self, name)[b] for name in self.FIELDS]

    def one(self, tensors: list[Tensor]) -> Levels:
        """A Levels of the one matrix whose ``fields`` are ``tensors``, with this one's settings."""
        out = copy.copy(self)
        for name, t in zip(self.FIELDS, tensors):
            setattr(out, name, t[None])
        return out


class StoredExperts(nn.Module):
    """Routed experts (E of them) computing with weights rebuilt one expert at a time.

    ``gate_up`` (E, 2I, C) and ``down`` (E, C, I): the original weights in the dtype they were
    stored in, or an FP8 release's as stored (``Fp8Experts``: every use dequantizes them to the
    BF16 numbers the stream's load would have made). ``quantized``: (gate_up, down) Levels over
    the experts held once they are solved; ``use_quantized`` chooses which weights the forward pass
    runs with.

    Under several processes (``ranks``) it keeps only this process's share ``own`` of the experts
    (``Ranks.share``), experts are still named by their number in the layer, and the forward pass is a
    collective: every process must run it on the same calls (``run_deferred``). The tensors given hold
    either every expert (copied from: they can be freed) or, with ``num_experts`` (the layer's), only
    this process's share, in order (LayerStream.load_layer's ``experts``), which are kept as they are.
    """

    def __init__(self, gate_up: Tensor | Fp8Experts, down: Tensor | Fp8Experts, act_fn, ranks: Ranks = SINGLE,
                 num_experts: int | None = None, top_k: int | None = None):
        super().__init__()
        self.num_experts = gate_up.shape[0] if num_experts is None else num_experts
        # fp16 forward products under --tf32 (half_forward; ``top_k``: experts per token, None: never)
        self.half = top_k is not None and half_forward(self.num_experts, top_k, down.shape[-1], gate_up.shape[-1])
        self.ranks, self.own = ranks, ranks.share(self.num_experts)
        if num_experts is not None:
            if gate_up.shape[0] != len(self.own) or down.shape[0] != len(self.own):
                raise ValueError(f"experts {self.own.start}..{self.own.stop - 1} of {num_experts} are this process's "
                                 f"share; {gate_up.shape[0]} were given")
        elif ranks.world > 1:
            gate_up, down = (_share(w, self.own) for w in (gate_up, down))
        self.gate_up, self.down, self.act_fn = gate_up, down, act_fn
        self.silu = is_silu(act_fn)  # triton_kernels.silu_mul_half_rows applies
        self.quantized: tuple[Levels, Levels] | None = None
        self.use_quantized = False
        self.deferred: list[tuple[Tensor, Tensor, Tensor]] | None = None  # see forward

    @classmethod
    def of_levels(cls, gate_up: Levels, down: Levels, act_fn, top_k: int | None = None, ranks: Ranks = SINGLE,
                  num_experts: int | None = None) -> StoredExperts:
        """Experts that compute with their quantized levels alone (a resumed run's replay of a finished layer,
        resume.replay_layer): no original weights are held, only their shapes (on the meta device). Under
        several processes the levels are this process's share's (``num_experts``: the layer's, as in __init__)."""
        n, rows, _ = gate_up.scales.shape
        store = cls(torch.empty(n, rows, gate_up.columns, device="meta"),
                    torch.empty(n, down.scales.shape[1], down.columns, device="meta"), act_fn, ranks, num_experts,
                    top_k)
        store.quantized, store.use_quantized = (gate_up, down), True
        return store

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, I, C): experts (of the layer, not only those held), expert width, hidden size."""
        _, I2, C = self.gate_up.shape
        return self.num_experts, I2 // 2, C

    @property
    def weight_bytes(self) -> int:
        """Bytes of one expert's weights as rebuilt for use (fp32 gate, up and down, and their fp16 copies under
        --tf32 where ``half``: ``run_deferred``)."""
        _, I, C = self.shape
        return 3 * I * C * (6 if self.half else 4)

    @property
    def nbytes(self) -> int:
        """Bytes the original weights take, as held (none for ``of_levels``' experts)."""
        return sum(w.nbytes if isinstance(w, Fp8Experts) else 0 if w.is_meta else w.numel() * w.element_size()
                   for w in (self.gate_up, self.down))

    @property
    def held_bytes(self) -> int:
        """Bytes of the experts' original weights and quantized levels this process holds."""
        return self.nbytes + (sum(q.nbytes for q in self.quantized) if self.quantized is not None else 0)

    def local(self, e: int) -> int:
        """Expert e's position among those held; an expert another process holds is an error."""
        if e not in self.own:
            raise IndexError(f"expert {e} is held by another process (process {self.ranks.rank} of "
                             f"{self.ranks.world} holds experts {self.own.start}..{self.own.stop - 1})")
        return e - self.own.start

    def original(self, which: str, e: int) -> Tensor:
        """Expert e's original ``which`` ("gate_up" (2I, C) or "down" (C, I)) weights in fp32."""
        w, j = getattr(self, which), self.local(e)
        return w.weights(j, j + 1, torch.float32)[0] if isinstance(w, Fp8Experts) else w[j].float()

    def originals(self, which: str, start: int, stop: int) -> Tensor:
        """Experts start..stop-1's original ``which`` weights as a new fp32 tensor (GPTQ's working copy)."""
        w, a, b = getattr(self, which), self.local(start), self.local(stop - 1) + 1
        if isinstance(w, Fp8Experts):
            return w.weights(a, b, torch.float32)
        return w[a:b].to(torch.float32, copy=True)

    def weights(self, e: int, quantized: bool) -> tuple[Tensor, Tensor]:
        """Expert e's fp32 (gate_up (2I, C), down (C, I)): the quantized ones, or the originals."""
        if quantized:
            gu, d = self.quantized
            j = self.local(e)
            return gu.weight(j), d.weight(j)
        return self.original("gate_up", e), self.original("down", e)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """transformers' eager experts loop (MixtralExperts.forward and its copies), weights rebuilt per
        expert: the same computations on the same rows in the same order, the (slot, token) pairs sorted
        by expert once (one host synchronisation per batch instead of several per expert).

        While ``deferred`` is a list, the call is only recorded there and zeros are returned: ``run_deferred``
        computes the recorded calls later, expert by expert (see layer.tail_by_expert)."""
        if self.deferred is not None:
            self.deferred.append((hidden_states, top_k_index, top_k_weights))
            return torch.zeros_like(hidden_states)
        return self.run_deferred([(hidden_states, top_k_index, top_k_weights)])[0]

    def run_deferred(self, calls: list[tuple[Tensor, Tensor, Tensor]], per_product: int | None = None,
                     product_bytes: int = PRODUCT_BYTES) -> list[Tensor]:
        """The outputs of ``forward`` for the (hidden_states, top_k_index, top_k_weights) ``calls``, expert by
        expert: each expert's weights are rebuilt once for all the calls. The calls are taken ``per_product``
        at a time (all by default), their tokens end to end, and an expert's products are made over all its
        rows in them, at most ``product_bytes`` of temporaries at a time. Each row sees the computations
        ``forward`` makes for it; a product over more rows may round differently, so the bits depend on
        ``per_product`` and ``product_bytes`` (the caller fixes them by the shapes), and on nothing else.

        Under several processes each runs only the experts it holds, over the same rows in the same
        products, and puts each row's result in its (token, choice) slot; the slots are all-reduced and
        added per token in ascending expert order (``slot_sum``): the same bits. Every process must call
        it with the same calls."""
        if not calls:
            return []
        quantized = self.use_quantized and self.quantized is not None
        E, I, C = self.shape
        rows = max(1, product_bytes // ((3 * I + C) * 4))  # gate and up, their product, the output
        per_product = per_product or len(calls)
        parts = []
        for i in range(0, len(calls), per_product):
            part = calls[i:i + per_product]
            index = torch.cat([t for _, t, _ in part])
            slots, tokens, starts = _by_expert(index, E)
            # the router's weight of every (slot, token) pair in that order, gathered once for all the experts
            scores = torch.cat([w for _, _, w in part])[tokens, slots]
            parts.append((torch.cat([h for h, _, _ in part]), index, scores, (slots, tokens, starts),
                          [h.shape[0] for h, _, _ in part]))
        single = self.ranks.world == 1
        # one process: the outputs (T, C); several: the slots (T, k, C) of the experts held
        outs = [torch.zeros_like(hidden) if single else hidden.new_zeros(index.shape + hidden.shape[-1:])
                for hidden, index, *_ in parts]
        # each part's inputs once, as fp16 (``half``, under --tf32 on CUDA; else None: fp32)
        halves = [half_rows(hidden) if self.half else None for hidden, *_ in parts]
        for expert_idx in self.own:
            weights = None
            for (hidden, _, scores, (slots, tokens, starts), _), half, out in zip(parts, halves, outs):
                for a in range(starts[expert_idx], starts[expert_idx + 1], rows):
                    b = min(a + rows, starts[expert_idx + 1])
                    if weights is None:
                        weights = self.weights(expert_idx, quantized)
                        weights = weights if half is None else tuple(_HalfMatrix(w) for w in weights)
                    gate_up, down = weights
                    top_k_pos, token_idx = slots[a:b], tokens[a:b]
                    if half is None:  # transformers' own computation (on CUDA its elementwise steps fused, same bits)
                        current_state = hidden[token_idx]
                        y = nn.functional.linear(current_state, gate_up)
                        act = silu_mul_rows(y) if self.silu else None
                        if act is None:
                            gate, up = y.chunk(2, dim=-1)
                            act = self.act_fn(gate) * up
                        current_hidden_states = nn.functional.linear(act, down)
                        if single and add_scaled_rows(out, token_idx, current_hidden_states, scores[a:b]):
                            continue  # out.index_add_ of the rows times their router weights, in one kernel
                        current_hidden_states = current_hidden_states * scores[a:b, None]
                    else:  # the same on fp16 operands, each row's and matrix's power of two undone on its results
                        x, x_inv = half
                        y, rows_factor = gate_up.product(x[token_idx], x_inv[token_idx])
                        # silu(gate) * up as the down product's operand: one kernel where it applies, same bits
                        act = silu_mul_half_rows(y, rows_factor) if self.silu else None
                        if act is None:
                            gate, up = y.mul_(rows_factor[:, None]).chunk(2, dim=-1)
                            act = half_rows(self.act_fn(gate) * up)
                        current_hidden_states = down.linear(*act, scores[a:b])
                    if single:
                        out.index_add_(0, token_idx, current_hidden_states.to(out.dtype))
                    else:
                        out[token_idx, top_k_pos] = current_hidden_states.to(out.dtype)
        if not single:
            outs = [slot_sum(all_reduce_sum(slots), index) for slots, (_, index, *_) in zip(outs, parts)]
        return [o for out, (*_, sizes) in zip(outs, parts) for o in out.split(sizes)]


def layer_by_batch(stream: LayerStream, layer: nn.Module, batches: list[Batch], ranks: Ranks) -> list[Batch]:
    """``stream.run_layer`` in place, under several processes (``ranks``), for a layer with routed experts (a
    StoredExperts) and no MLP tail (GraniteMoE): every process runs the whole layer over every batch, its routed
    experts only (a collective), each batch's hidden state sent by the process that holds it
    (stream.hidden_states), which keeps the output."""
    for b, h in zip(batches, stream.hidden_states(batches, ranks)):
        b.hidden.copy_(first_output(layer(h, **b.kwargs)).view_as(b.hidden))
    return batches


@torch.no_grad()
def tail_by_expert(stream: LayerStream, layer: nn.Module, module: str, batches: list[Batch], ranks: Ranks,
                   gpu_memory: int | None = None, clock: Stopwatch | None = None) -> list[Batch]:
    """``stream.run_tail`` for a layer whose routed experts are a StoredExperts (at ``module``), for batches that
    hold the residual after attention, a chunk of batches at a time: the MLP runs for each batch with its routed
    experts only recorded (StoredExperts.deferred), then the experts run for every recorded call, expert by
    expert, each expert's weights rebuilt once per chunk, its products made over the rows of a fixed number of
    batches (TAIL_PRODUCT_BYTES). The MLP's output is then experts + the rest, as the MLP adds them: run_tail's
    computations, the products' rounding apart. Chunks are as many of those numbers of batches as ``gpu_memory``
    leaves room for (all without one). Under several processes (``ranks``) every process runs every chunk, its
    experts only, each product's results in slots of k copies of the hidden states (StoredExperts.run_deferred),
    the chunk's hidden states sent by the processes that hold them (stream.hidden_states): a chunk then holds at
    most about as many batches as a process does (or one product's), whatever the budget. ``clock`` times the
    experts and the rest of the MLP (``forward:experts``, ``forward:rest``)."""
    store: StoredExperts = layer.get_submodule(module)
    norm, mlp = (layer.get_submodule(path) for path in stream.arch.mlp_tail)
    timed = clock or (lambda _name: contextlib.nullcontext())
    hidden = batches[0].hidden.numel() * batches[0].hidden.element_size() if batches else 1
    one = TAIL_COPIES * hidden
    per_product = max(1, TAIL_PRODUCT_BYTES // one)
    one += hidden // 2 if store.half else 0  # the experts' input as fp16 (run_deferred, --tf32): in the chunk only
    world = ranks.world
    if world > 1:  # the slots: k copies of the hidden states, and the hidden states sent; in the chunk, not the product
        one += ((stream.experts_per_token or store.num_experts) + 1) * hidden

    def compute(span: range) -> Tensor:
        chunk = batches[span.start:span.stop]
        if world > 1:
            chunk = [Batch(h, b.kwargs) for b, h in zip(chunk, stream.hidden_states(chunk, ranks, span.start))]
        store.deferred = []
        try:
            with timed("forward:rest"):
                rest = [first_output(mlp(norm(b.hidden))) for b in chunk]
            calls = store.deferred
        finally:
            store.deferred = None
        with timed("forward:experts"):
            experts = store.run_deferred(calls, per_product)
        return torch.cat([(b.hidden + (e.view_as(r) + r)).reshape(-1) for b, r, e in zip(chunk, rest, experts)])

    per = max(1, len(batches))
    if gpu_memory is not None:
        in_use = torch.cuda.memory_allocated(stream.device) if stream.device.type == "cuda" else 0
        room = gpu_memory - in_use - PRODUCT_BYTES - store.weight_bytes
        per = max(1, room // (per_product * one)) * per_product
    if world > 1:  # products of whole batches: the chunk stays a multiple of them, so the bits do not change
        per = min(per, max(1, -(-len(batches) // world) // per_product) * per_product)
    spans = [range(i, min(i + per, len(batches))) for i in range(0, len(batches), per)]
    for span, flat in zip(spans, spread(spans, compute, SINGLE, stream.device)):
        start = 0
        for b in batches[span.start:span.stop]:
            b.hidden.copy_(flat[start:start + b.hidden.numel()].view_as(b.hidden))
            start += b.hidden.numel()
    return batches


def first_output(out: Tensor | tuple) -> Tensor:
    """A module's output, or the first of its outputs (an MoE block that also returns its router's logits)."""
    return out[0] if isinstance(out, tuple) else out


def is_silu(act) -> bool:
    """Whether an MLP's activation module is SiLU, which gptq.triton_kernels' silu kernels compute."""
    return isinstance(act, (nn.SiLU, SiLUActivation))


class _HalfMatrix:
    """An expert's fp32 weights W (R, C) as a product's fp16 operand under ``half_products`` (``half_rows`` of the
    whole matrix: one power of two), for ``linear``."""

    def __init__(self, W: Tensor):
        h, inv = half_rows(W.reshape(1, -1))
        self.t, self.inv = h.view_as(W), inv

    def product(self, x: Tensor, x_inv: Tensor) -> tuple[Tensor, Tensor]:
        """``linear`` before its last pass: the fp16 product with fp32 results and each row's power of two (n,)
        that undoes the operands' scales."""
        y = torch.mm(x, self.t.t(), out_dtype=torch.float32) if x.is_cuda else x @ self.t.t()
        return y, x_inv * self.inv

    def linear(self, x: Tensor, x_inv: Tensor, factor: Tensor | None = None) -> Tensor:
        """``nn.functional.linear(x / x_inv, W)`` (times ``factor`` (n,), each row's) for x (n, C), ``half_rows``'
        fp16 rows (each row times 1 / x_inv): one fp16 product with fp32 results, the powers of two then undone
        (exactly) in the one pass that multiplies each row by its factor."""
        y, rows = self.product(x, x_inv)
        return y.mul_((rows if factor is None else factor * rows)[:, None])


def slot_sum(slots: Tensor, top_k_index: Tensor) -> Tensor:
    """slots (T, k, C), each token's experts' outputs at its router's choices ``top_k_index`` (T, k) ->
    their sum per token (T, C), added from zeros in ascending expert order: the additions, in the order,
    that ``run_deferred``'s ``index_add_`` makes per expert on one process, so the same bits. (An
    unrouted choice, index E, has a zero slot and comes last; adding +0 changes nothing, as a sum
    started from +0 is never -0.)"""
    T, k, C = slots.shape
    order = torch.sort(top_k_index, dim=1, stable=True).indices  # (T, k)
    out = slots.new_zeros(T, C)
    for j in range(k):
        out += slots.gather(1, order[:, j, None, None].expand(T, 1, C))[:, 0]
    return out


def _share(w: Tensor | Fp8Experts, own: range) -> Tensor | Fp8Experts:
    """The experts ``own`` of w, in storage of their own (the rest can be freed)."""
    if isinstance(w, Fp8Experts):
        return w.share(own.start, own.stop)
    return w[own.start:own.stop].clone()


def _by_expert(top_k_index: Tensor, num_experts: int) -> tuple[Tensor, Tensor, list[int]]:
    """A batch's (slot, token) pairs sorted by expert, in the order torch.where over an expert's
    (slot, token) mask lists them (slot-major, tokens ascending), and where each expert's start
    (num_experts + 1 offsets; an index of num_experts, transformers' slot for "routed nowhere", is last)."""
    T = top_k_index.shape[0]
    with torch.no_grad():
        flat = top_k_index.t().reshape(-1)
        order = torch.sort(flat, stable=True).indices
        counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts].tolist()
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    return order // T, order % T, starts


class Routes:
    """One batch's routing: its (token, expert) pairs sorted by expert, each expert's tokens ascending, with the
    router's score of each pair; expert e's pairs are ``tokens[starts[e]:starts[e + 1]]``, ``counts[e]`` of them
    (both on the host). Kept whole rather than cut into one tensor per expert: a layer of 256 experts would make
    512 slices a batch, and a group of consecutive experts takes its pairs as one slice (``pairs``)."""

    def __init__(self, tokens: Tensor, weights: Tensor, counts: list[int]):
        self.tokens, self.weights, self.counts = tokens, weights, counts
        self.starts = [0, *itertools.accumulate(counts)]

    def __getitem__(self, e: int) -> tuple[Tensor, Tensor]:
        """Expert e's tokens and scores."""
        a, b = self.starts[e], self.starts[e + 1]
        return self.tokens[a:b], self.weights[a:b]

    def pairs(self, experts: list[int]) -> tuple[Tensor, Tensor]:
        """The tokens and scores of ``experts``, expert after expert: one slice where they are consecutive."""
        if experts == list(range(experts[0], experts[0] + len(experts))):
            a, b = self.starts[experts[0]], self.starts[experts[-1] + 1]
            return self.tokens[a:b], self.weights[a:b]
        picks = [self[e] for e in experts]
        return torch.cat([t for t, _ in picks]), torch.cat([w for _, w in picks])

    def first(self, e: int, n: int) -> Routes:
        """The same routing with only expert e's first ``n`` pairs kept (tests starve an expert with it)."""
        a, b = self.starts[e], self.starts[e + 1]
        n = min(n, b - a)
        keep = torch.cat([torch.arange(a + n), torch.arange(b, self.starts[-1])]).to(self.tokens.device)
        return Routes(self.tokens[keep], self.weights[keep], self.counts[:e] + [n] + self.counts[e + 1:])


def routes(top_k_index: Tensor, top_k_weight: Tensor, num_experts: int) -> Routes:
    """Per expert, the tokens the router sends it, ascending, and the router's score for each.

    ``top_k_index``/``top_k_weight`` (T, k). The pairs are sorted by expert once (stable, so each
    expert's tokens stay in order) and cut at the counts, read back in one synchronisation. An index
    of ``num_experts`` (transformers' slot for a token routed nowhere) is dropped.
    """
    T, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts].tolist()
    order = order[:sum(counts)]  # the pairs routed nowhere sort last
    return Routes(order // k, top_k_weight.reshape(-1)[order], counts)


@dataclass
class RoutedRows:
    """The calibration rows routed to a group of experts, gathered from every batch into one buffer,
    expert by expert (each expert's rows in batch order, its tokens ascending within a batch): expert k
    of the group holds rows ``spans[k]``. ``x0``: the same tokens in the full-precision stream (None:
    ``x`` itself); ``w``: the router's scores (None: unweighted)."""

    x: Tensor
    x0: Tensor | None
    w: Tensor | None
    spans: list[tuple[int, int]]

    def of(self, k: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Expert k's rows, their full-precision counterparts and their weights."""
        a, b = self.spans[k]
        x = self.x[a:b]
        return x, (x if self.x0 is None else self.x0[a:b]), (None if self.w is None else self.w[a:b])


@dataclass(frozen=True)
class ExpertCosts:
    """Bytes one routed expert's statistics, routed rows and working copies take while its group is solved.

    C: hidden size, I: expert width. Gate/up: the Hessian (C, C), under --fit stream the cross
    moment (C, C) too, a working copy of the (2I, C) weights and GPTQ's levels and errors beside it
    (about two more), and the errors of a span of OUTER_BLOCK columns where GPTQ spreads them in two steps
    (gptq_quantize's ``outer``); down: the Hessian (I, I), the fit's moment (C, I), a working copy of (C, I) and
    the same again, and a span's errors, while the group's gate/up levels (one byte a weight) are kept. The rows
    routed to the expert (``rows``) stay resident for both.
    """

    C: int
    I: int
    hessians: bool = True   # gptq (False: rtn, no statistics)
    cross: bool = False     # --fit stream: the gate/up cross moment, and the full-precision stream's rows
    fit_down: bool = False  # --fit mlp/stream: the down projection's output moment

    @property
    def per_expert(self) -> int:
        """Bytes of one expert's statistics and working copies, its routed rows not counted."""
        C, I = self.C, self.I
        gate_up = (C * C * (1 + self.cross) if self.hessians else 0) + 3 * 2 * I * C + _span(2 * I, C)
        down = (I * I if self.hessians else 0) + (C * I if self.fit_down else 0) + 3 * C * I + _span(C, I)
        return 4 * max(gate_up, down) + 2 * I * C

    def rows(self, tokens: int) -> int:
        """Bytes of ``tokens`` routed rows (fp32, with their full-precision twins under --fit stream, and weights)."""
        return tokens * 4 * (self.C * (1 + self.cross) + 1) if self.hessians else 0

    def of(self, tokens: int) -> int:
        """Bytes of one expert routed ``tokens`` rows while its group is solved."""
        return self.per_expert + self.rows(tokens)

    def passing(self, tokens: int, streams: int) -> int:
        """Bytes a pass over the tokens holds beside the group's statistics: one batch of ``tokens``
        MLP inputs per stream, and one expert's weights rebuilt in fp32 (its original gate/up and down,
        its quantized gate/up) with the temporary of an FP8 release's dequantization."""
        return 4 * (streams * tokens * self.C + 6 * self.I * self.C)

    def levels(self, experts: int) -> int:
        """Bytes of the quantized levels of ``experts`` experts (gate/up and down), kept for the forward passes."""
        return 3 * self.I * self.C * experts


def _span(rows: int, columns: int) -> int:
    """Elements of the errors GPTQ keeps for a span of a (rows, columns) matrix (gptq_quantize's ``outer``)."""
    return rows * OUTER_BLOCK if columns >= OUTER_MIN else 0


def expert_groups(budget: int | None, in_use: int, costs: ExpertCosts, tokens: list[int], layer: int) -> list[range]:
    """Consecutive groups of the experts 0..len(tokens)-1 (routed ``tokens`` rows each) whose costs fit the
    ``budget`` (bytes; None: one group of all) beside the ``in_use`` bytes already held."""
    if not tokens:
        return []
    if budget is None:
        return [range(len(tokens))]
    room = budget - in_use
    largest = max(costs.of(t) for t in tokens)
    if room < largest:
        need = math.ceil((in_use + largest) / 1e8) / 10  # rounded up: the budget named must work
        raise QuantMoeError(f"--gpu-memory {budget / 1e9:.1f}GB is too small for one expert of layer {layer}: the "
                            f"layer, its activations and one expert's statistics need about {need:.1f}GB; use "
                            f"--gpu-memory {math.ceil(need)}GB or more, --fit none, or more GPUs")
    groups, start, used = [], 0, 0
    for k, t in enumerate(tokens):
        if k > start and used + costs.of(t) > room:
            groups.append(range(start, k))
            start, used = k, 0
        used += costs.of(t)
    groups.append(range(start, len(tokens)))
    return groups
