"""Per-module precision (``--recipe``): the rules, the refusals of what vLLM cannot serve, and what
the export stores and declares (GPTQ ``dynamic``, compressed-tensors ``config_groups`` + ``ignore``)."""

from __future__ import annotations

import re

import pytest
import torch
from clirun import cli_forked, quantize_args
from conftest import ARCH_NAMES

import quantmoe
from quantmoe.base.errors import QuantMoeError
from quantmoe.base.options import QuantConfig
from quantmoe.base.recipe import PRESETS, Rule, load_recipe
from quantmoe.formats.gptq_v1 import module_settings
from quantmoe.model.architectures import ARCHITECTURES, plan_layer
from quantmoe.model.checkpoint import Checkpoint
from quantmoe.stages.precision import layer_units

QUICK = dict(nsamples=4, seqlen=32, run_eval=False, quiet=True)


def write_recipe(path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- the rules
def test_first_matching_rule_wins_and_unmatched_modules_keep_the_run_settings(tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", """
[[rules]]
match = "model.layers.0.self_attn.o_proj"
skip = true

[[rules]]
match = "re:.*self_attn\\\\..*"
bits = 8
group_size = 64

[[rules]]
match = "class:expert"
sym = false
""")
    q = QuantConfig(recipe=recipe, group_size=32)
    assert q.module_config("model.layers.0.self_attn.o_proj", "attention") is None
    attn = q.module_config("model.layers.1.self_attn.o_proj", "attention")
    assert (attn.bits, attn.group_size, attn.sym, attn.recipe) == (8, 64, True, "")
    expert = q.module_config("model.layers.0.block_sparse_moe.experts.3.w1", "expert")
    assert (expert.bits, expert.group_size, expert.sym) == (4, 32, False)
    assert q.module_config("model.layers.0.mlp.gate_proj", "dense_mlp") is q
    # the rules are part of the settings: the work folder's fingerprint covers the file's content
    assert q.to_dict()["rules"][1] == {"match": "re:.*self_attn\\..*", "bits": 8, "group_size": 64, "sym": None,
                                       "skip": False}


def test_presets():
    assert load_recipe("attention-int8") == (Rule("class:attention", bits=8),)
    assert {r.match for r in PRESETS["experts-only"]} == {"class:attention", "class:shared_expert", "class:dense_mlp"}
    assert all(r.skip for r in PRESETS["experts-only"])
    assert load_recipe("") == ()


@pytest.mark.parametrize("text,message", [
    ('[[rules]]\nmatch = "x"\nbits = 3\n', "bits = 3; use 4 or 8"),
    ('[[rules]]\nmatch = "x"\ngroup_size = 0\n', "group_size = 0"),
    ('[[rules]]\nmatch = "x"\nsym = "yes"\n', "sym = 'yes'"),
    ('[[rules]]\nmatch = "x"\nskip = true\nbits = 8\n', "skip = true keeps a module in 16 bits"),
    ('[[rules]]\nmatch = "x"\nskip = false\n', "skip = true keeps"),
    ('[[rules]]\nmatch = "x"\nbit = 8\n', "unknown key 'bit'"),
    ('[[rules]]\nmatch = "x"\n', "sets nothing"),
    ('[[rules]]\nbits = 8\n', "needs match"),
    ('[[rules]]\nmatch = "re:("\nbits = 8\n', "not a valid regular expression"),
    ('[[rules]]\nmatch = "class:router"\nskip = true\n', "names no module class"),
    ('bits = 8\n', "must hold one or more [[rules]]"),
    ('[[rules]\n', "is not valid TOML"),
])
def test_bad_recipe_files_are_one_line_errors(tmp_path, text, message):
    recipe = write_recipe(tmp_path / "bad.toml", text)
    with pytest.raises(QuantMoeError) as err:
        QuantConfig(recipe=recipe)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_recipe_name_and_gptqmodel_layout_are_refused():
    with pytest.raises(QuantMoeError, match="neither a preset .* nor a TOML file"):
        QuantConfig(recipe="experts-onyl")
    with pytest.raises(QuantMoeError, match="--recipe matches the checkpoint's own module names"):
        QuantConfig(recipe="attention-int8", layout="gptqmodel")


# ----------------------------------------------------------------------------- refusals
REFUSED = [
    ('match = "model.layers.1.self_attn.k_proj"\nbits = 8', ("self_attn.q_proj", "self_attn.k_proj")),
    ('match = "re:.*experts\\\\.2\\\\..*"\nbits = 8', ("experts.0.w1", "experts.2.w1")),
    ('match = "re:.*experts\\\\.\\\\d+\\\\.w2$"\nskip = true', ("experts.0.w1", "experts.0.w2")),
    ('match = "re:.*\\\\.w3$"\ngroup_size = 64', ("experts.0.w1", "experts.0.w3")),
]


@pytest.fixture(scope="module")
def refusals(tiny_model, text_file, tmp_path_factory):
    """rule -> (a folder holding its recipe r.toml, the CLI run that quantized the tiny Mixtral with it into
    out/ there): the rules of REFUSED run side by side in forks of one interpreter (clirun.cli_forked)."""
    folders, commands = {}, []
    for rule, _ in REFUSED:
        folders[rule] = tmp_path_factory.mktemp("refused")
        recipe = write_recipe(folders[rule] / "r.toml", f"[[rules]]\n{rule}\n")
        commands.append(quantize_args(tiny_model("mixtral"), folders[rule] / "out", text_file, "--recipe", recipe))
    return {rule: (folders[rule], run) for rule, run in zip(folders, cli_forked(commands))}


@pytest.mark.parametrize("rule,named", REFUSED)
def test_recipes_vllm_cannot_serve_are_refused_before_any_work(refusals, rule, named):
    tmp_path, run = refusals[rule]
    out = tmp_path / "out"
    assert run.returncode != 0
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("error: --recipe gives") and "one scheme" in line, line
    assert all(n in line for n in named), line
    assert not out.exists() and not any(p.name.endswith("quantmoe-work") for p in tmp_path.iterdir())


def test_gate_and_up_of_a_dense_mlp_must_agree(tiny_model, text_file, tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", '[[rules]]\nmatch = "model.layers.0.mlp.up_proj"\nbits = 8\n')
    with pytest.raises(QuantMoeError, match=r"model\.layers\.0\.mlp\.gate_proj int4 .* but model\.layers\.0\.mlp\.up_proj int8"):
        quantmoe.quantize(tiny_model("qwen2_moe"), tmp_path / "o", QuantConfig(recipe=recipe), calib=text_file, **QUICK)


def test_a_rule_that_names_nothing_is_refused(tiny_model, text_file, tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", '[[rules]]\nmatch = "model.layers.0.self_attn.qkv_proj"\nbits = 8\n')
    with pytest.raises(QuantMoeError, match="rule 1 .* names no quantized linear"):
        quantmoe.quantize(tiny_model("mixtral"), tmp_path / "o", QuantConfig(recipe=recipe), calib=text_file, **QUICK)


@pytest.mark.parametrize("model_type", ["deepseek_v32", "glm_moe_dsa"])
def test_the_sparse_attention_indexer_is_a_unit_of_its_own(tiny_model, text_file, tmp_path, model_type):
    """DeepSeek-V3.2's (and GLM-5's) indexer query projection wq_b shares q_b_proj's input (one group of Hessians)
    but vLLM runs it apart from MLA's linears: a recipe may keep it in 16 bits alone, and the export declares it so
    (a GPTQ ``dynamic`` exclusion beside the row's kept wk and weights_proj), copied from the source, while MLA's
    linears are quantized; where they share a unit, a recipe that splits it is still refused."""
    import json

    from safetensors.torch import load_file

    src = tiny_model(model_type)
    recipe = write_recipe(tmp_path / "r.toml", '[[rules]]\nmatch = "re:.*self_attn\\\\.indexer\\\\..*"\nskip = true\n')
    out = tmp_path / "out"
    quantmoe.quantize(src, out, QuantConfig(group_size=32, recipe=recipe), calib=text_file, **QUICK)
    dynamic = json.loads((out / "config.json").read_text())["quantization_config"]["dynamic"]
    assert sorted(dynamic) == [rf"-:^model\.layers\.\d+\.self_attn\.indexer\.{p}$" for p in ("weights_proj", "wk", "wq_b")]
    exported, source = (load_file(next(folder.glob("model*.safetensors"))) for folder in (out, src))
    for i in range(3):
        attn = f"model.layers.{i}.self_attn."
        assert {attn + f"{p}.qweight" for p in ("q_a_proj", "kv_a_proj_with_mqa", "q_b_proj")} <= set(exported)
        for name in ("indexer.wk.weight", "indexer.wq_b.weight", "indexer.weights_proj.weight"):
            assert torch.equal(exported[attn + name], source[attn + name]), attn + name
    split = write_recipe(tmp_path / "s.toml", '[[rules]]\nmatch = "model.layers.0.self_attn.q_a_proj"\nbits = 8\n')
    with pytest.raises(QuantMoeError, match=r"q_a_proj int8 .* but model\.layers\.0\.self_attn\.kv_a_proj_with_mqa"):
        quantmoe.quantize(src, tmp_path / "o", QuantConfig(group_size=32, recipe=split), calib=text_file, **QUICK)
    kept = write_recipe(tmp_path / "k.toml", '[[rules]]\nmatch = "model.layers.1.self_attn.indexer.wk"\nbits = 8\n')
    with pytest.raises(QuantMoeError, match="rule 1 .* names no quantized linear"):
        quantmoe.quantize(src, tmp_path / "o", QuantConfig(group_size=32, recipe=kept), calib=text_file, **QUICK)


# ----------------------------------------------------------------------------- what the export stores
def _linears(plan, kind):
    return [n for n, k in plan.linear_kinds().items() if k == kind]


@pytest.mark.parametrize("model_type", ARCH_NAMES)
def test_attention_int8_stores_8_bit_attention_and_4_bit_experts(tiny_model, text_file, tmp_path, model_type):
    src = tiny_model(model_type)
    out = tmp_path / "out"
    quantmoe.quantize(src, out, QuantConfig(backend="rtn", group_size=32, recipe="attention-int8"), calib=text_file,
                      **QUICK)
    ckpt = Checkpoint(out)
    qc = ckpt.quantization
    assert qc["bits"] == 4
    arch = ARCHITECTURES[model_type]
    for i in range(ckpt.config.num_hidden_layers):
        plan = plan_layer(arch, ckpt.config, i)
        for kind, bits in (("attention", 8), ("expert", 4), ("shared_expert", 4), ("dense_mlp", 4)):
            for name in _linears(plan, kind):
                module = f"model.layers.{i}.{name}"
                rows, cols = ckpt.quantized_linears[module].shape
                assert tuple(ckpt.shape(f"{module}.qweight")) == (cols * bits // 32, rows), module
                assert module_settings(qc, module)[0] == bits, module  # what dynamic declares
    state = ckpt.read_prefix("model.layers.0.")
    assert all(torch.isfinite(t).all() for t in state.values())


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "granitemoe"])
def test_experts_only_copies_the_rest_and_declares_it(tiny_model, text_file, tmp_path, model_type):
    src = Checkpoint(tiny_model(model_type))
    outs = {}
    for fmt in ("gptq", "compressed-tensors"):
        outs[fmt] = tmp_path / fmt
        quantmoe.quantize(src.path, outs[fmt], QuantConfig(group_size=32, recipe="experts-only", format=fmt),
                          calib=text_file, **QUICK)
    gptq, ct = Checkpoint(outs["gptq"]), Checkpoint(outs["compressed-tensors"])
    arch = ARCHITECTURES[model_type]
    kept = []
    for i in range(src.config.num_hidden_layers):
        plan = plan_layer(arch, src.config, i)
        kept += [f"model.layers.{i}.{n}" for k in ("attention", "shared_expert", "dense_mlp") for n in _linears(plan, k)]
        assert all(f"model.layers.{i}.{n}" in gptq.quantized_linears for n in _linears(plan, "expert"))
    assert kept
    for module in kept:
        for ckpt in (gptq, ct):
            assert module not in ckpt.quantized_linears
            assert torch.equal(ckpt.tensor(f"{module}.weight"), src.tensor(f"{module}.weight")), module
        assert module in gptq.quantization["modules_not_quantized"]
        assert module_settings(gptq.quantization, module) is None  # a "-:" rule
        assert any(t.startswith("re:") and re.match(t[3:], module) for t in ct.quantization["ignore"]), module
    # both formats read back to the same weights
    for i in range(src.config.num_hidden_layers):
        a, b = gptq.read_prefix(f"model.layers.{i}."), ct.read_prefix(f"model.layers.{i}.")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# vLLM's name of each MoE family's fused experts module, from its model files (models/<family>.py): the
# module a GPTQ dynamic rule or a compressed-tensors target must match (MiniMax-M2 keeps Mixtral's names on disk,
# but vLLM builds its MoE block under "mlp").
VLLM_EXPERTS = {"mixtral": "block_sparse_moe.experts", "minimax_m2": "mlp.experts", "phimoe": "block_sparse_moe.experts",
                "granitemoe": "block_sparse_moe.experts"}


@pytest.mark.parametrize("model_type", [n for n in ARCH_NAMES if ARCHITECTURES[n].experts is not None])
def test_an_experts_rule_matches_the_module_vllm_builds(tiny_model, model_type):
    """A recipe's rule for a MoE layer's experts is written as one regex that matches the fused module vLLM looks
    the scheme up on (its name, VLLM_EXPERTS, else ``mlp.experts``) and each expert linear on disk, not the router."""
    config = Checkpoint(tiny_model(model_type)).config
    arch = ARCHITECTURES[model_type]
    index = next(i for i in range(config.num_hidden_layers) if arch.is_moe_layer(config, i))
    plan = plan_layer(arch, config, index)
    (unit,) = [u for u in layer_units(plan, QuantConfig(), f"model.layers.{index}.") if u.kind == "expert"]
    names = [VLLM_EXPERTS.get(model_type, "mlp.experts"), plan.experts.linear("gate", 0),
             plan.experts.linear("down", plan.num_experts - 1)]
    for name in names:
        assert re.fullmatch(unit.pattern, name), (unit.pattern, name)
    assert not any(re.fullmatch(unit.pattern, r) for r in plan.routers)


def test_mixed_bits_in_compressed_tensors(tiny_model, text_file, tmp_path):
    out = tmp_path / "ct"
    quantmoe.quantize(tiny_model("mixtral"), out, QuantConfig(backend="rtn", group_size=32, recipe="attention-int8",
                                                              format="compressed-tensors"), calib=text_file, **QUICK)
    ckpt = Checkpoint(out)
    groups = list(ckpt.quantization["config_groups"].values())
    assert [g["weights"]["num_bits"] for g in groups] == [8, 4] and groups[-1]["targets"] == ["Linear"]
    attn = "model.layers.0.self_attn.q_proj"
    assert any(re.match(t[3:], attn) for t in groups[0]["targets"])
    assert any(re.match(t[3:], "model.layers.0.self_attn.qkv_proj") for t in groups[0]["targets"])  # vLLM's fused name
    rows, cols = ckpt.quantized_linears[attn].shape
    assert tuple(ckpt.shape(f"{attn}.weight_packed")) == (rows, cols // 4)  # 8-bit: in/4 words
    expert = "model.layers.0.block_sparse_moe.experts.0.w1"
    rows, cols = ckpt.quantized_linears[expert].shape
    assert tuple(ckpt.shape(f"{expert}.weight_packed")) == (rows, cols // 8)
    assert not any(re.match(t[3:], expert) for t in groups[0]["targets"])
    assert not any(re.match(t[3:], "model.layers.0.block_sparse_moe.experts") for t in groups[0]["targets"])


def test_batch_jobs_accept_a_recipe(tiny_model, text_file, tmp_path):
    from quantmoe.apps.batch import load_jobs

    write_recipe(tmp_path / "attn8.toml", '[[rules]]\nmatch = "class:attention"\nbits = 8\n')
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(f'[[jobs]]\nname = "a"\nmodel = "{tiny_model("mixtral")}"\nrecipe = "attn8.toml"\n'
                    f'[[jobs]]\nname = "b"\nmodel = "{tiny_model("mixtral")}"\nrecipe = "experts-only"\n')
    a, b = load_jobs(jobs)
    assert a.config.rules == (Rule("class:attention", bits=8),)  # the path is taken beside the jobs file
    assert b.config.rules == PRESETS["experts-only"]
    matrix = tmp_path / "matrix.toml"
    matrix.write_text(f'[matrix]\nmodels = ["{tiny_model("mixtral")}"]\n'
                      'recipes = [{backend = "rtn"}, {backend = "rtn", recipe = "attention-int8"}, '
                      '{backend = "rtn", format = "compressed-tensors"}]\n')
    assert [j.name for j in load_jobs(matrix)] == ["model-rtn-int4-g128", "model-rtn-int4-g128-attention-int8",
                                                   "model-rtn-int4-g128-ct"]


# ----------------------------------------------------------------------------- the bundled demo
@pytest.fixture(scope="module")
def demo_gaps(tmp_path_factory):
    """(recipe, format) -> the demo's perplexity gap, RTN int4 g128 (no calibration: quick), scored on the
    first documents of the bundled held-out text."""
    from quantmoe.base.paths import DEFAULT_MODEL, EVAL_DATA

    base = tmp_path_factory.mktemp("demo")
    heldout = base / "heldout.jsonl"
    heldout.write_text("\n".join(EVAL_DATA.read_text(encoding="utf-8").splitlines()[:6]) + "\n", encoding="utf-8")
    gaps = {}
    for recipe, fmt in (("", "gptq"), ("", "compressed-tensors"), ("attention-int8", "compressed-tensors")):
        summary = quantmoe.quantize(DEFAULT_MODEL, base / f"{recipe or 'all4'}-{fmt}",
                                    QuantConfig(backend="rtn", recipe=recipe, format=fmt), nsamples=4, seqlen=64,
                                    eval_data=heldout, quiet=True, device="cpu")
        gaps[recipe, fmt] = summary["report"]["gap"]["absolute"]
    return gaps


def test_demo_gap_is_the_same_through_compressed_tensors(demo_gaps):
    assert demo_gaps["", "compressed-tensors"] == pytest.approx(demo_gaps["", "gptq"], abs=0.02)


def test_demo_8_bit_attention_gives_a_smaller_gap_than_all_4_bit(demo_gaps):
    assert 0 < demo_gaps["attention-int8", "compressed-tensors"] < demo_gaps["", "compressed-tensors"]


# ----------------------------------------------------------------------------- reports
def test_reports_show_bits_per_module_class(tiny_model, text_file, tmp_path):
    from quantmoe.apps.inspection import inspect_model, render_text
    from quantmoe.stages.export import checkpoint_stats

    src = tiny_model("qwen2_moe")
    out = tmp_path / "out"
    summary = quantmoe.quantize(src, out, QuantConfig(backend="rtn", group_size=32, recipe="attention-int8"),
                                calib=text_file, nsamples=4, seqlen=32, eval_data=text_file, quiet=True)
    classes = checkpoint_stats(out)["classes"]
    assert list(classes) == ["attention", "routed experts", "shared experts", "dense MLPs"]
    assert classes["attention"]["bits"] == [8] and classes["routed experts"]["bits"] == [4]
    # 8 bits plus an fp16 scale and packed zero per group of 32, and each column's int32 g_idx
    assert 8 < classes["attention"]["bits_per_weight"] < 10 and 4 < classes["routed experts"]["bits_per_weight"] < 6
    assert summary["report"]["quantization"]["classes"] == classes
    line = "attention 8-bit (%.2f bits/weight); routed experts 4-bit" % classes["attention"]["bits_per_weight"]
    assert line in (out / "eval_report.md").read_text()
    card = (out / "README.md").read_text()
    assert "- bits per module class: " + line in card
    assert "recipe `attention-int8`, declared in the config's `dynamic`" in card
    assert "every attention and expert projection is quantized" not in card

    skipped = tmp_path / "experts-only"
    quantmoe.quantize(src, skipped, QuantConfig(backend="rtn", group_size=32, recipe="experts-only"),
                      calib=text_file, **QUICK)
    classes = checkpoint_stats(skipped)["classes"]
    assert classes["attention"] == {"bits": [16], "bits_per_weight": 16.0, "weights": classes["attention"]["weights"]}
    assert classes["routed experts"]["bits"] == [4]

    report = inspect_model(src, group_size=32, recipe="attention-int8")
    assert report["class_bits"]["attention"]["bits"] == [8] and report["class_bits"]["routed expert"]["bits"] == [4]
    assert "per class: attention 8-bit" in render_text(report)
    assert inspect_model(src, group_size=32, recipe="experts-only")["class_bits"]["attention"]["bits"] == [16]
