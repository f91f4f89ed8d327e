"""Two tiny trained MoE checkpoints for tests, examples and docs.

Both are Hub-layout float16 safetensors folders with their tokenizer, made by
``train.py`` beside this file from the calibration text in ``calibration_data/``;
each folder's README.md is its model card (held-out perplexity, expert shares,
the command that made it).
"""

from pathlib import Path

DEMO_MODELS_DIR = Path(__file__).resolve().parent
# MixtralForCausalLM: 4 layers, hidden 128, 8 experts top-2.
MIXTRAL_DEMO = DEMO_MODELS_DIR / "mixtral-demo"
# Qwen2MoeForCausalLM: 4 layers (layer 0 dense), hidden 128, 16 experts top-4, shared expert.
QWEN2MOE_DEMO = DEMO_MODELS_DIR / "qwen2moe-demo"
