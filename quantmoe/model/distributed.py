"""Spreading each layer's work over several processes:
``torchrun --nproc-per-node N -m quantmoe quantize ...``.

Every process streams the whole model and ends each layer holding the same quantized
layer (but the routed experts: its share) and the activations of its share of the batches,
so the output is the one a single process writes:

- forward passes (the partial ones that capture a module's input, and the layer's full
  forward that makes the next layer's inputs) are spread by batch, round-robin: batch i is run,
  and its hidden states held, by process i mod world (``spread``; the others hold a meta tensor
  for it); what a pass captures is all-gathered, so every process sees every batch's, in order;
- routed experts are spread by expert (expert parallel): each process holds only its contiguous
  share of a layer's experts (``Ranks.share``; only those are read from the checkpoint), accumulates
  their Hessians, solves them and runs them in the forward passes, whose batches it does not spread
  then: every process runs every batch (each sent by the process that holds it, ``broadcast``), each
  expert's products land in one slot per (token, choice), and one all-reduce of
  those slots (each nonzero on one process only: exact) gives every process all of them, which
  are added in ascending expert order as one process adds them (stages.experts.slot_sum); rank 0
  receives every expert's results, one expert at a time, to write them (``experts_to_writer``);
- attention (one solve per group) is done by every process alike.

Rank 0 alone writes files. torch.distributed carries the tensors: NCCL between GPUs, gloo
between CPU processes. An all-gather or a broadcast only copies, and the experts' all-reduce adds
zeros, so nothing is summed in another order than one process sums it. Every pass over the tokens
is a collective, so every process makes the same passes (stages.layer's ``_blend_passes``).

Nothing here assumes one host (``torchrun --nnodes N``, docs/distributed.md): RANK and
WORLD_SIZE are global, and only the choice of GPU reads LOCAL_RANK. A second, gloo group
(``control_group``) carries the few integers that steer the run: where a resumed run starts
(resume.open_work_together) and whether rank 0 wrote ``--out`` (``finish``). Every process waits
in ``finish`` until rank 0 is done, so no node's torchrun ends while rank 0 still exports: a
torchrun agent whose workers are done waits only a few minutes for the others, and if that
agent hosts the rendezvous store, rank 0's agent loses it and stops rank 0 mid-export.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..base.errors import QuantMoeError


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
T = TypeVar("T")


def join(ranks: Ranks, device: torch.device) -> torch.device:
    """Join the process group once per process (NCCL for CUDA, gloo for CPU); returns this process's device."""
    if ranks.world == 1:
        return device

    if device.type == "cuda":
        # modulo: a launcher that gives each process only its own GPU (CUDA_VISIBLE_DEVICES) leaves it at index 0
        device = torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


# How long a process may wait on the control group: for rank 0's export and evaluation of the
# largest model, after the last layer. A process that dies closes its connections, which ends the
# wait at once; only a node that vanishes without closing them is waited for this long.
CONTROL_TIMEOUT = timedelta(days=7)


def control_group(ranks: Ranks) -> dist.ProcessGroup | None:
    """A gloo group for the integers that steer the run (``gather_ints``, ``finish``); None for one process.

    Every process must call it, right after ``join``. It is not the group that carries the
    tensors: its timeout is long enough to wait for rank 0's export, and it runs over gloo
    whatever the device, so waiting never holds a GPU stream.
    """
    if ranks.world == 1:
        return None
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def gather_ints(value: int, ranks: Ranks, group: dist.ProcessGroup | None) -> list[int]:
    """Every process's ``value``, in rank order, on every process (a barrier too: all must call it)."""
    if group is None:
        return [value]
    mine = torch.tensor([value], dtype=torch.int64)
    parts = [torch.empty_like(mine) for _ in range(ranks.world)]
    all_gather(parts, mine, group)
    return [int(p) for p in parts]


def finish(ranks: Ranks, group: dist.ProcessGroup | None, ok: bool = True) -> None:
    """Every process waits here until rank 0 has written ``--out`` (``ok``) or given up (not ``ok``).

    Rank 0 calls it last, whether its export succeeded or failed, and never raises from it; the
    other processes call it after the last layer and raise QuantMoeError when rank 0 failed or died.
    """
    if group is None:
        return
    flag = torch.tensor([int(ok)], dtype=torch.int64)
    try:
        dist.broadcast(flag, src=0, group=group)
    except RuntimeError as exc:  # gloo: a peer closed its connection (its process died)
        if ranks.writes:
            return  # --out is written (or rank 0 fails with its own error); a lost peer changes nothing
        raise QuantMoeError(f"rank 0 stopped before it finished writing --out ({_first_words(exc)}); "
                            "its log says why; re-run the same command to resume from the finished layers") from None
    if not ranks.writes and not flag.item():
        raise QuantMoeError("rank 0 failed to write --out (its log names the error); fix that and re-run the same "
                            "command to resume from the finished layers")


def leave() -> None:
    """Leave the process group, if this process joined one (the CLI calls it before exiting)."""

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather(parts: list[Tensor], t: Tensor, group: dist.ProcessGroup | None = None) -> None:
    """``dist.all_gather``, with a lost process (gloo: its connection closed or reset) as one QuantMoeError."""
    _collective(dist.all_gather, parts, t, group=group)


def broadcast(t: Tensor, src: int) -> Tensor:
    """``t`` of process ``src`` on every process, in place (a lost process is one QuantMoeError)."""
    _collective(dist.broadcast, t, src)
    return t


def all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over every process, in place (a lost process is one QuantMoeError, as in ``all_gather``)."""
    _collective(dist.all_reduce, t, op=dist.ReduceOp.SUM)
    return t


def max_ints(values: list[int], ranks: Ranks, device: torch.device) -> list[int]:
    """Element by element, the largest of every process's ``values`` (padded with zeros to the longest list),
    on every process (a collective: all must call it; ``device``: the process group's, as in ``spread``)."""
    if ranks.world == 1:
        return list(values)
    n = torch.tensor([len(values)], dtype=torch.int64, device=device)
    _collective(dist.all_reduce, n, op=dist.ReduceOp.MAX)
    if not int(n):
        return []
    t = torch.zeros(int(n), dtype=torch.int64, device=device)
    t[:len(values)] = torch.tensor(values, dtype=torch.int64)
    _collective(dist.all_reduce, t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _collective(collective, *args, **kwargs) -> None:
    try:
        collective(*args, **kwargs)
    except RuntimeError as exc:
        raise QuantMoeError(f"a collective across the torchrun processes failed ({_first_words(exc)}); if a node "
                            "or process stopped, its log says why; re-run the same command on every node: the run "
                            "resumes from the finished layers") from None


def _first_words(exc: BaseException, limit: int = 200) -> str:
    return " ".join(str(exc).split())[:limit]


def experts_to_writer(n: int, ranks: Ranks, local: Callable[[int], list[Tensor]]) -> Iterator[list[Tensor]]:
    """Expert by expert, 0..n-1 in order, its tensors ``local(e)`` on rank 0, sent there by the process whose
    ``share`` holds it: rank 0 gets every expert's, one at a time, the others none (they only send, so every
    process must run the loop to its end). ``local(e)``: tensors of the same shapes and dtypes for every e."""
    if ranks.world == 1:
        for e in range(n):
            yield local(e)
        return
    per = ranks.per_rank(n)
    like = local(0) if ranks.writes and n else None  # rank 0 holds expert 0: the shapes every expert's have
    for e in range(n):
        owner = e // per
        if owner == ranks.rank:
            tensors = local(e)
            if ranks.writes:
                yield tensors
            else:
                _collective(dist.send, torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors]), 0)
        elif ranks.writes:
            flat = torch.empty(sum(t.numel() * t.element_size() for t in like), dtype=torch.uint8,
                               device=like[0].device)
            _collective(dist.recv, flat, owner)
            tensors, start = [], 0
            for t in like:  # each piece copied out: a view as another dtype needs an aligned start
                size = t.numel() * t.element_size()
                tensors.append(flat[start:start + size].clone().view(t.dtype).view(t.shape))
                start += size
            yield tensors


def spread(items: Sequence[T], compute: Callable[[T], Tensor], ranks: Ranks, device: torch.device) -> Iterator[Tensor]:
    """``compute(item)`` for every item, in order, on every process.

    Each process computes every world-th item (round-robin) and the results are all-gathered
    round by round, so at most ``world`` results are held at once. The results may differ
    in their first dimension (a shorter last batch); every other dimension and the dtype
    must be the same for every item.
    """
    if ranks.world == 1:
        for item in items:
            yield compute(item)
        return

    for start in range(0, len(items), ranks.world):
        mine = start + ranks.rank
        local = compute(items[mine]) if mine < len(items) else None
        # Shapes and dtypes first: a process with no item this round learns what to send.
        meta = torch.full((8,), -1, dtype=torch.int64, device=device)
        if local is not None:
            meta[0] = _DTYPES.index(local.dtype)
            meta[1:1 + local.ndim] = torch.tensor(local.shape, dtype=torch.int64)
        metas = [torch.empty_like(meta) for _ in range(ranks.world)]
        all_gather(metas, meta)
        metas = torch.stack(metas).tolist()
        known = next(m for m in metas if m[0] >= 0)
        dtype = _DTYPES[known[0]]
        rest = [d for d in known[2:] if d >= 0]
        rows = [max(m[1], 0) for m in metas]
        padded = torch.zeros([max(rows)] + rest, dtype=dtype, device=device)
        if local is not None:
            padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(ranks.world)]
        all_gather(parts, padded)
        for r, part in enumerate(parts):
            if start + r < len(items):
                yield local if r == ranks.rank else part[: rows[r]]


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
