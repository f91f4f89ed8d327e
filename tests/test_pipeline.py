"""End-to-end quantize -> export -> eval on tiny models, one run per architecture row."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from conftest import ARCH_NAMES
from tiny import TINY, transformers_lm, upcast_to_fp32

import quantmoe
from quantmoe.base.errors import QuantMoeError
from quantmoe.base.options import QuantConfig
from quantmoe.formats.gptq_v1 import GPTQ_SUFFIXES, dequantize_linear
from quantmoe.model.architectures import ARCHITECTURES, plan_layer
from quantmoe.model.checkpoint import Checkpoint
from quantmoe.model.stream import LayerStream
from quantmoe.stages import experts as experts_module
from quantmoe.stages import export as export_module
from quantmoe.stages import layer as layer_module
from quantmoe.stages import quantize as pipeline_module
from quantmoe.stages.experts import TAIL_COPIES, tail_by_expert
from quantmoe.stages.layer import LayerQuantizer
from quantmoe.stages.quantize import work_dir

QCFG = QuantConfig(group_size=32)


def test_every_architecture_has_a_tiny_config():
    assert set(ARCHITECTURES) <= set(TINY)


@pytest.fixture(scope="module")
def exported(tiny_model, text_file, tmp_path_factory):
    """model_type -> (source folder, export folder, summary), quantized once per module."""
    cache = {}

    def run(model_type):
        if model_type not in cache:
            src = tiny_model(model_type)
            out = tmp_path_factory.mktemp("out") / model_type
            summary = quantmoe.quantize(src, out, QCFG, calib=text_file, nsamples=8, seqlen=64, eval_data=text_file,
                                        quiet=True)
            cache[model_type] = (src, out, summary)
        return cache[model_type]

    return run


def _tensors(folder):
    ckpt = Checkpoint(folder)
    return ckpt, set(ckpt.names())


@pytest.mark.parametrize("model_type", ARCH_NAMES)
def test_routers_untouched_and_every_projection_quantized(exported, model_type):
    src, out, _ = exported(model_type)
    source, q = Checkpoint(src), Checkpoint(out)
    arch = ARCHITECTURES[model_type]
    names = set(q.names())
    for i in range(source.config.num_hidden_layers):
        plan = plan_layer(arch, source.config, i)
        prefix = f"model.layers.{i}."
        for router in plan.routers:
            router_tensors = [n for n in names if n.startswith(prefix + router + ".")]
            assert router_tensors, f"{router} missing from the export"
            for n in router_tensors:
                assert not n.endswith(GPTQ_SUFFIXES), f"router tensor {n} was quantized"
                assert torch.equal(q.tensor(n), source.tensor(n)), f"router tensor {n} changed"
        linears = plan.quantized_linears()
        assert linears
        if plan.experts is not None:
            assert any(plan.experts.gate in n for n in linears)  # the expert gate projection is quantized
        for lin in linears:
            for suffix in GPTQ_SUFFIXES:
                assert prefix + lin + "." + suffix in names, f"{lin} not quantized"
            assert prefix + lin + ".weight" not in names
    # Nothing else was quantized: every qweight belongs to a planned linear.
    planned = {f"model.layers.{i}.{lin}" for i in range(source.config.num_hidden_layers)
               for lin in plan_layer(arch, source.config, i).quantized_linears()}
    assert {n.rsplit(".", 1)[0] for n in names if n.endswith(".qweight")} == planned


@pytest.mark.parametrize("model_type", ARCH_NAMES)
def test_gptq_tensor_shapes(exported, model_type):
    src, out, _ = exported(model_type)
    source, q = Checkpoint(src), Checkpoint(out)
    shapes = {}  # (out, in) of every planned linear; cut out of fused tensors where the source fuses experts
    for i in range(source.config.num_hidden_layers):
        prefix = source.layer_prefix(i)
        layer = {n[len(prefix):]: source.shape(n) for n in source.names(prefix)}
        plan = plan_layer(ARCHITECTURES[model_type], source.config, i)
        shapes.update({prefix + lin: shape for lin, shape in plan.linear_shapes(layer).items()})
    for name in q.names():
        if not name.endswith(".qweight"):
            continue
        module = name[: -len(".qweight")]
        rows, cols = shapes[module]
        groups = -(-cols // 32)
        assert q.shape(module + ".qweight") == (cols * 4 // 32, rows)
        assert q.shape(module + ".qzeros") == (groups, rows * 4 // 32)
        assert q.shape(module + ".scales") == (groups, rows)
        assert q.shape(module + ".g_idx") == (cols,)
        assert q.tensor(module + ".scales").dtype == torch.float16


@pytest.mark.parametrize("model_type", ARCH_NAMES)
def test_configs_and_report(exported, model_type):
    src, out, summary = exported(model_type)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc == json.loads((out / "quantize_config.json").read_text())
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["checkpoint_format"]) == ("gptq", 4, 32, True, "gptq")
    source = Checkpoint(src)
    routers = [f"model.layers.{i}.{r}" for i in range(source.config.num_hidden_layers)
               for r in plan_layer(ARCHITECTURES[model_type], source.config, i).routers]
    assert qc["modules_not_quantized"] == routers  # the row's routers by exact path (none in a dense model)
    for name in ("model.safetensors.index.json", "tokenizer.json", "README.md", "quantization_log.json",
                 "manifest.json", "eval_report.json", "eval_report.md"):
        assert (out / name).is_file(), name
    report = json.loads((out / "eval_report.json").read_text())
    orig, quant = report["results"]["original"]["perplexity"], report["results"]["quantized"]["perplexity"]
    assert report["gap"]["relative"] == pytest.approx((quant - orig) / orig)
    assert 0 < report["gap"]["relative_se"] < 0.1
    assert not any("window_nll" in r for r in report["results"].values())  # used for the gap's error, not kept
    assert 4.0 < report["quantization"]["bits_per_weight"] < 5.2
    assert 0.5 < report["quantization"]["fraction_quantized"] < 1.0
    assert report["protocol"]["seqlen"] == 256 and report["data"]["tokens_scored"] == report["data"]["windows"] * 255
    assert set(report["stages"]) >= {"calibrate", "quantize", "export", "eval_original", "eval_quantized"}
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert stages["manifest"]["seconds"] >= 0  # the hashing, timed
    # The export ran beside the layers: its stage is what it took after them, with its whole time beside them
    export = stages["export"]
    assert 0 <= export["waiting_seconds"] <= export["background_seconds"] and export["seconds"] >= 0
    assert "| export (after the layers; " in (out / "eval_report.md").read_text()
    log = json.loads((out / "quantization_log.json").read_text())
    modules = [m for layer in log["layers"] for m in layer["modules"]]
    assert all(m["loss"] >= 0 and m["tokens"] >= 0 and m["seconds"] >= 0 for m in modules)
    card = (out / "README.md").read_text()
    assert "perplexity" in card.lower()
    # transformers runs a dense export's GPTQ linears, never a MoE export's fused experts quantized: the card says so
    transformers = card[card.index("### transformers"):card.index("### GPTQModel")]
    moe = ARCHITECTURES[model_type].experts is not None
    assert ("does not run this checkpoint's routed experts quantized" in transformers) == moe
    assert ("AutoModelForCausalLM.from_pretrained" in transformers) != moe
    assert not list(out.parent.glob(f".{out.name}.quantmoe-work"))  # the work folder is cleaned up


@pytest.mark.parametrize("model_type", ARCH_NAMES)
def test_export_dequantizes_to_exactly_the_gptq_result(tiny_model, text_file, model_type):
    """The packed tensors of a layer stand for exactly the weights GPTQ computed and the pipeline ran with."""
    from quantmoe.stages.calibrate import build_calibration

    ckpt = Checkpoint(tiny_model(model_type))
    stream = LayerStream(ckpt, torch.device("cpu"))
    ids, _ = build_calibration(ckpt.tokenizer(), text_file, 4, 32, 0)
    index = stream.num_layers - 1
    batches = stream.embed(ids, 4)
    lq = LayerQuantizer(stream, index, batches, QCFG)
    lq.attention()
    lq.mlps()
    memory = {k: v.clone() for k, v in lq.layer.state_dict().items()}
    packed = lq.result.tensors
    prefix = f"model.layers.{index}."
    weights = {}
    for name in {n.rsplit(".", 1)[0] for n in packed}:
        parts = {s: packed[f"{name}.{s}"] for s in GPTQ_SUFFIXES}
        weights[name[len(prefix):] + ".weight"] = dequantize_linear(parts, 4)
    state = {**stream.layer_state(index), **weights}
    expected = stream.to_memory(index, state)
    for key, value in memory.items():
        assert torch.equal(value, expected[key].to(value.dtype)), key


@pytest.mark.parametrize("model_type", [n for n in ARCH_NAMES if ARCHITECTURES[n].experts is not None
                                        and ARCHITECTURES[n].mlp_tail is not None])
@pytest.mark.parametrize("quantized", [True, False])
def test_the_experts_run_expert_by_expert_give_the_batch_by_batch_tail_to_rounding(tiny_model, text_file, model_type,
                                                                                  quantized, monkeypatch):
    """The layer's outputs with each expert run once per chunk of batches (the experts' calls recorded, then
    run expert by expert over all their rows) are run_tail's, batch by batch: exactly when each product
    covers one batch's rows, and to within a few fp32 roundings when it covers two or all (a product over
    more rows may round differently). For a given product size the bits are the same whatever the budget
    makes the chunks (one product's batches, two products', all), with the quantized experts and the originals."""
    from quantmoe.stages.calibrate import build_calibration

    ckpt = Checkpoint(tiny_model(model_type))
    stream = LayerStream(ckpt, torch.device("cpu"))
    ids, _ = build_calibration(ckpt.tokenizer(), text_file, 8, 32, 0)
    index = stream.num_layers - 1
    lq = LayerQuantizer(stream, index, stream.embed(ids, 2), QCFG)
    lq.attention()
    lq.mlps()
    assert lq.residual and len(lq.batches) == 4
    store = lq.layer.get_submodule(lq.plan.fused.module)
    store.use_quantized = quantized
    expected = stream.run_tail(lq.layer, [type(b)(b.hidden.clone(), b.kwargs) for b in lq.batches])
    one = TAIL_COPIES * lq.batches[0].hidden.numel() * 4  # what one batch of a chunk takes
    extra = experts_module.PRODUCT_BYTES + store.weight_bytes
    for per_product in (1, 2, 4):
        monkeypatch.setattr(experts_module, "TAIL_PRODUCT_BYTES", per_product * one)
        outputs = []
        for chunk in (1, 2, None):  # chunks of one product's batches, two products', all
            budget = None if chunk is None else extra + chunk * per_product * one
            got = tail_by_expert(stream, lq.layer, lq.plan.fused.module,
                                 [type(b)(b.hidden.clone(), b.kwargs) for b in lq.batches], lq.ranks, budget)
            outputs.append(torch.cat([g.hidden for g in got]))
        assert all(torch.equal(o, outputs[0]) for o in outputs), per_product  # the budget changes no bit
        want = torch.cat([e.hidden for e in expected])
        if per_product == 1:  # one batch per product is run_tail's own computation
            assert torch.equal(outputs[0], want)
        assert (outputs[0] - want).abs().amax() <= 4 * torch.finfo(torch.float32).eps * want.abs().amax()
    assert not torch.equal(expected[0].hidden, lq.batches[0].hidden)  # the tail did change the residual


@pytest.mark.parametrize("model_type", [n for n in ARCH_NAMES if ARCHITECTURES[n].experts is not None])
def test_expert_with_zero_tokens_is_quantized_finite_and_nonzero(tiny_model, text_file, tmp_path, monkeypatch, model_type):
    original_route = LayerQuantizer.route

    def starve_expert_0(self, X):
        return original_route(self, X).first(0, 0)

    monkeypatch.setattr(LayerQuantizer, "route", starve_expert_0)
    out = tmp_path / "out"
    summary = quantmoe.quantize(tiny_model(model_type), out, QCFG, calib=text_file, nsamples=4, seqlen=32,
                                run_eval=False, quiet=True)
    starved = [f for f in summary["fallbacks"] if ".experts.0." in f["module"]]
    assert starved and all("0 routed tokens" in f["fallback"] for f in starved)
    q = Checkpoint(out)
    arch = ARCHITECTURES[model_type]
    for i in range(q.config.num_hidden_layers):
        plan = plan_layer(arch, q.config, i)
        if plan.experts is None:
            continue
        for w in ("gate", "up", "down"):
            module = f"model.layers.{i}.{plan.experts.linear(w, 0)}"
            W = dequantize_linear({s: q.tensor(f"{module}.{s}") for s in GPTQ_SUFFIXES}, 4)
            assert torch.isfinite(W).all() and W.abs().sum() > 0, module


@pytest.mark.parametrize("model_type", ARCH_NAMES)
def test_fused_gate_up_order_matches_disk(tiny_model, model_type):
    """transformers' own loader and quantmoe's agree on how experts are fused (gate rows first)."""
    src = tiny_model(model_type)
    reference = transformers_lm(src).state_dict()
    stream = LayerStream(Checkpoint(src), torch.device("cpu"))
    for i in range(stream.num_layers):
        for key, value in stream.to_memory(i, stream.layer_state(i)).items():
            assert torch.equal(value, reference[f"model.layers.{i}.{key}"]), key


@pytest.mark.parametrize("model_type", ARCH_NAMES)
def test_streamed_perplexity_matches_transformers(tiny_model, text_file, model_type):
    from quantmoe.stages.evaluate import eval_windows, perplexity

    src = tiny_model(model_type)
    windows, _ = eval_windows(Checkpoint(src).tokenizer(), text_file, 64)
    ours = perplexity(src, windows[:6], "cpu")["perplexity"]
    model = transformers_lm(src)
    with torch.no_grad():
        loss = model(windows[:6], labels=windows[:6]).loss
    assert ours == pytest.approx(float(torch.exp(loss)), rel=1e-4)


def test_the_gaps_standard_error_is_over_windows_paired(exported, text_file):
    """The report's ± on the gap: the standard error of the mean per-window NLL difference between
    the two models on the same windows, scaled to the relative gap; and per-window NLLs that
    average to the perplexity's own mean NLL."""
    import math

    from quantmoe.stages.evaluate import eval_windows, paired_se, perplexity

    src, out, _ = exported("mixtral")
    report = json.loads((out / "eval_report.json").read_text())
    windows, _ = eval_windows(Checkpoint(src).tokenizer(), text_file, report["protocol"]["seqlen"])
    o, q = perplexity(src, windows, "cpu"), perplexity(out, windows, "cpu")
    for r in (o, q):
        assert len(r["window_nll"]) == windows.shape[0]
        assert sum(r["window_nll"]) / windows.shape[0] == pytest.approx(r["mean_nll"], rel=1e-6)
    d = torch.tensor(q["window_nll"], dtype=torch.float64) - torch.tensor(o["window_nll"], dtype=torch.float64)
    expected = math.exp(float(d.mean())) * float(d.std()) / math.sqrt(d.numel())
    assert report["gap"]["relative_se"] == pytest.approx(expected, rel=1e-6)
    assert paired_se(q["window_nll"], o["window_nll"]) == pytest.approx(float(d.std()) / math.sqrt(d.numel()))
    # Paired: a constant shift of every window has no error; unpaired it would.
    assert paired_se([v + 0.01 for v in o["window_nll"]], o["window_nll"]) == pytest.approx(0, abs=1e-12)
    assert "± " in (out / "eval_report.md").read_text()


def test_the_reports_kl_is_the_full_vocabulary_kl_to_the_original(exported, text_file):
    """The report's KL(original || quantized), computed by the streamed evaluator from the original's kept
    last hidden states, is the one transformers' own forward passes give (the quantized model loaded
    dequantized); a model's KL to itself is 0 with every top token the same."""
    from transformers import AutoModelForCausalLM

    from quantmoe.stages.evaluate import eval_windows, perplexity

    src, out, _ = exported("mixtral")
    report = json.loads((out / "eval_report.json").read_text())
    windows, _ = eval_windows(Checkpoint(src).tokenizer(), text_file, report["protocol"]["seqlen"])
    with torch.no_grad():
        lp0 = torch.log_softmax(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(windows).logits[:, :-1], -1)
        lp1 = torch.log_softmax(quantmoe.load_quantized(out, dtype=torch.float32)(windows).logits[:, :-1], -1)
    kl = (lp0.exp() * (lp0 - lp1)).sum(-1)
    assert float(kl.mean()) > 1e-6  # int4 moves the predictions (a random tiny model: little): 0 would be a bug
    assert report["kl"]["mean"] == pytest.approx(float(kl.mean()), rel=1e-3)
    assert report["kl"]["se"] == pytest.approx(float(kl.mean(1).double().std()) / windows.shape[0] ** 0.5, rel=1e-2)
    assert report["kl"]["top1_agreement"] == pytest.approx(float((lp0.argmax(-1) == lp1.argmax(-1)).float().mean()),
                                                           abs=1.5 / lp0[..., 0].numel())
    assert "KL(original ‖ quantized)" in (out / "eval_report.md").read_text()
    own = perplexity(src, windows, "cpu", keep_reference=True)
    itself = perplexity(src, windows, "cpu", reference=own["reference"])
    assert max(itself["window_kl"]) == pytest.approx(0, abs=1e-6) and itself["top1_agreement"] == 1.0


@pytest.mark.parametrize("model_type", ARCH_NAMES)
def test_load_quantized_generates_and_matches_streamed_eval(exported, text_file, model_type):
    from quantmoe.stages.evaluate import eval_windows, perplexity

    _, out, _ = exported(model_type)
    model = quantmoe.load_quantized(out)
    windows, _ = eval_windows(Checkpoint(out).tokenizer(), text_file, 64)
    with torch.no_grad():
        loss = model(windows[:4], labels=windows[:4]).loss
    assert float(torch.exp(loss)) == pytest.approx(perplexity(out, windows[:4], "cpu")["perplexity"], rel=1e-4)
    generated = model.generate(windows[:1, :8], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 13)


@pytest.mark.parametrize("model_type,options", [
    ("qwen2_moe", {"fit": "stream"}),
    ("qwen2_moe", {"fit": "layer", "expert_hessian": "all", "refine": 1}),
    ("mixtral", {"fit": "none", "expert_hessian": "routed", "act_order": "group", "clip_steps": 0}),
    ("deepseek_v3", {"fit": "stream", "clip_weight": "hessian"}),
])
def test_recipe_options_export_exactly_what_the_layer_runs_with(tiny_model, text_file, model_type, options):
    """Every fit, expert Hessian, order and refine option: the packed tensors stand for exactly the
    weights the quantized layer holds, and under --fit stream the full-precision stream is the
    original layer's output."""
    from quantmoe.stages.calibrate import build_calibration

    ckpt = Checkpoint(tiny_model(model_type))
    stream = LayerStream(ckpt, torch.device("cpu"))
    ids, _ = build_calibration(ckpt.tokenizer(), text_file, 4, 32, 0)
    index = stream.num_layers - 1
    batches = stream.embed(ids, 4)
    qcfg = QuantConfig(group_size=32, **options)
    originals = [type(b)(b.hidden + 0.01, b.kwargs) for b in batches] if qcfg.fit == "stream" else None
    expected_original = None
    if originals is not None:
        layer = stream.load_layer(index, stream.layer_state(index))
        expected_original = stream.run_layer(layer, originals)
        stream.release_layer(index)
    lq = LayerQuantizer(stream, index, batches, qcfg,
                        original_batches=batches if qcfg.fit == "layer" else originals)
    lq.attention()
    lq.mlps()
    memory = {k: v.clone() for k, v in lq.layer.state_dict().items()}
    if lq.plan.experts is not None:  # StoredExperts: originals kept as stored (fp16 here), the quantized weights as levels
        store = lq.layer.get_submodule(lq.plan.fused.module)
        assert store.gate_up.dtype == store.down.dtype == torch.float16 and store.use_quantized
        fused = f"{lq.plan.fused.module}.{{}}"
        memory[fused.format(lq.plan.fused.gate_up)] = torch.stack([store.weights(e, True)[0] for e in range(store.num_experts)])
        memory[fused.format(lq.plan.fused.down)] = torch.stack([store.weights(e, True)[1] for e in range(store.num_experts)])
    prefix = f"model.layers.{index}."
    weights = {}
    for name in {n.rsplit(".", 1)[0] for n in lq.result.tensors}:
        parts = {s: lq.result.tensors[f"{name}.{s}"] for s in GPTQ_SUFFIXES}
        weights[name[len(prefix):] + ".weight"] = dequantize_linear(parts, 4)
    expected = stream.to_memory(index, {**stream.layer_state(index), **weights})
    for key, value in memory.items():
        assert torch.isfinite(value).all(), key
        assert torch.equal(value, expected[key].to(value.dtype)), key
    if expected_original is not None:
        lq.outputs()
        for got, want in zip(lq.result.original_outputs, expected_original):
            assert torch.equal(got.hidden, want.hidden)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "mixtral"])
def test_with_the_mlp_kept_in_16_bits_both_streams_are_their_layers_outputs(tiny_model, text_file, tmp_path,
                                                                           model_type):
    """A recipe that quantizes attention only (every MLP kept in 16 bits, as some keep a dense first layer's):
    the quantized stream is the quantized layer's output, and under --fit stream the full-precision stream
    the original layer's, which its last attention capture had already turned into the residual after
    attention (it was run through attention a second time), in a dense layer and a MoE layer alike."""
    from quantmoe.stages.calibrate import build_calibration

    recipe = tmp_path / "attention-only.toml"
    recipe.write_text("".join(f'[[rules]]\nmatch = "class:{kind}"\nskip = true\n'
                              for kind in ("expert", "shared_expert", "dense_mlp")))
    ckpt = Checkpoint(tiny_model(model_type))
    stream = LayerStream(ckpt, torch.device("cpu"))
    ids, _ = build_calibration(ckpt.tokenizer(), text_file, 4, 32, 0)
    qcfg = QuantConfig(group_size=32, fit="stream", recipe=str(recipe))
    for index in (0, stream.num_layers - 1):
        batches = stream.embed(ids, 2)
        originals = [type(b)(b.hidden + 0.01, b.kwargs) for b in batches]
        layer = stream.load_layer(index, stream.layer_state(index))
        expected_original = stream.run_layer(layer, originals)
        stream.release_layer(index)
        lq = LayerQuantizer(stream, index, batches, qcfg, original_batches=originals)
        lq.attention()
        lq.mlps()
        assert lq.result.tensors and all(".self_attn." in n for n in lq.result.tensors)
        expected = stream.run_layer(lq.layer, [type(b)(b.hidden.clone(), b.kwargs) for b in batches])
        lq.outputs()
        for got, want in [*zip(lq.result.outputs, expected), *zip(lq.result.original_outputs, expected_original)]:
            # routed experts' products over two batches' rows: to within a few fp32 roundings (see above)
            assert (got.hidden - want.hidden).abs().amax() <= 4 * torch.finfo(torch.float32).eps * want.hidden.abs().amax()


@torch.no_grad()
def _final_hidden(folder, ids: torch.Tensor) -> torch.Tensor:
    stream = LayerStream(Checkpoint(folder), torch.device("cpu"))
    batches = stream.embed(ids, 4)
    for i in range(stream.num_layers):
        batches = stream.run_layer(stream.load_layer(i, stream.layer_state(i)), batches)
        stream.release_layer(i)
    return torch.cat([b.hidden for b in batches])


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_stream_fit_brings_the_output_closer_to_the_original(tiny_model, text_file, tmp_path, model_type):
    """The default --fit stream quantizes every linear towards the original model's outputs on the
    calibration tokens, so on those tokens the last hidden states must be closer to the original's
    than plain GPTQ's (--fit none), all else equal."""
    from quantmoe.stages.calibrate import build_calibration

    src = tiny_model(model_type)
    ids, _ = build_calibration(Checkpoint(src).tokenizer(), text_file, 8, 32, 0)
    original = _final_hidden(src, ids)
    errors = {}
    for fit in ("none", "stream"):
        out = tmp_path / fit
        quantmoe.quantize(src, out, QuantConfig(group_size=32, fit=fit), calib=text_file, nsamples=8, seqlen=32,
                          run_eval=False, quiet=True)
        errors[fit] = float((_final_hidden(out, ids) - original).pow(2).mean())
    assert 0 < errors["stream"] < 0.9 * errors["none"], errors


def test_rtn_backend_writes_the_same_format(tiny_model, text_file, tmp_path):
    out = tmp_path / "rtn"
    quantmoe.quantize(tiny_model("mixtral"), out, QuantConfig(backend="rtn", group_size=32), calib=text_file,
                      nsamples=4, seqlen=32, run_eval=False, quiet=True)
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["meta"]["backend"] == "rtn" and qc["bits"] == 4
    assert any(n.endswith(".qweight") for n in Checkpoint(out).names())


def test_unknown_architecture_is_a_one_line_error(tmp_path):
    from transformers import BertConfig

    from quantmoe.model.architectures import architecture_for

    with pytest.raises(QuantMoeError) as err:
        architecture_for(BertConfig())
    assert "unsupported architecture 'bert'" in str(err.value) and "mixtral" in str(err.value)
    assert "\n" not in str(err.value)


def test_fp32_attention_hook_leaves_cpu_and_half_precision_to_transformers():
    """quantmoe.model.stream.fp32_attention_without_scores changes transformers' GQA choice only for fp32 CUDA tensors."""
    from transformers.integrations import sdpa_attention

    from quantmoe.model.stream import fp32_attention_without_scores

    fp32_attention_without_scores()
    fp32_attention_without_scores()  # idempotent
    hook = sdpa_attention.use_gqa_in_sdpa
    assert getattr(hook, "quantmoe", False)
    k = torch.zeros(1, 2, 8, 16)
    assert hook(None, k, k) is True               # CPU fp32, no mask: transformers' own answer
    assert hook(None, k.half(), k.half()) is True
    assert hook(torch.zeros(1, 1, 8, 8), k, k) is False


@pytest.mark.parametrize("model_type", [name for name in ARCH_NAMES if ARCHITECTURES[name].mlp_tail is not None])
def test_mlp_tail_gives_the_layers_own_outputs(tiny_model, text_file, model_type):
    """A row's ``mlp_tail``: turning the inputs into the residual after attention and running only
    norm + MLP gives the whole layer's outputs bit for bit, and the MLP's inputs it captures."""
    from quantmoe.stages.calibrate import build_calibration

    ckpt = Checkpoint(tiny_model(model_type))
    stream = LayerStream(ckpt, torch.device("cpu"))
    ids, _ = build_calibration(ckpt.tokenizer(), text_file, 4, 32, 0)
    tail = ARCHITECTURES[model_type].mlp_tail
    for index in range(stream.num_layers):  # dense and MoE layers alike
        layer = stream.load_layer(index, stream.layer_state(index))
        batches = stream.embed(ids, 2)
        whole = stream.run_layer(layer, batches)
        captured = list(stream.capture(layer, batches, tail[1]))
        inputs = list(stream.to_residual(layer, batches))
        assert all(torch.equal(a, b) for a, b in zip(inputs, captured))
        assert all(torch.equal(a, b) for a, b in zip(stream.mlp_inputs(layer, batches), captured))
        # The full-precision stream's last attention capture turns it into the residual on the way.
        last = ARCHITECTURES[model_type].to_memory(plan_layer(ARCHITECTURES[model_type], ckpt.config, index).attention[-1][0])
        fresh = stream.embed(ids, 2)
        want = list(stream.capture(layer, fresh, last))  # (one capture on a layer at a time: hooks)
        assert all(torch.equal(a, b) for a, b in zip(stream.capture_to_residual(layer, fresh, last), want))
        assert all(torch.equal(a.hidden, b.hidden) for a, b in zip(fresh, batches))
        out = stream.run_tail(layer, batches)
        assert out is batches  # written in place
        assert all(torch.equal(a.hidden, b.hidden) for a, b in zip(out, whole))
        stream.release_layer(index)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_uncached_inputs_and_no_mlp_tail_give_the_same_bytes(tiny_model, text_file, tmp_path, monkeypatch,
                                                              model_type):
    """Memory savers that must not change a bit: the MLP stage's inputs made again from the residual after
    attention by every pass (a row with an ``mlp_tail``), or, running every layer whole instead (no
    ``mlp_tail``), kept from the first pass or captured again for every pass (CAPTURE_CACHE_BYTES).
    Groups of experts: tests/test_budget.py."""
    import dataclasses

    import quantmoe.stages.layer as ql
    from quantmoe.model import architectures

    def run(name):
        out = tmp_path / name
        quantmoe.quantize(tiny_model(model_type), out, QuantConfig(group_size=32), calib=text_file, nsamples=8,
                          seqlen=32, run_eval=False, quiet=True)
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}

    kept_paths = set()
    captured_pairs = ql.LayerQuantizer._captured_pairs

    def recording(self, module_path, *args, **kwargs):
        yield from captured_pairs(self, module_path, *args, **kwargs)
        kept_paths.update(self._kept)

    monkeypatch.setattr(ql.LayerQuantizer, "_captured_pairs", recording)
    reference = run("reference")  # the MLP's input made again from the residual by every pass: nothing kept
    assert kept_paths == set()
    monkeypatch.setitem(architectures.ARCHITECTURES, model_type,
                        dataclasses.replace(architectures.ARCHITECTURES[model_type], mlp_tail=None))
    assert run("whole-layers") == reference
    assert kept_paths == {ARCHITECTURES[model_type].moe_module}  # whole layers: the MLP's input kept
    monkeypatch.setattr(ql, "CAPTURE_CACHE_BYTES", 1)
    assert run("whole-layers-captured-every-pass") == reference


@pytest.mark.parametrize("model_type", [n for n in ARCH_NAMES if ARCHITECTURES[n].experts is not None])
def test_an_fp32_checkpoint_quantizes_to_the_bits_of_its_fp16_source(exported, text_file, tmp_path, model_type):
    """Every weight is converted to fp32 for the work, so a checkpoint stored in fp32 (here: the tiny
    fp16 one, upcast exactly) must give the same levels and scales. It once did not: the default
    --fit stream's copy of the original experts was GPTQ's working storage when it was fp32 already,
    so the full-precision stream ran on garbage from the first MoE layer on (Qwen2-MoE demo: KL 11e-3
    became 178e-3)."""
    src, reference, _ = exported(model_type)
    fp32 = upcast_to_fp32(src, tmp_path / "fp32")
    out = tmp_path / "out"
    quantmoe.quantize(fp32, out, QCFG, calib=text_file, nsamples=8, seqlen=64, run_eval=False, quiet=True)

    def gptq_tensors(folder):
        ckpt = Checkpoint(folder)
        return {n: ckpt.tensor(n) for n in ckpt.names() if n.endswith(GPTQ_SUFFIXES)}

    expected, got = gptq_tensors(reference), gptq_tensors(out)
    assert expected and set(got) == set(expected)
    assert [n for n in expected if not torch.equal(got[n], expected[n])] == []


def test_block_kernel_choices_on_cpu():
    """On CPU every run takes the eager block loop; a CUDA-only kernel or an unknown name is refused."""
    from quantmoe.gptq.core import quantize_block
    from quantmoe.stages.gptq_method import block_function

    cpu = torch.device("cpu")
    assert block_function("auto", cpu) is quantize_block
    assert block_function("eager", cpu) is quantize_block
    for kernel in ("triton", "cuda-graphs", "fast"):
        with pytest.raises(QuantMoeError, match="--block-kernel"):
            block_function(kernel, cpu)


def test_eval_with_tf32_on_cpu_states_plain_float32(tiny_model, text_file, tmp_path):
    """--tf32 changes nothing on CPU (no TF32 there), and the report says float32; the protocol line
    says the same."""
    from clirun import cli

    model = tiny_model("mixtral")
    report = tmp_path / "r.json"
    result = cli("eval", model, "--data", text_file, "--seqlen", "32", "--device", "cpu", "--quiet", "--tf32",
                 "--report", report)
    assert result.returncode == 0, result.stderr
    assert json.loads(report.read_text())["protocol"]["dtype"] == "float32"
    assert "float32 on cpu" in result.stdout


def test_a_seqlen_beyond_the_models_context_is_noted_in_eval_and_quantize(tiny_model, text_file, tmp_path, capsys):
    """Windows or calibration rows longer than max_position_embeddings (the tiny models': 256) run the model where it
    was never trained: said in a note naming the context and a --seqlen within it; at the context itself, nothing."""
    import quantmoe
    from quantmoe.base.options import QuantConfig
    from quantmoe.stages.evaluate import evaluate

    model = tiny_model("mixtral")
    for seqlen, said in ((256, False), (257, True)):
        evaluate(model, data=text_file, seqlen=seqlen, device="cpu", quiet=True)
        quantmoe.quantize(model, tmp_path / f"out-{seqlen}", QuantConfig(backend="rtn", group_size=32), calib=text_file,
                          nsamples=1, seqlen=seqlen, device="cpu", run_eval=False, quiet=True)
        err = capsys.readouterr().err
        expected = "note: --seqlen 257 is longer than the model's context (256 positions, its max_position_embeddings)"
        assert err.count(expected) == (2 if said else 0), err
        assert ("use --seqlen 256 or less" in err) is said


def test_where_vllm_would_not_serve_the_experts_with_marlin_is_noted(tiny_model, text_file, tmp_path):
    """The tiny Qwen3-MoE's experts are 64 wide: at group size 32, vLLM's Marlin MoE kernels take them at tensor-parallel
    size 1 and 2 only (a rank's share 16 at 4, 8 at 8), and elsewhere vLLM falls back to MoeWNA16, which ignores
    ``dynamic``: said in a note (summary, quantization_log.json, the model card) that names the sizes and the way
    out; with one group per row (-1), or for compressed-tensors, nothing is said."""
    model = tiny_model("qwen3_moe")
    notes = {}
    for group in (32, -1):
        out = tmp_path / f"g{group}"
        summary = quantmoe.quantize(model, out, QuantConfig(backend="rtn", group_size=group), calib=text_file,
                                    nsamples=1, seqlen=32, device="cpu", run_eval=False, quiet=True)
        notes[group] = [n for n in summary["notes"] if n.startswith("vLLM ")]
        assert notes[group] == [n for n in json.loads((out / "quantization_log.json").read_text())["notes"]
                                if n.startswith("vLLM ")]
        assert all(f"- {n}" in (out / "README.md").read_text() for n in notes[group])
    assert notes[-1] == []
    ct = quantmoe.quantize(model, tmp_path / "ct", QuantConfig(backend="rtn", group_size=32, format="compressed-tensors"),
                           calib=text_file, nsamples=1, seqlen=32, device="cpu", run_eval=False, quiet=True)
    assert not [n for n in ct["notes"] if n.startswith("vLLM ")]  # its fallback keeps ignore and settings
    from quantmoe.apps.inspection import inspect_model, render_text

    for group in (32, -1):  # inspect foresees it
        report = inspect_model(model, group_size=group)
        assert report["notes"] == notes[group]
        assert all(f"note: {n}" in render_text(report) for n in notes[group])
    (note,) = notes[32]
    assert note.startswith("vLLM serves the routed experts with its Marlin MoE kernels at --tensor-parallel-size 1, 2; "
                           "at 4, 8 a rank's share of their intermediate size 64 (16 at 4) is not a multiple of the "
                           "group size 32") and "--enable-expert-parallel" in note


@pytest.mark.parametrize("room", [True, False])
def test_eval_reads_each_next_layer_in_the_background_when_memory_allows(tiny_model, text_file, monkeypatch, room):
    """The evaluation reads layer i+1 in its reader thread while layer i runs, and in its own thread when
    host memory has no room for it; the perplexity and the NLL of every window are the same either way,
    and the result says where the time went."""
    import threading
    from types import SimpleNamespace

    from quantmoe.stages import evaluate

    src = tiny_model("qwen3_moe")
    windows, _ = evaluate.eval_windows(Checkpoint(src).tokenizer(), text_file, 32)
    plain = evaluate.perplexity(src, windows[:4], "cpu")
    reads = []
    state_of = LayerStream.read_ahead_state

    def recorded(self, index):
        reads.append((index, threading.current_thread().name.startswith("quantmoe-read")))
        return state_of(self, index)

    monkeypatch.setattr(LayerStream, "read_ahead_state", recorded)
    if not room:
        monkeypatch.setattr(evaluate.psutil, "virtual_memory", lambda: SimpleNamespace(available=0))
    out = evaluate.perplexity(src, windows[:4], "cpu")
    n = Checkpoint(src).config.num_hidden_layers
    assert n > 1
    assert [i for i, _ in reads] == list(range(n))
    assert [background for _, background in reads] == [True] + [room] * (n - 1)
    assert out["window_nll"] == plain["window_nll"] and out["perplexity"] == plain["perplexity"]
    assert set(out["timings"]) == {"read", "load", "layers", "head"}
    assert out["timings"]["layers"] > 0


def test_log_losses_and_damps_are_read_from_the_device_at_once_and_exactly():
    """The per-linear loss and damp stay 0-d tensors while a layer is worked on, then become the same
    numbers a read of each would give (float32 and float64 values alike), already-read entries untouched."""
    from quantmoe.stages.layer import _read_logs

    loss32, damp64 = torch.tensor(1.2345678, dtype=torch.float32), torch.tensor(0.0123456789012345, dtype=torch.float64)
    entries = [{"loss": loss32, "damp": damp64}, {"loss": 2.0, "damp": 0.1}]
    _read_logs(entries)
    assert entries == [{"loss": float(loss32), "damp": float(damp64)}, {"loss": 2.0, "damp": 0.1}]
    assert all(type(e[k]) is float for e in entries for k in ("loss", "damp"))


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_a_rare_experts_all_token_down_hessian_comes_from_the_first_batches_through_its_quantized_gate_up(
        tiny_model, text_file, monkeypatch, model_type):
    """--rare-expert blend: a rare expert's down Hessian is blended with 2/n sum h h^T over the MoE block's inputs
    in the first batches that hold BLEND_SAMPLE x the threshold in tokens (h through the expert's quantized gate
    and up), whichever way its products are chunked (float64 reference)."""
    from dataclasses import replace

    from quantmoe.stages.calibrate import build_calibration

    ckpt = Checkpoint(tiny_model(model_type))
    stream = LayerStream(ckpt, torch.device("cpu"))
    ids, _ = build_calibration(ckpt.tokenizer(), text_file, 8, 32, 0)
    index = stream.num_layers - 1
    qcfg = replace(QCFG, rare_expert_tokens=40)  # sample: 160 tokens, so the first 5 of 8 batches of 32
    lq = LayerQuantizer(stream, index, stream.embed(ids, 1), qcfg)
    samples, mlps, blends = [], {}, []
    blend_sample, expert_mlp = LayerQuantizer._blend_sample, LayerQuantizer._expert_mlp
    monkeypatch.setattr(LayerQuantizer, "_blend_sample", lambda self, t: samples.append(blend_sample(self, t))
                        or samples[-1])
    monkeypatch.setattr(LayerQuantizer, "_expert_mlp", lambda self, store, res, k, e, original=True:
                        mlps.setdefault((e, original), expert_mlp(self, store, res, k, e, original)))
    monkeypatch.setattr(layer_module, "_blend", lambda H, H_all, count, threshold, policy:
                        blends.append((H_all.clone(), count)) or H)
    monkeypatch.setattr(layer_module, "STATS_CHUNK_BYTES", 64 * 1024)  # several chunks of rows
    route = LayerQuantizer.route

    def few_for_expert_0(self, X):  # at most 2 of each batch's tokens: a rare expert
        return route(self, X).first(0, 2)

    monkeypatch.setattr(LayerQuantizer, "route", few_for_expert_0)
    lq.attention()
    lq.mlps()
    assert blends and len(samples) >= 1
    sample = samples[0]
    assert sample.shape[0] == 5 * 32
    assert torch.equal(sample, torch.cat([x for x, _ in list(lq._captured_pairs(lq.arch.moe_module))[:5]]))
    rare = [e for e, _ in mlps if not _]  # the experts whose all-token Hessian was built (original=False)
    assert 0 in rare and len(blends) == 2 * len(rare)  # one group: its gate/up blends, then its down blends
    act = lq.layer.get_submodule(lq.plan.fused.module).act_fn
    for e, (H_all, count) in zip(rare, blends[len(rare):]):
        Wg, Wu, _ = mlps[(e, False)]
        h = act(sample.double() @ Wg.double().T) * (sample.double() @ Wu.double().T)
        assert count < 40
        assert torch.allclose(H_all.double(), 2 * h.T @ h / sample.shape[0], rtol=1e-4, atol=1e-6 * h.abs().max() ** 2)


def test_a_groups_rows_go_expert_after_expert_each_in_batch_order():
    """layer._destinations: expert k's rows from starts[k], batch after batch; per batch its experts' rows in order."""
    from quantmoe.stages.layer import _destinations

    dest, ends = _destinations([0, 3, 3, 7], [[1, 0, 2], [2, 0, 0], [0, 0, 2]], torch.device("cpu"))
    assert ends == [3, 5, 7]
    assert dest.tolist() == [0, 3, 4, 1, 2, 5, 6]


def _layer_reads(monkeypatch) -> dict[int, threading.Event]:
    """Layer index -> an event set once the export has read that layer's file."""
    events: dict[int, threading.Event] = {}
    real = export_module.read_layer

    def read(file):
        tensors = real(file)
        events.setdefault(int(file.stem.rpartition("-")[2]), threading.Event()).set()
        return tensors

    monkeypatch.setattr(export_module, "read_layer", read)
    return events


def test_the_export_is_written_beside_the_layers(tiny_model, text_file, tmp_path, monkeypatch):
    """Each layer file is exported while the layers after it are quantized: layer i waits here (up to a
    minute) for the export to have read layer i - 1, which an export after the layers never would."""
    reads = _layer_reads(monkeypatch)
    waited = []
    run = LayerQuantizer.run

    def quantize_layer(self):
        if self.index > 0:
            waited.append(reads.setdefault(self.index - 1, threading.Event()).wait(60))
        return run(self)

    monkeypatch.setattr(LayerQuantizer, "run", quantize_layer)
    out = tmp_path / "out"
    quantmoe.quantize(tiny_model("deepseek_v3"), out, QCFG, calib=text_file, nsamples=8, seqlen=32, run_eval=False,
                      quiet=True)
    assert waited == [True, True]
    assert (out / "model.safetensors.index.json").is_file()


def test_an_export_that_fails_beside_the_layers_stops_the_run_at_the_next_layer(tiny_model, text_file, tmp_path,
                                                                                 monkeypatch):
    def read(file):
        raise QuantMoeError(f"{file} could not be exported")

    monkeypatch.setattr(export_module, "read_layer", read)
    started: list[export_module.BackgroundExport] = []

    class Recorded(export_module.BackgroundExport):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(pipeline_module, "BackgroundExport", Recorded)

    def export_failed() -> bool:
        try:
            started[0].check()
        except QuantMoeError:
            return True
        return False

    quantized = []
    run = LayerQuantizer.run

    def quantize_layer(self):
        if self.index == 1:  # the export has failed on layer 0 by the time layer 1 is done
            deadline = time.monotonic() + 60
            while not export_failed() and time.monotonic() < deadline:
                time.sleep(0.01)
        quantized.append(self.index)
        return run(self)

    monkeypatch.setattr(LayerQuantizer, "run", quantize_layer)
    out = tmp_path / "out"
    with pytest.raises(QuantMoeError, match="layer-00000.safetensors could not be exported"):
        quantmoe.quantize(tiny_model("deepseek_v3"), out, QCFG, calib=text_file, nsamples=8, seqlen=32,
                          run_eval=False, quiet=True)
    assert quantized == [0, 1]  # layer 2 of 3 was never started
    work = work_dir(out)
    assert not out.exists() and not (work / "export").exists()
    assert sorted(p.name for p in (work / "layers").glob("*.safetensors")) == ["layer-00000.safetensors",
                                                                                "layer-00001.safetensors"]
    assert not [t.name for t in threading.enumerate() if t.name.startswith("quantmoe-")]
