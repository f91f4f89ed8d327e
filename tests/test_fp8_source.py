"""Quantizing from FP8 releases (issue 19): the formats are recognised, read as stored for the
pipeline and dequantized on its device, exported without a float8 tensor or a scale; the
multi-token-prediction layer is carried in BF16 and declared; bad scales are one error line.

The CPU check of the issue's "done when" is test_fp8_release_with_mtp_quantizes_as_its_bf16_conversion.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from clirun import QUICK, cli, cli_forked, digest, one_error_line
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import (
    GLM_FP8,
    append_mtp_block,
    append_mtp_layer,
    dequantized_copy,
    make_model,
    router_or_mtp_extra,
    write_compressed_fp8_release,
)

from quantmoe.apps.inspection import inspect_model, render_text
from quantmoe.base.errors import QuantMoeError
from quantmoe.formats import reader_for
from quantmoe.formats.fp8 import (
    Fp8Weight,
    dequantize_fp8,
    fp8_linears,
    write_fp8_release,
)
from quantmoe.model.checkpoint import Checkpoint
from quantmoe.model.stream import LayerStream
from quantmoe.stages.quantize import work_dir

BLOCK = (32, 32)  # DeepSeek's 128 would make every tiny weight one ragged block; 32 gives several, some ragged
DEEPSEEK_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(BLOCK)}
MTP = 3  # the tiny DeepSeek-V3 has 3 decoder layers: its MTP layer is model.layers.3


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """(bf16, fp8, reference): the tiny DeepSeek-V3 in BF16 with an MTP layer appended; its FP8 release
    (DeepSeek's format, routers and the MTP layer's embedding, head and eh_proj left in BF16); the
    exact BF16 conversion of that release, written to disk for the reference run."""
    base = tmp_path_factory.mktemp("fp8-releases")
    bf16 = make_model("deepseek_v3", base / "bf16", dtype=torch.bfloat16)
    added = append_mtp_layer(bf16)
    assert f"model.layers.{MTP}.eh_proj.weight" in added and f"model.layers.{MTP}.mlp.experts.7.down_proj.weight" in added
    fp8 = write_fp8_release(bf16, base / "fp8", block=BLOCK, skip=router_or_mtp_extra("deepseek_v3"))
    return bf16, fp8, dequantized_copy(fp8, base / "reference")


def _dtypes(folder: Path) -> dict[str, str]:
    out = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({name: f.get_slice(name).get_dtype() for name in f.keys()})
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


# ----------------------------------------------------------------------------- formats


def test_each_reader_claims_only_its_own_format():
    assert reader_for(DEEPSEEK_FP8).name == "fp8"
    assert reader_for(GLM_FP8).name == "compressed-tensors-fp8"
    pack = {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int",
                                                                            "strategy": "group", "group_size": 128}}}}
    assert reader_for(pack).name == "compressed-tensors"
    mixed = {**pack, "format": "mixed-precision",
             "config_groups": {**pack["config_groups"], "group_1": GLM_FP8["config_groups"]["group_0"]}}
    for config, named in ((mixed, "'compressed-tensors' (format 'mixed-precision')"), ({"quant_method": "awq"}, "'awq'")):
        with pytest.raises(QuantMoeError) as err:
            reader_for(config)
        message = str(err.value)
        assert "\n" not in message and f"quantization method {named} is not one quantmoe reads" in message
        assert "fp8, compressed-tensors-fp8" in message and "pass the original checkpoint" in message


def test_pipeline_reads_fp8_as_stored_and_everyone_else_dequantized(releases):
    _, fp8, reference = releases
    ckpt, ref = Checkpoint(fp8), Checkpoint(reference)
    stored = load_file(fp8 / "model.safetensors")
    for i in (0, 1, MTP):
        prefix = ckpt.layer_prefix(i)
        kept, plain, want = ckpt.read_prefix(prefix, None), ckpt.read_prefix(prefix), ref.read_prefix(prefix)
        assert set(kept) == set(plain) == set(want)  # no scale tensor, under any dtype
        assert not any("_scale" in n for n in kept)
        for name, t in kept.items():
            if prefix + name + "_scale_inv" in stored:
                assert isinstance(t, Fp8Weight) and t.dtype == torch.bfloat16 and t.block == BLOCK
                assert torch.equal(t.codes.view(torch.uint8), stored[prefix + name].view(torch.uint8))
                assert torch.equal(t.scale, stored[prefix + name + "_scale_inv"])
            else:
                assert t.dtype == stored[prefix + name].dtype and torch.equal(t, stored[prefix + name]), name
            assert plain[name].dtype == torch.float32 and torch.equal(plain[name], want[name]), name
    assert sum(isinstance(t, Fp8Weight) for t in ckpt.read_prefix(ckpt.layer_prefix(1), None).values()) == 5 + 3 + 8 * 3


def test_layers_load_from_fp8_as_from_their_bf16_conversion(releases):
    """load_layer dequantizes on the stream's device what layer_state(keep_dtype=True) read as stored."""
    _, fp8, reference = releases
    ours, theirs = LayerStream(Checkpoint(fp8), torch.device("cpu")), LayerStream(Checkpoint(reference), torch.device("cpu"))
    for i in range(ours.num_layers):
        state = ours.layer_state(i, keep_dtype=True)
        expert = state["mlp.experts.0.gate_proj.weight" if i else "mlp.gate_proj.weight"]
        assert isinstance(expert, Fp8Weight) and expert.dtype == torch.bfloat16  # what layer.py keeps its copy in
        got = ours.load_layer(i, state).state_dict()
        want = theirs.load_layer(i, theirs.layer_state(i, keep_dtype=True)).state_dict()
        assert got.keys() == want.keys()
        for key in got:
            assert torch.equal(got[key], want[key]), f"layer {i}: {key}"
        ours.release_layer(i)
        theirs.release_layer(i)


def _with_scales(fp8: Path, dst: Path, dtype: torch.dtype) -> Path:
    """A copy of the release ``fp8`` whose block scales are rounded to powers of two and stored as ``dtype``."""
    dst = Path(shutil.copytree(fp8, dst))
    tensors = load_file(dst / "model.safetensors")
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            tensors[name] = torch.exp2(torch.round(torch.log2(t.float()))).to(dtype)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_an_fp8_release_with_e8m0_scales_quantizes_as_with_the_same_scales_in_float32(releases, text_file, tmp_path):
    """Block scales stored as F8_E8M0 (powers of two, as a "ue8m0" release's are) are read, sized and dequantized as
    the same powers of two stored as float32 are: the same layers, and exports of the same bytes."""
    _, fp8, _ = releases
    f32, e8m0 = _with_scales(fp8, tmp_path / "f32", torch.float32), _with_scales(fp8, tmp_path / "e8m0",
                                                                                 torch.float8_e8m0fnu)
    assert "F8_E8M0" in _dtypes(e8m0).values() and "F8_E8M0" not in _dtypes(f32).values()
    ours, theirs = Checkpoint(e8m0), Checkpoint(f32)
    for i in (0, 1):
        got, want = ours.read_prefix(ours.layer_prefix(i)), theirs.read_prefix(theirs.layer_prefix(i))
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)
    _quantize_each([(e8m0, tmp_path / "out-e8m0"), (f32, tmp_path / "out-f32")], text_file, "--no-eval")
    a, b = _tensors(tmp_path / "out-e8m0"), _tensors(tmp_path / "out-f32")
    assert a.keys() == b.keys() and [n for n in a if not torch.equal(a[n], b[n])] == []


# ----------------------------------------------------------------------------- the CPU check


def _quantize(model, out, text, *extra):
    (report,) = _quantize_each([(model, out)], text, *extra)
    return report


def _quantize_each(runs, text, *extra):
    """Each (model, out) of ``runs`` quantized by the CLI, side by side (clirun.cli_forked); their reports."""
    results = cli_forked([["quantize", model, "--out", out, "--calib", text, "--nsamples", "4", "--seqlen", "32",
                           "--group-size", "32", "--quiet", "--eval-data", text, *extra] for model, out in runs])
    for result in results:
        assert result.returncode == 0, result.stderr
    return [json.loads((Path(out) / "eval_report.json").read_text()) if "--no-eval" not in extra else None
            for _, out in runs]


def test_fp8_release_with_mtp_quantizes_as_its_bf16_conversion(releases, text_file, tmp_path):
    bf16, fp8, reference = releases
    report, expected = _quantize_each([(fp8, tmp_path / "from-fp8"), (reference, tmp_path / "from-bf16")], text_file)
    gap, gap_ref = (r["gap"]["absolute"] for r in (report, expected))
    assert abs(gap - gap_ref) <= 0.05, (gap, gap_ref)
    # Stronger: the dequantized weights are the same numbers on either path, so are the outputs, byte for byte.
    out, ref_out = tmp_path / "from-fp8", tmp_path / "from-bf16"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == sorted(p.name for p in ref_out.glob("*.safetensors"))
    assert all((out / s).read_bytes() == (ref_out / s).read_bytes() for s in shards)

    # No FP8 tensor and no FP8 scale is left; the MTP layer is there, unquantized, FP8 parts in BF16.
    dtypes, tensors, release = _dtypes(out), _tensors(out), _tensors(fp8)
    assert not {d for d in dtypes.values() if d.startswith("F8")} and not [n for n in dtypes if "_scale" in n]
    mtp = sorted(n[: -len("_scale_inv")] if n.endswith("_scale_inv") else n for n in release
                 if n.startswith(f"model.layers.{MTP}."))
    assert sorted(n for n in tensors if n.startswith(f"model.layers.{MTP}.")) == sorted(set(mtp))
    source_bf16 = _tensors(bf16)
    for name in set(mtp):
        if name + "_scale_inv" in release:
            assert tensors[name].dtype == torch.bfloat16
            assert torch.equal(tensors[name], dequantize_fp8(release[name], release[name + "_scale_inv"], BLOCK,
                                                             name=name))
        else:  # norms, the router and its fp32 bias, eh_proj, shared_head, embed_tokens: as the release has them
            assert tensors[name].dtype == release[name].dtype and torch.equal(tensors[name], release[name]), name
    assert torch.equal(tensors[f"model.layers.{MTP}.eh_proj.weight"], source_bf16[f"model.layers.{MTP}.eh_proj.weight"])
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.mlp.gate.e_score_correction_bias"):
        assert tensors[name].dtype == release[name].dtype and torch.equal(tensors[name], release[name]), name

    # Declared so that loaders leave it unquantized: modules_not_quantized and a "-:" rule for vLLM's MoE path.
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["dynamic"] == {r"-:^model\.layers\.3\.": {}}
    assert qc["meta"]["full_precision_layers"] == [MTP]
    for module in ("eh_proj", "shared_head.head", "embed_tokens", "self_attn.q_a_proj", "mlp.experts.7.down_proj",
                   "mlp.shared_experts.up_proj", "mlp.gate"):
        assert f"model.layers.{MTP}.{module}" in qc["modules_not_quantized"]
    assert not [m for m in qc["modules_not_quantized"] if not m.startswith(f"model.layers.{MTP}.")
                and not m.endswith(".mlp.gate")]
    assert re.match(qc["dynamic"].popitem()[0][2:], f"model.layers.{MTP}.mlp.experts")  # as vLLM matches it
    assert "multi-token prediction" in (out / "README.md").read_text()
    verified = cli("verify", out)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # inspect, from the FP8 release's headers, foresaw exactly what the export holds.
    estimate = inspect_model(fp8, group_size=32)
    assert estimate["totals"]["estimated_bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert estimate["totals"]["quantized_parameters"] == inspect_model(reference, group_size=32)["totals"]["quantized_parameters"]


def test_mtp_drop_leaves_the_mtp_layer_out(releases, text_file, tmp_path):
    _, fp8, _ = releases
    _quantize(fp8, tmp_path / "out", text_file, "--no-eval", "--backend", "rtn", "--mtp", "drop")
    names = _dtypes(tmp_path / "out")
    assert not [n for n in names if n.startswith(f"model.layers.{MTP}.")] and "model.layers.2.mlp.gate.weight" in names
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"] == {} and "full_precision_layers" not in qc["meta"]
    dropped = inspect_model(fp8, group_size=32, mtp="drop")
    assert dropped["classes"]["not exported"]["tensors"] > 0 and "multi-token prediction" not in dropped["classes"]


# ----------------------------------------------------------------------------- bad scales


def _missing(tensors):
    del tensors["model.layers.1.self_attn.o_proj.weight_scale_inv"]


def _misshapen(tensors):
    tensors["model.layers.0.mlp.down_proj.weight_scale_inv"] = torch.ones(1, 1)


def _nan(tensors):
    tensors["model.layers.2.mlp.experts.3.down_proj.weight_scale_inv"][1, 0] = float("nan")


BAD_SCALES = [  # (how, the tensor named, words, found before the work folder is made)
    (_missing, "model.layers.1.self_attn.o_proj.weight_scale_inv", "is missing", True),
    (_misshapen, "model.layers.0.mlp.down_proj.weight_scale_inv", "has shape [1, 1], expected [2, 4]", True),
    (_nan, "model.layers.2.mlp.experts.3.down_proj.weight_scale_inv", "NaN or infinite value(s) (the first at [1, 0])",
     False),
]


@pytest.fixture(scope="module")
def bad_scale_runs(releases, text_file, tmp_path_factory):
    """spoil -> (the --out, its digest before, the finished CLI run): for each case of BAD_SCALES, the FP8
    release spoiled so, quantized over an earlier export; the cases run side by side (clirun.cli_forked)."""
    _, fp8, _ = releases
    prepared, commands = {}, []
    for spoil, *_ in BAD_SCALES:
        tmp_path = tmp_path_factory.mktemp("bad-scales")
        bad = tmp_path / "bad"
        shutil.copytree(fp8, bad)
        tensors = load_file(bad / "model.safetensors")
        spoil(tensors)
        save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
        out = tmp_path / "out"
        out.mkdir()  # an earlier export of quantmoe's, which --overwrite may replace (only) once the run succeeds
        (out / "model.safetensors").write_bytes(b"an earlier export")
        (out / "manifest.json").write_text(json.dumps({"files": {}, "versions": {"quantmoe": "0.1.0"}}))
        prepared[spoil] = (out, digest(out))
        commands.append(["quantize", bad, "--out", out, "--calib", text_file, *QUICK, "--overwrite"])
    return {spoil: (out, before, run) for (spoil, (out, before)), run in zip(prepared.items(), cli_forked(commands))}


@pytest.mark.parametrize("spoil,tensor,words,early", BAD_SCALES, ids=["missing", "wrong shape", "NaN"])
def test_bad_fp8_scales_are_one_error_line_and_leave_out_untouched(bad_scale_runs, spoil, tensor, words, early):
    out, before, result = bad_scale_runs[spoil]
    line = one_error_line(result.stderr)
    # the reader's own NaN/Inf check (any tensor) or the FP8 check names the tensor
    assert result.returncode == 2 and line.startswith("error: ") and f"{tensor} " in line, line
    assert words in line or "NaN or Inf" in line, line
    assert "re-download" in line
    assert digest(out) == before
    assert work_dir(out).exists() != early  # a header fault stops the run before any work


# ----------------------------------------------------------------------------- inspect


def test_inspect_reports_an_fp8_source_and_its_sizes(releases):
    _, fp8, reference = releases
    report, plain = inspect_model(fp8, group_size=32), inspect_model(reference, group_size=32)
    src = report["source"]
    stored = _tensors(fp8)
    pairs = fp8_linears(stored)
    assert (src["format"], src["block_size"], src["fp8_tensors"]) == ("fp8", list(BLOCK), len(pairs))
    assert src["fp8_bytes"] == src["fp8_parameters"] == sum(stored[w].numel() for w in pairs)
    assert src["scale_bytes"] == sum(stored[s].numel() * 4 for s in pairs.values())
    assert src["bf16_bytes"] == 2 * src["fp8_parameters"]
    assert plain["source"] is None
    # The same estimate as for its BF16 conversion: scales dropped, the FP8 MTP linears counted in BF16.
    assert report["totals"]["estimated_bytes"] == plain["totals"]["estimated_bytes"]
    assert report["totals"]["bytes"] < plain["totals"]["bytes"]
    assert report["classes"]["multi-token prediction"]["quantized_parameters"] == 0
    text = render_text(report)
    assert f"source: fp8 e4m3, 32x32 blocks (fp8): {len(pairs)} FP8 weights" in text
    assert "exported unquantized, FP8 ones in BF16" in text
    result = cli("inspect", fp8, "--group-size", "32", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["source"]["fp8_tensors"] == len(pairs)


# ----------------------------------------------------------------------------- GLM-4.5: compressed-tensors FP8


def test_glm_compressed_tensors_fp8_release_with_mtp(tmp_path, text_file):
    """GLM-4.5-FP8's format: per-channel float8 with ``weight_scale``, its MTP layer quantized in FP8 too."""
    bf16 = make_model("glm4_moe", tmp_path / "bf16", dtype=torch.bfloat16)
    append_mtp_layer(bf16, head=True)
    routers = router_or_mtp_extra("glm4_moe")
    release = write_compressed_fp8_release(bf16, tmp_path / "fp8", skip=lambda n: routers(n) and "shared_head" not in n)
    stored = load_file(release / "model.safetensors")
    assert stored["model.layers.3.shared_head.head.weight"].dtype == torch.float8_e4m3fn  # as GLM-4.6-FP8 ships it
    assert stored["model.layers.1.self_attn.q_proj.weight_scale"].shape == (64, 1)
    ckpt = Checkpoint(release)
    assert ckpt.format.name == "compressed-tensors-fp8"
    reference = Checkpoint(dequantized_copy(release, tmp_path / "reference"))
    for i in (0, 1):
        got, want = ckpt.read_prefix(ckpt.layer_prefix(i)), reference.read_prefix(ckpt.layer_prefix(i))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    out = tmp_path / "out"
    result = cli("quantize", release, "--out", out, "--calib", text_file, *QUICK)
    assert result.returncode == 0, result.stderr
    dtypes, tensors = _dtypes(out), _tensors(out)
    assert not [n for n, d in dtypes.items() if d.startswith("F8") or n.endswith(("weight_scale", "input_scale"))]
    head = "model.layers.3.shared_head.head.weight"
    assert torch.equal(tensors[head], dequantize_fp8(stored[head], stored[head + "_scale"], None, name=head))
    assert tensors["model.layers.1.self_attn.q_proj.bias"].dtype == torch.bfloat16  # biases as the source has them
    assert "model.layers.1.self_attn.q_proj.qweight" in tensors and "model.layers.3.self_attn.q_proj.qweight" not in tensors
    assert inspect_model(release, group_size=32)["source"]["format"] == "compressed-tensors-fp8"


# ----------------------------------------------------------------------------- MiniMax-M2


def _as_its_bf16_conversion(release: Path, tmp_path: Path, text_file: Path) -> dict[str, torch.Tensor]:
    """Quantize an FP8 ``release`` (into tmp_path/from-fp8) and its exact BF16 conversion (from-bf16), assert the
    two exports are byte for byte the same, and return the first's tensors."""
    reference = dequantized_copy(release, tmp_path / "reference")
    _quantize_each([(release, tmp_path / "from-fp8"), (reference, tmp_path / "from-bf16")], text_file, "--no-eval")
    shards = sorted(p.name for p in (tmp_path / "from-fp8").glob("*.safetensors"))
    assert shards and all((tmp_path / "from-fp8" / s).read_bytes() == (tmp_path / "from-bf16" / s).read_bytes()
                          for s in shards)
    return _tensors(tmp_path / "from-fp8")


def test_minimax_m2_fp8_release_quantizes_as_its_bf16_conversion(tmp_path, text_file):
    """MiniMax-M2's release: DeepSeek's block FP8 on Mixtral's names, the routers and the blocks' sigmoid bias
    (``e_score_correction_bias``, which the router takes from the block) in fp32. Quantized from FP8, the export
    is the one of its exact BF16 conversion, byte for byte; the bias and routers are copied as released."""
    bf16 = make_model("minimax_m2", tmp_path / "bf16", dtype=torch.bfloat16)
    tensors = load_file(bf16 / "model.safetensors")
    fp32 = [n for n in tensors if n.endswith(("e_score_correction_bias", "block_sparse_moe.gate.weight"))]
    save_file({n: t.float() if n in fp32 else t for n, t in tensors.items()}, bf16 / "model.safetensors",
              metadata={"format": "pt"})
    release = write_fp8_release(bf16, tmp_path / "fp8", block=BLOCK, skip=router_or_mtp_extra("minimax_m2"))
    stored = load_file(release / "model.safetensors")
    assert stored["model.layers.1.block_sparse_moe.experts.3.w2.weight"].dtype == torch.float8_e4m3fn
    exported = _as_its_bf16_conversion(release, tmp_path, text_file)
    for name in fp32:
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name], stored[name]), name
    assert "model.layers.1.block_sparse_moe.experts.3.w2.qweight" in exported
    assert cli("verify", tmp_path / "from-fp8").returncode == 0


@pytest.mark.parametrize("model_type", ["deepseek_v32", "glm_moe_dsa"])
def test_sparse_attention_fp8_release_quantizes_as_its_bf16_conversion(tmp_path, text_file, model_type):
    """DeepSeek-V3.2's and GLM-5's releases: DeepSeek-V3's FP8 blocks, the sparse attention's indexer included
    (``wq_b`` and ``wk`` in FP8, ``weights_proj`` in BF16). Quantized from FP8, the export is the one of its exact
    BF16 conversion, byte for byte: the indexer's ``wq_b`` a GPTQ linear; its ``wk`` the BF16 conversion, as vLLM
    loads it (fused with ``weights_proj``, unquantized), and excluded by GPTQ's ``dynamic`` for servers that would
    build it quantized; its weights_proj and k_norm copied. The MTP layer (GLM-5's shares the model's embedding
    and head) comes whole, unquantized, and excluded by one ``-:`` rule."""
    bf16 = make_model(model_type, tmp_path / "bf16", dtype=torch.bfloat16)
    added = append_mtp_layer(bf16, head=model_type == "deepseek_v32")
    release = write_fp8_release(bf16, tmp_path / "fp8", block=BLOCK, skip=router_or_mtp_extra(model_type))
    stored = load_file(release / "model.safetensors")
    indexer = "model.layers.1.self_attn.indexer."
    assert stored[indexer + "wq_b.weight"].dtype == stored[indexer + "wk.weight"].dtype == torch.float8_e4m3fn
    assert stored[indexer + "weights_proj.weight"].dtype == torch.bfloat16
    exported = _as_its_bf16_conversion(release, tmp_path, text_file)
    reference = _tensors(tmp_path / "reference")
    for layer in range(3):  # every layer, the dense first one too
        indexer = f"model.layers.{layer}.self_attn.indexer."
        assert indexer + "wq_b.qweight" in exported and indexer + "wk.qweight" not in exported
        assert exported[indexer + "wk.weight"].dtype == torch.bfloat16
        assert torch.equal(exported[indexer + "wk.weight"], reference[indexer + "wk.weight"])
        assert not any(n.startswith(indexer + "wk.weight_scale") for n in exported)
        for name in ("weights_proj.weight", "k_norm.weight", "k_norm.bias"):
            assert torch.equal(exported[indexer + name], stored[indexer + name]), indexer + name
    assert sorted(n for n in exported if n.startswith(f"model.layers.{MTP}.")) == sorted(added)
    assert exported[f"model.layers.{MTP}.self_attn.indexer.wq_b.weight"].dtype == torch.bfloat16
    qc = json.loads((tmp_path / "from-fp8" / "config.json").read_text())["quantization_config"]
    assert rf"-:^model\.layers\.{MTP}\." in qc["dynamic"] and qc["meta"]["full_precision_layers"] == [MTP]
    dynamic = [re.compile(rule[2:]) for rule in qc["dynamic"] if rule.startswith("-:")]
    for layer in range(3):
        for leaf, excluded in (("wk", True), ("weights_proj", True), ("wq_b", False)):
            name = f"model.layers.{layer}.self_attn.indexer.{leaf}"
            assert any(rx.match(name) for rx in dynamic) == excluded, name
            assert (name in qc["modules_not_quantized"]) == excluded, name
    assert cli("verify", tmp_path / "from-fp8").returncode == 0


def test_qwen3_next_fp8_release_with_its_mtp_block_quantizes_as_its_bf16_conversion(tmp_path, text_file):
    """Qwen3-Next's release: linear-attention layers (Gated DeltaNet) between full-attention ones, and its
    multi-token-prediction block outside the decoder layers (``mtp.*``). Quantized from FP8, the export is the one of
    its exact BF16 conversion, byte for byte: the linear attention's in_proj_qkvz and out_proj quantized, its
    in_proj_ba and conv1d kept as released; the MTP block copied unquantized and excluded by one ``-:^mtp\\.`` rule
    (compressed-tensors: ignored); verify passes."""
    bf16 = make_model("qwen3_next", tmp_path / "bf16", dtype=torch.bfloat16)
    added = append_mtp_block(bf16)
    release = write_fp8_release(bf16, tmp_path / "fp8", block=BLOCK, skip=router_or_mtp_extra("qwen3_next"))
    stored = load_file(release / "model.safetensors")
    linear = "model.layers.1.linear_attn."
    assert stored[linear + "in_proj_qkvz.weight"].dtype == torch.float8_e4m3fn
    assert stored[linear + "in_proj_ba.weight"].dtype == torch.bfloat16
    exported = _as_its_bf16_conversion(release, tmp_path, text_file)
    for layer, kind in ((1, "linear_attn"), (3, "self_attn")):
        prefix = f"model.layers.{layer}.{kind}."
        projections = ("in_proj_qkvz", "out_proj") if kind == "linear_attn" else ("q_proj", "k_proj", "v_proj", "o_proj")
        assert {prefix + f"{p}.qweight" for p in projections} <= set(exported), layer
    for name in ("in_proj_ba.weight", "conv1d.weight", "A_log", "dt_bias", "norm.weight"):
        assert torch.equal(exported[linear + name], stored[linear + name]), name
    assert sorted(n for n in exported if n.startswith("mtp.")) == sorted(added)
    assert all(torch.equal(exported[n], stored[n]) for n in added)
    qc = json.loads((tmp_path / "from-fp8" / "config.json").read_text())["quantization_config"]
    assert r"-:^mtp\." in qc["dynamic"]
    assert any(re.match(rule[2:], "mtp.layers.0.mlp.experts") for rule in qc["dynamic"])
    assert not any(re.match(rule[2:], "model.layers.3.mlp.experts") for rule in qc["dynamic"])
    assert cli("verify", tmp_path / "from-fp8").returncode == 0
    ct = tmp_path / "ct"
    _quantize_each([(release, ct)], text_file, "--no-eval", "--format", "compressed-tensors")
    ignore = json.loads((ct / "config.json").read_text())["quantization_config"]["ignore"]
    assert r"re:^mtp\." in ignore and "model.layers.1.linear_attn.in_proj_ba" in ignore


# ----------------------------------------------------------------------------- Kimi K2


def test_kimi_k2_reads_as_deepseek_v3_with_one_group_and_its_rotary_tables(tmp_path, text_file):
    """Kimi K2 is DeepSeek-V3 with 384 experts in one group, model_type kimi_k2 (remote code) and a
    rotary inv_freq tensor in every layer: the deepseek_v3 row serves it, and the tables are copied."""
    import transformers

    from quantmoe.stages.evaluate import eval_windows

    deepseek = make_model("deepseek_v3", tmp_path / "deepseek", dtype=torch.bfloat16, n_routed_experts=384,
                          n_group=1, topk_group=1, num_experts_per_tok=8, num_hidden_layers=2)
    kimi = tmp_path / "kimi"
    shutil.copytree(deepseek, kimi)
    config = json.loads((kimi / "config.json").read_text())
    config.update(model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"],
                  auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    (kimi / "config.json").write_text(json.dumps(config))
    tensors = load_file(kimi / "model.safetensors")
    rope = config["qk_rope_head_dim"]
    inv_freq = (1.0 / 50000 ** (torch.arange(0, rope, 2).float() / rope)).to(torch.bfloat16)
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    save_file(tensors, kimi / "model.safetensors", metadata={"format": "pt"})

    ckpt = Checkpoint(kimi)
    assert ckpt.config.model_type == "deepseek_v3" and ckpt.config.n_routed_experts == 384
    ids, _ = eval_windows(ckpt.tokenizer(), text_file, 32)
    stream = LayerStream(ckpt, torch.device("cpu"))
    batches = stream.embed(ids[:2], 2)
    for i in range(2):
        batches = stream.run_layer(stream.load_layer(i, stream.layer_state(i)), batches)
        stream.release_layer(i)
    stream.load_head()
    reference = transformers.AutoModelForCausalLM.from_pretrained(deepseek, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(stream.logits(batches[0].hidden), reference(ids[:2]).logits, rtol=1e-4, atol=1e-4)

    out = tmp_path / "out"
    result = cli("quantize", kimi, "--out", out, "--calib", text_file, *QUICK, "--backend", "rtn")
    assert result.returncode == 0, result.stderr
    exported = _tensors(out)
    assert all(torch.equal(exported[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"], inv_freq) for i in range(2))
    assert len([n for n in exported if n.startswith("model.layers.1.mlp.experts.") and n.endswith(".qweight")]) == 384 * 3
    assert json.loads((out / "config.json").read_text())["model_type"] == "kimi_k2"  # the release's own config
    assert math.isfinite(json.loads(cli("inspect", kimi, "--json").stdout)["totals"]["bits_per_weight"])


def test_bnb_quantizes_an_fp8_release_as_its_bf16_conversion(releases, tmp_path):
    pytest.importorskip("bitsandbytes", reason="the bnb backends need bitsandbytes (pip install 'quantmoe[bnb]')")
    _, fp8, reference = releases
    runs = cli_forked([["quantize", model, "--out", out, "--backend", "bnb-nf4", "--no-eval", "--quiet"]
                       for model, out in ((fp8, tmp_path / "from-fp8"), (reference, tmp_path / "from-bf16"))])
    for result in runs:
        assert result.returncode == 0, result.stderr
    ours, theirs = (tmp_path / "from-fp8" / "model-00001-of-00001.safetensors",
                    tmp_path / "from-bf16" / "model-00001-of-00001.safetensors")
    assert ours.read_bytes() == theirs.read_bytes()
    assert not [n for n, d in _dtypes(tmp_path / "from-fp8").items() if d.startswith("F8") or "_scale" in n]
