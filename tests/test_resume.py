"""Crash-safe, resumable, deterministic quantization.

A run killed partway and re-run with the same command must write the same bytes as a
run that was never stopped; a work folder made from other inputs must never be reused.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from clirun import (
    Stop,
    cli,
    content,
    products_rounding_by_rows,
    quantize_args,
    start,
    stopped_after_layer,
    wait_for,
)
from safetensors import safe_open
from tiny import make_model, router_or_mtp_extra, write_text

import quantmoe
from quantmoe.apps.verify import verify
from quantmoe.base.files import save_safetensors
from quantmoe.base.options import QuantConfig
from quantmoe.formats.fp8 import Fp8Experts, write_fp8_release
from quantmoe.stages import experts, resume
from quantmoe.stages.quantize import work_dir
from quantmoe.stages.resume import layer_file

QCFG = QuantConfig(group_size=32)
QUICK_API = dict(nsamples=4, seqlen=32, run_eval=False, quiet=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {"mixtral": make_model("mixtral", root / "mixtral"), "qwen2_moe": make_model("qwen2_moe", root / "qwen2_moe"),
            "text": write_text(root / "docs.jsonl")}


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """An uninterrupted CLI run on the tiny Mixtral; every out folder is named ``out`` so READMEs compare."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run = cli(*quantize_args(inputs["mixtral"], out, inputs["text"]))
    assert run.returncode == 0, run.stderr
    return out


def test_same_command_twice_gives_identical_bytes(inputs, reference, tmp_path):
    out = tmp_path / "out"
    run = cli(*quantize_args(inputs["mixtral"], out, inputs["text"]))
    assert run.returncode == 0, run.stderr
    assert content(out) == content(reference)
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["inputs"]) == {"model", "calibration", "options", "seed", "run", "versions"}
    assert manifest["versions"]["quantmoe"] == quantmoe.__version__


def kill_after_first_layer_then_resume(args: list[str], out: Path) -> str:
    """SIGKILL the run as soon as layer 0 is on disk, re-run the same command; returns its stderr."""
    proc = start(*args)
    wait_for(layer_file(work_dir(out), 0).with_suffix(".json"), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not out.exists()
    assert layer_file(work_dir(out), 0).is_file()
    run = cli(*args)
    assert run.returncode == 0, run.stderr
    assert not work_dir(out).exists()
    return run.stderr


def test_sigkill_after_first_layer_then_resume_is_byte_identical(inputs, reference, tmp_path):
    out = tmp_path / "out"
    stderr = kill_after_first_layer_then_resume(quantize_args(inputs["mixtral"], out, inputs["text"]), out)
    assert "resuming: 1 of 2 layers are already quantized" in stderr
    assert content(out) == content(reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("extra", [(), ("--tf32",)])
def test_cuda_rerun_and_resume_are_byte_identical(inputs, tmp_path, extra):
    """On one GPU too, in fp32 and under --tf32: cuBLAS, the MoE scatter and the replay of the finished layers
    must not make the bytes depend on the run."""
    outs = [tmp_path / name / "out" for name in ("a", "b", "resumed")]
    for out in outs[:2]:
        run = cli(*quantize_args(inputs["qwen2_moe"], out, inputs["text"], "--device", "cuda", *extra))
        assert run.returncode == 0, run.stderr
    kill_after_first_layer_then_resume(quantize_args(inputs["qwen2_moe"], outs[2], inputs["text"], "--device", "cuda",
                                                     *extra), outs[2])
    assert content(outs[0]) == content(outs[1]) == content(outs[2])


def _crashed_and_resumed(model: Path, text: Path, out: Path, monkeypatch, capsys) -> dict:
    """The content of ``out`` after a run stopped right after writing layer 1 and the run that resumes it."""
    with stopped_after_layer(monkeypatch, 1), pytest.raises(Stop):
        quantmoe.quantize(model, out, QCFG, calib=text, **QUICK_API)
    capsys.readouterr()
    quantmoe.quantize(model, out, QCFG, calib=text, **QUICK_API)
    assert "resuming: 2 of " in capsys.readouterr().err
    return content(out)


def test_resume_replays_dense_moe_and_shared_expert_layers(inputs, tmp_path, monkeypatch, capsys):
    """Qwen2-MoE: layer 0 is dense, layer 1 has routed and shared experts; both are replayed, the MoE layer reading
    of the source's routed experts only the one whose shapes an empty share takes (the layer file holds them all).
    The replay holds a layer's routed experts as the run did: quantized, as levels (under a byte a weight, not
    dequantized to fp32's four); on the full-precision stream (--fit stream), as the source stores them (fp16 here)."""
    from quantmoe.model.stream import LayerStream

    model, text = inputs["qwen2_moe"], inputs["text"]
    quantmoe.quantize(model, tmp_path / "a" / "out", QCFG, calib=text, **QUICK_API)
    read = []  # (layer, how many routed experts' tensors each read of a layer's source tensors holds)
    layer_state = LayerStream.layer_state

    def spy(self, index, *args, **kwargs):
        state = layer_state(self, index, *args, **kwargs)
        read.append((index, len({self.arch.expert_of(name) for name in state} - {None})))
        return state

    held = []  # per forward of a replayed layer's experts: originals' dtype (None: not held), levels?, bytes held

    class Held(experts.StoredExperts):
        def run_deferred(self, *args, **kwargs):
            held.append((None if self.gate_up.is_meta else self.gate_up.dtype, self.use_quantized, self.held_bytes))
            return super().run_deferred(*args, **kwargs)

    monkeypatch.setattr(LayerStream, "layer_state", spy)
    monkeypatch.setattr(resume, "StoredExperts", Held)
    assert _crashed_and_resumed(model, text, tmp_path / "b" / "out", monkeypatch, capsys) == \
        content(tmp_path / "a" / "out")
    experts_read = max(n for i, n in read if i == 1)
    assert experts_read > 1 and (1, 1) in read  # the live run reads them all; the replay, one
    # (the full-precision stream's replay under --fit stream reads them all: it runs the original layer)
    config = json.loads((model / "config.json").read_text())
    weights = config["num_experts"] * 3 * config["moe_intermediate_size"] * config["hidden_size"]
    assert {(dtype, quantized) for dtype, quantized, _ in held} == {(None, True), (torch.float16, False)}
    assert all(n < weights for dtype, _, n in held if dtype is None)
    assert all(n == 2 * weights for dtype, _, n in held if dtype is not None)


@pytest.mark.parametrize("model_type", ["granitemoe", "deepseek_v3", "deepseek_v3-fp8"])
def test_a_resumed_run_gives_the_bytes_of_one_never_stopped_whatever_the_experts_storage(tmp_path, monkeypatch, capsys,
                                                                                        model_type):
    """The replay of a finished layer reads the routed experts from its layer file, not from the source: GraniteMoE's
    experts are fused on disk (an empty share reads none of their rows), DeepSeek-V3's are one linear per expert beside
    a shared expert and a dense first layer; from its FP8 release, the full-precision stream's replay holds them as
    FP8 codes and scales, as the run did."""
    # three layers: one is left to run after layers 0 and 1, which are replayed
    model = make_model(model_type.removesuffix("-fp8"), tmp_path / "model", num_hidden_layers=3)
    text = write_text(tmp_path / "docs.jsonl")
    if model_type.endswith("-fp8"):
        model = write_fp8_release(model, tmp_path / "fp8", block=(32, 32), skip=router_or_mtp_extra("deepseek_v3"))
    quantmoe.quantize(model, tmp_path / "a" / "out", QCFG, calib=text, **QUICK_API)
    stored = []  # the type of the originals each replayed layer's experts hold (the full-precision stream's)

    class Held(experts.StoredExperts):
        def run_deferred(self, *args, **kwargs):
            stored.append(type(self.gate_up))
            return super().run_deferred(*args, **kwargs)

    monkeypatch.setattr(resume, "StoredExperts", Held)
    assert _crashed_and_resumed(model, text, tmp_path / "b" / "out", monkeypatch, capsys) == \
        content(tmp_path / "a" / "out")
    assert (Fp8Experts if model_type.endswith("-fp8") else torch.Tensor) in stored


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3-fp8"])
def test_a_resumed_run_replays_each_product_over_the_rows_the_stopped_run_made_it_over(tmp_path, monkeypatch, capsys,
                                                                                      model_type):
    """On a GPU a matrix product's bits may depend on how many rows it is made over (cuBLAS picks its kernel by
    the shapes): the replay of a finished layer must make every product over the rows the run that finished it
    did, the routed experts' over several batches' rows (experts.tail_by_expert), on both streams. Here on the
    CPU each product is made to round by its rows; replayed a batch at a time, the resumed run's bytes differ."""
    model = make_model(model_type.removesuffix("-fp8"), tmp_path / "model", num_hidden_layers=3)
    text = write_text(tmp_path / "docs.jsonl")
    if model_type.endswith("-fp8"):
        model = write_fp8_release(model, tmp_path / "fp8", block=(32, 32), skip=router_or_mtp_extra("deepseek_v3"))
    api = {**QUICK_API, "batch_size": 1}  # four batches: the experts' products are made over all of them
    with products_rounding_by_rows(monkeypatch):
        quantmoe.quantize(model, tmp_path / "a" / "out", QCFG, calib=text, **api)
        with stopped_after_layer(monkeypatch, 1), pytest.raises(Stop):
            quantmoe.quantize(model, tmp_path / "b" / "out", QCFG, calib=text, **api)
        capsys.readouterr()
        quantmoe.quantize(model, tmp_path / "b" / "out", QCFG, calib=text, **api)
    assert "resuming: 2 of 3 layers" in capsys.readouterr().err
    assert content(tmp_path / "b" / "out") == content(tmp_path / "a" / "out")


def _zero_layer_file(work: Path, index: int) -> None:
    """Overwrite a finished layer's tensors with zeros, keeping its fingerprint: reuse would show."""
    file = layer_file(work, index)
    with safe_open(str(file), framework="pt") as f:
        meta, tensors = f.metadata(), {n: torch.zeros_like(f.get_tensor(n)) for n in f.keys()}
    save_safetensors(file, tensors, metadata=meta)


@pytest.mark.parametrize("change", ["options", "hessian_dtype", "restart"])
def test_other_inputs_or_restart_never_reuse_layers(inputs, tmp_path, monkeypatch, capsys, change):
    model, text = inputs["mixtral"], inputs["text"]
    out = tmp_path / "out"
    with stopped_after_layer(monkeypatch, 0), pytest.raises(Stop):
        quantmoe.quantize(model, out, QCFG, calib=text, **QUICK_API)
    _zero_layer_file(work_dir(out), 0)
    capsys.readouterr()
    if change == "options":
        quantmoe.quantize(model, out, QuantConfig(group_size=32, damp=0.02), calib=text, **QUICK_API)
        expected = "was made from other inputs (options differ); starting over"
    elif change == "hessian_dtype":  # bf16 statistics round differently: a float32 run's layers are not theirs
        quantmoe.quantize(model, out, QCFG, calib=text, hessian_dtype="bfloat16", **QUICK_API)
        expected = "was made from other inputs"
    else:
        quantmoe.quantize(model, out, QCFG, calib=text, resume=False, **QUICK_API)
        expected = "--restart: discarding the finished layers"
    err = capsys.readouterr().err
    assert expected in err and "resuming" not in err
    assert verify(out).ok, verify(out).problems  # a reused (zeroed) layer 0 would be all-zero modules


def test_a_resumed_run_replays_the_experts_fp16_products_as_the_stopped_run_made_them(inputs, tmp_path, monkeypatch,
                                                                                      capsys):
    """Under --tf32 on CUDA the routed experts' forward products take fp16 operands (core.half_rows), and a resumed
    run replays the finished layers' experts, on both streams, through the same products (resume.run_stored):
    the bytes of a run never stopped. Here on the CPU (fp16's rounded values held in fp32): replayed through
    transformers' own fp32 products instead, the resumed run's bytes differ."""
    from quantmoe.gptq import core
    from quantmoe.model import stream

    monkeypatch.setattr(core, "HALF_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(stream, "half_products", lambda enabled: core.half_products(True))
    monkeypatch.setattr(experts, "HALF_FORWARD_FLOPS", 0)  # the tiny experts count as wide
    model, text = inputs["qwen2_moe"], inputs["text"]
    quantmoe.quantize(model, tmp_path / "a" / "out", QCFG, calib=text, **QUICK_API)

    assert _crashed_and_resumed(model, text, tmp_path / "b" / "out", monkeypatch, capsys) == \
        content(tmp_path / "a" / "out")

    class Fp32Products(experts.StoredExperts):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.half = False

    monkeypatch.setattr(resume, "StoredExperts", Fp32Products)
    assert _crashed_and_resumed(model, text, tmp_path / "c" / "out", monkeypatch, capsys) != \
        content(tmp_path / "a" / "out")
