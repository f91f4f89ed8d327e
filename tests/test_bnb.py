"""The backend interface and the bitsandbytes backends, on tiny models, on CPU.

Per-architecture tests run once per (architecture row, bnb backend). Tests that need
bitsandbytes skip only when it cannot be imported (CI installs ``quantmoe[bnb]``); the
missing-extra error is tested by hiding the module.
"""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch
from click.testing import CliRunner
from clirun import Stop, stopped_after_layer
from conftest import ARCH_NAMES
from tiny import NESTED_TINY, make_model, released, transformers_lm, write_text

import quantmoe
from quantmoe import backends
from quantmoe.backends import Options
from quantmoe.backends.bnb import module_to_memory
from quantmoe.base.errors import QuantMoeError
from quantmoe.cli import main
from quantmoe.model.architectures import ARCHITECTURES, plan_layer, unfuse_experts
from quantmoe.model.checkpoint import INDEX_NAME, Checkpoint
from quantmoe.stages.export import checkpoint_stats

BNB = [n for n in backends.names() if n.startswith("bnb-")]
# Rows whose experts are fused on disk (GraniteMoE): the bnb backends cut them per expert.
FUSED_ON_DISK = [a for a in ARCH_NAMES if ARCHITECTURES[a].experts is not None and ARCHITECTURES[a].fused.on_disk]
# nf4 on every row; fp4 and int8 (same code path, other quantizer) on the two reference MoE rows.
ALL_CASES = [(a, "bnb-nf4") for a in ARCH_NAMES] + [
    (a, b) for a in ("mixtral", "qwen2_moe") if a in ARCH_NAMES for b in BNB if b != "bnb-nf4"]


@pytest.fixture(scope="session")
def bitsandbytes():
    return pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def bnb_exported(tiny_model, tmp_path_factory, bitsandbytes):
    """(model_type, backend) -> (source folder, export folder), quantized once per module."""
    cache = {}

    def run(model_type, name):
        if (model_type, name) not in cache:
            src = tiny_model(model_type)
            out = tmp_path_factory.mktemp("bnb") / f"{model_type}-{name}"
            backends.get(name).quantize(src, out, Options(device="cpu", run_eval=False, quiet=True))
            cache[model_type, name] = (src, out)
        return cache[model_type, name]

    return run



def _planned(ckpt) -> dict[str, list[str]]:
    """layer prefix -> on-disk linears the architecture row says are quantized."""
    arch = ARCHITECTURES[ckpt.config.model_type]
    return {ckpt.layer_prefix(i): plan_layer(arch, ckpt.config, i).quantized_linears()
            for i in range(ckpt.config.num_hidden_layers)}


# -- the interface ----------------------------------------------------------------------
def test_registry_holds_every_backend_and_resolves_compare_specs():
    from quantmoe.base.options import BACKEND_NAMES
    from quantmoe.formats import READERS

    assert {"gptq", "rtn", "bnb-nf4", "bnb-fp4", "bnb-int8"} <= set(backends.names())
    assert sorted(backends.names()) == sorted(BACKEND_NAMES)  # the command line's list, kept without imports
    assert set(BACKEND_NAMES) <= {r.name for r in READERS}  # every backend's output is read back
    backend, config = backends.resolve("gptq-int8")
    assert backend.name == "gptq" and config.bits == 8 and config.backend == "gptq"
    backend, config = backends.resolve("rtn-int4")
    assert backend.name == "rtn" and config.backend == "rtn" and config.bits == 4
    backend, config = backends.resolve("bnb-nf4")
    assert backend.name == "bnb-nf4" and config.quant_type == "nf4" and config.double_quant == "auto"
    for bad in ("awq", "bnb-nf4-int4"):
        with pytest.raises(QuantMoeError) as err:
            backends.resolve(bad)
        assert "bnb-nf4" in str(err.value) and "\n" not in str(err.value)


def test_settings_that_do_not_apply_to_a_backend_are_errors():
    cases = [("bnb-nf4", {"bits": 8}, "--bits"), ("bnb-int8", {"double_quant": "off"}, "--double-quant"),
             ("bnb-nf4", {"double_quant": True}, "--double-quant True"),
             ("bnb-fp4", {"int8_threshold": 4.0}, "--int8-threshold"), ("gptq", {"compute_dtype": "float16"}, "--compute-dtype"),
             ("bnb-nf4", {"compute_dtype": "int4"}, "--compute-dtype int4")]
    for name, settings, flag in cases:
        with pytest.raises(QuantMoeError) as err:
            backends.get(name).configure(**settings)
        assert flag in str(err.value) and "\n" not in str(err.value), (name, str(err.value))
    assert backends.get("bnb-int8").configure(int8_threshold=0.0).int8_threshold == 0.0
    result = CliRunner().invoke(main, ["quantize", "--backend", "bnb-nf4", "--bits", "8", "--out", "x"])
    assert result.exit_code == 2 and "--bits does not apply to the bnb-nf4 backend" in result.output


def test_missing_bitsandbytes_is_a_one_line_error_naming_the_extra(tiny_model, tmp_path, monkeypatch):
    src = tiny_model("mixtral")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    for name in BNB:
        with pytest.raises(QuantMoeError) as err:
            backends.get(name).quantize(src, tmp_path / name, Options(run_eval=False, quiet=True))
        message = str(err.value)
        assert "pip install 'quantmoe[bnb]'" in message and name in message and "\n" not in message
        assert not (tmp_path / name).exists()
    result = CliRunner().invoke(main, ["quantize", str(src), "--backend", "bnb-nf4", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: the bnb-nf4 backend needs bitsandbytes, which is not installed; run: pip install 'quantmoe[bnb]'"]


# -- what is quantized ------------------------------------------------------------------
@pytest.mark.parametrize(("model_type", "name"), ALL_CASES)
def test_bnb_routers_untouched_and_every_projection_quantized(bnb_exported, model_type, name):
    src, out = bnb_exported(model_type, name)
    source, q = Checkpoint(src), Checkpoint(out)
    assert q.format.name == name
    linears = q.quantized_linears
    arch = ARCHITECTURES[model_type]
    planned, shapes, fused = set(), {}, set()
    for i, (prefix, names) in enumerate(_planned(source).items()):
        plan = plan_layer(arch, source.config, i)
        planned |= {prefix + n for n in names}
        # (out, in) of each linear: its own weight's, or cut from the fused expert tensors on disk.
        shapes |= {prefix + n: shape for n, shape in plan.linear_shapes(source.layer_shapes(i)).items()}
        fused |= {prefix + n for n in plan.fused_disk_tensors()}
        for router in plan.routers:
            tensors = source.names(f"{prefix}{router}.")
            assert tensors, router
            for t in tensors:
                assert prefix + router not in linears
                assert q.tensor(t).dtype == source.tensor(t).dtype and torch.equal(q.tensor(t), source.tensor(t)), t
    # Every attention, expert, shared-expert and dense projection is quantized, and nothing else.
    assert set(linears) == planned
    assert not fused & set(q.names())  # experts fused on disk are written per expert only
    assert bool(fused) == (model_type in FUSED_ON_DISK)
    for module, linear in linears.items():
        assert linear.shape == shapes[module]
        assert q.tensor(f"{module}.weight").dtype == (torch.int8 if name == "bnb-int8" else torch.uint8)
    # Norms, embeddings, biases and the head are copied bit for bit.
    stored = {t for lin in linears.values() for t in lin.tensors}
    for t in q.names():
        if t not in stored:
            assert torch.equal(q.tensor(t), source.tensor(t)), t
    stats = checkpoint_stats(out)
    assert stats["decoder_linear_fraction"] >= 0.95
    assert stats["decoder_linear_fraction"] == 1.0
    expected_bits = (8.0, 8.6) if name == "bnb-int8" else (4.1, 6.5)  # tiny 64-wide linears: fixed overhead is large
    assert expected_bits[0] < stats["bits_per_weight"] < expected_bits[1]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes"
    skip = config["llm_int8_skip_modules"]
    assert "lm_head" in skip
    for i in range(source.config.num_hidden_layers):
        for router in plan_layer(arch, source.config, i).routers:
            assert f"model.layers.{i}.{module_to_memory(arch, router)}" in skip  # in-memory path, as transformers matches it


@pytest.mark.parametrize(("model_type", "name"), ALL_CASES)
def test_bnb_checkpoint_reloads_to_exactly_the_bitsandbytes_quantized_model(bnb_exported, bitsandbytes, model_type,
                                                                          name, text_file):
    """load_quantized == the source model with each projection replaced by bnb's dequantize(quantize(W))."""
    from quantmoe.model.stream import LayerStream
    from quantmoe.stages.evaluate import eval_windows, perplexity

    F = bitsandbytes.functional
    src, out = bnb_exported(model_type, name)
    source, saved = Checkpoint(src), Checkpoint(out)
    arch = ARCHITECTURES[model_type]
    stream = LayerStream(source, torch.device("cpu"))  # only for to_memory (on-disk -> fused layout)
    reference = transformers_lm(src)
    reference.config._experts_implementation = "eager"  # what quantmoe runs experts with (stream.model_config)
    windows, _ = eval_windows(source.tokenizer(), text_file, 64)
    windows = windows[:4]
    with torch.no_grad():
        original = reference(windows).logits  # before its projections are replaced below
    params = dict(reference.named_parameters())
    quant_type = name.removeprefix("bnb-")
    for i, (prefix, names) in enumerate(_planned(source).items()):
        state = {k[len(prefix):]: v for k, v in ((n, source.tensor(n)) for n in source.names(prefix))}
        plan = plan_layer(arch, source.config, i)
        for fused in plan.fused_disk_tensors():  # quantized per expert; to_memory prefers per-expert tensors
            state |= unfuse_experts(plan, fused, state[fused])
        for lin in names:
            W = state[f"{lin}.weight"]
            if quant_type == "int8":
                CB, SCB, _ = F.int8_vectorwise_quant(W.to(torch.float16))
                state[f"{lin}.weight"] = F.int8_vectorwise_dequant(CB, SCB)
            else:
                nested = saved.has(f"{prefix}{lin}.weight.nested_absmax")  # double quantization, as saved
                state[f"{lin}.weight"] = F.dequantize_4bit(*F.quantize_4bit(W, blocksize=64, compress_statistics=nested,
                                                                           quant_type=quant_type))
        with torch.no_grad():
            for key, value in stream.to_memory(i, state).items():
                target = f"model.layers.{i}.{key}"  # a parameter, or a buffer (DeepSeek's e_score_correction_bias)
                (reference.get_parameter if target in params else reference.get_buffer)(target).copy_(value)
    loaded = quantmoe.load_quantized(out)
    with torch.no_grad():
        expected = reference(windows).logits
        got = loaded(windows).logits
    assert torch.equal(got, expected)
    # ... and stays close to the original model (issue 8's bar, as for GPTQ at group size 32).
    cosine = torch.nn.functional.cosine_similarity(original.flatten(0, 1), got.flatten(0, 1), dim=-1)
    assert float(cosine.mean()) > 0.95, f"mean logit cosine {float(cosine.mean()):.4f}"
    # quantmoe's streamed evaluation reads the folder to the same numbers.
    loss = torch.nn.functional.cross_entropy(got[:, :-1].reshape(-1, got.shape[-1]), windows[:, 1:].reshape(-1))
    assert perplexity(out, windows, "cpu")["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-6)
    # The MLPs really are quantized: the last layer's loaded down projection (the fused experts', or the
    # dense MLP's) differs from the source's.
    layer = source.config.num_hidden_layers - 1
    down = f"{arch.fused.module}.down_proj" if arch.experts is not None else f"{arch.dense_mlp.prefix}.down_proj.weight"
    original = stream.to_memory(layer, stream.layer_state(layer))[down]
    assert not torch.equal(loaded.get_parameter(f"model.layers.{layer}.{down}"), original)


@pytest.mark.parametrize("name", BNB)
def test_saved_tensors_are_bitsandbytes_own_serialization(bnb_exported, bitsandbytes, name):
    """bitsandbytes' modules load an attention and an expert projection, and compute what quantmoe dequantizes."""
    from transformers import BitsAndBytesConfig

    src, out = bnb_exported("mixtral", name)
    q = Checkpoint(out)
    config = BitsAndBytesConfig.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    if name == "bnb-int8":
        assert config.load_in_8bit and config.llm_int8_threshold == 6.0
    else:
        assert config.load_in_4bit and config.bnb_4bit_quant_type == name[-3:] and config.bnb_4bit_use_double_quant
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.block_sparse_moe.experts.2.w2"):
        linear = q.quantized_linears[module]
        tensors = {n[len(module) + 1:]: q.tensor(n) for n in linear.tensors}
        out_features, in_features = linear.shape
        if name == "bnb-int8":
            layer = bitsandbytes.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False,
                                                 threshold=6.0).to("cpu")
            layer.load_state_dict(tensors)
        else:
            layer = bitsandbytes.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32)
            stats = {k: v for k, v in tensors.items() if k != "weight"}
            layer.weight = bitsandbytes.nn.Params4bit.from_prequantized(tensors["weight"], stats, requires_grad=False,
                                                                        device=torch.device("cpu"), module=layer)
        x = torch.randn(7, in_features, generator=torch.Generator().manual_seed(0))
        W = q.format.dequantize(q, linear).float()
        with torch.no_grad():
            ours = x @ W.T
            theirs = layer(x.to(torch.float16) if name == "bnb-int8" else x).float()
        # bitsandbytes' CPU kernels multiply in bf16 (4-bit) or int8 activations (LLM.int8()), hence the tolerance.
        assert torch.allclose(theirs, ours, atol=2e-2 * ours.abs().max().item()), module


@pytest.fixture(scope="module")
def wide_nf4(tmp_path_factory, bitsandbytes):
    """A Mixtral wide enough (hidden 256) that bitsandbytes' fixed per-linear tables (~1.2 KB) do not
    dominate, and its nf4 export: (source folder, export folder)."""
    folder = tmp_path_factory.mktemp("wide")
    src = make_model("mixtral", folder / "model", hidden_size=256, intermediate_size=512)
    out = folder / "nf4"
    backends.get("bnb-nf4").quantize(src, out, Options(device="cpu", run_eval=False, quiet=True))
    return src, out


@pytest.mark.parametrize("name", BNB)
def test_what_plain_transformers_does_with_a_bnb_export(bnb_exported, name):
    """Pins what docs/backends.md says: transformers cannot place per-expert bitsandbytes tensors."""
    pytest.importorskip("accelerate", reason="transformers' bitsandbytes loading needs accelerate (not a quantmoe extra)")
    from transformers import AutoModelForCausalLM

    _, out = bnb_exported("mixtral", name)
    if name == "bnb-int8":
        model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
        assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.int8  # raw codes, no scales
        with pytest.raises(RuntimeError):
            model(torch.tensor([[1, 2, 3]]))
    else:
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            AutoModelForCausalLM.from_pretrained(out, device_map="cpu")


@pytest.mark.parametrize("model_type", FUSED_ON_DISK)
def test_plain_transformers_loads_experts_fused_on_disk_at_random(bnb_exported, model_type):
    """Pins what docs/backends.md warns: where transformers maps only the fused on-disk names (GraniteMoE,
    Qwen3-VL-MoE), a bnb export of such a row loads without an error and with freshly initialised experts; where it
    also maps one linear per expert (Qwen3.5), it stops with a size mismatch, as for the rows stored per expert. The
    card says which. A language model transformers has no causal-LM class for is loaded as its release."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    src, out = bnb_exported(model_type, "bnb-nf4")
    load, language_model = AutoModelForCausalLM.from_pretrained, lambda model: model.model
    if model_type in NESTED_TINY:
        src, out = released(src), out.with_name(out.name + "-release")
        backends.get("bnb-nf4").quantize(src, out, Options(device="cpu", run_eval=False, quiet=True))
        load, language_model = AutoModelForImageTextToText.from_pretrained, lambda model: model.model.language_model
    card = (out / "README.md").read_text()
    fused = ARCHITECTURES[model_type].fused
    unread = not fused.transformers_reads_per_expert
    assert ("loads WITHOUT an error but with every routed expert initialised at random" in card) == unread
    assert ("stops with a size-mismatch error" in card) != unread
    assert "cut from the base model's fused expert tensors" in card
    pytest.importorskip("accelerate", reason="transformers' bitsandbytes loading needs accelerate (not a quantmoe extra)")

    if not unread:
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            load(out, device_map="cpu")
        return
    model = load(out, device_map="cpu")
    loaded = getattr(language_model(model).layers[0].get_submodule(fused.module), fused.gate_up).float()
    source = fused.in_memory(Checkpoint(src).tensor(f"model.layers.0.{fused.disk_gate_up}")).float()
    assert loaded.shape == source.shape
    assert not torch.allclose(loaded, source, atol=0.05)  # neither the source nor its quantized copy


def test_auto_double_quant_keeps_whichever_statistics_are_smaller(bitsandbytes):
    from quantmoe.formats.bnb import quantize_weight

    configs = {mode: backends.get("bnb-nf4").configure(double_quant=mode) for mode in ("on", "off", "auto")}
    chosen = []
    for shape in [(64, 96), (128, 128), (320, 64), (384, 64), (512, 128), (512, 512)]:
        W = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.float16)
        size = {mode: sum(t.numel() * t.element_size() for t in quantize_weight(W, cfg).values())
                for mode, cfg in configs.items()}
        assert size["auto"] == min(size["on"], size["off"]), (shape, size)
        chosen.append(size["auto"] == size["on"])
    assert chosen == [False, False, False, True, True, True]  # double quantization pays from ~24k weights


def test_nf4_decoder_layers_take_a_quarter_of_their_bf16_bytes(wide_nf4):
    src, out = wide_nf4
    source, stats = checkpoint_stats(src), checkpoint_stats(out)
    assert source["decoder_bytes"] == source["decoder_bf16_bytes"]  # the tiny source is float16: 2 bytes a parameter
    ratio = stats["decoder_bytes"] / source["decoder_bytes"]
    assert abs(ratio - 0.25) <= 0.15 * 0.25, ratio
    q = Checkpoint(out)
    assert stats["decoder_bytes"] == sum(q.nbytes(n) for n in q.names("model.layers."))
    assert stats["decoder_bf16_bytes"] == source["decoder_bf16_bytes"]


@pytest.mark.parametrize(("model_type", "name"), ALL_CASES)
def test_bitsandbytes_kernels_model_quantizes_every_expert(bnb_exported, bitsandbytes, text_file, model_type, name):
    """load_quantized(kernels="bitsandbytes"): bitsandbytes modules everywhere the row says, same perplexity."""
    from quantmoe.backends.bnb import load_with_kernels
    from quantmoe.stages.evaluate import eval_windows

    src, out = bnb_exported(model_type, name)
    model = quantmoe.load_quantized(out, kernels="bitsandbytes")
    kind = bitsandbytes.nn.Linear8bitLt if name == "bnb-int8" else bitsandbytes.nn.Linear4bit
    arch = ARCHITECTURES[model_type]
    for i, layer in enumerate(model.model.layers):
        plan = plan_layer(arch, model.config, i)
        if plan.experts is not None:
            experts = layer.get_submodule(arch.fused.module)
            assert type(experts).__name__ == "BnbExperts" and len(experts.gate) == plan.num_experts
            assert all(isinstance(m, kind) for m in (*experts.gate, *experts.up, *experts.down))
        for lin in plan.quantized_linears():
            if plan.experts is None or ".experts." not in lin:
                assert isinstance(layer.get_submodule(module_to_memory(arch, lin)), kind), lin
        for router in plan.routers:
            assert not isinstance(layer.get_submodule(module_to_memory(arch, router)), kind)
    windows, _ = eval_windows(Checkpoint(out).tokenizer(), text_file, 64)
    with torch.no_grad():
        ours = float(model(windows[:4], labels=windows[:4]).loss)
        dequantized = float(quantmoe.load_quantized(out)(windows[:4], labels=windows[:4]).loss)
    assert ours == pytest.approx(dequantized, rel=2e-3)  # bf16 / int8 activations in bitsandbytes' kernels
    with pytest.raises(QuantMoeError) as err:
        load_with_kernels(src)
    assert "not a bitsandbytes checkpoint" in str(err.value)


def test_bitsandbytes_kernels_model_holds_decoder_weights_in_4_bit(wide_nf4):
    src, out = wide_nf4
    model = quantmoe.load_quantized(out, kernels="bitsandbytes")
    held = sum(t.numel() * t.element_size() for t in model.model.layers.state_dict().values())
    bf16 = checkpoint_stats(src)["decoder_bf16_bytes"]
    assert held / bf16 < 0.3, held / bf16  # 16-bit fused experts would make it ~1.0
    assert any(".nested_absmax" in n for n in Checkpoint(out).names())  # wide linears are double-quantized
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = float(model(ids, labels=ids).loss)
        dequantized = float(quantmoe.load_quantized(out)(ids, labels=ids).loss)
    assert ours == pytest.approx(dequantized, rel=2e-3)


# -- commands -------------------------------------------------------------------------
def test_cli_quantize_bnb_with_options_then_eval_backend_check(tiny_model, tmp_path, bitsandbytes):
    from quantmoe.apps.publish import validate

    src = tiny_model("qwen2_moe")
    out = tmp_path / "fp4"
    short = write_text(tmp_path / "short.jsonl", repeats=3)
    result = CliRunner().invoke(main, ["quantize", str(src), "--backend", "bnb-fp4", "--compute-dtype", "float16",
                                       "--double-quant", "off", "--out", str(out), "--eval-data", str(short),
                                       "--device", "cpu", "--quiet", "--nsamples", "4"])
    assert result.exit_code == 0, result.output
    assert "note: bnb-fp4 uses no calibration data; --nsamples is ignored" in result.output
    assert "| bnb-fp4 (double quant off) | " in result.output  # the gap table
    report = json.loads((out / "eval_report.json").read_text())
    assert report["quantization"]["decoder_linear_fraction"] == 1.0 and report["quantization"]["backend"] == "bnb-fp4"
    assert validate(out)  # the card states everything `quantmoe push` asks for
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bnb_4bit_quant_type"], qc["bnb_4bit_compute_dtype"], qc["bnb_4bit_use_double_quant"]) == \
        ("fp4", "float16", False)
    assert all("nested_absmax" not in n for n in Checkpoint(out).names())
    assert {"README.md", "manifest.json", "quantization_log.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "Not loadable with `AutoModelForCausalLM.from_pretrained` alone" in card and "size-mismatch" in card
    result = CliRunner().invoke(main, ["eval", str(out), "--backend", "gptq"])
    assert result.exit_code == 2 and "was quantized with bnb-fp4, not gptq" in result.output
    result = CliRunner().invoke(main, ["eval", str(src), "--backend", "bnb-nf4"])
    assert result.exit_code == 2 and "is not quantized" in result.output


def test_compare_writes_one_table_measured_from_the_files(tiny_model, text_file, tmp_path, bitsandbytes):
    from quantmoe.apps.compare import compare

    src = tiny_model("mixtral")
    short = write_text(tmp_path / "short.jsonl", repeats=3)
    report = tmp_path / "results" / "compare-tiny.json"
    table = compare(src, ["rtn-int4", "bnb-nf4"], tmp_path / "cmp", Options(device="cpu", calib=text_file, nsamples=4),
                    data=short, seqlen=32, report=report, isolate=False)
    assert json.loads(report.read_text()) == json.loads((tmp_path / "cmp" / "compare.json").read_text())
    markdown = report.with_suffix(".md").read_text()
    assert "| bnb-nf4 (double quant auto) |" in markdown and "| original |" in markdown and "core CPU" in markdown
    rows = {r["backend"]: r for r in table["rows"]}
    assert set(rows) == {"rtn-int4", "bnb-nf4"}
    for spec, row in rows.items():
        folder = tmp_path / "cmp" / spec
        assert row["decoder_linear_fraction"] == checkpoint_stats(folder)["decoder_linear_fraction"] >= 0.95
        assert row["size_bytes"] == sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        assert row["gap"] == pytest.approx((row["perplexity"] - table["original"]["perplexity"])
                                           / table["original"]["perplexity"])
        assert row["quantize"]["seconds"] > 0 and row["quantize"]["peak_rss_mb"] > 0
    assert 4.0 < rows["rtn-int4"]["bits_per_weight"] < 5.5
    # Each row's KL to the original, through the original's hidden states saved by one measurement and
    # read by the next, is what quantmoe eval --baseline gives on the same windows.
    from quantmoe.stages.evaluate import evaluate

    for spec, row in rows.items():
        ev = evaluate(tmp_path / "cmp" / spec, baseline=src, data=short, seqlen=32, device="cpu", quiet=True)
        assert row["kl"]["mean"] > 0 and row["kl"]["mean"] == pytest.approx(ev["kl"]["mean"], rel=1e-6), spec
        assert row["kl"]["top1_agreement"] == ev["kl"]["top1_agreement"] and row["gap_se"] > 0, spec
    assert "KL (1e-3)" in markdown and "window_nll" not in json.dumps(table)  # used for the errors, not kept
    assert not list((tmp_path / "cmp").glob(".original_hidden*"))  # the reference is removed
    assert table["original"]["fraction_quantized"] == 0.0 and table["original"]["bits_per_weight"] is None
    assert table["data"]["windows"] * 31 == table["original"]["tokens_scored"]


def test_compare_isolated_runs_report_errors_from_the_child_process(tmp_path):
    from quantmoe.apps.compare import _call, measure_backend
    from quantmoe.base.provenance import machine

    assert _call(True, machine)["cores"] == machine()["cores"]
    with pytest.raises(QuantMoeError) as err:
        _call(True, measure_backend, "nope", str(tmp_path), str(tmp_path / "x"), str(tmp_path / "w"), Options(),
              str(tmp_path / "r"))
    assert "unknown backend 'nope'" in str(err.value)


@pytest.mark.parametrize("model_type", ["mixtral", *FUSED_ON_DISK])
def test_bnb_names_an_expert_weight_the_checkpoint_lacks(tiny_model, tmp_path, model_type, bitsandbytes):
    """An expert found neither as its own tensor nor in a fused one: a one-line error, nothing written."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_model(model_type), src)
    ckpt = Checkpoint(src)
    plan = plan_layer(ARCHITECTURES[model_type], ckpt.config, 1)
    on_disk = plan.fused.on_disk
    dropped = ckpt.layer_prefix(1) + (plan.fused.disk_down if on_disk else f"{plan.experts.linear('down', 1)}.weight")
    shards = ckpt.shards
    ckpt.close()  # unmapped before the files are rewritten
    assert not (src / INDEX_NAME).exists()  # one file: its keys are the listing
    for shard in shards:
        tensors = load_file(src / shard)
        if tensors.pop(dropped, None) is not None:
            save_file(tensors, src / shard, metadata={"format": "pt"})
    with pytest.raises(QuantMoeError) as err:
        backends.get("bnb-nf4").quantize(src, tmp_path / "out", Options(device="cpu", run_eval=False, quiet=True))
    first = f"{ckpt.layer_prefix(1)}{plan.experts.linear('down', 0 if on_disk else 1)}.weight"
    assert str(err.value).startswith(f"{first} is not in {src}, neither as its own tensor nor in a fused expert tensor")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def _stopped_after_layer(index: int, monkeypatch, src, out, options) -> None:
    """A bnb-nf4 run of ``src`` into ``out`` that crashes once layer ``index``'s file is written."""
    with stopped_after_layer(monkeypatch, index), pytest.raises(Stop):
        backends.get("bnb-nf4").quantize(src, out, options)


@pytest.mark.parametrize("model_type", ["mixtral", *FUSED_ON_DISK])
def test_a_sharded_bnb_export_writes_each_linear_where_its_source_weight_stands(tiny_model, tmp_path, model_type,
                                                                              bitsandbytes):
    """Through the one shard writer, bitsandbytes keeps its order (each linear's tensors where its source
    weight stands, experts cut from a fused tensor where that stands), so a sharded export's shards end
    where they always did. Walking the source in order, the shards never go back."""
    src = tiny_model(model_type)
    out = tmp_path / "out"
    backends.get("bnb-nf4").quantize(src, out, Options(device="cpu", run_eval=False, quiet=True,
                                                       max_shard_size="20KB"))
    weight_map = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 4
    ckpt = Checkpoint(src)
    arch = ARCHITECTURES[model_type]
    walked = []
    for i in range(ckpt.config.num_hidden_layers):
        prefix = ckpt.layer_prefix(i)
        plan = plan_layer(arch, ckpt.config, i)
        for name in ckpt.names(prefix):
            rel = name[len(prefix):]
            if rel in plan.fused_disk_tensors():
                cut = [f"{prefix}{n}" for n in unfuse_experts(plan, rel, ckpt.tensor(name))]
            else:
                cut = [name]
            for n in cut:
                assert n in weight_map, n  # a quantized linear keeps its source weight's name (P.weight)
                walked.append(shards.index(weight_map[n]))
                module = n[: -len(".weight")]
                parts = {shards.index(f) for t, f in weight_map.items() if t.startswith(module + ".weight.")}
                assert all(walked[-1] <= k <= walked[-1] + 1 for k in parts), n  # its statistics follow it
    assert walked == sorted(walked)


def test_a_stopped_bnb_run_resumes_from_its_finished_layers(tiny_model, tmp_path, monkeypatch, capsys, bitsandbytes):
    """bnb runs through the one pipeline: its layers go to the work folder, and a stopped run continues
    from them, writing the same files as a run that was never stopped."""
    from clirun import content

    src = tiny_model("mixtral")
    options = Options(device="cpu", run_eval=False, quiet=True)
    backends.get("bnb-nf4").quantize(src, tmp_path / "a" / "out", options)
    out = tmp_path / "b" / "out"  # the same folder name: the model card names it
    _stopped_after_layer(0, monkeypatch, src, out, options)
    work = tmp_path / "b" / ".out.quantmoe-work"
    assert not out.exists() and (work / "layers" / "layer-00000.json").is_file()
    capsys.readouterr()
    backends.get("bnb-nf4").quantize(src, out, options)
    assert "resuming: 1 of 2 layers" in capsys.readouterr().err
    assert content(out) == content(tmp_path / "a" / "out")
    assert not work.exists()


def test_a_finished_layer_file_missing_a_linear_is_refused_at_export(tiny_model, tmp_path, monkeypatch, bitsandbytes):
    """The one shard writer checks that each layer file holds every linear its plan quantizes: otherwise
    the source weight would be dropped with nothing in its place. One line; the finished layers are kept."""
    from safetensors import safe_open

    from quantmoe.base.files import save_safetensors, sha256_file

    src = tiny_model("mixtral")
    out = tmp_path / "out"
    options = Options(device="cpu", run_eval=False, quiet=True)
    _stopped_after_layer(1, monkeypatch, src, out, options)  # the last layer: all finished, no export yet
    file = tmp_path / ".out.quantmoe-work" / "layers" / "layer-00000.safetensors"
    with safe_open(str(file), framework="pt") as f:  # drop one linear, keeping the fingerprint
        meta = f.metadata()
        kept = {n: f.get_tensor(n) for n in f.keys() if not n.startswith("model.layers.0.self_attn.k_proj.")}
    save_safetensors(file, kept, metadata=meta)
    # ... and the sha256 its log entry records, as a layer written wrongly (not edited since) would have
    entry = json.loads(file.with_suffix(".json").read_text())
    file.with_suffix(".json").write_text(json.dumps({**entry, "sha256": sha256_file(file)}))
    with pytest.raises(QuantMoeError) as err:
        backends.get("bnb-nf4").quantize(src, out, options)
    assert str(err.value) == (f"{file} holds no quantized tensors of model.layers.0.self_attn.k_proj; it is not this "
                              "layer's result: re-run with --restart")
    assert not out.exists() and file.is_file()
    assert not (tmp_path / ".out.quantmoe-work" / "export").exists()


# -- verify ------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type,name", ALL_CASES)
def test_a_fresh_bnb_export_verifies(bnb_exported, model_type, name):
    from quantmoe.apps.verify import verify

    _, out = bnb_exported(model_type, name)
    report = verify(out)
    assert report.ok, report.problems
    assert report.quantized_modules == len(Checkpoint(out).quantized_linears) > 0


def test_verify_reads_bnb_linears_back_and_finds_nan(bnb_exported, tmp_path):
    """A bnb export whose expert statistics hold NaN (manifest rewritten to match) is caught by
    dequantizing that linear; the rest still verifies."""
    from safetensors.torch import load_file, save_file

    from quantmoe.apps.verify import verify
    from quantmoe.base.files import write_manifest

    _, out = bnb_exported("mixtral", "bnb-nf4")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    ckpt = Checkpoint(bad)
    module, linear = next((m, lin) for m, lin in sorted(ckpt.quantized_linears.items()) if ".experts." in m)
    stat = next(t for t in linear.tensors if ckpt.dtype(t) in ("F32", "F16", "BF16"))
    shard = bad / ckpt.weight_map[stat]
    tensors = load_file(shard)
    tensors[stat] = torch.full_like(tensors[stat], float("nan"))
    save_file(tensors, shard, metadata={"format": "pt"})
    old = json.loads((bad / "manifest.json").read_text())
    write_manifest(bad, {k: v for k, v in old.items() if k != "files"})
    report = verify(bad)
    assert report.problems == [f"{module} holds NaN or Inf once dequantized"], report.problems
