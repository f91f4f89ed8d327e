"""The memory budget of the routed experts (--gpu-memory): experts worked on in groups that fit it,
with the same output bytes for any grouping, and a one-line error naming the smallest budget."""

from __future__ import annotations

import pytest
import torch
from clirun import cli, quantize_args
from torch import Tensor

import quantmoe
from quantmoe.base.options import QuantConfig
from quantmoe.model.architectures import architecture_for, plan_layer
from quantmoe.model.checkpoint import Checkpoint
from quantmoe.stages.experts import ExpertCosts, StoredExperts, expert_groups


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
    """Budgets that make groups of 1 expert, of 2 or 3, and of all experts give the same bytes (CPU: the
    budget counts the levels kept for the forward passes and each group's rows and statistics)."""
    model = tiny_model(model_type)
    costs, E = costs_of(model)
    assert E >= 4

    def run(name, budget):
        out = tmp_path / name
        quantmoe.quantize(model, out, QuantConfig(group_size=32), calib=text_file, nsamples=8, seqlen=32,
                          run_eval=False, quiet=True, gpu_memory=budget)
        layers = [e for e in _log(out) if e.get("expert_groups") is not None]
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}, layers

    reference, layers = run("all", None)
    assert layers and all(e["expert_groups"] == 1 for e in layers)
    # Budgets from the routed tokens the unbudgeted run logged: room for the costliest expert alone (groups
    # of 1: here one expert's statistics outweigh any difference in routed rows), for two of it (groups of
    # 2 or 3), and for every expert (the groups are formed in order, as many experts as fit).
    tokens = [e["expert_tokens"] for e in layers]
    largest = max(costs.of(t) for ts in tokens for t in ts)
    everything = max(sum(costs.of(t) for t in ts) for ts in tokens)
    for room, fewest, most in ((largest, E, E), (2 * largest, -(-E // 3), E - 1), (everything, 1, 1)):
        budget = costs.levels(E) + room
        planned = [len(expert_groups(budget, costs.levels(E), costs, ts, 0)) for ts in tokens]
        assert all(fewest <= n <= most for n in planned), (room, planned)
        got, layers = run(f"room-{room}", budget)
        assert got == reference, f"groups {planned} changed the output"
        assert [e["expert_groups"] for e in layers] == planned  # the run made the groups the budget allows


def _log(out):
    import json

    return json.loads((out / "quantization_log.json").read_text())["layers"]


def test_a_budget_too_small_for_one_expert_is_one_line_naming_the_smallest(tiny_model, text_file, tmp_path):
    model = tiny_model("mixtral")
    costs, E = costs_of(model)
    out = tmp_path / "out"
    result = cli(*quantize_args(model, out, text_file, "--gpu-memory", str(costs.levels(E) + costs.of(0) - 1)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --gpu-memory") and "too small for one expert" in lines[0]
    assert "use --gpu-memory" in lines[0] and "Traceback" not in result.stderr
    assert not out.exists()


def test_a_budget_that_is_not_a_size_is_one_line(tiny_model, text_file, tmp_path):
    result = cli(*quantize_args(tiny_model("mixtral"), tmp_path / "out", text_file, "--gpu-memory", "lots"))
    assert result.returncode == 2 and result.stderr.strip() == \
        "error: --gpu-memory 'lots' is not a size; write it like 70GB or 40GB"


def test_an_experts_forward_products_cut_into_row_blocks_round_alike_and_the_same_every_time():
    """StoredExperts.run_deferred with row blocks of a few rows (a small ``product_bytes``) gives the
    outputs of one product per expert to within fp32 rounding, and the same bits on every run."""
    g = torch.Generator().manual_seed(0)
    E, I, C, T, k = 4, 24, 16, 40, 2
    store = StoredExperts(torch.randn(E, 2 * I, C, generator=g), torch.randn(E, C, I, generator=g), torch.nn.SiLU())
    calls = []
    for _ in range(3):
        index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        calls.append((torch.randn(T, C, generator=g), index, torch.rand(T, k, generator=g)))
    whole = torch.cat(store.run_deferred(calls))
    small = (3 * I + C) * 4 * 5  # five rows a product
    blocks = [torch.cat(store.run_deferred(calls, product_bytes=small)) for _ in range(2)]
    assert torch.equal(blocks[0], blocks[1])
    assert (blocks[0] - whole).abs().amax() <= 4 * torch.finfo(torch.float32).eps * whole.abs().amax()
    one_call = torch.cat([store.run_deferred([c])[0] for c in calls])  # forward's own computation, per call
    assert torch.equal(torch.cat(store.run_deferred(calls, per_product=1)), one_call)


def test_an_experts_fp16_forward_products_hold_each_rows_result_whatever_rows_are_beside_it(monkeypatch):
    """Under half_products (--tf32 on CUDA; here on the CPU, which holds the rounded values in fp32) the routed
    experts' forward products take fp16 operands where the experts are wide (``half``), each input row and each
    weight matrix scaled by its own power of two (core.half_rows): a row's result does not depend on the rows it
    is computed with (products per call and over several calls give the same bits), it is fp16's rounding of the fp32 result, even for inputs far outside fp16's range, and outside
    the block nothing is rounded."""
    from quantmoe.gptq import core

    g = torch.Generator().manual_seed(0)
    E, I, C, T, k = 4, 24, 16, 40, 2
    store = StoredExperts(torch.randn(E, 2 * I, C, generator=g) * 1e-3, torch.randn(E, C, I, generator=g) * 1e3,
                          torch.nn.SiLU())
    assert not store.half  # no top_k given: never
    store.half = True  # as for wide experts (half_forward)
    calls = []
    for scale in (1.0, 1e-9, 1e7):  # one call's inputs underflow fp16, another's overflow it, unscaled
        index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        calls.append((torch.randn(T, C, generator=g) * scale, index, torch.rand(T, k, generator=g)))
    exact = [o.double() for o in store.run_deferred(calls)]
    monkeypatch.setattr(core, "HALF_DEVICES", ("cuda", "cpu"))
    with core.half_products(True):
        together = store.run_deferred(calls)
        alone = [store.run_deferred([c])[0] for c in calls]
        tiny_blocks = store.run_deferred(calls, product_bytes=(3 * I + C) * 4 * 3)
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
    for half, ref, small in zip(together, exact, tiny_blocks):
        for out in (half, small):  # rounded as fp16 (10-bit mantissa), not fp32, and not lost to fp16's range
            assert 1e-6 < float((out.double() - ref).abs().amax() / ref.abs().amax()) < 4e-3
    with core.half_products(False):
        assert all(torch.equal(a, b.float()) for a, b in zip(store.run_deferred(calls), exact))


@pytest.mark.parametrize("name, experts, top_k, width, hidden, wide", [
    ("Mixtral-8x7B", 8, 2, 14336, 4096, True), ("DeepSeek-V3", 256, 8, 2048, 7168, False),
    ("Qwen3-30B-A3B", 128, 8, 768, 2048, False), ("Qwen3-235B-A22B", 128, 8, 1536, 4096, False)])
def test_the_fp16_forward_is_for_wide_experts_only(name, experts, top_k, width, hidden, wide):
    """StoredExperts runs its forward products on fp16 under --tf32 (``half``) where each expert's products over a
    product group's rows are large: Mixtral's few wide experts, where it was measured faster, and not DeepSeek-V3's
    or Qwen3's many narrow ones, where the operands' scaling per expert cost more than it saved (benchmarks/README.md).
    From the shapes alone (here on the meta device), and never without the experts per token."""
    gate_up, down = torch.empty(experts, 2 * width, hidden, device="meta"), torch.empty(experts, hidden, width,
                                                                                        device="meta")
    assert StoredExperts(gate_up, down, torch.nn.SiLU(), top_k=top_k).half is wide, name
    assert not StoredExperts(gate_up, down, torch.nn.SiLU()).half


def test_a_batchs_routes_give_each_expert_its_tokens_in_order_and_a_group_its_pairs_in_one_piece():
    """experts.routes: expert e's tokens are those whose top-k holds e, ascending, with the router's score of
    each; a group of experts' pairs (``pairs``) are theirs expert after expert, consecutive or not; slot
    ``num_experts`` (routed nowhere) is dropped; ``first`` keeps an expert's first pairs and no other's changes."""
    from quantmoe.stages.experts import routes

    gen = torch.Generator().manual_seed(0)
    E, T, k = 6, 40, 3
    index = torch.stack([torch.randperm(E + 1, generator=gen)[:k] for _ in range(T)])
    weight = torch.rand(T, k, generator=gen)
    r = routes(index, weight, E)

    def expected(e: int) -> tuple[Tensor, Tensor]:
        tokens, slots = (index == e).nonzero(as_tuple=True)
        return tokens, weight[tokens, slots]

    assert r.counts == [int((index == e).sum()) for e in range(E)]
    for e in range(E):
        assert all(torch.equal(a, b) for a, b in zip(r[e], expected(e)))
    for group in ([1, 2, 3], [4, 0, 5], [2]):
        tokens, scores = r.pairs(group)
        assert torch.equal(tokens, torch.cat([expected(e)[0] for e in group]))
        assert torch.equal(scores, torch.cat([expected(e)[1] for e in group]))
    for n in (0, 2):
        cut = r.first(2, n)
        assert cut.counts == [min(n, c) if e == 2 else c for e, c in enumerate(r.counts)]
        assert torch.equal(cut[2][0], expected(2)[0][:n]) and torch.equal(cut[2][1], expected(2)[1][:n])
        assert all(torch.equal(cut[e][0], r[e][0]) and torch.equal(cut[e][1], r[e][1]) for e in range(E) if e != 2)
