"""``--hessian-dtype bfloat16``: the statistics' products (Hessians, the fit's moments, the down projections'
inputs) take bf16-rounded inputs and sum them in fp32. What it computes, where it applies (the Hessians'
stage only, never the solve), and that a run says so. What it changes in quality is measured on the demo and
at Mixtral-8x7B's shapes in docs/method.md (too slow for this suite)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import quantmoe
import quantmoe.stages.experts
import quantmoe.stages.layer
from quantmoe.base.options import QuantConfig
from quantmoe.base.paths import DEFAULT_MODEL
from quantmoe.gptq import core
from quantmoe.gptq.core import (
    Operand,
    accumulate_hessian,
    accumulate_moment,
    bf16_statistics,
    half_products,
    moment_sum,
    operands,
    stat_mm,
)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


def test_the_statistics_are_those_of_the_rounded_inputs_and_only_inside_the_block():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(300, 24, generator=g), torch.randn(300, 16, generator=g)
    w = torch.rand(300, generator=g)
    with bf16_statistics(True):
        H, n = accumulate_hessian(torch.zeros(24, 24), X, 0)
        P, _ = accumulate_moment(torch.zeros(16, 24), Y, X, 0, w)
        S = torch.zeros(24, 24)
        moment_sum(S, X, X, w)
        M = stat_mm(Y.t(), X)
    assert n == 300
    assert torch.equal(H, accumulate_hessian(torch.zeros(24, 24), _bf16(X), 0)[0])
    wc = w.reshape(-1, 1)
    assert torch.equal(P, torch.zeros(16, 24).addmm_(_bf16(Y * wc).t(), _bf16(X * wc), alpha=2.0 / float(w.pow(2).sum())))
    assert torch.equal(S, _bf16(X * wc).t() @ _bf16(X * wc))
    assert torch.equal(M, _bf16(Y).t() @ _bf16(X))
    # rounding the inputs changes the statistics, and outside the block nothing is rounded
    H32, _ = accumulate_hessian(torch.zeros(24, 24), X, 0)
    assert not torch.equal(H, H32)
    assert torch.equal(stat_mm(Y.t(), X), Y.t() @ X)
    with bf16_statistics(False):
        assert torch.equal(accumulate_hessian(torch.zeros(24, 24), X, 0)[0], H32)


def test_half_operands_are_fp16_after_a_power_of_two_scale_and_only_inside_the_block(monkeypatch):
    """half_products (--tf32's statistics and routed experts, on CUDA; here on the CPU, which holds the rounded
    values in fp32): an operand whose largest magnitude lies in HALF_RANGE is rounded to fp16 as it is; one beyond
    fp16's range or below its normal numbers first takes the power of two that brings that magnitude to HALF_PEAK,
    and its factor undoes it exactly; a non-finite one is not scaled; the same tensor twice is one operand, an
    Operand is kept, bf16 statistics take precedence, and outside the block (or on another device) nothing is
    rounded. Products and moments are those of the rounded values."""
    monkeypatch.setattr(core, "HALF_DEVICES", ("cuda", "cpu"))
    g = torch.Generator().manual_seed(1)
    mid = torch.randn(64, 32, generator=g)
    big, small = mid * 1e7, mid * 1e-9
    bad = mid.clone()
    bad[3, 4] = float("inf")
    kept = Operand(mid * 2, 0.5)
    with half_products(True):
        m, again, b, s, inf, k = operands(mid, mid, big, small, bad, kept)
        M = stat_mm(big, mid.t())
        S = torch.zeros(32, 32)
        moment_sum(S, small, small)
        with bf16_statistics(True):
            (low,) = operands(mid)
    assert again is m and k is kept and m.factor == 1.0 and torch.equal(m.t, mid.half().float())
    for o, t in ((b, big), (s, small)):
        assert o.factor != 1.0 and math.log2(o.factor).is_integer()
        assert core.HALF_PEAK / 2 < float(o.t.abs().amax()) <= core.HALF_PEAK
        assert torch.equal(o.t, (t / o.factor).half().float())
    assert inf.factor == 1.0 and torch.isinf(inf.t).any()
    assert torch.equal(M, (b.t * b.factor) @ m.t.t())
    assert torch.equal(S, (s.t.t() @ s.t) * s.factor**2)
    assert torch.equal(low.t, mid.bfloat16().float())
    assert operands(mid)[0].t is mid
    monkeypatch.setattr(core, "HALF_DEVICES", ("cuda",))
    with half_products(True):
        assert operands(mid)[0].t is mid


def test_a_bad_dtype_is_one_error_line():
    from clirun import cli

    result = cli("quantize", DEFAULT_MODEL, "--hessian-dtype", "float16", "--device", "cpu", "--quiet")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "float16" in result.stderr and "bfloat16" in result.stderr


@pytest.fixture(scope="module")
def runs(tiny_model, text_file, tmp_path_factory):
    """The tiny Mixtral quantized with float32 and bfloat16 statistics, and ("half") with --tf32's fp16 statistics
    as CUDA makes them, here on the CPU (half_products in every stage, HALF_DEVICES patched, the experts taken as
    wide; the stages without statistics make no product through ``operands``)."""
    base = tmp_path_factory.mktemp("hessian-dtype")
    out = {}
    for dtype in ("float32", "bfloat16", "half"):
        out[dtype] = base / dtype
        with pytest.MonkeyPatch.context() as patch:
            if dtype == "half":  # its experts taken as wide, so that their down statistics take fp16 too
                patch.setattr(core, "HALF_DEVICES", ("cuda", "cpu"))
                patch.setattr(quantmoe.stages.layer, "tensor_core_passes", lambda enabled: half_products(True))
                patch.setattr(quantmoe.stages.experts, "half_forward", lambda *shapes: True)
            quantmoe.quantize(tiny_model("mixtral"), out[dtype], QuantConfig(group_size=32), calib=text_file,
                              nsamples=8, seqlen=64, run_eval=False, quiet=True, device="cpu",
                              hessian_dtype="float32" if dtype == "half" else dtype)
    return out


@pytest.mark.parametrize("wide", [False, True])
def test_down_statistics_take_fp16_operands_only_for_wide_experts(tiny_model, text_file, tmp_path, monkeypatch, wide):
    """Under --tf32's fp16 statistics, the routed experts' gate/up statistics take fp16 operands whatever their
    width, their down statistics only where the experts are wide (experts.half_forward, which their forward
    follows too): narrow experts' many small products keep fp32 operands (TF32 on CUDA). A rare expert's blend
    with all tokens (a few large products) takes fp16 operands either way."""
    monkeypatch.setattr(core, "HALF_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(quantmoe.stages.layer, "tensor_core_passes", lambda enabled: half_products(True))
    monkeypatch.setattr(quantmoe.stages.experts, "half_forward", lambda *shapes: wide)
    stage, rounded = [None], {"gate_up": [], "down": [], "blend": []}
    made = quantmoe.stages.layer.operands

    def spy(*ts):
        out = made(*ts)
        if stage[0] is not None:
            rounded[stage[0]] += [o.t is not t for o, t in zip(out, ts) if not isinstance(t, Operand)]
        return out

    def in_stage(name, method):
        def run(*args, **kwargs):
            stage[0] = name
            try:
                return method(*args, **kwargs)
            finally:
                stage[0] = None
        return run

    LQ = quantmoe.stages.layer.LayerQuantizer
    monkeypatch.setattr(quantmoe.stages.layer, "operands", spy)
    monkeypatch.setattr(LQ, "_gate_up_statistics", in_stage("gate_up", LQ._gate_up_statistics))
    monkeypatch.setattr(LQ, "_down_statistics", in_stage("down", LQ._down_statistics))
    sample = LQ._blend_sample
    monkeypatch.setattr(LQ, "_blend_sample", lambda *args: (sample(*args), stage.__setitem__(0, "blend"))[0])
    every_expert_rare = QuantConfig(group_size=32, rare_expert_tokens=10**6)  # so that each is blended too
    quantmoe.quantize(tiny_model("mixtral"), tmp_path / "out", every_expert_rare, calib=text_file,
                      nsamples=8, seqlen=64, run_eval=False, quiet=True, device="cpu")
    assert rounded["gate_up"] and all(rounded["gate_up"])
    assert rounded["down"] and all(r == wide for r in rounded["down"])
    assert rounded["blend"] and all(rounded["blend"])


def _log(folder):
    return json.loads((folder / "quantization_log.json").read_text())


def test_bf16_statistics_change_the_bytes_and_leave_gptqs_loss_within_rounding(runs):
    shard = "model-00001-of-00001.safetensors"
    assert (runs["float32"] / shard).read_bytes() != (runs["bfloat16"] / shard).read_bytes()
    losses = {d: [m["loss"] for layer in _log(f)["layers"] for m in layer["modules"]] for d, f in runs.items()}
    assert len(losses["float32"]) == len(losses["bfloat16"]) > 0
    total32, total16 = sum(losses["float32"]), sum(losses["bfloat16"])
    assert total32 > 0 and abs(total16 - total32) < 0.03 * total32  # the output error GPTQ reaches, per linear summed


def test_fp16_statistics_through_the_layer_change_the_bytes_and_leave_gptqs_loss_within_rounding(runs):
    """--tf32's fp16 statistics (scaled operands, factors carried through the gated products, the moments and the
    Hessians mirrored once), run through the whole layer: other bytes than float32's, GPTQ's loss within rounding."""
    shard = "model-00001-of-00001.safetensors"
    assert (runs["float32"] / shard).read_bytes() != (runs["half"] / shard).read_bytes()
    losses = {d: [m["loss"] for layer in _log(runs[d])["layers"] for m in layer["modules"]] for d in ("float32", "half")}
    assert len(losses["float32"]) == len(losses["half"]) > 0
    total32, half = sum(losses["float32"]), sum(losses["half"])
    assert total32 > 0 and abs(half - total32) < 0.01 * total32


def test_a_bf16_run_says_so_in_its_manifest_and_log(runs):
    for name in ("manifest.json", "quantization_log.json"):
        assert json.loads((runs["bfloat16"] / name).read_text())["options"]["hessian_dtype"] == "bfloat16"
        assert "hessian_dtype" not in json.loads((runs["float32"] / name).read_text())["options"]  # as before
