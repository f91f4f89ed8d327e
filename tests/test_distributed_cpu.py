"""Experts spread over two CPU processes (torchrun, gloo) give byte-identical shards to one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantmoe
from quantmoe.distributed import Ranks

from conftest import ARCH_NAMES

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
    args = ["--calib", str(text_file), "--nsamples", "8", "--seqlen", "64", "--group-size", "32", "--no-eval",
            "--quiet", "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun gives each process one thread; the same here
    try:
        quantmoe.quantize(src, tmp_path / "one", quantmoe.QuantConfig(group_size=32), calib=text_file, nsamples=8,
                          seqlen=64, device="cpu", run_eval=False, quiet=True)
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
