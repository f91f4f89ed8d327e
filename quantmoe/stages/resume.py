"""Resuming stage 2: which finished layers in the work folder can be reused, and the
activations entering the first unfinished one.

The work folder beside ``--out`` (``.<out>.quantmoe-work/``) holds::

    fingerprint.json                 what the layers are computed from: one hash per input
    calib.safetensors                the calibration tokens
    layers/layer-NNNNN.safetensors   a finished layer's quantized tensors (metadata: fingerprint)
    layers/layer-NNNNN.json          its log entry, with the fingerprint
    export/                          the staged output; rebuilt on every run

A layer is reused only when both of its files are readable and carry the current
fingerprint; reuse stops at the first layer that is not. Methods that stream activations
(gptq, rtn) rebuild those entering the first unfinished layer by running the finished layers
forward with the weights their files stand for. Those dequantized weights are bit-identical
to the ones the uninterrupted run computed with (scales are fp16-exact, see gptq.py), so a
resumed run writes the same bytes as one that was never stopped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..base.errors import note
from ..base.files import atomic_write_json, save_safetensors
from ..base.version import __version__
from ..formats.gptq_v1 import dequantize_state
from ..model.checkpoint import Checkpoint
from ..model.stream import Batch, LayerStream

FINGERPRINT = "fingerprint.json"


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


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

    The source checkpoint is identified by its config and its shards' names and sizes
    (hashing hundreds of GB would take longer than a layer).
    """

    shards = {s: (ckpt.path / s).stat().st_size for s in ckpt.shards}
    parts = {"model": hash_json({"config": ckpt.raw_config, "shards": shards})}
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


def open_work(work: Path, parts: dict[str, str], num_layers: int, resume: bool = True) -> int:
    """Make ``work`` ready for a run computed from ``parts``; return how many leading layers are finished.

    A work folder made from other inputs is never reused: it is emptied, and the user is told why.
    """
    fp = fingerprint(parts)
    if work.exists():
        old = _read_json(work / FINGERPRINT)
        has_layers = any((work / "layers").glob("layer-*.json"))
        if not resume:
            if has_layers:
                note(f"--restart: discarding the finished layers in {work}")
            shutil.rmtree(work)
        elif old is None or old.get("fingerprint") != fp:
            if has_layers:
                old_parts = (old or {}).get("parts", {})
                differs = [k for k in parts if old_parts.get(k) != parts[k]] or ["fingerprint"]
                note(f"the work folder {work} was made from other inputs ({', '.join(differs)} differ); "
                     "starting over (its finished layers are not reused)")
            shutil.rmtree(work)
    (work / "layers").mkdir(parents=True, exist_ok=True)
    for stray in (work / "layers").glob(".*"):  # temp files of a write that was killed
        stray.unlink()
    atomic_write_json(work / FINGERPRINT, {"fingerprint": fp, "parts": parts})
    done = finished_layers(work, fp, num_layers)
    if done:
        note(f"resuming: {done} of {num_layers} layers are already quantized in {work}")
    return done


def finished_layers(work: Path, fp: str, num_layers: int) -> int:
    """The number of leading layers whose files are complete and carry fingerprint ``fp``."""
    for i in range(num_layers):
        if read_layer_log(work, i, fp) is None:
            return i
    return num_layers


def read_layer_log(work: Path, index: int, fp: str) -> dict | None:
    """Layer ``index``'s log entry if both its files are readable and made with ``fp``, else None."""
    file = layer_file(work, index)
    entry = _read_json(file.with_suffix(".json"))
    if entry is None or entry.pop("fingerprint", None) != fp:
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):
        return None
    return entry if meta.get("fingerprint") == fp else None


def write_layer(work: Path, index: int, tensors: dict[str, Tensor], entry: dict, fp: str) -> Path:
    """Persist a finished layer: tensors first, then the log entry that marks it finished."""
    file = layer_file(work, index)
    save_safetensors(file, tensors, metadata={"format": "pt", "fingerprint": fp})
    atomic_write_json(file.with_suffix(".json"), {**entry, "fingerprint": fp})
    return file


@torch.no_grad()
def replay_layer(stream: LayerStream, index: int, file: Path, bits: int, batches: list[Batch]) -> list[Batch]:
    """Outputs of finished layer ``index``, run with the weights its file stands for."""
    prefix = stream.ckpt.layer_prefix(index)
    with safe_open(str(file), framework="pt") as f:
        packed = {name[len(prefix):]: f.get_tensor(name) for name in f.keys()}
    state = stream.layer_state(index)
    state.update({n: t.to(stream.dtype) for n, t in dequantize_state(packed, bits).items()})
    layer = stream.load_layer(index, state)
    out = stream.run_layer(layer, batches)
    stream.release_layer(index)
    return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
