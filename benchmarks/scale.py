"""Real-scale speed and memory: a checkpoint with a released MoE's real shapes, quantized by ``quantmoe quantize``.

The checkpoint is written here, layer by layer, as Hub-layout safetensors shards of random
weights at the shapes of one of the released models in SHAPES (each row is that model's
config.json, with its source): Mixtral-8x7B, Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Next, DeepSeek-V3,
DeepSeek-V3.2, GLM-5, GLM-5.2, Kimi K2, MiniMax-M2 or GLM-4.5. Only the depth is cut (``--layers N``): a model whose first layers are
dense keeps one dense layer, then N-1 MoE layers (``first_k_dense_replace`` 1), and the
multi-token-prediction layer is left out unless ``--mtp``. Tensor names and shapes are
what ``save_pretrained`` writes for that config: transformers builds the model on the meta
device (no memory) and its own save-time conversion gives the on-disk names (experts one
per expert). The weights are bf16 (``--source bf16``) or the FP8 format of DeepSeek's
releases (``--source fp8``: float8_e4m3fn codes and a float32 ``weight_scale_inv`` per
128 x 128 block for every linear of the decoder layers except routers); they are drawn on
the GPU when there is one, and the generator holds one shard (at most one layer) at a time.

Calibration is a token file of random ids (128 x 2048). The quantization runs as a child
process through the normal CLI with --no-eval, and is measured from outside (wall time, peak
RSS sampled every 20 ms) and from inside (the per-layer ``timings``, ``peak_gpu_mb`` and
``peak_rss_mb`` that the pipeline records in quantization_log.json). ``--eval`` also times
``quantmoe eval OUT --baseline MODEL`` on random text (``--eval-tokens``, default 300k).

    python benchmarks/scale.py                                   # Mixtral-8x7B, 2 layers, on the GPU
    python benchmarks/scale.py --shape deepseek-v3 --source fp8  # one dense + one MoE layer, from FP8
    python benchmarks/scale.py --shape qwen3-30b-a3b --layers 4 --tf32   # pipeline options pass through
    python benchmarks/scale.py --shape qwen3-235b-a22b --eval    # and time the evaluation
    python benchmarks/scale.py --reduced                         # Mixtral at hidden 512, 32 x 256 tokens, on CPU
    python benchmarks/scale.py --shape deepseek-v3 --reduced     # the same structure at small widths, on CPU
    python benchmarks/scale.py --compare OUT_A OUT_B --model MODEL   # how far two outputs differ

Results go to benchmarks/results/<name>.json (--name; by default named after the device and
shape). benchmarks/README.md indexes the files that back a published number; other runs are archived.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import psutil
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers.core_model_loading import revert_weight_conversion

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this tree's quantmoe, when run as a script

from quantmoe.base.errors import QuantMoeError  # noqa: E402
from quantmoe.base.files import atomic_write_json, save_safetensors  # noqa: E402
from quantmoe.formats.fp8 import quantize_fp8_blocks  # noqa: E402
from quantmoe.formats.gptq_v1 import GPTQ_SUFFIXES, dequantize_linear, unpack_linear  # noqa: E402
from quantmoe.gptq import core as gptq  # noqa: E402
from quantmoe.model.checkpoint import Checkpoint  # noqa: E402
from quantmoe.stages.calibrate import read_calibration, write_calibration  # noqa: E402
from quantmoe.stages.quantize import work_dir  # noqa: E402
from quantmoe.stages.resume import layer_file  # noqa: E402

FULL_TOKENS = (128, 2048)     # calibration sequences x length, as the issues ask
REDUCED_TOKENS = (32, 256)
FULL_EVAL_TOKENS = 300_000    # wikitext-2's test split is about this long (issue 20)
INIT_STD = 0.02               # transformers' initializer_range
FP8_BLOCK = (128, 128)
# DeepSeek-V3's README_WEIGHTS.md; Kimi K2 and the Qwen3 FP8 releases write the same block.
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
              "weight_block_size": list(FP8_BLOCK)}
GENERATOR_FILE = "scale_checkpoint.json"  # how the checkpoint was generated; a matching one is reused
# The releases' shards are a few GB; a larger layer (a DeepSeek-V3 MoE layer) is cut into several,
# which bounds the generator's host memory (a shard and its serialised copy).
MAX_SHARD_BYTES = 5 * 10**9
WRITING = ".scale-writing"  # in a checkpoint folder while make_checkpoint writes it


# -- the shapes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """One released model: its config.json fields and what the generator needs beside them."""

    name: str
    source: str                  # where ``config`` was taken from
    # The release's config.json, less auto_map, transformers_version and quantization_config.
    config: dict
    # Layer-relative router modules: never FP8 (the releases keep them BF16). The same paths as
    # quantmoe's architecture rows (tests/test_scale_cpu.py checks where a row exists).
    routers: tuple[str, ...]
    # Overrides for --reduced: the same structure (attention kind, router, dense layers, shared
    # expert) at widths and expert counts a CPU quantizes in seconds.
    reduced: dict
    # What the release ships as FP8; --source fp8 always writes DeepSeek's block format.
    fp8_release: str
    # Other layer-relative linears the release keeps BF16 (DeepSeek-V3.2's indexer weights_proj): among the row's
    # ``kept`` (which also holds the indexer's wk, released in FP8).
    kept: tuple[str, ...] = ()
    # Layer-relative tensors stored float32 (DeepSeek's router correction bias); the rest is bf16.
    fp32: tuple[str, ...] = ()
    # Whether the MTP layer ships its own embed_tokens and shared_head.head (DeepSeek) or shares
    # the model's (GLM, as vLLM loads it).
    mtp_own_head: bool = True
    # The transformers model_type that builds this model, when the release's is remote code.
    transformers_type: str | None = None
    # Whether every layer ships its rotary table, ``self_attn.rotary_emb.inv_freq`` (Kimi K2).
    rotary_tables: bool = False
    notes: str = ""


_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
_QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}
# zai-org/GLM-5.1's config.json (GLM-5's differs in no field here), verbatim from a model-info report.
_GLM_5 = {
    "architectures": ["GlmMoeDsaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "dtype": "bfloat16",
    "eos_token_id": [154820, 154827, 154829], "ep_size": 1, "first_k_dense_replace": 3, "head_dim": 64,
    "hidden_act": "silu", "hidden_size": 6144, "index_head_dim": 128, "index_n_heads": 32, "index_topk": 2048,
    "indexer_rope_interleave": True, "initializer_range": 0.02, "intermediate_size": 12288, "kv_lora_rank": 512,
    "max_position_embeddings": 202752, "model_type": "glm_moe_dsa", "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "n_group": 1, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 64,
    "num_experts_per_tok": 8, "num_hidden_layers": 78, "num_key_value_heads": 64, "num_nextn_predict_layers": 1,
    "pad_token_id": 154820, "pretraining_tp": 1, "q_lora_rank": 2048, "qk_head_dim": 256, "qk_nope_head_dim": 192,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-05, "rope_interleave": True,
    "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"}, "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid", "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc",
    "use_cache": True, "v_head_dim": 256, "vocab_size": 154880,
}
# Reduced widths keep the multiples of 128 that the FP8 blocks and GPTQ's groups see in the
# releases, except where the release itself is ragged (DeepSeek's kv_a_proj_with_mqa has
# kv_lora_rank + qk_rope_head_dim rows: 576 there, 192 here).
_REDUCED_MLA = {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "n_routed_experts": 16,
                "num_experts_per_tok": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 256,
                "kv_lora_rank": 128, "qk_nope_head_dim": 64, "qk_rope_head_dim": 64, "v_head_dim": 64,
                "vocab_size": 4096}
_REDUCED_GQA = {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "num_experts_per_tok": 4,
                "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 4096}

_GLM_5_SHAPE = Shape(
    name="glm-5",
    source="zai-org/GLM-5.1 config.json, verbatim from a model-info report (GLM-5's differs in no field here: "
           "vLLM issue #36220 quotes the same sizes), and its tensor inventory from the same report",
    config=_GLM_5,
    routers=("mlp.gate",),
    reduced={**_REDUCED_MLA, "index_n_heads": 4, "index_head_dim": 128},
    fp8_release="zai-org/GLM-5-FP8: block-wise, 128 x 128 (the format written here), the indexer's weights_proj "
                "in BF16",
    kept=("self_attn.indexer.weights_proj",),
    fp32=("mlp.gate.e_score_correction_bias",),
    mtp_own_head=False,
    notes="DeepSeek-V3.2's sparse attention (an indexer of 32 heads of 128) and MoE block: 256 experts of 2048 in "
          "one group, 64 heads of 192 + 64 (values 256), 78 layers of which 3 dense",
)


SHAPES: dict[str, Shape] = {row.name: row for row in (
    Shape(
        name="mixtral-8x7b",
        source="mistralai/Mixtral-8x7B-v0.1 config.json, verbatim as NVIDIA TensorRT-LLM's unit test "
               "MIXTRAL_8X7B_CONFIG quotes it",
        config={
            "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
            "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
            "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
            "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
            "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
            "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000},
        routers=("block_sparse_moe.gate",),
        reduced={"hidden_size": 512, "intermediate_size": 1792},  # as before the other shapes (published CPU run)
        fp8_release="none (Mistral ships BF16); --source fp8 writes DeepSeek's block format",
    ),
    Shape(
        name="qwen3-30b-a3b",
        source="Qwen/Qwen3-30B-A3B config.json, verbatim (an MLX copy and a GPTQ copy agree); the -FP8 release adds "
               "the quantization_config of FP8_CONFIG (reconstructed: its 128 block is confirmed by vLLM PR #44763)",
        config=_QWEN3_30B_A3B,
        routers=("mlp.gate",),
        reduced={**_REDUCED_GQA, "num_experts": 16, "num_attention_heads": 4, "intermediate_size": 384},
        fp8_release="Qwen/Qwen3-30B-A3B-FP8: block-wise, 128 x 128 (the format written here)",
    ),
    Shape(
        name="qwen3-235b-a22b",
        source="Qwen/Qwen3-235B-A22B config.json, reconstructed: the 30B-A3B key set with the 235B values of the "
               "Instruct-2507 config, and the original's max_position_embeddings 40960",
        config={**_QWEN3_30B_A3B, "hidden_size": 4096, "intermediate_size": 12288, "max_window_layers": 94,
                "moe_intermediate_size": 1536, "num_attention_heads": 64, "num_hidden_layers": 94},
        routers=("mlp.gate",),
        reduced={**_REDUCED_GQA, "num_experts": 16},
        fp8_release="Qwen/Qwen3-235B-A22B-FP8: block-wise, 128 x 128 (the format written here)",
    ),
    Shape(
        name="qwen3-next",
        source="Qwen/Qwen3-Next-80B-A3B-Instruct config.json, verbatim from a model-info report, with its tensor "
               "inventory; layer_types left to the config (3 linear-attention layers to 1 full, "
               "full_attention_interval 4)",
        config={"architectures": ["Qwen3NextForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
                "decoder_sparse_step": 1, "eos_token_id": 151645, "full_attention_interval": 4, "head_dim": 256,
                "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5120,
                "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
                "linear_num_value_heads": 32, "linear_value_head_dim": 128, "max_position_embeddings": 262144,
                "mlp_only_layers": [], "model_type": "qwen3_next", "moe_intermediate_size": 512,
                "norm_topk_prob": True, "num_attention_heads": 16, "num_experts": 512, "num_experts_per_tok": 10,
                "num_hidden_layers": 48, "num_key_value_heads": 2, "output_router_logits": False,
                "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000000,
                "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 512, "tie_word_embeddings": False,
                "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
        routers=("mlp.gate", "mlp.shared_expert_gate"),
        reduced={**_REDUCED_GQA, "num_experts": 16, "shared_expert_intermediate_size": 128, "linear_num_key_heads": 2,
                 "linear_num_value_heads": 4, "linear_key_head_dim": 64, "linear_value_head_dim": 64},
        fp8_release="Qwen/Qwen3-Next-80B-A3B-Instruct-FP8: block-wise, 128 x 128 (the format written here), the "
                    "linear attention's in_proj_ba in BF16; its MTP block (mtp.*) is not written here",
        kept=("linear_attn.in_proj_ba",),
        notes="512 experts of 512 (top-10) and a gated shared expert; 36 of 48 layers linear attention (Gated "
              "DeltaNet: 16 key heads, 32 value heads of 128), the others gated full attention (16 heads of 256)",
    ),
    Shape(
        name="qwen3.5-397b-a17b",
        source="Qwen/Qwen3.5-397B-A17B config.json's text_config, verbatim from a copy of the release's config.json "
               "(ai-dynamo/aiconfigurator's model_configs), its rope_parameters (left out of that copy) from the "
               "35B-A3B release's; layer_types left to the config (full_attention_interval 4). The release nests this "
               "language model in a vision-language model (model.language_model.*, a vision tower): written here as "
               "the text-only checkpoint quantmoe reads it as, the per-layer work being the same",
        config={"architectures": ["Qwen3_5MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                "attn_output_gate": True, "dtype": "bfloat16", "eos_token_id": 248044, "full_attention_interval": 4,
                "head_dim": 256, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
                "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
                "linear_num_value_heads": 64, "linear_value_head_dim": 128, "max_position_embeddings": 262144,
                "model_type": "qwen3_5_moe_text", "moe_intermediate_size": 1024, "num_attention_heads": 32,
                "num_experts": 512, "num_experts_per_tok": 10, "num_hidden_layers": 60, "num_key_value_heads": 2,
                "rms_norm_eps": 1e-06, "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 1024,
                "tie_word_embeddings": False, "use_cache": True, "vocab_size": 248320,
                "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10],
                                    "partial_rotary_factor": 0.25, "rope_theta": 10000000, "rope_type": "default"}},
        routers=("mlp.gate", "mlp.shared_expert_gate"),
        reduced={**_REDUCED_GQA, "num_experts": 16, "shared_expert_intermediate_size": 128, "linear_num_key_heads": 2,
                 "linear_num_value_heads": 4, "linear_key_head_dim": 64, "linear_value_head_dim": 64},
        fp8_release="Qwen/Qwen3.5-397B-A17B-FP8: block-wise, 128 x 128 (the format written here), one linear per "
                    "routed expert, the linear attention's in_proj_b and in_proj_a in BF16; its vision tower and MTP "
                    "block are not written here (the BF16 release stores the routed experts fused; written here one "
                    "linear per expert, as the FP8 release stores them)",
        kept=("linear_attn.in_proj_b", "linear_attn.in_proj_a"),
        notes="512 experts of 1024 (top-10) and a gated shared expert in every layer; 45 of 60 layers linear attention "
              "(Gated DeltaNet: 16 key heads, 64 value heads of 128), the others gated full attention (32 heads of "
              "256, 2 KV heads)",
    ),
    Shape(
        name="deepseek-v3",
        source="deepseek-ai/DeepSeek-V3 config.json, reconstructed from a printed DeepseekV3Config of the repo, "
               "vllm-ascend issue #206 (its raw config.json) and the repo's inference/configs/config_671B.json; "
               "quantization_config from its README_WEIGHTS.md",
        config=_DEEPSEEK_V3,
        routers=("mlp.gate",),
        reduced={**_REDUCED_MLA, "n_group": 4, "topk_group": 2},
        fp8_release="deepseek-ai/DeepSeek-V3: block-wise, 128 x 128 (the format written here)",
        fp32=("mlp.gate.e_score_correction_bias",),
    ),
    Shape(
        name="deepseek-v3.2",
        source="deepseek-ai/DeepSeek-V3.2 config.json, reconstructed: DeepSeek-V3's (above) with model_type "
               "deepseek_v32 and the indexer of the release's inference/config_671B_v3.2.json (index_n_heads 64, "
               "index_head_dim 128, index_topk 2048), which transformers 5.25's DeepseekV32Config has as defaults",
        config={**_DEEPSEEK_V3, "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32",
                "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048},
        routers=("mlp.gate",),
        reduced={**_REDUCED_MLA, "n_group": 4, "topk_group": 2, "index_n_heads": 4, "index_head_dim": 128},
        fp8_release="deepseek-ai/DeepSeek-V3.2: block-wise, 128 x 128 (the format written here), the indexer's "
                    "weights_proj in BF16",
        kept=("self_attn.indexer.weights_proj",),
        fp32=("mlp.gate.e_score_correction_bias",),
        notes="DeepSeek-V3 with sparse attention: an indexer (64 heads of 128) picks each query's 2048 keys",
    ),
    _GLM_5_SHAPE,
    replace(
        _GLM_5_SHAPE, name="glm-5.2",
        source="zai-org/GLM-5.2 config.json, reconstructed: GLM-5.1's (above) with the values a training framework "
               "checks for GLM-5.2 (index_topk_freq 4, index_skip_topk_offset 3: the indexer runs in layers 0-2 and "
               "every fourth layer after, the others reuse its choice; rope_theta 8000000) and its 1M context",
        config={**_GLM_5, "index_topk_freq": 4, "index_skip_topk_offset": 3, "max_position_embeddings": 1048576,
                "rope_parameters": {"rope_theta": 8000000, "rope_type": "default"}},
        fp8_release="zai-org/GLM-5.2-FP8: block-wise, 128 x 128 (the format written here), the indexer's weights_proj "
                    "in BF16; layers that reuse another's indexer choice hold no indexer",
        notes="GLM-5.1's shapes; with --layers 4, layers 0-2 run their indexer and layer 3 reuses layer 2's choice",
    ),
    Shape(
        name="kimi-k2",
        source="moonshotai/Kimi-K2-Instruct config.json, verbatim from a model-info report (auto_map left "
               "out: no remote code is written); its tensor inventory from the same report",
        config={**{k: v for k, v in _DEEPSEEK_V3.items() if k != "ep_size"}, "model_type": "kimi_k2",
                "bos_token_id": 163584, "eos_token_id": 163585, "first_k_dense_replace": 1,
                "max_position_embeddings": 131072, "n_group": 1, "n_routed_experts": 384, "num_attention_heads": 64,
                "num_key_value_heads": 64, "num_nextn_predict_layers": 0, "rope_theta": 50000.0,
                "routed_scaling_factor": 2.827, "topk_group": 1, "vocab_size": 163840,
                "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0,
                                 "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"}},
        routers=("mlp.gate",),
        reduced={**_REDUCED_MLA, "n_routed_experts": 24},
        fp8_release="moonshotai/Kimi-K2-Instruct: block-wise, 128 x 128 (the format written here)",
        fp32=("mlp.gate.e_score_correction_bias",),
        transformers_type="deepseek_v3",  # its `architectures` entry: DeepseekV3ForCausalLM
        rotary_tables=True,
        notes="the DeepSeek-V3 architecture with 384 experts, 64 heads, one dense layer and no MTP layer",
    ),
    Shape(
        name="minimax-m2",
        source="MiniMaxAI/MiniMax-M2 config.json, reconstructed from transformers 5.25's MiniMaxM2Config, whose "
               "defaults are the release's sizes and which reads the release's partial rotary from rotary_dim",
        config={"architectures": ["MiniMaxM2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 200034,
                "eos_token_id": 200020, "head_dim": 128, "hidden_act": "silu", "hidden_size": 3072,
                "initializer_range": 0.02, "intermediate_size": 1536, "max_position_embeddings": 196608,
                "model_type": "minimax_m2", "num_attention_heads": 48, "num_experts_per_tok": 8,
                "num_hidden_layers": 62, "num_key_value_heads": 8, "num_local_experts": 256, "rms_norm_eps": 1e-06,
                "rope_theta": 5000000, "rotary_dim": 64, "router_aux_loss_coef": 0.001, "tie_word_embeddings": False,
                "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 200064},
        routers=("block_sparse_moe.gate",),
        reduced={**{k: v for k, v in _REDUCED_GQA.items() if k != "moe_intermediate_size"}, "intermediate_size": 128,
                 "num_local_experts": 16, "rotary_dim": 32},
        fp8_release="MiniMaxAI/MiniMax-M2: block-wise, 128 x 128 (the format written here)",
        fp32=("block_sparse_moe.gate.weight", "block_sparse_moe.e_score_correction_bias"),
        notes="Mixtral's names; 256 experts of width 1536 (intermediate_size); a sigmoid router with a correction "
              "bias, both fp32; q/k norms over all heads; partial rotary (rotary_dim 64 of 128)",
    ),
    Shape(
        name="glm-4.5",
        source="zai-org/GLM-4.5 config.json, reconstructed from transformers' convert_glm4_moe_weights_to_hf.py, "
               "a test's copy of GLM-4.6's (which differs in max_position_embeddings alone) and llama.cpp PR #15026",
        config={
            "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
            "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu",
            "hidden_size": 5120, "partial_rotary_factor": 0.5, "initializer_range": 0.02, "intermediate_size": 12288,
            "max_position_embeddings": 131072, "model_type": "glm4_moe", "moe_intermediate_size": 1536,
            "norm_topk_prob": True, "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 160,
            "n_shared_experts": 1, "routed_scaling_factor": 2.5, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
            "num_hidden_layers": 92, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": None,
            "rope_theta": 1000000, "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "use_cache": True, "use_qk_norm": True, "vocab_size": 151552},
        routers=("mlp.gate",),
        reduced={**_REDUCED_GQA, "n_routed_experts": 16},
        fp8_release="zai-org/GLM-4.5-FP8 is compressed-tensors FP8 with per-channel weight_scale, not this "
                    "format; --source fp8 writes DeepSeek's block format",
        fp32=("mlp.gate.e_score_correction_bias",),
        mtp_own_head=False,
        notes="GQA with q/k/v biases, partial rotary (0.5) and q/k norms; sigmoid router with a correction bias",
    ),
)}


def run_config(shape: Shape, layers: int, reduced: bool = False, mtp: bool = False,
               overrides: dict | None = None) -> tuple[dict, dict]:
    """The config.json of a ``layers``-deep checkpoint of ``shape``, and what it changes from the
    release: {field: {"release": value, "here": value}}.

    A model with dense first layers keeps one (``first_k_dense_replace`` 1), then MoE layers;
    ``num_nextn_predict_layers`` says whether an MTP layer follows (``mtp``). ``overrides``
    replace config fields (the tests' tiny widths).
    """
    if layers < 1:
        raise QuantMoeError(f"--layers is {layers}; a checkpoint needs at least 1 decoder layer")
    release = {**shape.config, **(shape.reduced if reduced else {}), **(overrides or {})}
    for key, ours in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 2)):
        # A special token beyond a reduced vocabulary becomes write_tokenizer's <s> or </s>.
        ids = release.get(key)
        if ids is not None and max(ids if isinstance(ids, list) else [ids]) >= release["vocab_size"]:
            release[key] = ours
    if release.get("mlp_only_layers") or (release.get("decoder_sparse_step") or 1) != 1:
        raise QuantMoeError(f"{shape.name}: only dense first layers (first_k_dense_replace) are cut to depth here; "
                            "mlp_only_layers and decoder_sparse_step must stay [] and 1")
    if mtp and not release.get("num_nextn_predict_layers"):
        raise QuantMoeError(f"{shape.name} has no multi-token-prediction layer (num_nextn_predict_layers is "
                            f"{release.get('num_nextn_predict_layers', 'absent')}); leave out --mtp")
    here = {"num_hidden_layers": layers}
    if release.get("first_k_dense_replace"):
        here["first_k_dense_replace"] = 1
    if "num_nextn_predict_layers" in release:
        here["num_nextn_predict_layers"] = 1 if mtp else 0
    changes = {k: {"release": shape.config.get(k), "here": v} for k, v in here.items() if shape.config.get(k) != v}
    return {**release, **here}, changes


def layer_kinds(config: dict) -> list[str]:
    """"dense" or "moe" for each decoder layer of a config from run_config (dense first layers only)."""
    dense = config.get("first_k_dense_replace") or 0
    return ["dense" if i < dense else "moe" for i in range(config["num_hidden_layers"])]


class TensorSpec(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype
    fp8: bool                   # an FP8 linear under --source fp8
    rope_theta: float | None = None  # a rotary table 1 / theta^(2i / dim), not random


def transformers_config(config: dict, shape: Shape):
    """transformers' config object for a config.json dict of ``shape`` (Kimi K2's remote-code
    model_type read as the transformers type that builds it)."""
    fields = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config")}
    return transformers.AutoConfig.for_model(shape.transformers_type or config["model_type"], **fields)


def layer_templates(config: dict, shape: Shape) -> tuple[dict, list[dict]]:
    """(outside the layers, each decoder layer): {on-disk name: shape}, layer-relative for the
    layers, as ``save_pretrained`` writes a model of ``config`` (the run's: its layers differ where the
    config names kinds of layer, Qwen3-Next's linear and full attention).

    transformers builds the model on the meta device (no memory at any width) and its
    save-time conversion (``revert_weight_conversion``) names the tensors as a checkpoint on
    the Hub does, experts one per expert.
    """
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers_config(config, shape))
    shapes = {k: tuple(v.shape) for k, v in revert_weight_conversion(model, model.state_dict()).items()}

    def layer(i: int) -> dict:
        prefix = f"model.layers.{i}."
        return {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}

    outside = {k: s for k, s in shapes.items() if not k.startswith("model.layers.")}
    return outside, [layer(i) for i in range(config["num_hidden_layers"])]


def mtp_extras(config: dict, shape: Shape) -> dict[str, tuple[int, ...]]:
    """Layer-relative tensors an MTP layer has beside its decoder block (DeepSeek-V3's inventory;
    GLM's without its own head and embedding, which vLLM ties to the model's)."""
    H, V = config["hidden_size"], config["vocab_size"]
    out = {"eh_proj.weight": (H, 2 * H), "enorm.weight": (H,), "hnorm.weight": (H,), "shared_head.norm.weight": (H,)}
    if shape.mtp_own_head:
        out.update({"shared_head.head.weight": (V, H), "embed_tokens.weight": (V, H)})
    return out


def tensor_plan(config: dict, shape: Shape, mtp: bool = False) -> list[tuple[str, dict[str, TensorSpec]]]:
    """The checkpoint's parts in writing order, (kind, {tensor name: TensorSpec}): the embeddings
    and head ("outside"), then each decoder layer ("dense" or "moe"), then with ``mtp`` the MTP
    layer ("mtp")."""
    outside, layers = layer_templates(config, shape)
    if shape.rotary_tables:  # not a parameter of transformers' model, so not in the templates
        for template in layers:
            template["self_attn.rotary_emb.inv_freq"] = (config["qk_rope_head_dim"] // 2,)

    def specs(prefix: str, template: dict, linears: bool) -> dict[str, TensorSpec]:
        out = {}
        for rel, dims in template.items():
            dtype = torch.float32 if rel in shape.fp32 else torch.bfloat16
            fp8 = (linears and len(dims) == 2 and rel.endswith(".weight")
                   and rel.removesuffix(".weight") not in shape.routers + shape.kept)
            theta = config["rope_theta"] if rel.endswith("rotary_emb.inv_freq") else None
            out[prefix + rel] = TensorSpec(dims, dtype, fp8, theta)
        return out

    parts = [("outside", specs("", outside, linears=False))]
    kinds = layer_kinds(config)
    for i, kind in enumerate(kinds):
        parts.append((kind, specs(f"model.layers.{i}.", layers[i], True)))
    if mtp:
        n = config["num_hidden_layers"]
        # An MoE layer's block, one with the most tensors: GLM-5.2's MTP layer runs its own indexer (vLLM's
        # deepseek_v2.py builds one in every MTP layer) though its last decoder layer may reuse another's choice.
        # A run of one dense layer takes the block of a two-layer model's second (MoE) layer.
        moe = [t for t, k in zip(layers, kinds) if k == "moe"] or \
            [layer_templates({**config, "num_hidden_layers": 2, "first_k_dense_replace": 1}, shape)[1][1]]
        block = specs(f"model.layers.{n}.", max(moe, key=len), True)
        block.update(specs(f"model.layers.{n}.", mtp_extras(config, shape), linears=False))  # BF16 in the release
        parts.append(("mtp", block))
    return parts


def spec_bytes(spec: TensorSpec, source: str) -> int:
    """Bytes on disk of one tensor, its FP8 block scale included."""
    n = math.prod(spec.shape)
    if spec.fp8 and source == "fp8":
        return n + 4 * math.prod(math.ceil(d / b) for d, b in zip(spec.shape, FP8_BLOCK))
    return n * spec.dtype.itemsize


def disk_estimate(plan: list, source: str, bits: int = 4) -> dict:
    """Bytes of the checkpoint, and about how many the quantization writes at its peak: each
    layer's packed file in the work folder plus the export beside it (``bits``-bit weights with
    their group scales and zeros; everything else, the MTP layer included, at 16 bits or fp32)."""
    checkpoint = linear = rest = 0
    for kind, part in plan:
        for spec in part.values():
            checkpoint += spec_bytes(spec, source)
            if spec.fp8 and kind != "mtp":  # MTP layers are carried through unquantized
                linear += math.prod(spec.shape)
            else:
                rest += math.prod(spec.shape) * max(spec.dtype.itemsize, 2)
    packed = int(linear * (bits / 8 + 4 / 128))  # a group of 128: fp16 scale, packed zero, g_idx
    return {"checkpoint_bytes": checkpoint, "quantize_bytes": 2 * packed + rest}


def _existing(folder: Path) -> Path:
    """``folder`` or its nearest existing parent."""
    probe = Path(folder)
    while not probe.exists():
        probe = probe.parent
    return probe


def check_disk(folder: Path, needed: int, what: str) -> None:
    """A one-line error when ``needed`` bytes would not fit the free space under ``folder``."""
    probe = _existing(folder)
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise QuantMoeError(f"{what} needs {needed / 1e9:.1f} GB but {probe} has {free / 1e9:.1f} GB free; "
                            "use fewer --layers, --source fp8, or --work / --out-work folders on larger disks")


def check_disks(work: Path, out_work: Path, checkpoint: int, quantize: int, what: str) -> None:
    """check_disk for ``checkpoint`` bytes under ``work`` and ``quantize`` bytes under ``out_work``: their sum where
    both lie on one file system."""
    if os.stat(_existing(work)).st_dev == os.stat(_existing(out_work)).st_dev:
        check_disk(work, checkpoint + quantize, what)
    else:
        check_disk(work, checkpoint, what)
        check_disk(out_work, quantize, what)


# -- the checkpoint -----------------------------------------------------------------------------
def random_tensors(specs: dict[str, TensorSpec], gen: torch.Generator, device: torch.device,
                   fp8_block: tuple[int, int] | None = None) -> dict:
    """N(0, INIT_STD) weights (norms are ones) drawn on ``device``, returned on the host: bf16,
    float32 where the spec says so, and with ``fp8_block`` the FP8 linears as float8_e4m3fn
    codes of the bf16 weights plus ``weight_scale_inv``. The same seed draws the same values
    for either source, so an FP8 checkpoint is the block-wise FP8 of its BF16 twin."""
    out = {}
    for name, spec in specs.items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(spec.shape, dtype=spec.dtype)
            continue
        if spec.rope_theta is not None:
            dim = 2 * spec.shape[0]
            out[name] = (1.0 / spec.rope_theta ** (torch.arange(0, dim, 2).float() / dim)).to(spec.dtype)
            continue
        t = torch.empty(spec.shape, device=device, dtype=torch.float32).normal_(0.0, INIT_STD, generator=gen)
        t = t.to(spec.dtype)
        if spec.fp8 and fp8_block is not None:
            codes, scale = quantize_fp8_blocks(t, fp8_block)
            out[name], out[name + "_scale_inv"] = codes.cpu(), scale.cpu()
        else:
            out[name] = t.cpu()
        del t
    return out


def byte_level(model_type: str) -> bool:
    """Whether transformers loads this model type's tokenizer as its own byte-level BPE class whatever the folder's
    tokenizer files name (Qwen3.5's Qwen3_5Tokenizer: its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), which
    reads a word-level vocabulary as no token at all."""
    from transformers.models.auto import tokenization_auto

    return model_type in getattr(tokenization_auto, "MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS", ())


def synthetic_vocab(vocab_size: int, model_type: str) -> tuple[dict[str, int], list[tuple[str, str]], list[str]]:
    """(vocabulary, BPE merges, words) of write_tokenizer's tokenizer: exactly ``vocab_size`` entries, ids 0-2 the
    special tokens, each word one token when a space precedes it. Word-level (``w3``, ``w4``, ...) unless the model
    type's tokenizer is byte-level (``byte_level``): then the 256 byte symbols and, by merges, a space followed by
    one, two, three ... letters (``a``, ``b``, ..., ``aa``, ...) until the vocabulary is full."""
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
    if not byte_level(model_type):
        return {**specials, **{f"w{i}": i for i in range(3, vocab_size)}}, [], [f"w{i}" for i in range(3, vocab_size)]
    vocab = {**specials, **{c: 3 + k for k, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    merges, words, level = [], [], ["\u0120"]  # the byte-level symbol of a space
    while len(vocab) < vocab_size:
        level = [head + c for head in level for c in "abcdefghijklmnopqrstuvwxyz"][:vocab_size - len(vocab)]
        for token in level:
            vocab[token] = len(vocab)
            merges.append((token[:-1], token[-1]))
        words += [token[1:] for token in level]
    return vocab, merges, words


def write_tokenizer(folder: Path, vocab_size: int, model_type: str = "") -> None:
    """A tokenizer with exactly ``vocab_size`` entries (synthetic_vocab), so ids < vocab_size pass the calibration
    check, and each word of make_eval_text one token."""
    vocab, merges, _ = synthetic_vocab(vocab_size, model_type)
    if merges:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    else:
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(folder)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_checkpoint(folder: Path, shape: Shape | str, layers: int, *, reduced: bool = False, source: str = "bf16",
                    mtp: bool = False, overrides: dict | None = None, seed: int = 0, device: str = "auto") -> Path:
    """Write a ``layers``-deep checkpoint of ``shape`` with random weights (see run_config and
    tensor_plan): one shard for the embeddings and head, then each layer in shards of at most
    MAX_SHARD_BYTES (one shard unless it is larger), each generated, written and dropped before
    the next. GENERATOR_FILE, written last, records the arguments. ``folder`` is new, empty or
    one that make_checkpoint wrote before (its shards are replaced)."""
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    if source not in ("bf16", "fp8"):
        raise QuantMoeError(f"--source is {source!r}; use bf16 or fp8")
    config, changes = run_config(shape, layers, reduced, mtp, overrides)
    shards = split_shards(tensor_plan(config, shape, mtp), source)
    dev = resolve_device(device)
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()) and not any((folder / f).exists() for f in (GENERATOR_FILE, WRITING)):
        raise QuantMoeError(f"{folder} holds files that scale.py did not write; choose a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WRITING).touch()
    (folder / GENERATOR_FILE).unlink(missing_ok=True)  # until the last shard is written
    for old in folder.glob("model-*-of-*.safetensors"):
        old.unlink()
    if source == "fp8":
        config["quantization_config"] = dict(FP8_CONFIG)
    atomic_write_json(folder / "config.json", config)
    write_tokenizer(folder, config["vocab_size"], config["model_type"])
    gen = torch.Generator(device=dev).manual_seed(seed)
    weight_map, total = {}, 0
    for i, specs in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = random_tensors(specs, gen, dev, FP8_BLOCK if source == "fp8" else None)
        save_safetensors(folder / name, tensors, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors  # one shard in memory at a time
    atomic_write_json(folder / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    atomic_write_json(folder / GENERATOR_FILE, generator_record(shape, layers, reduced, source, mtp, overrides, seed,
                                                                changes))
    (folder / WRITING).unlink()
    os.sync()  # its dirty pages on disk before anything is timed on it, as a downloaded checkpoint's are
    return folder


def split_shards(plan: list, source: str, max_bytes: int | None = None) -> list[dict[str, TensorSpec]]:
    """The plan's parts as shards, a part larger than ``max_bytes`` (default MAX_SHARD_BYTES) cut
    into several in order (a tensor is never cut)."""
    max_bytes = max_bytes or MAX_SHARD_BYTES
    out = []
    for _, specs in plan:
        current, size = {}, 0
        for name, spec in specs.items():
            nbytes = spec_bytes(spec, source)
            if current and size + nbytes > max_bytes:
                out.append(current)
                current, size = {}, 0
            current[name] = spec
            size += nbytes
        out.append(current)
    return out


def generator_record(shape: Shape, layers: int, reduced: bool, source: str, mtp: bool, overrides: dict | None,
                     seed: int, changes: dict) -> dict:
    """What make_checkpoint was asked for: a checkpoint folder with the same record is reused."""
    return {"shape_name": shape.name, "layers": layers, "reduced": reduced, "source": source, "mtp": mtp,
            "overrides": overrides or {}, "seed": seed, "changes": changes}


def make_view(src: Path, dst: Path, layers: int) -> Path:
    """The first ``layers`` layers of a checkpoint from make_checkpoint, as a folder of hard links
    (no copy; a hard link is an ordinary file to whoever reads the folder). An MTP layer is
    left out, since it must follow the last layer."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = layers
    if "num_nextn_predict_layers" in config:
        config["num_nextn_predict_layers"] = 0
    atomic_write_json(dst / "config.json", config)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    keep = {k: v for k, v in index["weight_map"].items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    atomic_write_json(dst / "model.safetensors.index.json", {"metadata": {}, "weight_map": keep})
    record = src / GENERATOR_FILE
    if record.is_file():
        atomic_write_json(dst / GENERATOR_FILE, {**json.loads(record.read_text()), "layers": layers, "mtp": False,
                                                 "view_of": str(src)})
    skip = {"config.json", "model.safetensors.index.json", GENERATOR_FILE}
    files = sorted(set(keep.values())) + [p.name for p in sorted(src.iterdir())
                                          if p.is_file() and p.suffix != ".safetensors" and p.name not in skip]
    for name in files:
        target = dst / name
        if target.exists() and os.path.samefile(target, src / name):
            continue
        target.unlink(missing_ok=True)
        try:
            os.link(src / name, target)
        except OSError as exc:
            raise QuantMoeError(f"cannot hard-link {src / name} into {dst} ({exc.strerror}); put the view on the "
                                "same filesystem as the checkpoint") from None
    return dst


def make_calibration(path: Path, vocab_size: int, nsamples: int, seqlen: int, seed: int = 0) -> Path:
    """A token file of random ids in [0, vocab_size), in quantmoe's calibration format."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (nsamples, seqlen), generator=gen, dtype=torch.int64)
    meta = {"source": "random token ids (benchmarks/scale.py)", "seed": str(seed), "nsamples": str(nsamples),
            "seqlen": str(seqlen), "vocab_size": str(vocab_size)}
    return write_calibration(path, ids, meta)


def make_eval_text(path: Path, vocab_size: int, tokens: int, seed: int = 1, words_per_line: int = 4096,
                   model_type: str = "") -> Path:
    """A JSONL file of random words of write_tokenizer's vocabulary: ``tokens`` tokens in all
    (one word is one token; a line of a byte-level vocabulary starts with a space, which its first word takes),
    for ``quantmoe eval``."""
    gen = torch.Generator().manual_seed(seed)
    _, merges, words = synthetic_vocab(vocab_size, model_type)
    low = 0 if merges else 3  # a word-level vocabulary's words are ids 3 on
    picks = [words[i - low] for i in torch.randint(low, low + len(words), (tokens,), generator=gen).tolist()]
    lead = " " if merges else ""
    lines = [json.dumps({"text": lead + " ".join(picks[s:s + words_per_line])})
             for s in range(0, tokens, words_per_line)]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


# -- running and measuring ----------------------------------------------------------------------
def child_env(quantmoe_path: Path) -> dict:
    """The environment of a child process running ``quantmoe_path``'s quantmoe (run it with that folder as its
    working folder: `python -m` puts the working folder first on sys.path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(quantmoe_path), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


def run_child(cmd: list[str], quantmoe_path: Path, timeout: float) -> dict:
    """Run ``cmd`` with ``quantmoe_path``'s quantmoe; wall time, exit status and the sampled peak
    RSS: of the process tree, and of its largest process."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=child_env(quantmoe_path), cwd=quantmoe_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    proc, peak, peak_one = psutil.Process(child.pid), 0, 0
    status = None
    while status is None:
        try:
            sizes = [p.memory_info().rss for p in (proc, *proc.children(recursive=True))]
            peak, peak_one = max(peak, sum(sizes)), max(peak_one, *sizes)
        except psutil.Error:
            pass
        if time.perf_counter() - t0 > timeout:
            for p in proc.children(recursive=True):
                p.kill()
            child.kill()
            status = "timeout"
            break
        try:
            child.wait(0.02)
            status = child.returncode
        except subprocess.TimeoutExpired:
            pass
    output = child.communicate()[0] or ""
    return {"command": " ".join(cmd[1:]), "returncode": status, "wall_seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_mb_sampled": round(peak / 2**20, 1), "peak_rss_mb_one_process": round(peak_one / 2**20, 1),
            "output_tail": output[-3000:]}


def run_quantize(model: Path, out: Path, calib: Path, device: str, options: list[str], quantmoe_path: Path,
                 timeout: float, nproc: int = 1) -> dict:
    """``python -m quantmoe quantize`` as a child process (under torchrun with ``nproc`` > 1), see run_child."""
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", str(nproc)]
    cmd = [*launch, "-m", "quantmoe", "quantize", *quantize_args(model, out, calib, device, options)]
    return {**run_child(cmd, quantmoe_path, timeout), "processes": nproc}


def quantize_args(model: Path, out: Path, calib: Path, device: str, options: list[str]) -> list[str]:
    """`quantmoe quantize`'s arguments for a timed run: ``model`` to ``out`` with ``calib``, no evaluation."""
    return [str(Path(model).resolve()), "--out", str(Path(out).resolve()), "--calib", str(Path(calib).resolve()),
            "--no-eval", "--quiet", "--overwrite", "--device", device, *options]


def run_eval(out: Path, model: Path, data: Path, seqlen: int, device: str, quantmoe_path: Path, timeout: float,
             batch_size: int | None = None, tf32: bool = False, dtype: str = "float32") -> dict:
    """``python -m quantmoe eval OUT --baseline MODEL`` (with ``--tf32`` when the quantization had it) as a
    child process, see run_child; with the report's per-model stages (``eval_original``, ``eval_quantized``:
    seconds, peaks), each model's ``timings`` (read, load, layers, head: seconds over all layers) and
    ``layer_timings`` (read, load, layers of each layer)."""
    report = Path(out).resolve().parent / f"{Path(out).name}-eval-report.json"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "quantmoe", "eval", str(Path(out).resolve()), "--baseline", str(Path(model).resolve()),
           "--data", str(Path(data).resolve()), "--seqlen", str(seqlen), "--device", device, "--quiet",
           "--report", str(report), "--overwrite", *(["--batch-size", str(batch_size)] if batch_size else []),
           *(["--tf32"] if tf32 else []), *(["--dtype", dtype] if dtype != "float32" else [])]
    run = run_child(cmd, quantmoe_path, timeout)
    if report.is_file():
        r = json.loads(report.read_text())
        run.update(stages=r.get("stages"), data=r.get("data"), device=r.get("device"), gap=r.get("gap"),
                   kl=(r.get("kl") or {}).get("mean"), protocol_dtype=(r.get("protocol") or {}).get("dtype"),
                   perplexity={k: v.get("perplexity") for k, v in (r.get("results") or {}).items()},
                   timings={k: v.get("timings") for k, v in (r.get("results") or {}).items()},
                   layer_timings={k: v.get("layer_timings") for k, v in (r.get("results") or {}).items()})
    return run


STAGES = ("load", "capture", "hessians", "solve", "forward", "write")


def read_layers(out: Path) -> tuple[list[dict], dict]:
    """The per-layer log entries and the stage records of an output (or, after a failure, of its work folder)."""
    log = out / "quantization_log.json"
    if log.is_file():
        layers = json.loads(log.read_text())["layers"]
        stages = json.loads((out / "manifest.json").read_text())["stages"]
        return layers, stages
    work = out.parent / f".{out.name}.quantmoe-work" / "layers"
    return [json.loads(p.read_text()) for p in sorted(work.glob("layer-*.json"))], {}


def _mean(rows: list[dict]) -> dict:
    return {k: round(sum(r[k] or 0.0 for r in rows) / len(rows), 3)
            for k in ("seconds", *STAGES, "other") if any(r.get(k) is not None for r in rows)}


def summarise(layers: list[dict], stages: dict, total_layers: int = 32, dense_layers: int = 0,
              kinds: list[str] | None = None, mtp_left_out: int = 0) -> dict:
    """Per-layer split by stage, the steady MoE-layer mean and the extrapolation to the release's
    depth: ``total_layers`` layers of which the first ``dense_layers`` are dense.

    ``kinds`` ("dense"/"moe" per measured layer; default all MoE). The steady mean is over the
    MoE layers after the first measured layer (all of them when there is one only, as in a
    one-dense-one-MoE run). After a dense first layer, with three MoE layers or more, it also leaves
    out the first MoE layer, which pays once for the page-locked memory that its packed levels are
    copied into and the later layers reuse (``steady_from_layer``). With two such layers or more, it leaves out
    the last layer too, which reads no next layer ahead (``steady_to_layer``). The extrapolation takes the
    first layer (and that MoE layer, and the last) as measured, each other dense layer at the dense layers'
    mean and each other MoE layer at the steady mean, adds embedding the calibration tokens, and scales the export
    per layer. ``mtp_left_out``: the release's multi-token-prediction layers that the run did not have
    (no ``--mtp``), which the extrapolation names as not included.
    """
    kinds = kinds or ["moe"] * len(layers)
    rows = []
    for e in layers:
        t = e.get("timings", {})
        row = {"index": e["index"], "kind": kinds[e["index"]] if e["index"] < len(kinds) else "moe",
               "seconds": e["seconds"], "before": e.get("before_seconds"), **{k: t.get(k) for k in STAGES},
               "write_background": t.get("write_background"), "peak_gpu_mb": e.get("peak_gpu_mb"),
               "stage_peak_gpu_mb": e.get("stage_peak_gpu_mb"), "peak_rss_mb": e.get("peak_rss_mb"),
               "expert_groups": e.get("expert_groups"),
               "detail": {k: v for k, v in t.items() if ":" in k} or None}  # parts timed inside the stages
        if t:
            row["other"] = round(e["seconds"] - sum(t.get(k, 0.0) for k in STAGES), 3)
        rows.append(row)
    if not rows:
        return {"layers": []}
    moe = [r for r in rows if r["kind"] == "moe"]
    dense = [r for r in rows if r["kind"] == "dense"]
    steady = [r for r in moe if r is not rows[0]] or moe or rows[1:] or rows
    measured = rows[:1]  # taken as measured by the extrapolation
    if rows[0]["kind"] == "dense" and len(steady) >= 3:
        measured, steady = [rows[0], steady[0]], steady[1:]
    # The last layer reads no next layer ahead beside its work (and ran faster than the one before it: see
    # benchmarks/README.md); a release has one last layer too. With two steady layers or more it is taken as measured,
    # and the steady mean is over the layers before it.
    if len(steady) >= 2 and steady[-1] is rows[-1]:
        measured, steady = [*measured, rows[-1]], steady[:-1]
    out = {"layers": rows, "steady_layer_mean": _mean(steady), "steady_from_layer": steady[0]["index"],
           "steady_to_layer": steady[-1]["index"]}
    if dense:
        out["dense_layer_mean"] = _mean(dense)
    if stages:
        out["extrapolation"] = extrapolate(measured, rows, stages, total_layers, dense_layers,
                                           out.get("dense_layer_mean", {}).get("seconds"),
                                           out["steady_layer_mean"]["seconds"] if moe else None, mtp_left_out)
        out["stages"] = stages
    return out


def extrapolate(measured: list[dict], rows: list[dict], stages: dict, total_layers: int, dense_layers: int,
                dense_mean: float | None, moe_mean: float | None, mtp_left_out: int = 0) -> dict:
    """See summarise: ``measured``, the layers taken as measured (the first, and the first MoE layer when the steady
    mean leaves it out), ``rows`` all of them."""
    more_dense = dense_layers - sum(r["kind"] == "dense" for r in measured)
    more_moe = total_layers - dense_layers - sum(r["kind"] == "moe" for r in measured)
    named = " and ".join("layer %d" % r["index"] for r in measured)
    how = (f"{named} as measured + the other dense layers x the dense mean + the other MoE layers x the steady MoE "
           "mean + embedding; export and manifest scaled per layer")
    beside = "background_seconds" in stages["export"]  # the export written beside the layers (since it was)
    if beside:
        how += ("; the export beside the layers: its own time beside them (less its waits for layers) scaled per "
                "layer, where it outlasts the layers, + what it took after the last layer (an MTP layer included)")
    if mtp_left_out:
        how += (f"; not included: the release's {mtp_left_out} multi-token-prediction layer(s), which the export "
                "writes after the last layer (measure them with --mtp)")
    missing = [k for k, n, m in (("dense", more_dense, dense_mean), ("MoE", more_moe, moe_mean)) if n > 0 and m is None]
    if missing:
        return {"layers": total_layers, "dense_layers": dense_layers,
                "how": f"not extrapolated: no {' or '.join(missing)} layer was measured"}
    outside = stages["quantize"]["seconds"] - sum(r["seconds"] for r in rows)  # embedding the calibration tokens
    quantize_s = sum(r["seconds"] for r in measured) + max(more_dense, 0) * (dense_mean or 0) \
        + max(more_moe, 0) * (moe_mean or 0)
    # Between two layers (the last handed to its writer, its memory freed), which no layer's seconds count: part of
    # ``outside`` for the layers measured, and their mean once more for every other layer. Results from before it
    # was recorded have none.
    gaps = [r["before"] for r in rows[1:] if r.get("before") is not None]
    between = sum(gaps) / len(gaps) if gaps else 0.0
    quantize_s += between * (total_layers - len(rows))
    if gaps:
        how += "; the time between two layers at its mean after the first"
    # The manifest hashes every file of the export, so it grows with the depth as the export does; results
    # written before it was a stage of its own have none.
    manifest_s = stages.get("manifest", {}).get("seconds", 0.0)
    export = stages["export"]
    # Beside the layers, its own time is its whole time less its waits and what it took after the last layer, which
    # is paid once (the last layer's shards, an MTP layer, the head) and added once below.
    own = max(export["background_seconds"] - export["waiting_seconds"] - export["seconds"], 0.0) if beside \
        else export["seconds"]
    out = {"layers": total_layers, "dense_layers": dense_layers,
           "quantize_seconds": round(quantize_s + outside, 1), "between_layers_seconds": round(between, 3),
           "export_seconds": round(own / len(rows) * total_layers, 1),
           "manifest_seconds": round(manifest_s / len(rows) * total_layers, 1), "how": how}
    if mtp_left_out:
        out["mtp_layers_not_included"] = mtp_left_out
    if beside:  # what adds to the run: the longer of the layers and the export's own time, then the export's end
        out["export_after_layers_seconds"] = round(export["seconds"], 1)
        layers_and_export = max(out["quantize_seconds"], out["export_seconds"]) + out["export_after_layers_seconds"]
    else:
        layers_and_export = out["quantize_seconds"] + out["export_seconds"]
    out["total_seconds"] = round(layers_and_export + out["manifest_seconds"] + stages["calibrate"]["seconds"], 1)
    return out


EVAL_WARM_LAYERS = 2  # an evaluation's first layers, which also allocate the page-locked memory of its reads


def summarise_eval(run: dict, layers: int, total_layers: int) -> dict:
    """Per-layer seconds of each model's evaluation: its whole stage / the checkpoint's depth
    (``per_layer_seconds``), and the steady part of a layer (``steady_per_layer_seconds``: waiting for its
    read, loading it, running it), what is left being paid once per model (``fixed_seconds``: start,
    tokenization, embeddings, head, KL); the release's depth at those rates. With more than EVAL_WARM_LAYERS
    + 1 layers timed one by one (``layer_timings``), the steady part is the mean of the layers after the
    first EVAL_WARM_LAYERS, whose reads also allocate the page-locked memory that the later ones reuse, and
    before the last, which reads no next layer ahead (where one or more is left); those layers' difference
    counts as fixed (``steady_from_layer``, ``steady_to_layer``)."""
    stages = run.get("stages") or {}
    per_layer = {label: round(stages[f"eval_{label}"]["seconds"] / layers, 3)
                 for label in ("original", "quantized") if f"eval_{label}" in stages}
    out = {"per_layer_seconds": per_layer}
    if per_layer:
        out["per_layer_seconds"]["both"] = round(sum(per_layer.values()), 3)
    timings = {label: t for label, t in (run.get("timings") or {}).items() if t and f"eval_{label}" in stages}
    if timings:  # where each model's layer went: waiting for its read, loading it, running it
        out["per_layer_detail"] = {label: {k: round(v / layers, 3) for k, v in t.items() if k != "head"}
                                   for label, t in timings.items()}
        each = run.get("layer_timings") or {}
        start = EVAL_WARM_LAYERS if all(len(each.get(label) or []) == layers > EVAL_WARM_LAYERS + 1
                                        for label in timings) else 0
        if start:
            stop = layers - 1 if layers - start >= 2 else layers
            steady = {label: sum(sum(t.values()) for t in each[label][start:stop]) / (stop - start)
                      for label in timings}
            out["steady_to_layer"] = stop - 1
        else:
            steady = {label: sum(v for k, v in t.items() if k != "head") / layers for label, t in timings.items()}
        out["steady_from_layer"] = start
        fixed = {label: stages[f"eval_{label}"]["seconds"] - steady[label] * layers for label in steady}
        out["steady_per_layer_seconds"] = {**{k: round(v, 3) for k, v in steady.items()},
                                           "both": round(sum(steady.values()), 3)}
        out["fixed_seconds"] = {k: round(v, 3) for k, v in fixed.items()}
        out["extrapolation"] = {"layers": total_layers,
                                "seconds": round(sum(fixed.values()) + sum(steady.values()) * total_layers, 1),
                                "how": "each model's fixed seconds + its steady seconds per layer x layers of the "
                                       "release"}
    elif per_layer:
        out["extrapolation"] = {"layers": total_layers, "seconds": round(per_layer["both"] * total_layers, 1),
                                "how": "(original + quantized seconds) / layers measured x layers of the release; "
                                       "embeddings and head are counted per layer"}
    return out


def device_info(device: str) -> dict:
    """The machine: ``name`` and ``memory_gb`` of the GPU (or of the host, on CPU), and the versions."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count()}
    if device != "cpu" and torch.cuda.is_available():
        info["gpu"] = info["name"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = info["memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        info["gpu"] = None
        info["cpu"] = info["name"] = platform.processor() or platform.machine()
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    info["transformers"] = transformers.__version__
    return info


def quantmoe_commit(tree: Path) -> str | None:
    """The commit of the quantmoe tree that ran (``-dirty`` with uncommitted changes); None outside git."""
    try:
        git = partial(subprocess.run, capture_output=True, text=True, check=True, timeout=10)
        sha = git(["git", "-C", str(tree), "rev-parse", "--short=12", "HEAD"]).stdout.strip()
        dirty = git(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


# -- comparing two outputs ------------------------------------------------------------------
def compare_outputs(a: Path, b: Path, model: Path | None = None, device: str = "auto") -> dict:
    """How far output ``b`` is from output ``a``: levels that differ, and (with the source ``model``)
    each one's weight error and GPTQ loss, to show a difference is rounding rather than quality."""
    dev = resolve_device(device)
    A, B = Checkpoint(a), Checkpoint(b)
    src = Checkpoint(model) if model is not None else None
    bits = int(A.quantization["bits"])
    modules = sorted(n[: -len(".qweight")] for n in A.names() if n.endswith(".qweight"))  # a's; b may have more
    totals = {"levels": 0, "levels_differ": 0, "max_level_step": 0, "identical_modules": 0, "modules": len(modules)}
    err = {"a": 0.0, "b": 0.0, "ref": 0.0}
    for m in modules:
        pa = {s: A.tensor(f"{m}.{s}").to(dev) for s in GPTQ_SUFFIXES}
        pb = {s: B.tensor(f"{m}.{s}").to(dev) for s in GPTQ_SUFFIXES}
        if all(torch.equal(pa[s], pb[s]) for s in GPTQ_SUFFIXES):
            totals["identical_modules"] += 1
        qa, qb = unpack_linear(pa, bits)[0], unpack_linear(pb, bits)[0]
        totals["levels"] += qa.numel()
        totals["levels_differ"] += int((qa != qb).sum())
        totals["max_level_step"] = max(totals["max_level_step"], int((qa - qb).abs().max()))
        if src is not None:
            W = src.tensor(f"{m}.weight").to(dev).float()
            err["a"] += float((dequantize_linear(pa, bits) - W).pow(2).sum())
            err["b"] += float((dequantize_linear(pb, bits) - W).pow(2).sum())
            err["ref"] += float(W.pow(2).sum())
    for c in (A, B):
        c.close()
    out = {"a": str(a), "b": str(b), **totals,
           "levels_differ_fraction": totals["levels_differ"] / max(1, totals["levels"])}
    if src is not None:
        out["relative_weight_error_a"] = (err["a"] / err["ref"]) ** 0.5
        out["relative_weight_error_b"] = (err["b"] / err["ref"]) ** 0.5
    losses = []  # over the modules of a only, so a run of fewer layers compares with a longer one
    for folder in (a, b):
        log = json.loads((Path(folder) / "quantization_log.json").read_text())
        losses.append(sum(m["loss"] for e in log["layers"] for m in e["modules"] if m["module"] in modules))
    out["gptq_loss_a"], out["gptq_loss_b"] = losses
    out["gptq_loss_ratio_b_over_a"] = losses[1] / losses[0] if losses[0] else None
    return out


# -- the GPTQ solve alone -------------------------------------------------------------------
SOLVE_SHAPES = {"down": (8, 4096, 14336), "gate_up": (8, 28672, 4096), "qkv": (1, 6144, 4096)}  # (B, R, C)


def solve_bench(baseline: Path | None = None, device: str = "cuda", shapes: dict = SOLVE_SHAPES) -> dict:
    """Time gptq_quantize on one Mixtral layer's matrix shapes (random W, a full-rank Hessian of
    2C random correlated inputs): this tree's core, and the core of a ``baseline`` tree if given."""
    import importlib.util

    cores = {"new": gptq}
    if baseline is not None:
        old = Path(baseline) / "quantmoe" / "gptq.py"  # trees before the layered package kept the core there
        spec = importlib.util.spec_from_file_location(
            "baseline_gptq", old if old.is_file() else Path(baseline) / "quantmoe" / "gptq" / "core.py")
        cores["baseline"] = importlib.util.module_from_spec(spec)
        sys.modules["baseline_gptq"] = cores["baseline"]
        spec.loader.exec_module(cores["baseline"])
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    out = {}

    cuda = dev.type == "cuda"

    def timed(fn):
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) if cuda else 0
        t0 = time.perf_counter()
        res = fn()
        if cuda:
            torch.cuda.synchronize(dev)
        extra = round((torch.cuda.max_memory_allocated(dev) - base) / 2**20) if cuda else None
        return res, round(time.perf_counter() - t0, 3), extra

    for core in cores.values():  # warm up: library handles, kernels
        core.gptq_quantize(torch.randn(2, 64, 256, device=dev), torch.eye(256, device=dev).expand(2, 256, 256) * 1.0,
                           core.QuantSpec(4, 128, True))
    for name, (B, R, C) in shapes.items():
        X = torch.randn(2 * C, C, device=dev, generator=gen)
        X = X + 0.3 * X.roll(1, dims=1)  # correlated inputs, as activations are
        H1 = 2 * X.T @ X / X.shape[0]
        del X
        W = torch.randn(B, R, C, device=dev, generator=gen) * INIT_STD
        row, results = {}, {}
        for label, core in cores.items():
            H = H1.expand(B, C, C).contiguous()
            if label == "new":
                res, secs, mem = timed(partial(core.gptq_quantize, W, H, core.QuantSpec(4, 128, True),
                                               overwrite_H=True))
                Hc = H1.expand(B, C, C).contiguous()
                _, chol, _ = timed(partial(core.damped_inverse_cholesky, Hc, 0.01))
                row["new_inverse_seconds"] = chol
                del Hc
            else:
                res, secs, mem = timed(partial(core.gptq_quantize, W, H, core.QuantSpec(4, 128, True)))
                _, chol, _ = timed(partial(core.damped_inverse_cholesky, H1.expand(B, C, C), 0.01))
                row["baseline_inverse_seconds"] = chol
            del H
            row[f"{label}_seconds"], row[f"{label}_extra_gpu_mb"] = secs, mem
            results[label] = res.q
            del res
            if cuda:
                torch.cuda.empty_cache()
        if len(results) == 2:
            row["levels_differ_fraction"] = float((results["new"] != results["baseline"]).float().mean())
        out[name] = {"shape": [B, R, C], **row}
        print(name, out[name], flush=True)
        del W, H1, results
        if cuda:
            torch.cuda.empty_cache()
    return out


def solve_profile(shape: Shape, group: int, device: str = "cuda") -> dict:
    """The routed experts' GPTQ solve of one group of ``group`` experts at ``shape``'s sizes, as a layer runs it
    with the default recipe and --tf32 (gate/up with the fit's cross moment, down with its output moment;
    Hessians of 2C correlated random rows): seconds of each, of the Hessian inversion alone, and the
    kernels and host operations that take the most time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from quantmoe.base.options import QuantConfig
    from quantmoe.stages.gptq_method import block_function
    from quantmoe.stages.layer import solve

    dev = torch.device(device)
    cfg = shape.config
    C, I = cfg["hidden_size"], cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    qcfg, block_fn = QuantConfig(), block_function("auto", dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    def moment(C: int) -> torch.Tensor:
        X = torch.randn(2 * C, C, device=dev, generator=gen)
        X = X + 0.3 * X.roll(1, dims=1)
        return (2 * X.T @ X / X.shape[0]).expand(group, C, C).contiguous()

    def synced(fn):
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(dev)
        return round(time.perf_counter() - t0, 3)

    parts = {"gate_up": (2 * I, C, "cross"), "down": (C, I, "target")}
    solve(torch.randn(2, 64, 256, device=dev), torch.eye(256, device=dev).expand(2, 256, 256).contiguous(), qcfg,
          block_fn=block_fn)  # warm up: library handles, kernels
    out = {"shape_name": shape.name, "group": group, "device": device_info(device)}
    for name, (R, Cin, kind) in parts.items():
        W = torch.randn(group, R, Cin, device=dev, generator=gen) * INIT_STD
        row = {"shape": [group, R, Cin], "fit": kind}
        row["inverse_seconds"] = synced(lambda: gptq.damped_inverse_cholesky(moment(Cin), qcfg.damp))
        extra = {"cross": moment(Cin)} if kind == "cross" else {"target": W @ moment(Cin)}
        H = moment(Cin)
        call = partial(solve, W.clone(), H, qcfg, overwrite_H=True, block_fn=block_fn, dequantized=False,
                       overwrite_W=True, tf32=True, **extra)
        row["seconds"] = synced(call)
        H = moment(Cin)
        call = partial(solve, W.clone(), H, qcfg, overwrite_H=True, block_fn=block_fn, dequantized=False,
                       overwrite_W=True, tf32=True, **extra)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize(dev)
        events = prof.key_averages()
        row["top_kernels"] = [{"name": e.key[:90], "calls": e.count, "device_ms": round(e.device_time_total / 1e3, 1)}
                              for e in sorted(events, key=lambda e: -e.self_device_time_total)[:15]]
        row["top_host"] = [{"name": e.key[:90], "calls": e.count, "host_ms": round(e.cpu_time_total / 1e3, 1)}
                           for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]]
        out[name] = row
        print(name, {k: v for k, v in row.items() if not k.startswith("top")}, flush=True)
        del W, H, extra, call
        torch.cuda.empty_cache()
    return out


# -- the command line -----------------------------------------------------------------------
def eval_profile(models: dict[str, Path], data: Path, seqlen: int, windows: int, tf32: bool,
                 device: str = "cuda", dtype: str = "float32") -> dict:
    """Each model's evaluation (``perplexity``, in this process) of its first ``windows`` windows of ``data``
    under torch.profiler, after a warm-up of one batch: its timings and the operators that take the most
    device time."""
    from torch.profiler import ProfilerActivity, profile

    from quantmoe.model.checkpoint import Checkpoint
    from quantmoe.stages.evaluate import eval_windows, perplexity

    out = {"windows": windows}
    for label, path in models.items():
        w, _ = eval_windows(Checkpoint(path).tokenizer(), data, seqlen)
        perplexity(path, w[:1], device, tf32=tf32, dtype=dtype)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            result = perplexity(path, w[:windows], device, tf32=tf32, dtype=dtype)
        events = prof.key_averages()
        out[label] = {"timings": result["timings"],
                      "top_kernels": [{"name": e.key[:90], "calls": e.count,
                                       "device_ms": round(e.self_device_time_total / 1e3, 1)}
                                      for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]],
                      "top_ops": [{"name": e.key[:90], "calls": e.count, "device_ms": round(e.device_time_total / 1e3, 1),
                                   "host_ms": round(e.cpu_time_total / 1e3, 1)}
                                  for e in sorted(events, key=lambda e: -e.device_time_total)[:25]]}
        print(label, result["timings"], flush=True)
    return out


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="mixtral-8x7b",
                    help="the released model whose shapes to use")
    ap.add_argument("--source", choices=("bf16", "fp8"), default="bf16",
                    help="the checkpoint's weights: bf16, or DeepSeek-style FP8 with 128 x 128 block scales")
    ap.add_argument("--mtp", action="store_true", help="append the release's multi-token-prediction layer")
    ap.add_argument("--reduced", action="store_true",
                    help="the shape's small widths and 32 x 256 tokens, on CPU "
                         "(Mixtral: hidden 512, intermediate 1792)")
    ap.add_argument("--layers", type=int, default=2,
                    help="decoder layers; with dense first layers, one dense layer then MoE layers")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs) under torchrun")
    ap.add_argument("--nsamples", type=int)
    ap.add_argument("--seqlen", type=int)
    ap.add_argument("--device", default=None, help="auto | cpu | cuda [default: cpu with --reduced, else auto]")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantmoe-scale"), help="where checkpoints and outputs go")
    ap.add_argument("--out-work", type=Path, help="where the quantized outputs and their work folders go [default: "
                                                  "--work]; e.g. the checkpoint on a RAM disk, its quantization on disk")
    ap.add_argument("--model", type=Path, help="reuse a checkpoint written earlier instead of writing one")
    ap.add_argument("--quantmoe", type=Path, default=REPO, help="the quantmoe source tree to run (e.g. a baseline)")
    ap.add_argument("--name", help="result file name [default: scale-<device>-<shape>-<source>-<layers>L]")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--eval", action="store_true", help="also time `quantmoe eval OUT --baseline MODEL`")
    ap.add_argument("--eval-tokens", type=int, help="tokens of random text to evaluate [default: 300000; "
                                                    "--reduced: 4 windows]")
    ap.add_argument("--eval-seqlen", type=int, help="evaluation window [default: the calibration --seqlen]")
    ap.add_argument("--eval-dtype", choices=("float32", "bfloat16"), nargs="+", default=["float32"],
                    help="quantmoe eval's --dtype (the forward passes'); each one given is timed, the first as "
                         "'eval', the others as 'eval_<dtype>'")
    ap.add_argument("--eval-profile", type=int, metavar="WINDOWS",
                    help="after --eval, profile each model's evaluation of this many windows (torch.profiler)")
    ap.add_argument("--eval-batch-size", type=int, help="windows per forward pass [default: quantmoe eval's]")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("OUT_A", "OUT_B"))
    ap.add_argument("--keep", action="store_true", help="keep the quantized output")
    ap.add_argument("--resume-after", type=int, metavar="LAYER",
                    help="also run the quantization again, kill it once layer LAYER is on disk and resume it: time "
                         "and peak GPU memory of the replay, and whether the shards are the same")
    ap.add_argument("--solve-bench", action="store_true", help="time the GPTQ solve alone on Mixtral's shapes (CUDA)")
    ap.add_argument("--baseline", type=Path, help="with --solve-bench: a tree whose quantmoe/gptq.py to compare with")
    ap.add_argument("--solve-profile", type=int, metavar="GROUP",
                    help="profile the routed experts' solve of GROUP experts at --shape's sizes (CUDA)")
    ap.add_argument("--layer-profile", type=int, metavar="LAYER",
                    help="after the run, quantize once more with layer LAYER under torch.profiler "
                         "(benchmarks/layer_profile.py): each stage's kernels, as 'layer_profile'")
    ap.add_argument("--layer-profile-stages", metavar="S1,S2",
                    help="with --layer-profile: profile only the first entry into each of these stages")
    ap.add_argument("--layer-profile-sample", type=float, metavar="MS",
                    help="with --layer-profile: also sample the host's Python stack every MS ms (layer_profile.py "
                         "--sample): where the layer's stages, and its time outside them, wait on the host")
    args, options = ap.parse_known_args(argv)  # unknown options go to `quantmoe quantize` (--tf32, --no-prefetch, ...)
    args.out_work = args.out_work or args.work
    return args, options


def option_value(options: list[str], name: str, default: str) -> str:
    """The value of ``name`` among the options passed through to ``quantmoe quantize``."""
    for i, opt in enumerate(options):
        if opt == name and i + 1 < len(options):
            return options[i + 1]
        if opt.startswith(name + "="):
            return opt.split("=", 1)[1]
    return default


def prepare_checkpoint(args: argparse.Namespace, shape: Shape, device: str, options: list[str]) -> dict:
    """The checkpoint to quantize: ``--model``, a matching one under ``--work``, or a new one written
    there once its size is printed and checked against the free disk. Returns {path, shape_name,
    source, written, seconds, bytes, quantize_bytes}."""
    bits = int(option_value(options, "--bits", "4"))
    if args.model is not None:
        record_path = args.model / GENERATOR_FILE
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        shape = SHAPES.get(record.get("shape_name"), shape)
        config = json.loads((args.model / "config.json").read_text())
        source = "fp8" if (config.get("quantization_config") or {}).get("quant_method") == "fp8" else "bf16"
        size = disk_estimate(tensor_plan(config, shape, mtp=False), source, bits)
        check_disk(args.out_work, size["quantize_bytes"], "quantizing the checkpoint")
        return {"path": args.model, "shape_name": shape.name, "source": source, "written": False, "seconds": 0.0,
                "bytes": size["checkpoint_bytes"], "quantize_bytes": size["quantize_bytes"]}
    config, changes = run_config(shape, args.layers, args.reduced, args.mtp)
    size = disk_estimate(tensor_plan(config, shape, args.mtp), args.source, bits)
    folder = args.work / f"{shape.name}-{args.source}-{args.layers}L{'-mtp' if args.mtp else ''}" \
                         f"{'-reduced' if args.reduced else ''}"
    record = generator_record(shape, args.layers, args.reduced, args.source, args.mtp, None, args.seed, changes)
    found = folder / GENERATOR_FILE
    reuse = found.is_file() and json.loads(found.read_text()) == json.loads(json.dumps(record))
    print(f"checkpoint {folder}: {size['checkpoint_bytes'] / 1e9:.2f} GB ({'reused' if reuse else 'to write'}); "
          f"quantizing writes about {size['quantize_bytes'] / 1e9:.2f} GB more", flush=True)
    check_disks(args.work, args.out_work, 0 if reuse else size["checkpoint_bytes"], size["quantize_bytes"],
                "the checkpoint and its quantization" if not reuse else "quantizing the checkpoint")
    t0 = time.perf_counter()
    if not reuse:
        make_checkpoint(folder, shape, args.layers, reduced=args.reduced, source=args.source, mtp=args.mtp,
                        seed=args.seed, device=device)
    return {"path": folder, "shape_name": shape.name, "source": args.source, "written": not reuse,
            "seconds": round(time.perf_counter() - t0, 1), "bytes": size["checkpoint_bytes"],
            "quantize_bytes": size["quantize_bytes"]}


def resumed_run(args: argparse.Namespace, model: Path, calib: Path, device: str, options: list[str],
                shards: dict[str, str]) -> dict:
    """The quantization of ``model`` run again, killed (SIGKILL) as soon as layer ``args.resume_after`` is on disk,
    then resumed by the same command: the resumed run's record (run_child's), the replay of the finished layers
    (``replay``: layers, seconds, peak GPU memory, from the first resumed layer's log entry), and whether its
    shards have the sha256 of the uninterrupted run's (``shards``: name -> sha256; ``different_shards``: those that
    do not, or that only one run wrote)."""
    out = args.out_work / "out-resume"
    marker = layer_file(work_dir(out), args.resume_after).with_suffix(".json")
    cmd = [sys.executable, "-m", "quantmoe", "quantize", *quantize_args(model, out, calib, device, options)]
    stopped = subprocess.Popen(cmd, env=child_env(args.quantmoe), cwd=args.quantmoe, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    while not marker.is_file() and stopped.poll() is None and time.perf_counter() - t0 < args.timeout:
        time.sleep(0.05)
    stopped.kill()
    stopped.wait()
    if not marker.is_file():
        return {"error": f"the run ended (status {stopped.returncode}) before layer {args.resume_after} was on disk"}
    run = run_child(cmd, args.quantmoe, args.timeout)
    layers, _ = read_layers(out)
    first = next((e for e in layers if e["index"] == args.resume_after + 1), {})
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    resumed = {n: m["sha256"] for n, m in manifest.get("files", {}).items() if n.endswith(".safetensors")}
    shutil.rmtree(out, ignore_errors=True)
    return {"stopped_after_layer": args.resume_after, "run": run, "replay": first.get("replay"),
            "first_resumed_layer": {k: first.get(k) for k in ("index", "seconds", "peak_gpu_mb")},
            "same_shards": bool(resumed) and resumed == shards,
            "different_shards": sorted(n for n in {*shards, *resumed} if shards.get(n) != resumed.get(n))}


def profile_layer(args: argparse.Namespace, model: Path, calib: Path, device: str, options: list[str]) -> dict:
    """The quantization of ``model`` run again with layer ``args.layer_profile`` under torch.profiler
    (benchmarks/layer_profile.py, a child process): its record, with the child's wall time and exit status."""
    out, record = args.out_work / "out-layer-profile", args.work / "layer-profile.json"
    record.unlink(missing_ok=True)
    stages = ["--stages", args.layer_profile_stages] if args.layer_profile_stages else []
    stages += ["--sample", str(args.layer_profile_sample)] if args.layer_profile_sample else []
    cmd = [sys.executable, str(Path(__file__).with_name("layer_profile.py")), str(args.layer_profile), str(record),
           *stages, "--", *quantize_args(model, out, calib, device, options)]
    run = run_child(cmd, args.quantmoe, args.timeout)
    shutil.rmtree(out, ignore_errors=True)
    found = json.loads(record.read_text()) if record.is_file() else {}
    return {**found, "returncode": run["returncode"], "wall_seconds": run["wall_seconds"],
            **({} if found else {"output_tail": run["output_tail"]})}


def evaluate_output(args: argparse.Namespace, out: Path, model: Path, config: dict, seqlen: int, device: str,
                    total_layers: int, tf32: bool = False, dtype: str = "float32") -> dict:
    """Time ``quantmoe eval`` of the output against the checkpoint on random text (see run_eval)."""
    seqlen = args.eval_seqlen or seqlen
    tokens = args.eval_tokens or (4 * seqlen if args.reduced else FULL_EVAL_TOKENS)
    kind = "-bytelevel" if byte_level(config["model_type"]) else ""
    data = make_eval_text(args.work / f"eval-{config['vocab_size']}-{tokens}{kind}.jsonl", config["vocab_size"], tokens,
                          model_type=config["model_type"])
    run = run_eval(out, model, data, seqlen, device, args.quantmoe, args.timeout, args.eval_batch_size, tf32,
                   dtype)
    result = {"tokens": tokens, "seqlen": seqlen, **run, **summarise_eval(run, config["num_hidden_layers"], total_layers)}
    if args.eval_profile:
        result["profile"] = eval_profile({"original": model, "quantized": out}, data, seqlen, args.eval_profile, tf32,
                                         "cpu" if device == "cpu" else "cuda", dtype)
    return result


def main(argv: list[str] | None = None) -> dict:
    args, options = parse_args(argv)
    if args.compare or args.solve_bench or args.solve_profile:
        result = (compare_outputs(*args.compare, model=args.model) if args.compare
                  else solve_profile(SHAPES[args.shape], args.solve_profile) if args.solve_profile
                  else {"device": device_info("cuda"), "solve": solve_bench(args.baseline)})
        if args.name:
            args.results.mkdir(parents=True, exist_ok=True)
            atomic_write_json(args.results / f"{args.name}.json", result)
        print(json.dumps(result, indent=2))
        return result

    device = args.device or ("cpu" if args.reduced else "auto")
    shape = SHAPES[args.shape]
    nsamples, seqlen = REDUCED_TOKENS if args.reduced else FULL_TOKENS
    nsamples, seqlen = args.nsamples or nsamples, args.seqlen or seqlen
    args.work.mkdir(parents=True, exist_ok=True)
    args.out_work.mkdir(parents=True, exist_ok=True)
    checkpoint = prepare_checkpoint(args, shape, device, options)
    model = Path(checkpoint["path"])
    shape = SHAPES[checkpoint["shape_name"]]
    config = json.loads((model / "config.json").read_text())
    calib = make_calibration(args.work / f"calib-{config['vocab_size']}-{nsamples}x{seqlen}.safetensors",
                             config["vocab_size"], nsamples, seqlen)

    # The vocabulary check passes. The tokenizer is read without the config, which transformers
    # cannot read for a remote-code model_type (Kimi K2's); whether quantmoe can is for the run to show.
    read_calibration(calib, transformers.PreTrainedTokenizerFast.from_pretrained(model))

    out = args.out_work / f"out-{args.name or 'run'}"
    run = run_quantize(model, out, calib, device, options, args.quantmoe, args.timeout, args.nproc)
    layers, stages = read_layers(out)
    info = device_info(device)
    total = shape.config["num_hidden_layers"]
    n_layers = config["num_hidden_layers"]
    record = json.loads((model / GENERATOR_FILE).read_text()) if (model / GENERATOR_FILE).is_file() else {}
    result = {
        "benchmark": "benchmarks/scale.py", "shape_name": shape.name, "shape_source": shape.source,
        "source": checkpoint["source"], "reduced": bool(record.get("reduced", args.reduced)),
        "mtp": bool(config.get("num_nextn_predict_layers")),
        "structure": {"changed_from_release": record.get("changes"),
                      "layers": layer_kinds(config) + (["mtp"] if config.get("num_nextn_predict_layers") else []),
                      "note": "the release's config.json with num_hidden_layers cut; dense first layers cut to one "
                              "(first_k_dense_replace 1); an MTP layer only with --mtp"},
        "config": config, "num_layers": n_layers, "calibration_tokens": [nsamples, seqlen], "options": options,
        "scale_options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "processes": args.nproc, "device": info, "quantmoe_commit": quantmoe_commit(args.quantmoe),
        "checkpoint": {**checkpoint, "path": str(model)}, "run": run,
        "peak_gpu_mb": (stages.get("quantize") or {}).get("peak_gpu_mb"),
        "peak_rss_mb": run["peak_rss_mb_sampled"],
        **summarise(layers, stages, total, shape.config.get("first_k_dense_replace") or 0, layer_kinds(config),
                    mtp_left_out=(shape.config.get("num_nextn_predict_layers") or 0)
                    - (config.get("num_nextn_predict_layers") or 0)),
    }
    if checkpoint["source"] == "fp8":
        result["fp8_release"] = shape.fp8_release
    if args.eval and run["returncode"] == 0:
        for k, dtype in enumerate(args.eval_dtype):
            result["eval" if k == 0 else f"eval_{dtype}"] = evaluate_output(args, out, model, config, seqlen, device,
                                                                            total, "--tf32" in options, dtype)
    if args.layer_profile is not None and run["returncode"] == 0:
        result["layer_profile"] = profile_layer(args, model, calib, device, options)
    if args.resume_after is not None and run["returncode"] == 0:
        shards = {n: m["sha256"] for n, m in json.loads((out / "manifest.json").read_text())["files"].items()
                  if n.endswith(".safetensors")}
        if not args.keep:  # the disk holds one output at a time
            shutil.rmtree(out)
        result["resume"] = resumed_run(args, model, calib, device, options, shards)
    label = (info["gpu"] or "cpu").replace(" ", "-")
    name = args.name or f"scale-{label}-{shape.name}-{checkpoint['source']}-{n_layers}L" \
        + ("-mtp" if result["mtp"] else "") + ("-reduced" if result["reduced"] else "") \
        + (f"-{args.nproc}proc" if args.nproc > 1 else "")
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / f"{name}.json", result)
    print(json.dumps({k: result.get(k) for k in ("peak_gpu_mb", "peak_rss_mb", "steady_layer_mean",
                                                 "extrapolation")}, indent=2))
    for key in [k for k in result if k.startswith("eval")]:
        print(key, json.dumps({k: result[key].get(k) for k in ("returncode", "steady_per_layer_seconds",
                                                               "extrapolation")}))
    print(f"wrote {args.results / f'{name}.json'} (returncode {run['returncode']})")
    if not args.keep and out.exists() and run["returncode"] == 0:
        shutil.rmtree(out)
    return result


if __name__ == "__main__":
    try:
        main()
    except QuantMoeError as exc:
        sys.exit(f"error: {exc}")
