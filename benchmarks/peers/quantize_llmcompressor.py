"""Quantize a checkpoint with llm-compressor (run with the python of the harness's llmcompressor venv).

    python quantize_llmcompressor.py MODEL CALIB.safetensors OUT [--batch-size 8]

Settings fixed by the harness: the W4A16 preset (4 bits, group size 128, symmetric) on
every Linear except the routers; everything else is llm-compressor's default (recorded in
OUT/peer_run.json), including ``moe_calibrate_all_experts=True``: every calibration token
goes through every expert for its Hessian, while the layer output still uses the routed
experts only. The calibration rows are the ``input_ids`` of CALIB, used as they are.
Output: compressed-tensors ``pack-quantized`` (``weight_packed``, ``weight_scale``,
``weight_shape``).
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import torch
from peer_tools import script_arguments

# Routers by exact module-name suffix (transformers 5 in-memory names); llm-compressor
# matches its ignore list against module names, "re:" marking a regex.
IGNORE = ["lm_head", r"re:.*\.mlp\.gate$", r"re:.*\.mlp\.shared_expert_gate$"]


def main() -> None:
    args, ids = script_arguments()  # ids: the calibration rows (N, L), used as they are

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float16)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    modifier = GPTQModifier(targets="Linear", scheme="W4A16", ignore=IGNORE)
    oneshot(model=model, recipe=modifier, dataset=dataset, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, batch_size=args.batch_size)
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    record = {
        "tool": "llmcompressor",
        "version": version("llmcompressor"),
        "call": f"oneshot(model, recipe=GPTQModifier(targets='Linear', scheme='W4A16', ignore={IGNORE}), "
                f"dataset=rows, num_calibration_samples={ids.shape[0]}, max_seq_length={ids.shape[1]}, "
                f"shuffle_calibration_samples=False, batch_size={args.batch_size})",
        "options": json.loads(modifier.model_dump_json()),
        "rare_experts": {"policy": "moe_calibrate_all_experts=True (default): every token feeds every expert's Hessian"},
        "calibration_rows": list(ids.shape),
    }
    Path(args.out, "peer_run.json").write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
