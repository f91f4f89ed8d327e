"""Work spread over two CPU processes (torchrun, gloo) gives byte-identical shards to one process,
on one "node" or on two (two torchrun launchers on 127.0.0.1, as two hosts would run them).

Experts are spread by expert and forward passes by batch; batch size 3 over 8 sequences makes
three batches (3, 3, 2), so the second round leaves one process without a batch and the last
batch is short: the uneven cases of ``distributed.spread``.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from clirun import assert_same_shards, one_and_two_processes, one_process
from conftest import ARCH_NAMES
from tiny import make_model

from quantmoe.model.distributed import Ranks
from quantmoe.stages.quantize import work_dir

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
    one_and_two_processes(tiny_model(model_type), text_file, tmp_path)


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


# ---------------------------------------------------------------------------------------------
# Two nodes: two torchrun launchers (--nnodes 2 --nproc-per-node 1) on 127.0.0.1, as two hosts would
# run them; the model and --out on the filesystem both see.

NODE_TIMEOUT = 300  # seconds any launcher may take; every wait below is bounded by it
ARGS = ["--nsamples", "8", "--seqlen", "64", "--group-size", "32", "--batch-size", "3", "--quiet", "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_nodes(src: Path, out: Path, text_file: Path, logs: Path, rendezvous: str, extra: list[str]):
    """Two torchrun launchers, one per "node"."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    port = _free_port()
    if rendezvous == "static":  # node 0 hosts the store and holds rank 0
        meeting = ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    else:  # c10d: whichever launcher comes first hosts the store; ranks follow the nodes' names
        meeting = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test{port}"]
    nodes = []
    for node in range(2):
        log = open(logs / f"node{node}.log", "w")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--max-restarts", "0", *meeting,
               "-m", "quantmoe", "quantize", str(src), "--out", str(out), "--calib", str(text_file), *ARGS, *extra]
        nodes.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return nodes


def _wait(nodes, deadline: float) -> list[float]:
    """Each node's exit time (time.time()); a node still running at the deadline is killed and fails the test."""
    ended: dict[int, float] = {}
    try:
        while len(ended) < len(nodes) and time.monotonic() < deadline:
            for i, proc in enumerate(nodes):
                if i not in ended and proc.poll() is not None:
                    ended[i] = time.time()
            time.sleep(0.05)
    finally:
        _kill(nodes)
    assert len(ended) == len(nodes), "a torchrun node did not finish in time"
    return [ended[i] for i in range(len(nodes))]


def _kill(nodes) -> None:
    """SIGKILL each running launcher and its workers (torchrun starts each worker in a session of its own)."""
    for proc in nodes:
        if proc.poll() is None:
            workers = psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            for w in workers:
                with contextlib.suppress(psutil.NoSuchProcess):
                    w.kill()
            proc.wait(timeout=60)


def test_two_nodes_write_the_same_bytes_as_one_process_and_end_after_rank_0(tiny_model, text_file, tmp_path):
    """Static rendezvous (--master-addr, --node-rank): node 0 holds rank 0, which alone writes --out and
    evaluates it; node 1 stays until --out is complete (distributed.finish) instead of ending after
    the last layer, so no launcher ends while rank 0 still works."""
    src = tiny_model("qwen2_moe")
    one = one_process(src, tmp_path / "one", text_file)
    nodes = _start_nodes(src, tmp_path / "two", text_file, tmp_path, "static", ["--eval-data", str(text_file)])
    ended = _wait(nodes, time.monotonic() + NODE_TIMEOUT)
    logs = [(tmp_path / f"node{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert_same_shards(one, tmp_path / "two")
    assert f"wrote {tmp_path / 'two'}" in logs[0] and "wrote" not in logs[1]
    assert (tmp_path / "two" / "eval_report.json").is_file()
    assert not work_dir(tmp_path / "two").exists()
    # node 1 ended after rank 0 had finished evaluating and written its manifest (the last file)
    assert ended[1] >= os.stat(tmp_path / "two" / "manifest.json").st_mtime


def test_a_run_whose_node_died_resumes_from_the_finished_layers_with_the_same_bytes(text_file, tmp_path):
    """c10d rendezvous, as a cluster without fixed node ranks runs it. One node is killed (its launcher
    and worker, SIGKILL) once a layer is finished; the survivor stops. The same command on two nodes
    again resumes from the finished layers and writes what one process writes."""
    src = make_model("qwen2_moe", tmp_path / "model", num_hidden_layers=6)
    one = one_process(src, tmp_path / "one", text_file)
    out = tmp_path / "two"
    layer0 = work_dir(out) / "layers" / "layer-00000.json"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    nodes = _start_nodes(src, out, text_file, first, "c10d", ["--no-eval"])
    deadline = time.monotonic() + NODE_TIMEOUT
    try:
        while not layer0.exists() and all(p.poll() is None for p in nodes) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert layer0.exists(), (first / "node0.log").read_text()[-2000:]
        _kill(nodes[1:])  # a node dies
        assert nodes[0].wait(timeout=120) != 0  # the survivor's next collective fails: it stops too
    finally:
        _kill(nodes)
    assert not out.exists(), "the run finished before the node was killed; nothing was interrupted"
    survivor = (first / "node0.log").read_text()
    assert "error: a collective across the torchrun processes failed (" in survivor, survivor[-2000:]
    assert "]: Traceback" not in survivor  # quantmoe's one line; torchrun's own report follows it
    finished = len(list((work_dir(out) / "layers").glob("layer-*.json")))
    assert 1 <= finished < 6

    nodes = _start_nodes(src, out, text_file, second, "c10d", ["--no-eval"])
    _wait(nodes, time.monotonic() + NODE_TIMEOUT)
    logs = "".join((second / f"node{i}.log").read_text() for i in range(2))
    assert [p.returncode for p in nodes] == [0, 0], logs[-4000:]
    resumed = [line for line in logs.splitlines() if line.startswith("note: resuming: ")]
    assert resumed and int(resumed[0].split()[2]) >= finished, logs[-4000:]
    assert_same_shards(one, out)


def _resume_worker(rank: int, world: int, port: int, base: str) -> None:
    import torch.distributed as dist

    from quantmoe.base.errors import QuantMoeError
    from quantmoe.model.distributed import control_group, finish
    from quantmoe.stages.resume import open_work_together

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ranks, group = Ranks(rank, world), control_group(Ranks(rank, world))
        parts = torch.load(f"{base}/parts.pt")
        shared = Path(base) / "work"
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            both_see = open_work_together(shared, parts, 4, True, ranks, group)
            # a folder that is not shared: rank 1 looks at its own, empty one at the same place
            own = open_work_together(shared if rank == 0 else Path(base) / "elsewhere", parts, 4, True, ranks, group)
        try:
            finish(ranks, group, ok=False)
            failed = None
        except QuantMoeError as exc:
            failed = str(exc)
        torch.save({"both_see": both_see, "own": own, "stderr": err.getvalue(), "failed": failed},
                   f"{base}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_process_resumes_from_the_same_layer_and_learns_when_rank_0_failed(tmp_path):
    from quantmoe.stages.resume import fingerprint, lock_work, open_work, write_layer

    parts = {"model": "m", "calibration": "c"}
    torch.save(parts, tmp_path / "parts.pt")
    work = tmp_path / "work"
    lock_work(work).release()  # the private work folder a run makes (and locks) before opening it
    assert open_work(work, parts, 4) == 0
    for i in range(2):  # two finished layers, as a stopped run leaves them
        write_layer(work, i, {"w": torch.zeros(2)}, {"index": i}, fingerprint(parts))
    torch.multiprocessing.spawn(_resume_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert (r0["both_see"], r1["both_see"]) == (2, 2)
    assert (r0["own"], r1["own"]) == (0, 0)  # never different layers: rank 1 sees none, so all start at 0
    assert "rank 1 (0)" in r0["stderr"] and "shared filesystem" in r0["stderr"] and r1["stderr"] == ""
    assert r0["failed"] is None and "rank 0 failed to write --out" in r1["failed"]
