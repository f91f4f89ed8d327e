"""``quantmoe eval --dtype bfloat16``: the forward passes in bfloat16, the logits, losses and KL in float32.
What it changes on the bundled demo's GPTQ export, against the float32 protocol, and that the reports say
so and are not compared with each other."""

from __future__ import annotations

import pytest

import quantmoe
from quantmoe.apps.regress import check_comparable
from quantmoe.base.errors import QuantMoeError
from quantmoe.base.options import QuantConfig
from quantmoe.base.paths import DEFAULT_MODEL, EVAL_DATA
from quantmoe.stages.evaluate import BF16, evaluate


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    base = tmp_path_factory.mktemp("dtype")
    data = base / "heldout.jsonl"
    data.write_text("".join(EVAL_DATA.read_text().splitlines(keepends=True)[:3]))
    out = base / "demo-gptq"
    # 32 calibration sequences rather than the default 128 (a quarter of the time): what is compared is two
    # evaluations of one GPTQ export, whose gap and KL stay those of a 4-bit export of the demo.
    quantmoe.quantize(DEFAULT_MODEL, out, QuantConfig(), nsamples=32, run_eval=False, quiet=True, device="cpu")
    return {dtype: evaluate(out, baseline=DEFAULT_MODEL, data=data, device="cpu", quiet=True, dtype=dtype)
            for dtype in ("float32", "bfloat16")}


def test_bfloat16_leaves_the_gap_within_its_standard_error_and_moves_the_kl_by_a_few_percent(reports):
    fp32, bf16 = reports["float32"], reports["bfloat16"]
    assert fp32["data"]["windows"] >= 20
    assert abs(bf16["gap"]["relative"] - fp32["gap"]["relative"]) < fp32["gap"]["relative_se"]
    assert abs(bf16["kl"]["mean"] - fp32["kl"]["mean"]) < 0.05 * fp32["kl"]["mean"]
    # not the same computation: the perplexities themselves move
    assert bf16["results"]["original"]["perplexity"] != fp32["results"]["original"]["perplexity"]


def test_the_report_states_the_dtype_and_regress_refuses_to_mix_them(reports):
    assert reports["float32"]["protocol"]["dtype"] == "float32"
    assert reports["bfloat16"]["protocol"]["dtype"] == BF16
    with pytest.raises(QuantMoeError, match="protocol"):
        check_comparable(reports["float32"], reports["bfloat16"])


def test_an_unknown_dtype_is_one_error_line(tmp_path):
    from clirun import cli

    result = cli("eval", DEFAULT_MODEL, "--dtype", "float16", "--device", "cpu", "--quiet")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "float16" in result.stderr
