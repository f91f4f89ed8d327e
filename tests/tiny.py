"""Tiny models built from transformers configs, one per architecture row, for the tests.

Weights are random but the checkpoint layout is real: ``save_pretrained`` writes the
Hub on-disk names. A small byte-level BPE tokenizer is trained on the fly, so nothing
needs the network.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Per model_type: the config class name and a few overrides that keep the model tiny.
# Widths are multiples of 32 so group sizes 32 and -1 divide every input.
TINY = {
    "mixtral": ("MixtralConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_local_experts=4,
                                      num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                                         shared_expert_intermediate_size=96, num_hidden_layers=3, num_experts=6,
                                         num_experts_per_tok=3, num_attention_heads=4, num_key_value_heads=2,
                                         mlp_only_layers=[0], max_position_embeddings=256, qkv_bias=True)),
}

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Mixture of experts routes each token to a few experts. "
    "Quantization maps weights to a small grid of levels; GPTQ corrects each rounding error with the Hessian. "
    "Python's standard library has modules for files, text, numbers, time and the network. "
)


def make_tokenizer(folder: Path, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def make_model(model_type: str, folder: Path, seed: int = 0, dtype=torch.float16, **overrides) -> Path:
    """Save a tiny random ``model_type`` checkpoint with a tokenizer into ``folder``."""
    import transformers

    cls_name, kwargs = TINY[model_type]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    config = getattr(transformers, cls_name)(vocab_size=len(tok), **{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.to(dtype).save_pretrained(folder)
    return folder


def write_text(path: Path, repeats: int = 60) -> Path:
    """A JSONL file of simple documents, long enough for small calibration/eval runs."""
    import json
    import random

    rng = random.Random(0)
    words = CORPUS.split()
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(120))}) for _ in range(repeats)]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)
