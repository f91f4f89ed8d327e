"""GPTQ, as plain typed functions: the whole algorithm, readable top to bottom.

After Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (2022), and its reference implementation (IST-DASLab/gptq).
Names follow the paper: ``W`` weights, ``H`` the Hessian 2/n X^T X, ``Hinv`` the upper
Cholesky factor of its inverse, ``Err`` the scaled quantization error.

Everything is batched over a leading dimension B so that all experts of a layer,
which share shapes, are solved together: W (B, R, C), H (B, C, C). A single linear
is B = 1. Differences from the reference, and why:

* Act-order uses *static groups*: group scales come from the original weights in
  natural column order, so ``g_idx[c] = c // group_size`` stays monotonic and fast
  kernels (Marlin, ExLlama) need no reordering.
* Scales are rounded to fp16 before use, so dequantising the exported checkpoint
  reproduces the GPTQ result bit for bit.
* Dead inputs (a zero Hessian diagonal) keep their weights: they are rounded but
  spread no error, instead of being zeroed.
* Dampening grows by 10x, per matrix, until Cholesky succeeds; the value used is returned.
* ``Hinv`` comes from one Cholesky factorisation of the reversed H and one triangular
  inverse (see ``damped_inverse_cholesky``) rather than Cholesky, inverse, Cholesky: it
  cannot fail on an inverse that rounding left not quite positive definite, and it
  factorises one matrix at a time, in place, so a layer's (B, C, C) Hessians never exist
  twice; failed factorisations are redone after the others, so the host waits for the
  device once. The triangular inverse is blocked (``triangular_inverse``): nearly all
  matrix products, about 2/3 of a triangular solve's flops against an identity.
* Memory is a few copies of W, not of H: levels are kept as uint8 and the dequantized
  weights are rebuilt from them at the end.
* Without act-order, a group's grid comes from its columns as they stand when the group
  starts, with every earlier block's error spread (blocks never straddle a group start).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

FP16_MIN_SCALE = 2.0**-24  # smallest positive fp16 (subnormal); a scale must survive the fp16 round trip
# The steps that treat every matrix alike and elementwise (permutations, grids, dequantization) run over
# chunks of matrices whose inputs take at most this many bytes (at least one matrix): fewer launches
# for many small experts, temporaries bounded by the shapes rather than by how many experts are solved.
CHUNK_BYTES = 256 << 20
# A Hessian X^T X at least GRAM_MIN columns wide is built from its lower half, GRAM_BLOCK columns at a time,
# and mirrored (``_gram``): about half the products' flops. Narrower ones take one product.
GRAM_BLOCK = 1024
GRAM_MIN = 2 * GRAM_BLOCK
# On CUDA, GPTQ spreads a block's errors at once only over the columns up to the end of its OUTER_BLOCK columns,
# and the errors of all those columns over the columns after them in one product (``gptq_quantize``'s ``outer``):
# the rest of W read and written once per OUTER_BLOCK columns rather than once per block. Only for matrices of
# OUTER_MIN columns or more (benchmarks/README.md: it paid at DeepSeek-V3's 7168, not at 2048).
OUTER_BLOCK = 1024
OUTER_MIN = 4 * OUTER_BLOCK


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # -1: one group spanning the row
    sym: bool = True

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, columns: int) -> int:
        return 1 if self.group_size == -1 else -(-columns // self.group_size)

    def width(self, columns: int) -> int:
        """Columns per group; a layer narrower than the group size is one group."""
        return columns if self.group_size == -1 else min(self.group_size, columns)


@dataclass
class QuantResult:
    """The quantized form of B matrices of shape (R, C)."""

    q: Tensor        # (B, R, C) uint8, integer levels in [0, maxq]
    scales: Tensor   # (B, R, G) fp16
    zeros: Tensor    # (B, R, G) uint8, integer zero points in [0, maxq]
    g_idx: Tensor    # (C,) int32, group of each input column
    W: Tensor | None  # (B, R, C) fp32, the dequantized weights: scales * (q - zeros) (None: not asked for)
    loss: Tensor     # (B, R) fp32, GPTQ's per-row squared error proxy (0 for RTN)
    damp: Tensor     # (B,) fp32, the dampening fraction that made H positive definite


_BF16_STATISTICS = ContextVar("bf16_statistics", default=False)
_HALF_PRODUCTS = ContextVar("half_products", default=False)
# Under ``half_products``, fp32 operands on these devices go to products as fp16 (``operands``).
HALF_DEVICES = ("cuda",)
# An fp16 operand is first multiplied by the power of two that brings its largest magnitude to HALF_PEAK unless
# that magnitude already lies in HALF_RANGE: within it nothing overflows, and what fp16 cannot hold at full
# precision (below 2**-14) is under 2**-11 of the largest, where TF32 rounds that one's own error.
HALF_RANGE = (2.0**-3, 2.0**15)
HALF_PEAK = 2.0**14
HALF_PEAK_EXPONENT = 14  # log2(HALF_PEAK)


@contextmanager
def bf16_statistics(enabled: bool) -> Iterator[None]:
    """Inside the block, the statistics' products (``accumulate_moment``, ``moment_sum``, hence the Hessians
    and the fit's moments, and ``stat_mm``) take their inputs rounded to bfloat16 and sum them in fp32: on CUDA
    one bf16 tensor-core product with an fp32 result, elsewhere the rounded inputs multiplied in fp32
    (each product of two bf16 numbers is exact in fp32, so both compute the same sums up to their order).
    Under ``--hessian-dtype bfloat16``; GPTQ's solve never uses it."""
    token = _BF16_STATISTICS.set(enabled)
    try:
        yield
    finally:
        _BF16_STATISTICS.reset(token)


@contextmanager
def half_products(enabled: bool) -> Iterator[None]:
    """Inside the block, the statistics' products (those made through ``operands``: the Hessians, the fit's
    moments, ``stat_mm``) take fp32 operands on HALF_DEVICES as fp16, scaled by powers of two (see HALF_RANGE):
    the 10-bit mantissa TF32 rounds them to, on tensor cores twice as fast, summed in fp32. ``--tf32`` turns it on
    with TF32 (stream.tensor_core_passes); ``bf16_statistics`` takes precedence. The routed experts' forward
    products take fp16 operands too where a layer's experts are wide (``StoredExperts.half``), scaled row by row
    (``half_rows``), so that a resumed run's replay of them (resume.run_stored) rounds each row alike; the rest
    of the forward passes keeps TF32."""
    token = _HALF_PRODUCTS.set(enabled)
    try:
        yield
    finally:
        _HALF_PRODUCTS.reset(token)


def fp32_operands(enabled: bool) -> AbstractContextManager[None]:
    """Inside the block, where ``enabled``, the statistics' products keep fp32 operands (TF32 under --tf32) even
    inside ``half_products`` (entered before this is called): for narrow experts' down statistics, whose many
    small products per expert gain less from fp16's rate than their operands' conversions cost
    (benchmarks/README.md)."""
    return half_products(_HALF_PRODUCTS.get() and not enabled)


def half_rows(X: Tensor) -> tuple[Tensor, Tensor] | None:
    """Inside ``half_products``, fp32 X (n, k) on HALF_DEVICES as a product's fp16 operand, scaled row by row:
    each row times the power of two that brings its largest magnitude into [HALF_PEAK / 2, HALF_PEAK) (1 for a
    row holding a non-finite value), and those powers' inverses (n,), which undo it exactly on the product's
    rows. A row's operand depends on that row alone, so products over any set of rows hold each row's
    result alike (the routed experts' forward, ``StoredExperts.run_deferred``, and a resumed run's replay of
    it). Off CUDA the rounded values are held in fp32. None outside the block or elsewhere: the caller keeps
    fp32 (TF32 under --tf32). A whole matrix's single scale is ``half_rows(W.reshape(1, -1))``."""
    if not _HALF_PRODUCTS.get() or X.device.type not in HALF_DEVICES or X.dtype != torch.float32:
        return None
    peak = torch.linalg.vector_norm(X, math.inf, dim=-1)
    shift = (HALF_PEAK_EXPONENT - torch.frexp(peak).exponent).clamp(-126, 126)  # peak = m 2^e, 1/2 <= m < 1
    scale = ((shift + 127) << 23).view(torch.float32)  # 2^shift, built from its bits: exact
    scale = torch.where(torch.isfinite(peak), scale, torch.ones_like(scale))
    h = _scaled_half(X, scale[:, None])
    return (h if h.is_cuda else h.float()), scale.reciprocal()


def _scaled_half(t: Tensor, scale: Tensor | float) -> Tensor:
    """(t * scale).half() in one pass, with t's layout: the product rounded once, to fp16, as .half() rounds it
    (scale a power of two: the product is exact in fp32)."""
    return torch.mul(t, scale, out=torch.empty_like(t, dtype=torch.float16))


class Operand(NamedTuple):
    """A product's operand as ``operands`` makes it: ``t`` (fp32, or bf16/fp16 on CUDA; elsewhere fp32 holding
    the rounded values) and the ``factor`` a product of it must be multiplied by (1 / the scale applied)."""
    t: Tensor
    factor: float = 1.0


def operands(*ts: Tensor | Operand) -> list[Operand]:
    """``ts`` as a product takes them: inside ``bf16_statistics`` rounded to bfloat16, inside ``half_products``
    (fp32 on HALF_DEVICES) to fp16 after their scales (one host read of their largest magnitudes for all of
    them), else as they are. An Operand is kept; the same tensor twice is rounded once (a Hessian's X and X)."""
    by_id = {id(t): t for t in ts if not isinstance(t, Operand)}  # each tensor once, in order
    made: dict[int, Operand] = {}
    if _BF16_STATISTICS.get():
        for i, t in by_id.items():
            made[i] = Operand(t.bfloat16() if t.is_cuda else t.bfloat16().float())
    else:
        half = [i for i, t in by_id.items() if _HALF_PRODUCTS.get() and t.device.type in HALF_DEVICES
                and t.dtype == torch.float32 and t.numel()]
        # largest magnitudes in one pass each (abs().amax() would write a copy first), read once for all
        peaks = torch.stack([torch.linalg.vector_norm(by_id[i], math.inf) for i in half]).tolist() if half else []
        for i, peak in zip(half, peaks):
            t = by_id[i]
            scale = 1.0
            if math.isfinite(peak) and peak > 0 and not HALF_RANGE[0] <= peak <= HALF_RANGE[1]:
                scale = 2.0 ** math.floor(math.log2(HALF_PEAK / peak))
            h = _scaled_half(t, scale) if scale != 1.0 else t.half()
            made[i] = Operand(h if h.is_cuda else h.float(), 1.0 / scale)
    for i, t in by_id.items():
        made.setdefault(i, Operand(t))
    return [t if isinstance(t, Operand) else made[id(t)] for t in ts]


def _paired(A: Operand, B: Operand) -> tuple[Tensor, Tensor]:
    """A's and B's tensors in one dtype (an fp16/bf16 one beside an fp32 one is widened: exact)."""
    if A.t.dtype == B.t.dtype:
        return A.t, B.t
    return A.t.float(), B.t.float()


def _addmm(S: Tensor, A: Tensor | Operand, B: Tensor | Operand, alpha: float = 1.0) -> Tensor:
    """S (fp32) += alpha A @ B in place; bf16/fp16 A and B (``operands`` on CUDA) give one product with an fp32
    result; their factors go into alpha."""
    A, B = (t if isinstance(t, Operand) else Operand(t) for t in (A, B))
    a, b = _paired(A, B)
    alpha = alpha * A.factor * B.factor
    if a.dtype in (torch.bfloat16, torch.float16):
        return torch.addmm(S, a, b, out_dtype=torch.float32, alpha=alpha, out=S)
    return S.addmm_(a, b, alpha=alpha)


def _moment_mm(S: Tensor, Y: Operand, X: Operand, alpha: float = 1.0, mirror: bool = True) -> None:
    """S (R, C) += alpha Y^T X in place: ``_gram`` when Y is X (a Hessian), else one product (``_addmm``)."""
    if Y is X and X.t.shape[1] >= GRAM_MIN:
        _gram(S, X, alpha, mirror)
    else:
        _addmm(S, Operand(Y.t.t(), Y.factor), X, alpha=alpha)


def _gram(S: Tensor, X: Operand, alpha: float = 1.0, mirror: bool = True) -> None:
    """S (C, C) += alpha X^T X for X (T, C), S symmetric: per block of GRAM_BLOCK columns, one product for
    the block and everything below it, then (``mirror``) the part above the diagonal blocks copied from its
    mirror image. (C/GRAM_BLOCK + 1) / (2 C/GRAM_BLOCK) of one product's flops; each entry is a sum over the
    same rows as in one product, only the products' tiling (so their rounding) may differ. Without ``mirror``
    that part is left as it was, for ``finish_moment``'s ``mirror`` once every chunk of rows is in."""
    x, C = X.t, X.t.shape[1]
    for start in range(0, C, GRAM_BLOCK):
        stop = min(start + GRAM_BLOCK, C)
        _addmm(S[start:, start:stop], Operand(x[:, start:].t(), X.factor), Operand(x[:, start:stop], X.factor),
               alpha=alpha)
    if mirror:
        _mirror(S)


def _mirror(S: Tensor) -> None:
    """S's part above its diagonal blocks of GRAM_BLOCK columns copied from the part below (``_gram``)."""
    C = S.shape[1]
    if C < GRAM_MIN:
        return
    for start in range(0, C - GRAM_BLOCK, GRAM_BLOCK):
        stop = start + GRAM_BLOCK
        S[start:stop, stop:].copy_(S[stop:, start:stop].mT)


def stat_mm(A: Tensor | Operand, B: Tensor | Operand) -> Tensor:
    """A @ B in fp32 for a statistic's inputs (the down projection's, from the gate/up products), from
    ``operands`` (an operand used again, a weight, can be made once)."""
    A, B = operands(A, B)
    a, b = _paired(A, B)
    factor = A.factor * B.factor
    if a.dtype in (torch.bfloat16, torch.float16):  # the factors (powers of two) as the product's alpha: exact
        out = a.new_empty(a.shape[0], b.shape[1], dtype=torch.float32)
        return torch.addmm(out, a, b, beta=0, alpha=factor, out_dtype=torch.float32, out=out)
    out = a @ b
    return out.mul_(factor) if factor != 1.0 else out


def accumulate_hessian(H: Tensor, X: Tensor, n_seen: float, weights: Tensor | None = None) -> tuple[Tensor, float]:
    """Fold the rows of X (T, C) into the running Hessian H (C, C) = 2/n sum x x^T, in fp32.

    With ``weights`` (T,), row t counts as w_t x_t (its error is scaled by w_t, as a routed
    expert's output is by its router score): H = 2 sum w^2 x x^T / sum w^2, and n is sum w^2.
    """
    return accumulate_moment(H, X, X, n_seen, weights)


def accumulate_moment(P: Tensor, Y: Tensor, X: Tensor, n_seen: float, weights: Tensor | None = None
                      ) -> tuple[Tensor, float]:
    """Fold rows of Y (T, R) and X (T, C) into the running moment P (R, C) = 2/n sum y x^T, in fp32,
    weighted and counted as in ``accumulate_hessian`` (P and H built from the same rows share n)."""
    if X.shape[0] == 0:
        return P, n_seen
    Xw, added = weighted(X, weights)
    Yw = Xw if Y is X else weighted(Y, weights)[0]
    n_total = n_seen + (added if weights is None else float(added))
    if n_total == 0:
        return P, n_seen
    P.mul_(n_seen / n_total)
    _moment_mm(P, *operands(Yw, Xw), alpha=2.0 / n_total)
    return P, n_total


def weighted(X: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor | int]:
    """The rows of X (T, ...) as (T, -1) fp32, times their ``weights`` (T,) if given, and what they add to a
    moment's n: sum w^2 as a 0-dim tensor, or T (no host synchronisation)."""
    T = X.shape[0]
    X = X.flatten(1).float()
    if weights is None:
        return X, T
    return X * weights.float().reshape(T, 1), weight_count(T, weights)


def weight_count(T: int, weights: Tensor | None = None) -> Tensor | int:
    """What T rows with ``weights`` (T,) add to a moment's n (``weighted``): sum w^2 as a 0-dim tensor, or T."""
    return T if weights is None else weights.float().reshape(T, 1).pow(2).sum()


def weighted_rows(X: Tensor, weights: Tensor | None = None) -> tuple[Operand, Tensor | int]:
    """``weighted``'s rows as a moment's product takes them (``operands``), and what they add to n."""
    Xw, added = weighted(X, weights)
    return operands(Xw)[0], added


def moment_add(S: Tensor, Y: Operand, X: Operand, mirror: bool = True) -> None:
    """S (R, C) += Y^T X in place, in fp32, for rows Y (T, R) and X (T, C) from ``weighted_rows``; Y is X: a
    Hessian, of which ``mirror`` False leaves the upper part for ``finish_moment``'s ``mirror``."""
    if X.t.shape[0]:
        _moment_mm(S, Y, X, mirror=mirror)


def moment_sum(S: Tensor, Y: Tensor, X: Tensor, weights: Tensor | None = None, mirror: bool = True
               ) -> Tensor | int:
    """Add sum_t w_t^2 y_t x_t^T over rows of Y (T, R) and X (T, C) to the running sum S (R, C), in fp32,
    and return what the rows add to n (``weighted_rows``). ``finish_moment`` turns the sum into
    ``accumulate_moment``'s 2/n mean. Given all of a matrix's rows at once (in a few large products, rather
    than a batch at a time), the same rows in the same chunks give the same bits whatever else is computed
    beside them. ``mirror`` as in ``moment_add``."""
    Xo, added = weighted_rows(X, weights)
    moment_add(S, Xo if Y is X else weighted_rows(Y, weights)[0], Xo, mirror)
    return added


def finish_moment(S: Tensor, n: Tensor | float, mirror: bool = False) -> Tensor:
    """S (a ``moment_sum``) scaled to 2/n S in place; zero where n is 0. ``mirror``: S is a Hessian summed
    with ``moment_sum``'s ``mirror`` False, whose upper part is filled here first."""
    if mirror:
        _mirror(S)
    if isinstance(n, Tensor):
        return S.mul_(torch.where(n > 0, 2.0 / n.clamp(min=torch.finfo(torch.float32).tiny), 0.0))
    return S.mul_(2.0 / n if n else 0.0)


def matrix_chunks(B: int, matrix_bytes: int) -> Iterator[slice]:
    """Slices of a batch of B matrices of ``matrix_bytes`` each, as many per slice as fit in CHUNK_BYTES
    (at least one). Only for steps whose bits do not depend on what else is in the slice: data movement,
    elementwise work and reductions along a row, never a matrix product or a reduction over a matrix."""
    step = max(1, CHUNK_BYTES // max(1, matrix_bytes))
    for start in range(0, B, step):
        yield slice(start, min(start + step, B))


def find_params(W: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per-row min/max quantization grid for W (..., R, k): scales (fp16-exact) and zeros (..., R)."""
    return _grid(W.amin(dim=-1).clamp(max=0), W.amax(dim=-1).clamp(min=0), spec)


def _grid(wmin: Tensor, wmax: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """The grid spanning [wmin, wmax] (wmin <= 0 <= wmax): fp16-exact scales and integer zeros."""
    if spec.sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    flat = (wmax == wmin)
    wmin = torch.where(flat, torch.full_like(wmin, -1.0), wmin)
    wmax = torch.where(flat, torch.full_like(wmax, 1.0), wmax)
    scale = ((wmax - wmin) / spec.maxq).clamp(min=FP16_MIN_SCALE).half().float()
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) / 2)
    else:
        # GPTQ v1 stores zero - 1; a zero of 0 would wrap, so the grid starts at 1.
        zero = torch.round(-wmin / scale).clamp(1, spec.maxq)
    return scale, zero


@dataclass(frozen=True)
class ClipSearch:
    """A clipping-ratio search for each row's grid: the min/max range shrunk (or, up to
    ``max_ratio``, widened) by each of ``steps`` ratios; the grid with the smallest
    ``importance``-weighted squared rounding error wins, ties to the plain min/max grid.
    ``steps`` 0 turns it off. ``kernel``: the whole search in one kernel (``gptq.triton_kernels.search_grids``,
    chosen by the caller); it returns None where it does not apply, and then PyTorch searches. The kernel sums
    each group's error terms in its own order, so a grid may differ where two candidates tie to rounding."""

    steps: int = 0
    min_ratio: float = 0.6
    max_ratio: float = 1.0
    weight: str = "residual"  # each column's error weight: "residual" (see gptq_quantize) or "hessian" (diagonal of H)
    kernel: Callable[..., tuple[Tensor, Tensor] | None] | None = None

    def ratios(self) -> list[float]:
        if self.steps <= 1:
            return [self.min_ratio] if self.steps == 1 else []
        step = (self.max_ratio - self.min_ratio) / (self.steps - 1)
        return [self.min_ratio + k * step for k in range(self.steps)]


def rounding_error(W: Tensor, scale: Tensor, zero: Tensor, maxq: int, importance: Tensor | None,
                   dtype: torch.dtype | None = None) -> Tensor:
    """sum_c importance_c (w_c - Q(w_c))^2 over the last dim of W (..., R, k) on the grid
    (scale, zero) (..., R); importance broadcasts against W (None: all ones). Returns (..., R), summed in
    ``dtype`` (default W's)."""
    s, z = scale[..., None], zero[..., None]
    err = (W - s * (quantize_levels(W, s, z, maxq) - z)).pow_(2)
    if importance is not None:
        err.mul_(importance)
    return err.sum(-1, dtype=dtype)


def search_params(W: Tensor, spec: QuantSpec, search: ClipSearch, importance: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Like find_params, the grid of each row of W (..., R, k), but chosen among clipping ratios
    to minimise ``rounding_error`` weighted by ``importance`` (the Hessian diagonal of the
    columns, broadcastable to W): the plain min/max grid is the first candidate and is only
    replaced by a strictly better one, so the error never exceeds min/max's."""
    ratios = search.ratios()
    found = search.kernel(W, spec, ratios, importance) if ratios and search.kernel is not None else None
    if found is not None:
        return found
    wmin = W.amin(dim=-1).clamp(max=0)
    wmax = W.amax(dim=-1).clamp(min=0)
    scale, zero = _grid(wmin, wmax, spec)  # find_params' grid
    if not ratios:
        return scale, zero
    best = rounding_error(W, scale, zero, spec.maxq, importance)
    for r in ratios:
        s, z = _grid(wmin * r, wmax * r, spec)
        err = rounding_error(W, s, z, spec.maxq, importance)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def quantize_levels(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer levels of w on the grid (scale, zero), all broadcastable."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def group_params(W: Tensor, spec: QuantSpec, search: ClipSearch = ClipSearch(),
                 importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Static grid of every group: W (B, R, C) -> scales, zeros (B, R, G). ``importance`` (B, C)
    weights each column's rounding error in the clipping search (the Hessian diagonal).

    With a search, a chunk of matrices at a time (``matrix_chunks``): each ratio's temporaries are the
    size of the chunk's W. Every step is elementwise or a min, max or sum along one group of one row,
    so a matrix gets the same grid whichever chunk it is in."""
    B, R, C = W.shape
    width = spec.width(C)
    G = spec.groups(C)
    pad = G * width - C
    chunks = [slice(0, B)]
    if search.ratios():
        # Matrices that start 16-byte aligned in a chunk, as alone, so that a vectorised row sum splits
        # every row as it would alone; otherwise (odd sizes), one matrix at a time.
        chunks = list(matrix_chunks(B, R * G * width * 4 if R * G * width % 4 == 0 else CHUNK_BYTES))
    parts = []
    for s in chunks:
        Wg = torch.nn.functional.pad(W[s], (0, pad)) if pad else W[s]
        imp = None
        if importance is not None:
            imp = torch.nn.functional.pad(importance[s], (0, pad)) if pad else importance[s]
            imp = imp.reshape(-1, 1, G, width)
        parts.append(search_params(Wg.reshape(-1, R, G, width), spec, search, imp))
        del Wg, imp
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def static_grids(W: Tensor, perm: Tensor, spec: QuantSpec, search: ClipSearch = ClipSearch(),
                 importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """group_params of W (B, R, C) held in the column order perm (B, C) (W[:, :, k] is column
    perm[k]), taken in natural order a chunk of matrices at a time (``matrix_chunks``), so that only
    a chunk is ever re-ordered (for Mixtral's gate/up, one matrix of the eight)."""
    B, R, C = W.shape
    parts = []
    for s in matrix_chunks(B, R * C * W.element_size()):
        natural = torch.empty_like(W[s]).scatter_(2, perm[s, None, :].expand(-1, R, C), W[s])
        parts.append(group_params(natural, spec, search, None if importance is None else importance[s]))
        del natural
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def rtn_quantize(W: Tensor, spec: QuantSpec, search: ClipSearch = ClipSearch(),
                 importance: Tensor | None = None) -> QuantResult:
    """Round-to-nearest baseline on the same grid and format as GPTQ."""
    W = W.float()
    B, R, C = W.shape
    scales, zeros = group_params(W, spec, search, importance)
    g_idx = torch.arange(C, device=W.device) // spec.width(C)
    s, z = scales[..., g_idx], zeros[..., g_idx]
    q = quantize_levels(W, s, z, spec.maxq)
    return QuantResult(
        q=q.to(torch.uint8), scales=scales.half(), zeros=zeros.to(torch.uint8),
        g_idx=g_idx.int(), W=s * (q - z), loss=torch.zeros(B, R, device=W.device),
        damp=torch.zeros(B, device=W.device),
    )


@contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """Let fp32 matrix products run as TF32 on CUDA (inputs rounded to a 10-bit mantissa, fp32
    accumulation) inside the block. quantmoe uses it, under ``--tf32``, for Hessians, forward
    passes, the fitted-weight products and, in GPTQ, the triangular inverse's products and the spread
    of each block's errors (``gptq_quantize``'s ``tf32``); never for the Cholesky factorisation or the
    column loop inside a block. benchmarks/README.md says what it changes."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")  # torch >= 2.9; mixing it with allow_tf32 is an error
    before = matmul.fp32_precision if new_api else matmul.allow_tf32
    if new_api:
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
    try:
        yield
    finally:
        if new_api:
            matmul.fp32_precision = before
        else:
            matmul.allow_tf32 = before


def mean_diagonal(H: Tensor) -> Tensor:
    """mean(diag H) of one matrix H (C, C), floored: what the dampening is a fraction of. Always one
    matrix at a time: a batched mean's rounding can depend on the batch's size, and a matrix's
    result must not depend on which others are solved beside it (1 vs several GPUs)."""
    return torch.diagonal(H).mean().clamp(min=1e-8)


def damped_inverse_cholesky(H: Tensor, damp: float, max_tries: int = 16,
                            mean_diag: Tensor | None = None, tf32: bool = False) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1 for H (B, C, C), so that U^T U is that inverse.

    With J the reversal permutation and J H J = L L^T, H^-1 = (J L^-T J)(J L^-1 J), and
    J L^-1 J is upper triangular with a positive diagonal: it is U. Dampening is
    multiplied by 10 for each matrix whose factorisation fails. H is overwritten with U, so a
    layer's Hessians never exist twice. ``mean_diag`` (B,): each matrix's ``mean_diagonal``, if the
    caller has it already. Returns (U (B, C, C), which is H's own storage; damp used (B,)).

    The reversals run over chunks of matrices (``matrix_chunks``: data movement); the factorisation
    and the inverse one matrix at a time, in place (``_invert_reversed``), as a batched one's rounding
    could depend on the batch. The host does not wait for each factorisation: until every matrix is
    done, H's strictly lower half (zero in U) keeps J H J's, and a matrix whose factorisation failed is
    redone from it with 10x the dampening, try after try, exactly as if it had been retried at once.
    ``tf32``: the triangular inverse's products may run as TF32 on CUDA (``tf32_matmuls``); the
    factorisation itself and the leaves' triangular solves stay fp32.
    """
    B, C, _ = H.shape
    used = torch.full((B,), damp, device=H.device, dtype=H.dtype)
    scale = torch.stack([mean_diagonal(H[b]) for b in range(B)]) if mean_diag is None else mean_diag
    chunks = list(matrix_chunks(B, C * C * H.element_size()))
    for s in chunks:
        H[s] = H[s].flip((1, 2))  # J H J, in H's own storage
    diag = H.diagonal(dim1=1, dim2=2).clone()  # (B, C), undampened
    lower = torch.ones(C, C, dtype=torch.bool, device=H.device).tril_(-1)  # strictly below the diagonal
    with tf32_matmuls(tf32):
        info = torch.stack([_invert_reversed(H[b], diag[b], used[b] * scale[b], lower) for b in range(B)])
        for b in info.nonzero().flatten().tolist():  # the one wait for the device
            for _ in range(max_tries - 1):
                used[b] *= 10
                H[b] = torch.where(lower, H[b], H[b].mT)  # J H J again, from its lower half
                if int(_invert_reversed(H[b], diag[b], used[b] * scale[b], lower)) == 0:
                    break
            else:
                used[b] *= 10
                raise RuntimeError(f"Hessian is not positive definite even with dampening {float(used[b]):g}")
    for s in chunks:
        H[s] = H[s].mT.flip((1, 2)).triu_()  # J L^-1 J, zero below the diagonal
    return H, used


def _invert_reversed(M: Tensor, diag: Tensor, add: Tensor, lower: Tensor) -> Tensor:
    """One matrix of damped_inverse_cholesky: M (C, C) holds J H J (only its lower half is read), diag (C,)
    its diagonal, ``add`` the dampening to add to it. M becomes L^-T in its upper half, L the Cholesky
    factor of J H J + add I, and keeps J H J's strictly lower half (``lower``, a (C, C) mask of it).
    Returns cholesky_ex's info (0-dim, on the device: nonzero where the factorisation failed)."""
    M.diagonal().copy_(diag).add_(add)
    L, info = torch.linalg.cholesky_ex(M)
    # L's strictly upper half, which triangular_inverse never reads, keeps M's strictly lower half while
    # L^-1 is written into M through its transpose. L is the one C x C temporary.
    torch.where(lower.mT, M.mT, L, out=L)
    triangular_inverse(L, out=M.mT)
    torch.where(lower, L.mT, M, out=M)
    return info


def triangular_inverse(L: Tensor, leaf: int = 512, out: Tensor | None = None) -> Tensor:
    """L^-1 for a lower-triangular L (C, C), by blocks: with L = [[A, 0], [B, D]],
    L^-1 = [[A^-1, 0], [-D^-1 B A^-1, D^-1]]. The diagonal blocks of ``leaf`` columns (the leaves) are
    inverted first, all at once (``_invert_leaves``), then combined by splits into halves, each split's rest
    by two matrix products: about 2/3 C^3 flops, nearly all in large products, instead of a triangular
    solve's C^3.

    Only L's lower half is read. ``out`` (C, C), any strides, receives L^-1, zero above the diagonal;
    its upper-right blocks hold B A^-1 (transposed) in between, so no other C x C temporary exists.
    A new one by default. Returns ``out``."""
    if out is None:
        out = torch.empty_like(L)
    _invert_leaves(L, leaf, out)
    _combine_leaves(L, leaf, out)
    return out


def _diagonal_blocks(M: Tensor, size: int, count: int) -> Tensor:
    """The first ``count`` diagonal blocks (size, size) of M, whatever its strides, as one (count, size, size) view."""
    s0, s1 = M.stride()
    return M.as_strided((count, size, size), (size * (s0 + s1), s0, s1), M.storage_offset())


def _invert_leaves(L: Tensor, leaf: int, out: Tensor) -> None:
    """out's diagonal blocks of ``leaf`` columns (the last one narrower if C is not a multiple) = the inverses of
    L's, by solve_triangular against an identity: every whole leaf in one batched solve (one matrix's leaves
    only, so its result never depends on other matrices), the narrower one alone."""
    n = L.shape[-1]
    whole, rest = divmod(n, leaf)
    eye = torch.eye(min(n, leaf), device=L.device, dtype=L.dtype)
    if whole:
        blocks = _diagonal_blocks(out, leaf, whole)
        blocks.copy_(torch.linalg.solve_triangular(_diagonal_blocks(L, leaf, whole), eye.expand(whole, leaf, leaf),
                                                   upper=False))
    if rest:
        torch.linalg.solve_triangular(L[n - rest:, n - rest:], eye[:rest, :rest], upper=False,
                                      out=out[n - rest:, n - rest:])


def _combine_leaves(L: Tensor, leaf: int, out: Tensor) -> None:
    """The rest of ``triangular_inverse`` once ``out`` holds the inverted leaves: the blocks below the diagonal ones,
    split by split."""
    n = L.shape[-1]
    if n <= leaf:
        return
    h = (-(-n // leaf) // 2) * leaf  # a whole number of leaves above the split, about half of them
    A_inv, D_inv, scratch = out[:h, :h], out[h:, h:], out[:h, h:]
    _combine_leaves(L[:h, :h], leaf, A_inv)
    _combine_leaves(L[h:, h:], leaf, D_inv)
    torch.matmul(A_inv.mT, L[h:, :h].mT, out=scratch)  # (B A^-1)^T
    torch.matmul(D_inv, scratch.mT, out=out[h:, :h]).neg_()
    scratch.zero_()


def quantize_block(W1: Tensor, Hinv1: Tensor, S1: Tensor, Z1: Tensor, maxq: int, levels1: Tensor) -> Tensor:
    """The sequential heart of GPTQ, for one block of n columns: quantize column i on its
    grid (S1, Z1), then spread its scaled error over the block's columns after i.

    W1 (B, R, n) is updated in place; levels1 (B, R, n) uint8 receives the levels.
    Hinv1 (B, n, n) is the block's part of the inverse factor. Returns Err1 (B, R, n),
    the scaled errors that the caller spreads over the columns after the block.
    """
    Err1 = torch.empty_like(W1)
    for i in range(W1.shape[-1]):
        w, s, z = W1[:, :, i], S1[:, :, i], Z1[:, :, i]       # (B, R)
        lv = quantize_levels(w, s, z, maxq)
        err = (w - s * (lv - z)) / Hinv1[:, i, i, None]        # (B, R)
        W1[:, :, i + 1:] -= err[:, :, None] * Hinv1[:, None, i, i + 1:]
        levels1[:, :, i] = lv
        Err1[:, :, i] = err
    return Err1


ORDERS = ("static", "group", "none")  # column orders of gptq_quantize, see column_order


def column_order(diag: Tensor, order: str, width: int) -> Tensor:
    """The order in which GPTQ quantizes the columns, from the Hessian diagonal (B, C): perm (B, C),
    perm[b, k] = the column quantized k-th.

    * ``static``: act-order, by decreasing diagonal over the whole row; the columns of a group
      are scattered in time, so every grid is fixed from the original weights beforehand.
    * ``group``: group-aware act-order (GAR, Gafni et al. 2025, as GPTQModel's act_group_aware):
      groups by decreasing largest diagonal, columns by decreasing diagonal inside their group.
      A group's columns stay together, so its grid is found when it starts, from weights that
      already carry the error spread by the groups before it.
    * ``none``: natural order, grids found when each group starts.

    Every order keeps ``g_idx[c] = c // width``: only the time a column is quantized changes.
    """
    B, C = diag.shape
    if order == "none":
        return torch.arange(C, device=diag.device).expand(B, C)
    if order == "static":
        return torch.argsort(diag, dim=-1, descending=True, stable=True)
    if order != "group":
        raise ValueError(f"column order {order!r} is unknown; use one of {', '.join(ORDERS)}")
    if C % width:
        raise ValueError(f"group order needs whole groups: {C} columns are not a multiple of {width}")
    G = C // width
    groups = diag.reshape(B, G, width)
    inner = torch.argsort(groups, dim=-1, descending=True, stable=True)                 # (B, G, width)
    outer = torch.argsort(groups.amax(-1), dim=-1, descending=True, stable=True)         # (B, G)
    inner = inner + torch.arange(G, device=diag.device)[None, :, None] * width           # column indices
    return torch.gather(inner, 1, outer[:, :, None].expand(B, G, width)).reshape(B, C)


def gptq_quantize(W: Tensor, H: Tensor, spec: QuantSpec, damp: float = 0.01,
                  order: str = "static", block_size: int = 128, overwrite_H: bool = False,
                  block_fn=quantize_block, search: ClipSearch = ClipSearch(),
                  target: Tensor | None = None, refine: int = 0, cross: Tensor | None = None,
                  dequantized: bool = True, overwrite_W: bool = False, tf32: bool = False,
                  outer: int | None = None) -> QuantResult:
    """Quantize W (B, R, C) column by column, spreading each rounding error over the
    not-yet-quantized columns in proportion to the inverse Hessian H (B, C, C).

    ``order``: one of ORDERS (see column_order). ``search``: the clipping-ratio search of every
    grid, its rounding errors weighted by the Hessian diagonal of the columns.
    ``target`` (B, R, C): P = 2/n sum y x^T, the moment between the outputs y the layer should
    give (the original model's) and the inputs x it will get (those behind already-quantized
    layers, which H = 2/n sum x x^T is made of); see ``fitted_weights``. GPTQ then quantizes
    the weights that best map those inputs to those outputs instead of W.
    ``cross`` (B, C, C), instead of ``target`` when the original outputs are W's own: the moment
    C = 2/n sum x0 x^T between the inputs x0 the original model gives this layer and the inputs x
    it will get, so that P = W C. A C x C moment is smaller than P when R > C (gate/up, q/k/v)
    and costs one product per batch of tokens instead of two.
    ``refine``: passes of ``refine_levels`` over GPTQ's levels (0: GPTQ's own).
    With ``overwrite_H`` the caller hands H over (a dense fp32 tensor it no longer needs):
    it is permuted and turned into the inverse factor in place, which saves a (B, C, C)
    copy; for Mixtral's down_proj that is 6.6 GB. ``overwrite_W`` likewise hands W over (fp32): it
    becomes the working copy (3.8 GB less for Mixtral's eight gate/up). ``dequantized`` False leaves
    the result's W None, for a caller that rebuilds it from the levels (a (B, R, C) fp32 tensor less).
    ``tf32``: on CUDA the products that form the fitted weights (``target``/``cross``), those of the
    inverse factor's triangular inverse and the spread of each block's errors over the later columns
    may run as TF32 (``tf32_matmuls``); the Cholesky factorisation and the column loop inside a block
    never do, so each column's rounding and the error it spreads within its block stay fp32.
    ``block_fn`` runs one block; any replacement must compute exactly what ``quantize_block``
    computes (see gptq_graphs.py).
    ``outer``: the error spread in two steps (the default on CUDA from OUTER_MIN columns: OUTER_BLOCK, rounded
    to whole blocks and groups; 0, or by default elsewhere: one step). A block's errors go at once only to the
    columns up to the end of its ``outer`` columns; when those are done, all their errors go to the columns after
    them in one product. Each column receives the same errors, in fewer, larger sums (so rounded differently),
    and the columns far ahead are read and written once per ``outer`` columns instead of once per block.
    """
    W = W.float()
    H = H.float() if overwrite_H else H.float().clone()
    B, R, C = W.shape
    dev = W.device

    diag = torch.diagonal(H, dim1=-2, dim2=-1)  # (B, C), a view into H
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)  # dead inputs: no error is spread through them

    width = spec.width(C)
    static = order == "static" or spec.group_size == -1
    perm = column_order(diag, order, width)
    if order != "none":
        for s in matrix_chunks(B, C * C * 4):  # H[b] = H[b][perm[b]][:, perm[b]], a chunk of matrices at a time
            rows = torch.gather(H[s], 1, perm[s, :, None].expand(-1, C, C))
            torch.gather(rows, 2, perm[s, None, :].expand(-1, C, C), out=H[s])
            del rows
    importance = diag.clone() if search.steps else None  # (B, C) in quantization order; H becomes Hinv below
    group_of = perm // width  # (B, C): group of each permuted column

    mean_diag = torch.stack([mean_diagonal(H[b]) for b in range(B)])  # the fit's ridge is damp x this, as H's
    Hinv, damp_used = damped_inverse_cholesky(H, damp, mean_diag=mean_diag, tf32=tf32)
    if importance is not None and search.weight == "residual":
        # What GPTQ cannot spread of a column's error: 1/U_cc^2, the variance of its input left
        # over once the inputs quantized after it are known (GPTQ's loss is err^2 / U_cc^2).
        importance = torch.diagonal(Hinv, dim1=-2, dim2=-1).pow(-2)
    by_perm = perm[:, None, :].expand(B, R, C)
    if target is not None or cross is not None:
        fitted = W if overwrite_W else torch.empty_like(W)
        with tf32_matmuls(tf32):
            for b in range(B):  # one matrix at a time: P never exists for the whole batch
                P = target[b].float() if target is not None else W[b] @ cross[b].float()
                # A dead input's column keeps its weights: its H row is e_c, so P_c = W_c gives W*_c = W_c.
                P = torch.where(dead[b], W[b], P)[:, perm[b]]
                fitted[b] = fitted_weights(W[b][:, perm[b]], P, Hinv[b], damp_used[b] * mean_diag[b])
                del P
        W = fitted
        del fitted
    elif overwrite_W:
        for s in matrix_chunks(B, R * C * 4):  # the working copy, in quantization order, in W's own storage
            W[s] = torch.gather(W[s], 2, by_perm[s])
    else:
        W = torch.gather(W, 2, by_perm)  # the working copy, in quantization order

    if static:
        # Grids fixed beforehand from the weights to quantize, in natural column order.
        natural = None if importance is None else torch.empty_like(importance).scatter_(1, perm, importance)
        scales, zeros = static_grids(W, perm, spec, search, natural)  # (B, R, G)
    else:
        scales = torch.empty(B, R, spec.groups(C), device=dev)
        zeros = torch.empty_like(scales)
        # Each group's grid is found from its columns as they stand when the group starts,
        # so no block may straddle a group start.
        block_size = math.gcd(block_size, width)

    step = block_size if static else math.lcm(block_size, width)  # a span of whole blocks and groups
    outer = (OUTER_BLOCK if W.is_cuda and C >= OUTER_MIN else 0) if outer is None else outer
    outer = max(1, outer // step) * step if outer else C
    spread = torch.empty(B, R, min(outer, C), device=dev) if outer < C else None  # the span's errors
    levels = torch.empty(B, R, C, device=dev, dtype=torch.uint8)
    losses = torch.zeros(B, R, device=dev)
    batch = torch.arange(B, device=dev)
    aim = W.clone() if refine else None  # the weights GPTQ aims at (W is spread into as it goes)

    with tf32_matmuls(tf32):  # only the error spread multiplies matrices here: block_fn is elementwise
        for i1 in range(0, C, block_size):
            i2 = min(i1 + block_size, C)
            if not static and i1 % width == 0:
                cols = slice(i1, i1 + width)
                imp = None if importance is None else importance[:, None, cols]
                g = group_of[:, i1]  # (B,): the group starting here, per matrix
                scales[batch, :, g], zeros[batch, :, g] = search_params(W[:, :, cols], spec, search, imp)
            cols = group_of[:, None, i1:i2].expand(B, R, i2 - i1)  # each column's grid, gathered once per block
            Err1 = block_fn(W[:, :, i1:i2], Hinv[:, i1:i2, i1:i2], torch.gather(scales, 2, cols),
                            torch.gather(zeros, 2, cols), spec.maxq, levels[:, :, i1:i2])
            losses += Err1.pow(2).sum(-1) / 2
            s1 = i1 - i1 % outer
            s2 = min(s1 + outer, C)  # the span of ``outer`` columns holding the block
            _propagate(W[:, :, i2:s2], Err1, Hinv[:, i1:i2, i2:s2])
            if spread is not None:
                spread[:, :, i1 - s1:i2 - s1] = Err1
                if i2 == s2:
                    _propagate(W[:, :, s2:], spread[:, :, :s2 - s1], Hinv[:, s1:s2, s2:])
    del W
    if refine:
        eye = torch.eye(C, device=dev)
        for b in range(B):  # one matrix at a time bounds the temporaries
            Uinv = torch.linalg.solve_triangular(Hinv[b], eye, upper=True)
            Hd = Uinv @ Uinv.t()  # H + damp I, in quantization order: (U^T U)^-1
            del Uinv
            cols = group_of[b]
            losses[b] = refine_levels(aim[b], Hd, scales[b][:, cols], zeros[b][:, cols], levels[b], spec.maxq,
                                      refine, block_size)
            del Hd
        del aim, eye
    del Hinv, H

    inv = torch.argsort(perm, dim=-1)[:, None, :].expand(B, R, C)
    q = torch.gather(levels, 2, inv)
    del levels
    g_idx = (torch.arange(C, device=dev) // width).int()
    scales = scales.half()
    zeros = zeros.to(torch.uint8)
    Wq = torch.empty(B, R, C, device=dev) if dequantized else None
    for s in matrix_chunks(B, R * C * 4) if dequantized else ():  # a chunk at a time bounds the temporaries
        Wq[s] = dequantize(q[s], scales[s], zeros[s], g_idx)
    return QuantResult(q=q, scales=scales, zeros=zeros, g_idx=g_idx, W=Wq, loss=losses, damp=damp_used)


def refine_levels(W: Tensor, Hd: Tensor, S: Tensor, Z: Tensor, levels: Tensor, maxq: int, passes: int,
                  block_size: int = 128) -> Tensor:
    """Coordinate descent on one matrix's levels after GPTQ, which picks each column's levels once
    and never revisits them: column by column, each row's level becomes the grid point nearest to
    the value that minimises e Hd e^T (e = W - What) with every other column as it stands. That
    point is the best of the grid along the column and the old level is on the grid, so the error
    never grows.

    W (R, C) the weights GPTQ aimed at, Hd (C, C) the damped Hessian, both in quantization order;
    S, Z (R, C) each column's grid; levels (R, C) uint8, updated in place. Changes are applied to
    the gradient G = e Hd a block of columns at a time, as GPTQ spreads its errors. Returns each
    row's e Hd e^T / 2 (R,), the loss GPTQ reports.
    """
    What = S * (levels.float() - Z)
    E = W - What
    G = E @ Hd
    C = W.shape[1]
    for _ in range(passes):
        for i1 in range(0, C, block_size):
            i2 = min(i1 + block_size, C)
            Gb = G[:, i1:i2].clone()
            D = torch.zeros_like(Gb)  # how much each column of e changed in this block
            for j in range(i2 - i1):
                c = i1 + j
                best = What[:, c] + Gb[:, j] / Hd[c, c]
                lv = quantize_levels(best, S[:, c], Z[:, c], maxq)
                new = S[:, c] * (lv - Z[:, c])
                D[:, j] = What[:, c] - new
                What[:, c] = new
                levels[:, c] = lv.to(levels.dtype)
                Gb += D[:, j, None] * Hd[None, c, i1:i2]
            E[:, i1:i2] += D
            G[:, i1:i2] = Gb
            G[:, :i1] += D @ Hd[i1:i2, :i1]
            G[:, i2:] += D @ Hd[i1:i2, i2:]
    return (E * G).sum(-1) / 2


def fitted_weights(W: Tensor, P: Tensor, U: Tensor, delta: Tensor) -> Tensor:
    """W* = (P + delta W)(H + delta I)^-1 for one matrix: W, P (R, C), U (C, C) the upper factor
    with U^T U = (H + delta I)^-1, delta a scalar.

    The ridge least-squares solution of min ||Y - W' X||^2 + delta ||W' - W||^2 (P = Y X^T,
    H = X X^T, both 2/n-scaled): the weights that best map the inputs the layer will really see
    to the outputs the original model gives, pulled towards W as much as GPTQ's dampening.
    Since ||Y - Q X||^2 = ||Y - W* X||^2 + ||(W* - Q) X||^2 up to that ridge, quantizing W*
    with GPTQ minimises the error against the original outputs. When P = W H, W* = W.
    """
    return ((P + delta * W) @ U.transpose(0, 1)) @ U


def _propagate(W_rest: Tensor, Err1: Tensor, Hinv_rest: Tensor) -> None:
    """W_rest (B, R, n) -= Err1 (B, R, k) @ Hinv_rest (B, k, n), in place: one product that subtracts as it
    writes, with no temporary of the product."""
    if W_rest.shape[-1]:
        W_rest.baddbmm_(Err1, Hinv_rest, alpha=-1)


def dequantize(q: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor) -> Tensor:
    """W = scale * (q - zero) for q (..., R, C) with per-group scales/zeros (..., R, G)."""
    g = g_idx.long()
    return scales.float()[..., g] * (q.float() - zeros.float()[..., g])


def dequantize_grouped(q: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """``dequantize`` for GPTQ's own layout here, g_idx[c] = c // (C / G): the same values, each group's
    scale broadcast over its columns instead of gathered for every weight."""
    *lead, R, C = q.shape
    G = scales.shape[-1]
    grouped = q.float().view(*lead, R, G, C // G)
    return (scales.float()[..., None] * (grouped - zeros.float()[..., None])).view(*lead, R, C)

