"""GPTQ's sequential block loop (gptq.quantize_block) as one Triton kernel per block.

GPTQ's rows are independent: within a block of n columns, row r's levels depend only on row r's
weights, grids and the block's part of the inverse factor. So each program takes a tile of rows,
holds their n weights in registers and runs the whole column loop on them, instead of a dozen
tensor-wide kernels per column (gptq_graphs.GraphedBlocks replays those from a CUDA graph; this
launches one kernel per block). Every operation is the one quantize_block performs, in the same
order and with the same rounding (division and product rounded on their own, never fused into an
FMA, rounding half to even), so the levels and errors are bit for bit those of quantize_block;
tests/test_gpu.py checks it. Needs CUDA and Triton; ``available()`` says whether both are here.

``error_terms`` is the clipping search's per-weight rounding error (gptq.rounding_error) as one
kernel instead of a chain of tensor-wide ones, again with the same operations and rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .core import quantize_block

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
            lv = tl.minimum(tl.maximum(libdevice.rint(libdevice.div_rn(w, s)) + z, 0.0), maxq)
            d = tl.load(Hinv + b * sHb + i * sHr + i * sHc)
            err = libdevice.div_rn(w - libdevice.mul_rn(s, lv - z), d)
            later = cols > i
            h = tl.load(Hinv + b * sHb + i * sHr + cols * sHc, mask=later & (cols < n), other=0.0)
            w_tile = tl.where(later[None, :], w_tile - libdevice.mul_rn(err[:, None], h[None, :]), w_tile)
            tl.store(levels + b * sLb + rows * sLr + i * sLc, lv.to(tl.uint8), mask=live)
            tl.store(Err + b * sEb + rows * sEr + i * sEc, err, mask=live)

    @triton.jit
    def _error_kernel(W, S, Z, Imp, Out, N, width, M, RM, maxq, HAS_IMP: tl.constexpr, BLOCK: tl.constexpr):
        # W (B, R, G, width) flat; S, Z (B, R, G); Imp (B, 1, G, width): M = G * width, RM = R * M.
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = idx < N
        w = tl.load(W + idx, mask=live, other=0.0)
        s = tl.load(S + idx // width, mask=live, other=1.0)
        z = tl.load(Z + idx // width, mask=live, other=0.0)
        lv = tl.minimum(tl.maximum(libdevice.rint(libdevice.div_rn(w, s)) + z, 0.0), maxq)
        d = w - libdevice.mul_rn(s, lv - z)
        e = libdevice.mul_rn(d, d)
        if HAS_IMP:
            e = libdevice.mul_rn(e, tl.load(Imp + (idx // RM) * M + idx % M, mask=live, other=0.0))
        tl.store(Out + idx, e, mask=live)


def error_terms(W: Tensor, scale: Tensor, zero: Tensor, maxq: int, importance: Tensor | None) -> Tensor | None:
    """gptq.rounding_error's terms importance * (w - Q(w))^2 for W (B, R, G, width) on the grids
    scale, zero (B, R, G, 1), importance (B, 1, G, width) or None, as one kernel; None where this
    kernel does not apply (no CUDA or Triton, other shapes), and the caller computes them itself."""
    if not available(W.device) or W.dim() != 4 or W.dtype != torch.float32 or not W.is_contiguous():
        return None
    B, R, G, width = W.shape
    if scale.shape != (B, R, G, 1) or zero.shape != (B, R, G, 1):
        return None
    if importance is not None and (importance.shape != (B, 1, G, width) or importance.dtype != torch.float32):
        return None
    S, Z = scale.float().contiguous(), zero.float().contiguous()
    imp = importance.contiguous() if importance is not None else S  # S: a valid pointer the kernel never reads
    out = torch.empty_like(W)
    N, block = W.numel(), 1024
    _error_kernel[(triton.cdiv(N, block),)](W, S, Z, imp, out, N, width, G * width, R * G * width, float(maxq),
                                            HAS_IMP=importance is not None, BLOCK=block)
    return out


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
