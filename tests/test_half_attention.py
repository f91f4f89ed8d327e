"""Attention on fp16 copies of its inputs under --tf32 (quantmoe.model.stream.half_sdpa): the power-of-two
scaling that keeps any magnitude within fp16's range and precision, and that nothing changes outside it.
The CUDA path itself is checked in test_gpu.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from quantmoe.model.stream import (
    half_attention_in_sdpa,
    half_sdpa,
    scaled_half_sdpa,
    tensor_core_passes,
)

MODULE = SimpleNamespace(is_causal=True, num_key_value_groups=1)


def qkv(magnitude: float, dk: int = 48, dv: int = 32, seed: int = 0):
    """(batch 2, heads 3, 64 tokens, dk/dv) queries, keys and values at ``magnitude``; keys and values differ
    in head size as DeepSeek's MLA's do."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 3, 64, dk, generator=g) * magnitude for _ in range(2))
    v = torch.randn(2, 3, 64, dv, generator=g) * magnitude
    return q, k, v


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 3e5])
def test_scaled_half_attention_is_fp32_attention_within_fp16_rounding_at_any_magnitude(magnitude):
    """Without the scaling, 3e5 overflows fp16 and 1e-6 falls among its subnormals: both would fail."""
    q, k, v = qkv(magnitude)
    scaling = 0.3 / magnitude**2  # keeps the softmax away from both one-hot and uniform at every magnitude
    ref, _ = sdpa_attention_forward(MODULE, q, k, v, None, scaling=scaling)
    out, _ = scaled_half_sdpa(MODULE, q, k, v, None, scaling=scaling)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert 0 < relative(out, ref) < 2e-3  # fp16 was used, with its 10-bit mantissa


def test_scaled_half_attention_takes_the_default_scale_when_none_is_given():
    q, k, v = qkv(1.0)
    ref, _ = sdpa_attention_forward(MODULE, q, k, v, None)
    out, _ = scaled_half_sdpa(MODULE, q, k, v, None)
    assert relative(out, ref) < 2e-3


def test_inputs_with_a_non_finite_value_keep_the_fp32_kernel():
    q, k, v = qkv(1.0)
    v[0, 0, 5, 0] = float("inf")
    ref, _ = sdpa_attention_forward(MODULE, q, k, v, None)
    out, _ = scaled_half_sdpa(MODULE, q, k, v, None)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


def test_half_sdpa_is_transformers_sdpa_outside_cuda_and_outside_tensor_core_passes():
    half_attention_in_sdpa()
    assert AttentionInterface()["sdpa"] is half_sdpa
    half_attention_in_sdpa()  # idempotent
    assert AttentionInterface()["sdpa"] is half_sdpa
    q, k, v = qkv(1.0)
    ref, _ = sdpa_attention_forward(MODULE, q, k, v, None)
    for enabled in (False, True):  # on the CPU the context changes nothing
        with tensor_core_passes(enabled):
            out, _ = half_sdpa(MODULE, q, k, v, None)
        assert torch.equal(out, ref)
