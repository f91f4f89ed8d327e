"""Expert-parallel layers (issue 22): under torchrun each process holds only its share of a layer's routed
experts (their originals and their levels), runs only those in the forward passes, and the output bytes
are one process's. The slots each process fills are all-reduced and added in ascending expert order
(stages.experts.slot_sum), the additions one process's ``index_add_`` loop makes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from clirun import (
    Stop,
    assert_same_shards,
    one_and_two_processes,
    one_process,
    stopped_after_layer,
    two_processes,
)
from tiny import make_model, router_or_mtp_extra

from quantmoe.formats.fp8 import (
    Fp8Experts,
    Fp8Weight,
    quantize_fp8_blocks,
    write_fp8_release,
)
from quantmoe.model.distributed import Ranks, experts_to_writer
from quantmoe.stages.experts import Levels, StoredExperts, _by_expert, slot_sum
from quantmoe.stages.quantize import work_dir

E, I, C, K = 6, 16, 24, 2


def _routing(T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """top_k_index (T, K) of distinct experts in a random slot order, some tokens routed nowhere (index E)
    in their last slot, and the router's weights."""
    index = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    index[::5, -1] = E
    return index, torch.rand(T, K, generator=g)


def test_slot_sum_adds_in_the_order_of_the_index_add_loop_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    T, k, width = 64, 4, 8
    index = torch.stack([torch.randperm(E + 2, generator=g)[:k] for _ in range(T)])  # E + 2 experts here
    index[::7, 0] = E + 2  # routed nowhere
    # values of very different sizes: the order of the additions shows in the bits
    y = torch.randn(T, k, width, generator=g) * torch.logspace(-6, 6, k * width).view(1, k, width)
    y[index == E + 2] = 0.0
    slots, tokens, starts = _by_expert(index, E + 2)
    want = torch.zeros(T, width)
    for e in range(E + 2):  # StoredExperts.run_deferred's loop on one process
        a, b = starts[e], starts[e + 1]
        want.index_add_(0, tokens[a:b], y[tokens[a:b], slots[a:b]])
    assert torch.equal(slot_sum(y, index), want)
    in_slot_order = y.sum(dim=1)  # another order: differs, so the test above can fail
    assert not torch.equal(in_slot_order, want)


def _experts(kind: str, g: torch.Generator):
    gate_up, down = torch.randn(E, 2 * I, C, generator=g), torch.randn(E, C, I, generator=g)
    if kind == "bf16":
        return gate_up.bfloat16(), down.bfloat16()
    if kind == "fp32":
        return gate_up, down
    out = []
    for w in (gate_up, down):  # an FP8 release's: one part per expert, in 8 x 8 blocks
        parts = [[Fp8Weight(*quantize_fp8_blocks(w[e], (8, 8)), (8, 8), f"e{e}")] for e in range(E)]
        stack = Fp8Experts(E, parts[0], torch.device("cpu"))
        for e in range(E):
            stack.put(e, 0, parts[e][0])
        out.append(stack)
    return tuple(out)


def _levels(g: torch.Generator, own: range = range(E)) -> tuple[Levels, Levels]:
    """Random levels of the E experts (as GPTQ would leave them), of which those ``own`` are kept."""
    out = []
    for rows, cols in ((2 * I, C), (C, I)):
        lv = Levels(E, rows, cols, cols // 8, 4, torch.device("cpu"))
        lv.q.copy_(torch.randint(0, 256, lv.q.shape, generator=g, dtype=torch.uint8))
        lv.scales.copy_(torch.rand(lv.scales.shape, generator=g).half() / 8)
        lv.zeros.copy_(torch.randint(0, 16, lv.zeros.shape, generator=g, dtype=torch.uint8))
        lv.loss.copy_(torch.rand(lv.loss.shape, generator=g))
        lv.damp.copy_(torch.rand(E, generator=g))
        for name in Levels.FIELDS:
            setattr(lv, name, getattr(lv, name)[own.start:own.stop].clone())
        out.append(lv)
    return out[0], out[1]


def _calls(g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    calls = []
    for T in (11, 7, 13):
        index, weights = _routing(T, g)
        calls.append((torch.randn(T, C, generator=g), index, weights))
    return calls


def _expert_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ranks, found = Ranks(rank, world), {}
        for kind in ("fp32", "bf16", "fp8"):
            g = torch.Generator().manual_seed(1)
            gate_up, down = _experts(kind, g)
            store = StoredExperts(gate_up, down, torch.nn.SiLU(), ranks)
            gu, d = _levels(g, store.own)  # this process's experts' levels
            calls = _calls(g)
            found[kind] = {"own": (store.own.start, store.own.stop), "held": store.gate_up.shape[0],
                           "nbytes": store.nbytes, "shape": store.shape}
            for e in range(E):
                if e not in store.own:
                    with pytest.raises(IndexError, match="held by another process"):
                        store.original("down", e)
            for quantized in (False, True):
                store.quantized, store.use_quantized = ((gu, d) if quantized else None), quantized
                found[kind][quantized] = [torch.cat(store.run_deferred(calls, per_product=2, product_bytes=600))]

            def held(e: int) -> list[torch.Tensor]:
                j = store.local(e)
                return gu.fields(j) + d.fields(j)
            found[kind]["written"] = list(experts_to_writer(E, ranks, held))
        torch.save(found, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world,shares", [(2, [(0, 3), (3, 6)]), (4, [(0, 2), (2, 4), (4, 6), (6, 6)])])
def test_processes_hold_their_share_of_the_experts_and_compute_one_process_bits(tmp_path, world, shares):
    """Each gloo process holds its share of six experts (plain, BF16 or FP8; with four processes the last
    holds none) and their levels; every process's forward outputs are one process's, bit for bit, for the
    originals and for the levels; rank 0 receives every expert's levels in order."""
    torch.multiprocessing.spawn(_expert_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for kind in ("fp32", "bf16", "fp8"):
        g = torch.Generator().manual_seed(1)
        whole = StoredExperts(*_experts(kind, g), torch.nn.SiLU())
        gu_all, d_all = _levels(g)
        calls = _calls(g)
        for quantized in (False, True):
            whole.quantized, whole.use_quantized = ((gu_all, d_all) if quantized else None), quantized
            want = torch.cat(whole.run_deferred(calls, per_product=2, product_bytes=600))
            for r in range(world):
                assert torch.equal(results[r][kind][quantized][0], want), (kind, quantized, r)
        assert [res[kind]["own"] for res in results] == shares
        for res, (a, b) in zip(results, shares):
            assert res[kind]["held"] == b - a and res[kind]["shape"] == (E, I, C)
            assert res[kind]["nbytes"] * E == whole.nbytes * (b - a)  # only its share's bytes
        written = results[0][kind]["written"]
        assert len(written) == E and all(res[kind]["written"] == [] for res in results[1:])
        for e in range(E):
            expect = gu_all.fields(e) + d_all.fields(e)
            assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(written[e], expect)), (kind, e)


def _layer_entries(out: Path) -> list[dict]:
    return json.loads((out / "quantization_log.json").read_text())["layers"]


@pytest.mark.parametrize("kind", ["deepseek_v3-fp8", "mixtral", "qwen2_moe", "granitemoe"])
def test_two_processes_write_one_process_bytes_reading_and_holding_half_the_experts(text_file, tmp_path, kind):
    """A tiny DeepSeek-V3 FP8 release, Mixtral, Qwen2-MoE and GraniteMoE (experts fused on disk; BF16), --fit
    stream (the default): two torchrun processes write the bytes of one, and each MoE layer's log says rank 0
    read from the shards, loaded and held half the experts' bytes that one process did (expert_bytes_loaded,
    expert_bytes_held), and every layer's that it held the hidden states of its share of the batches only
    (activation_bytes_held)."""
    model_type = kind.split("-")[0]
    src = make_model(model_type, tmp_path / "bf16", dtype=torch.bfloat16)
    if kind.endswith("fp8"):
        src = write_fp8_release(src, tmp_path / "fp8", block=(32, 32), skip=router_or_mtp_extra(model_type))
    one, two = one_and_two_processes(src, text_file, tmp_path)
    entries = list(zip(_layer_entries(one), _layer_entries(two)))
    moe = [(a, b) for a, b in entries if a["expert_bytes_held"] is not None]
    # a dense first layer in DeepSeek-V3 and Qwen2-MoE (first_k_dense_replace, mlp_only_layers)
    assert moe and (len(moe) < len(entries)) == (model_type in ("deepseek_v3", "qwen2_moe"))
    for alone, shared in moe:
        for field in ("expert_bytes_held", "expert_bytes_loaded"):
            assert 0 < shared[field] and abs(shared[field] - alone[field] / 2) <= alone[field] * 0.01, \
                (field, alone[field], shared[field])
        assert alone["expert_bytes_loaded"] < alone["expert_bytes_held"]  # the levels come on top
    # 8 sequences in batches of 3, 3 and 2: rank 0 holds the first and the last, 5 of the 8 (both streams)
    for alone, shared in entries:
        assert alone["activation_bytes_held"] > 0 and shared["activation_bytes_held"] * 8 == \
            alone["activation_bytes_held"] * 5, (alone["index"], alone["activation_bytes_held"],
                                                 shared["activation_bytes_held"])


def _stopped_after_layer(_rank: int, src: str, out: str, calib: str, stop: int) -> None:
    """``one_process``'s run of ``src`` into ``out``, stopped right after layer ``stop``'s file is written."""
    with pytest.MonkeyPatch.context() as monkeypatch, stopped_after_layer(monkeypatch, stop):
        try:
            one_process(Path(src), Path(out), Path(calib))
        except Stop:
            return


@pytest.mark.parametrize("kind", ["deepseek_v3-fp8", "mixtral"])
def test_two_processes_resume_what_one_process_stopped_after_a_moe_layer_to_its_bytes(text_file, tmp_path, kind):
    """A run of one process stopped once its first MoE layer is written, resumed by two torchrun processes:
    each replays the finished layers holding its share of their routed experts (the levels from the layer files,
    and for --fit stream the source's, an FP8 release's as FP8), every process over every batch as the run made
    them; the shards are those of one process never stopped."""
    from clirun import (
        one_process,
    )

    model_type = kind.split("-")[0]
    src = make_model(model_type, tmp_path / "bf16", dtype=torch.bfloat16, num_hidden_layers=3)
    if kind.endswith("fp8"):
        src = write_fp8_release(src, tmp_path / "fp8", block=(32, 32), skip=router_or_mtp_extra(model_type))
    one = one_process(src, tmp_path / "one", text_file)
    stop = next(e["index"] for e in _layer_entries(one) if e["expert_bytes_held"] is not None)
    out = tmp_path / "two"
    # stopped in a process of its own, which ends there (its lock on the work folder with it), as a crash
    torch.multiprocessing.spawn(_stopped_after_layer, args=(str(src), str(out), str(text_file), stop), nprocs=1)
    assert not out.exists() and len(list((work_dir(out) / "layers").glob("layer-*.json"))) == stop + 1
    run = two_processes(src, out, text_file)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert f"resuming: {stop + 1} of 3 layers" in run.stderr
    assert _layer_entries(out)[stop + 1]["replay"]["layers"] == stop + 1
    assert_same_shards(one, out)


def test_processes_with_different_numbers_of_expert_groups_make_the_same_passes(text_file, tmp_path):
    """Five experts over two processes (three and two), --gpu-memory room for about one expert a group: rank 0
    solves three groups in a layer, rank 1 at most two, and joins the third group's passes over the tokens
    (collectives, as each holds its share of the batches), its rare experts' blend passes too; the bytes are
    one process's, which solves all five in one group."""
    from quantmoe.stages.experts import ExpertCosts

    src = make_model("qwen2_moe", tmp_path / "bf16", dtype=torch.bfloat16, num_experts=5)
    C, I = 64, 64  # tests/tiny.py's qwen2_moe: hidden_size, moe_intermediate_size
    costs = ExpertCosts(C, I, hessians=True, cross=True, fit_down=True)
    budget = costs.levels(3) + costs.of(8 * 64)  # 8 sequences of 64 tokens: room for one expert on rank 0
    one, two = one_and_two_processes(src, text_file, tmp_path, "--gpu-memory", str(budget))
    moe = [(a, b) for a, b in zip(_layer_entries(one), _layer_entries(two)) if a["expert_groups"] is not None]
    groups = [(a["expert_groups"], b["expert_groups"]) for a, b in moe]
    # one process: one group; rank 0 of two: three groups in some layer (its three experts apart), so rank 1,
    # holding two experts, joins at least one group's passes there
    assert moe and all(a == 1 for a, _ in groups) and any(b == 3 for _, b in groups), groups


def _fused(layer, plan) -> list:
    module = layer.get_submodule(plan.fused.module)
    return [getattr(module, attr) for attr in (plan.fused.gate_up, plan.fused.down)]


def _as_tensors(w) -> list[torch.Tensor]:
    """A fused experts tensor as plain tensors to compare: itself, or an Fp8Experts' codes and scales."""
    if isinstance(w, Fp8Experts):
        return [w.codes.view(torch.uint8), *w.scales]
    return [w.data]


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "deepseek_v3-fp8", "granitemoe"])
def test_a_process_reads_and_loads_only_its_share_of_the_routed_experts(tmp_path, kind):
    """Each process of two (or of eight: some shares empty) reads from the shards only its share's per-expert
    tensors (none of the other experts'; of GraniteMoE's fused tensors only its rows), and load_layer's fused tensors hold exactly those experts, equal to
    the same rows of a whole load (FP8 codes and scales as stored); one process reads and loads them all."""
    from quantmoe.model.architectures import plan_layer
    from quantmoe.model.checkpoint import Checkpoint
    from quantmoe.model.stream import LayerStream

    model_type = kind.split("-")[0]
    src = make_model(model_type, tmp_path / "bf16", dtype=torch.bfloat16)
    if kind.endswith("fp8"):
        src = write_fp8_release(src, tmp_path / "fp8", block=(32, 32), skip=router_or_mtp_extra(model_type))
    stream = LayerStream(Checkpoint(src), torch.device("cpu"))
    index = stream.num_layers - 1  # a MoE layer in every tiny config
    plan = plan_layer(stream.arch, stream.config, index)
    E = plan.num_experts
    assert stream.expert_share(index, Ranks()) is None
    whole_state = stream.layer_state(index, keep_dtype=True)
    whole_read = {stream.arch.expert_of(n) for n in whole_state} - {None}
    assert whole_read == (set() if plan.fused.on_disk else set(range(E)))
    whole = [[t.clone() for t in _as_tensors(w)]
             for w in _fused(stream.load_layer(index, whole_state, torch.bfloat16, keep_fp8=True), plan)]
    stream.release_layer(index)
    if kind.endswith("fp8"):
        assert all(isinstance(w, Fp8Experts) for w in _fused(stream.load_layer(index, whole_state, torch.bfloat16,
                                                                                keep_fp8=True), plan))
        stream.release_layer(index)
    del whole_state
    for world in (2, 8):
        for rank in range(world):
            share = stream.expert_share(index, Ranks(rank, world))
            assert share == Ranks(rank, world).share(E)
            state = stream.layer_state(index, keep_dtype=True, experts=share)
            read = {stream.arch.expert_of(n) for n in state} - {None}
            if plan.fused.on_disk:  # only the share's rows of the fused tensors
                assert all(state[n].shape[0] == len(share) for n in plan.fused_disk_tensors()), (world, rank)
            else:  # an empty share reads one expert, for the shapes
                assert read == (set(share) if len(share) else {E - 1}), (world, rank)
            layer = stream.load_layer(index, state, torch.bfloat16, keep_fp8=True, experts=share)
            for got, want in zip(_fused(layer, plan), whole):
                assert got.shape[0] == len(share) and tuple(got.shape[1:]) == tuple(want[0].shape[1:])
                for a, b in zip(_as_tensors(got), want):
                    assert torch.equal(a, b[share.start:share.stop]), (world, rank)
            stream.release_layer(index)
