"""``quantmoe inspect``: what every tensor of a checkpoint is, and what quantizing it would cost.

Reads config.json and the safetensors headers (names, shapes, dtypes) only; no weight is
loaded. Each tensor gets the class the architecture row gives it: attention, routed
expert, shared expert, dense MLP, router (never quantized, with everything under it, such
as DeepSeek's e_score_correction_bias) or not quantized (norms, embeddings, lm_head).
Biases of quantized linears keep their linear's class but stay 16-bit.

The size estimate counts bytes exactly as the GPTQ v1 export writes them and as
``export.checkpoint_stats`` measures them: per quantized linear (out R, in C) with G groups,
qweight C*R*bits/8 + qzeros G*R*bits/8 + scales 2*G*R + g_idx 4*C bytes; every other tensor
keeps its size. Bits per weight = those bytes * 8 / (R*C), about bits + (16 + bits)/group + 32/R.

An FP8 release (``formats.fp8``) is inspected as it is quantized: its scales are dropped, and
an FP8 linear that is not quantized is counted at BF16, as the export writes it; ``source``
reports the format, its block size and what the FP8 weights take. Layers beyond
``num_hidden_layers`` (multi-token prediction) are exported unquantized with ``mtp="keep"``
(FP8 ones as BF16), and not at all with ``mtp="drop"`` ("not exported").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..base.errors import QuantMoeError
from ..base.options import QuantConfig, RunOptions
from ..gptq.core import QuantSpec
from ..model.architectures import architecture_for, plan_layer
from ..model.checkpoint import Checkpoint
from ..stages.gptq_method import tensor_parallel_note
from ..stages.report import ranges

CLASSES = ("attention", "routed expert", "shared expert", "dense MLP", "router", "kept in 16 bits", "not quantized",
           "multi-token prediction", "not exported")
KIND_CLASS = {"attention": "attention", "expert": "routed expert", "shared_expert": "shared expert",
              "dense_mlp": "dense MLP"}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def gptq_bytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Bytes of the GPTQ v1 tensors (qweight, qzeros, scales, g_idx) of one (rows, cols) linear."""
    groups = QuantSpec(bits=bits, group_size=group_size).groups(cols)
    return cols * rows * bits // 8 + groups * rows * bits // 8 + 2 * groups * rows + 4 * cols


@dataclass
class Entry:
    """Tensors sharing one name pattern (layer index as {i}, expert index as {e}) and one class."""

    pattern: str
    cls: str
    shape: list[int]              # of one tensor
    dtype: str
    layers: list[int] = field(default_factory=list)
    tensors: int = 0
    parameters: int = 0
    quantized_parameters: int = 0
    bytes: int = 0                # as stored now
    estimated_bytes: int = 0      # after quantization (GPTQ tensors for quantized weights)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def inspect_model(model: str | Path, bits: int = 4, group_size: int = 128, mtp: str = "keep",
                  recipe: str = "") -> dict:
    """Classify every tensor of ``model`` and estimate its GPTQ size; returns the report dict.
    ``recipe`` (as quantize --recipe): each linear is estimated at its own settings, 16 bits where skipped."""
    qcfg = QuantConfig(bits=bits, group_size=group_size, recipe=recipe)  # the same checks as quantize
    RunOptions(mtp=mtp)
    ckpt = Checkpoint(model)
    fp8 = getattr(ckpt.format, "source", False)  # an FP8 release: quantized from, like a 16-bit one
    if ckpt.quantization is not None and not fp8:
        method = ckpt.quantization.get("quant_method", "unknown")
        raise QuantMoeError(f"{ckpt.path} is already quantized ({method}); inspect the original it was made from")
    linears = ckpt.quantized_linears if fp8 else {}
    fp8_weights = {lin.tensors[0] for lin in linears.values()}
    dropped = {t for lin in linears.values() for t in lin.tensors[1:]}  # scales: the export has none
    config = ckpt.config
    arch = architecture_for(config)
    num_layers = int(config.num_hidden_layers)
    plans = [plan_layer(arch, config, i) for i in range(num_layers)]
    kinds = [p.linear_kinds() for p in plans]
    entries: dict[tuple[str, str], Entry] = {}
    per_class: dict[str, list] = {}  # class -> [estimated bits, weights, widths] of its linear weights

    for name in ckpt.names():
        shape, dtype = list(ckpt.shape(name)), ckpt.dtype(name)
        numel = _numel(shape)
        size = numel * DTYPE_BYTES.get(dtype, 2)
        layer, cls, pattern, quantized_as = None, "not quantized", ckpt.stored_name(name), []
        tower = next((t for t in ckpt.towers if name.startswith(t)), None)
        if tower is not None:  # a nested release's other tower (its vision encoder): one line, copied as it is
            pattern, shape = tower + "*", []
        elif name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            rel = name[len(ckpt.layer_prefix(layer)):]
            plan = plans[layer] if layer < num_layers else plan_layer(arch, config, layer)
            module, _, suffix = rel.rpartition(".")
            pattern = ckpt.stored_name("model.layers.{i}." + plan.pattern(module) + "." + suffix)
            if layer >= num_layers:  # beyond num_hidden_layers (DeepSeek-V3's MTP layer): transformers ignores it
                cls = "multi-token prediction" if mtp == "keep" else "not exported"
            elif module in kinds[layer]:
                cls = KIND_CLASS[kinds[layer][module]]
                if suffix == "weight":
                    quantized_as = [tuple(shape)]
            elif rel in plan.fused_disk_tensors():
                cls = "routed expert"
                experts, out_rows, cols = plan.fused.memory_shape(shape)
                if rel == plan.fused.disk_gate_up:  # two halves, gate and up, each (I, H)
                    quantized_as = [(out_rows // 2, cols)] * (2 * experts)
                else:
                    quantized_as = [(out_rows, cols)] * experts
            elif any(rel.startswith(r + ".") for r in plan.routers):  # the row's routers, and its kept linears
                cls = "router" if any(rel.startswith(r + ".") for r in arch.routers) else "kept in 16 bits"
        key = (pattern, cls)
        entry = entries.get(key)
        if entry is None:
            entry = entries[key] = Entry(pattern=pattern, cls=cls, shape=shape, dtype=dtype)
        if layer is not None:
            entry.layers.append(layer)
        entry.tensors += 1
        entry.parameters += numel
        entry.bytes += size
        if cls == "not exported":
            continue
        # Its own settings under the recipe (a fused on-disk tensor: by class); None: kept in 16 bits.
        own = qcfg.module_config(ckpt.stored_layer_prefix(layer) + module, kinds[layer].get(module, "expert")) \
            if quantized_as else None
        if own is not None:
            estimate = sum(gptq_bytes(r, c, own.bits, own.group_size) for r, c in quantized_as)
            entry.quantized_parameters += numel
        elif name in fp8_weights:
            estimate = 2 * numel  # exported dequantized, in BF16
        else:
            estimate = 0 if name in dropped else size
        entry.estimated_bytes += estimate
        if quantized_as:
            totals = per_class.setdefault(cls, [0, 0, set()])
            totals[0] += 8 * estimate
            totals[1] += numel
            totals[2].add(16 if own is None else own.bits)

    for e in entries.values():
        e.layers = sorted(set(e.layers))
    classes = {c: {"tensors": 0, "parameters": 0, "quantized_parameters": 0, "bytes": 0, "estimated_bytes": 0}
               for c in CLASSES}
    for e in entries.values():
        for k in classes[e.cls]:
            classes[e.cls][k] += getattr(e, k)
    exported = [e for e in entries.values() if e.cls != "not exported"]
    quantized = sum(e.quantized_parameters for e in exported)
    parameters = sum(e.parameters for e in exported)
    quantized_bytes = sum(e.estimated_bytes for e in exported if e.quantized_parameters)
    moe_layers = [p.index for p in plans if p.experts is not None]
    source = None
    if fp8:
        fp8_parameters = sum(_numel(ckpt.shape(n)) for n in fp8_weights)
        source = {**ckpt.format.describe(ckpt.quantization), "format": ckpt.format.name,
                  "fp8_tensors": len(fp8_weights), "fp8_parameters": fp8_parameters,
                  "fp8_bytes": sum(ckpt.nbytes(n) for n in fp8_weights),
                  "scale_bytes": sum(ckpt.nbytes(n) for n in dropped), "bf16_bytes": 2 * fp8_parameters}
    return {
        "model": str(ckpt.path),
        "model_type": ckpt.model_label,
        "num_layers": num_layers,
        "moe_layers": moe_layers,
        "dense_layers": [p.index for p in plans if p.experts is None],
        "routed_experts": plans[moe_layers[0]].num_experts if moe_layers else 0,
        "bits": bits,
        "group_size": group_size,
        "recipe": recipe,
        "mtp": mtp,
        # Per class of linear, at the settings above: the widths its weights would take and the bits per
        # weight of its estimated tensors (16-bit ones, kept by the recipe, included).
        "class_bits": {c: {"bits": sorted(v[2]), "bits_per_weight": v[0] / v[1]}
                       for c in CLASSES for v in [per_class.get(c)] if v and v[1]},
        "source": source,
        "notes": [n for n in (tensor_parallel_note(ckpt, arch, qcfg),) if n],
        "tensors": [asdict(e) for e in sorted(entries.values(), key=lambda e: (e.pattern, e.cls))],
        "classes": {c: v for c, v in classes.items() if v["tensors"]},
        "totals": {
            "parameters": parameters,
            "quantized_parameters": quantized,
            "fraction_quantized": quantized / parameters if parameters else 0.0,
            "bytes": sum(e.bytes for e in exported),
            "estimated_bytes": sum(e.estimated_bytes for e in exported),
            # What quantize holds on the disk of --out at its peak: the export, and until it is in place each
            # layer's quantized linears in the work folder beside it.
            "quantize_disk_bytes": sum(e.estimated_bytes for e in exported) + quantized_bytes,
            # As checkpoint_stats: the bits of the GPTQ tensors over the weights they stand for.
            "bits_per_weight": quantized_bytes * 8 / quantized if quantized else None,
        },
    }


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def render_text(report: dict) -> str:
    """The human-readable form of an inspect report: one line per tensor pattern, then per class."""
    r = report
    label = f"int{r['bits']} g{r['group_size']}" if r["group_size"] != -1 else f"int{r['bits']} per-row"
    moe = (f"{len(r['moe_layers'])} MoE (layers {ranges(r['moe_layers'])}, {r['routed_experts']} routed experts)"
           if r["moe_layers"] else "no MoE layers")
    dense = f"{len(r['dense_layers'])} dense" + (f" (layers {ranges(r['dense_layers'])})" if r["dense_layers"] else "")
    lines = [f"{r['model']}: {r['model_type']}, {r['num_layers']} decoder layers: {moe}, {dense}", ""]
    rows = [("tensor", "class", "layers", "count", "shape", "dtype")]
    for e in r["tensors"]:
        rows.append((e["pattern"], e["cls"], ranges(e["layers"]) or "-", str(e["tensors"]),
                     "x".join(map(str, e["shape"])) or ("-" if e["pattern"].endswith("*") else "scalar"), e["dtype"]))
    lines += _columns(rows, right=(3,))
    lines.append("")
    rows = [("class", "tensors", "parameters", "quantized", "size now", f"at {label}")]
    for cls, v in r["classes"].items():
        rows.append((cls, str(v["tensors"]), f"{v['parameters']:,}", f"{v['quantized_parameters']:,}",
                     _size(v["bytes"]), "-" if cls == "not exported" else _size(v["estimated_bytes"])))
    t = r["totals"]
    rows.append(("total", "", f"{t['parameters']:,}", f"{t['quantized_parameters']:,}", _size(t["bytes"]),
                 _size(t["estimated_bytes"])))
    lines += _columns(rows, right=(1, 2, 3, 4, 5))
    bpw = "-" if t["bits_per_weight"] is None else f"{t['bits_per_weight']:.3f}"
    if r.get("recipe"):
        label += f", recipe {r['recipe']}"
    lines += ["", f"estimate at {label}: {_size(t['estimated_bytes'])} of tensors (now {_size(t['bytes'])}); "
                  f"{bpw} bits per quantized weight; {100 * t['fraction_quantized']:.1f}% of parameters quantized",
              f"quantize holds {_size(t['quantize_disk_bytes'])} on the disk of --out at its peak: the export, and "
              "until it is in place each quantized layer in the work folder beside it"]
    if r.get("class_bits"):
        lines.append("per class: " + "; ".join(f"{c} {'/'.join(f'{b}-bit' for b in v['bits'])} "
                                               f"({v['bits_per_weight']:.2f} bits/weight)"
                                               for c, v in r["class_bits"].items()))
    src = r.get("source")
    if src:
        lines.append(f"source: {src['label']} ({src['format']}): {src['fp8_tensors']:,} FP8 weights, "
                     f"{_size(src['fp8_bytes'])} plus {_size(src['scale_bytes'])} of scales ({_size(src['bf16_bytes'])} "
                     "in BF16); read as stored and dequantized on the device layer by layer, scales dropped")
    if "multi-token prediction" in r["classes"]:
        lines.append(f"tensors of layers >= {r['num_layers']} (num_hidden_layers: multi-token prediction) are "
                     "exported unquantized, FP8 ones in BF16 (--mtp drop leaves them out)")
    if "not exported" in r["classes"]:
        lines.append(f"tensors of layers >= {r['num_layers']} (num_hidden_layers) are not loaded by transformers "
                     "and not exported")
    lines += [f"note: {n}" for n in r.get("notes", [])]
    return "\n".join(lines)


def _columns(rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> list[str]:
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if k in right else cell.ljust(w) for k, (cell, w) in enumerate(zip(row, widths)))
            .rstrip() for row in rows]
