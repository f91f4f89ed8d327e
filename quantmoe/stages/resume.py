"""Resuming stage 2: which finished layers in the work folder can be reused, and the
activations entering the first unfinished one.

The work folder beside ``--out`` (``.<out>.quantmoe-work/``) holds::

    fingerprint.json                 what the layers are computed from: one hash per input
    calib.safetensors                the calibration tokens
    layers/layer-NNNNN.safetensors   a finished layer's quantized tensors (metadata: fingerprint)
    layers/layer-NNNNN.json          its log entry, with the fingerprint
    export/                          the staged output; rebuilt on every run

The folder is private to its owner (0700; one that belongs to someone else is refused) and
locked for the whole run (``files.RunLock``, its ``.lock`` file), so no other user can plant a
layer and no second run can write beside the first. A layer is reused only when both of its
files are readable, owned by this user and carry the current fingerprint, and the tensors file
still has the sha256 its log entry recorded (checked again when the layer is read for the
export); reuse stops at the first layer that is not. Under torchrun rank 0 alone writes the
folder and every process starts from the same layer (open_work_together). Methods that stream
activations (gptq, rtn) rebuild those entering the first unfinished layer by running the
finished layers forward with the weights their files stand for, each layer's routed experts held as
the run held them (``expert_levels``: their levels, not dequantized copies; on the full-precision
stream, the source's as stored). Those weights are bit-identical to the ones the uninterrupted run
computed with (scales are fp16-exact, see gptq.py), and run through the same products (``run_stored``),
so a resumed run writes the same bytes as one that was never stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..base.errors import QuantMoeError, note
from ..base.files import (
    RunLock,
    atomic_write_json,
    clear_dir,
    hash_json,
    private_dir,
    save_safetensors,
    sha256_file,
)
from ..base.version import __version__
from ..formats.gptq_v1 import (
    GPTQ_SUFFIXES,
    dequantize_state,
    linear_bits,
    unpack_levels,
)
from ..model.architectures import LayerPlan, plan_layer
from ..model.checkpoint import Checkpoint
from ..model.distributed import SINGLE, Ranks, gather_ints
from ..model.stream import Batch, LayerStream
from .experts import Levels, StoredExperts
from .layer import layer_outputs

FINGERPRINT = "fingerprint.json"


def hash_tokens(ids: Tensor) -> str:
    """sha256 of a token tensor's dtype, shape and values."""
    h = hashlib.sha256(f"{ids.dtype}{tuple(ids.shape)}".encode())
    h.update(ids.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def fingerprint_parts(ckpt: Checkpoint, options: dict, run: dict, ids: Tensor | None = None, seed: int | None = None,
                      libraries: dict[str, str] | None = None) -> dict[str, str]:
    """One hash per input a layer's result depends on: the model, the method's ``options``
    (its config), the ``run`` (device type, batch size ... where they change the bytes), the
    calibration tokens ``ids`` and ``seed`` (methods that calibrate), and the library versions
    (``libraries``: those of the method, beyond quantmoe, torch and transformers).

    The source checkpoint is identified by its config and its shards (``Checkpoint.identity``).
    """

    parts = {"model": ckpt.identity}
    if ids is not None:
        parts |= {"calibration": hash_tokens(ids), "seed": str(seed)}
    return parts | {
        "options": hash_json(options),
        "run": hash_json(run),
        "versions": hash_json({"quantmoe": __version__, "torch": torch.__version__,
                               "transformers": transformers.__version__, **(libraries or {})}),
    }


def fingerprint(parts: dict[str, str]) -> str:
    return hash_json(parts)


def layer_file(work: Path, index: int) -> Path:
    return work / "layers" / f"layer-{index:05d}.safetensors"


def lock_work(work: Path) -> RunLock:
    """``work`` as a private folder (created 0700; one of another user is refused), locked for this run."""
    return RunLock(private_dir(work))


def open_work(work: Path, parts: dict[str, str], num_layers: int, resume: bool = True) -> int:
    """Make ``work`` (private and locked: ``lock_work``) ready for a run computed from ``parts``; return
    how many leading layers are finished.

    A work folder made from other inputs is never reused: it is emptied, and the user is told why.
    """
    fp = fingerprint(parts)
    old = _read_json(work / FINGERPRINT)
    has_layers = any((work / "layers").glob("layer-*.json"))
    if not resume:
        if has_layers:
            note(f"--restart: discarding the finished layers in {work}")
        clear_dir(work, keep=(RunLock.LOCK_NAME,))
    elif not isinstance(old, dict) or old.get("fingerprint") != fp:
        if has_layers:
            old_parts = old.get("parts") if isinstance(old, dict) and isinstance(old.get("parts"), dict) else {}
            differs = [k for k in parts if old_parts.get(k) != parts[k]] or ["fingerprint"]
            note(f"the work folder {work} was made from other inputs ({', '.join(differs)} differ); "
                 "starting over (its finished layers are not reused)")
        clear_dir(work, keep=(RunLock.LOCK_NAME,))
    (work / "layers").mkdir(mode=0o700, exist_ok=True)
    for stray in (work / "layers").glob(".*"):  # temp files of a write that was killed
        stray.unlink()
    atomic_write_json(work / FINGERPRINT, {"fingerprint": fp, "parts": parts})
    done = finished_layers(work, fp, num_layers)
    if done:
        note(f"resuming: {done} of {num_layers} layers are already quantized in {work}")
    return done


def open_work_together(work: Path, parts: dict[str, str], num_layers: int, resume: bool = True,
                       ranks: Ranks = SINGLE, group=None) -> int:
    """open_work for every process of a torchrun (``group``: distributed.control_group).

    Rank 0 prepares the work folder and counts its finished layers; then every other process
    counts those it can read there, and all start from the smallest count. On a filesystem
    every node shares, that is rank 0's count. A node that sees fewer (the folder is not shared,
    or not yet visible there) makes every process start earlier, never at different layers:
    rank 0 says so, and rewrites the layers from there with the same bytes.
    """
    if ranks.world == 1:
        return open_work(work, parts, num_layers, resume)
    done = open_work(work, parts, num_layers, resume) if ranks.writes else 0
    done = gather_ints(done, ranks, group)[0]  # also a barrier: the others read the folder only now
    mine = done if ranks.writes else finished_layers(work, fingerprint(parts), done)
    seen = gather_ints(mine, ranks, group)
    start = min(seen)
    if ranks.writes and start < done:
        fewer = ", ".join(f"rank {r} ({k})" for r, k in enumerate(seen) if k < done)
        note(f"some processes see fewer of the {done} finished layers in {work}: {fewer}; every node must see the "
             f"work folder beside --out on one shared filesystem; all processes start from layer {start}")
    return start


def finished_layers(work: Path, fp: str, num_layers: int) -> int:
    """The number of leading layers whose files are complete and carry fingerprint ``fp``."""
    for i in range(num_layers):
        if read_layer_log(work, i, fp) is None:
            return i
    return num_layers


def read_layer_log(work: Path, index: int, fp: str) -> dict | None:
    """Layer ``index``'s log entry if both its files are readable, this user's and made with ``fp``, and
    the tensors file has the sha256 the entry recorded; else None (the layer is computed again)."""
    file = layer_file(work, index)
    entry = _read_json(file.with_suffix(".json"))
    if not isinstance(entry, dict) or entry.pop("fingerprint", None) != fp:
        return None
    recorded = entry.pop("sha256", None)
    try:
        if not all(_own_file(p) for p in (file, file.with_suffix(".json"))) or sha256_file(file) != recorded:
            note(f"{file} is not the file its run wrote (edited, replaced or not yours); computing layer "
                 f"{index} again")
            return None
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):
        return None
    return entry if meta.get("fingerprint") == fp else None


def read_layer(file: Path) -> dict[str, Tensor]:
    """A finished layer's tensors (full names), after checking the file still has the sha256 its log
    entry recorded: a layer edited since it was resumed from is never exported."""
    entry = _read_json(file.with_suffix(".json"))
    recorded = entry.get("sha256") if isinstance(entry, dict) else None
    if not _own_file(file) or sha256_file(file) != recorded:
        raise QuantMoeError(f"{file} changed after it was written (its sha256 is not the one recorded); re-run "
                            "the same command: that layer is computed again")
    with safe_open(str(file), framework="pt") as f:
        names = list(f.keys())
        try:
            order = json.loads((f.metadata() or {}).get(ORDER_KEY, "null"))
        except ValueError:
            order = None
        if isinstance(order, list) and sorted(order) == sorted(names):
            names = order
        return {name: f.get_tensor(name) for name in names}


# The layer file's metadata key recording the order its method made the tensors in (safetensors keeps
# none): the export writes a bitsandbytes linear's tensors in that order (export.write_shards).
ORDER_KEY = "order"


def write_layer(work: Path, index: int, tensors: dict[str, Tensor], entry: dict, fp: str) -> Path:
    """Persist a finished layer: tensors first (with the order they come in), then the log entry (with
    the tensors file's sha256) that marks it finished."""
    file = layer_file(work, index)
    save_safetensors(file, tensors, metadata={"format": "pt", "fingerprint": fp, ORDER_KEY: json.dumps(list(tensors))})
    atomic_write_json(file.with_suffix(".json"), {**entry, "fingerprint": fp, "sha256": sha256_file(file)})
    return file


def _own_file(path: Path) -> bool:
    """A regular file (not a link) of this user."""
    info = path.lstat()
    return path.is_file() and not path.is_symlink() and info.st_uid == os.getuid()


@torch.no_grad()
def replay_layer(stream: LayerStream, index: int, file: Path, bits: int | None, batches: list[Batch],
                 ranks: Ranks = SINGLE, gpu_memory: int | None = None) -> list[Batch]:
    """Outputs of finished layer ``index``, run with the weights its file stands for (the batches
    spread over the processes as in the run that wrote it; ``gpu_memory``: the run's device budget)."""
    prefix = stream.ckpt.layer_prefix(index)
    packed = {name[len(prefix):]: t for name, t in read_layer(file).items()}
    # Routed experts are quantized all together or none: where the file holds them, they run from their levels (as
    # in the run that wrote it) and the source's are not read (but the one whose shapes an empty share takes).
    share = stream.expert_share(index, ranks)
    levels = expert_levels(plan_layer(stream.arch, stream.config, index), packed, bits, stream.device, share)
    state = stream.layer_state(index, keep_dtype=True, experts=range(0) if levels else share)
    state.update({n: t.to(stream.dtype) for n, t in dequantize_state(packed, bits).items()})
    return run_stored(stream, index, state, batches, ranks, levels, gpu_memory)


def expert_levels(plan: LayerPlan, packed: dict[str, Tensor], bits: int | None, device: torch.device,
                  experts: range | None = None) -> tuple[Levels, Levels] | None:
    """A finished layer's routed experts as the run that finished it held them once solved (``Levels``: 4-bit
    levels two to a byte, gate/up's and down's), on ``device``, from the GPTQ tensors of its file (``packed``,
    layer-relative names, taken out of it): a frontier layer's in the bytes of its file, where their dequantized
    fp32 weights take eight times those. ``experts``: those to hold (a process's share; None: all). None where the
    file holds none (kept in 16 bits: --recipe)."""
    mlp, fused = plan.experts, plan.fused
    if mlp is None or f"{mlp.linear('down', 0)}.qweight" not in packed:
        return None
    experts = range(plan.num_experts) if experts is None else experts
    held = []
    for halves in (fused.halves, ("down",)):
        first = {s: packed[f"{mlp.linear(halves[0], 0)}.{s}"] for s in GPTQ_SUFFIXES}
        groups, rows = first["scales"].shape
        levels = Levels(len(experts), len(halves) * rows, first["g_idx"].numel(), groups,
                        bits or linear_bits(first), device)
        for e in range(plan.num_experts):  # every expert's tensors taken out; those held unpacked
            for k, w in enumerate(halves):
                parts = {s: packed.pop(f"{mlp.linear(w, e)}.{s}") for s in GPTQ_SUFFIXES}
                if e in experts:
                    j, part = e - experts.start, slice(k * rows, (k + 1) * rows)
                    levels.q[j, part], levels.scales[j, part], levels.zeros[j, part] = \
                        unpack_levels({s: t.to(device) for s, t in parts.items()}, levels.bits)
        held.append(levels)
    return held[0], held[1]


def run_stored(stream: LayerStream, index: int, state: dict[str, Tensor], batches: list[Batch], ranks: Ranks = SINGLE,
               levels: tuple[Levels, Levels] | None = None, gpu_memory: int | None = None) -> list[Batch]:
    """The outputs of finished layer ``index`` (quantized or original) loaded from its on-disk ``state``
    (``layer_state``'s ``keep_dtype``; under several processes, this process's share of the routed experts), made
    as the run that finished it made them (layer.layer_outputs, ``gpu_memory`` its device budget): the routed
    experts through StoredExperts (``run_deferred``'s products, fp16 ones under --tf32 on CUDA for wide experts,
    over the same rows), over their ``levels`` (``expert_levels``; the state then holds none) or the state's
    weights as stored (an FP8 release's as FP8). The layer is released afterwards."""
    plan = plan_layer(stream.arch, stream.config, index)
    share = stream.expert_share(index, ranks)
    layer = stream.load_layer(index, state, experts_dtype=stream.experts_dtype(index, state), keep_fp8=True,
                              experts=range(0) if levels else share)
    del state
    try:
        if plan.fused is None:
            return layer_outputs(stream, layer, plan, batches, ranks, gpu_memory=gpu_memory)
        module = layer.get_submodule(plan.fused.module)
        num_experts = None if share is None else plan.num_experts
        if levels is not None:
            store = StoredExperts.of_levels(*levels, module.act_fn, stream.experts_per_token, ranks, num_experts)
        else:
            gate_up, down = (getattr(module, attr) for attr in (plan.fused.gate_up, plan.fused.down))
            store = StoredExperts(*(w.data if isinstance(w, nn.Parameter) else w for w in (gate_up, down)),
                                  module.act_fn, ranks, num_experts, stream.experts_per_token)
        layer.set_submodule(plan.fused.module, store)
        try:
            return layer_outputs(stream, layer, plan, batches, ranks, gpu_memory=gpu_memory)
        finally:
            layer.set_submodule(plan.fused.module, module)
    finally:
        stream.release_layer(index)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
