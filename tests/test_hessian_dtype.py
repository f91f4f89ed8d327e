"""``--hessian-dtype bfloat16``: the statistics' products (Hessians, the fit's moments, the down projections'
inputs) take bf16-rounded inputs and sum them in fp32. What it computes, where it applies (the Hessians'
stage only, never the solve), that a run says so, and what it changes on the bundled demo."""

from __future__ import annotations

import pytest
import torch

import quantmoe
from quantmoe.base.options import QuantConfig
from quantmoe.base.paths import DEFAULT_MODEL, EVAL_DATA
from quantmoe.gptq.core import (
    accumulate_hessian,
    accumulate_moment,
    bf16_statistics,
    moment_sum,
    stat_mm,
)
from quantmoe.stages.evaluate import evaluate


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


def test_a_bad_dtype_is_one_error_line():
    from clirun import cli

    result = cli("quantize", DEFAULT_MODEL, "--hessian-dtype", "float16", "--device", "cpu", "--quiet")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "float16" in result.stderr and "bfloat16" in result.stderr


@pytest.fixture(scope="module")
def demo_reports(tmp_path_factory):
    base = tmp_path_factory.mktemp("hessian-dtype")
    data = base / "heldout.jsonl"
    data.write_text("".join(EVAL_DATA.read_text().splitlines(keepends=True)[:3]))
    out = {}
    for dtype in ("float32", "bfloat16"):
        folder = base / f"demo-{dtype}"
        summary = quantmoe.quantize(DEFAULT_MODEL, folder, QuantConfig(), run_eval=False, quiet=True, device="cpu",
                                    hessian_dtype=dtype)
        out[dtype] = (folder, summary, evaluate(folder, baseline=DEFAULT_MODEL, data=data, device="cpu", quiet=True))
    return out


def test_on_the_demo_bf16_statistics_leave_the_gap_and_the_kl_within_their_standard_errors(demo_reports):
    (f32, _, r32), (b16, _, r16) = demo_reports["float32"], demo_reports["bfloat16"]
    shard = "model-00001-of-00001.safetensors"
    assert (f32 / shard).read_bytes() != (b16 / shard).read_bytes()  # not the same computation
    assert r32["data"]["windows"] >= 20
    assert abs(r16["gap"]["relative"] - r32["gap"]["relative"]) < r32["gap"]["relative_se"]
    assert abs(r16["kl"]["mean"] - r32["kl"]["mean"]) < r32["kl"]["se"]


def test_a_bf16_run_says_so_in_its_manifest_and_log(demo_reports):
    import json

    (f32, _, _), (b16, _, _) = demo_reports["float32"], demo_reports["bfloat16"]
    for name in ("manifest.json", "quantization_log.json"):
        assert json.loads((b16 / name).read_text())["options"]["hessian_dtype"] == "bfloat16"
        assert "hessian_dtype" not in json.loads((f32 / name).read_text())["options"]  # float32 runs: as before
