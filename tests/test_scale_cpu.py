"""The real-scale benchmark's machinery (benchmarks/scale.py), on a tiny Mixtral shape on CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import scale  # noqa: E402

from quantmoe.model.checkpoint import Checkpoint  # noqa: E402
from quantmoe.stages.calibrate import read_calibration  # noqa: E402

TINY_SHAPE = {**scale.MIXTRAL_8X7B, "hidden_size": 64, "intermediate_size": 96, "num_local_experts": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}


@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("scale")
    model = scale.make_checkpoint(work / "model", TINY_SHAPE, layers=2, device="cpu")
    calib = scale.make_calibration(work / "calib.safetensors", TINY_SHAPE["vocab_size"], 4, 32)
    out = work / "out"
    run = scale.run_quantize(model, out, calib, "cpu", ["--group-size", "32"], scale.REPO, timeout=300)
    return model, calib, out, run


def test_checkpoint_has_the_hub_layout_one_shard_per_layer(benchmark_run):
    from transformers import AutoModelForCausalLM

    model, _, _, _ = benchmark_run
    ckpt = Checkpoint(model)
    assert ckpt.config.model_type == "mixtral" and ckpt.config.num_hidden_layers == 2
    assert len(ckpt.shards) == 3  # embeddings + head, then one per layer
    assert ckpt.weight_map["model.layers.1.block_sparse_moe.experts.3.w2.weight"] == "model-00003-of-00003.safetensors"
    assert ckpt.shape("model.layers.0.block_sparse_moe.experts.0.w1.weight") == (96, 64)
    assert ckpt.tensor("model.layers.0.self_attn.k_proj.weight").dtype == torch.bfloat16
    loaded = AutoModelForCausalLM.from_pretrained(model)  # transformers reads it as a Mixtral
    assert torch.equal(loaded.state_dict()["model.layers.1.mlp.experts.down_proj"][3].to(torch.bfloat16),
                       ckpt.tensor("model.layers.1.block_sparse_moe.experts.3.w2.weight"))


def test_calibration_passes_the_vocabulary_check(benchmark_run):
    model, calib, _, _ = benchmark_run
    ids, meta = read_calibration(calib, Checkpoint(model).tokenizer())
    assert ids.shape == (4, 32) and int(ids.max()) < TINY_SHAPE["vocab_size"]
    assert meta["source"].startswith("random token ids")


def test_quantize_records_every_stage_and_the_summary_extrapolates(benchmark_run):
    _, _, out, run = benchmark_run
    assert run["returncode"] == 0, run["output_tail"]
    assert run["peak_rss_mb_sampled"] > 0
    layers, stages = scale.read_layers(out)
    assert [e["index"] for e in layers] == [0, 1]
    for e in layers:
        assert set(scale.STAGES) <= set(e["timings"]), e["timings"]
        assert e["timings"]["solve"] > 0 and e["timings"]["hessians"] > 0
        assert e["peak_rss_mb"] > 0 and e["peak_gpu_mb"] is None  # CPU
    summary = scale.summarise(layers, stages, total_layers=32)
    mean, extra = summary["steady_layer_mean"], summary["extrapolation"]
    assert mean["seconds"] == layers[1]["seconds"]
    assert extra["quantize_seconds"] >= layers[0]["seconds"] + 31 * layers[1]["seconds"] - 0.1  # rounded to 0.1 s
    assert extra["total_seconds"] > extra["quantize_seconds"]


def test_a_view_of_fewer_layers_gives_the_same_first_layer(benchmark_run, tmp_path):
    model, calib, out, _ = benchmark_run
    view = scale.make_view(model, tmp_path / "view", layers=1)
    assert Checkpoint(view).config.num_hidden_layers == 1
    out1 = tmp_path / "out1"
    run = scale.run_quantize(view, out1, calib, "cpu", ["--group-size", "32"], scale.REPO, timeout=300)
    assert run["returncode"] == 0, run["output_tail"]
    one, two = Checkpoint(out1), Checkpoint(out)
    assert len(json.loads((out1 / "quantization_log.json").read_text())["layers"]) == 1
    for name in one.names("model.layers.0."):
        assert torch.equal(one.tensor(name), two.tensor(name)), name


def test_prefetch_changes_nothing_and_compare_says_so(benchmark_run, tmp_path):
    model, calib, out, _ = benchmark_run
    other = tmp_path / "no-prefetch"
    run = scale.run_quantize(model, other, calib, "cpu", ["--group-size", "32", "--no-prefetch"], scale.REPO,
                             timeout=300)
    assert run["returncode"] == 0, run["output_tail"]
    diff = scale.compare_outputs(out, other, model=model, device="cpu")
    assert diff["modules"] == 2 * (4 + 3 * 4)  # q, k, v, o and 4 experts x 3, per layer
    assert diff["identical_modules"] == diff["modules"] and diff["levels_differ"] == 0
    assert diff["gptq_loss_ratio_b_over_a"] == 1.0
    assert 0 < diff["relative_weight_error_a"] == diff["relative_weight_error_b"] < 0.2


@pytest.mark.parametrize("heads,seqlen,expected", [(32, 2048, 4), (32, 4096, 1), (8, 512, 8), (64, 8192, 1)])
def test_default_batch_keeps_attention_scores_within_2_gib(heads, seqlen, expected):
    from types import SimpleNamespace

    from quantmoe.model.stream import default_batch_size

    size = default_batch_size(SimpleNamespace(num_attention_heads=heads), seqlen)
    assert size == expected
    assert size == 1 or size * heads * seqlen**2 * 4 <= 2 * 2**30
