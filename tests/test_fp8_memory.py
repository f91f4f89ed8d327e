"""An FP8 release's routed experts stay FP8 while their layer is quantized (issue 19's 40 GB budget):
StoredExperts holds the codes and scales (formats.fp8.Fp8Experts), half the bytes of BF16, and every
use dequantizes them to the numbers the stream's load made before, so the output bytes do not change."""

from __future__ import annotations

import json
import math

import pytest
import torch
from clirun import cli, cli_forked
from safetensors.torch import load_file
from tiny import append_mtp_layer, dequantized_copy, make_model, router_or_mtp_extra

import quantmoe
from quantmoe.base.options import QuantConfig
from quantmoe.formats.fp8 import (
    Fp8Experts,
    Fp8Weight,
    dequantize_fp8,
    quantize_fp8_blocks,
    quantize_fp8_channels,
    quantize_fp8_tensor,
    write_fp8_release,
)
from quantmoe.model.checkpoint import Checkpoint
from quantmoe.model.stream import LayerStream
from quantmoe.stages.experts import ExpertCosts, StoredExperts

BLOCK = (32, 32)


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """(fp8, reference): a tiny DeepSeek-V3 release in FP8 (with an MTP layer) and its exact BF16 conversion."""
    base = tmp_path_factory.mktemp("fp8-memory")
    bf16 = make_model("deepseek_v3", base / "bf16", dtype=torch.bfloat16)
    append_mtp_layer(bf16)
    fp8 = write_fp8_release(bf16, base / "fp8", block=BLOCK, skip=router_or_mtp_extra("deepseek_v3"))
    return fp8, dequantized_copy(fp8, base / "reference")


def _weight(codes, scale, block, name="w"):
    return Fp8Weight(codes, scale, block, name)


@pytest.mark.parametrize("layout", ["ragged blocks", "per tensor", "per channel"])
def test_fp8_experts_dequantize_as_dequantize_fp8_bit_for_bit(layout):
    """Gate/up made of two row parts whose blocks do not divide them (48 rows, 80 columns in 32 x 32
    blocks): each part keeps its own scales, and every expert's weights are dequantize_fp8's."""
    torch.manual_seed(0)
    E, I, C = 3, 48, 80
    quantizer, block = {"ragged blocks": (lambda W: quantize_fp8_blocks(W, BLOCK), BLOCK),
                        "per tensor": (quantize_fp8_tensor, None),
                        "per channel": (quantize_fp8_channels, None)}[layout]
    parts = [[_weight(*quantizer(torch.randn(I, C) * (e + 1)), block, f"e{e}.{w}") for w in ("gate", "up")]
             for e in range(E)]
    assert Fp8Experts.fits(parts)
    stack = Fp8Experts(E, parts[0], torch.device("cpu"))
    for e in range(E):
        for k, w in enumerate(parts[e]):
            stack.put(e, k, w)
    want = torch.stack([torch.cat([dequantize_fp8(w.codes, w.scale, w.block, name=w.name) for w in ws])
                        for ws in parts])  # (E, 2I, C) bf16, as the stream's load fused them
    assert stack.shape == (E, 2 * I, C) and not stack.repaired
    assert torch.equal(stack.weights(0, E), want)
    assert torch.equal(stack.weights(1, 3, torch.float32), want[1:3].float())
    assert stack.nbytes < want.numel() * want.element_size() * 0.6  # codes a byte a weight, plus scales


def test_fp8_experts_keep_a_repaired_part_dequantized():
    """NaN codes under a zero scale (DeepSeek's kernel writes them for an all-zero block) are read as 0 by
    dequantize_fp8's repair; that part is kept as its result, so it reads the same."""
    codes, scale = quantize_fp8_blocks(torch.randn(32, 64), BLOCK)
    codes[:32, :32] = float("nan")
    scale[0, 0] = 0.0
    parts = [[_weight(codes, scale, BLOCK)], [_weight(*quantize_fp8_blocks(torch.randn(32, 64), BLOCK), BLOCK)]]
    stack = Fp8Experts(2, parts[0], torch.device("cpu"))
    stack.put(0, 0, parts[0][0])
    stack.put(1, 0, parts[1][0])
    assert list(stack.repaired) == [(0, 0)]
    got = stack.weights(0, 2)
    assert torch.equal(got[0], dequantize_fp8(codes, scale, BLOCK)) and not got[0].isnan().any()
    assert torch.equal(got[1], dequantize_fp8(parts[1][0].codes, parts[1][0].scale, BLOCK))


def test_fp8_experts_refuse_experts_of_different_layouts():
    a = _weight(*quantize_fp8_blocks(torch.randn(32, 64), BLOCK), BLOCK)
    b = _weight(*quantize_fp8_tensor(torch.randn(32, 64)), None)
    assert Fp8Experts.fits([[a], [a]]) and not Fp8Experts.fits([[a], [b]])
    assert not Fp8Experts.fits([[a], [torch.zeros(32, 64, dtype=torch.bfloat16)]])


def test_stored_experts_of_an_fp8_release_hold_fp8_and_read_as_the_bf16_conversion(releases):
    fp8, reference = releases
    ours, theirs = LayerStream(Checkpoint(fp8), torch.device("cpu")), LayerStream(Checkpoint(reference), torch.device("cpu"))
    layer = ours.load_layer(1, ours.layer_state(1, keep_dtype=True), keep_fp8=True)
    module = layer.mlp.experts
    assert isinstance(module.gate_up_proj, Fp8Experts) and isinstance(module.down_proj, Fp8Experts)
    assert not [n for n, _ in layer.named_parameters() if n.startswith("mlp.experts.")]  # no Parameter holds FP8
    stored = StoredExperts(module.gate_up_proj, module.down_proj, module.act_fn)
    ref = theirs.load_layer(1, theirs.layer_state(1, keep_dtype=True), experts_dtype=torch.bfloat16).mlp.experts
    plain = StoredExperts(ref.gate_up_proj.data, ref.down_proj.data, ref.act_fn)
    E = stored.shape[0]
    assert stored.shape == plain.shape and E == 8
    for which in ("gate_up", "down"):
        assert torch.equal(stored.originals(which, 0, E), plain.originals(which, 0, E))
        assert all(torch.equal(stored.original(which, e), plain.original(which, e)) for e in range(E))
    assert stored.nbytes < 0.6 * plain.nbytes
    x = torch.randn(5, stored.shape[2])
    index, weights = torch.tensor([[0, 3]] * 5), torch.full((5, 2), 0.5)
    assert torch.equal(stored(x, index, weights), plain(x, index, weights))
    ours.release_layer(1)
    assert isinstance(module.gate_up_proj, torch.nn.Parameter) and module.gate_up_proj.is_meta


def test_fp8_release_output_is_the_same_whether_its_experts_are_kept_in_fp8(releases, text_file, tmp_path,
                                                                            monkeypatch):
    """The same FP8 release quantized with its experts dequantized to BF16 as the layer loads (how it
    was done before) and kept in FP8, in groups of one expert, two, and all: the same bytes."""
    fp8, _ = releases
    held = []
    init = StoredExperts.__init__

    def spy(self, gate_up, down, act_fn, *rest):
        held.append(type(gate_up))
        init(self, gate_up, down, act_fn, *rest)

    monkeypatch.setattr(StoredExperts, "__init__", spy)

    def run(name, budget=None):
        out = tmp_path / name
        quantmoe.quantize(fp8, out, QuantConfig(group_size=32), calib=text_file, nsamples=8, seqlen=32,
                          run_eval=False, quiet=True, gpu_memory=budget)
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}

    kept = run("fp8-experts")
    assert held and set(held) == {Fp8Experts}
    ckpt = Checkpoint(fp8)
    I, C = ckpt.shape("model.layers.1.mlp.experts.0.gate_proj.weight")
    costs = ExpertCosts(C, I, hessians=True, cross=True, fit_down=True)
    most = 8 * 32  # the rows an expert can be routed: every calibration token
    for per in (1, 2):  # room for `per` experts however the tokens are routed (groups of `per` or more)
        assert run(f"groups-of-{per}", costs.levels(8) + per * costs.of(most)) == kept
    held.clear()
    load = LayerStream.load_layer
    monkeypatch.setattr(LayerStream, "load_layer", lambda self, index, state, experts_dtype=None, keep_fp8=False,
                        experts=None: load(self, index, state, experts_dtype, False, experts))
    before = run("bf16-experts")
    assert held and set(held) == {torch.Tensor}
    assert before == kept and math.prod(len(b) for b in kept.values()) > 0


# ----------------------------------------------------------------------------- bnb keeps the MTP layer


def test_bnb_export_keeps_the_mtp_layer_as_the_gptq_export_does(releases, tmp_path):
    """--mtp keep (default): the MTP layer's tensors in the bnb export, unquantized, FP8 ones dequantized to
    BF16, the layer skipped by prefix in llm_int8_skip_modules; --mtp drop leaves it out."""
    pytest.importorskip("bitsandbytes", reason="the bnb backends need bitsandbytes (pip install 'quantmoe[bnb]')")
    fp8, _ = releases
    mtp = Checkpoint(fp8).config.num_hidden_layers
    prefix = f"model.layers.{mtp}."
    release = load_file(fp8 / "model.safetensors")
    runs = cli_forked([["quantize", fp8, "--out", tmp_path / choice, "--backend", "bnb-nf4", "--no-eval", "--quiet",
                        "--mtp", choice] for choice in ("keep", "drop")])
    for choice, result in zip(("keep", "drop"), runs):
        out = tmp_path / choice
        assert result.returncode == 0, result.stderr
        exported = {}
        for shard in sorted(out.glob("*.safetensors")):
            exported.update(load_file(shard))
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        ours = {n: t for n, t in exported.items() if n.startswith(prefix)}
        if choice == "drop":
            assert not ours and f"model.layers.{mtp}" not in qc["llm_int8_skip_modules"]
            assert not [m for m in qc["quantmoe"]["modules_not_quantized"] if m.startswith(prefix)]
            continue
        want = {n for n in release if n.startswith(prefix) and not n.endswith("_scale_inv")}
        assert set(ours) == want
        for name, t in ours.items():
            if name + "_scale_inv" in release:  # FP8 in the release: BF16 here, exactly its dequantization
                assert t.dtype == torch.bfloat16
                assert torch.equal(t, dequantize_fp8(release[name], release[name + "_scale_inv"], BLOCK, name=name))
            else:
                assert t.dtype == release[name].dtype and torch.equal(t, release[name]), name
        assert f"model.layers.{mtp}" in qc["llm_int8_skip_modules"]
        for module in ("eh_proj", "self_attn.q_a_proj", "mlp.experts.7.down_proj", "mlp.shared_experts.up_proj"):
            assert prefix + module in qc["quantmoe"]["modules_not_quantized"]
        # The main layers are still quantized: a routed expert of layer 1 has bitsandbytes' 4-bit statistics.
        assert "model.layers.1.mlp.experts.0.down_proj.weight.absmax" in exported
        assert not [n for n in exported if n.endswith("_scale_inv")]
        verified = cli("verify", out)
        assert verified.returncode == 0, verified.stdout + verified.stderr
