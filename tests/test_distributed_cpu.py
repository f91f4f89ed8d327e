"""Work spread over two CPU processes (torchrun, gloo) gives byte-identical shards to one process.

Experts are spread by expert and forward passes by batch; batch size 3 over 8 sequences makes
three batches (3, 3, 2), so the second round leaves one process without a batch and the last
batch is short: the uneven cases of ``distributed.spread``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCH_NAMES

import quantmoe
from quantmoe.model.distributed import Ranks

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("world,experts,shares", [(2, 8, [range(0, 4), range(4, 8)]),
                                                  (3, 4, [range(0, 2), range(2, 4), range(4, 4)]),
                                                  (2, 5, [range(0, 3), range(3, 5)])])
def test_shares_cover_every_expert_once(world, experts, shares):
    assert [Ranks(r, world).share(experts) for r in range(world)] == shares


# Spreading experts matters only where there are experts; one row per distinct expert layout
# (per-expert on disk, shared expert + dense layer, MLA + first-k dense, fused on disk) keeps
# this torchrun-per-row test affordable.
SPREAD_ROWS = [r for r in ("mixtral", "qwen2_moe", "deepseek_v3", "granitemoe") if r in ARCH_NAMES]


@pytest.mark.parametrize("model_type", SPREAD_ROWS)
def test_two_gloo_processes_write_the_same_bytes_as_one(tiny_model, text_file, tmp_path, model_type):
    src = tiny_model(model_type)
    args = ["--calib", str(text_file), "--nsamples", "8", "--seqlen", "64", "--group-size", "32", "--batch-size", "3",
            "--no-eval", "--quiet", "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun gives each process one thread; the same here
    try:
        quantmoe.quantize(src, tmp_path / "one", quantmoe.QuantConfig(group_size=32), calib=text_file, nsamples=8,
                          seqlen=64, device="cpu", run_eval=False, quiet=True, batch_size=3)
    finally:
        torch.set_num_threads(threads)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "quantmoe", "quantize", str(src), "--out", str(tmp_path / "two"), *args],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    one = sorted(p.name for p in (tmp_path / "one").glob("model*.safetensors*"))
    assert one and one == sorted(p.name for p in (tmp_path / "two").glob("model*.safetensors*"))
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def _spread_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from quantmoe.model.distributed import spread

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        computed = []

        def compute(i: int) -> torch.Tensor:
            computed.append(i)
            return torch.full((i + 1, 2), float(i), dtype=torch.bfloat16)  # rows differ by item

        got = list(spread(list(range(5)), compute, Ranks(rank, world), torch.device("cpu")))
        torch.save({"computed": computed, "got": got}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_spread_computes_each_item_once_and_every_process_gets_all_in_order(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_spread_worker, args=(2, port, str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0]["computed"] == [0, 2, 4] and results[1]["computed"] == [1, 3]
    for res in results:
        assert [t.shape[0] for t in res["got"]] == [1, 2, 3, 4, 5]
        assert all(t.dtype == torch.bfloat16 and torch.all(t == i) for i, t in enumerate(res["got"]))
