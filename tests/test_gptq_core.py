"""The GPTQ core and the GPTQ v1 packing, on random matrices."""

import pytest
import torch

from quantmoe.gptq import QuantSpec, accumulate_hessian, dequantize, gptq_quantize, rtn_quantize
from quantmoe.packing import dequantize_linear, pack_result, unpack_linear


def correlated_inputs(T=2048, C=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, C, generator=g) @ torch.randn(C, C, generator=g) * 0.2


def hessian_of(X):
    H, _ = accumulate_hessian(torch.zeros(X.shape[1], X.shape[1]), X, 0)
    return H


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_and_packing_round_trips(bits, group_size, sym, act_order):
    X = correlated_inputs()
    W = torch.randn(2, 64, 128)
    spec = QuantSpec(bits, group_size, sym)
    res = gptq_quantize(W, hessian_of(X).expand(2, 128, 128), spec, act_order=act_order)
    rtn = rtn_quantize(W, spec)
    err_gptq = ((X @ (res.W[0] - W[0]).T) ** 2).mean()
    err_rtn = ((X @ (rtn.W[0] - W[0]).T) ** 2).mean()
    assert err_gptq < 0.7 * err_rtn
    assert torch.equal(res.W, dequantize(res.q, res.scales, res.zeros, res.g_idx))
    for b, packed in enumerate(pack_result(res, bits)):
        assert torch.equal(dequantize_linear(packed, bits), res.W[b])
        q, scales, zeros, g_idx = unpack_linear(packed, bits)
        assert torch.equal(q, res.q[b].long()) and torch.equal(zeros, res.zeros[b].long())


def test_packed_shapes_and_dtypes():
    res = rtn_quantize(torch.randn(1, 96, 256), QuantSpec(4, 128, True))
    packed = pack_result(res, 4)[0]
    assert packed["qweight"].shape == (256 * 4 // 32, 96) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (2, 96 * 4 // 32) and packed["qzeros"].dtype == torch.int32
    assert packed["scales"].shape == (2, 96) and packed["scales"].dtype == torch.float16
    assert packed["g_idx"].shape == (256,) and packed["g_idx"].dtype == torch.int32


def test_v1_zero_convention_and_low_bits_first():
    """Symmetric 4-bit zero is 8, stored as 7 in every nibble; level of column 0 sits in the low bits."""
    res = rtn_quantize(torch.randn(1, 8, 32), QuantSpec(4, 32, True))
    packed = pack_result(res, 4)[0]
    assert int(packed["qzeros"][0, 0]) == 0x77777777
    assert int(packed["qweight"][0, 0]) & 0xF == int(res.q[0, 0, 0])


def test_act_order_keeps_g_idx_monotonic():
    X = correlated_inputs()
    res = gptq_quantize(torch.randn(1, 32, 128), hessian_of(X)[None], QuantSpec(4, 32, True), act_order=True)
    assert torch.equal(res.g_idx, torch.arange(128, dtype=torch.int32) // 32)


def test_singular_hessian_raises_dampening_and_stays_finite():
    """A rank-1 Hessian with one dead input: Cholesky needs more dampening; nothing is NaN or zeroed."""
    x = torch.randn(1, 64)
    x[0, 5] = 0
    H = (x.T @ x)[None]
    W = torch.randn(1, 16, 64)
    res = gptq_quantize(W, H, QuantSpec(4, 32, True), damp=1e-12)
    assert torch.isfinite(res.W).all()
    assert res.damp[0] > 1e-12
    assert res.W[0, :, 5].abs().sum() > 0  # a dead input keeps its (rounded) weights


def test_hessian_accumulates_as_a_mean():
    X = torch.randn(100, 8)
    H = torch.zeros(8, 8)
    n = 0
    for chunk in X.split(30):
        H, n = accumulate_hessian(H, chunk, n)
    assert n == 100
    assert torch.allclose(H, 2 * X.T @ X / 100, atol=1e-5)


def test_inverse_factor_matches_cholesky_of_the_inverse():
    """U from the reversed factorisation is the upper Cholesky factor of (H + damp)^-1 (float64 reference)."""
    from quantmoe.gptq import damped_inverse_cholesky

    X = correlated_inputs(T=512, C=96).double()
    H = (2 * X.T @ X / 512)[None].repeat(2, 1, 1)
    H[1] *= 3
    damp = 0.01
    reference = torch.stack([
        torch.linalg.cholesky(torch.linalg.inv(h + damp * torch.diagonal(h).mean() * torch.eye(96, dtype=h.dtype)),
                              upper=True) for h in H])
    U, used = damped_inverse_cholesky(H.clone(), damp)
    assert torch.allclose(U, reference, rtol=1e-8, atol=1e-10)
    assert torch.equal(U, U.triu()) and torch.equal(used, torch.full((2,), damp, dtype=H.dtype))


def test_overwrite_H_gives_the_same_result_and_consumes_H():
    X = correlated_inputs()
    H = hessian_of(X).expand(2, 128, 128).contiguous()
    W = torch.randn(2, 64, 128)
    kept = gptq_quantize(W, H, QuantSpec(4, 32, True))
    H_copy = H.clone()
    handed_over = gptq_quantize(W, H_copy, QuantSpec(4, 32, True), overwrite_H=True)
    assert torch.equal(kept.q, handed_over.q) and torch.equal(kept.W, handed_over.W)
    assert not torch.equal(H_copy, H)  # it now holds the inverse factor


def test_tf32_context_restores_the_matmul_precision():
    from quantmoe.quantize_layer import tf32_matmuls

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with tf32_matmuls(True):
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    with tf32_matmuls(False):
        assert matmul.fp32_precision == before
