"""Which setting each linear of a layer gets under a recipe (``--recipe``), one per *unit*: the
linears vLLM runs as one (q/k/v fused as ``qkv_proj``, gate and up as ``gate_up_proj``, a MoE
layer's experts as one fused module whose scheme is looked up on expert 0). A recipe that gives a
unit's linears different settings cannot be served by vLLM and is refused, naming them.

Each unit also has a layer-relative regular expression that matches its source names and the
name vLLM gives the fused module (``...experts`` for a MoE layer, ``qkv_proj``, ``gate_up_proj``),
from which the export writes GPTQ ``dynamic`` rules and compressed-tensors targets and ``ignore``
entries (``recipe_patterns``): vLLM, GPTQModel and compressed-tensors all match them with
``re.match`` on the full module name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..base.errors import QuantMoeError
from ..base.options import QuantConfig
from ..base.recipe import PRESETS, first_rule
from ..model.architectures import Architecture, LayerPlan, plan_layer

# vLLM's names for the linears it fuses (its models' packed_modules_mapping).
FUSED_NAMES = {frozenset({"q_proj", "k_proj", "v_proj"}): "qkv_proj",
               frozenset({"q_a_proj", "kv_a_proj_with_mqa"}): "fused_qkv_a_proj",
               frozenset({"gate_proj", "up_proj"}): "gate_up_proj",
               frozenset({"in_proj_qkv", "in_proj_z"}): "in_proj_qkvz",  # Qwen3.5's linear attention
               frozenset({"in_proj_b", "in_proj_a"}): "in_proj_ba"}


@dataclass(frozen=True)
class Unit:
    """Linears of one layer that share one setting."""

    kind: str                   # attention, expert, shared_expert or dense_mlp
    names: tuple[str, ...]      # layer-relative source names
    pattern: str                # layer-relative regex: these names and vLLM's fused name
    qcfg: QuantConfig | None    # their settings; None: kept in 16 bits


def setting(qcfg: QuantConfig | None) -> tuple[int, int, bool] | None:
    """What a unit's settings change in the stored tensors: (bits, group_size, sym), None for 16 bits."""
    return None if qcfg is None else (qcfg.bits, qcfg.group_size, qcfg.sym)


def describe(qcfg: QuantConfig | None) -> str:
    if qcfg is None:
        return "16 bits"
    return f"int{qcfg.bits} g{qcfg.group_size} {'sym' if qcfg.sym else 'asym'}"


def _siblings(names: list[str]) -> str:
    """Regex of linears under one parent (``self_attn.q_proj`` ...), and their vLLM fused name."""
    parent = {n.rpartition(".")[0] for n in names}
    leaves = [n.rpartition(".")[2] for n in names]
    fused = FUSED_NAMES.get(frozenset(leaves))
    if len(parent) != 1:  # not siblings: each name on its own
        return "(?:" + "|".join(re.escape(n) for n in names) + ")"
    head = parent.pop()
    items = [re.escape(a) for a in leaves + ([fused] if fused else [])]
    body = items[0] if len(items) == 1 else "(?:" + "|".join(items) + ")"
    return (re.escape(head) + r"\." if head else "") + body


def kept_patterns(kept: tuple[str, ...]) -> list[str]:
    """Layer-relative regexes of linears kept in 16 bits (Architecture.kept_linears): each one's name, and the name
    vLLM gives the module it fuses siblings that are all kept into (Qwen3.5's in_proj_b and in_proj_a: in_proj_ba),
    which is what a server's lookup of ``dynamic`` matches."""
    out = [re.escape(k) for k in kept]
    parents: dict[str, set[str]] = {}
    for name in kept:
        parent, _, leaf = name.rpartition(".")
        parents.setdefault(parent, set()).add(leaf)
    for parent, leaves in parents.items():
        out += [re.escape(f"{parent}.{fused}" if parent else fused) for members, fused in FUSED_NAMES.items()
                if members <= leaves]
    return out


def _experts_pattern(plan: LayerPlan) -> str:
    """``(?:block_sparse_moe|mlp)\\.experts(?:\\.\\d+\\.(?:w1|w3|w2))?``: the MoE module vLLM looks up, under the
    on-disk name or the in-memory one (vLLM's Mixtral is ``block_sparse_moe.experts``, its MiniMax-M2, on the same
    names on disk, ``mlp.experts``), and each expert linear."""
    head, tail = plan.experts.prefix.split("{e}")
    modules = list(dict.fromkeys([head.rstrip("."), plan.fused.module]))
    module = re.escape(modules[0]) if len(modules) == 1 else "(?:" + "|".join(map(re.escape, modules)) + ")"
    leaves = "|".join(re.escape(plan.experts.linear(w, 0).rpartition(".")[2]) for w in ("gate", "up", "down"))
    return f"{module}(?:\\.\\d+{re.escape(tail)}\\.(?:{leaves}))?"


def layer_units(plan: LayerPlan, qcfg: QuantConfig, prefix: str) -> list[Unit]:
    """Every unit of the layer ``plan`` (full names start with ``prefix``), with its settings; a
    QuantMoeError names the linears of a unit the recipe splits."""
    units = []

    def unit(kind: str, names: list[str], pattern: str) -> None:
        configs = [qcfg.module_config(prefix + n, kind) for n in names]
        for n, c in zip(names[1:], configs[1:]):
            if setting(c) != setting(configs[0]):
                what = ("the routed experts of a MoE layer (gate, up and down of every expert)" if kind == "expert"
                        else "these linears (vLLM fuses them into one)")
                raise QuantMoeError(f"--recipe gives {prefix}{names[0]} {describe(configs[0])} but {prefix}{n} "
                                    f"{describe(c)}; vLLM serves {what} with one scheme: give them one setting")
        units.append(Unit(kind, tuple(names), pattern, configs[0]))

    # An attention group's linears under one parent module are a unit: DeepSeek-V3.2's indexer projections share
    # MLA's inputs (one group) but vLLM runs them apart from MLA's.
    for group in plan.attention:
        parents: dict[str, list[str]] = {}
        for name in group:
            parents.setdefault(name.rpartition(".")[0], []).append(name)
        for names in parents.values():
            unit("attention", names, _siblings(names))
    if plan.experts is not None:
        names = [plan.experts.linear(w, e) for e in range(plan.num_experts) for w in ("gate", "up", "down")]
        unit("expert", names, _experts_pattern(plan))
    for mlp, kind in ((plan.shared_expert, "shared_expert"), (plan.dense_mlp, "dense_mlp")):
        if mlp is not None:
            gate_up = [mlp.linear("gate"), mlp.linear("up")]
            unit(kind, gate_up, _siblings(gate_up))
            unit(kind, [mlp.linear("down")], _siblings([mlp.linear("down")]))
    return units


def recipe_patterns(units: dict[int, list[Unit]], base: QuantConfig) -> list[tuple[str, QuantConfig | None]]:
    """(full-name regex, settings) for every unit whose settings differ from ``base`` (None: 16 bits),
    over the layers ``units`` holds (index -> its units). A unit with the same settings in several
    layers is one regex naming them, ``\\d+`` where that is every layer that has the unit; sorted,
    so the same recipe writes the same config. The regexes are disjoint: order does not matter."""
    layers: dict[tuple, list[int]] = {}
    having: dict[str, set[int]] = {}
    configs: dict[tuple, QuantConfig | None] = {}
    for i, layer in units.items():
        for u in layer:
            having.setdefault(u.pattern, set()).add(i)
            if setting(u.qcfg) != setting(base):
                key = (u.pattern, setting(u.qcfg))
                layers.setdefault(key, []).append(i)
                configs[key] = u.qcfg
    out = []
    for key in sorted(layers, key=lambda k: (k[0], str(k[1]))):
        found = sorted(layers[key])
        index = r"\d+" if set(found) == having[key[0]] else "(?:" + "|".join(map(str, found)) + ")"
        out.append((rf"^model\.layers\.{index}\.{key[0]}$", configs[key]))
    return out


def check_recipe(arch: Architecture, config, qcfg: QuantConfig, stored: Callable[[str], str] = str) -> None:
    """Refuse, before any work, a recipe that splits a unit (``layer_units``) or a recipe file with a rule
    that names no linear of this model (a mistyped name would otherwise change nothing, silently; a
    preset's rules name classes some families do not have). Rules match the checkpoint's own module names
    (``stored``: Checkpoint.stored_name, a nested release's ``model.language_model.layers.*``)."""
    if not qcfg.rules:
        return
    used = set()
    for i in range(config.num_hidden_layers):
        plan = plan_layer(arch, config, i, qcfg.layout)
        prefix = stored(f"model.layers.{i}.")
        layer_units(plan, qcfg, prefix)
        for name, kind in plan.linear_kinds().items():
            rule = first_rule(qcfg.rules, prefix + name, kind)
            used.add(rule)
    for k, rule in enumerate(qcfg.rules):
        if rule not in used and qcfg.recipe not in PRESETS:
            raise QuantMoeError(f"--recipe rule {k + 1} (match = {rule.match!r}) names no quantized linear of this "
                                f"{arch.model_type} model (or only ones an earlier rule takes); fix its match "
                                f"(source module names, e.g. {stored('model.layers.0.')}self_attn.q_proj) or drop it")
