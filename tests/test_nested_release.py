"""Releases that nest their language model inside a vision-language model (Qwen3.5-MoE, ``model_type`` qwen3_5_moe):
read as the language model alone (``text_config``, ``model.language_model.*`` under a text-only checkpoint's names),
quantized by the text model's row, exported under the release's own names and config.json, the vision tower copied
and declared unquantized, every rule of the export's quantization_config matching the modules under the release's
names and under vLLM's (``language_model.model.*``, ``visual.*``)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from clirun import QUICK, cli, cli_forked, one_error_line
from safetensors.torch import load_file, save_file
from tiny import append_mtp_block, dequantized_copy, make_nested_release, text_only_copy

from quantmoe.formats.compressed_tensors import ignored, module_weights
from quantmoe.formats.fp8 import write_fp8_release
from quantmoe.formats.gptq_v1 import module_settings
from quantmoe.model.architectures import ARCHITECTURES, FusedExperts

STORED, SERVED = "model.language_model.", "language_model.model."  # the release's prefix, and vLLM's
ROW = ARCHITECTURES["qwen3_5_moe_text"]


def _quantize(runs: list[tuple[Path, Path]], text: Path, *extra) -> None:
    results = cli_forked([["quantize", model, "--out", out, "--calib", text, "--nsamples", "4", "--seqlen", "32",
                           "--group-size", "32", "--quiet", "--eval-data", text, *extra] for model, out in runs])
    for result in results:
        assert result.returncode == 0, result.stderr


def _fp8_release(bf16: Path, folder: Path, kept: tuple[str, ...]) -> Path:
    """The nested release ``bf16`` in FP8 blocks of 32 x 32, as its FP8 release stores it: the language model's
    linears in FP8 but the layer-relative modules ``kept`` (routers, kept linears) and the vision tower in BF16."""
    def skip(name: str) -> bool:
        return re.sub(r"^.*?\.layers\.\d+\.", "", name).startswith(tuple(k + "." for k in kept))

    return write_fp8_release(bf16, folder, block=(32, 32), skip=skip, layers=f"{STORED}layers.")


def _text_names(tensors: dict) -> dict:
    return {n.replace(STORED, "model.", 1): t for n, t in tensors.items() if not n.startswith("model.visual.")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, text_file):
    """(release, its GPTQ export, the export of its language model as a text-only checkpoint, its
    compressed-tensors export), each under the attention-int8 recipe, so that the exports carry ``+:`` rules."""
    base = tmp_path_factory.mktemp("nested")
    release = make_nested_release(base / "release")
    text = text_only_copy(release, base / "text")
    out, text_out, ct = base / "out", base / "text-out", base / "ct"
    _quantize([(release, out), (text, text_out)], text_file, "--recipe", "attention-int8")
    _quantize([(release, ct)], text_file, "--recipe", "attention-int8", "--format", "compressed-tensors", "--no-eval")
    return release, out, text_out, ct


def test_a_nested_release_quantizes_as_its_language_model_alone(exported):
    """The export of the release holds, under the release's names, exactly the tensors of the export of its language
    model saved as a text-only checkpoint (the experts, stored fused as the BF16 releases store them, exported per
    expert); the vision tower as released; config.json the release's with a quantization_config, and its image
    processor's config; the same evaluation; verify passes."""
    release, out, text_out, _ = exported
    ours, theirs, source = (load_file(next(f.glob("*.safetensors"))) for f in (out, text_out, release))
    assert all(n.startswith((STORED, "model.visual.", "lm_head.")) for n in ours)
    assert sorted(_text_names(ours)) == sorted(theirs)
    assert all(torch.equal(_text_names(ours)[n], theirs[n]) for n in theirs)
    assert f"{STORED}layers.0.mlp.experts.7.down_proj.qweight" in ours
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in ours)
    vision = [n for n in source if n.startswith("model.visual.")]
    assert vision and all(torch.equal(ours[n], source[n]) for n in vision)
    processor = json.loads((release / "preprocessor_config.json").read_text())  # servers read it to take images
    assert json.loads((out / "preprocessor_config.json").read_text()) == processor
    config, original = (json.loads((f / "config.json").read_text()) for f in (out, release))
    assert config.pop("quantization_config")["quant_method"] == "gptq"
    assert config == original and config["model_type"] == "qwen3_5_moe"
    reports = [json.loads((f / "eval_report.json").read_text()) for f in (out, text_out)]
    for key in ("perplexity", "tokens_scored"):
        assert [r["results"][m][key] for m in ("original", "quantized") for r in reports[:1]] == \
            [r["results"][m][key] for m in ("original", "quantized") for r in reports[1:]]
    assert reports[0]["kl"] == reports[1]["kl"]
    assert cli("verify", out).returncode == 0


@pytest.mark.parametrize("prefix", [STORED, SERVED])
def test_the_gptq_rules_match_the_modules_under_the_release_names_and_vllms(exported, prefix):
    """vLLM matches ``dynamic`` against its own module names, never mapped from the release's (the language model
    under ``language_model.model.``, the vision tower under ``visual.``, in_proj_b and in_proj_a fused as
    in_proj_ba); GPTQModel and transformers against the release's. Every rule holds under both."""
    _, out, _, _ = exported
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    linear, full = f"{prefix}layers.0.linear_attn.", f"{prefix}layers.3.self_attn."
    vllm = prefix == SERVED
    for kept in ("in_proj_ba",) if vllm else ("in_proj_b", "in_proj_a", "conv1d"):
        assert module_settings(qc, linear + kept) is None, kept
    for module in ("in_proj_qkvz",) if vllm else ("in_proj_qkv", "in_proj_z"):
        assert module_settings(qc, linear + module) == (8, 32), module  # the recipe's
    assert module_settings(qc, full + ("qkv_proj" if vllm else "q_proj")) == (8, 32)
    assert module_settings(qc, f"{prefix}layers.0.mlp.experts" + ("" if vllm else ".0.gate_proj")) == (4, 32)
    assert module_settings(qc, f"{prefix}layers.0.mlp.shared_expert.down_proj") == (4, 32)
    tower = "visual.blocks.0.attn.qkv" if vllm else "model.visual.blocks.0.attn.qkv"
    assert module_settings(qc, tower) is None
    if not vllm:
        assert f"{prefix}layers.0.mlp.gate" in qc["modules_not_quantized"]


def test_the_compressed_tensors_config_names_the_release_modules(exported):
    """compressed-tensors: ``ignore`` names the kept modules by the release's names (vLLM maps those to its own) and
    the vision tower by a regex that matches both; the recipe's targets match vLLM's names of each shard it looks
    up (``...experts.0.gate_proj``, the split projections of in_proj_qkvz); verify passes."""
    _, _, _, ct = exported
    q = json.loads((ct / "config.json").read_text())["quantization_config"]
    for kept in ("mlp.gate", "mlp.shared_expert_gate", "linear_attn.in_proj_b", "linear_attn.in_proj_a"):
        assert f"{STORED}layers.0.{kept}" in q["ignore"], kept
    assert ignored(q, "visual.blocks.0.attn.qkv") and ignored(q, "model.visual.merger.linear_fc1")
    for prefix in (STORED, SERVED):
        assert module_weights(q, f"{prefix}layers.0.mlp.experts.0.gate_proj")["num_bits"] == 4
        assert module_weights(q, f"{prefix}layers.0.linear_attn.in_proj_z")["num_bits"] == 8
        assert module_weights(q, f"{prefix}layers.3.self_attn.k_proj")["num_bits"] == 8
    assert f"{STORED}layers.0.linear_attn.in_proj_qkv.weight_packed" in load_file(next(ct.glob("*.safetensors")))
    assert cli("verify", ct).returncode == 0


def test_an_fp8_nested_release_quantizes_as_its_bf16_conversion(tmp_path, text_file):
    """Qwen3.5's FP8 releases: the language model's linears in FP8 blocks, one linear per routed expert; the routers,
    in_proj_b, in_proj_a and the vision tower in BF16; the multi-token-prediction block (``mtp.*``) beside the nested
    language model. Quantized from FP8, the export is the one of its exact BF16 conversion, byte for byte; the MTP
    block is copied and excluded by a ``-:`` rule naming mtp, which vLLM's Qwen3.5 MTP loader takes as the sign to
    build it unquantized."""
    bf16 = make_nested_release(tmp_path / "bf16", fused=False)
    added = append_mtp_block(bf16)
    release = _fp8_release(bf16, tmp_path / "fp8", ROW.routers + ROW.kept_linears())
    stored = load_file(release / "model.safetensors")
    assert stored[f"{STORED}layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert stored[f"{STORED}layers.1.linear_attn.in_proj_b.weight"].dtype == torch.bfloat16
    reference = dequantized_copy(release, tmp_path / "reference")
    _quantize([(release, tmp_path / "from-fp8"), (reference, tmp_path / "from-bf16")], text_file, "--no-eval")
    a, b = (next((tmp_path / f).glob("*.safetensors")).read_bytes() for f in ("from-fp8", "from-bf16"))
    assert a == b
    exported = load_file(next((tmp_path / "from-fp8").glob("*.safetensors")))
    assert f"{STORED}layers.1.mlp.experts.3.up_proj.qweight" in exported
    assert not any(t.dtype == torch.float8_e4m3fn or n.endswith("weight_scale_inv") for n, t in exported.items())
    assert sorted(n for n in exported if n.startswith("mtp.")) == sorted(added)
    assert all(torch.equal(exported[n], stored[n]) for n in added)
    qc = json.loads((tmp_path / "from-fp8" / "config.json").read_text())["quantization_config"]
    assert any(k.startswith("-:") and "mtp" in k for k in qc["dynamic"])
    assert module_settings(qc, "mtp.layers.0.mlp.experts") is None and module_settings(qc, "mtp.fc") is None
    assert cli("verify", tmp_path / "from-fp8").returncode == 0


def _spoil_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config["text_config"]
    (folder / "config.json").write_text(json.dumps(config))


def _stray_tensor(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors["model.projector.weight"] = torch.zeros(2, 2)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("spoil, words", [(_spoil_config, "nests its language model's under 'text_config'"),
                                          (_stray_tensor, "model.projector.weight lies outside the language model")])
def test_a_damaged_nested_release_is_one_error_line(exported, tmp_path, text_file, spoil, words):
    """A nested release whose config lacks its language model's, or that holds a tensor under ``model.`` that is
    neither the language model's nor the vision tower's (whose name would not map back one to one), is refused with
    one line naming it, before any work."""
    release = shutil.copytree(exported[0], tmp_path / "release")
    spoil(release)
    result = cli("quantize", release, "--out", tmp_path / "out", "--calib", text_file, *QUICK)
    assert result.returncode != 0 and words in one_error_line(result.stderr)
    assert not (tmp_path / "out").exists()


def test_inspect_shows_the_release_names_and_the_vision_tower_as_one_line(exported):
    """inspect lists a nested release under its own names and model_type, its vision tower as one line (copied
    unquantized), and in_proj_b, in_proj_a and conv1d as kept in 16 bits, apart from the routers."""
    from quantmoe.apps.inspection import inspect_model, render_text

    report = inspect_model(exported[0], group_size=32)
    rows = {e["pattern"]: e for e in report["tensors"]}
    assert report["model_type"] == "qwen3_5_moe (language model qwen3_5_moe_text)"
    assert all(p.startswith((STORED, "model.visual.*", "lm_head.")) for p in rows)
    tower = rows["model.visual.*"]
    assert (tower["cls"], tower["quantized_parameters"]) == ("not quantized", 0) and tower["tensors"] > 10
    for rel, cls in (("linear_attn.in_proj_b.weight", "kept in 16 bits"), ("linear_attn.conv1d.weight", "kept in 16 bits"),
                     ("mlp.shared_expert_gate.weight", "router"), ("mlp.experts.gate_up_proj", "routed expert")):
        assert rows[f"{STORED}layers.{{i}}.{rel}"]["cls"] == cls, rel
    assert "model.visual.*" in render_text(report)


def test_a_bnb_export_of_a_nested_release_is_its_language_models_and_loads_with_the_kernels(exported, tmp_path,
                                                                                             text_file):
    """bitsandbytes: the export of the release is, under its names, that of its language model saved text-only; the
    vision tower is copied and skipped whole (``llm_int8_skip_modules``, by the release's names, which transformers'
    model of the release uses in memory); quantmoe loads it with bitsandbytes' kernels, the vision tower left out."""
    pytest.importorskip("bitsandbytes")
    import quantmoe

    release = exported[0]
    text = text_only_copy(release, tmp_path / "text")
    runs = [(release, tmp_path / "nf4"), (text, tmp_path / "text-nf4")]
    results = cli_forked([["quantize", model, "--out", out, "--backend", "bnb-nf4", "--quiet", "--no-eval"]
                          for model, out in runs])
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    ours, theirs = (load_file(next(out.glob("*.safetensors"))) for _, out in runs)
    assert sorted(_text_names(ours)) == sorted(theirs)
    assert all(torch.equal(_text_names(ours)[n], theirs[n]) for n in theirs)
    q = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert "model.visual" in q["llm_int8_skip_modules"] and f"{STORED}layers.0.mlp.gate" in q["llm_int8_skip_modules"]
    ids = torch.tensor([[5, 6, 7, 8]])
    logits = [quantmoe.load_quantized(out, device="cpu", kernels="bitsandbytes")(ids).logits for _, out in runs]
    assert torch.equal(logits[0], logits[1])


def test_recipes_name_a_nested_releases_modules_by_its_own_names(exported, tmp_path, text_file):
    """A recipe matches the release's module names, as inspect lists them (``model.language_model.layers.*``): its
    rule reaches the modules it names, and one written with a text-only checkpoint's names names no linear of the
    release, which is refused with one line giving the names to use, before any work."""
    release = exported[0]
    rule = tmp_path / "shared.toml"
    rule.write_text('[[rules]]\nmatch = "re:model\\\\.language_model\\\\.layers\\\\.0\\\\.mlp\\\\.shared_expert\\\\."\n'
                    'bits = 8\n')
    out = tmp_path / "out"
    result = cli("quantize", release, "--out", out, "--calib", text_file, *QUICK, "--recipe", rule)
    assert result.returncode == 0, result.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    for prefix in (STORED, SERVED):
        assert module_settings(qc, f"{prefix}layers.0.mlp.shared_expert.down_proj") == (8, 32)
        assert module_settings(qc, f"{prefix}layers.1.mlp.shared_expert.down_proj") == (4, 32)
    rule.write_text('[[rules]]\nmatch = "re:model\\\\.layers\\\\.0\\\\.mlp\\\\.shared_expert\\\\."\nbits = 8\n')
    result = cli("quantize", release, "--out", tmp_path / "refused", "--calib", text_file, *QUICK, "--recipe", rule)
    line = one_error_line(result.stderr)
    assert result.returncode != 0 and "names no quantized linear" in line and f"{STORED}layers.0." in line
    assert not (tmp_path / "refused").exists()


# Qwen3-VL-MoE (``qwen3_vl_moe``): nested as Qwen3.5 is, its language model Qwen3-MoE's layers, which transformers
# builds only as a base model (quantmoe's stream adds the head), its BF16 releases storing the routed experts fused
# and transposed (gate_up (E, H, 2I), down (E, I, H)).
VL_ROW = ARCHITECTURES["qwen3_vl_moe_text"]


@pytest.fixture(scope="module")
def vl_exported(tmp_path_factory, text_file):
    """(release, its GPTQ export, the export of its language model as a text-only checkpoint)."""
    base = tmp_path_factory.mktemp("vl")
    release = make_nested_release(base / "release", family="qwen3_vl_moe")
    text = text_only_copy(release, base / "text")
    out, text_out = base / "out", base / "text-out"
    _quantize([(release, out), (text, text_out)], text_file)
    return release, out, text_out


def test_a_qwen3_vl_release_quantizes_as_its_language_model_alone(vl_exported):
    """The export of a Qwen3-VL-MoE release holds, under the release's names, exactly the tensors of the export of
    its language model saved text-only; the routed experts, stored fused and transposed, exported per expert with
    each expert's shapes (gate/up (I, H), down (H, I)); the vision tower as released; config.json the release's;
    the same evaluation; verify passes."""
    release, out, text_out = vl_exported
    ours, theirs, source = (load_file(next(f.glob("*.safetensors"))) for f in (out, text_out, release))
    fused = source[f"{STORED}layers.0.mlp.experts.gate_up_proj"]
    hidden, inner = fused.shape[1], fused.shape[2] // 2
    assert hidden != inner  # stored (E, H, 2I): a read that did not transpose would give other shapes
    assert sorted(_text_names(ours)) == sorted(theirs)
    assert all(torch.equal(_text_names(ours)[n], theirs[n]) for n in theirs)
    group = 32
    assert ours[f"{STORED}layers.1.mlp.experts.7.gate_proj.scales"].shape == (hidden // group, inner)
    assert ours[f"{STORED}layers.1.mlp.experts.7.down_proj.scales"].shape == (inner // group, hidden)
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in ours)
    vision = [n for n in source if n.startswith("model.visual.")]
    assert vision and all(torch.equal(ours[n], source[n]) for n in vision)
    config, original = (json.loads((f / "config.json").read_text()) for f in (out, release))
    assert config.pop("quantization_config")["quant_method"] == "gptq"
    assert config == original and config["model_type"] == "qwen3_vl_moe"
    from quantmoe.apps.inspection import inspect_model

    rows = {e["pattern"]: e for e in inspect_model(release, group_size=32)["tensors"]}
    experts = [rows[f"{STORED}layers.{{i}}.mlp.experts.{w}_proj"] for w in ("gate_up", "down")]
    assert [e["cls"] for e in experts] == ["routed expert"] * 2
    assert sum(e["quantized_parameters"] for e in experts) == sum(source[f"{STORED}layers.{i}.mlp.experts.{w}_proj"].numel()
                                                                  for i in (0, 1) for w in ("gate_up", "down"))
    reports = [json.loads((f / "eval_report.json").read_text()) for f in (out, text_out)]
    assert [r["results"]["quantized"]["perplexity"] for r in reports] == [reports[1]["results"]["quantized"]["perplexity"]] * 2
    assert reports[0]["kl"] == reports[1]["kl"]
    assert cli("verify", out).returncode == 0


def test_a_qwen3_vl_export_dequantizes_close_to_the_release_transformers_loads(vl_exported, text_file):
    """The quantized language model (quantmoe.load_quantized of the release's export) predicts as transformers' own
    vision-language model of the release does on text, up to int4 rounding, and generates with its cache what its
    forward passes choose; the original read by quantmoe predicts exactly so."""
    from transformers import AutoModelForImageTextToText

    import quantmoe
    from quantmoe.model.checkpoint import Checkpoint
    from quantmoe.stages.evaluate import eval_windows, perplexity

    release, out, _ = vl_exported
    windows, _ = eval_windows(Checkpoint(release).tokenizer(), text_file, 32)
    windows = windows[:4]
    with torch.no_grad():
        theirs = AutoModelForImageTextToText.from_pretrained(release, dtype=torch.float32).eval()(input_ids=windows)
        loss = torch.nn.functional.cross_entropy(theirs.logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
        ours = quantmoe.load_quantized(out)(windows).logits
    assert perplexity(release, windows, "cpu")["perplexity"] == pytest.approx(float(torch.exp(loss)), rel=1e-4)
    cosine = torch.nn.functional.cosine_similarity(theirs.logits.flatten(0, 1), ours.flatten(0, 1), dim=-1)
    assert float(cosine.mean()) > 0.95
    model, prompt = quantmoe.load_quantized(out), windows[:1, :8]
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=4, do_sample=False)
        chosen = prompt
        for _ in range(4):  # no cache: every forward pass over the whole sequence
            chosen = torch.cat([chosen, model(chosen).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, chosen)


def test_a_qwen3_vl_fp8_release_stored_per_expert_quantizes_as_its_bf16_conversion(tmp_path, text_file):
    """A Qwen3-VL-MoE release in FP8 blocks with one linear per routed expert (the layout its FP8 releases are
    reported to use): quantized from FP8, the export is the one of its exact BF16 conversion, byte for byte, and
    the one of the same weights stored fused and transposed."""
    bf16 = make_nested_release(tmp_path / "bf16", fused=False, family="qwen3_vl_moe")
    fused = make_nested_release(tmp_path / "fused", family="qwen3_vl_moe")
    release = _fp8_release(bf16, tmp_path / "fp8", VL_ROW.routers)
    stored = load_file(release / "model.safetensors")
    assert stored[f"{STORED}layers.1.mlp.experts.3.down_proj.weight"].dtype == torch.float8_e4m3fn
    reference = dequantized_copy(release, tmp_path / "reference")
    runs = [(release, tmp_path / "from-fp8"), (reference, tmp_path / "from-bf16"), (bf16, tmp_path / "per-expert"),
            (fused, tmp_path / "from-fused")]
    _quantize(runs, text_file, "--no-eval")
    a, b, c, d = (next((tmp_path / f).glob("*.safetensors")).read_bytes()
                  for f in ("from-fp8", "from-bf16", "per-expert", "from-fused"))
    assert a == b
    assert c == d  # the same weights, per expert or fused and transposed
    assert cli("verify", tmp_path / "from-fp8").returncode == 0


def test_experts_stored_transposed_are_laid_out_one_chunk_at_a_time(tmp_path, monkeypatch):
    """A fused tensor stored transposed goes to the device and is laid out there a chunk of experts at a time (the
    device never holds it twice): with chunks of one expert, every layer's tensors are transformers' own."""
    from transformers import AutoModelForImageTextToText

    from quantmoe.model import stream
    from quantmoe.model.checkpoint import Checkpoint

    release = make_nested_release(tmp_path / "release", family="qwen3_vl_moe")
    reference = AutoModelForImageTextToText.from_pretrained(release, dtype=torch.float32).state_dict()
    chunks = []
    in_memory = FusedExperts.in_memory
    monkeypatch.setattr(FusedExperts, "in_memory", lambda self, t: chunks.append(t.shape[0]) or in_memory(self, t))
    monkeypatch.setattr(stream, "FUSED_CHUNK_BYTES", 1)  # one expert a chunk
    layers = stream.LayerStream(Checkpoint(release), torch.device("cpu"), torch.float32)
    for i in range(layers.num_layers):
        chunks.clear()
        state = layers.to_memory(i, layers.layer_state(i))
        assert chunks == [1] * (2 * VL_ROW.num_experts(layers.config))  # gate_up's experts, then down's
        for key in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            assert torch.equal(state[key], reference[f"{STORED}layers.{i}.{key}"]), (i, key)
