"""Spreading each layer's routed experts over several processes:
``torchrun --nproc-per-node N -m quantmoe quantize ...``.

Every process streams the whole model (the same forward passes, the same attention
GPTQ), but solves only its contiguous share of the experts: their Hessians and their
GPTQ. The shares are all-gathered, so every process holds the same quantized layer for
the next forward pass, and rank 0 alone writes files. torch.distributed carries the
tensors: NCCL between GPUs, gloo between CPU processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .gptq import QuantResult


@dataclass(frozen=True)
class Ranks:
    """Which process this is, of how many (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Ranks:
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def writes(self) -> bool:
        """Rank 0 writes every file; the others only compute."""
        return self.rank == 0

    def per_rank(self, n: int) -> int:
        return -(-n // self.world)

    def share(self, n: int) -> range:
        """This process's contiguous share of n experts (the last shares may be shorter, or empty)."""
        per = self.per_rank(n)
        start = min(n, self.rank * per)
        return range(start, min(n, start + per))


SINGLE = Ranks()


def join(ranks: Ranks, device: torch.device) -> torch.device:
    """Join the process group once per process (NCCL for CUDA, gloo for CPU); returns this process's device."""
    if ranks.world == 1:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def leave() -> None:
    """Leave the process group, if this process joined one (the CLI calls it before exiting)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_experts(t: Tensor, n: int, ranks: Ranks) -> Tensor:
    """Each process's share (k, ...) of n per-expert tensors -> all n (n, ...), on every process."""
    if ranks.world == 1:
        return t
    import torch.distributed as dist

    per = ranks.per_rank(n)
    padded = torch.zeros((per,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:n]


def gather_result(res: QuantResult, n: int, ranks: Ranks) -> QuantResult:
    """A QuantResult over each process's share of n experts -> over all n, on every process."""
    if ranks.world == 1:
        return res
    shared = ("g_idx",)  # the same on every process
    return QuantResult(**{f.name: getattr(res, f.name) if f.name in shared else
                          gather_experts(getattr(res, f.name), n, ranks) for f in fields(res)})
