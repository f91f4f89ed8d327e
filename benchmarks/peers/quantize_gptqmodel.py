"""Quantize a checkpoint with GPTQModel (run with the python of the harness's gptqmodel venv).

    python quantize_gptqmodel.py MODEL CALIB.safetensors OUT [--batch-size 8]

Settings fixed by the harness: 4 bits, group size 128, symmetric; everything else is
GPTQModel's default (recorded in OUT/peer_run.json). The calibration rows are the
``input_ids`` of CALIB, fed as they are (no re-tokenizing, no concatenation). GPTQModel's
model definitions never quantize routers (``mlp.gate``, ``mlp.shared_expert_gate``).
"""

from __future__ import annotations

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


def main() -> None:
    args, ids = script_arguments()  # ids: the calibration rows (N, L), used as they are

    from gptqmodel import GPTQModel, QuantizeConfig

    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
    qcfg = QuantizeConfig(bits=4, group_size=128, sym=True)
    # fp16 like the source checkpoint (GPTQModel would otherwise pick bf16 on CPU and save bf16 tensors).
    model = GPTQModel.load(args.model, qcfg, device="cpu", dtype=torch.float16)
    config = model.model.config
    dense_layers = bool(getattr(config, "mlp_only_layers", None)) or (getattr(config, "decoder_sparse_step", 1) or 1) > 1
    workaround = None
    if dense_layers:
        # GPTQModel's Qwen2-MoE tree expects mlp.shared_expert/experts in every layer and stops with
        # "layer module item `mlp.shared_expert.gate_proj` not found" on a dense (mlp_only_layers) layer.
        # Its own definitions for such models (glm4_moe, dots1, ...) set layer_modules_strict = False,
        # which skips the missing modules; the dense MLP is then not in its tree and stays fp16.
        model.layer_modules_strict = False
        workaround = ("layer_modules_strict=False (the model has dense mlp_only_layers that GPTQModel's tree "
                      "does not describe; their MLP stays fp16)")
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
