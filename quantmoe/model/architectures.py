"""The architecture table: one declarative row per supported model family.

Each row says, once and by exact path, where a decoder layer's parts live *on disk*
(the names every Hub checkpoint uses) and how they map onto the modules that
transformers 5.x builds in memory. Nothing elsewhere in quantmoe matches on substrings
such as "gate": routers are listed here by exact path and are never quantized.

Paths in a row are relative to one decoder layer (``model.layers.{i}.``). The layouts
were read off transformers 5.23 (``models/<family>/modeling_*.py`` and
``conversion_mapping.py``) and checked by saving tiny models (tests/test_architectures.py).
To add a family, see docs/architectures.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from ..base.errors import QuantMoeError

if TYPE_CHECKING:
    from torch import Tensor

# Linears that read one input (and so share one Hessian), in the order they are quantized.
Groups = tuple[tuple[str, ...], ...]


GPTQMODEL_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MLP:
    """A gated MLP (SwiGLU style): down(act(gate(x)) * up(x)).

    ``prefix`` is on-disk and relative to the layer; ``gate``/``up``/``down`` are the
    linear names under it. For routed experts the prefix holds ``{e}`` for the expert id.
    """

    prefix: str
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    def linear(self, which: str, expert: int | None = None) -> str:
        """On-disk path of one projection, e.g. ``block_sparse_moe.experts.3.w1``."""
        prefix = self.prefix.format(e=expert) if expert is not None else self.prefix
        return f"{prefix}.{getattr(self, which)}"


@dataclass(frozen=True)
class FusedExperts:
    """Routed experts as 3-D tensors: always in memory (transformers 5), on disk for some families.

    In memory, ``<module>.<gate_up>`` is (E, 2I, H) holding two halves along dim 1 in the
    order ``halves``, and ``<module>.<down>`` is (E, H, I).
    """

    module: str = "mlp.experts"          # in-memory module path
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    halves: tuple[str, str] = ("gate", "up")
    # Layer-relative on-disk names of the same tensors, for checkpoints that store experts fused
    # (GraniteMoE). None: the checkpoint has one linear per expert (the row's ``experts``).
    disk_gate_up: str | None = None
    disk_down: str | None = None
    # Whether transformers' conversion also reads one linear per expert into the fused tensors (Qwen3.5, whose FP8
    # releases store them so); where it reads only the fused names (GraniteMoE), an export's per-expert tensors
    # are left unread and its experts initialised at random.
    transformers_reads_per_expert: bool = False
    # Whether the fused tensors on disk are the in-memory ones transposed: gate_up (E, H, 2I) and down (E, I, H)
    # (Qwen3-VL-MoE's releases; transformers transposes them on loading).
    transposed: bool = False

    @property
    def on_disk(self) -> bool:
        return self.disk_gate_up is not None

    def in_memory(self, stored: Tensor) -> Tensor:
        """A fused tensor as stored on disk -> its in-memory layout ((E, 2I, H) or (E, H, I)), a view."""
        return stored.transpose(1, 2) if self.transposed else stored

    def memory_shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The in-memory shape of a fused tensor stored on disk with shape ``stored``."""
        return (stored[0], stored[2], stored[1]) if self.transposed else tuple(stored)


def _all_layers(config, index: int) -> bool:
    return True


def _sparse_step(config, index: int) -> bool:
    # Qwen2/3-MoE: mlp_only_layers are dense; otherwise every decoder_sparse_step-th layer is MoE.
    mlp_only = getattr(config, "mlp_only_layers", None) or []
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return index not in mlp_only and (index + 1) % step == 0


def _first_k_dense(config, index: int) -> bool:
    # DeepSeek: the first first_k_dense_replace layers have a dense MLP.
    return index >= (getattr(config, "first_k_dense_replace", 0) or 0)


@dataclass(frozen=True)
class LayerKind:
    """Layers of one kind, where a per-layer list of the config names each layer's (``Architecture.layer_types``):
    what such a layer holds where it differs from the row (None: the row's)."""

    name: str
    attention: Groups | None = None      # its token mixer's linears (Qwen3-Next's linear attention)
    kept: tuple[str, ...] | None = None  # its linears never quantized
    outputs: int | None = None           # what its token mixer returns (1: a bare tensor)
    reuses_keys: bool = False            # it attends to the keys an earlier layer's indexer chose (indexer_keys)


# Which decoder layers hold routed experts, by rule name (the row's ``sparse_rule``).
SPARSE_RULES = {"all": _all_layers, "sparse_step": _sparse_step, "first_k_dense": _first_k_dense}


@dataclass(frozen=True)
class Architecture:
    """Where a decoder layer's parts live, for one ``model_type``."""

    model_type: str
    # Attention linears, grouped by shared input (see Groups).
    attention: Groups
    # Routed experts: one linear per expert, "{e}" for the index. These are the on-disk names of
    # per-expert checkpoints and the names quantized experts are exported under (always per expert).
    experts: MLP | None = None
    # How the experts are fused in memory (and on disk, for some families).
    fused: FusedExperts = FusedExperts()
    # In-memory module whose input is the tokens entering the MoE block.
    moe_module: str | None = None
    # In-memory router module, called on tokens (T, H); it returns a tuple whose element
    # ``router_indices`` is the top-k expert indices (T, k), as the model's forward uses them,
    # and element ``router_weights`` the scores (T, k) the experts' outputs are multiplied by.
    router_module: str | None = None
    router_indices: int = -1
    router_weights: int = -2
    # In-memory tensors the router takes after the tokens, as the MoE block passes them (MiniMax-M2's router
    # takes the block's e_score_correction_bias).
    router_args: tuple[str, ...] = ()
    # Routers: exact on-disk module paths. Never quantized; every tensor under them (weights,
    # DeepSeek's e_score_correction_bias) is copied unchanged.
    routers: tuple[str, ...] = ()
    # Other linears of every layer that are never quantized and copied unchanged, as routers are (DeepSeek-V3.2's
    # indexer's key projection and per-head weights, which vLLM loads unquantized): exact on-disk module paths. An
    # FP8 release's are written as BF16, and GPTQ's ``dynamic`` excludes them for servers that would quantize them.
    kept: tuple[str, ...] = ()
    # Shared expert(s) fed every token in MoE layers.
    shared_expert: MLP | None = None
    # The MLP of dense layers (or of dense models).
    dense_mlp: MLP | None = None
    # Config attribute holding the number of routed experts.
    num_experts_attr: str = "num_local_experts"
    # On-disk -> in-memory prefix renames inside a layer (transformers 5 conversion); the first match
    # applies, so a more specific prefix goes first.
    renames: tuple[tuple[str, str], ...] = ()
    # Which layers are MoE: a key of SPARSE_RULES.
    sparse_rule: str = "all"
    # (config attribute, groups): when config.<attribute> is None, these groups replace ``attention``
    # (DeepSeek without a query LoRA has q_proj instead of q_a_proj/q_b_proj).
    attention_if_none: tuple[tuple[str, Groups], ...] = ()
    # In-memory (norm, mlp) paths when the layer ends in ``h + mlp(norm(h))``, h the residual stream
    # after attention (pre-norm blocks): the MLP stage and the layer's outputs then start from h
    # instead of running attention again. None: the layer is always run whole.
    mlp_tail: tuple[str, str] | None = ("post_attention_layernorm", "mlp")
    # (config attribute, the kinds of layer the row knows): the config's per-layer list names each layer's kind
    # (Qwen3-Next's layer_types: linear or full attention; GLM-5's indexer_types: "full" for a layer that runs its
    # own indexer, "shared" for one that reuses an earlier layer's choice); a config naming another kind is refused.
    layer_types: tuple[str, tuple[LayerKind, ...]] | None = None
    # Checkpoint prefixes outside the decoder layers that are copied unquantized and declared so (Qwen3-Next's
    # multi-token-prediction block, "mtp."; DeepSeek's MTP layers are decoder layers past the last: extra_layers).
    unquantized_prefixes: tuple[str, ...] = ()
    # How many values the attention module returns: its output and weights, and GLM-5's the keys its indexer chose.
    attention_outputs: int = 2
    # The keyword the model passes each decoder layer with the keys the last indexer chose, which layers without an
    # indexer attend to (GLM-5.2's "shared" layers: prev_topk_indices). The stream passes every key, as the indexer
    # chooses them all while a window is no longer than its config's index_topk (longer windows are refused).
    indexer_keys: str | None = None
    # Config attribute the head's logits are divided by (GraniteMoE's logits_scaling), if any.
    logits_divisor: str | None = None
    # GPTQModel interop (--layout gptqmodel): whether GPTQModel 7.6 loads this family under the
    # names gptqmodel_name gives, and whether its definition quantizes the MLP of a sparse model's
    # dense layers (DeepSeek's first_k_dense_replace layers: yes; Qwen-MoE's mlp_only_layers: no).
    gptqmodel: bool = True
    gptqmodel_dense_mlp: bool = False
    # Layer-relative tensors some releases store that no module of the family holds (Kimi K2's
    # rotary tables): never loaded, copied to the export as they are.
    unloaded: tuple[str, ...] = ()
    # Whether transformers has a causal-LM class for this model type. False: it builds the language model only as
    # a base model (Qwen3-VL-MoE's, which its releases run inside a vision-language model), and quantmoe's stream
    # puts the LM head on it (model.stream.HeadedLM).
    causal_lm: bool = True
    # One line for the docs table: what is special about this family.
    notes: str = ""

    def is_moe_layer(self, config, index: int) -> bool:
        """True when decoder layer ``index`` holds routed experts."""
        if self.experts is None or self.num_experts(config) == 0:  # Qwen-MoE with num_experts 0 is dense
            return False
        return SPARSE_RULES[self.sparse_rule](config, index)

    def num_experts(self, config) -> int:
        return int(getattr(config, self.num_experts_attr))

    def layer_kind(self, config, index: int) -> LayerKind:
        """The kind of decoder layer ``index`` (``layer_types``); the row itself where it has no kinds."""
        if self.layer_types is None:
            return LayerKind("")
        attribute, kinds = self.layer_types
        names = getattr(config, attribute, None) or ()
        name = str(names[index]) if index < len(names) else kinds[0].name
        return next(k for k in kinds if k.name == name)  # architecture_for refused the others

    def reuses_keys(self, config) -> bool:
        """Whether some layer attends to the keys an earlier layer's indexer chose (LayerKind.reuses_keys), which
        the stream passes it as ``indexer_keys``."""
        return self.indexer_keys is not None and any(self.layer_kind(config, i).reuses_keys
                                                     for i in range(int(config.num_hidden_layers)))

    def kept_linears(self) -> tuple[str, ...]:
        """Every linear some layer keeps in 16 bits (``kept``, and its kinds')."""
        kinds = self.layer_types[1] if self.layer_types else ()
        return tuple(dict.fromkeys(self.kept + tuple(n for k in kinds for n in k.kept or ())))

    def attention_groups(self, config) -> Groups:
        for attribute, groups in self.attention_if_none:
            if getattr(config, attribute, None) is None:
                return groups
        return self.attention

    def gptqmodel_name(self, name: str) -> str:
        """GPTQModel's name for an on-disk, layer-relative tensor.

        GPTQModel unfuses experts into ``<fused.module>.E.{gate,up,down}_proj`` and otherwise
        uses the in-memory module paths (for Mixtral ``mlp.*`` instead of ``block_sparse_moe.*``).
        """
        if self.experts is not None:
            for which, std in zip(("gate", "up", "down"), GPTQMODEL_PROJ):
                m = re.fullmatch(re.escape(self.experts.linear(which, 0)).replace(r"\.0\.", r"\.(\d+)\.") + r"\.(.+)", name)
                if m:
                    return f"{self.fused.module}.{m.group(1)}.{std}.{m.group(2)}"
        return self.to_memory(name)

    def from_gptqmodel_name(self, name: str) -> str:
        """Inverse of gptqmodel_name, for any unfused expert naming other tools write.

        GPTQModel writes ``<fused.module>.E.gate_proj`` under in-memory paths (Mixtral:
        ``mlp.experts.E.gate_proj``); llm-compressor writes ``<experts prefix>.E.gate_proj``
        with the in-memory renames undone (``block_sparse_moe.experts.E.gate_proj``). Both
        become the source name: renames are undone first, then either unfused naming maps to
        the row's projection names. Source names are fixed points.
        """
        return self._unfused_expert(name) or self.from_memory(name)

    def _unfused_expert(self, name: str) -> str | None:
        """The source name of an expert tensor under an unfused naming (GPTQModel's or
        llm-compressor's), or None when ``name`` is not one."""
        if self.experts is None:
            return None
        name = self.from_memory(name)
        for prefix in (re.escape(self.from_memory(self.fused.module)) + r"\.(\d+)",
                       re.escape(self.experts.prefix).replace(re.escape("{e}"), r"(\d+)")):
            m = re.fullmatch(prefix + r"\.(gate_proj|up_proj|down_proj)\.(.+)", name)
            if m:
                which = ("gate", "up", "down")[GPTQMODEL_PROJ.index(m.group(2))]
                source = f"{self.experts.linear(which, int(m.group(1)))}.{m.group(3)}"
                return source if source != name else None
        return None

    def expert_of(self, name: str) -> int | None:
        """The routed expert a layer-relative on-disk tensor belongs to (``block_sparse_moe.experts.3.w1.weight``:
        3; the source naming or an unfused one), or None for every other tensor, fused experts included."""
        if self.experts is None:
            return None
        head, tail = self.experts.prefix.split("{e}")
        m = re.fullmatch(re.escape(head) + r"(\d+)" + re.escape(tail) + r"\..+", self._unfused_expert(name) or name)
        return int(m.group(1)) if m else None

    def uses_unfused_names(self, names) -> bool:
        """True when a layer's tensor names (layer-relative) are in an unfused expert naming
        (GPTQModel's or llm-compressor's) rather than the source one; checkpoints written by
        GPTQModel or llm-compressor carry no ``meta.layout`` and are recognised this way.
        """
        return any(self._unfused_expert(n) is not None for n in names)

    def to_memory(self, name: str) -> str:
        """Map an on-disk, layer-relative tensor name to its in-memory module path."""
        for old, new in self.renames:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    def from_memory(self, name: str) -> str:
        """Inverse of to_memory; on-disk names are fixed points (GraniteMoE's router.layer. starts
        with its in-memory prefix router.)."""
        for old, new in self.renames:
            if name.startswith(old):
                return name
            if name.startswith(new):
                return old + name[len(new):]
        return name


_ATTENTION_QKVO: Groups = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
)

# DeepSeek's multi-head latent attention. q_a_proj and kv_a_proj_with_mqa both read the normed
# hidden state; q_b_proj reads q_a_layernorm's output and kv_b_proj kv_a_layernorm's, so each
# has its own Hessian, taken after the projection before it is quantized.
_ATTENTION_MLA: Groups = (
    ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
    ("self_attn.q_b_proj",),
    ("self_attn.kv_b_proj",),
    ("self_attn.o_proj",),
)
# DeepSeek-V3.2's sparse attention: MLA and its indexer, whose query projection reads the query's low-rank latent, as
# q_b_proj does. Its key projection wk and per-head weights_proj stay in 16 bits (_INDEXER_KEPT): vLLM runs the two
# as one unquantized linear (wk_weights_proj), so it cannot load a quantized wk.
_ATTENTION_MLA_INDEXER: Groups = (
    ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
    ("self_attn.q_b_proj", "self_attn.indexer.wq_b"),
    ("self_attn.kv_b_proj",),
    ("self_attn.o_proj",),
)
_INDEXER_KEPT = ("self_attn.indexer.wk", "self_attn.indexer.weights_proj")
_ATTENTION_MLA_NO_Q_LORA: Groups = (
    ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"),
    ("self_attn.kv_b_proj",),
    ("self_attn.o_proj",),
)


def _deepseek(model_type: str, notes: str, attention: Groups = _ATTENTION_MLA,
              attention_if_none: tuple[tuple[str, Groups], ...] = (("q_lora_rank", _ATTENTION_MLA_NO_Q_LORA),),
              unloaded: tuple[str, ...] = (), gptqmodel: bool = True, kept: tuple[str, ...] = (),
              attention_outputs: int = 2, layer_types: tuple[str, tuple[LayerKind, ...]] | None = None,
              indexer_keys: str | None = None) -> Architecture:
    """DeepSeek's MoE block (routed experts, shared experts, a sigmoid router with its
    e_score_correction_bias, dense first layers), which GLM-4.5 shares with other attention."""
    return Architecture(
        model_type=model_type,
        attention=attention,
        attention_if_none=attention_if_none,
        experts=MLP("mlp.experts.{e}"),
        moe_module="mlp",
        router_module="mlp.gate",
        routers=("mlp.gate",),
        kept=kept,
        shared_expert=MLP("mlp.shared_experts"),
        dense_mlp=MLP("mlp"),
        num_experts_attr="n_routed_experts",
        sparse_rule="first_k_dense",
        gptqmodel=gptqmodel,
        gptqmodel_dense_mlp=True,
        unloaded=unloaded,
        attention_outputs=attention_outputs,
        layer_types=layer_types,
        indexer_keys=indexer_keys,
        notes=notes,
    )


# Qwen3-Next's linear attention (Gated DeltaNet): in_proj_qkvz reads the layer's normed input (in_proj_ba too, kept)
# and out_proj the gated, normed output of the recurrence. in_proj_ba (per value head, the recurrence's step size
# and decay) stays in 16 bits, as Qwen's FP8 release keeps it and vLLM's FP8 path requires (it builds it
# quantized under GPTQ, so the export's dynamic excludes it); so does its short convolution conv1d (not a linear;
# vLLM builds it unquantized).
_LINEAR_ATTENTION = LayerKind(
    "linear_attention",
    attention=(("linear_attn.in_proj_qkvz",), ("linear_attn.out_proj",)),
    kept=("linear_attn.in_proj_ba", "linear_attn.conv1d"),
    outputs=1,
)


# Qwen3.5-MoE's linear attention: Qwen3-Next's, with its two input projections each split in two as stored
# (in_proj_qkv and in_proj_z, quantized together as one group and one recipe unit: vLLM loads them into one
# in_proj_qkvz; in_proj_b and in_proj_a, kept as Qwen3-Next's in_proj_ba is).
_SPLIT_LINEAR_ATTENTION = LayerKind(
    "linear_attention",
    attention=(("linear_attn.in_proj_qkv", "linear_attn.in_proj_z"), ("linear_attn.out_proj",)),
    kept=("linear_attn.in_proj_b", "linear_attn.in_proj_a", "linear_attn.conv1d"),
    outputs=1,
)


# Model types whose config.json is read as another's config: Kimi K2 ships DeepSeek-V3's
# architecture (DeepseekV3ForCausalLM, remote code) under model_type "kimi_k2", which
# transformers does not know. The export keeps the release's own config.json.
CONFIG_ALIASES = {"kimi_k2": "deepseek_v3"}


@dataclass(frozen=True)
class Nesting:
    """A release whose language model sits inside a larger model (a vision-language model's): its config under
    ``text_config``, its ``model.*`` tensors under ``stored`` (``model.language_model.``) beside other towers'.

    quantmoe reads such a checkpoint as the language model alone (``Checkpoint``: the text config, and the text
    model's tensors under the names a text-only checkpoint gives them, ``model.layers.*``), quantizes it by the text
    model's row, and writes the export under the release's own names and config.json. The other towers (``towers``:
    the vision encoder: every prefix of ``served`` but ``stored``) are copied unquantized and declared so.
    ``served``: (stored prefix, the prefix vLLM gives the same modules), for the export's module patterns, which
    vLLM matches against its own names."""

    text_config: str
    stored: str
    served: tuple[tuple[str, str], ...]

    @property
    def towers(self) -> tuple[str, ...]:
        return tuple(prefix for prefix, _ in self.served if prefix != self.stored)

    def served_pattern(self, pattern: str) -> str:
        """A regex over quantmoe's names of a nested checkpoint's modules (``^model\\.layers\\.3\\.``,
        ``^model\\.visual\\.``) -> one that matches the same modules under the release's names and under vLLM's;
        other patterns (``^mtp\\.``) unchanged."""
        served = dict(self.served)
        for tower in self.towers:
            if pattern.startswith("^" + re.escape(tower)):
                return f"^(?:{re.escape(tower)}|{re.escape(served[tower])})" + pattern[1 + len(re.escape(tower)):]
        head = "^" + re.escape("model.")
        if pattern.startswith(head):
            return f"^(?:{re.escape(self.stored)}|{re.escape(served[self.stored])})" + pattern[len(head):]
        return pattern

    def stored_name(self, name: str) -> str:
        """quantmoe's name of a nested checkpoint's tensor or module -> the release's (``model.layers.3.x`` ->
        ``model.language_model.layers.3.x``; a tower's and others' unchanged)."""
        if name.startswith("model.") and not (name + ".").startswith(self.towers):  # a tower's module named whole too
            return self.stored + name[len("model."):]
        return name

    def text_name(self, stored: str) -> str:
        """The inverse of stored_name, for the release's names."""
        return "model." + stored[len(self.stored):] if stored.startswith(self.stored) else stored


# Model types whose releases nest the language model (Nesting), by the model_type of their config.json.
# Qwen's vision-language releases (Qwen3-VL-MoE, Qwen3.5-MoE) all nest alike.
_QWEN_VISION_LANGUAGE = Nesting(text_config="text_config", stored="model.language_model.",
                                served=(("model.language_model.", "language_model.model."), ("model.visual.", "visual.")))
NESTED = {"qwen3_5_moe": _QWEN_VISION_LANGUAGE, "qwen3_vl_moe": _QWEN_VISION_LANGUAGE}


_MIXTRAL = Architecture(
    model_type="mixtral",
    attention=_ATTENTION_QKVO,
    experts=MLP("block_sparse_moe.experts.{e}", gate="w1", up="w3", down="w2"),
    moe_module="mlp",
    router_module="mlp.gate",
    routers=("block_sparse_moe.gate",),
    renames=(("block_sparse_moe.", "mlp."),),
    notes="w1 = gate, w3 = up, w2 = down",
)

_QWEN2_MOE = Architecture(
    model_type="qwen2_moe",
    attention=_ATTENTION_QKVO,
    experts=MLP("mlp.experts.{e}"),
    moe_module="mlp",
    router_module="mlp.gate",
    routers=("mlp.gate", "mlp.shared_expert_gate"),
    shared_expert=MLP("mlp.shared_expert"),
    dense_mlp=MLP("mlp"),
    num_experts_attr="num_experts",
    sparse_rule="sparse_step",
    notes="`shared_expert_gate` (H to 1, sigmoid) is a router",
)


_QWEN3_MOE = replace(_QWEN2_MOE, model_type="qwen3_moe", routers=("mlp.gate",), shared_expert=None,
                     notes="many small experts, no shared expert; q/k norms")


ARCHITECTURES: dict[str, Architecture] = {
    row.model_type: row
    for row in (
        _MIXTRAL,
        _QWEN2_MOE,
        _QWEN3_MOE,
        replace(_QWEN3_MOE, model_type="qwen3_vl_moe_text",
                fused=FusedExperts(disk_gate_up="mlp.experts.gate_up_proj", disk_down="mlp.experts.down_proj",
                                   transposed=True),
                causal_lm=False, gptqmodel=False,
                notes="Qwen3-VL-MoE's language model (`qwen3_vl_moe` releases nest it beside a vision tower, which is "
                      "copied unquantized): Qwen3-MoE's layers, the routed experts fused and transposed on disk in "
                      "BF16 releases; transformers builds it only as a base model, quantmoe adds the LM head"),
        replace(_QWEN2_MOE, model_type="qwen3_next",
                layer_types=("layer_types", (LayerKind("full_attention"), _LINEAR_ATTENTION)),
                unquantized_prefixes=("mtp.",),
                notes="Qwen3-Next: Qwen2-MoE's MoE block (512 experts, a gated shared expert) under three "
                      "linear-attention (Gated DeltaNet) layers to one gated full-attention layer; "
                      "`linear_attn.in_proj_ba` kept"),
        replace(_QWEN2_MOE, model_type="qwen3_5_moe_text",
                # The BF16 releases store the routed experts fused; the FP8 ones one linear per expert.
                fused=FusedExperts(disk_gate_up="mlp.experts.gate_up_proj", disk_down="mlp.experts.down_proj",
                                   transformers_reads_per_expert=True),
                sparse_rule="all", dense_mlp=None,
                layer_types=("layer_types", (LayerKind("full_attention"), _SPLIT_LINEAR_ATTENTION)),
                unquantized_prefixes=("mtp.",),
                notes="Qwen3.5-MoE's language model (`qwen3_5_moe` releases nest it beside a vision tower, which is "
                      "copied unquantized): Qwen3-Next's layers with its linear attention's input projections split "
                      "in two (`in_proj_qkv` with `in_proj_z`; `in_proj_b`, `in_proj_a` kept); every layer MoE"),
        Architecture(
            model_type="olmoe",
            attention=_ATTENTION_QKVO,
            experts=MLP("mlp.experts.{e}"),
            moe_module="mlp",
            router_module="mlp.gate",
            routers=("mlp.gate",),
            num_experts_attr="num_experts",
            notes="64 experts, top-8 in the released model; q/k norms",
        ),
        _deepseek("deepseek_v2", "multi-head latent attention; V2-Lite has no query LoRA (q_proj)"),
        _deepseek("deepseek_v3", "grouped sigmoid router whose fp32 `e_score_correction_bias` is kept with it; "
                                 "also Kimi K2 (`kimi_k2`: 384 experts, one group), whose per-layer "
                                 "`self_attn.rotary_emb.inv_freq` is copied, not loaded",
                  unloaded=("self_attn.rotary_emb.inv_freq",)),
        _deepseek("deepseek_v32", "DeepSeek-V3.2: DeepSeek-V3 with sparse attention, whose indexer's `wq_b` is "
                                  "quantized with q_b_proj and its `wk` and `weights_proj` kept in 16 bits (vLLM "
                                  "runs them as one unquantized linear)",
                  attention=_ATTENTION_MLA_INDEXER, attention_if_none=(), kept=_INDEXER_KEPT),
        _deepseek("glm_moe_dsa", "GLM-5, GLM-5.1 and GLM-5.2: DeepSeek-V3.2's sparse attention (the indexer as "
                                 "there) and MoE block, one expert group, 78 layers of which 3 dense; GLM-5.2's "
                                 "`indexer_types` \"shared\" layers reuse an earlier layer's choice of keys and have "
                                 "no indexer",
                  attention=_ATTENTION_MLA_INDEXER, attention_if_none=(), kept=_INDEXER_KEPT, attention_outputs=3,
                  layer_types=("indexer_types", (LayerKind("full"), LayerKind("shared", attention=_ATTENTION_MLA,
                                                                                    kept=(), reuses_keys=True))),
                  indexer_keys="prev_topk_indices"),
        _deepseek("glm4_moe", "GLM-4.5/4.6: DeepSeek-V3's MoE block (sigmoid router with `e_score_correction_bias`, "
                              "shared expert, `first_k_dense_replace` dense layers) under grouped-query attention "
                              "with q/k/v biases, qk-norm and partial rotary",
                  attention=_ATTENTION_QKVO, attention_if_none=(),
                  # GPTQModel 7.6's own glm4_moe model fails in its forward under transformers 5 (the
                  # router returns a tuple where it expects logits), so no GPTQModel layout is offered.
                  gptqmodel=False),
        replace(_MIXTRAL, model_type="minimax_m2", router_args=("mlp.e_score_correction_bias",),
                notes="MiniMax-M2: Mixtral's names; a sigmoid router that takes the block's fp32 "
                      "`e_score_correction_bias` (kept as released); q/k norms over all heads; partial rotary"),
        replace(_MIXTRAL, model_type="phimoe", router_module="mlp.router",
                renames=(("block_sparse_moe.gate.", "mlp.router."), ("block_sparse_moe.", "mlp.")),
                notes="LayerNorms and attention with biases, lm_head bias"),
        Architecture(
            model_type="granitemoe",
            attention=_ATTENTION_QKVO,
            # Fused on disk; exported per expert under the Mixtral names vLLM's GraniteMoE loader maps to.
            experts=MLP("block_sparse_moe.experts.{e}", gate="w1", up="w3", down="w2"),
            fused=FusedExperts(module="block_sparse_moe.experts", disk_gate_up="block_sparse_moe.input_linear.weight",
                               disk_down="block_sparse_moe.output_linear.weight"),
            moe_module="block_sparse_moe",
            router_module="block_sparse_moe.router",
            routers=("block_sparse_moe.router.layer",),
            renames=(("block_sparse_moe.router.layer.", "block_sparse_moe.router."),),
            logits_divisor="logits_scaling",
            mlp_tail=None,  # its residual adds are scaled by residual_multiplier
            gptqmodel=False,  # GPTQModel packs gate+up of each expert as one input_linear.{e}.linear
            notes="logits divided by `logits_scaling`; exported per expert under the names vLLM splits experts into",
        ),
        Architecture(
            model_type="llama",
            attention=_ATTENTION_QKVO,
            dense_mlp=MLP("mlp"),
            notes="dense",
        ),
        Architecture(
            model_type="mistral",
            attention=_ATTENTION_QKVO,
            dense_mlp=MLP("mlp"),
            notes="dense",
        ),
    )
}


def is_causal_lm(config) -> bool:
    """False for encoders (BERT), encoder-decoders (T5) and heads other than a causal LM."""

    heads = getattr(config, "architectures", None) or []
    if heads:
        return any(h.endswith(("ForCausalLM", "LMHeadModel")) for h in heads)
    model_type = getattr(config, "model_type", None)
    # BERT-likes sit in the causal-LM table too (as decoders); being masked LMs gives them away.
    return (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and not getattr(config, "is_encoder_decoder", False))


# Config values that size what quantmoe builds, checked (``check_config``) before transformers or
# quantmoe allocates anything from them. None is allowed where transformers derives the value.
POSITIVE_SIZES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim", "moe_intermediate_size",
                  "shared_expert_intermediate_size", "num_experts_per_tok", "kv_lora_rank", "q_lora_rank",
                  "v_head_dim", "qk_rope_head_dim", "n_group", "topk_group", "index_n_heads", "index_head_dim",
                  "index_topk", "index_topk_freq", "linear_num_key_heads", "linear_num_value_heads",
                  "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "full_attention_interval")
COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "n_shared_experts", "first_k_dense_replace",
          "decoder_sparse_step", "qk_nope_head_dim", "index_skip_topk_offset")
# Per-layer lists of kinds of layer (Architecture.layer_types): lists of strings where present.
LAYER_KIND_LISTS = ("layer_types", "indexer_types")
# Larger than any released model's dimension or count by orders of magnitude: a value above it is a
# damaged or hostile config, whose skeleton alone could exhaust memory or take hours to build.
SIZE_LIMIT = 2**24
LAYER_LIMIT = 2**14


def check_config(config: dict, where: str = "config.json") -> None:
    """Raise a one-line error for a config.json whose sizes cannot describe a model: a size that is
    not a positive integer (zero heads, 1e9 as a float, a string, a list), a count below zero, a
    value beyond SIZE_LIMIT/LAYER_LIMIT, ``num_experts_per_tok`` above the experts, a
    ``mlp_only_layers`` that is not a list of layer indices, or a per-layer list of kinds (LAYER_KIND_LISTS)
    that is not a list of strings. ``config`` is the raw JSON object."""
    def bad(key: str, want: str) -> QuantMoeError:
        return QuantMoeError(f"{where}: {key} = {json.dumps(config[key])[:60]} is not {want}; "
                             "restore the checkpoint's config.json (or re-download it)")

    for key in POSITIVE_SIZES + COUNTS:
        value = config.get(key)
        if value is None:
            continue
        least = 1 if key in POSITIVE_SIZES else 0
        limit = LAYER_LIMIT if key == "num_hidden_layers" else SIZE_LIMIT
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= limit:
            raise bad(key, f"an integer from {least} to {limit}")
    experts = [config[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if config.get(k)]
    top_k = config.get("num_experts_per_tok")
    if experts and top_k is not None and top_k > max(experts):
        raise bad("num_experts_per_tok", f"a number of experts per token this model has ({max(experts)} experts)")
    layers = config.get("mlp_only_layers")
    if layers is not None and not (isinstance(layers, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= LAYER_LIMIT for i in layers)):
        raise bad("mlp_only_layers", "a list of layer indices")
    for key in LAYER_KIND_LISTS:
        kinds = config.get(key)
        if kinds is not None and not (isinstance(kinds, list) and len(kinds) <= LAYER_LIMIT
                                      and all(isinstance(k, str) for k in kinds)):
            raise bad(key, "a list of kinds of layer (strings)")


def architecture_for(config) -> Architecture:
    """The row for ``config.model_type``, or a one-line error listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(sorted(ARCHITECTURES))
    row = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if not is_causal_lm(config) and (row is None or row.causal_lm):
        heads = ", ".join(getattr(config, "architectures", None) or [])
        what = f"{model_type!r} model" + (f" ({heads})" if heads else "")
        raise QuantMoeError(f"unsupported architecture {model_type!r}: the model is a {what}, not a causal language "
                            f"model; quantmoe quantizes decoder-only Mixture-of-Experts LMs (supported: {supported})")
    try:
        arch = ARCHITECTURES[model_type]
    except KeyError:
        raise QuantMoeError(
            f"unsupported architecture {model_type!r}; supported: {supported} "
            "(see docs/architectures.md to add one)"
        ) from None
    if arch.layer_types is not None:
        attribute, kinds = arch.layer_types
        known = [k.name for k in kinds]
        other = sorted({str(t) for t in getattr(config, attribute, None) or ()} - set(known))
        if other:
            raise QuantMoeError(f"this {model_type} model's config.json gives layers the {attribute} {other}, which "
                                f"quantmoe cannot quantize yet (it knows {list(known)}); quantize a release whose "
                                f"{attribute} are all of those")
    return arch


def reused_keys_window(arch: Architecture, config, seqlen: int) -> str | None:
    """None where a model runs windows of ``seqlen`` tokens as quantmoe streams them; else the one-line reason: a
    model with layers that attend to an earlier layer's indexer choice (LayerKind.reuses_keys, GLM-5.2's "shared"
    layers) is given every key (LayerStream.every_key), which is that choice only while a window is no longer than
    the config's index_topk."""
    if not arch.reuses_keys(config):
        return None
    topk = int(getattr(config, "index_topk", 0) or 0)
    if seqlen <= topk:
        return None
    return (f"this model's layers that reuse an earlier layer's choice of keys (indexer_types \"shared\") are run by "
            f"quantmoe only on windows no longer than index_topk ({topk}), where every key is chosen; use --seqlen "
            f"{topk} or less (not {seqlen})")


@dataclass(frozen=True)
class LayerPlan:
    """What to quantize in one decoder layer, resolved from a row and the config."""

    index: int
    attention: Groups
    experts: MLP | None
    num_experts: int
    shared_expert: MLP | None
    dense_mlp: MLP | None
    routers: tuple[str, ...] = field(default=())
    fused: FusedExperts | None = None  # set in MoE layers
    attention_outputs: int = 2  # what its token mixer returns (Architecture.attention_outputs, LayerKind.outputs)

    def quantized_linears(self) -> list[str]:
        """Every on-disk linear path (layer-relative) this layer quantizes, in order."""
        return list(self.linear_kinds())

    def linear_kinds(self) -> dict[str, str]:
        """Quantized linear path -> its kind: attention, expert, shared_expert or dense_mlp."""
        kinds = {n: "attention" for group in self.attention for n in group}
        if self.experts is not None:
            for e in range(self.num_experts):
                kinds.update({self.experts.linear(w, e): "expert" for w in ("gate", "up", "down")})
        for mlp, kind in ((self.shared_expert, "shared_expert"), (self.dense_mlp, "dense_mlp")):
            if mlp is not None:
                kinds.update({mlp.linear(w): kind for w in ("gate", "up", "down")})
        return kinds

    def pattern(self, name: str) -> str:
        """``name`` with a routed expert's index written as ``{e}`` (other names unchanged)."""
        if self.experts is not None:
            for which in ("gate", "up", "down"):
                generic = self.experts.linear(which)
                head, tail = generic.split("{e}")
                middle = name[len(head):len(name) - len(tail)]
                if name.startswith(head) and name.endswith(tail) and middle.isdigit():
                    return generic
        return name

    def fused_disk_tensors(self) -> tuple[str, ...]:
        """Layer-relative on-disk tensors that hold this layer's experts fused (replaced on export)."""
        if self.fused is None or not self.fused.on_disk:
            return ()
        return (self.fused.disk_gate_up, self.fused.disk_down)

    def linear_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
        """(out, in) of every quantized linear, from layer-relative on-disk tensor shapes.

        Per-expert linears of a checkpoint that stores experts fused are cut out of the
        fused tensors' shapes. A linear found neither way is left out (the layer load reports it).
        """
        out: dict[str, tuple[int, int]] = {}
        fused = self.fused if self.fused is not None and self.fused.on_disk else None
        for name in self.linear_kinds():
            if f"{name}.weight" in shapes:
                rows, cols = _rank(shapes, f"{name}.weight", 2, self.index)
                out[name] = (rows, cols)
        if fused is not None and self.experts is not None:
            if fused.disk_gate_up in shapes:
                _, two_i, hidden = fused.memory_shape(_rank(shapes, fused.disk_gate_up, 3, self.index))
                for e in range(self.num_experts):
                    out.setdefault(self.experts.linear("gate", e), (two_i // 2, hidden))
                    out.setdefault(self.experts.linear("up", e), (two_i // 2, hidden))
            if fused.disk_down in shapes:
                _, down_out, down_in = fused.memory_shape(_rank(shapes, fused.disk_down, 3, self.index))
                for e in range(self.num_experts):
                    out.setdefault(self.experts.linear("down", e), (down_out, down_in))
        return out


def _rank(shapes: Mapping[str, tuple[int, ...]], name: str, rank: int, index: int) -> tuple[int, ...]:
    """``shapes[name]``, or a one-line error when that tensor does not have ``rank`` dimensions."""
    shape = tuple(shapes[name])
    if len(shape) != rank:
        raise QuantMoeError(f"model.layers.{index}.{name} has shape {list(shape)}; a {'linear weight' if rank == 2 else 'fused expert tensor'} "
                            f"has {rank} dimensions: the checkpoint is damaged or not of this architecture")
    return shape


def plan_layer(arch: Architecture, config, index: int, layout: str = "source") -> LayerPlan:
    """What layer ``index`` quantizes. Some of GPTQModel's definitions (Qwen-MoE) do not cover the
    dense MLP of a sparse model's dense layers; the ``gptqmodel`` layout then leaves it in full precision."""
    moe = arch.is_moe_layer(config, index)
    skip_dense = layout == "gptqmodel" and arch.experts is not None and not arch.gptqmodel_dense_mlp
    dense = None if moe or skip_dense else arch.dense_mlp
    kind = arch.layer_kind(config, index)
    return LayerPlan(
        index=index,
        attention=arch.attention_groups(config) if kind.attention is None else kind.attention,
        experts=arch.experts if moe else None,
        num_experts=arch.num_experts(config) if moe else 0,
        shared_expert=arch.shared_expert if moe else None,
        dense_mlp=dense,
        routers=(arch.routers if moe else ()) + (arch.kept if kind.kept is None else kind.kept),
        fused=arch.fused if moe else None,
        attention_outputs=arch.attention_outputs if kind.outputs is None else kind.outputs,
    )


def unfuse_experts(plan: LayerPlan, name: str, fused: Tensor) -> dict[str, Tensor]:
    """One on-disk fused expert tensor of ``plan``'s layer -> per-expert weights under the row's
    per-expert names (``<experts.linear(which, e)>.weight``), as views of ``fused``.

    ``name`` is one of ``plan.fused_disk_tensors()``: ``disk_gate_up`` (E, 2I, H) gives each
    expert's two halves (I, H) in ``fused.halves`` order, ``disk_down`` (E, H, I) each expert's
    down (H, I). The inverse of the stacking in ``LayerStream.to_memory``; one tensor at a time,
    so a caller holds one fused tensor, not the layer's experts.
    """
    layout = plan.fused
    names = unfused_names(plan, name)
    if fused.shape[0] != plan.num_experts:
        raise QuantMoeError(f"{name} of layer {plan.index} holds {fused.shape[0]} experts, its config "
                            f"{plan.num_experts}; is the checkpoint of this config?")
    fused = layout.in_memory(fused)
    if name == layout.disk_gate_up:
        half = fused.shape[1] // 2
        return dict(zip(names, (fused[e, k * half:(k + 1) * half] for e in range(fused.shape[0])
                                for k in range(len(layout.halves)))))
    return dict(zip(names, (fused[e] for e in range(fused.shape[0]))))


def unfused_names(plan: LayerPlan, name: str) -> list[str]:
    """The per-expert weights (layer-relative names) that ``unfuse_experts`` cuts out of the fused on-disk
    tensor ``name``, in its order: each expert's two halves for ``disk_gate_up``, its down for ``disk_down``."""
    layout, experts = plan.fused, plan.experts
    if name in plan.fused_disk_tensors() and name == layout.disk_gate_up:
        return [f"{experts.linear(which, e)}.weight" for e in range(plan.num_experts) for which in layout.halves]
    if name in plan.fused_disk_tensors() and name == layout.disk_down:
        return [f"{experts.linear('down', e)}.weight" for e in range(plan.num_experts)]
    raise QuantMoeError(f"{name} is not a fused expert tensor of layer {plan.index} "
                        f"(those are {', '.join(plan.fused_disk_tensors()) or 'none'})")


def markdown_table() -> str:
    """The supported-architectures table of docs/architectures.md, generated from ARCHITECTURES."""
    layers_text = {"all": "all", "sparse_step": "not in `mlp_only_layers`, every `decoder_sparse_step`-th",
                   "first_k_dense": "from `first_k_dense_replace` on"}
    lines = ["| model_type | attention groups | routed experts on disk | in memory | routers (never quantized) | "
             "shared expert | dense MLP | MoE layers | notes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def code(text: str | None) -> str:
        return f"`{text}`" if text else "-"

    def groups(attention: Groups) -> str:
        return " ".join("(" + ", ".join(n.rsplit(".", 1)[-1] for n in g) + ")" for g in attention)

    for row in sorted(ARCHITECTURES.values(), key=lambda r: r.model_type):
        attention = groups(row.attention)
        for attribute, other in row.attention_if_none:
            attention += f"; without `{attribute}`: " + groups(other)
        attribute, kinds = row.layer_types or ("", ())
        for kind in kinds:
            if kind.attention is not None:
                attention += f"; `{attribute}` {kind.name}: " + groups(kind.attention)
        if row.experts is None:
            experts = memory = "-"
        else:
            if row.fused.on_disk:
                experts = f"`{row.fused.disk_gate_up}`, `{row.fused.disk_down}` (fused" \
                          f"{', transposed' if row.fused.transposed else ''}; exported as " \
                          f"`{row.experts.prefix}.{{{row.experts.gate},{row.experts.up},{row.experts.down}}}`)"
            else:
                experts = f"`{row.experts.prefix}.{{{row.experts.gate},{row.experts.up},{row.experts.down}}}`"
            memory = (f"`{row.fused.module}.{row.fused.gate_up}` ({'+'.join(row.fused.halves)}), "
                      f"router `{row.router_module}`")
        lines.append(" | ".join([
            f"| `{row.model_type}`", attention, experts, memory,
            ", ".join(code(r) for r in row.routers + row.kept_linears()) or "-",
            code(row.shared_expert.prefix) if row.shared_expert else "-",
            code(row.dense_mlp.prefix) if row.dense_mlp else "-",
            "-" if row.experts is None else layers_text[row.sparse_rule], row.notes]) + " |")
    return "\n".join(lines) + "\n"
