"""The loader reads what the peer tools write, without their packages installed:
compressed-tensors pack-quantized linears (llm-compressor) and unfused expert names
(GPTQModel's ``mlp.experts.E.gate_proj``, llm-compressor's ``block_sparse_moe.experts.E.gate_proj``)
with no ``meta.layout`` to say so. benchmarks/peers runs the tools themselves.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCH_NAMES
from safetensors.torch import save_file

from quantmoe.formats.compressed_tensors import dequantize_compressed, unpack_int32
from quantmoe.model.architectures import ARCHITECTURES, GPTQMODEL_PROJ
from quantmoe.model.checkpoint import Checkpoint
from quantmoe.model.stream import LayerStream
from quantmoe.stages.export import checkpoint_stats


def pack_dense(values: list[list[int]], bits: int) -> torch.Tensor:
    """Reference packer written from the format's description: each row is one bit stream,
    element j at bit j * bits, low bits first, cut into int32 words."""
    rows = []
    for row in values:
        acc = sum((v & (2**bits - 1)) << (j * bits) for j, v in enumerate(row))
        words = -(-len(row) * bits // 32)
        rows.append([((acc >> (32 * w)) & 0xFFFFFFFF) - (2**32 if (acc >> (32 * w)) & 0x80000000 else 0)
                     for w in range(words)])
    return torch.tensor(rows, dtype=torch.int32)


# Produced by compressed-tensors 0.19.0 pack_to_int32 (values are signed; it adds 2**(bits-1)).
CT_V4 = [[4, 7, -3, -8, -5, 3, -5, -1, 1, -5, -3, -6, -4, -1, -2, 0],
         [0, 4, 2, -7, -2, -1, -1, 6, 0, -7, -3, 1, 5, 0, 1, -4]]
CT_V4_PACKED = [[1941112316, -2039208647], [-411690296, 1234015512]]
CT_V3 = [[3, -4, 1, 2, -1, 0, 3, -2, 1, -3, 3], [-4, 3, 3, -1, 0, 2, -3, 1, -2, 0, 3]]
CT_V3_PACKED = [[-849461945, 1], [-492353544, 1]]  # the last value straddles two words
CT_Z4 = [[7, -8], [7, 2], [-4, -1], [-5, 6], [3, -6], [-1, 4], [-6, -8], [-8, -4]]
CT_Z4_PACKED_DIM0 = [[41628927, 1086515104]]


@pytest.mark.parametrize("values,bits,packed", [(CT_V4, 4, CT_V4_PACKED), (CT_V3, 3, CT_V3_PACKED)])
def test_unpack_matches_compressed_tensors_pack(values, bits, packed):
    got = unpack_int32(torch.tensor(packed, dtype=torch.int32), bits, len(values[0])) - 2 ** (bits - 1)
    assert got.tolist() == values
    assert pack_dense([[v + 2 ** (bits - 1) for v in row] for row in values], bits).tolist() == packed


def test_zero_points_packed_along_the_output_dim():
    z = torch.tensor(CT_Z4, dtype=torch.float32)
    scale = torch.full((8, 2), 0.5)
    q = torch.zeros(8, 64, dtype=torch.long)  # all levels 0 -> weight = -zero * scale per group
    parts = {"weight_packed": pack_dense((q + 8).tolist(), 4), "weight_scale": scale.half(),
             "weight_shape": torch.tensor([8, 64]), "weight_zero_point": torch.tensor(CT_Z4_PACKED_DIM0, dtype=torch.int32)}
    w = dequantize_compressed(parts)
    assert torch.equal(w[:, :32], (-z[:, :1] * 0.5).expand(8, 32))
    assert torch.equal(w[:, 32:], (-z[:, 1:] * 0.5).expand(8, 32))


def hand_made_linear(rows: int, cols: int, group: int, seed: int = 0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A symmetric int4 compressed-tensors linear, the weight it stands for and its levels."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, cols), generator=g)
    scale = (torch.rand(rows, cols // group, generator=g) + 0.01).half()
    weight = q.float() * scale.float().repeat_interleave(group, dim=1)
    parts = {"weight_packed": pack_dense((q + 8).tolist(), 4), "weight_scale": scale,
             "weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}
    return parts, weight, q


def test_dequantize_hand_made_groups():
    parts, weight, q = hand_made_linear(16, 96, 32)
    assert torch.equal(dequantize_compressed(parts), weight)
    # g_idx (activation order with a permutation) decides each column's group
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(1))
    g_idx = torch.arange(96)[perm] // 32
    w = dequantize_compressed({**parts, "weight_g_idx": g_idx})
    assert torch.equal(w, q.float() * parts["weight_scale"].float()[:, g_idx])
    assert not torch.equal(w, weight)


def test_checkpoint_reads_compressed_tensors_and_counts_bits(tmp_path):
    parts, weight, _ = hand_made_linear(64, 256, 128)
    tensors = {f"model.layers.0.mlp.down_proj.{k}": v for k, v in parts.items()}
    tensors["model.layers.0.input_layernorm.weight"] = torch.ones(256, dtype=torch.float16)
    save_file(tensors, tmp_path / "model.safetensors")
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 128,
                                                                            "symmetric": True, "strategy": "group"}}}}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "quantization_config": qc}))
    state = Checkpoint(tmp_path).read_prefix("model.layers.0.")
    assert set(state) == {"mlp.down_proj.weight", "input_layernorm.weight"}
    assert torch.equal(state["mlp.down_proj.weight"], weight)
    stats = checkpoint_stats(tmp_path)
    # 4 bits + an fp16 scale per 128 weights + the int64 (2,) shape over 64*256 weights
    assert stats["bits_per_weight"] == pytest.approx(4 + 16 / 128 + 128 / (64 * 256))
    # the shape repeats what the config and the packed weight say: not information
    assert stats["information_bits_per_weight"] == pytest.approx(4 + 16 / 128)
    assert stats["quantized_weights"] == 64 * 256


def peer_name(arch, name: str, tool: str) -> str:
    """How GPTQModel / llm-compressor name a source, layer-relative tensor."""
    if tool == "gptqmodel":
        return arch.gptqmodel_name(name)
    # llm-compressor: experts unfused to gate_proj/up_proj/down_proj under the on-disk block prefix
    if arch.experts is None:
        return name
    for which, std in zip(("gate", "up", "down"), GPTQMODEL_PROJ):
        for e in range(64):
            src = arch.experts.linear(which, e) + "."
            if name.startswith(src):
                return arch.experts.prefix.format(e=e) + f".{std}." + name[len(src):]
    return name


# GPTQModel's naming only for the rows that layout is written for (GraniteMoE refuses it).
@pytest.mark.parametrize("model_type,tool", [(m, t) for t in ("gptqmodel", "llmcompressor") for m in ARCH_NAMES
                                             if t != "gptqmodel" or ARCHITECTURES[m].gptqmodel])
def test_unfused_expert_names_are_recognised_without_meta(tiny_model, tmp_path, model_type, tool):
    source = Checkpoint(tiny_model(model_type))
    arch = ARCHITECTURES[model_type]
    renamed = {}
    for name in source.names():
        if name.startswith("model.layers."):
            i = name.split(".")[2]
            prefix = f"model.layers.{i}."
            rel = name[len(prefix):]
            assert arch.from_gptqmodel_name(rel) == rel, "source names must be fixed points"
            renamed[prefix + peer_name(arch, rel, tool)] = source.tensor(name)
        else:
            renamed[name] = source.tensor(name)
    if model_type == "mixtral":
        assert any(".experts.0.gate_proj." in n for n in renamed)
    save_file(renamed, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(source.raw_config))
    theirs = LayerStream(Checkpoint(tmp_path), torch.device("cpu"))
    ours = LayerStream(source, torch.device("cpu"))
    for i in range(ours.num_layers):
        a, b = ours.layer_state(i), theirs.layer_state(i)
        assert not arch.uses_unfused_names(a)
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
        theirs.load_layer(i, b)  # fuses the experts: every projection found under its source name
        theirs.release_layer(i)
