"""GPTQModel (the optional extra `quantmoe[gptqmodel]`) loads quantmoe's output on CPU, and its
perplexity on the same tokens is within 1% of quantmoe's own evaluation.

GPTQModel names Mixtral's experts `mlp.experts.E.gate_proj` (vLLM reads the source names
`block_sparse_moe.experts.E.w1`), so these runs use `--layout gptqmodel`; for Qwen2-MoE the
two namings coincide except that GPTQModel leaves dense-layer MLPs unquantized. One run per
row of the architecture table that GPTQModel loads (``Architecture.gptqmodel``).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from clirun import scripts_forked
from conftest import ARCH_NAMES

import quantmoe
from quantmoe.base.options import QuantConfig
from quantmoe.model.architectures import ARCHITECTURES
from quantmoe.model.checkpoint import Checkpoint
from quantmoe.stages.evaluate import eval_windows, perplexity

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                                reason="install the extra: pip install 'quantmoe[gptqmodel]'")

# GPTQModel.load replaces transformers' fused expert modules with per-expert ones for the families
# it loads, for the rest of the process; so it runs in a child process, or every later test that
# builds those families in this pytest process would see the wrong module layout.
_GPTQMODEL_PPL = """
import math, sys, torch
from gptqmodel import BACKEND, GPTQModel
folder, windows = sys.argv[1], torch.load(sys.argv[2])
# The plain torch kernel computes in the requested dtype (the default CPU kernel computes in bf16).
model = GPTQModel.load(folder, device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)
nll, count = 0.0, 0
with torch.no_grad():
    for batch in windows.split(4):
        logits = model.model(input_ids=batch).logits.float()
        nll += float(torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
        count += batch[:, 1:].numel()
print("perplexity", math.exp(nll / count))
"""


def gptqmodel_perplexities(folders) -> list[float]:
    """GPTQModel's perplexity of each folder on the windows saved beside it (windows.pt), each folder in a
    child process of its own: forks of one that imported torch and transformers, two at a time."""
    runs = scripts_forked(_GPTQMODEL_PPL, [[f, f.parent / "windows.pt"] for f in folders],
                          preload=("torch", "transformers.modeling_utils"), env=os.environ.copy())
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    return [float(run.stdout.strip().splitlines()[-1].split()[1]) for run in runs]


ROWS = [n for n in ARCH_NAMES if ARCHITECTURES[n].gptqmodel]
MIXED = "mixed"  # the Qwen2-MoE export of test_gptqmodel_loads_a_dynamic_mixed_4_and_8_bit_output's recipe


@pytest.fixture(scope="module")
def exports(tiny_model, text_file, tmp_path_factory):
    """name -> (export, quantmoe's perplexity, GPTQModel's) on its first 8 windows of 64 tokens: each row of
    ROWS with --layout gptqmodel, and MIXED (below); GPTQModel's perplexities computed together at the end,
    which spares a start of torch and transformers per export."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHDYNAMO_DISABLE", "1")
        mp.setenv("GPTQMODEL_CPU_WORKERS", os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))
        base = tmp_path_factory.mktemp("gptqmodel")
        outs = {}
        for model_type in ROWS:
            outs[model_type] = base / model_type / "gptq"
            quantmoe.quantize(tiny_model(model_type), outs[model_type], QuantConfig(group_size=32, layout="gptqmodel"),
                              calib=text_file, nsamples=8, seqlen=64, run_eval=False, quiet=True)
        recipe = base / "mixed.toml"
        recipe.write_text('[[rules]]\nmatch = "class:dense_mlp"\nskip = true\n\n'
                          '[[rules]]\nmatch = "re:.*self_attn\\\\..*"\nbits = 8\n')
        outs[MIXED] = base / MIXED / "gptq"
        quantmoe.quantize(tiny_model("qwen2_moe"), outs[MIXED], QuantConfig(group_size=32, recipe=str(recipe)),
                          calib=text_file, nsamples=8, seqlen=64, run_eval=False, quiet=True)
        ours = {}
        for name, out in outs.items():
            windows, _ = eval_windows(Checkpoint(out).tokenizer(), text_file, 64)
            windows = windows[:8]
            torch.save(windows, out.parent / "windows.pt")
            ours[name] = perplexity(out, windows, "cpu")["perplexity"]
        theirs = gptqmodel_perplexities(list(outs.values()))
    return {name: (out, ours[name], t) for (name, out), t in zip(outs.items(), theirs)}


@pytest.mark.parametrize("model_type", ROWS)
def test_gptqmodel_loads_our_output_with_the_same_perplexity(exports, model_type):
    out, ours, theirs = exports[model_type]
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["meta"]["layout"] == "gptqmodel"
    names = Checkpoint(out).names()
    arch = ARCHITECTURES[model_type]
    if arch.experts is not None:
        assert any(n.endswith(f".{arch.fused.module}.0.gate_proj.qweight") for n in names)
    assert theirs == pytest.approx(ours, rel=0.01)


def test_gptqmodel_loads_a_dynamic_mixed_4_and_8_bit_output(exports):
    """--recipe: attention in 8 bits, experts and shared experts in 4, the dense MLP of layer 0 left in 16
    bits (GPTQModel's Qwen2-MoE definition does not cover it, so the source names are GPTQModel's), declared
    in ``dynamic``; GPTQModel builds each module at its own bit width and computes what quantmoe does."""
    out, ours, theirs = exports[MIXED]
    ckpt = Checkpoint(out)
    q = ckpt.tensor("model.layers.1.self_attn.q_proj.qweight")
    assert q.shape[0] == ckpt.config.hidden_size * 8 // 32  # 8-bit
    assert ckpt.tensor("model.layers.1.mlp.experts.0.gate_proj.qweight").shape[0] == ckpt.config.hidden_size * 4 // 32
    assert "model.layers.0.mlp.gate_proj.weight" in ckpt.names()
    dynamic = ckpt.quantization["dynamic"]
    assert any(k.startswith("+:") and v["bits"] == 8 for k, v in dynamic.items())
    assert any(k.startswith("-:") for k in dynamic)
    assert theirs == pytest.approx(ours, rel=0.01)
