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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FP16_MIN_SCALE = 2.0**-24  # smallest positive fp16 (subnormal); a scale must survive the fp16 round trip


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
    W: Tensor        # (B, R, C) fp32, the dequantized weights: scales * (q - zeros)
    loss: Tensor     # (B, R) fp32, GPTQ's per-row squared error proxy (0 for RTN)
    damp: Tensor     # (B,) fp32, the dampening fraction that made H positive definite


def accumulate_hessian(H: Tensor, X: Tensor, n_seen: int) -> tuple[Tensor, int]:
    """Fold the rows of X (T, C) into the running Hessian H (C, C) = 2/n sum x x^T, in fp32."""
    T = X.shape[0]
    if T == 0:
        return H, n_seen
    X = X.reshape(T, -1).float()
    n_total = n_seen + T
    H.mul_(n_seen / n_total)
    H.addmm_(X.t(), X, alpha=2.0 / n_total)
    return H, n_total


def find_params(W: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per-row min/max quantization grid for W (..., R, k): scales (fp16-exact) and zeros (..., R)."""
    wmin = W.amin(dim=-1).clamp(max=0)
    wmax = W.amax(dim=-1).clamp(min=0)
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


def quantize_levels(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer levels of w on the grid (scale, zero), all broadcastable."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def group_params(W: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Static grid of every group: W (B, R, C) -> scales, zeros (B, R, G)."""
    B, R, C = W.shape
    width = spec.width(C)
    G = spec.groups(C)
    pad = G * width - C
    Wg = torch.nn.functional.pad(W, (0, pad)) if pad else W
    Wg = Wg.reshape(B, R, G, width)
    return find_params(Wg, spec)


def rtn_quantize(W: Tensor, spec: QuantSpec) -> QuantResult:
    """Round-to-nearest baseline on the same grid and format as GPTQ."""
    W = W.float()
    B, R, C = W.shape
    scales, zeros = group_params(W, spec)
    g_idx = torch.arange(C, device=W.device) // spec.width(C)
    s, z = scales[..., g_idx], zeros[..., g_idx]
    q = quantize_levels(W, s, z, spec.maxq)
    return QuantResult(
        q=q.to(torch.uint8), scales=scales.half(), zeros=zeros.to(torch.uint8),
        g_idx=g_idx.int(), W=s * (q - z), loss=torch.zeros(B, R, device=W.device),
        damp=torch.zeros(B, device=W.device),
    )


def damped_inverse_cholesky(H: Tensor, damp: float, max_tries: int = 16) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1 for H (B, C, C).

    Dampening is multiplied by 10 for each matrix whose factorisation fails.
    Returns (Hinv (B, C, C), damp used (B,)).
    """
    B, C, _ = H.shape
    eye = torch.eye(C, device=H.device, dtype=H.dtype)
    mean_diag = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1).clamp(min=1e-8)  # (B,)
    used = torch.full((B,), damp, device=H.device, dtype=H.dtype)
    L = torch.empty_like(H)
    todo = torch.arange(B, device=H.device)
    for _ in range(max_tries):
        Hd = H[todo] + (used[todo] * mean_diag[todo])[:, None, None] * eye
        L_try, info = torch.linalg.cholesky_ex(Hd)
        ok = info == 0
        L[todo[ok]] = L_try[ok]
        todo = todo[~ok]
        if todo.numel() == 0:
            break
        used[todo] *= 10
    if todo.numel():
        raise RuntimeError(f"Hessian is not positive definite even with dampening {float(used[todo].max()):g}")
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True), used


def gptq_quantize(W: Tensor, H: Tensor, spec: QuantSpec, damp: float = 0.01,
                  act_order: bool = True, block_size: int = 128) -> QuantResult:
    """Quantize W (B, R, C) column by column, spreading each rounding error over the
    not-yet-quantized columns in proportion to the inverse Hessian H (B, C, C).
    """
    W = W.float().clone()
    H = H.float().clone()
    B, R, C = W.shape
    dev = W.device
    batch = torch.arange(B, device=dev)

    dead = torch.diagonal(H, dim1=-2, dim2=-1) == 0  # (B, C)
    H.diagonal(dim1=-2, dim2=-1)[dead] = 1.0

    width = spec.width(C)
    static = act_order or spec.group_size == -1
    if static:
        scales, zeros = group_params(W, spec)  # (B, R, G) from the original weights
    else:
        scales = torch.empty(B, R, spec.groups(C), device=dev)
        zeros = torch.empty_like(scales)

    if act_order:
        perm = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)  # (B, C)
    else:
        perm = torch.arange(C, device=dev).expand(B, C)
    W = torch.gather(W, 2, perm[:, None, :].expand(B, R, C))
    H = H[batch[:, None, None], perm[:, :, None], perm[:, None, :]]
    group_of = perm // width  # (B, C): group of each permuted column

    Hinv, damp_used = damped_inverse_cholesky(H, damp)
    Q = torch.zeros_like(W)
    levels = torch.zeros_like(W)
    losses = torch.zeros(B, R, device=dev)

    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        W1 = W[:, :, i1:i2]                 # a view: in-block updates land in W
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % width == 0:
                g = col // width
                scales[:, :, g], zeros[:, :, g] = find_params(W[:, :, col:col + width], spec)
            g = group_of[:, col]                          # (B,)
            s, z = scales[batch, :, g], zeros[batch, :, g]  # (B, R)
            w = W1[:, :, i]                                 # (B, R)
            d = Hinv1[:, i, i]                              # (B,)
            lv = quantize_levels(w, s, z, spec.maxq)
            q = s * (lv - z)
            levels[:, :, col] = lv
            Q[:, :, col] = q
            losses += (w - q) ** 2 / d[:, None] ** 2 / 2
            err = (w - q) / d[:, None]                       # (B, R)
            W1[:, :, i:] -= err[:, :, None] * Hinv1[:, None, i, i:]
            Err1[:, :, i] = err
        W[:, :, i2:] -= Err1 @ Hinv[:, i1:i2, i2:]

    inv = torch.argsort(perm, dim=-1)[:, None, :].expand(B, R, C)
    return QuantResult(
        q=torch.gather(levels, 2, inv).to(torch.uint8),
        scales=scales.half(),
        zeros=zeros.to(torch.uint8),
        g_idx=(torch.arange(C, device=dev) // width).int(),
        W=torch.gather(Q, 2, inv),
        loss=losses,
        damp=damp_used,
    )


def dequantize(q: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor) -> Tensor:
    """W = scale * (q - zero) for q (..., R, C) with per-group scales/zeros (..., R, G)."""
    g = g_idx.long()
    return scales.float()[..., g] * (q.float() - zeros.float()[..., g])
