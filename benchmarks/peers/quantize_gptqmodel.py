"""Quantize a checkpoint with GPTQModel (run with the python of the harness's gptqmodel venv).

    python quantize_gptqmodel.py MODEL CALIB.safetensors OUT [--batch-size 8] [--dense-mlp quantize|fp16]

Settings fixed by the harness: 4 bits, group size 128, symmetric; everything else is
GPTQModel's default (recorded in OUT/peer_run.json). On a Qwen2-MoE with dense layers
(``mlp_only_layers``) their MLP is quantized by default, as GPTQModel's definitions of the
other MoE families with dense layers do, so that every tool quantizes the same linears;
``--dense-mlp fp16`` leaves it as GPTQModel's Qwen2-MoE definition does. The calibration rows are the
``input_ids`` of CALIB, fed as they are (no re-tokenizing, no concatenation). GPTQModel's
model definitions never quantize routers (``mlp.gate``, ``mlp.shared_expert_gate``).
"""

from __future__ import annotations

import copy
import enum
import json
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import torch
from peer_tools import script_arguments


def jsonable(value):
    """GPTQModel's config dict holds enums and dtypes; keep their names."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(getattr(value, "value", value))


# The entry GPTQModel's own definitions of MoE families with dense layers (deepseek_v2, glm4_moe,
# dots1) give the dense layers' MLP under "mlp"; its Qwen2-MoE definition has none (released
# Qwen2-MoE models have no dense layers).
DENSE_MLP = ("gate_proj:0:in=x", "up_proj:0:in=x", "down_proj:1")


def with_dense_mlp(tree: list) -> list:
    """GPTQModel's Qwen2-MoE module tree with the dense-layer MLP entry added (in forward order: first)."""
    tree = copy.deepcopy(tree)
    layer = tree[3]
    key = next(k for k in layer if k.split(":")[0] == "mlp")
    layer[key] = {"": DENSE_MLP, **layer[key]}
    return tree


def main() -> None:
    # ids: the calibration rows (N, L), used as they are
    args, ids = script_arguments(more=lambda p: p.add_argument(
        "--dense-mlp", choices=("quantize", "fp16"), default="quantize",
        help="dense (mlp_only_layers) layers' MLP: quantized as GPTQModel's deepseek_v2/glm4_moe definitions "
             "do, or left fp16 as its Qwen2-MoE definition does"))

    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.models.definitions.qwen2_moe import Qwen2MoeQModel

    config = json.loads(Path(args.model, "config.json").read_text())
    dense_layers = bool(config.get("mlp_only_layers")) or (config.get("decoder_sparse_step") or 1) > 1
    workaround = None
    if dense_layers:
        # GPTQModel's Qwen2-MoE tree expects mlp.shared_expert/experts in every layer and stops with
        # "layer module item `mlp.shared_expert.gate_proj` not found" on a dense (mlp_only_layers) layer.
        # Its own definitions for such models (glm4_moe, dots1, ...) set layer_modules_strict = False,
        # which skips the modules a layer lacks.
        if args.dense_mlp == "quantize":
            Qwen2MoeQModel.module_tree = with_dense_mlp(Qwen2MoeQModel.module_tree)
            workaround = ("layer_modules_strict=False, and the dense (mlp_only_layers) layers' MLP added to the Qwen2-MoE "
                          "module tree as GPTQModel's deepseek_v2/glm4_moe/dots1 definitions have it: quantized")
        else:
            workaround = ("layer_modules_strict=False (the model has dense mlp_only_layers that GPTQModel's Qwen2-MoE "
                          "tree does not describe; their MLP stays fp16)")

    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
    qcfg = QuantizeConfig(bits=4, group_size=128, sym=True)
    # fp16 like the source checkpoint (GPTQModel would otherwise pick bf16 on CPU and save bf16 tensors).
    model = GPTQModel.load(args.model, qcfg, device="cpu", dtype=torch.float16)
    if dense_layers:
        model.layer_modules_strict = False
    model.quantize(calibration, batch_size=args.batch_size)
    model.save(args.out)
    record = {
        "tool": "gptqmodel",
        "version": version("gptqmodel"),
        "call": "GPTQModel.load(model, QuantizeConfig(bits=4, group_size=128, sym=True), device='cpu', "
                f"dtype=torch.float16).quantize(rows, batch_size={args.batch_size})",
        "options": jsonable(qcfg.to_dict()),
        "workaround": workaround,
        "rare_experts": {"policy": f"fallback {jsonable(asdict(qcfg.fallback))}: a module that sees fewer "
                                   "calibration tokens than the threshold is quantized by that strategy instead of GPTQ"},
        "calibration_rows": list(ids.shape),
    }
    Path(args.out, "peer_run.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
