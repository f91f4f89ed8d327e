"""The memory budget of the routed experts (--gpu-memory): experts worked on in groups that fit it,
with the same output bytes for any grouping, and a one-line error naming the smallest budget."""

from __future__ import annotations

import pytest
from clirun import cli, quantize_args

import quantmoe
from quantmoe.base.options import QuantConfig
from quantmoe.model.architectures import architecture_for, plan_layer
from quantmoe.model.checkpoint import Checkpoint
from quantmoe.stages.experts import ExpertCosts


def costs_of(model) -> tuple[ExpertCosts, int]:
    """The default recipe's per-expert costs of the tiny model's MoE layers, and its expert count."""
    ckpt = Checkpoint(model)
    arch = architecture_for(ckpt.config)
    for i in range(ckpt.config.num_hidden_layers):
        plan = plan_layer(arch, ckpt.config, i)
        if plan.experts is not None:
            I, C = ckpt.shape(f"{ckpt.layer_prefix(i)}{plan.experts.linear('gate', 0)}.weight")
            return ExpertCosts(C, I, hessians=True, cross=True, fit_down=True), plan.num_experts
    raise AssertionError("no MoE layer")


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_the_output_is_the_same_for_any_budget(tiny_model, text_file, tmp_path, model_type):
    """Budgets that make groups of 1 expert, 2 experts and all experts give the same bytes (CPU: the
    budget counts the levels kept for the forward passes and each group's statistics)."""
    model = tiny_model(model_type)
    costs, E = costs_of(model)
    assert E >= 4

    def run(name, budget):
        out = tmp_path / name
        summary = quantmoe.quantize(model, out, QuantConfig(group_size=32), calib=text_file, nsamples=8, seqlen=32,
                                    run_eval=False, quiet=True, gpu_memory=budget)
        groups = {e["index"]: e.get("expert_groups") for e in _log(out)}
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}, groups, summary

    reference, groups_all, _ = run("all", None)
    for per in (1, 2):
        budget = costs.levels(E) + per * costs.per_expert
        got, groups, _ = run(f"groups-of-{per}", budget)
        assert got == reference, f"groups of {per} experts changed the output"
        moe = [g for g in groups.values() if g is not None]
        assert moe and all(g == -(-E // per) for g in moe), groups  # the budget did make groups of `per`
    assert all(g in (None, 1) for g in groups_all.values())


def _log(out):
    import json

    return json.loads((out / "quantization_log.json").read_text())["layers"]


def test_a_budget_too_small_for_one_expert_is_one_line_naming_the_smallest(tiny_model, text_file, tmp_path):
    model = tiny_model("mixtral")
    costs, E = costs_of(model)
    out = tmp_path / "out"
    result = cli(*quantize_args(model, out, text_file, "--gpu-memory", str(costs.levels(E) + costs.per_expert - 1)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --gpu-memory") and "too small for one expert" in lines[0]
    assert "use --gpu-memory" in lines[0] and "Traceback" not in result.stderr
    assert not out.exists()


def test_a_budget_that_is_not_a_size_is_one_line(tiny_model, text_file, tmp_path):
    result = cli(*quantize_args(tiny_model("mixtral"), tmp_path / "out", text_file, "--gpu-memory", "lots"))
    assert result.returncode == 2 and result.stderr.strip() == \
        "error: --gpu-memory 'lots' is not a size; write it like 70GB or 40GB"
