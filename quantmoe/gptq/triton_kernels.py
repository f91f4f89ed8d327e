"""GPTQ's sequential block loop (gptq.quantize_block) as one Triton kernel per block.

GPTQ's rows are independent: within a block of n columns, row r's levels depend only on row r's
weights, grids and the block's part of the inverse factor. So each program takes a tile of rows,
holds their n weights in registers and runs the whole column loop on them, instead of a dozen
tensor-wide kernels per column (gptq_graphs.GraphedBlocks replays those from a CUDA graph; this
launches one kernel per block). Every operation is the one quantize_block performs, in the same
order and with the same rounding (division and product rounded on their own, never fused into an
FMA, rounding half to even, subnormals kept), so the levels and errors are bit for bit those of
quantize_block; tests/test_gpu.py checks it. Needs CUDA and Triton; ``available()`` says whether both are here.

``search_grids`` is the clipping search (gptq.search_params) as one kernel instead of a chain of
tensor-wide ones per ratio, with the same operations and rounding but for the order of each group's sum.

``silu_mul`` is silu(gate) * up (times the router's weights) for the down projections' statistics, and
``silu_mul_half_rows`` a wide routed expert's activation under ``--tf32`` (stages.experts.StoredExperts): the
gate/up product's rows times their powers of two, silu(gate) * up, and that as the down product's fp16 operand
scaled row by row (gptq.core.half_rows), in one kernel instead of five tensor-wide passes, with PyTorch's CUDA
operations and rounding (silu as x / (1 + expf(-x)), each product and quotient rounded on its own).

``silu_mul_rows``, ``add_scaled_rows`` and ``dequantize_levels`` are the routed experts' fp32 forward steps
(stages.experts.StoredExperts.run_deferred) that are not matrix products, each one kernel instead of two to six
tensor-wide ones, with the bits of PyTorch's: silu(gate) * up from the gate/up product's rows, the down product's
rows times their router weights added into the output (index_add_'s fp32 atomic add), and an expert's weights
rebuilt from its packed levels. ``fp8_blocks_as_bf16`` is an FP8 release's block-wise dequantization
(formats.fp8.Fp8Experts.weights: each expert's original weights, for the full-precision stream's forward, GPTQ's
working copy and the fit's moments) in one kernel instead of four. Each returns None or False where it does not
apply, and the caller runs PyTorch's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .core import FP16_MIN_SCALE, HALF_PEAK_EXPONENT, QuantSpec, quantize_block

try:
    import triton
    import triton.language as tl
    try:
        from triton.language.extra import libdevice
    except ImportError:  # older layouts
        from triton.language.extra.cuda import libdevice
except ImportError:  # CPU-only installs: no Triton
    triton = None


def available(device: torch.device | str) -> bool:
    """Triton and an NVIDIA GPU (the kernels' rounding is checked on CUDA; a ROCm build keeps the PyTorch path)."""
    return triton is not None and torch.device(device).type == "cuda" and torch.version.cuda is not None


if triton is not None:
    # Products and quotients rounded on their own, subnormals kept: PyTorch's CUDA kernels keep them, and Triton
    # links libdevice with flush-to-zero, so libdevice.mul_rn and div_rn would flush them (tests/test_gpu.py)
    @triton.jit
    def _mul(a, b):
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _div(a, b):
        return tl.inline_asm_elementwise("div.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _block_kernel(W, Hinv, S, Z, levels, Err, R, n, maxq,
                      sWb, sWr, sWc, sHb, sHr, sHc, sSb, sSr, sSc, sZb, sZr, sZc,
                      sLb, sLr, sLc, sEb, sEr, sEc,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        b = tl.program_id(1).to(tl.int64)  # 64-bit offsets: a batch of experts can pass 2^31 elements
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_N)
        live = rows < R
        w_tile = tl.load(W + b * sWb + rows[:, None] * sWr + cols[None, :] * sWc,
                         mask=live[:, None] & (cols[None, :] < n), other=0.0)
        for i in range(n):
            w = tl.sum(tl.where(cols[None, :] == i, w_tile, 0.0), axis=1)  # column i (exact: one term)
            s = tl.load(S + b * sSb + rows * sSr + i * sSc, mask=live, other=1.0)
            z = tl.load(Z + b * sZb + rows * sZr + i * sZc, mask=live, other=0.0)
            lv = tl.minimum(tl.maximum(libdevice.rint(_div(w, s)) + z, 0.0), maxq)
            d = tl.load(Hinv + b * sHb + i * sHr + i * sHc)
            err = _div(w - _mul(s, lv - z), d)
            later = cols > i
            h = tl.load(Hinv + b * sHb + i * sHr + cols * sHc, mask=later & (cols < n), other=0.0)
            w_tile = tl.where(later[None, :], w_tile - _mul(err[:, None], h[None, :]), w_tile)
            tl.store(levels + b * sLb + rows * sLr + i * sLc, lv.to(tl.uint8), mask=live)
            tl.store(Err + b * sEb + rows * sEr + i * sEc, err, mask=live)

    @triton.jit
    def _grid(lo, hi, maxq, inv_maxq, min_scale, SYM: tl.constexpr):
        # gptq.core._grid for each row's range [lo, hi] (lo <= 0 <= hi), with its operations and rounding on CUDA,
        # where PyTorch divides by a Python number as a product with its fp32 reciprocal (``inv_maxq``)
        if SYM:
            hi = tl.maximum(tl.abs(lo), hi)
            lo = -hi
        flat = hi == lo
        lo = tl.where(flat, -1.0, lo)
        hi = tl.where(flat, 1.0, hi)
        scale = tl.maximum(_mul(hi - lo, inv_maxq), min_scale).to(tl.float16).to(tl.float32)
        if SYM:
            zero = tl.zeros_like(scale) + (maxq + 1.0) / 2.0
        else:
            zero = tl.minimum(tl.maximum(libdevice.rint(_div(-lo, scale)), 1.0), maxq)
        return scale, zero

    @triton.jit
    def _error(w, imp, s, z, maxq, HAS_IMP: tl.constexpr):
        # gptq.core.rounding_error of each row of w on its grid (s, z), the terms as gptq.core computes them
        lv = tl.minimum(tl.maximum(libdevice.rint(_div(w, s[:, None])) + z[:, None], 0.0), maxq)
        d = w - _mul(s[:, None], lv - z[:, None])
        e = _mul(d, d)
        if HAS_IMP:
            e = _mul(e, imp)
        return tl.sum(e, axis=1)

    @triton.jit
    def _search_kernel(W, Imp, Ratios, Scale, Zero, N, G, RG, width, n_ratios, maxq, inv_maxq, min_scale,
                       HAS_IMP: tl.constexpr, SYM: tl.constexpr, BLOCK_G: tl.constexpr, WIDTH: tl.constexpr):
        # W (B, R, G, width) as N = B * R * G rows of ``width``; Imp (B, 1, G, width); Scale, Zero (N,) out.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
        cols = tl.arange(0, WIDTH)
        live = rows < N
        mask = live[:, None] & (cols[None, :] < width)
        w = tl.load(W + rows[:, None] * width + cols[None, :], mask=mask, other=0.0)
        imp = w
        if HAS_IMP:
            at = (rows // RG) * G + rows % G
            imp = tl.load(Imp + at[:, None] * width + cols[None, :], mask=mask, other=0.0)
        lo = tl.minimum(tl.min(tl.where(mask, w, float("inf")), axis=1), 0.0)
        hi = tl.maximum(tl.max(tl.where(mask, w, float("-inf")), axis=1), 0.0)
        best_s, best_z = _grid(lo, hi, maxq, inv_maxq, min_scale, SYM)
        best = _error(w, imp, best_s, best_z, maxq, HAS_IMP)
        for k in range(n_ratios):
            r = tl.load(Ratios + k)
            s, z = _grid(_mul(lo, r), _mul(hi, r), maxq, inv_maxq, min_scale, SYM)
            e = _error(w, imp, s, z, maxq, HAS_IMP)
            better = e < best
            best = tl.where(better, e, best)
            best_s = tl.where(better, s, best_s)
            best_z = tl.where(better, z, best_z)
        tl.store(Scale + rows, best_s, mask=live)
        tl.store(Zero + rows, best_z, mask=live)


    @triton.jit
    def _silu_mul(g, u):
        # PyTorch's CUDA silu(g) (x / (1 + expf(-x)) in fp32) times u, each operation rounded on its own
        return _mul(_div(g, 1.0 + libdevice.exp(-g)), u)

    @triton.jit
    def _silu_mul_kernel(G, U, W, N, I, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
        # G (N = T * I elements) := silu(G) * U, times W[row] where HAS_W, in place
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < N
        h = _silu_mul(tl.load(G + offs, mask=live, other=0.0), tl.load(U + offs, mask=live, other=0.0))
        if HAS_W:
            h = _mul(h, tl.load(W + offs // I, mask=live, other=0.0))
        tl.store(G + offs, h, mask=live)

    @triton.jit
    def _gated_row_block(Y, r, sY, f, I, cols):
        # silu(gate * f) * (up * f) at ``cols`` of row r of Y (n, 2I), [gate | up]; 0 past I
        live = cols < I
        g = _mul(tl.load(Y + r * sY + cols, mask=live, other=0.0), f)
        u = _mul(tl.load(Y + r * sY + I + cols, mask=live, other=0.0), f)
        return _silu_mul(g, u)

    @triton.jit
    def _silu_mul_half_rows_kernel(Y, F, H, Inv, I, sY, sH, HALF_PEAK_EXPONENT: tl.constexpr, BLOCK: tl.constexpr):
        # Row r of Y (n, 2I), [gate | up], times F[r]; h = silu(gate) * up; H[r] = fp16(h * 2^shift), Inv[r] = 2^-shift,
        # shift as gptq.core.half_rows makes it from the row's largest magnitude (0 for a non-finite row).
        r = tl.program_id(0).to(tl.int64)
        f = tl.load(F + r)
        peak = tl.zeros([BLOCK], dtype=tl.float32)
        bad = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, I, BLOCK):
            a = tl.abs(_gated_row_block(Y, r, sY, f, I, start + tl.arange(0, BLOCK)))
            peak = tl.where(a > peak, a, peak)
            bad = bad | ((a != a) | (a == float("inf"))).to(tl.int32)
        m = tl.max(peak, axis=0)
        exponent = ((m.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126  # frexp's, for normal and subnormal m
        exponent = tl.where(m == 0.0, 0, exponent)  # frexp(0) = (0, 0)
        shift = tl.minimum(tl.maximum(HALF_PEAK_EXPONENT - exponent, -126), 126)
        shift = tl.where(tl.max(bad, axis=0) > 0, 0, shift)
        scale = ((shift + 127) << 23).to(tl.float32, bitcast=True)
        tl.store(Inv + r, ((127 - shift) << 23).to(tl.float32, bitcast=True))
        for start in range(0, I, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            h = _gated_row_block(Y, r, sY, f, I, cols)
            tl.store(H + r * sH + cols, _mul(h, scale).to(tl.float16), mask=cols < I)


    @triton.jit
    def _silu_mul_rows_kernel(Y, H, N, I, sY, BLOCK: tl.constexpr):
        # H (n, I) := silu(gate) * up for each row of Y (n, 2I), [gate | up]; N = n * I
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < N
        r, c = offs // I, offs % I
        g = tl.load(Y + r * sY + c, mask=live, other=0.0)
        u = tl.load(Y + r * sY + I + c, mask=live, other=0.0)
        tl.store(H + offs, _silu_mul(g, u), mask=live)

    @triton.jit
    def _add_scaled_rows_kernel(Out, Index, X, Scores, N, C, sO, BLOCK: tl.constexpr):
        # Out[Index[i]] += X[i] * Scores[i] for the rows i of X (n, C); N = n * C. The product rounded on its own,
        # the sum an fp32 atomic add, as index_add_ makes it.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < N
        i, c = offs // C, offs % C
        t = tl.load(Index + i, mask=live, other=0).to(tl.int64)
        s = tl.load(Scores + i, mask=live, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=live, other=0.0)
        tl.atomic_add(Out + t * sO + c, _mul(x, s), mask=live)

    @triton.jit
    def _fp8_blocks_kernel(Codes, Scale, Out, N, C, nbi, bo, bi, BLOCK: tl.constexpr):
        # Out (R, C) fp32 := float32(bfloat16(float32(code) * Scale[r // bo, c // bi])); Codes float8_e4m3fn (never
        # NaN here: Fp8Experts keeps those parts dequantized); N = R * C. Triton's own conversion of the codes: a
        # decoding by hand lost -0.0's sign (Triton negates as 0 - x).
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < N
        r, c = offs // C, offs % C
        x = tl.load(Codes + offs, mask=live, other=0.0).to(tl.float32)
        s = tl.load(Scale + (r // bo) * nbi + c // bi, mask=live, other=0.0)
        tl.store(Out + offs, _mul(x, s).to(tl.bfloat16).to(tl.float32), mask=live)

    @triton.jit
    def _levels_kernel(Q, Scales, Zeros, Out, N, C, G, width, PACKED: tl.constexpr, BLOCK: tl.constexpr):
        # Out (R, C) fp32 := scale * (level - zero) of each weight's group; levels two to a byte (even column in the
        # low nibble) where PACKED; Scales (R, G) fp16, Zeros (R, G) uint8; N = R * C
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < N
        r, c = offs // C, offs % C
        if PACKED:
            byte = tl.load(Q + r * (C // 2) + c // 2, mask=live, other=0).to(tl.int32)
            lv = tl.where((c % 2) == 0, byte & 15, byte >> 4)
        else:
            lv = tl.load(Q + offs, mask=live, other=0).to(tl.int32)
        g = r * G + c // width
        s = tl.load(Scales + g, mask=live, other=0.0).to(tl.float32)
        z = tl.load(Zeros + g, mask=live, other=0).to(tl.float32)
        tl.store(Out + offs, _mul(s, lv.to(tl.float32) - z), mask=live)


SILU_BLOCK = 1024  # elements per program of silu_mul, columns per step of a row in silu_mul_half_rows
ELEMENTS_BLOCK = 1024  # elements per program of the elementwise kernels below
FP8_CAPABILITY = (8, 9)  # the oldest GPUs (Ada, then Hopper) whose Triton converts float8_e4m3fn


def silu_mul(g: Tensor, u: Tensor, weights: Tensor | None = None) -> Tensor | None:
    """silu(g) * u (times ``weights`` (T,), each row's) for g, u (T, I) fp32 on CUDA, into g, in one kernel with
    the bits of PyTorch's ``silu(g) * u * weights[:, None]``. None where it does not apply (no CUDA or Triton, other
    dtypes or layouts): the caller computes it with PyTorch."""
    if (not available(g.device) or g.dtype != torch.float32 or u.dtype != torch.float32 or g.dim() != 2
            or g.shape != u.shape or not (g.is_contiguous() and u.is_contiguous())):
        return None
    T, I = g.shape
    w = None if weights is None else weights.float().contiguous()
    if g.numel():
        _silu_mul_kernel[(triton.cdiv(g.numel(), SILU_BLOCK),)](g, u, g if w is None else w, g.numel(), I,
                                                                HAS_W=w is not None, BLOCK=SILU_BLOCK)
    return g


def silu_mul_half_rows(Y: Tensor, factors: Tensor) -> tuple[Tensor, Tensor] | None:
    """For Y (n, 2I) fp32 on CUDA, a gate/up product's rows [gate | up] before their powers of two ``factors`` (n,)
    are applied: ``half_rows(silu(gate * f) * (up * f))`` (gptq.core), fp16 (n, I) and each row's 1 / scale, in one
    kernel with the same bits. None where it does not apply (no CUDA or Triton, other dtypes or layouts): the
    caller makes it with PyTorch."""
    if not available(Y.device) or Y.dtype != torch.float32 or Y.dim() != 2 or Y.stride(1) != 1 or Y.shape[1] % 2:
        return None
    n, I = Y.shape[0], Y.shape[1] // 2
    H = torch.empty(n, I, device=Y.device, dtype=torch.float16)
    inv = torch.empty(n, device=Y.device)
    if n:
        _silu_mul_half_rows_kernel[(n,)](Y, factors.float().contiguous(), H, inv, I, Y.stride(0), H.stride(0),
                                         HALF_PEAK_EXPONENT=HALF_PEAK_EXPONENT, BLOCK=SILU_BLOCK)
    return H, inv


def silu_mul_rows(Y: Tensor) -> Tensor | None:
    """silu(gate) * up for each row of Y (n, 2I) fp32 on CUDA, [gate | up] (transformers' ``act_fn(gate) * up`` after
    ``chunk(2, dim=-1)``), as a new (n, I) tensor, in one kernel with the bits of PyTorch's two. None where it does
    not apply (no CUDA or Triton, other dtypes or layouts): the caller computes it with PyTorch."""
    if not available(Y.device) or Y.dtype != torch.float32 or Y.dim() != 2 or Y.stride(1) != 1 or Y.shape[1] % 2:
        return None
    n, I = Y.shape[0], Y.shape[1] // 2
    H = torch.empty(n, I, device=Y.device)
    if H.numel():
        _silu_mul_rows_kernel[(triton.cdiv(H.numel(), ELEMENTS_BLOCK),)](Y, H, H.numel(), I, Y.stride(0),
                                                                          BLOCK=ELEMENTS_BLOCK)
    return H


def add_scaled_rows(out: Tensor, index: Tensor, X: Tensor, scores: Tensor) -> bool:
    """``out.index_add_(0, index, X * scores[:, None])`` for out (T, C) and X (n, C) fp32 on CUDA in one kernel, with
    its bits: each product rounded on its own, each sum index_add_'s fp32 atomic add. False where it does not apply
    (nothing is done then: the caller runs PyTorch's two)."""
    if (not available(out.device) or out.dtype != torch.float32 or X.dtype != torch.float32 or out.dim() != 2
            or X.dim() != 2 or out.stride(1) != 1 or not X.is_contiguous() or X.shape[1] != out.shape[1]
            or index.shape != (X.shape[0],) or scores.shape != (X.shape[0],)
            or scores.dtype not in (torch.float32, torch.bfloat16, torch.float16)):
        return False
    if X.numel():
        _add_scaled_rows_kernel[(triton.cdiv(X.numel(), ELEMENTS_BLOCK),)](
            out, index.contiguous(), X, scores.contiguous(), X.numel(), X.shape[1], out.stride(0), BLOCK=ELEMENTS_BLOCK)
    return True


def fp8_blocks_as_bf16(codes: Tensor, scale: Tensor, block: tuple[int, int], out: Tensor) -> bool:
    """``out`` (R, C) fp32 := the BF16 numbers of float32(codes) * scale, each weight's block's scale (``scale``
    (ceil(R / bo), ceil(C / bi)) fp32, ``block`` (bo, bi)), as formats.fp8's dequantization makes them, in one kernel
    with its bits. ``codes`` (R, C) float8_e4m3fn without NaN codes. False where it does not apply (nothing is
    written then), a GPU older than compute capability 8.9 included: Triton has no float8_e4m3fn there (A100s)."""
    if (not available(codes.device) or codes.dtype != torch.float8_e4m3fn or scale.dtype != torch.float32
            or out.dtype != torch.float32 or codes.dim() != 2 or out.shape != codes.shape
            or not (codes.is_contiguous() and out.is_contiguous())
            or torch.cuda.get_device_capability(codes.device) < FP8_CAPABILITY):
        return False
    R, C = codes.shape
    bo, bi = block
    if scale.shape != (-(-R // bo), -(-C // bi)):
        return False
    if codes.numel():
        _fp8_blocks_kernel[(triton.cdiv(codes.numel(), ELEMENTS_BLOCK),)](
            codes, scale.contiguous(), out, codes.numel(), C, scale.shape[1], bo, bi,
            BLOCK=ELEMENTS_BLOCK)
    return True


def dequantize_levels(q: Tensor, scales: Tensor, zeros: Tensor, columns: int, packed: bool) -> Tensor | None:
    """gptq.core.dequantize_grouped of one matrix's levels q (R, C) uint8, or (R, C / 2) two to a byte where
    ``packed`` (stages.experts.Levels), with its grids ``scales`` (R, G) fp16 and ``zeros`` (R, G) uint8: the (R, C)
    fp32 weights in one kernel, with its bits. None where it does not apply."""
    if (not available(q.device) or q.dtype != torch.uint8 or scales.dtype != torch.float16
            or zeros.dtype != torch.uint8 or q.dim() != 2 or not (q.is_contiguous() and scales.is_contiguous()
                                                               and zeros.is_contiguous())):
        return None
    R, G = scales.shape
    if q.shape != (R, columns // 2 if packed else columns) or columns % G or (packed and columns % 2):
        return None
    out = torch.empty(R, columns, device=q.device)
    if out.numel():
        _levels_kernel[(triton.cdiv(out.numel(), ELEMENTS_BLOCK),)](q, scales, zeros, out, out.numel(), columns, G,
                                                                     columns // G, PACKED=packed,
                                                                     BLOCK=ELEMENTS_BLOCK)
    return out


def fp32_reciprocal(x: float) -> float:
    """1 / x rounded to fp32, as PyTorch's CUDA kernels make it to divide a tensor by a Python number (they multiply
    by it, which may differ from the division in the last bit)."""
    return float(torch.tensor(1.0) / torch.tensor(float(x)))


_ratios: dict[tuple[torch.device, tuple[float, ...]], Tensor] = {}


def _on_device(ratios: list[float], device: torch.device) -> Tensor:
    """The clipping ratios as an fp32 tensor on ``device``, made once: a tensor made from a list copies it from
    ordinary host memory, which waits for the device's queue (a solve calls the search once per chunk)."""
    key = (device, tuple(ratios))
    if key not in _ratios:
        _ratios[key] = torch.tensor(ratios, dtype=torch.float32, device=device)
    return _ratios[key]


SEARCH_WIDTH = 256  # the widest group the search kernel holds in registers; wider ones keep the PyTorch path
SEARCH_TILE = 4096  # weights per program


def search_grids(W: Tensor, spec: QuantSpec, ratios: list[float], importance: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """gptq.core.search_params' grids (scales, zeros (B, R, G)) for W (B, R, G, width), ``importance``
    (B, 1, G, width) or None, in one kernel that reads each group's weights once for every ratio instead of
    a chain of tensor-wide kernels per ratio. Each candidate's grid and each weight's error term are computed
    with PyTorch's operations and rounding; a group's terms are summed in the kernel's own order, so where two
    candidates' errors tie to within that rounding the kernel may keep the other one. None where it does not
    apply (no CUDA or Triton, groups wider than SEARCH_WIDTH, other shapes): the caller searches itself."""
    if not available(W.device) or W.dim() != 4 or W.dtype != torch.float32 or not W.is_contiguous():
        return None
    B, R, G, width = W.shape
    if width > SEARCH_WIDTH or W.numel() == 0:
        return None
    if importance is not None and (importance.shape != (B, 1, G, width) or importance.dtype != torch.float32):
        return None
    imp = importance.contiguous() if importance is not None else W  # W: a valid pointer the kernel never reads
    scale = torch.empty(B, R, G, device=W.device)
    zero = torch.empty_like(scale)
    ratios_t = _on_device(ratios, W.device)
    N, wide = B * R * G, triton.next_power_of_2(width)
    block = max(1, SEARCH_TILE // wide)
    _search_kernel[(triton.cdiv(N, block),)](W, imp, ratios_t, scale, zero, N, G, R * G, width, len(ratios),
                                             float(spec.maxq), fp32_reciprocal(spec.maxq), FP16_MIN_SCALE,
                                             HAS_IMP=importance is not None,
                                             SYM=spec.sym, BLOCK_G=block, WIDTH=wide)
    return scale, zero


class TritonBlocks:
    """A drop-in ``block_fn`` for gptq.gptq_quantize: the Triton kernel on CUDA tensors,
    quantize_block elsewhere. ``rows``: rows per program."""

    def __init__(self, rows: int = 32, num_warps: int = 4):
        self.rows, self.num_warps = rows, num_warps

    def __call__(self, W1: Tensor, Hinv1: Tensor, S1: Tensor, Z1: Tensor, maxq: int, levels1: Tensor) -> Tensor:
        if not available(W1.device) or W1.dtype != torch.float32:
            return quantize_block(W1, Hinv1, S1, Z1, maxq, levels1)
        B, R, n = W1.shape
        Err1 = torch.empty(B, R, n, device=W1.device, dtype=W1.dtype)
        S1, Z1 = S1.float(), Z1.float()
        grid = (triton.cdiv(R, self.rows), B)
        _block_kernel[grid](W1, Hinv1, S1, Z1, levels1, Err1, R, n, float(maxq),
                            *W1.stride(), *Hinv1.stride(), *S1.stride(), *Z1.stride(),
                            *levels1.stride(), *Err1.stride(),
                            BLOCK_R=self.rows, BLOCK_N=triton.next_power_of_2(n), num_warps=self.num_warps)
        return Err1
