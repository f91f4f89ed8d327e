"""FP8 source format (quantmoe/formats/fp8.py): dequantization against a plain loop over blocks, bit for
bit; the round trip within e4m3's precision; one-line errors naming the tensor; and a synthetic
FP8 release of the tiny DeepSeek-V3 that transformers' own FP8 reader agrees with."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from quantmoe.base.errors import QuantMoeError
from quantmoe.formats.fp8 import (
    block_size,
    dequantize_fp8,
    fp8_linears,
    is_fp8_config,
    quantize_fp8_blocks,
    quantize_fp8_channels,
    quantize_fp8_tensor,
    write_fp8_release,
)
from quantmoe.model.architectures import ARCHITECTURES

NAME = "model.layers.3.mlp.experts.7.down_proj.weight"

# Real quantization_configs (see the module docstring for where each comes from).
DEEPSEEK = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
MINIMAX = {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
           "weight_block_size": [128, 128], "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}
DEEPSEEK_V31 = {**DEEPSEEK, "scale_fmt": "ue8m0"}
PER_TENSOR = {"quant_method": "fp8", "activation_scheme": "static"}  # vLLM/AutoFP8 per-tensor
GLM45_AIR_FP8 = {  # compressed-tensors, per-channel: a different format
    "quant_method": "compressed-tensors", "format": "float-quantized",
    "config_groups": {"group_0": {"targets": ["Linear"],
                                  "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                                              "dynamic": False},
                                  "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                        "dynamic": True}}},
    "ignore": ["lm_head", "model.layers.1.mlp.gate"]}


def fp8_codes(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Every finite e4m3 code (subnormals, ±448, ±0) at random; the two NaN codes replaced by 0."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0
    return raw.view(torch.float8_e4m3fn)


def positive_scales(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(shape, generator=g) * 3) * 1e-3  # spread over many binades


def reference(codes, scale, block, dtype):
    """Straightforward: one fp32 multiply per block (or row), then a single cast."""
    rows, cols = codes.shape
    c = codes.float()
    out = torch.empty(rows, cols)
    if block is None:
        per_row = scale.reshape(-1)
        for i in range(rows):
            out[i] = c[i] * per_row[0 if per_row.numel() == 1 else i]
    else:
        bo, bi = block
        for bi_ in range(math.ceil(rows / bo)):
            for bj in range(math.ceil(cols / bi)):
                r, k = slice(bi_ * bo, (bi_ + 1) * bo), slice(bj * bi, (bj + 1) * bi)
                out[r, k] = c[r, k] * scale[bi_, bj]
    return out.to(dtype)


BLOCK_CASES = [  # (rows, cols, block): ragged both ways, exact, 1x1 blocks, one block larger than the tensor
    (130, 260, (128, 128)),
    (256, 128, (128, 128)),
    (5, 7, (1, 1)),
    (7, 9, (2, 4)),
    (5, 7, (128, 128)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("rows,cols,block", BLOCK_CASES)
def test_block_dequant_matches_the_reference_loop_bit_for_bit(rows, cols, block, dtype):
    codes = fp8_codes(rows, cols, seed=rows + cols)
    scale = positive_scales((math.ceil(rows / block[0]), math.ceil(cols / block[1])), seed=rows)
    if dtype == torch.float16:
        scale = scale.clamp(max=100.0)  # 448 * scale stays inside float16
    got = dequantize_fp8(codes, scale, block, dtype=dtype, name=NAME)
    assert got.dtype == dtype and got.shape == (rows, cols)
    assert torch.equal(got, reference(codes, scale, block, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale_shape", [(), (1,), (130,), (130, 1)])
def test_per_tensor_and_per_channel_dequant_match_the_reference(scale_shape, dtype):
    codes = fp8_codes(130, 70, seed=3)
    scale = positive_scales(scale_shape, seed=4)
    got = dequantize_fp8(codes, scale, None, dtype=dtype, name=NAME)
    assert torch.equal(got, reference(codes, scale, None, dtype))


def test_ue8m0_scales_and_e5m2_codes_dequantize_too():
    codes = fp8_codes(130, 260, seed=5)
    pow2 = torch.exp2(torch.randint(-12, 4, (2, 3)).float())
    got = dequantize_fp8(codes, pow2.to(torch.float8_e8m0fnu), (128, 128), dtype=torch.float32)
    assert torch.equal(got, reference(codes, pow2, (128, 128), torch.float32))
    e5m2 = torch.randn(9, 11).to(torch.float8_e5m2)
    scale = positive_scales((3, 3), seed=6)
    assert torch.equal(dequantize_fp8(e5m2, scale, (4, 4)), reference(e5m2, scale, (4, 4), torch.bfloat16))


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.fp32_storages = [], {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                storage = t.untyped_storage()
                self.fp32_storages[storage.data_ptr()] = storage.nbytes()
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequant_holds_one_fp32_copy_and_reads_nothing_back_early(dtype):
    """Ops that make the host wait (item, nonzero) stay out of the valid path; its one check reads
    back through tolist, which does not dispatch on CPU. The ops it calls make one weight-sized
    fp32 buffer (what kernels allocate inside, below the dispatcher, is not seen here)."""
    codes, scale = fp8_codes(256, 384, seed=7), positive_scales((2, 3), seed=8)
    with Recorder() as rec:
        dequantize_fp8(codes, scale, (128, 128), dtype=dtype)
    syncing = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default"}
    assert not syncing & set(rec.ops)
    assert sum(n >= codes.numel() * 4 for n in rec.fp32_storages.values()) == 1


def block_bound(W, scale, block):
    """|dequant - W| allowed per element: half an e4m3 step, 2**-4 relative for normal codes and
    2**-10 * scale (half the subnormal spacing 2**-9) near zero."""
    full = torch.ones_like(W, dtype=torch.float32)
    if block is None:
        full *= scale.reshape(-1, 1) if scale.numel() > 1 else scale
    else:
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                full[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = scale[i, j]
    return W.float().abs() * 2**-4 + full * 2**-10 + 1e-12, full


@pytest.mark.parametrize("rows,cols,block", [(130, 260, (128, 128)), (64, 96, (32, 32)), (5, 7, (1, 1))])
def test_quantize_then_dequantize_stays_within_e4m3_precision(rows, cols, block):
    g = torch.Generator().manual_seed(rows)
    W = torch.randn(rows, cols, generator=g) * 0.02
    W[3, 5] = 0.9  # an outlier sets its block's scale
    W[-1, -1] = -2.5  # in the ragged corner block
    q, scale = quantize_fp8_blocks(W.to(torch.bfloat16), block)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    Wb = W.to(torch.bfloat16).float()
    bound, full = block_bound(Wb, scale, block)
    err = (dequantize_fp8(q, scale, block, dtype=torch.float32) - Wb).abs()
    assert (err <= bound).all(), float((err / bound).max())
    # Each block's largest magnitude lands on the largest code, as amax / 448 makes it.
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            r, k = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            assert scale[i, j] == Wb[r, k].abs().max() / 448
            assert q[r, k].float().abs().max() == 448


def test_an_all_zero_block_gets_scale_one_and_zero_codes():
    W = torch.randn(200, 200)
    W[128:, :128] = 0
    q, scale = quantize_fp8_blocks(W, (128, 128))
    assert scale[1, 0] == 1 and (q[128:, :128].float() == 0).all()
    assert torch.isfinite(scale).all() and (scale > 0).all()


def test_per_tensor_and_per_channel_round_trips():
    W = torch.randn(48, 80) * torch.linspace(0.01, 3, 48)[:, None]  # rows of very different ranges
    q, s = quantize_fp8_tensor(W)
    assert s.shape == () and s == W.abs().max() / 448
    bound, _ = block_bound(W, s, None)
    assert ((dequantize_fp8(q, s, None, torch.float32) - W).abs() <= bound).all()
    q, s = quantize_fp8_channels(W)
    assert s.shape == (48, 1) and torch.equal(s[:, 0], W.abs().amax(dim=1) / 448)
    bound, _ = block_bound(W, s, None)
    assert ((dequantize_fp8(q, s, None, torch.float32) - W).abs() <= bound).all()


def test_a_zero_scale_is_a_zero_block_even_over_deepseeks_nan_codes():
    """DeepSeek's weight_quant stores scale 0 and NaN codes (0/0) for an all-zero block."""
    codes = fp8_codes(130, 260, seed=9)
    scale = positive_scales((2, 3), seed=10)
    scale[1, 2] = 0
    codes.view(torch.uint8)[128:, 256:] = 0x7F  # NaN
    got = dequantize_fp8(codes, scale, (128, 128), dtype=torch.float32, name=NAME)
    assert (got[128:, 256:] == 0).all()
    assert torch.equal(got[:128], reference(codes[:128], scale[:1], (128, 128), torch.float32))


def test_values_at_the_edge_of_float16_pass_the_exact_check():
    """448 * scale rounds to 65504, float16's largest: past the quick range check, then let through."""
    codes = torch.full((4, 6), 448.0).to(torch.float8_e4m3fn)
    scale = torch.full((1, 1), 65510.0 / 448)
    got = dequantize_fp8(codes, scale, (128, 128), dtype=torch.float16)
    assert torch.equal(got, reference(codes, scale, (128, 128), torch.float16)) and (got == 65504).all()


def codes_and_scale():
    return fp8_codes(130, 260, seed=11), positive_scales((2, 3), seed=12)


def with_value(scale, value):
    scale = scale.clone()
    scale[1, 0] = value
    return scale


def nan_code(codes):
    codes = codes.clone()
    codes.view(torch.uint8)[2, 3] = 0xFF
    return codes


# (case, weight, scale, block, dtype, the tensor the message names, words it holds)
BAD = [
    ("missing scale", lambda w, s: (w, None, (128, 128), torch.bfloat16), NAME + "_scale_inv", "missing"),
    ("block grid too small", lambda w, s: (w, s[:, :2], (128, 128), torch.bfloat16), NAME + "_scale_inv",
     "has shape [2, 2], expected [2, 3] for a [130, 260] weight in 128x128 blocks"),
    ("block grid for the wrong block size", lambda w, s: (w, s, (64, 64), torch.bfloat16), NAME + "_scale_inv",
     "expected [3, 5]"),
    ("grid without weight_block_size", lambda w, s: (w, s, None, torch.bfloat16), NAME + "_scale",
     "weight_block_size missing"),
    ("per-channel of the wrong length", lambda w, s: (w, torch.ones(129), None, torch.bfloat16), NAME + "_scale",
     "[130] or [130, 1]"),
    ("NaN scale", lambda w, s: (w, with_value(s, float("nan")), (128, 128), torch.bfloat16), NAME + "_scale_inv",
     "1 NaN or infinite value(s) (the first at [1, 0])"),
    ("infinite scale", lambda w, s: (w, with_value(s, float("inf")), (128, 128), torch.bfloat16),
     NAME + "_scale_inv", "NaN or infinite"),
    ("negative scale", lambda w, s: (w, with_value(s, -1e-3), (128, 128), torch.bfloat16), NAME + "_scale_inv",
     "1 negative value(s) (the first at [1, 0])"),
    ("NaN per-tensor scale", lambda w, s: (w, torch.tensor(float("nan")), None, torch.bfloat16), NAME + "_scale",
     "NaN or infinite"),
    ("integer scale", lambda w, s: (w, torch.ones(2, 3, dtype=torch.int32), (128, 128), torch.bfloat16),
     NAME + "_scale_inv", "int32"),
    ("bf16 weight", lambda w, s: (w.to(torch.bfloat16), s, (128, 128), torch.bfloat16), NAME, "is bfloat16"),
    ("packed FP4 weight", lambda w, s: (w.view(torch.int8), s, (128, 128), torch.bfloat16), NAME, "packed FP4"),
    ("3-D weight", lambda w, s: (w.reshape(2, 65, 260), s, (128, 128), torch.bfloat16), NAME, "2-D"),
    ("NaN code", lambda w, s: (nan_code(w), s, (128, 128), torch.bfloat16), NAME,
     "1 NaN or infinite code(s) (the first at [2, 3])"),
    ("float16 overflow", lambda w, s: (w, s * 1e6, (128, 128), torch.float16), NAME, "beyond float16's range"),
    ("float32 overflow", lambda w, s: (w, with_value(s, 1e37), (128, 128), torch.float32), NAME,
     "beyond float32's range"),
]


@pytest.mark.parametrize("case,make,names,words", BAD, ids=[b[0] for b in BAD])
def test_bad_fp8_tensors_raise_one_line_naming_the_tensor(case, make, names, words):
    weight, scale, block, dtype = make(*codes_and_scale())
    with pytest.raises(QuantMoeError) as info:
        dequantize_fp8(weight, scale, block, dtype=dtype, name=NAME)
    message = str(info.value)
    assert "\n" not in message and message.startswith(names + " ") and words in message, message
    assert "re-download" in message or "dequantize to" in message  # a fix is named


def test_configs_of_real_releases():
    for config in (DEEPSEEK, MINIMAX, DEEPSEEK_V31):
        assert is_fp8_config(config) and block_size(config) == (128, 128)
    assert is_fp8_config(PER_TENSOR) and block_size(PER_TENSOR) is None
    assert not is_fp8_config(GLM45_AIR_FP8)  # compressed-tensors float8 is not this format
    assert not any(is_fp8_config(c) for c in (None, {}, {"quant_method": "gptq", "bits": 4}))
    for bad, words in [({**DEEPSEEK, "expert_dtype": "fp4"}, "expert_dtype"),
                       ({**DEEPSEEK, "weight_block_size": [128]}, "weight_block_size"),
                       ({**DEEPSEEK, "weight_block_size": [0, 128]}, "weight_block_size"),
                       ({**DEEPSEEK, "fmt": "mxfp8"}, "fmt")]:
        with pytest.raises(QuantMoeError, match=words):
            is_fp8_config(bad)


def test_fp8_linears_pairs_each_weight_with_its_scale():
    names = ["a.q_proj.weight", "a.q_proj.weight_scale_inv", "a.norm.weight", "b.o_proj.weight",
             "b.o_proj.weight_scale", "b.o_proj.input_scale", "c.gate.weight", "d.x.bias_scale_inv"]
    assert fp8_linears(iter(names)) == {"a.q_proj.weight": "a.q_proj.weight_scale_inv",
                                        "b.o_proj.weight": "b.o_proj.weight_scale"}


# ----------------------------------------------------------------------------- a synthetic release


def resharded(src, folder):
    """The tiny checkpoint split into two shards with an index, as Hub releases are."""
    shutil.copytree(src, folder)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, part in shards.items():
        save_file({n: tensors[n] for n in part}, folder / shard, metadata={"format": "pt"})
    weight_map = {n: shard for shard, part in shards.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, tensors


def test_write_fp8_release_of_tiny_deepseek_v3(tiny_model, tmp_path):
    import transformers

    src, source = resharded(tiny_model("deepseek_v3"), tmp_path / "bf16")
    routers = ARCHITECTURES["deepseek_v3"].routers

    def is_router(name):
        layer = ".".join(name.split(".")[:3])
        return any(name.startswith(f"{layer}.{r}.") for r in routers)

    dst = write_fp8_release(src, tmp_path / "fp8", block=(128, 128), skip=is_router)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    written = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = load_file(dst / shard)
        assert all(index["weight_map"][n] == shard for n in part)  # each scale beside its weight
        written.update(part)
    assert set(index["weight_map"]) == set(written)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())

    linears = {n for n, t in source.items()
               if n.startswith("model.layers.") and n.endswith(".weight") and t.ndim == 2 and not is_router(n)}
    assert len(linears) > 40 and any(is_router(n) for n in source)
    assert set(written) == set(source) | {n + "_scale_inv" for n in linears}
    assert fp8_linears(written) == {n: n + "_scale_inv" for n in linears}
    for name, t in source.items():
        if name in linears:
            q, s = written[name], written[name + "_scale_inv"]
            assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
            assert s.shape == (math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128))
            bound, _ = block_bound(t.float(), s, (128, 128))
            err = (dequantize_fp8(q, s, (128, 128), torch.float32, name=name) - t.float()).abs()
            assert (err <= bound).all(), name
        else:  # routers, their fp32 bias, norms, embeddings, head: byte for byte
            assert written[name].dtype == t.dtype and torch.equal(written[name], t), name

    config, before = (json.loads((f / "config.json").read_text()) for f in (dst, src))
    assert config.pop("quantization_config") == DEEPSEEK and config == before
    assert (dst / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert not [p.name for p in dst.iterdir() if p.name.startswith(".")]  # no temp files left

    # transformers' own FP8 reader sees the same weights (it dequantizes as it loads, on CPU).
    model = transformers.AutoModelForCausalLM.from_pretrained(
        dst, quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=torch.float32)
    state = model.state_dict()
    for name in ("model.layers.1.self_attn.q_b_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.2.mlp.shared_experts.up_proj.weight"):
        ours = dequantize_fp8(written[name], written[name + "_scale_inv"], (128, 128), torch.float32)
        assert torch.equal(state[name], ours), name
    ours = dequantize_fp8(written["model.layers.1.mlp.experts.5.down_proj.weight"],
                          written["model.layers.1.mlp.experts.5.down_proj.weight_scale_inv"], (128, 128),
                          torch.float32)
    assert torch.equal(state["model.layers.1.mlp.experts.down_proj"][5], ours)
    assert torch.equal(state["model.layers.1.mlp.gate.weight"], source["model.layers.1.mlp.gate.weight"].float())


def test_write_fp8_release_refuses_its_own_source_and_quantized_input(tiny_model, tmp_path):
    src = tiny_model("deepseek_v3")
    with pytest.raises(QuantMoeError, match="overwrite its source"):
        write_fp8_release(src, src)
    fp8 = write_fp8_release(src, tmp_path / "fp8", skip=lambda name: False)
    with pytest.raises(QuantMoeError, match="already quantized"):
        write_fp8_release(fp8, tmp_path / "again")
    with pytest.raises(QuantMoeError, match="not empty"):
        write_fp8_release(src, fp8)
    assert not (tmp_path / "again").exists()


def test_an_fp8_releases_experts_keep_pytorchs_dequantization_where_triton_has_no_float8(monkeypatch):
    """Fp8Experts.weights on a GPU older than compute capability 8.9 (an A100, where Triton has no float8_e4m3fn):
    the one-kernel dequantization (gptq.triton_kernels.fp8_blocks_as_bf16) declines before compiling anything, and
    the experts' weights are PyTorch's dequantization. Simulated on the CPU: Triton said available, the capability
    an A100's."""
    from quantmoe.formats.fp8 import Fp8Experts, Fp8Weight
    from quantmoe.gptq import triton_kernels

    monkeypatch.setattr(triton_kernels, "available", lambda device: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    g = torch.Generator().manual_seed(0)
    block = (128, 128)
    codes, scale = quantize_fp8_blocks(torch.randn(300, 200, generator=g), block)
    out = torch.empty(300, 200)
    assert not triton_kernels.fp8_blocks_as_bf16(codes, scale, block, out)
    experts = Fp8Experts(2, [Fp8Weight(codes[:128], scale[:1], block, "gate"),
                             Fp8Weight(codes[128:], scale[1:], block, "up")], torch.device("cpu"))
    experts.codes[:] = codes
    for e in range(2):
        experts.scales[0][e], experts.scales[1][e] = scale[:1], scale[1:]
    ref = dequantize_fp8(codes, scale, block, torch.bfloat16).float()
    assert torch.equal(experts.weights(0, 2, torch.float32), ref.expand(2, -1, -1))
