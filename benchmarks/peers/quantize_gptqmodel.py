"""Quantize a checkpoint with GPTQModel (run with the python of the harness's gptqmodel venv).

    python quantize_gptqmodel.py MODEL CALIB.safetensors OUT [--batch-size 8]

Settings fixed by the harness: 4 bits, group size 128, symmetric; everything else is
GPTQModel's default (recorded in OUT/peer_run.json). The calibration rows are the
``input_ids`` of CALIB, fed as they are (no re-tokenizing, no concatenation). GPTQModel's
model definitions never quantize routers (``mlp.gate``, ``mlp.shared_expert_gate``).
"""

from __future__ import annotations

import argparse
import json
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file


def jsonable(value):
    """GPTQModel's config dict holds enums and dtypes; keep their names."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(getattr(value, "value", value))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("calib")
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    from gptqmodel import GPTQModel, QuantizeConfig

    ids = load_file(args.calib)["input_ids"].long()  # (N, L)
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
    qcfg = QuantizeConfig(bits=4, group_size=128, sym=True)
    # fp16 like the source checkpoint (GPTQModel would otherwise pick bf16 on CPU and save bf16 tensors).
    model = GPTQModel.load(args.model, qcfg, device="cpu", dtype=torch.float16)
    model.quantize(calibration, batch_size=args.batch_size)
    model.save(args.out)
    record = {
        "tool": "gptqmodel",
        "version": version("gptqmodel"),
        "call": "GPTQModel.load(model, QuantizeConfig(bits=4, group_size=128, sym=True), device='cpu', "
                f"dtype=torch.float16).quantize(rows, batch_size={args.batch_size})",
        "options": jsonable(qcfg.to_dict()),
        "rare_experts": {"policy": f"fallback {jsonable(qcfg.fallback)}: a module that sees fewer calibration "
                                   "tokens than the threshold is quantized by that strategy instead of GPTQ"},
        "calibration_rows": list(ids.shape),
    }
    Path(args.out, "peer_run.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
