"""Host memory within a budget (issue 19, --host-memory): a layer's packed results first, then its MLP
inputs' pinned capture, then the read-ahead of the next layer; shards unmapped as they are read; the
same bytes for any budget."""

from __future__ import annotations

import gc
import json
import os
import shutil
import threading
import weakref

import psutil
import pytest
import torch
from clirun import cli, one_error_line, quantize_args
from safetensors.torch import load_file, save_file
from tiny import make_model, router_or_mtp_extra
from torch import Tensor

import quantmoe
from quantmoe.base.measure import cached_pinned_bytes, frozen_collector
from quantmoe.base.options import QuantConfig
from quantmoe.formats.base import StoredWeight
from quantmoe.formats.fp8 import Fp8Weight, write_fp8_release
from quantmoe.model import checkpoint as checkpoint_module
from quantmoe.model.checkpoint import READ_WINDOW, Checkpoint, NonFinite
from quantmoe.stages import gptq_method as quantize_module
from quantmoe.stages.gptq_method import (
    HostPlan,
    host_budget,
    host_plan,
    memory_budget,
    packed_bytes,
    pinned_bytes,
)
from quantmoe.stages.layer import HOST_CAPTURE_BYTES

GB = 10**9


def test_host_plan_keeps_results_then_capture_then_read_ahead():
    # DeepSeek-V3's MoE layer from FP8: 15 GB of captured MLP inputs (both streams), 5.9 GB packed, 11.5 GB to read.
    capture, packed, layer = 15 * GB, 5.9 * GB, 11.5 * GB
    assert host_plan(120 * GB, 3 * GB, packed, capture, layer) == HostPlan(HOST_CAPTURE_BYTES, True, False)
    tight = host_plan(32 * GB, 3 * GB, packed, capture, layer)  # the capture fits, the read-ahead does not
    assert tight.capture >= capture and not tight.read_ahead
    dense = host_plan(32 * GB, 3 * GB, 0.1 * GB, capture, layer)  # after a dense layer both fit: 29.6 GB + the window
    assert dense.capture >= capture and dense.read_ahead
    assert 3 * GB + 0.1 * GB + capture + layer + READ_WINDOW <= 32 * GB
    small = host_plan(16 * GB, 3 * GB, packed, capture, layer)  # no room for the capture: the layer captures again
    assert small.capture < capture and not small.read_ahead
    assert host_plan(16 * GB, 3 * GB, packed, 0, 2 * GB).read_ahead  # nothing pinned: the read-ahead fits
    assert host_plan(2 * GB, 3 * GB, packed, capture, layer) == HostPlan(0, False, False)
    assert not host_plan(120 * GB, 3 * GB, packed, capture, None).read_ahead  # the last layer


def test_the_export_beside_the_layers_gets_the_room_left_after_the_capture_and_the_read_ahead():
    capture, packed, layer, export = 15 * GB, 5.9 * GB, 11.5 * GB, 25 * GB  # DeepSeek-V3 from FP8, 2 GB shards
    roomy = host_plan(120 * GB, 3 * GB, packed, capture, layer, export)
    assert roomy == HostPlan(HOST_CAPTURE_BYTES, True, True)
    needed = 3 * GB + packed + capture + layer + READ_WINDOW + export
    assert host_plan(needed, 3 * GB, packed, capture, layer, export).export
    held = host_plan(needed - 1, 3 * GB, packed, capture, layer, export)  # the capture and the read-ahead first
    assert held == HostPlan(HOST_CAPTURE_BYTES, True, False)
    assert host_plan(32 * GB, 3 * GB, packed, 0, None, 20 * GB).export  # nothing pinned, nothing to read ahead
    assert not host_plan(120 * GB, 3 * GB, packed, capture, layer, None).export  # no export beside the layers


def test_the_default_host_budget_is_what_the_machine_has_available():
    available = psutil.virtual_memory().available
    assert abs(host_budget(None) - (available + psutil.Process().memory_info().rss - quantize_module.HOST_HEADROOM)) \
        < 2 * 2**30
    assert host_budget("1GB") == 1 * GB


def test_a_budget_beyond_the_memory_there_is_keeps_to_that_memory_and_says_so(monkeypatch, capsys):
    """--gpu-memory 200GB on a GPU with 132 GB free (or --host-memory beyond the machine's) would size the work for
    memory that is not there, to run out of it partway (the host's: killed without a word)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (130 * GB, 141 * GB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 2 * GB)
    cuda = torch.device("cuda", 0)
    assert memory_budget("70GB", cuda) == 70 * GB and memory_budget("132GB", cuda) == 132 * GB
    assert capsys.readouterr().err == ""
    assert memory_budget("200GB", cuda) == memory_budget(None, cuda) == 132 * GB - quantize_module.BUDGET_HEADROOM
    assert "--gpu-memory 200GB is more than cuda:0 has free (132.0 GB); the run keeps to 127.7 GB" in \
        capsys.readouterr().err
    assert memory_budget("200GB", torch.device("cpu")) == 200 * GB  # no device to measure: the budget as given

    available = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    kept = host_budget("100TB")
    assert abs(kept - (available - quantize_module.HOST_HEADROOM)) < 2 * 2**30
    assert "--host-memory 100TB is more than this machine has available" in capsys.readouterr().err


def test_packed_bytes_are_what_the_layer_files_hold(tiny_model, text_file, tmp_path):
    model = tiny_model("qwen2_moe")
    out = tmp_path / "out"
    quantmoe.quantize(model, out, QuantConfig(group_size=32), calib=text_file, nsamples=4, seqlen=32, run_eval=False,
                      quiet=True)
    ckpt, arch = Checkpoint(model), quantmoe.stages.quantize.architecture_for(Checkpoint(model).config)
    written = Checkpoint(out)
    for i in range(ckpt.config.num_hidden_layers):
        held = sum(written.nbytes(n) for n in written.names(f"model.layers.{i}.")
                   if n.rsplit(".", 1)[1] in ("qweight", "qzeros", "scales", "g_idx"))
        assert packed_bytes(ckpt, arch, QuantConfig(group_size=32), i) == held


def test_a_layer_is_read_without_holding_the_shards_mapped(tiny_model, tiny_rtn_export, monkeypatch):
    """A source layer's tensors are read from the shard files straight into memory (read_copy): no shard is
    mapped while they are read. What is dequantized on the host (an export read to float32) is read
    through the mapped shards, unmapped every READ_WINDOW bytes."""
    closes = []
    close = Checkpoint.close
    monkeypatch.setattr(Checkpoint, "close", lambda self: (closes.append(1), close(self)))
    monkeypatch.setattr(checkpoint_module, "READ_WINDOW", 1)  # every tensor
    source = Checkpoint(tiny_model("mixtral"))
    prefix = source.layer_prefix(0)
    whole = source.read_prefix(prefix, None)
    assert len(closes) == 1  # at the end only: nothing was mapped
    assert all(torch.equal(whole[k], source.tensor(prefix + k)) for k in whole)
    closes.clear()
    export = Checkpoint(tiny_rtn_export)
    quantized = [m for m in export.quantized_linears if m.startswith(prefix)]
    assert quantized
    export.read_prefix(prefix, torch.float32)
    assert len(closes) == len(quantized) + 1  # after each dequantized linear, and at the end


def test_any_host_budget_gives_the_same_bytes(tiny_model, text_file, tmp_path, monkeypatch):
    """A budget below what the process holds reads no layer ahead (and pins nothing): the same output."""
    model = tiny_model("deepseek_v3")
    plans = []
    plan = quantize_module.host_plan
    monkeypatch.setattr(quantize_module, "host_plan", lambda *a: plans.append(plan(*a)) or plans[-1])

    def run(name, budget):
        out = tmp_path / name
        quantmoe.quantize(model, out, QuantConfig(group_size=32), calib=text_file, nsamples=8, seqlen=32,
                          run_eval=False, quiet=True, host_memory=budget)
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}

    roomy = run("roomy", None)
    assert [p.read_ahead for p in plans] == [True, True, False]
    assert [p.export for p in plans] == [True] * 3  # the export beside the layers takes each as it is written
    plans.clear()
    assert run("tight", "1MB") == roomy
    assert [p.read_ahead for p in plans] == [False] * 3 and {p.capture for p in plans} == {0}
    assert [p.export for p in plans] == [False] * 3  # held back until the last layer is done


def test_cached_page_locked_blocks_are_free_for_the_next_read(tiny_model, text_file, tmp_path, monkeypatch):
    """Page-locked blocks PyTorch caches after they are freed (a pinned read, the packed results' copies) are reused
    by the next read: the plan does not count them as held. With more cached than any budget, a 1 MB budget
    reads ahead as a roomy one does, and the bytes are the same."""
    stats = {"allocated_bytes.current": 10 * GB, "active_bytes.current": 4 * GB}
    monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda: stats, raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert cached_pinned_bytes() == 6 * GB
    stats.pop("active_bytes.current")
    assert cached_pinned_bytes() == 10 * GB
    stats.clear()  # a torch that says nothing: nothing is taken off
    assert cached_pinned_bytes() == 0
    monkeypatch.undo()

    # A torch whose stats say nothing (2.11): the layer's own pinned read is what the next one reuses.
    pinned, plain = torch.zeros(1000), torch.zeros(10)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t: t is pinned or t is fp8.codes)
    fp8 = Fp8Weight(torch.zeros(64, 8, dtype=torch.float8_e4m3fn), torch.ones(1, 1), (128, 128), "w")
    half = StoredWeight({"qweight": pinned, "scales": plain}, None, torch.Size((8, 8)), torch.float32, "h.weight")
    whole = StoredWeight({"qweight": pinned}, None, torch.Size((8, 8)), torch.float32, "s.weight")
    assert pinned_bytes({"a": pinned, "b": plain, "c": fp8, "d": half, "e": whole}) == 4000 + 512 + 4 + 4000
    monkeypatch.undo()

    model = tiny_model("deepseek_v3")
    plans, plan = [], quantize_module.host_plan
    monkeypatch.setattr(quantize_module, "host_plan", lambda *a: plans.append(plan(*a)) or plans[-1])
    monkeypatch.setattr(quantize_module, "cached_pinned_bytes", lambda: 1 << 50)

    def run(name):
        out = tmp_path / name
        quantmoe.quantize(model, out, QuantConfig(group_size=32), calib=text_file, nsamples=8, seqlen=32,
                          run_eval=False, quiet=True, host_memory="1MB")
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}

    cached = run("cached")
    assert [p.read_ahead for p in plans] == [True, True, False]
    monkeypatch.setattr(quantize_module, "cached_pinned_bytes", lambda: 0)
    plans.clear()
    assert run("none") == cached
    assert [p.read_ahead for p in plans] == [False] * 3
    released = []
    monkeypatch.setattr(quantize_module, "release_pinned_memory", lambda: released.append(len(plans)))
    monkeypatch.setattr(quantmoe.stages.quantize, "release_pinned_memory", lambda: released.append("after the layers"))
    monkeypatch.setattr(quantize_module, "pinned_bytes", lambda state: 1 << 50)  # the layer's read was pinned
    plans.clear()
    assert run("read") == cached
    assert [p.read_ahead for p in plans] == [True, True, False]  # the last layer reads none: let go after it
    assert released == ["after the layers"]
    monkeypatch.setattr(quantize_module, "pinned_bytes", lambda state: 1)  # pinned, but the next read does not fit:
    plans.clear()                                                          # it is read after, the pinned blocks let go
    released.clear()
    assert run("after") == cached
    assert [p.read_ahead for p in plans] == [False] * 3 and released == [1, 2, "after the layers"]


def test_the_layers_run_with_the_objects_before_them_frozen_out_of_the_collector(tiny_model, text_file, tmp_path,
                                                                                 monkeypatch):
    """The garbage collector's full passes skip what existed before the layers (frozen_collector): a cycle made
    inside is still collected, and nothing stays frozen after."""
    with frozen_collector():
        assert gc.get_freeze_count() > 0
        class Node:
            pass
        cycle = Node()
        cycle.next = Node()
        cycle.next.next = cycle
        gone = weakref.ref(cycle.next)
        del cycle
        gc.collect()
        assert gone() is None
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller's own freeze is left as it is
    try:
        before = gc.get_freeze_count()
        with frozen_collector():
            pass
        # Another thread (tqdm's monitor, say) may free a frozen object meanwhile, so the count can only fall;
        # unfreezing the caller's objects would leave 0, freezing more would raise it.
        assert 0 < gc.get_freeze_count() <= before
    finally:
        gc.unfreeze()

    frozen = []
    run = quantize_module.LayerQuantizer.run
    monkeypatch.setattr(quantize_module.LayerQuantizer, "run", lambda self: frozen.append(gc.get_freeze_count()) or
                        run(self))
    quantmoe.quantize(tiny_model("mixtral"), tmp_path / "out", QuantConfig(group_size=32), calib=text_file,
                      nsamples=8, seqlen=32, run_eval=False, quiet=True)
    assert len(frozen) == 2 and min(frozen) > 1000 and gc.get_freeze_count() == 0


def test_a_host_budget_that_is_not_a_size_is_one_line(tiny_model, text_file, tmp_path):
    result = cli(*quantize_args(tiny_model("mixtral"), tmp_path / "out", text_file, "--host-memory", "lots"))
    assert result.returncode == 2
    assert one_error_line(result.stderr) == "error: --host-memory 'lots' is not a size; write it like 32GB or 64GB"
    assert not (tmp_path / "out").exists()


def test_the_cli_takes_a_host_budget(tiny_model, text_file, tmp_path):
    out = tmp_path / "out"
    result = cli(*quantize_args(tiny_model("mixtral"), out, text_file, "--host-memory", "1MB"))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"


READ_COPY = Checkpoint.read_copy


def _read_with(monkeypatch, threads: int, read):
    """What ``read()`` returns with read_prefix on ``threads`` threads, and (thread, tensor) of each read_copy
    (the cores this machine has do not bound the count here)."""
    monkeypatch.setattr(checkpoint_module, "READ_THREADS", threads)
    monkeypatch.setattr(checkpoint_module.os, "cpu_count", lambda: 8)
    seen = []

    def read_copy(self, name, *args, **kwargs):
        seen.append((threading.current_thread().name, name))
        return READ_COPY(self, name, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "read_copy", read_copy)
    return read(), seen


def _same(a, b) -> bool:
    """Tensors, FP8 or stored weights of an export equal in dtype, shape and bytes."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    if isinstance(a, Fp8Weight):
        return isinstance(b, Fp8Weight) and _same(a.codes, b.codes) and _same(a.scale, b.scale) and \
            (a.block, a.name, a.dtype) == (b.block, b.name, b.dtype)
    return isinstance(b, StoredWeight) and list(a.parts) == list(b.parts) and all(
        _same(a.parts[k], b.parts[k]) for k in a.parts) and (a.shape, a.dtype, a.name) == (b.shape, b.dtype, b.name)


@pytest.fixture(scope="module")
def bf16_and_fp8(tmp_path_factory):
    """The tiny DeepSeek-V3 in BF16 and its FP8 release (DeepSeek's format, routers left in BF16)."""
    base = tmp_path_factory.mktemp("read-threads")
    bf16 = make_model("deepseek_v3", base / "bf16", dtype=torch.bfloat16)
    return bf16, write_fp8_release(bf16, base / "fp8", block=(32, 32), skip=router_or_mtp_extra("deepseek_v3"))


def test_a_layer_read_on_threads_is_the_layer_read_one_tensor_after_another(bf16_and_fp8, tiny_rtn_export,
                                                                            monkeypatch):
    """read_prefix on several threads gives what it gives on one: the same keys in the same order, the same
    dtypes and bytes, for a BF16 source, an FP8 release kept as stored or dequantized, and an export's
    deferred linears; and the threads did read (the FP8 weights kept as stored too)."""
    def threaded(seen) -> set[str]:
        return {name for thread, name in seen if thread.startswith("quantmoe-read")}

    bf16, fp8 = bf16_and_fp8
    cases = [(bf16, {}), (bf16, {"dtype": None}), (fp8, {"dtype": None}), (fp8, {}),
             (tiny_rtn_export, {"dtype": None, "defer": True}), (bf16, {"only": lambda n: "experts" not in n})]
    for folder, kwargs in cases:
        ckpt = Checkpoint(folder)
        prefix = ckpt.layer_prefix(1)  # a MoE layer
        one, seen_one = _read_with(monkeypatch, 1, lambda: ckpt.read_prefix(prefix, **kwargs))
        many, seen_many = _read_with(monkeypatch, 4, lambda: Checkpoint(folder).read_prefix(prefix, **kwargs))
        assert list(many) == list(one) and len(one) > 3, (folder.name, kwargs)
        assert all(_same(one[k], many[k]) for k in one), (folder.name, kwargs)
        assert not threaded(seen_one) and threaded(seen_many)
        assert sorted(name for _, name in seen_many) == sorted(name for _, name in seen_one)
        if folder == fp8 and kwargs == {"dtype": None}:
            assert any(isinstance(w, Fp8Weight) for w in many.values())
            assert any(name.endswith(".weight_scale_inv") for name in threaded(seen_many))


def test_a_pinned_read_reads_every_tensor_straight_into_page_locked_memory(bf16_and_fp8, tiny_rtn_export,
                                                                           monkeypatch):
    """read_prefix(pin=True) reads each tensor into page-locked memory as it reads it from the shard (read_copy's
    pin), the linears kept as stored (an FP8 release's codes and scales, an export's parts) too, instead of
    reading them into ordinary memory and copying that into page-locked memory: no tensor is pinned after it
    is read. (This CPU build cannot pin: read_copy reads into ordinary memory and marks what it returns;
    tests/test_gpu.py reads into real page-locked memory.)"""
    read_copy, pinned = Checkpoint.read_copy, set()

    def marked(self, name, dtype=None, pin=False):
        t = read_copy(self, name, dtype)
        if pin:
            pinned.add(id(t))
        return t

    monkeypatch.setattr(Checkpoint, "read_copy", marked)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pytest.fail("a tensor was pinned after its read"))
    bf16, fp8 = bf16_and_fp8
    for folder, kwargs in [(fp8, {"dtype": None}), (tiny_rtn_export, {"dtype": None, "defer": True}), (bf16, {})]:
        ckpt = Checkpoint(folder)
        prefix = ckpt.layer_prefix(1)  # a MoE layer
        plain = ckpt.read_prefix(prefix, **kwargs)
        pinned.clear()
        read = ckpt.read_prefix(prefix, pin=True, **kwargs)
        assert list(read) == list(plain) and all(_same(plain[k], read[k]) for k in plain), folder.name
        parts = [p for t in read.values() for p in ([t.codes, t.scale] if isinstance(t, Fp8Weight) else
                                                     t.parts.values() if isinstance(t, StoredWeight) else [t])]
        assert parts and all(id(p) in pinned for p in parts), folder.name
        if folder == fp8:
            assert sum(isinstance(t, Fp8Weight) for t in read.values()) > 3


def test_a_nan_read_on_threads_is_reported_as_one_read_after_another(bf16_and_fp8, tmp_path, monkeypatch):
    """NaN in the third and the last tensor a layer read reads: with threads as without, the error names
    the third (the first in order), however the threads finish, with the same message (the CLI's line)."""
    bf16, _ = bf16_and_fp8
    folder = tmp_path / "nan"
    shutil.copytree(bf16, folder)
    names = Checkpoint(folder).names("model.layers.1.")
    third, last = names[2], names[-1]
    shard = next(folder.glob("*.safetensors"))
    tensors = load_file(shard)
    assert tensors[third].is_floating_point() and tensors[last].is_floating_point()
    tensors[third].view(-1)[-1] = float("nan")
    tensors[last].view(-1)[0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    errors = []
    for threads in (1, 4):
        with pytest.raises(NonFinite) as caught:
            _read_with(monkeypatch, threads, lambda: Checkpoint(folder).read_prefix("model.layers.1.", None))
        errors.append(str(caught.value))
        assert caught.value.tensor == third
    assert errors[0] == errors[1]


@pytest.mark.parametrize("given, expected", [
    ({}, "pinned_use_cuda_host_register:True,pinned_num_register_threads:{threads}"),
    ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
     "expandable_segments:True,pinned_use_cuda_host_register:True,pinned_num_register_threads:{threads}"),
    ({"PYTORCH_CUDA_ALLOC_CONF": "pinned_num_register_threads:2"}, None),
    ({"PYTORCH_ALLOC_CONF": "pinned_use_cuda_host_register:False"}, None),
])
def test_a_cuda_device_registers_page_locked_blocks_in_parallel_unless_told_otherwise(monkeypatch, given, expected):
    """pick_device("cuda") asks PyTorch for page-locked blocks made by malloc and several threads touching their
    pages, then registered with CUDA, passing on the rest of the user's allocator settings, and leaves the
    setting alone where the user made it; a CPU run never touches the allocator."""
    from quantmoe.base import measure
    from quantmoe.model import stream

    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for key in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(key, raising=False)
    for key, value in given.items():
        monkeypatch.setenv(key, value)
    assert stream.pick_device("cpu") == torch.device("cpu") and calls == []
    assert stream.pick_device("cuda") == torch.device("cuda")
    threads = max(1, min(measure.PINNED_REGISTER_THREADS, len(os.sched_getaffinity(0))))
    assert calls == ([] if expected is None else [expected.format(threads=threads)])


def test_cuda_asked_for_without_a_visible_device_is_one_error_and_leaves_the_allocator_alone(monkeypatch):
    from quantmoe.base.errors import QuantMoeError
    from quantmoe.model import stream

    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QuantMoeError, match="no CUDA device is visible; use --device cpu"):
        stream.pick_device("cuda")
    assert stream.pick_device("auto") == torch.device("cpu") and calls == []
