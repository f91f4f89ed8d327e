"""Tiny models built from transformers configs, one per architecture row, for the tests.

Weights are random but the checkpoint layout is real: ``save_pretrained`` writes the
Hub on-disk names. A small byte-level BPE tokenizer is trained on the fly, so nothing
needs the network.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Per model_type: the config class name and a few overrides that keep the model tiny.
# Every row of quantmoe.model.architectures.ARCHITECTURES needs one (tests/test_architectures.py checks).
# Widths are multiples of 32 so group sizes 32 and -1 divide every input, except DeepSeek-V3's
# low-rank q_lora_rank/kv_lora_rank of 16, kept narrower than a group on purpose.
_ATTN = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
# DeepSeek-V3.2's and GLM-5's sparse attention (MLA and an indexer) and MoE block, layer 0 dense.
_SPARSE_MLA = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=3,
                   n_routed_experts=8, num_experts_per_tok=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                   q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                   index_n_heads=2, index_head_dim=32, index_topk=2048, num_attention_heads=4, num_key_value_heads=4,
                   max_position_embeddings=256)
TINY = {
    "mixtral": ("MixtralConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_local_experts=4,
                                      num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                                         shared_expert_intermediate_size=96, num_hidden_layers=3, num_experts=6,
                                         num_experts_per_tok=3, num_attention_heads=4, num_key_value_heads=2,
                                         mlp_only_layers=[0], max_position_embeddings=256, qkv_bias=True)),
    # Qwen3-MoE: many small experts, no shared expert, q/k norms; layer 0 dense through mlp_only_layers.
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                                         num_hidden_layers=3, num_experts=16, num_experts_per_tok=4, head_dim=16,
                                         mlp_only_layers=[0], **_ATTN)),
    # Qwen3-Next: layers 0-2 linear attention (Gated DeltaNet), layer 3 gated full attention; layer 0 dense.
    "qwen3_next": ("Qwen3NextConfig", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                                           shared_expert_intermediate_size=64, num_hidden_layers=4, num_experts=8,
                                           num_experts_per_tok=2, head_dim=16, linear_num_key_heads=2,
                                           linear_num_value_heads=4, linear_key_head_dim=16,
                                           linear_value_head_dim=16, mlp_only_layers=[0], **_ATTN)),
    # Qwen3.5-MoE's language model: Qwen3-Next's layers (0-2 linear attention, 3 full) with split linear-attention
    # input projections, every layer MoE. Its releases nest it beside a vision tower: make_nested_release.
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", dict(hidden_size=64, moe_intermediate_size=64,
                                                      shared_expert_intermediate_size=64, num_hidden_layers=4,
                                                      num_experts=8, num_experts_per_tok=2, head_dim=16,
                                                      linear_num_key_heads=2, linear_num_value_heads=4,
                                                      linear_key_head_dim=16, linear_value_head_dim=16, **_ATTN)),
    # Qwen3-VL-MoE's language model: Qwen3-MoE's layers, every layer MoE; experts of 96 so that no fused tensor is
    # square and a transposed read shows. Its releases nest it beside a vision tower, its routed experts fused and
    # transposed on disk: make_model saves it as the language model of such a release (make_nested_release).
    "qwen3_vl_moe_text": ("Qwen3VLMoeTextConfig", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=96,
                                                       num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                                                       head_dim=16, rope_scaling={"rope_type": "default",
                                                                                  "mrope_section": [4, 2, 2],
                                                                                  "mrope_interleaved": True},
                                                       **_ATTN)),
    # OLMoE: 64 experts, top-8, as the released model; q/k norms.
    "olmoe": ("OlmoeConfig", dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_experts=64,
                                  num_experts_per_tok=8, pad_token_id=0, eos_token_id=0, **_ATTN)),
    # DeepSeek-V2 without a query LoRA (q_proj, as V2-Lite), two shared experts, layer 0 dense.
    "deepseek_v2": ("DeepseekV2Config", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                                             num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                                             n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=None,
                                             bos_token_id=0, eos_token_id=0,  # the tokenizer's; the default 2 is a word
                                             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                             num_attention_heads=4, num_key_value_heads=4,
                                             max_position_embeddings=256)),
    # DeepSeek-V3: MLA with q_a/q_b, grouped sigmoid router with e_score_correction_bias, layer 0 dense.
    "deepseek_v3": ("DeepseekV3Config", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                                             num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                                             topk_group=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16,
                                             kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                             num_attention_heads=4, num_key_value_heads=4,
                                             max_position_embeddings=256)),
    # DeepSeek-V3.2: DeepSeek-V3 with an indexer (its own 2 heads of 16) choosing the keys each query attends; GLM-5
    # the same in one expert group.
    "deepseek_v32": ("DeepseekV32Config", {**_SPARSE_MLA, "n_group": 2}),
    "glm_moe_dsa": ("GlmMoeDsaConfig", {**_SPARSE_MLA, "n_group": 1}),
    # GLM-4.5: DeepSeek-V3's MoE block (one group, as released) under GQA with q/k/v biases, qk-norm and
    # partial rotary; layer 0 dense.
    "glm4_moe": ("Glm4MoeConfig", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                                       num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
                                       topk_group=1, n_shared_experts=1, first_k_dense_replace=1, head_dim=16,
                                       partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True,
                                       routed_scaling_factor=2.5, **_ATTN)),
    # MiniMax-M2: Mixtral's names; a sigmoid router taking the block's fp32 e_score_correction_bias; q/k norms
    # over all heads; partial rotary.
    "minimax_m2": ("MiniMaxM2Config", dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                           num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                                           partial_rotary_factor=0.5, bos_token_id=1, eos_token_id=0,
                                           pad_token_id=0, **_ATTN)),
    # Phi-MoE: sparsemixer routing needs top-2; LayerNorms and linears with biases, an lm_head bias.
    "phimoe": ("PhimoeConfig", dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_local_experts=4,
                                    num_experts_per_tok=2, attention_bias=True, lm_head_bias=True, **_ATTN)),
    # GraniteMoE: experts fused on disk; multipliers away from 1 so a missed one shows; tied head as released.
    "granitemoe": ("GraniteMoeConfig", dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                            num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=2.0,
                                            logits_scaling=4.0, residual_multiplier=0.5, attention_multiplier=0.125,
                                            tie_word_embeddings=True, **_ATTN)),
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **_ATTN)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **_ATTN)),
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
    if model_type in NESTED_TINY:  # no causal-LM class in transformers: the language model of a release
        release = make_nested_release(released(folder), seed, dtype, family=NESTED_TINY[model_type], **overrides)
        return text_only_copy(release, folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    config = getattr(transformers, cls_name)(vocab_size=len(tok), **{**kwargs, **overrides})
    torch.manual_seed(seed)
    _save_random(transformers.AutoModelForCausalLM.from_config(config), folder, dtype)
    if model_type == "qwen3_5_moe_text":  # stored fused, as Qwen3.5's BF16 releases are (transformers saves per expert)
        _rewrite_single_shard(folder, lambda tensors: _fuse_experts(tensors, config.num_experts))
    return folder


# Language models transformers builds only as a base model (no causal-LM class): make_model saves them as the
# language model of a release of this family, which it writes beside the folder (``released``).
NESTED_TINY = {"qwen3_vl_moe_text": "qwen3_vl_moe"}


def released(folder: Path) -> Path:
    """Where make_model writes the release whose language model a NESTED_TINY model's ``folder`` holds."""
    return Path(folder).with_name(Path(folder).name + "-release")


def transformers_lm(folder: Path, dtype=torch.float32):
    """transformers' own causal LM of the tiny checkpoint ``folder``, loaded by transformers, in eval mode: the
    reference quantmoe's reading is checked against. For a NESTED_TINY model, the vision-language model of the
    release beside it, seen as its language model (``model``: the text model; ``lm_head``; logits and loss)."""
    import json

    import transformers

    model_type = json.loads((Path(folder) / "config.json").read_text())["model_type"]
    if model_type not in NESTED_TINY:
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return _LanguageModelOf(transformers.AutoModelForImageTextToText.from_pretrained(released(folder), dtype=dtype))


def transformers_lm_from_config(config):
    """transformers' causal LM of ``config`` (on the current default device), or for a NESTED_TINY model type
    its base model with a head (transformers' layers, as the release's vision-language model builds them)."""
    import transformers

    if config.model_type not in NESTED_TINY:
        return transformers.AutoModelForCausalLM.from_config(config)
    lm = torch.nn.Module()
    lm.model = transformers.AutoModel.from_config(config)
    return lm


class _LanguageModelOf(torch.nn.Module):
    """A vision-language model's language model and head, under a text-only checkpoint's names
    (``model.*``, ``lm_head.*``), its forward the model's on text alone."""

    def __init__(self, vlm):
        super().__init__()
        self.model = vlm.model.language_model
        self.lm_head = vlm.lm_head
        self.config = self.model.config
        self._vlm = (vlm.eval(),)  # not a submodule: its parameters go by the names above alone

    def forward(self, input_ids, labels=None):
        return self._vlm[0](input_ids=input_ids, labels=labels)


def _save_random(model, folder: Path, dtype) -> None:
    """Save ``model`` (random weights) in ``dtype`` into ``folder``, as a release stores it."""
    model.to(dtype)
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if keep_fp32 & set(name.split(".")):
                # Stored in fp32 as in the released checkpoints (DeepSeek-V3's e_score_correction_bias).
                module, _, attr = name.rpartition(".")
                tensor = getattr(model.get_submodule(module), attr)
                tensor.data = tensor.data.float()
                t = tensor.data
            if t.numel() > 1 and bool((t == t.flatten()[0]).all()):
                # Norms at 1 and biases at 0 would let a tensor that is reset or dropped go unnoticed.
                t.add_(0.1 * torch.randn_like(t))
    model.save_pretrained(folder)


# A vision tower of the smallest shape Qwen3.5-MoE's vision config takes.
TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   num_position_embeddings=16)


def make_nested_release(folder: Path, seed: int = 0, dtype=torch.bfloat16, fused: bool = True,
                        family: str = "qwen3_5_moe", **overrides) -> Path:
    """A tiny vision-language release as the Hub has them: the vision-language model, its language model under
    ``model.language_model.`` beside a vision tower (``model.visual.``), config.json nesting the language model's
    under ``text_config``. ``family`` "qwen3_5_moe" (TINY's ``qwen3_5_moe_text``): with ``fused``, the routed
    experts stored fused (``mlp.experts.gate_up_proj`` (E, 2I, H) and ``mlp.experts.down_proj`` (E, H, I)) as the
    BF16 releases store them, else one linear per expert as the FP8 releases do. "qwen3_vl_moe"
    (``qwen3_vl_moe_text``): fused and transposed, gate_up (E, H, 2I) and down (E, I, H), as its BF16 releases store
    them (transformers' save_pretrained writes them untransposed), else one linear per expert. ``overrides``: of
    the text config."""
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    qwen3_5 = family == "qwen3_5_moe"
    text = {**TINY["qwen3_5_moe_text" if qwen3_5 else "qwen3_vl_moe_text"][1], "vocab_size": len(tok), **overrides}
    if qwen3_5:
        config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=TINY_VISION)
        model = transformers.Qwen3_5MoeForConditionalGeneration
    else:
        config = transformers.Qwen3VLMoeConfig(text_config=text, vision_config={**TINY_VISION, "deepstack_visual_indexes": [0]},
                                               tie_word_embeddings=False)
        model = transformers.Qwen3VLMoeForConditionalGeneration
    torch.manual_seed(seed)
    _save_random(model(config), folder, dtype)
    if qwen3_5 and fused:
        _rewrite_single_shard(folder, lambda tensors: _fuse_experts(tensors, text["num_experts"]))
    elif not qwen3_5:
        transposed = ("experts.gate_up_proj", "experts.down_proj")
        _rewrite_single_shard(folder, lambda tensors: {
            n: t.transpose(1, 2) if n.endswith(transposed) else t
            for n, t in (tensors if fused else _unfuse_experts(tensors)).items()})
    transformers.Qwen2VLImageProcessor(patch_size=16, merge_size=2).save_pretrained(folder)  # what servers read
    return folder


def _fuse_experts(tensors: dict, num: int) -> dict:
    """Each layer's per-expert ``mlp.experts.E.{gate,up,down}_proj.weight`` -> ``mlp.experts.gate_up_proj`` and
    ``mlp.experts.down_proj``, stacked over the experts (gate above up)."""
    import re

    layers = sorted({m.group(1) for n in tensors if (m := re.match(r"(.+\.mlp\.experts\.)0\.gate_proj\.weight$", n))})
    for head in layers:
        def take(e: int, which: str) -> torch.Tensor:
            return tensors.pop(f"{head}{e}.{which}_proj.weight")
        tensors[head + "gate_up_proj"] = torch.stack([torch.cat([take(e, "gate"), take(e, "up")]) for e in range(num)])
        tensors[head + "down_proj"] = torch.stack([take(e, "down") for e in range(num)])
    return tensors


def _unfuse_experts(tensors: dict) -> dict:
    """Each layer's fused ``mlp.experts.gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I) -> one linear per
    expert, ``mlp.experts.E.{gate,up,down}_proj.weight`` (the inverse of _fuse_experts)."""
    out = {}
    for n, t in tensors.items():
        head, _, which = n.rpartition(".")
        if which == "gate_up_proj" and head.endswith(".mlp.experts"):
            for e, (gate, up) in enumerate(zip(*t.chunk(2, dim=1))):
                out[f"{head}.{e}.gate_proj.weight"], out[f"{head}.{e}.up_proj.weight"] = gate, up
        elif which == "down_proj" and head.endswith(".mlp.experts"):
            out.update({f"{head}.{e}.down_proj.weight": d for e, d in enumerate(t)})
        else:
            out[n] = t
    return out


def text_only_copy(nested: Path, folder: Path) -> Path:
    """The language model of the nested release ``nested`` as a text-only checkpoint in ``folder``: its tensors
    renamed from ``model.language_model.`` to ``model.``, the vision tower dropped, config.json the text config
    (naming transformers' causal-LM class of it where it has one)."""
    import json
    import shutil

    shutil.copytree(nested, folder)
    config = json.loads((folder / "config.json").read_text())
    heads = {"qwen3_5_moe": ["Qwen3_5MoeForCausalLM"]}.get(config["model_type"])
    text = {**config["text_config"], "dtype": config.get("dtype"), **({"architectures": heads} if heads else {})}
    (folder / "config.json").write_text(json.dumps(text, indent=2))
    _rewrite_single_shard(folder, lambda tensors: {n.replace("model.language_model.", "model.", 1): t
                                                   for n, t in tensors.items() if not n.startswith("model.visual.")})
    return folder


def upcast_to_fp32(src: Path, folder: Path) -> Path:
    """A copy of checkpoint ``src`` in ``folder`` with every floating tensor stored as fp32 (exactly
    the fp16 values) and config.json saying so."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, folder)
    for f in folder.glob("*.safetensors"):
        save_file({k: v.float() if v.is_floating_point() else v for k, v in load_file(f).items()}, f,
                  metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
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


# ----------------------------------------------------------------------------- releases as the Hub has them


def _rewrite_single_shard(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    path = Path(folder) / "model.safetensors"
    tensors = change(load_file(path))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def _random_like(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """New random values of ``t``'s shape, mean, spread and dtype (an appended MTP layer's)."""
    x = t.float()
    return (torch.randn(x.shape, generator=g) * x.std() + x.mean()).to(t.dtype)


def append_mtp_layer(folder: Path, seed: int = 1, head: bool = True) -> list[str]:
    """Append a multi-token-prediction layer to the one-shard checkpoint ``folder``, as DeepSeek-V3's
    and GLM-4.5's releases carry it at index num_hidden_layers: a full decoder block with the names and
    shapes of the last layer (new random values), plus ``enorm``, ``hnorm`` (H), ``eh_proj`` (H, 2H),
    ``shared_head.norm`` (H) and, with ``head``, ``shared_head.head`` and ``embed_tokens`` (V, H)
    (GLM leaves these two to the main model's). config.json gets num_nextn_predict_layers 1.
    Returns the names added."""
    import json

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    n = config["num_hidden_layers"]
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    added: list[str] = []
    g = torch.Generator().manual_seed(seed)

    def change(tensors: dict) -> dict:
        last, new = f"model.layers.{n - 1}.", f"model.layers.{n}."
        dtype = tensors["model.norm.weight"].dtype
        for name in [k for k in tensors if k.startswith(last)]:
            tensors[new + name[len(last):]] = _random_like(tensors[name], g)
        extra = {"enorm.weight": (hidden,), "hnorm.weight": (hidden,), "eh_proj.weight": (hidden, 2 * hidden),
                 "shared_head.norm.weight": (hidden,)}
        if head:
            extra |= {"shared_head.head.weight": (vocab, hidden), "embed_tokens.weight": (vocab, hidden)}
        for rel, shape in extra.items():
            scale = 0.1 if len(shape) == 2 else 0.05
            base = 0.0 if len(shape) == 2 else 1.0
            tensors[new + rel] = (base + scale * torch.randn(shape, generator=g)).to(dtype)
        added.extend(sorted(k for k in tensors if k.startswith(new)))
        return tensors

    _rewrite_single_shard(folder, change)
    (folder / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}, indent=2))
    return added


def append_mtp_block(folder: Path, seed: int = 1) -> list[str]:
    """Append Qwen3-Next's multi-token-prediction block to the one-shard checkpoint ``folder``, as its release
    carries it outside the decoder layers: ``mtp.fc`` (H, 2H), ``mtp.norm``, ``mtp.pre_fc_norm_embedding``,
    ``mtp.pre_fc_norm_hidden`` (H) and ``mtp.layers.0.*``, a decoder block with the names and shapes of the last
    (full-attention) layer and new random values; Qwen3.5's releases carry it so beside their nested language
    model (make_nested_release). Returns the names added."""
    import json

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = "model.language_model." if "text_config" in config else "model."
    config = config.get("text_config", config)
    last, hidden = f"{model}layers.{config['num_hidden_layers'] - 1}.", config["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    added: list[str] = []

    def change(tensors: dict) -> dict:
        dtype = tensors[f"{model}norm.weight"].dtype
        new = {"mtp.fc.weight": 0.1 * torch.randn(hidden, 2 * hidden, generator=g)}
        new |= {f"mtp.{n}.weight": 1 + 0.05 * torch.randn(hidden, generator=g)
                for n in ("norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden")}
        for name in [k for k in tensors if k.startswith(last)]:
            new["mtp.layers.0." + name[len(last):]] = _random_like(tensors[name], g)
        tensors |= {k: v.to(dtype) for k, v in new.items()}
        added.extend(sorted(new))
        return tensors

    _rewrite_single_shard(folder, change)
    return added


# Kept linears (never quantized) that FP8 releases nonetheless store in FP8: DeepSeek-V3.2's and GLM-5's indexer key.
RELEASED_FP8 = ("self_attn.indexer.wk",)


def router_or_mtp_extra(model_type: str):
    """skip(name) for formats.fp8.write_fp8_release: the row's routers and kept linears, and the MTP layer's
    embedding, head and eh_proj, which DeepSeek-V3's release keeps in BF16; but DeepSeek-V3.2's and GLM-5's
    releases store their indexer's kept wk in FP8 (RELEASED_FP8)."""
    from quantmoe.model.architectures import ARCHITECTURES

    row = ARCHITECTURES[model_type]
    routers = row.routers + tuple(k for k in row.kept_linears() if k not in RELEASED_FP8)

    def skip(name: str) -> bool:
        layer = ".".join(name.split(".")[:3])
        rel = name[len(layer) + 1:]
        return any(rel.startswith(r + ".") for r in routers) or rel.startswith(("eh_proj.", "shared_head.head.",
                                                                                "embed_tokens."))
    return skip


def dequantized_copy(src: Path, folder: Path) -> Path:
    """The exact BF16 conversion of the one-shard FP8 release ``src`` (DeepSeek-style or compressed-tensors),
    in ``folder``: every FP8 weight times its scale (formats.fp8.dequantize_fp8), scales dropped,
    config.json without its quantization_config."""
    import json
    import shutil

    from quantmoe.formats import reader_for
    from quantmoe.formats.fp8 import dequantize_fp8, fp8_linears

    shutil.copytree(src, folder)
    config = json.loads((folder / "config.json").read_text())
    quantization = config.pop("quantization_config")
    reader = reader_for(quantization)

    def change(tensors: dict) -> dict:
        for weight, scale in fp8_linears(tensors).items():
            w, s = tensors[weight], tensors.pop(scale)
            block = reader.block(quantization, tuple(w.shape), tuple(s.shape))
            tensors[weight] = dequantize_fp8(w, s, block, torch.bfloat16, weight)
        return tensors

    _rewrite_single_shard(folder, change)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


GLM_FP8 = {  # GLM-4.5-FP8's format: compressed-tensors, float8 weights with one scale per output channel
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"],
                                  "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                                              "dynamic": False},
                                  "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                        "dynamic": True, "symmetric": True}}},
    "ignore": ["lm_head", "re:.*mlp\\.gate$"]}


def write_compressed_fp8_release(src: Path, folder: Path, skip) -> Path:
    """The one-shard checkpoint ``src`` as a compressed-tensors FP8 release (GLM-4.5-FP8's format) in
    ``folder``: each 2-D ``model.layers.*.weight`` not ``skip``-ped becomes float8_e4m3fn codes plus a
    float32 ``weight_scale`` (out, 1); config.json gets ``GLM_FP8``."""
    import json
    import shutil

    from quantmoe.formats.fp8 import quantize_fp8_channels

    shutil.copytree(src, folder)

    def change(tensors: dict) -> dict:
        for name in [n for n, t in tensors.items() if n.startswith("model.layers.") and n.endswith(".weight")
                     and t.ndim == 2 and not skip(n)]:
            tensors[name], tensors[name + "_scale"] = quantize_fp8_channels(tensors[name])
        return tensors

    _rewrite_single_shard(folder, change)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": GLM_FP8}, indent=2))
    return folder


def spy_taken(monkeypatch, owner: type, name: str) -> list[bool]:
    """Wrap ``owner.name`` (a method that may decline by returning None) for the test: each call still returns what
    the method does, and the list returned here records, call by call, whether it gave something."""
    method, taken = getattr(owner, name), []

    def spy(self, *args, **kwargs):
        result = method(self, *args, **kwargs)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(owner, name, spy)
    return taken
