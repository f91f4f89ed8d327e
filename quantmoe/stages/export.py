"""Stage 3, for every backend: per-layer results + the source checkpoint -> a sharded checkpoint.

Quantized linears are written under the source checkpoint's own names
(``...block_sparse_moe.experts.3.w1.qweight`` for GPTQ, ``....w1.weight`` + statistics for
bitsandbytes); every other tensor (routers, norms, biases, embeddings, head) is copied
unchanged, in its source dtype, except the linears of an FP8 release that are not quantized,
which are written as BF16 weights (no FP8 tensor and no scale reaches the export). Layers
stored beyond ``num_hidden_layers`` (multi-token prediction) are copied the same way when the
method keeps them (``mtp="keep"``), unquantized. Shards are built one at a time, so memory
holds at most one shard. Beside the writer, two threads read the next layer file (its sha256 checked)
and hash each shard written, while the writer serialises, writes and syncs: hashing and file I/O
release the GIL.

A run exports beside its layers (``BackgroundExport``): the writer takes each layer file as soon as
it is finished (``FinishedLayers``), so that once the last layer is done only its own shards and the
tensors after it are left to write. The shards are the same bytes as an export after the layers.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from ..base.errors import QuantMoeError
from ..base.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    save_safetensors,
    sha256_file,
)
from ..base.options import QuantConfig
from ..formats import compressed_tensors
from ..model.architectures import (
    Architecture,
    architecture_for,
    plan_layer,
    unfused_names,
)
from ..model.checkpoint import INDEX_NAME, LAYER_NAME, Checkpoint
from .resume import read_layer

QUANTIZE_CONFIG = "quantize_config.json"


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '10KB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise QuantMoeError(f"--max-shard-size {text!r} is not a size; write it like 2GB or 500MB")
    unit = (m.group(2) or "B").upper().replace("I", "").rstrip("B") or ""
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise QuantMoeError(f"--max-shard-size {text!r} must be positive")
    return size


class ShardWriter:
    """Collects tensors and writes a shard whenever the next tensor would overflow it; each shard written
    is hashed on ``background`` while the next is built. Tensors are added under quantmoe's names and written
    under ``stored(name)`` (Checkpoint.stored_name: a nested release's own names)."""

    def __init__(self, folder: Path, max_bytes: int, background: Executor, stored: Callable[[str], str] = str):
        self.folder, self.max_bytes, self.background, self.stored = Path(folder), max_bytes, background, stored
        self.pending: dict = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str], Future[str]]] = []  # each shard, its tensors and its sha256
        self.total_bytes = 0

    def add(self, name: str, tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f".shard-{len(self.written):05d}.safetensors"
        save_safetensors(path, {self.stored(n): t for n, t in self.pending.items()}, metadata={"format": "pt"})
        # hashed from the page cache, read back on ``background`` while the next shard is built
        self.written.append((path, list(self.pending), self.background.submit(sha256_file, path)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> dict[str, str]:
        """Give the shards their final names and write the index; returns each shard's sha256 by file name."""
        self.flush()
        n = len(self.written)
        weight_map, hashes = {}, {}
        for i, (path, names, sha) in enumerate(self.written):
            final = self.folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            hashes[final.name] = sha.result()  # of the file as written and synced, before its final name
            path.rename(final)
            weight_map.update({self.stored(name): final.name for name in names})
        atomic_write_json(self.folder / INDEX_NAME,
                          {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))})
        return hashes


class ExportStopped(Exception):
    """The run stopped before its export took the layer it waits for (FinishedLayers.stop)."""


class FinishedLayers:
    """The layer files of a run as they are completed, for the export beside the layers: ``finished(i)`` once
    layer i's file and log entry are written, ``wait(i)`` until then and while the layers ``hold`` the export
    back (a host budget without room for it beside a layer: ``host_bytes``, the most the export holds);
    ``stop()`` ends every wait with ExportStopped. ``waiting_seconds``: how long the export's writer waited
    for layers (``waited``), which is the layers' time, not the export's."""

    def __init__(self, done: int, host_bytes: int = 0):
        self._cond = threading.Condition()
        self._done = done       # layers 0 .. done-1 are complete
        self._held = self._stopped = False
        self._when: dict[int, float] = {}  # layer -> when the export could take it (perf_counter), if during the run
        self.host_bytes = host_bytes
        self.waiting_seconds = 0.0
        with self._cond:
            self._notify()  # the layers finished by an earlier run can be taken from now

    def finished(self, index: int) -> None:
        with self._cond:
            self._done = max(self._done, index + 1)
            self._notify()

    def hold(self, held: bool) -> None:
        """Keep the export from taking another layer file (True) until released (False)."""
        with self._cond:
            self._held = held
            self._notify()

    def _notify(self) -> None:
        """Under the lock: wake the waits, and note when each finished layer could first be taken."""
        if not self._held:
            now = time.perf_counter()
            for i in range(self._done):
                self._when.setdefault(i, now)
        self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def wait(self, index: int) -> None:
        """Until layer ``index`` may be taken; ExportStopped once the run stopped. A run that ends in any way
        stops it (BackgroundExport.stop): the interpreter waits for the export's threads as it exits."""
        with self._cond:
            self._cond.wait_for(lambda: (self._done > index and not self._held) or self._stopped)
            if self._stopped:
                raise ExportStopped(f"the run stopped before the export took layer {index}")

    def waited(self, index: int, since: float) -> None:
        """The writer waited from ``since`` for layer ``index``: count the part before it could take it."""
        with self._cond:
            self.waiting_seconds += max(0.0, self._when.get(index, since) - since)


class BackgroundExport:
    """``export(folder, layers)`` (export_checkpoint's shards and config, taking each layer file once
    ``layers`` says it is finished) run on a thread of its own beside the layers' quantization, into
    ``folder``, emptied first (a half-written export of an earlier, stopped run). ``check()`` raises the
    export's error as soon as it has failed, so that a run stops at the next layer rather than after the
    last; ``result()`` waits for the export and gives its shards' hashes; ``stop()`` ends it (at its next
    layer) and removes ``folder``. ``timings()``: its whole time beside the layers, and how much of it it
    waited for them. ``host_bytes``: the most it holds (export_host_bytes), which the layers make room for or
    hold it back (FinishedLayers.hold)."""

    def __init__(self, export: Callable[[Path, FinishedLayers], dict[str, str]], folder: Path, done: int,
                 host_bytes: int = 0):
        self.folder, self.layers = folder, FinishedLayers(done, host_bytes)
        shutil.rmtree(folder, ignore_errors=True)
        self._seconds = 0.0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="quantmoe-export")
        self._future = self._pool.submit(self._run, export)

    def _run(self, export: Callable[[Path, FinishedLayers], dict[str, str]]) -> dict[str, str]:
        t0 = time.perf_counter()
        try:
            return export(self.folder, self.layers)
        finally:
            self._seconds = time.perf_counter() - t0

    def check(self) -> None:
        failed = self._future.exception() if self._future.done() else None
        if failed is not None:
            raise failed

    def result(self) -> dict[str, str]:
        try:
            return self._future.result()
        finally:
            self._pool.shutdown()

    def stop(self) -> None:
        self.layers.stop()
        self._pool.shutdown()  # the export ends at its next wait for a layer, or once done
        shutil.rmtree(self.folder, ignore_errors=True)

    def timings(self) -> dict[str, float]:
        return {"background_seconds": round(self._seconds, 3),
                "waiting_seconds": round(self.layers.waiting_seconds, 3)}


def export_host_bytes(ckpt: Checkpoint, shard_bytes: int) -> int:
    """About the most host memory the export beside the layers holds: the shard it builds, and the layer file
    it takes with the next one read ahead, each bounded by the largest decoder layer as the source stores it
    (a 4- or 8-bit layer file is at most about as large)."""
    layers: dict[int, int] = {}  # decoder layer -> its stored bytes, in one pass over the tensor names
    for name in ckpt.weight_map:
        if (m := LAYER_NAME.match(name)) and (i := int(m.group(1))) < ckpt.config.num_hidden_layers:
            layers[i] = layers.get(i, 0) + ckpt.nbytes(name)
    return shard_bytes + 2 * max(layers.values(), default=0)


# A method's view of a layer file in the export (Method.export_layer): layer index and the file's tensors ->
# the tensors to write (repacked for the export's format) and the layer-relative linears left in 16 bits.
LayerExport = Callable[[int, dict[str, Tensor]], tuple[dict[str, Tensor], frozenset[str]]]


def as_stored(index: int, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], frozenset[str]]:
    """The LayerExport of a method that writes its layer files as they are and quantizes every linear."""
    return tensors, frozenset()


def write_shards(ckpt: Checkpoint, arch: Architecture, layer_files: list[Path], folder: Path, max_shard_size: int,
                 layout: str = "source", extra_layers: list[int] = (), in_place: bool = False,
                 layer_export: LayerExport = as_stored, layers: FinishedLayers | None = None) -> dict[str, str]:
    """The source checkpoint with each layer's quantized linears replaced by the tensors of its layer
    file -> shards and their index in ``folder``, for every backend; returns each shard's sha256 by
    file name.

    Order: the embeddings; per layer, its source tensors that are not replaced and its quantized
    tensors (``layer_tensors``); then the layers beyond ``num_hidden_layers`` in ``extra_layers``
    (multi-token prediction, copied unquantized under their source names in both layouts); then every
    other tensor (final norm, head). Safetensors sorts the tensors inside a file, so the order only
    decides where shards end. Decoder tensors keep their source names, or take GPTQModel's with
    ``layout="gptqmodel"``. ``layer_export``: what of a layer file is written (compressed-tensors repacks
    GPTQ's tensors; a recipe leaves linears in 16 bits, copied from the source). Memory holds one shard,
    the layer file in use and the next one, read (and its sha256 checked) on another thread while
    this one writes; the source's shards are unmapped after each layer (an open shard's pages read so
    far count as resident). ``layers``: each layer file is read once it says the file is finished (None:
    every file is).
    """
    layers = layers if layers is not None else FinishedLayers(len(layer_files))

    def read(i: int) -> dict[str, Tensor]:
        layers.wait(i)
        return read_layer(layer_files[i])

    folder.mkdir(parents=True, exist_ok=True)
    # Two threads, so that hashing a shard never holds up the next layer's read that the writer waits for.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="quantmoe-export") as background:
        writer = ShardWriter(folder, max_shard_size, background, ckpt.stored_name)
        for name, tensor in source_tensors(ckpt, ckpt.names("model.embed_tokens.")):
            writer.add(name, tensor)
        ahead = background.submit(read, 0) if layer_files else None
        for i, file in enumerate(layer_files):
            prefix = ckpt.layer_prefix(i)
            since = time.perf_counter()
            tensors = ahead.result()
            layers.waited(i, since)
            ahead = background.submit(read, i + 1) if i + 1 < len(layer_files) else None
            quantized, kept = layer_export(i, tensors)
            for name, tensor in layer_tensors(ckpt, arch, i, layout, quantized, file, in_place, kept):
                writer.add(export_name(arch, name, prefix, layout), tensor)
            del tensors, quantized
            ckpt.close()
        for i in extra_layers:
            for name, tensor in source_tensors(ckpt, ckpt.names(ckpt.layer_prefix(i))):
                writer.add(name, tensor)
            ckpt.close()
        done = set(writer.pending) | {n for _, names, _ in writer.written for n in names}
        for name, tensor in source_tensors(ckpt, [n for n in ckpt.names() if n not in done
                                                  and not n.startswith("model.layers.")]):
            writer.add(name, tensor)
        return writer.close()


def source_tensors(ckpt: Checkpoint, names: list[str], replaced: set[str] = frozenset()) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) for each of ``names`` an export copies from the source: every tensor as stored,
    except that the tensors of ``replaced`` modules (quantized: their ``.weight``, and an FP8 release's
    scales) are left out, and an FP8 release's other linears come as one BF16 ``.weight`` each."""
    linears = ckpt.quantized_linears if getattr(ckpt.format, "source", False) else {}
    for name in names:
        module, _, suffix = name.rpartition(".")
        linear = linears.get(module)
        stored = linear is not None and name in linear.tensors
        if module in replaced and (suffix == "weight" or stored):
            continue
        if not stored:
            yield name, ckpt.tensor(name)
        elif name == linear.tensors[0]:
            yield name, ckpt.format.dequantize(ckpt, linear)


def layer_tensors(ckpt: Checkpoint, arch: Architecture, index: int, layout: str, quantized: dict[str, Tensor],
                  file: Path, in_place: bool = False, kept: frozenset[str] = frozenset()) -> Iterator[tuple[str, Tensor]]:
    """Layer ``index`` of the export, by source name: its ``quantized`` tensors (read from ``file``, in the
    order its method made them) and the source tensors they do not replace.

    A source tensor is replaced when it belongs to a linear the layer's plan quantizes (its weight, and
    an FP8 release's scales), or is a fused on-disk expert tensor (GraniteMoE's, cut per expert by the
    layer's quantization). GPTQ's order: the source tensors kept, then the quantized ones, sorted;
    ``in_place`` (bitsandbytes'): each linear's tensors where its source weight stands (the experts cut
    from a fused tensor where that stands), as transformers' serialization lists them. Both orders are
    kept so that an export's shards end where they always did. ``kept``: the layer-relative linears left
    in 16 bits (``--recipe``), copied from the source as the other tensors are.
    """
    prefix = ckpt.layer_prefix(index)
    plan = plan_layer(arch, ckpt.config, index, layout)
    modules = {prefix + m for m in plan.quantized_linears() if m not in kept}
    parts: dict[str, list[str]] = {m: [] for m in modules}
    for name in quantized:  # P.qweight, P.weight, P.weight.absmax, P.SCB ... -> P
        module = next((m for m in _prefixes(name) if m in modules), None)
        if module is not None:
            parts[module].append(name)
    missing = [m for m in plan.quantized_linears() if m not in kept and not parts[prefix + m]]
    if missing:
        raise QuantMoeError(f"{file} holds no quantized tensors of {prefix}{missing[0]}; it is not this layer's "
                            "result: re-run with --restart")
    # Experts stored fused on disk (GraniteMoE) are exported per expert, unless they are kept in 16 bits.
    experts = {m for m, kind in plan.linear_kinds().items() if kind == "expert"}
    fused = {prefix + n for n in plan.fused_disk_tensors()} if not experts & kept else set()
    if not in_place:
        yield from source_tensors(ckpt, [n for n in ckpt.names(prefix) if n not in fused], modules)
        yield from ((name, quantized[name]) for name in sorted(quantized))
        return
    for name in ckpt.names(prefix):
        if name in fused:
            cut = [prefix + w[: -len(".weight")] for w in unfused_names(plan, name[len(prefix):])
                   if not ckpt.has(prefix + w)]  # per-expert tensors on disk win over a fused copy, as on loading
        elif name.endswith(".weight") and name[: -len(".weight")] in modules:
            cut = [name[: -len(".weight")]]
        else:
            yield from source_tensors(ckpt, [name], modules)
            continue
        yield from ((part, quantized[part]) for module in cut for part in parts[module])
    placed = {part for names in parts.values() for part in names}
    yield from ((name, quantized[name]) for name in sorted(quantized) if name not in placed)


def _prefixes(name: str) -> Iterator[str]:
    """``a.b.c`` -> ``a.b``, ``a``: the modules a tensor name may belong to, longest first."""
    while "." in name:
        name = name.rpartition(".")[0]
        yield name


def extra_layer_modules(ckpt: Checkpoint, layers: list[int]) -> dict[int, list[str]]:
    """Layer index -> the modules with a 2-D weight in it (its linears, DeepSeek's MTP embedding and head)."""
    return {i: sorted(n[: -len(".weight")] for n in ckpt.names(ckpt.layer_prefix(i))
                      if n.endswith(".weight") and len(ckpt.shape(n)) == 2) for i in layers}


def export_name(arch: Architecture, name: str, prefix: str, layout: str) -> str:
    """A decoder tensor's name in the export: its source name, or GPTQModel's with ``layout="gptqmodel"``."""
    return prefix + arch.gptqmodel_name(name[len(prefix):]) if layout == "gptqmodel" else name


def export_checkpoint(ckpt: Checkpoint, arch: Architecture, layer_files: list[Path], folder: Path,
                      quantization_config: dict, max_shard_size: int, layout: str = "source",
                      config_files: tuple[str, ...] = (), extra_layers: list[int] = (),
                      in_place: bool = False, layer_export: LayerExport = as_stored,
                      layers: FinishedLayers | None = None) -> dict[str, str]:
    """Shards, index, config.json (with ``quantization_config``), a copy of it in each of ``config_files``
    (GPTQ's quantize_config.json) and the tokenizer files, into ``folder``; returns each shard's sha256
    by file name (hashed as written: finalize's manifest takes them). ``layers``: see write_shards."""
    hashes = write_shards(ckpt, arch, layer_files, folder, max_shard_size, layout, extra_layers, in_place,
                          layer_export, layers)
    write_config(ckpt, folder, quantization_config)
    for name in config_files:
        atomic_write_json(folder / name, quantization_config)
    return hashes


def compressed_config(qcfg: QuantConfig, not_quantized: list[str], version: str, extra_layers: list[int],
                      patterns: list[tuple[str, QuantConfig | None]] = ()) -> dict:
    """The compressed-tensors ``quantization_config`` of an export: a config group targeting every
    Linear with the run's settings, after one group per other setting of ``--recipe`` targeting its
    modules by regex (``patterns``: precision.recipe_patterns; a name or regex target wins over a
    class one in vLLM); ``ignore`` names lm_head, every module left in 16 bits by exact path (the
    routers: since transformers 5 they are not ``nn.Linear``, so a class target would not exclude them
    for tools that match on it) or by the recipe's regex, and the multi-token-prediction layers by a
    prefix regex."""
    ignore = ["lm_head", *not_quantized, *(f"re:^model\\.layers\\.{i}\\." for i in extra_layers),
              *(f"re:{rx}" for rx, c in patterns if c is None)]
    by_setting: dict[tuple, list[str]] = {}
    for rx, c in patterns:
        if c is not None:
            by_setting.setdefault((c.bits, c.group_size, c.sym), []).append(f"re:{rx}")
    groups = [(targets, compressed_tensors.weight_args(bits, group_size, sym, qcfg.act_order))
              for (bits, group_size, sym), targets in sorted(by_setting.items())]
    meta = {"quantizer": [f"quantmoe:{version}"], "backend": qcfg.backend, "act_order": qcfg.act_order,
            "damp_percent": qcfg.damp, "true_sequential": qcfg.true_sequential}
    if extra_layers:
        meta["full_precision_layers"] = extra_layers
    weights = compressed_tensors.weight_args(qcfg.bits, qcfg.group_size, qcfg.sym, qcfg.act_order)
    return compressed_tensors.quantization_config([*groups, (["Linear"], weights)], ignore, meta)


def write_config(ckpt: Checkpoint, staging: Path, qconfig: dict) -> None:
    """config.json (the source's, plus ``quantization_config``) and the tokenizer files, into ``staging``."""
    config = dict(ckpt.raw_config)
    config["quantization_config"] = qconfig
    atomic_write_json(staging / "config.json", config)
    for file in ckpt.tokenizer_files():
        copy_side_file(file, staging / file.name)


def copy_side_file(source: Path, target: Path) -> None:
    """Copy a side file (``Checkpoint.tokenizer_files``: regular, inside the model folder) into an export;
    a JSON one is parsed and written anew, so only JSON reaches the export (a file that is not is an error)."""
    if source.suffix != ".json":
        atomic_write_bytes(target, source.read_bytes())
        return
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise QuantMoeError(f"{source} is not valid JSON ({exc}); restore it or re-download the checkpoint") from None
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (valid escaped JSON, not UTF-8): keep it escaped
            text = json.dumps(data, indent=2) + "\n"
    atomic_write_text(target, text)


def derivable(ckpt: Checkpoint, name: str) -> bool:
    """Whether a stored tensor of a quantized linear only repeats what the format already says:
    a group index ``c // width`` (static groups), zero points of one value (symmetric), a shape."""
    suffix = name.rpartition(".")[2]
    if suffix == "weight_shape":
        return True
    if suffix in ("qzeros", "weight_zero_point"):
        t = ckpt.tensor(name).reshape(-1)
        return bool((t == t[0]).all())
    if suffix in ("g_idx", "weight_g_idx"):
        t = ckpt.tensor(name).long()
        width = int((t == 0).sum())
        return width > 0 and torch.equal(t, torch.arange(t.numel()) // width)
    return False


def checkpoint_stats(folder: Path) -> dict:
    """What a checkpoint's files hold, measured from the saved tensors (any backend, or none).

    - ``bits_per_weight``: bits of every tensor storing a quantized linear (packed weights,
      scales, zeros, statistics) over the weights those linears stand for;
    - ``information_bits_per_weight``: the same without the tensors that repeat what the format
      already says (``derivable``): a ``g_idx`` equal to ``c // group_size``, zero points that hold
      one value (symmetric), compressed-tensors' ``weight_shape``. GPTQ v1 stores these for its
      loaders, compressed-tensors omits them, so this is the measure that compares the two;
    - ``fraction_quantized``: quantized weights over all parameters (embeddings and head included);
    - ``decoder_linear_fraction``: quantized weights over the linear weights of the decoder
      layers, routers excluded (norms and biases are not linear weights);
    - ``decoder_bytes`` / ``decoder_bf16_bytes``: bytes of every tensor under ``model.layers.``,
      and what its parameters take in bf16;
    - ``classes``: per class of linear (``CLASS_NAMES``: attention, routed experts, shared experts, dense
      MLPs), ``bits``: the widths its weights are stored at (a quantized linear's packed weight's bits per
      weight; 16 for one kept unquantized), and ``bits_per_weight``: every tensor storing its linears
      (packed weights, scales, zeros ...; or the plain weight) over their weights.
    """

    ckpt = Checkpoint(folder)
    linears = ckpt.quantized_linears
    stored = {t for lin in linears.values() for t in lin.tensors}
    arch = architecture_for(ckpt.config)
    # Routers under their on-disk and in-memory names (the gptqmodel layout writes the latter).
    routers = {f"{ckpt.layer_prefix(i)}{name}" for i in range(ckpt.config.num_hidden_layers)
               for r in plan_layer(arch, ckpt.config, i).routers for name in (r, arch.to_memory(r + ".")[:-1])}
    quantized_bits = information_bits = 0
    other_params = decoder_params = decoder_bytes = decoder_linear = 0
    for name in ckpt.names():
        shape = ckpt.shape(name)
        numel = math.prod(shape)
        nbytes = ckpt.nbytes(name)
        in_decoder = name.startswith("model.layers.")
        if in_decoder:
            decoder_bytes += nbytes
        if name in stored:
            quantized_bits += nbytes * 8
            information_bits += 0 if derivable(ckpt, name) else nbytes * 8
            continue
        other_params += numel
        if in_decoder:
            decoder_params += numel
            module = name.rpartition(".")[0]
            if name.endswith(".weight") and len(shape) >= 2 and module not in routers:
                decoder_linear += numel
    quantized = sum(math.prod(lin.shape) for lin in linears.values())
    decoder_quantized = sum(math.prod(lin.shape) for m, lin in linears.items() if m.startswith("model.layers."))
    size = sum((Path(folder) / s).stat().st_size for s in ckpt.shards)
    total = quantized + other_params
    classes = class_bits(ckpt, arch)
    return {
        "bits_per_weight": quantized_bits / quantized if quantized else None,
        "information_bits_per_weight": information_bits / quantized if quantized else None,
        "size_bytes": size,
        "quantized_weights": quantized,
        "total_parameters": total,
        "fraction_quantized": quantized / total if total else 0.0,
        "decoder_linear_fraction": decoder_quantized / (decoder_quantized + decoder_linear)
        if decoder_quantized + decoder_linear else 0.0,
        "decoder_bytes": decoder_bytes,
        "decoder_bf16_bytes": 2 * (decoder_params + decoder_quantized),
        "classes": classes,
    }


# How reports name each kind of linear (architectures.LayerPlan.linear_kinds), in the order they show them.
CLASS_NAMES = {"attention": "attention", "expert": "routed experts", "shared_expert": "shared experts",
               "dense_mlp": "dense MLPs"}


def class_bits(ckpt: Checkpoint, arch: Architecture) -> dict[str, dict]:
    """``checkpoint_stats``' ``classes``: per class of linear of the decoder layers, the widths its weights
    are stored at and its bits per weight, measured from the files (any format, or none)."""
    linears = ckpt.quantized_linears
    # Under the gptqmodel layout, stored names are GPTQModel's; the plan gives source names.
    stored = {}
    for module, lin in linears.items():
        m = re.match(r"(model\.layers\.\d+\.)(.+)", module)
        source = module if m is None else m.group(1) + arch.from_gptqmodel_name(m.group(2) + ".weight")[:-len(".weight")]
        stored[source] = lin
    totals: dict[str, list] = {}  # kind -> [bits, weights, widths]
    for i in range(ckpt.config.num_hidden_layers):
        prefix = ckpt.layer_prefix(i)
        for name, kind in plan_layer(arch, ckpt.config, i).linear_kinds().items():
            module = prefix + name
            entry = totals.setdefault(kind, [0, 0, set()])
            lin = stored.get(module)
            if lin is not None:
                weights = math.prod(lin.shape)
                entry[0] += 8 * sum(ckpt.nbytes(t) for t in lin.tensors)
                entry[2].add(round(8 * ckpt.nbytes(lin.tensors[0]) / weights, 2))
            elif ckpt.has(f"{module}.weight"):
                weights = math.prod(ckpt.shape(f"{module}.weight"))
                entry[0] += 8 * ckpt.nbytes(f"{module}.weight")
                entry[2].add(round(8 * ckpt.nbytes(f"{module}.weight") / weights, 2))
            else:  # stored fused (GraniteMoE's experts in their source form): not counted per linear
                continue
            entry[1] += weights
    return {CLASS_NAMES[k]: {"bits": sorted(int(b) if b == int(b) else b for b in v[2]),
                             "bits_per_weight": v[0] / v[1], "weights": v[1]}
            for k, v in sorted(totals.items(), key=lambda kv: list(CLASS_NAMES).index(kv[0])) if v[1]}


def class_text(classes: dict[str, dict] | None) -> str:
    """``attention 8-bit (9.42 bits/weight); routed experts 4-bit (4.53 bits/weight)``, from ``class_bits``."""
    return "; ".join(f"{name} {'/'.join(f'{b}-bit' for b in c['bits'])} ({c['bits_per_weight']:.2f} bits/weight)"
                     for name, c in (classes or {}).items())


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
