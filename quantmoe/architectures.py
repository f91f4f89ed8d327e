"""The architecture table: one declarative row per supported model family.

Each row says, once and by exact path, where a decoder layer's parts live *on disk*
(the names every Hub checkpoint uses) and how they map onto the fused modules that
transformers 5.x builds in memory. Nothing elsewhere in quantmoe matches on substrings
such as "gate": routers are listed here by exact path and are never quantized.

Paths in a row are relative to one decoder layer (``model.layers.{i}.``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import QuantMoeError


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
class Architecture:
    """Where a decoder layer's parts live, for one ``model_type``."""

    model_type: str
    # Linear groups of the attention block; each inner tuple shares one input and so one Hessian.
    attention: tuple[tuple[str, ...], ...]
    # Routed experts on disk, with "{e}" for the expert index.
    experts: MLP | None
    # The MoE block: on-disk prefix and the in-memory module path (transformers 5 renames some).
    moe_block: str | None
    moe_module: str | None
    # In-memory module holding the fused expert tensors gate_up_proj (E, 2I, H) and down_proj (E, H, I).
    experts_module: str = "mlp.experts"
    # Routers: exact on-disk module paths. Never quantized.
    routers: tuple[str, ...] = ()
    # Shared expert(s) fed every token, and their scalar gate (a router: never quantized).
    shared_expert: MLP | None = None
    # The MLP of dense layers (or of dense models).
    dense_mlp: MLP | None = None
    # Config attribute holding the number of routed experts.
    num_experts_attr: str = "num_local_experts"
    # On-disk -> in-memory renames inside a layer (transformers 5 conversion), applied in order.
    renames: tuple[tuple[str, str], ...] = ()
    # Which layers are MoE: "all", or "qwen2_moe" rules (mlp_only_layers / decoder_sparse_step).
    sparse_rule: str = "all"

    def is_moe_layer(self, config, index: int) -> bool:
        """True when decoder layer ``index`` holds routed experts."""
        if self.experts is None:
            return False
        if self.sparse_rule == "all":
            return True
        if self.sparse_rule == "qwen2_moe":
            mlp_only = getattr(config, "mlp_only_layers", None) or []
            step = getattr(config, "decoder_sparse_step", 1) or 1
            return index not in mlp_only and getattr(config, self.num_experts_attr) > 0 and (index + 1) % step == 0
        raise ValueError(f"unknown sparse_rule {self.sparse_rule!r}")

    def num_experts(self, config) -> int:
        return int(getattr(config, self.num_experts_attr))

    def gptqmodel_name(self, name: str) -> str:
        """GPTQModel's name for an on-disk, layer-relative tensor.

        GPTQModel unfuses experts into ``<experts_module>.E.{gate,up,down}_proj`` and otherwise
        uses the in-memory module paths (for Mixtral ``mlp.*`` instead of ``block_sparse_moe.*``).
        """
        if self.experts is not None:
            for which, std in zip(("gate", "up", "down"), GPTQMODEL_PROJ):
                m = re.fullmatch(re.escape(self.experts.linear(which, 0)).replace(r"\.0\.", r"\.(\d+)\.") + r"\.(.+)", name)
                if m:
                    return f"{self.experts_module}.{m.group(1)}.{std}.{m.group(2)}"
        return self.to_memory(name)

    def from_gptqmodel_name(self, name: str) -> str:
        """Inverse of gptqmodel_name, for any unfused expert naming other tools write.

        GPTQModel writes ``mlp.experts.E.gate_proj`` (in-memory paths); llm-compressor writes
        ``block_sparse_moe.experts.E.gate_proj`` (in-memory renames undone, experts still
        unfused). Both become the source name: renames are undone first, then
        ``<experts prefix>.E.{gate,up,down}_proj`` maps to the row's projection names.
        Source names are fixed points.
        """
        for old, new in reversed(self.renames):
            if name.startswith(new):
                name = old + name[len(new):]
        if self.experts is not None:
            prefix = re.escape(self.experts.prefix).replace(re.escape("{e}"), r"(\d+)")
            m = re.fullmatch(prefix + r"\.(gate_proj|up_proj|down_proj)\.(.+)", name)
            if m:
                which = ("gate", "up", "down")[GPTQMODEL_PROJ.index(m.group(2))]
                return f"{self.experts.linear(which, int(m.group(1)))}.{m.group(3)}"
        return name

    def uses_unfused_names(self, names) -> bool:
        """True when a layer's tensor names (layer-relative) are in an unfused expert naming
        (GPTQModel's or llm-compressor's) rather than the source one.

        Every source name is a fixed point of ``from_gptqmodel_name`` (tests check this for
        each row), so one name it changes decides; checkpoints written by GPTQModel or
        llm-compressor carry no ``meta.layout`` and are recognised this way.
        """
        return any(self.from_gptqmodel_name(n) != n for n in names)

    def to_memory(self, name: str) -> str:
        """Map an on-disk, layer-relative tensor name to its in-memory module path."""
        for old, new in self.renames:
            if name.startswith(old):
                name = new + name[len(old):]
        return name


_ATTENTION_QKVO = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
)

ARCHITECTURES: dict[str, Architecture] = {
    row.model_type: row
    for row in (
        Architecture(
            model_type="mixtral",
            attention=_ATTENTION_QKVO,
            experts=MLP("block_sparse_moe.experts.{e}", gate="w1", up="w3", down="w2"),
            moe_block="block_sparse_moe",
            moe_module="mlp",
            routers=("block_sparse_moe.gate",),
            renames=(("block_sparse_moe.", "mlp."),),
        ),
        Architecture(
            model_type="qwen2_moe",
            attention=_ATTENTION_QKVO,
            experts=MLP("mlp.experts.{e}"),
            moe_block="mlp",
            moe_module="mlp",
            routers=("mlp.gate", "mlp.shared_expert_gate"),
            shared_expert=MLP("mlp.shared_expert"),
            dense_mlp=MLP("mlp"),
            num_experts_attr="num_experts",
            sparse_rule="qwen2_moe",
        ),
    )
}


def is_causal_lm(config) -> bool:
    """False for encoders (BERT), encoder-decoders (T5) and heads other than a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    heads = getattr(config, "architectures", None) or []
    if heads:
        return any(h.endswith(("ForCausalLM", "LMHeadModel")) for h in heads)
    model_type = getattr(config, "model_type", None)
    # BERT-likes sit in the causal-LM table too (as decoders); being masked LMs gives them away.
    return (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and not getattr(config, "is_encoder_decoder", False))


def architecture_for(config) -> Architecture:
    """The row for ``config.model_type``, or a one-line error listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(sorted(ARCHITECTURES))
    if not is_causal_lm(config):
        heads = ", ".join(getattr(config, "architectures", None) or [])
        what = f"{model_type!r} model" + (f" ({heads})" if heads else "")
        raise QuantMoeError(f"unsupported architecture {model_type!r}: the model is a {what}, not a causal language "
                            f"model; quantmoe quantizes decoder-only Mixture-of-Experts LMs (supported: {supported})")
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise QuantMoeError(
            f"unsupported architecture {model_type!r}; supported: {supported} "
            "(see docs/architectures.md to add one)"
        ) from None


@dataclass(frozen=True)
class LayerPlan:
    """What to quantize in one decoder layer, resolved from a row and the config."""

    index: int
    attention: tuple[tuple[str, ...], ...]
    experts: MLP | None
    num_experts: int
    shared_expert: MLP | None
    dense_mlp: MLP | None
    routers: tuple[str, ...] = field(default=())

    def quantized_linears(self) -> list[str]:
        """Every on-disk linear path (layer-relative) this layer quantizes, in order."""
        names = [n for group in self.attention for n in group]
        if self.experts is not None:
            for e in range(self.num_experts):
                names += [self.experts.linear(w, e) for w in ("gate", "up", "down")]
        for mlp in (self.shared_expert, self.dense_mlp):
            if mlp is not None:
                names += [mlp.linear(w) for w in ("gate", "up", "down")]
        return names


def plan_layer(arch: Architecture, config, index: int, layout: str = "source") -> LayerPlan:
    """What layer ``index`` quantizes. GPTQModel's definitions do not cover the dense MLP of a
    sparse model's dense layers, so the ``gptqmodel`` layout leaves it in full precision."""
    moe = arch.is_moe_layer(config, index)
    dense = None if moe or (layout == "gptqmodel" and arch.experts is not None) else arch.dense_mlp
    return LayerPlan(
        index=index,
        attention=arch.attention,
        experts=arch.experts if moe else None,
        num_experts=arch.num_experts(config) if moe else 0,
        shared_expert=arch.shared_expert if moe else None,
        dense_mlp=dense,
        routers=arch.routers if moe else (),
    )
