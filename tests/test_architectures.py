"""Tests generated from the architecture table: every row is built tiny, saved, checked against
transformers' own loader, quantized with GPTQ at group size 32, exported, reloaded and inspected.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import ARCH_NAMES
from tiny import (
    TINY,
    make_tokenizer,
    spy_taken,
    transformers_lm,
    transformers_lm_from_config,
)

import quantmoe
from quantmoe.apps.inspection import inspect_model
from quantmoe.base.errors import QuantMoeError
from quantmoe.base.options import QuantConfig
from quantmoe.cli import main
from quantmoe.formats.gptq_v1 import GPTQ_SUFFIXES
from quantmoe.model.architectures import (
    ARCHITECTURES,
    markdown_table,
    plan_layer,
    unfuse_experts,
)
from quantmoe.model.checkpoint import Checkpoint
from quantmoe.model.stream import LayerStream
from quantmoe.stages.evaluate import eval_windows
from quantmoe.stages.export import checkpoint_stats
from quantmoe.stages.quantize import work_dir

MOE_NAMES = [name for name in ARCH_NAMES if ARCHITECTURES[name].experts is not None]
FUSED_ON_DISK = [name for name in MOE_NAMES if ARCHITECTURES[name].fused.on_disk]
QCFG = QuantConfig(group_size=32)
DOCS = Path(__file__).resolve().parent.parent / "docs" / "architectures.md"


@pytest.fixture(scope="module")
def quantized(tiny_model, text_file, tmp_path_factory):
    """quantized(model_type) -> (source folder, GPTQ g32 export folder, summary), quantized once, no eval."""
    cache: dict[str, tuple] = {}

    def run(model_type: str):
        if model_type not in cache:
            src = tiny_model(model_type)
            out = tmp_path_factory.mktemp("out") / model_type
            summary = quantmoe.quantize(src, out, QCFG, calib=text_file, nsamples=4, seqlen=32, run_eval=False,
                                        quiet=True)
            cache[model_type] = (src, out, summary)
        return cache[model_type]

    return run


def _reference(folder: Path):
    return transformers_lm(folder)



def test_every_row_has_a_tiny_config():
    assert set(ARCHITECTURES) <= set(TINY), f"rows without a tiny config: {set(ARCHITECTURES) - set(TINY)}"


@pytest.mark.parametrize("model_type", ARCH_NAMES)
def test_row_accounts_for_every_tensor_on_disk(tiny_model, model_type):
    """Every matrix of a layer is a planned linear, a fused expert tensor or under a router; nothing is missing."""
    ckpt = Checkpoint(tiny_model(model_type))
    arch = ARCHITECTURES[model_type]
    for i in range(ckpt.config.num_hidden_layers):
        plan = plan_layer(arch, ckpt.config, i)
        shapes = ckpt.layer_shapes(i)
        linears = plan.linear_kinds()
        assert set(plan.linear_shapes(shapes)) == set(linears), f"layer {i}: planned linears missing on disk"
        for router in plan.routers:
            assert any(n.startswith(router + ".") for n in shapes), f"layer {i}: router {router} not on disk"
        for name, shape in shapes.items():
            if len(shape) < 2:
                continue  # norms, biases, DeepSeek's e_score_correction_bias
            module = name.rpartition(".")[0]
            assert (module in linears or name in plan.fused_disk_tensors()
                    or any(name.startswith(r + ".") for r in plan.routers)), f"layer {i}: {name} is not in the row"
    kinds = {k for i in range(ckpt.config.num_hidden_layers)
             for k in plan_layer(arch, ckpt.config, i).linear_kinds().values()}
    assert "attention" in kinds and ("expert" in kinds) == (arch.experts is not None)


# Config variations that move the dense/MoE boundary, per sparse rule.
SPARSE_VARIATIONS = {"all": [{}], "sparse_step": [{"mlp_only_layers": [], "decoder_sparse_step": 2},
                                                  {"mlp_only_layers": [1], "decoder_sparse_step": 1}],
                     "first_k_dense": [{"first_k_dense_replace": 0}, {"first_k_dense_replace": 2}]}


@pytest.mark.parametrize("model_type", MOE_NAMES)
def test_moe_layers_are_those_transformers_builds(model_type):
    import transformers

    arch = ARCHITECTURES[model_type]
    cls_name, kwargs = TINY[model_type]
    for overrides in SPARSE_VARIATIONS[arch.sparse_rule]:
        config = getattr(transformers, cls_name)(vocab_size=300, **{**kwargs, **overrides})
        with torch.device("meta"):
            model = transformers_lm_from_config(config)
        built = [any(n == arch.fused.module for n, _ in layer.named_modules()) for layer in model.model.layers]
        planned = [arch.is_moe_layer(config, i) for i in range(config.num_hidden_layers)]
        assert planned == built, overrides


@pytest.mark.parametrize("model_type", ARCH_NAMES)
def test_streamed_layers_compute_what_transformers_computes(tiny_model, text_file, model_type):
    """The row's renames, fusion and head convention reproduce the model transformers loads itself."""
    src = tiny_model(model_type)
    ckpt = Checkpoint(src)
    ids, _ = eval_windows(ckpt.tokenizer(), text_file, 32)
    ids = ids[:2]
    reference = _reference(src)
    stream = LayerStream(ckpt, torch.device("cpu"))
    batches = stream.embed(ids, 2)
    with torch.no_grad():
        for i in range(stream.num_layers):
            state = stream.to_memory(i, stream.layer_state(i))
            expected = {k[len(f"model.layers.{i}."):]: v for k, v in reference.state_dict().items()
                        if k.startswith(f"model.layers.{i}.")}
            assert set(state) == set(expected), f"layer {i}"
            for key, value in state.items():
                assert torch.equal(value, expected[key]), f"layer {i}: {key}"
            batches = stream.run_layer(stream.load_layer(i, stream.layer_state(i)), batches)
            stream.release_layer(i)
        stream.load_head()
        ours = stream.logits(batches[0].hidden)
        theirs = reference(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", MOE_NAMES)
def test_fused_gate_up_order_matches_disk(tiny_model, model_type):
    """The row's halves are what transformers loads from disk and what its expert forward gates."""
    src = tiny_model(model_type)
    ckpt = Checkpoint(src)
    arch = ARCHITECTURES[model_type]
    reference = _reference(src)
    moe_layers = [i for i in range(ckpt.config.num_hidden_layers) if arch.is_moe_layer(ckpt.config, i)]
    assert moe_layers
    for i in moe_layers:
        plan = plan_layer(arch, ckpt.config, i)
        layer = reference.model.layers[i]
        module = layer.get_submodule(plan.fused.module)
        assert module.is_concatenated and not module.is_transposed  # the (E, 2I, H) concatenated layout
        gate_up = getattr(module, plan.fused.gate_up).detach()
        down = getattr(module, plan.fused.down).detach()
        I = gate_up.shape[1] // 2
        half = {name: gate_up[:, k * I:(k + 1) * I] for k, name in enumerate(plan.fused.halves)}
        prefix = ckpt.layer_prefix(i)
        if plan.fused.on_disk:  # stored as in memory, or transposed (Qwen3-VL-MoE: tiny shapes that differ so)
            stored = [ckpt.tensor(prefix + n).float() for n in (plan.fused.disk_gate_up, plan.fused.disk_down)]
            assert [t.shape != m.shape for t, m in zip(stored, (gate_up, down))] == [plan.fused.transposed] * 2
            assert torch.equal(gate_up, plan.fused.in_memory(stored[0]))
            assert torch.equal(down, plan.fused.in_memory(stored[1]))
        else:
            for e in range(plan.num_experts):
                for which in ("gate", "up"):
                    disk = ckpt.tensor(f"{prefix}{plan.experts.linear(which, e)}.weight").float()
                    assert torch.equal(half[which][e], disk), f"layer {i} expert {e} {which}"
                assert torch.equal(down[e], ckpt.tensor(f"{prefix}{plan.experts.linear('down', e)}.weight").float())
        # The activation applies to the half the row calls gate: run expert e alone through transformers.
        x = torch.randn(5, gate_up.shape[2], generator=torch.Generator().manual_seed(i))
        for e in (0, plan.num_experts - 1):
            with torch.no_grad():
                got = module(x, torch.full((5, 1), e), torch.ones(5, 1))
            want = (module.act_fn(x @ half["gate"][e].t()) * (x @ half["up"][e].t())) @ down[e].t()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", FUSED_ON_DISK)
def test_unfused_experts_load_to_the_same_layer_as_the_fused_tensors(tiny_model, model_type):
    """unfuse_experts (how the bnb backends cut experts fused on disk) inverts to_memory's stacking: the
    per-expert weights alone, under the row's per-expert names and linear_shapes, load to the same layer."""
    ckpt = Checkpoint(tiny_model(model_type))
    arch = ARCHITECTURES[model_type]
    stream = LayerStream(ckpt, torch.device("cpu"))
    for i in range(ckpt.config.num_hidden_layers):
        plan = plan_layer(arch, ckpt.config, i)
        state = stream.layer_state(i, keep_dtype=True)
        fused = plan.fused_disk_tensors()
        assert fused and set(fused) <= set(state)
        split = {n: t for n, t in state.items() if n not in fused}
        for name in fused:
            split |= unfuse_experts(plan, name, state[name])
        experts = {n for n, kind in plan.linear_kinds().items() if kind == "expert"}
        assert {n[: -len(".weight")] for n in split} >= experts
        shapes = plan.linear_shapes(ckpt.layer_shapes(i))
        assert all(tuple(split[f"{n}.weight"].shape) == shapes[n] for n in experts)
        want, got = stream.to_memory(i, state), stream.to_memory(i, split)
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), f"layer {i}: {key}"
    with pytest.raises(QuantMoeError) as err:
        unfuse_experts(plan, plan.fused.disk_down, state[plan.fused.disk_down][:-1])
    assert f"holds {plan.num_experts - 1} experts, its config {plan.num_experts}" in str(err.value)
    with pytest.raises(QuantMoeError) as err:
        unfuse_experts(plan, "self_attn.q_proj.weight", state["self_attn.q_proj.weight"])
    assert "is not a fused expert tensor" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("model_type", ARCH_NAMES)
def test_quantize_keeps_routers_and_quantizes_every_projection(quantized, text_file, model_type):
    src, out, summary = quantized(model_type)
    source_ckpt, export = Checkpoint(src), Checkpoint(out)
    arch = ARCHITECTURES[model_type]
    names = set(export.names())
    planned, replaced = set(), set()
    for i in range(source_ckpt.config.num_hidden_layers):
        plan = plan_layer(arch, source_ckpt.config, i)
        prefix = source_ckpt.layer_prefix(i)
        for router in plan.routers:
            router_tensors = source_ckpt.names(prefix + router + ".")
            assert router_tensors, f"{prefix}{router} has no tensors"
            assert set(export.names(prefix + router + ".")) == set(router_tensors), f"{router}: tensors changed"
            for n in router_tensors:
                a, b = source_ckpt.tensor(n), export.tensor(n)
                assert a.dtype == b.dtype and torch.equal(a, b), f"router tensor {n} changed"
        for lin in plan.quantized_linears():
            planned.add(prefix + lin)
            for suffix in GPTQ_SUFFIXES:
                assert f"{prefix}{lin}.{suffix}" in names, f"{prefix}{lin} not quantized"
            assert f"{prefix}{lin}.weight" not in names
            replaced.add(f"{prefix}{lin}.weight")
        replaced |= {prefix + n for n in plan.fused_disk_tensors()}
        assert not (replaced & names), f"replaced tensors still exported: {sorted(replaced & names)[:3]}"
    # Nothing else was quantized, and every other tensor is copied bit for bit.
    assert {n.rsplit(".", 1)[0] for n in names if n.endswith(".qweight")} == planned
    for n in source_ckpt.names():
        if n not in replaced:
            assert torch.equal(source_ckpt.tensor(n), export.tensor(n)), n
    kinds = {m["kind"] for layer in json.loads((out / "quantization_log.json").read_text())["layers"]
             for m in layer["modules"]}
    assert "attention" in kinds
    assert ("expert" in kinds) == (arch.experts is not None)
    assert ("shared_expert" in kinds) == (arch.shared_expert is not None)

    # The export reloads, and its logits stay close to those of the original loaded by transformers.
    ids, _ = eval_windows(source_ckpt.tokenizer(), text_file, 32)
    with torch.no_grad():
        original = _reference(src)(ids[:2]).logits
        reloaded = quantmoe.load_quantized(out)(ids[:2]).logits
    assert not torch.equal(original, reloaded)  # it was really quantized
    cosine = torch.nn.functional.cosine_similarity(original.flatten(0, 1), reloaded.flatten(0, 1), dim=-1)
    assert float(cosine.mean()) > 0.95, f"mean logit cosine {float(cosine.mean()):.4f}"


@pytest.mark.parametrize("keep", [None, "attention", "mlp"])
@pytest.mark.parametrize("model_type", MOE_NAMES)
def test_a_run_stopped_after_a_moe_layer_resumes_to_the_same_bytes(tiny_model, text_file, tmp_path, monkeypatch,
                                                                  model_type, keep):
    """Stopped once its first MoE layer is written, a run resumes by replaying that layer and those before it
    (the routed experts from their files' levels, and from the source as stored for --fit stream) and writes
    what the run never stopped wrote: also where a product's bits depend on how many rows it is made over (as
    on a GPU), with several batches, whose routed experts' products are made over all of them; and with a
    recipe that keeps every attention, or every MLP (the routed experts then replayed from the source), in 16 bits."""
    from clirun import Stop, content, products_rounding_by_rows, stopped_after_layer

    src = tiny_model(model_type)
    qcfg = QCFG if keep is None else QuantConfig(group_size=32, recipe=str(_keeping(src, keep, tmp_path)))
    config = Checkpoint(src).config
    first_moe = next(i for i in range(config.num_hidden_layers)
                     if plan_layer(ARCHITECTURES[model_type], config, i).experts is not None)
    stop = first_moe
    assert stop + 1 < config.num_hidden_layers, "the tiny config leaves no layer to run after its first MoE layer"
    reference, out = tmp_path / "reference" / "out", tmp_path / "resumed" / "out"
    args = dict(calib=text_file, nsamples=4, seqlen=32, run_eval=False, quiet=True, batch_size=1)
    with products_rounding_by_rows(monkeypatch):
        quantmoe.quantize(src, reference, qcfg, **args)
        with stopped_after_layer(monkeypatch, stop), pytest.raises(Stop):
            quantmoe.quantize(src, out, qcfg, **args)
        quantmoe.quantize(src, out, qcfg, **args)
    log = json.loads((out / "quantization_log.json").read_text())["layers"]
    assert log[stop + 1]["replay"]["layers"] == stop + 1
    assert content(out) == content(reference)


def _kinds(src: Path) -> set[str]:
    """The kinds of linear (a recipe's ``class:``) the checkpoint at ``src`` has in some layer."""
    config, arch = Checkpoint(src).config, ARCHITECTURES[Checkpoint(src).config.model_type]
    kinds = {"attention"}
    for i in range(config.num_hidden_layers):
        plan = plan_layer(arch, config, i)
        kinds |= {kind for kind, part in (("expert", plan.experts), ("shared_expert", plan.shared_expert),
                                          ("dense_mlp", plan.dense_mlp)) if part is not None}
    return kinds


def _keeping(src: Path, keep: str, folder: Path) -> Path:
    """A recipe file in ``folder`` that keeps every attention (``keep`` "attention") or every MLP ("mlp": the
    routed and shared experts and dense MLPs the checkpoint at ``src`` has) in 16 bits."""
    kept = ["attention"] if keep == "attention" else sorted(_kinds(src) - {"attention"})
    recipe = folder / f"keep-{keep}.toml"
    recipe.write_text("".join(f'[[rules]]\nmatch = "class:{kind}"\nskip = true\n' for kind in kept))
    return recipe


@pytest.mark.parametrize("keep", ["attention", "mlp"])
@pytest.mark.parametrize("model_type", ARCH_NAMES)
@pytest.mark.parametrize("which", ["original", "quantized"])
def test_whatever_a_recipe_keeps_in_16_bits_each_stream_is_its_model(tiny_model, text_file, tmp_path, monkeypatch,
                                                                     model_type, keep, which):
    """With a recipe that keeps every attention (or every MLP: routed and shared experts, dense MLPs) in 16 bits,
    each stream that enters a layer is its model's layers' output over the one that entered the layer before:
    --fit stream's full-precision stream the original model's, the stream being quantized the exported model's,
    to within the few fp32 roundings of the routed experts' products made over several batches' rows."""
    from quantmoe.model.stream import Batch
    from quantmoe.stages import layer as layer_module

    src = tiny_model(model_type)
    recipe = _keeping(src, keep, tmp_path)
    entered: dict[int, list] = {}  # layer -> the full-precision stream's batches as they entered it
    init = layer_module.LayerQuantizer.__init__

    def record(self, stream, index, batches, qcfg, *args, **kwargs):
        init(self, stream, index, batches, qcfg, *args, **kwargs)
        entered[index] = [Batch(b.hidden.clone(), b.kwargs)
                          for b in (self.original_batches if which == "original" else batches)]

    monkeypatch.setattr(layer_module.LayerQuantizer, "__init__", record)
    out = tmp_path / "out"
    quantmoe.quantize(src, out, QuantConfig(group_size=32, recipe=str(recipe)), calib=text_file,
                      nsamples=4, seqlen=32, batch_size=2, run_eval=False, quiet=True)
    stream = LayerStream(Checkpoint(src if which == "original" else out), torch.device("cpu"))
    assert sorted(entered) == list(range(stream.num_layers)) and len(entered[0]) == 2
    for i in range(stream.num_layers - 1):
        layer = stream.load_layer(i, stream.layer_state(i))
        want = stream.run_layer(layer, entered[i])
        stream.release_layer(i)
        for got, w in zip(entered[i + 1], want):
            assert (got.hidden - w.hidden).abs().amax() <= 4 * torch.finfo(torch.float32).eps * \
                w.hidden.abs().amax(), (i, keep, which)


@pytest.mark.parametrize("model_type", ARCH_NAMES)
def test_reusing_attention_output_for_the_residual_gives_the_same_bytes(tiny_model, text_file, tmp_path, monkeypatch,
                                                                        model_type):
    """The pass that turns a layer's batches into the residual after attention runs only the output projection on
    the input kept from its Hessian's pass (stages.layer.ATTENTION_OUTPUT_BYTES, stream.ProjectionOnly), in every
    layer of a row with an mlp_tail: the export is byte for byte the one made by running attention again."""
    from quantmoe.model import stream
    from quantmoe.stages import layer

    src = tiny_model(model_type)
    calls = []
    forward = stream.ProjectionOnly.forward
    monkeypatch.setattr(stream.ProjectionOnly, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))

    def run(name: str) -> Checkpoint:
        quantmoe.quantize(src, tmp_path / name, QCFG, calib=text_file, nsamples=4, seqlen=32, run_eval=False,
                          quiet=True)
        return Checkpoint(tmp_path / name)

    kept = run("kept")
    layers = Checkpoint(src).config.num_hidden_layers
    batches = len(calls) // layers if calls else 0
    assert len(calls) == (layers * batches if ARCHITECTURES[model_type].mlp_tail is not None else 0)
    assert (batches > 0) == (ARCHITECTURES[model_type].mlp_tail is not None)
    monkeypatch.setattr(layer, "ATTENTION_OUTPUT_BYTES", 0)
    calls.clear()
    again = run("again")
    assert calls == []  # attention ran again for every batch
    assert sorted(kept.names()) == sorted(again.names())
    for n in kept.names():
        assert torch.equal(kept.tensor(n), again.tensor(n)), n


@pytest.mark.parametrize("model_type", MOE_NAMES)
def test_gathering_the_residuals_routed_rows_and_scaling_them_gives_the_same_bytes(tiny_model, text_file, tmp_path,
                                                                                   monkeypatch, model_type):
    """A gather pass copies each expert's rows of the residual after attention and scales them as the post-attention
    norm does, with each token's scale made once per layer (LayerStream.norm_scales), instead of norming every batch
    of both streams again: the export is byte for byte the one made by norming. Every row whose MoE block is fed by
    an RMSNorm of transformers' form takes it; PhiMoE's norm is a LayerNorm, Qwen3-Next's and Qwen3.5's multiply by 1 + weight,
    and GraniteMoE has no mlp_tail."""
    from quantmoe.model import stream

    src = tiny_model(model_type)
    made = spy_taken(monkeypatch, stream.LayerStream, "norm_scales")

    def run(name: str) -> Checkpoint:
        quantmoe.quantize(src, tmp_path / name, QCFG, calib=text_file, nsamples=4, seqlen=32, run_eval=False,
                          quiet=True)
        return Checkpoint(tmp_path / name)

    scaled = run("scaled")
    takes = ARCHITECTURES[model_type].mlp_tail is not None and model_type not in ("phimoe", "qwen3_next",
                                                                                          "qwen3_5_moe_text")
    assert made and all(made) if takes else not any(made)
    monkeypatch.setattr(stream.LayerStream, "norm_scales", lambda self, *a: None)
    normed = run("normed")
    assert sorted(scaled.names()) == sorted(normed.names())
    for n in scaled.names():
        assert torch.equal(scaled.tensor(n), normed.tensor(n)), n


def test_norm_scales_make_the_norms_bits_for_any_rows_and_refuse_a_norm_of_another_form(tiny_model):
    """LayerStream.norm_scales and norm_rows: any rows of the residual, scaled, are the norm's output for them bit
    for bit; a norm with the same attributes but another formula (Gemma's 1 + weight), or bf16 activations, get
    None, and the caller norms every batch itself."""
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    from quantmoe.model.stream import Batch

    stream = LayerStream(Checkpoint(tiny_model("mixtral")), torch.device("cpu"))
    C = 64
    gen = torch.Generator().manual_seed(0)

    class Gemma(MixtralRMSNorm):
        def forward(self, h):
            return (1.0 + self.weight) * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def layer(norm: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(C, generator=gen))
        module = torch.nn.Module()
        module.post_attention_layernorm = norm
        return module

    batches = [Batch(torch.randn(2, 16, C, generator=gen) * 3, {}) for _ in range(3)]
    rms = layer(MixtralRMSNorm(C, eps=1e-6))
    scales = stream.norm_scales(rms, batches)
    assert scales is not None and [s.shape for s in scales] == [(32, 1)] * 3
    rows = torch.tensor([30, 2, 2, 17, 0])
    for b, s in zip(batches, scales):
        h = b.hidden.reshape(-1, C)
        expected = rms.post_attention_layernorm(b.hidden).reshape(-1, C)[rows]
        assert torch.equal(stream.norm_rows(rms, h[rows].clone(), s[rows]), expected)
    assert stream.norm_scales(layer(Gemma(C, eps=1e-6)), batches) is None
    assert stream.norm_scales(rms, [Batch(b.hidden.bfloat16(), {}) for b in batches]) is None


def test_input_narrower_than_a_group_is_one_group(quantized):
    """DeepSeek-V3's q_b_proj/kv_b_proj read 16 features < group size 32: one group, logged, packed, reloaded."""
    _, out, summary = quantized("deepseek_v3")
    export = Checkpoint(out)
    narrow = ("self_attn.q_b_proj", "self_attn.kv_b_proj")
    for i in range(export.config.num_hidden_layers):
        for lin in narrow:
            module = f"model.layers.{i}.{lin}"
            cols = export.shape(f"{module}.g_idx")[0]
            rows = export.shape(f"{module}.scales")[1]
            assert cols == 16
            assert export.shape(f"{module}.scales") == (1, rows)
            assert export.shape(f"{module}.qzeros") == (1, rows * 4 // 32)
            assert export.shape(f"{module}.qweight") == (cols * 4 // 32, rows)
            assert torch.equal(export.tensor(f"{module}.g_idx"), torch.zeros(cols, dtype=torch.int32))
    log = json.loads((out / "quantization_log.json").read_text())
    for lin in narrow:
        assert any(lin in note and "one group spans the input" in note for note in log["notes"]), log["notes"]
        entries = [m for layer in log["layers"] for m in layer["modules"] if m["module"].endswith(lin)]
        assert entries and all(m["groups"] == 1 for m in entries)
    assert summary["notes"] == log["notes"]
    wide = [m for layer in log["layers"] for m in layer["modules"] if m["module"].endswith("self_attn.o_proj")]
    assert all(m["groups"] == 2 for m in wide)  # 64 inputs at group size 32


@pytest.mark.parametrize("model_type", ARCH_NAMES)
def test_inspect_estimate_is_what_the_export_measures(quantized, model_type):
    src, out, _ = quantized(model_type)
    report = inspect_model(src, bits=4, group_size=32)
    stats = checkpoint_stats(out)
    totals = report["totals"]
    assert totals["quantized_parameters"] == stats["quantized_weights"]
    assert totals["parameters"] == stats["total_parameters"]
    assert totals["bits_per_weight"] == pytest.approx(stats["bits_per_weight"], rel=1e-12)
    # Symmetric int4 at group size 32 carries 4 bits and an fp16 scale per 32 weights; the g_idx
    # (c // 32) and the constant zero points are stored for the loaders but say nothing new.
    linears = Checkpoint(out).quantized_linears.values()
    information = sum(4 * r * c + 16 * r * -(-c // 32) for r, c in (lin.shape for lin in linears))
    assert stats["information_bits_per_weight"] == pytest.approx(information / stats["quantized_weights"])
    assert stats["bits_per_weight"] > stats["information_bits_per_weight"]
    export = Checkpoint(out)
    tensor_bytes = sum(export.tensor(n).numel() * export.tensor(n).element_size() for n in export.names())
    assert totals["estimated_bytes"] == tensor_bytes
    classes = report["classes"]
    assert classes["attention"]["quantized_parameters"] > 0
    assert ("routed expert" in classes) == (ARCHITECTURES[model_type].experts is not None)
    assert classes["not quantized"]["quantized_parameters"] == 0


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_inspect_foresees_what_quantize_holds_on_disk_at_its_peak(quantized, tmp_path, monkeypatch, text_file,
                                                                  model_type):
    """The export and, until it is in place, every layer's file in the work folder: inspect's estimate is the
    export's tensor bytes plus those of the layer files of a run stopped once its last layer is written."""
    from clirun import Stop, stopped_after_layer
    from safetensors import safe_open

    src, out, _ = quantized(model_type)
    report = inspect_model(src, bits=4, group_size=32)
    stopped = tmp_path / "out"
    with stopped_after_layer(monkeypatch, Checkpoint(src).config.num_hidden_layers - 1), pytest.raises(Stop):
        quantmoe.quantize(src, stopped, QCFG, calib=text_file, nsamples=4, seqlen=32, run_eval=False, quiet=True)
    layer_bytes = 0
    for file in (work_dir(stopped) / "layers").glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            layer_bytes += sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys())
    assert report["totals"]["quantize_disk_bytes"] == report["totals"]["estimated_bytes"] + layer_bytes > 0
    assert "quantize holds" in CliRunner().invoke(main, ["inspect", str(src)]).output


def test_inspect_deepseek_v3_classifies_router_bias_shared_experts_and_dense_layer(tiny_model):
    src = tiny_model("deepseek_v3")
    result = CliRunner().invoke(main, ["inspect", str(src), "--json", "--group-size", "32"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    rows = {e["pattern"]: e for e in report["tensors"]}

    def row(rel: str) -> dict:
        return rows[f"model.layers.{{i}}.{rel}"]

    assert report["dense_layers"] == [0] and report["moe_layers"] == [1, 2]
    for rel in ("mlp.gate.weight", "mlp.gate.e_score_correction_bias"):
        assert (row(rel)["cls"], row(rel)["layers"], row(rel)["quantized_parameters"]) == ("router", [1, 2], 0)
    assert row("mlp.gate.e_score_correction_bias")["dtype"] == "F32"
    for w in ("gate_proj", "up_proj", "down_proj"):
        assert (row(f"mlp.shared_experts.{w}.weight")["cls"], row(f"mlp.shared_experts.{w}.weight")["layers"]) == \
            ("shared expert", [1, 2])
        assert (row(f"mlp.{w}.weight")["cls"], row(f"mlp.{w}.weight")["layers"]) == ("dense MLP", [0])
        experts = row(f"mlp.experts.{{e}}.{w}.weight")
        assert (experts["cls"], experts["layers"], experts["tensors"]) == ("routed expert", [1, 2], 16)
    for lin in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        assert row(f"self_attn.{lin}.weight")["cls"] == "attention"
    for norm in ("self_attn.q_a_layernorm.weight", "self_attn.kv_a_layernorm.weight", "input_layernorm.weight"):
        assert row(norm)["cls"] == "not quantized"
    assert rows["model.embed_tokens.weight"]["cls"] == rows["lm_head.weight"]["cls"] == "not quantized"
    assert set(report["classes"]) == {"attention", "routed expert", "shared expert", "dense MLP", "router",
                                      "not quantized"}
    listing = CliRunner().invoke(main, ["inspect", str(src)]).output
    assert re.search(r"model\.layers\.\{i\}\.mlp\.gate\.e_score_correction_bias\s+router\s+1-2\s", listing), listing
    assert re.search(r"model\.layers\.\{i\}\.mlp\.gate_proj\.weight\s+dense MLP\s+0\s", listing), listing
    assert re.search(r"model\.layers\.\{i\}\.mlp\.shared_experts\.down_proj\.weight\s+shared expert\s+1-2\s",
                     listing)
    assert "estimate at int4 g128" in listing


def test_inspect_counts_layers_beyond_num_hidden_layers_as_exported_unless_dropped(tiny_model, tmp_path):
    """DeepSeek-V3's Hub checkpoint carries its multi-token-prediction layer after the last decoder layer;
    the export keeps it unquantized (--mtp keep) or leaves it out (--mtp drop)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "with-mtp"
    shutil.copytree(tiny_model("deepseek_v3"), folder)
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.startswith("model.layers.2.")]:
        tensors["model.layers.3." + name[len("model.layers.2."):]] = tensors[name].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    plain = inspect_model(tiny_model("deepseek_v3"), group_size=32)
    for mtp, cls in (("keep", "multi-token prediction"), ("drop", "not exported")):
        report = inspect_model(folder, group_size=32, mtp=mtp)
        extra = [e for e in report["tensors"] if e["cls"] == cls]
        assert extra and all(e["layers"] == [3] for e in extra)
        assert any(e["pattern"] == "model.layers.{i}.mlp.experts.{e}.gate_proj.weight" for e in extra)
        added = sum(e["bytes"] for e in extra) if mtp == "keep" else 0  # unquantized, as stored
        assert report["classes"][cls]["estimated_bytes"] == added
        assert report["totals"]["estimated_bytes"] == plain["totals"]["estimated_bytes"] + added
        assert report["totals"]["quantized_parameters"] == plain["totals"]["quantized_parameters"]


def test_inspect_reads_only_headers(tiny_model, monkeypatch):
    def no_weights(self, name):
        raise AssertionError(f"inspect read the weights of {name}")

    monkeypatch.setattr(Checkpoint, "tensor", no_weights)
    assert inspect_model(tiny_model("granitemoe"))["classes"]["routed expert"]["quantized_parameters"] > 0


@pytest.mark.parametrize("command", [["inspect"], ["quantize", "--no-eval", "--quiet"]])
def test_unsupported_model_type_is_a_one_line_error(tmp_path, command):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    make_tokenizer(folder)
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(folder)
    args = [*command, str(folder)] + (["--out", str(tmp_path / "out")] if command[0] == "quantize" else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unsupported architecture 'gpt2'; supported: ")
    assert all(name in lines[0] for name in ARCHITECTURES)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["inspect"], ["quantize", "--no-eval", "--quiet"]])
def test_layer_kinds_a_row_does_not_know_are_a_one_line_error(tmp_path, command):
    """A config whose per-layer list names a kind of layer the row does not describe is refused before any work."""
    from tiny import make_model

    folder = make_model("glm_moe_dsa", tmp_path / "glm", indexer_types=["full", "windowed", "full"])
    args = [*command, str(folder)] + (["--out", str(tmp_path / "out")] if command[0] == "quantize" else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: this glm_moe_dsa model's config.json gives layers the "
                                                   "indexer_types ['windowed'], which quantmoe cannot quantize yet")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["full", [["full"]], [1, 2], {"0": "full"}])
def test_a_per_layer_list_of_kinds_that_is_not_a_list_of_strings_is_a_one_line_error(tiny_model, tmp_path, value):
    """indexer_types (and layer_types) are read before transformers builds anything: a config.json that holds a
    string, nested lists, numbers or an object there is refused with one line naming the key, nothing written."""
    import shutil

    folder = tmp_path / "glm"
    shutil.copytree(tiny_model("glm_moe_dsa"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "indexer_types": value}))
    result = CliRunner().invoke(main, ["quantize", str(folder), "--out", str(tmp_path / "out"), "--no-eval", "--quiet"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "indexer_types = " in lines[0] and "is not a list of kinds of layer (strings)" in lines[0]
    assert not (tmp_path / "out").exists()


def test_glm_layers_that_reuse_an_earlier_layers_keys(tmp_path, text_file):
    """GLM-5.2's layers of indexer_types "shared" (from index_topk_freq) have no indexer and attend to the keys an
    earlier layer's indexer chose: their plan quantizes MLA alone; streamed with every key (windows no longer than
    index_topk), the layers compute what transformers computes; the export holds no indexer for them, and a window
    longer than index_topk is refused with one error line before any work."""
    from tiny import make_model

    src = make_model("glm_moe_dsa", tmp_path / "glm", num_hidden_layers=4, index_topk_freq=2, index_skip_topk_offset=1,
                     index_topk=32)
    ckpt = Checkpoint(src)
    assert list(ckpt.config.indexer_types) == ["full", "shared", "full", "shared"]
    arch = ARCHITECTURES["glm_moe_dsa"]
    for i, shared in enumerate((False, True, False, True)):
        linears = plan_layer(arch, ckpt.config, i).quantized_linears()
        assert ("self_attn.indexer.wq_b" in linears) is not shared and "self_attn.q_b_proj" in linears, i
        assert any(n.startswith("self_attn.indexer.") for n in ckpt.layer_shapes(i)) is not shared, i
    ids, _ = eval_windows(ckpt.tokenizer(), text_file, 32)
    stream = LayerStream(ckpt, torch.device("cpu"))
    batches = stream.embed(ids[:2], 2)
    with torch.no_grad():
        for i in range(stream.num_layers):
            batches = stream.run_layer(stream.load_layer(i, stream.layer_state(i)), batches)
            stream.release_layer(i)
        stream.load_head()
        torch.testing.assert_close(stream.logits(batches[0].hidden), _reference(src)(ids[:2]).logits, rtol=1e-4,
                                   atol=1e-4)
    out = tmp_path / "out"
    quantmoe.quantize(src, out, QCFG, calib=text_file, nsamples=4, seqlen=32, run_eval=False, quiet=True)
    exported = Checkpoint(out)
    for i, shared in enumerate((False, True, False, True)):
        indexer = [n for n in exported.names(f"model.layers.{i}.self_attn.indexer.")]
        assert (not indexer) if shared else f"model.layers.{i}.self_attn.indexer.wq_b.qweight" in indexer, i
    result = CliRunner().invoke(main, ["quantize", str(src), "--out", str(tmp_path / "long"), "--calib", str(text_file),
                                       "--nsamples", "2", "--seqlen", "33", "--no-eval", "--quiet"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: this model's layers that reuse an earlier layer's choice "
                                                   "of keys") and "use --seqlen 32 or less (not 33)" in lines[0]
    assert not (tmp_path / "long").exists() and not work_dir(tmp_path / "long").exists()  # refused before any work
    with pytest.raises(QuantMoeError, match=r"use --seqlen 32 or less \(not 33\)"):  # the stream, for eval and resume
        LayerStream(ckpt, torch.device("cpu")).embed(torch.zeros(1, 33, dtype=torch.long), 1)


def test_gptqmodel_layout_is_refused_where_gptqmodel_names_experts_otherwise(tiny_model, tmp_path):
    rows = [n for n in ARCH_NAMES if not ARCHITECTURES[n].gptqmodel]
    # GraniteMoE: experts named otherwise; GLM: GPTQModel's forward fails; Qwen3-VL-MoE's language model: not tried
    assert rows == ["glm4_moe", "granitemoe", "qwen3_vl_moe_text"]
    for row in rows:
        result = CliRunner().invoke(main, ["quantize", str(tiny_model(row)), "--out", str(tmp_path / row),
                                           "--layout", "gptqmodel", "--no-eval", "--quiet"])
        assert result.exit_code == 2
        assert result.output.strip() == (f"error: --layout gptqmodel is not available for {row} (GPTQModel is not "
                                         "known to load this family's experts as quantmoe writes them); use --layout source "
                                         "(see docs/interop.md)")


def test_docs_table_is_generated_from_the_code():
    doc = DOCS.read_text()
    start, end = "<!-- architectures table: start -->\n", "<!-- architectures table: end -->"
    assert start in doc and end in doc
    table = doc[doc.index(start) + len(start):doc.index(end)]
    assert table == markdown_table(), "docs/architectures.md is stale: paste quantmoe.model.architectures.markdown_table()"
