"""The peer harness's verdict (benchmarks/peers/run.py) on made-up results: which rows it compares
quantmoe with, and the paired margin it reports; and the GPTQModel tree entry it adds for dense
layers. The harness itself runs the tools (minutes each); this checks the arithmetic it judges by."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

PEERS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "peers"


def load(name: str, file: str):
    sys.path.insert(0, str(PEERS_DIR))
    spec = importlib.util.spec_from_file_location(name, PEERS_DIR / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(windows: list[float], original: list[float], bits: float = 4.125, fraction: float = 0.85,
        seconds: float = 10.0) -> dict:
    gap = sum(w - o for w, o in zip(windows, original)) / len(windows)  # small: relative gap ~ log ratio
    return {"gap": {"relative": gap}, "window_nll": windows, "kl": gap, "information_bits_per_weight": bits,
            "fraction_quantized": fraction, "quantize": {"seconds": seconds}}


def test_the_verdict_compares_quantmoe_with_the_peers_that_quantize_the_same_linears():
    harness = load("peers_run", "run.py")
    g = torch.Generator().manual_seed(0)
    original = (4 + 0.1 * torch.randn(50, generator=g, dtype=torch.float64)).tolist()

    def shifted(by: float, noise: float = 0.002) -> list[float]:
        return [o + by + noise * float(torch.randn(1, generator=g, dtype=torch.float64)) for o in original]

    tools = {
        "quantmoe": row(shifted(0.002), original, seconds=5),
        "quantmoe-gptqmodel-layout": row(shifted(0.001), original, fraction=0.8, seconds=5),
        "gptqmodel": row(shifted(0.006), original, seconds=8),
        # the fp16-dense-MLP GPTQModel run has the smallest gap but is not a peer the target is set by
        "gptqmodel-dense-fp16": row(shifted(0.0015), original, fraction=0.8, seconds=7),
        "llmcompressor": row(shifted(0.008), original, seconds=20),
    }
    v = harness.verdict(tools, original)
    assert v["best_peer"] == "gptqmodel" and v["ratio"] == pytest.approx(
        tools["quantmoe"]["gap"]["relative"] / tools["gptqmodel"]["gap"]["relative"])
    assert v["gap_target_met"] is (v["ratio"] <= 0.7) and v["bits_per_weight_not_higher"]
    assert v["quantize_seconds_vs_fastest_peer"] == pytest.approx(5 / 8)  # the fp16 run's 7 s does not count
    q, p, o = (torch.tensor(x, dtype=torch.float64)
               for x in (tools["quantmoe"]["window_nll"], tools["gptqmodel"]["window_nll"], original))
    d = (q - o) - 0.7 * (p - o)
    assert v["target_margin"]["mean"] == pytest.approx(float(d.mean()))
    assert v["target_margin"]["se"] == pytest.approx(float(d.std() / len(original) ** 0.5))
    assert v["quantmoe_gptqmodel_layout_over_gptqmodel"] == pytest.approx(
        tools["quantmoe-gptqmodel-layout"]["gap"]["relative"] / tools["gptqmodel-dense-fp16"]["gap"]["relative"])
    # spending more bits than a peer fails the bits condition
    tools["quantmoe"]["information_bits_per_weight"] = 4.2
    assert not harness.verdict(tools, original)["bits_per_weight_not_higher"]


def test_the_dense_mlp_entry_is_gptqmodels_own_and_the_shipped_tree_is_left_alone():
    script = load("quantize_gptqmodel", "quantize_gptqmodel.py")
    shipped = ["model", "layers", "#", {
        "self_attn": ("q_proj:0:in=x", "o_proj:1"),
        "mlp:moe:?": {"gate": ("gate:!",), "experts:0": {"#": ("gate_proj:0:in=x", "up_proj:0:in=x", "down_proj:1")}},
    }]
    patched = script.with_dense_mlp(shipped)
    mlp = patched[3]["mlp:moe:?"]
    assert list(mlp)[0] == "" and mlp[""] == ("gate_proj:0:in=x", "up_proj:0:in=x", "down_proj:1")
    assert {k: v for k, v in mlp.items() if k} == shipped[3]["mlp:moe:?"]
    assert "" not in shipped[3]["mlp:moe:?"]  # a copy: the class attribute is replaced, not edited
