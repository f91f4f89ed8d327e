"""Reading compressed-tensors ``pack-quantized`` linears (what llm-compressor writes) back
into plain weights, so quantmoe's loader and evaluator can score them.

Per quantized linear ``P`` with weight (out, in):

* ``P.weight_packed`` int32 (out, ceil(in * bits / 32)): the levels q + 2**(bits-1) (q signed)
  packed densely along the input dim, element j at bit j * bits of the row's bit stream,
  low bits first (a value may straddle two words when bits does not divide 32);
* ``P.weight_scale`` (out, G): one scale per group of columns (G = 1 per channel);
* ``P.weight_shape`` int (2,): (out, in);
* ``P.weight_zero_point`` (asymmetric only): (out, G) packed the same way along the output dim
  into (ceil(out * bits / 32), G), or unpacked with the scale's shape;
* ``P.weight_g_idx`` int (in,) (activation order ``group``/``weight`` only): each column's group.

The weight is (q - zero_point) * scale. The bit order was checked against
compressed-tensors 0.19.0 ``pack_to_int32``/``unpack_from_int32`` (see tests).

Writing (``--format compressed-tensors``): the gptq/rtn backends' GPTQ v1 tensors are repacked
(``from_gptq``), the same levels and scales, as vLLM's compressed-tensors WNA16 loader reads them
(docs/interop.md names its source files): ``weight_packed``, ``weight_scale`` (fp16, as GPTQ stores
it: vLLM casts it to the model's dtype), ``weight_shape``, and ``weight_zero_point`` only for
asymmetric weights. quantmoe's groups are always contiguous (``g_idx = c // group_size``), so no
``weight_g_idx`` is written and ``actorder`` is never ``group`` (which vLLM refuses).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from ..base.errors import QuantMoeError
from .base import QuantizedLinear, StoredWeight, tensor_reader
from .fp8 import has_float_weights
from .gptq_v1 import GPTQ_SUFFIXES, linear_bits, quantized_modules, unpack_linear

CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


def unpack_int32(packed: Tensor, bits: int, count: int) -> Tensor:
    """Dense little-endian unpack along the last dim: int32 (R, W) -> unsigned int64 (R, count)."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    start = torch.arange(count, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    # A value that straddles two words takes its high bits from the next one.
    nxt = torch.clamp(word + 1, max=p.shape[-1] - 1)
    both = p[:, word] | (p[:, nxt] << 32)
    return (both >> offset) & (2**bits - 1)


def packed_bits(packed_width: int, count: int) -> int:
    """The bit width b in 1..8 with ceil(count * b / 32) == packed_width (unique once count >= 32)."""
    fits = [b for b in range(1, 9) if math.ceil(count * b / 32) == packed_width]
    if len(fits) != 1:
        raise QuantMoeError(f"cannot tell the bit width of a compressed-tensors weight packed into {packed_width} "
                            f"int32 words for {count} values; only pack-quantized 1-8 bit weights are read")
    return fits[0]


def config_group_size(quantization: dict | None) -> int | None:
    """The weights' group size from a compressed-tensors quantization_config, when all groups agree."""
    groups = (quantization or {}).get("config_groups") or {}
    sizes = {(g.get("weights") or {}).get("group_size") for g in groups.values()}
    return sizes.pop() if len(sizes) == 1 else None


def dequantize_compressed(parts: dict[str, Tensor], group_size: int | None = None, bits: int | None = None) -> Tensor:
    """The fp32 weight (out, in) a compressed-tensors pack-quantized linear stands for.

    ``group_size`` (from the quantization_config) is needed only when groups do not divide
    the input evenly; otherwise it follows from the scale's shape. ``bits`` (the config's ``num_bits``
    for this linear) is needed only for an input narrower than 32 columns, whose packed width several
    bit widths fit; otherwise it follows from the packed width."""
    if "weight_packed" not in parts or "weight_scale" not in parts or "weight_shape" not in parts:
        raise QuantMoeError(f"a compressed-tensors linear needs weight_packed, weight_scale and weight_shape; "
                            f"found {sorted(parts)}")
    rows, cols = (int(x) for x in parts["weight_shape"].tolist())
    packed = parts["weight_packed"]
    if packed.dtype != torch.int32 or packed.shape[0] != rows:
        raise QuantMoeError(f"weight_packed has shape {tuple(packed.shape)} {packed.dtype}, not int32 ({rows}, ...); "
                            "only the pack-quantized format is read")
    if bits is None or isinstance(bits, bool) or not isinstance(bits, int) or math.ceil(cols * bits / 32) != packed.shape[1]:
        bits = packed_bits(packed.shape[1], cols)
    offset = 2 ** (bits - 1)
    q = unpack_int32(packed, bits, cols) - offset              # (out, in), signed levels
    scale = parts["weight_scale"].float()
    if scale.ndim == 1:
        scale = scale[:, None] if scale.numel() == rows else scale.reshape(1, 1)
    groups = scale.shape[1]
    zero = parts.get("weight_zero_point")
    if zero is None:
        zero = torch.zeros_like(scale)
    elif zero.shape == scale.shape:
        zero = zero.float()
    else:  # packed along the output dim, stored unsigned like the weights
        zero = (unpack_int32(zero.t().contiguous(), bits, scale.shape[0]).t() - offset).float()
    if "weight_g_idx" in parts:
        g_idx = parts["weight_g_idx"].long()
    else:
        if not group_size or group_size <= 0 or math.ceil(cols / group_size) != groups:
            if cols % groups:
                raise QuantMoeError(f"cannot tell the group size of a compressed-tensors weight with {cols} columns "
                                    f"and {groups} scale groups; the quantization_config should give it")
            group_size = cols // groups
        g_idx = torch.arange(cols) // group_size
    return (q.float() - zero[:, g_idx]) * scale[:, g_idx]


def compressed_modules(names) -> list[str]:
    """The module paths that have a ``.weight_packed`` among ``names``, sorted."""
    return sorted(n[: -len(".weight_packed")] for n in names if n.endswith(".weight_packed"))


def dequantize_compressed_state(tensors: dict[str, Tensor], group_size: int | None = None) -> dict[str, Tensor]:
    """Replace each pack-quantized linear's tensors in ``tensors`` with its fp32 ``.weight``; the rest pass through."""
    modules = compressed_modules(tensors)
    out = {f"{m}.weight": dequantize_compressed({s: tensors[f"{m}.{s}"] for s in CT_SUFFIXES if f"{m}.{s}" in tensors},
                                                group_size) for m in modules}
    packed = {f"{m}.{s}" for m in modules for s in CT_SUFFIXES}
    out.update({n: t for n, t in tensors.items() if n not in packed})
    return out


# -- writing ----------------------------------------------------------------------------
def pack_int32(values: Tensor, bits: int) -> Tensor:
    """Dense little-endian pack along the last dim (the inverse of ``unpack_int32``): unsigned ints
    (R, C) below 2**bits -> int32 (R, ceil(C * bits / 32)); bits 4 or 8 (a value never straddles words)."""
    if 32 % bits:
        raise ValueError(f"{bits}-bit values straddle int32 words; only 4 and 8 bits are written")
    per = 32 // bits
    rows, cols = values.shape
    v = values.to(torch.int64)
    if cols % per:  # the tail word is padded with zeros; weight_shape crops them when read
        v = torch.cat([v, v.new_zeros(rows, per - cols % per)], dim=1)
    shifts = torch.arange(per, dtype=torch.int64, device=v.device) * bits
    packed = (v.reshape(rows, -1, per) << shifts).sum(dim=-1)  # < 2**32
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def from_gptq(parts: dict[str, Tensor], bits: int, sym: bool) -> dict[str, Tensor]:
    """One linear's GPTQ v1 tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``) as compressed-tensors
    pack-quantized ones, keyed by suffix: the same levels q, zero points z and scales s (w = (q - z) * s).

    Both formats store unsigned levels; compressed-tensors reads them as q - 2**(bits-1) and its zero
    point likewise, so the stored values are GPTQ's own. A symmetric zero (2**(bits-1)) is signed 0:
    not written, as compressed-tensors and vLLM's symmetric types (uint4b8, uint8b128) expect."""
    q, scales, zeros, g_idx = unpack_linear(parts, bits)      # (R, C), (R, G), (R, G), (C,)
    rows, cols = q.shape
    groups = scales.shape[1]
    out = {
        "weight_packed": pack_int32(q, bits),
        "weight_scale": scales.contiguous().clone(),
        "weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }
    width = -(-cols // groups)
    if not torch.equal(g_idx.long(), torch.arange(cols) // width):  # never from quantmoe's GPTQ: kept if ever
        out["weight_g_idx"] = g_idx.to(torch.int32).clone()
    if sym:
        if not bool((zeros == 2 ** (bits - 1)).all()):
            raise QuantMoeError("a symmetric linear has zero points other than 2**(bits-1); re-run the quantization")
    else:  # packed along the output dim, (ceil(R * bits / 32), G)
        out["weight_zero_point"] = pack_int32(zeros.t().contiguous(), bits).t().contiguous()
    return out


def from_gptq_state(tensors: dict[str, Tensor], sym_of) -> dict[str, Tensor]:
    """``tensors`` (a layer file: GPTQ v1 tensors under full names) with every GPTQ linear repacked by
    ``from_gptq``, at its own bit width (from its shapes); ``sym_of(module)``: whether it is symmetric."""
    modules = set(quantized_modules(tensors))
    out = {n: t for n, t in tensors.items() if n.rpartition(".")[0] not in modules}
    for m in sorted(modules):
        parts = {s: tensors[f"{m}.{s}"] for s in GPTQ_SUFFIXES}
        packed = from_gptq(parts, linear_bits(parts), sym_of(m))
        out.update({f"{m}.{s}": t for s, t in packed.items()})
    return out


def weight_args(bits: int, group_size: int, sym: bool, act_order: str) -> dict:
    """The ``weights`` QuantizationArgs of one config group, every field compressed-tensors 0.20 defines."""
    return {"num_bits": bits, "type": "int", "symmetric": sym,
            "strategy": "channel" if group_size == -1 else "group",
            "group_size": None if group_size == -1 else group_size,
            "block_structure": None, "dynamic": False,
            # "weight" (= static): columns visited by the Hessian's order, groups kept contiguous; vLLM
            # refuses "group", and quantmoe's "group" order also keeps groups contiguous (no g_idx).
            "actorder": "weight" if act_order == "static" else None,
            "observer": "minmax", "observer_kwargs": {}}


def quantization_config(groups: list[tuple[list[str], dict]], ignore: list[str], meta: dict) -> dict:
    """The compressed-tensors ``quantization_config`` vLLM reads (``quant_method: compressed-tensors``,
    ``format: pack-quantized``).

    ``groups``: (targets, weight_args) per config group, in lookup order (vLLM takes the first name or
    regex target that matches, a class name such as "Linear" only when none does); ``ignore``: the
    modules kept in 16 bits (routers, lm_head, skipped ones), matched before any group. ``meta`` is
    quantmoe's own record (which backend, its options), which compressed-tensors and vLLM ignore."""
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "kv_cache_scheme": None,
        "config_groups": {f"group_{k}": {"targets": targets, "weights": weights, "input_activations": None,
                                         "output_activations": None, "format": "pack-quantized"}
                          for k, (targets, weights) in enumerate(groups)},
        "ignore": ignore,
        "sparsity_config": {},
        "transform_config": {},
        "meta": meta,
    }


def served_names(config: dict, pattern: Callable[[str], str], name: Callable[[str], str]) -> dict:
    """``config`` (quantization_config's) with the regexes (``re:``) of its config groups' targets and of ``ignore``
    rewritten by ``pattern`` and its module names by ``name``: a nested release's (Nesting.served_pattern,
    Checkpoint.stored_name), which vLLM maps to its own names (a regex it matches as written)."""
    def served(target: str) -> str:
        return "re:" + pattern(target[3:]) if target.startswith("re:") else name(target)

    groups = {key: {**group, "targets": [served(t) for t in group["targets"]]}
              for key, group in config["config_groups"].items()}
    return {**config, "config_groups": groups, "ignore": [served(t) for t in config["ignore"]]}


def _matches(name: str, target) -> bool:
    """compressed-tensors' and vLLM's name matching: ``re:`` is ``re.match``, anything else exact."""
    if not isinstance(target, str):
        return False
    if target.startswith("re:"):
        try:
            return re.match(target[3:], name) is not None
        except re.error as exc:
            raise QuantMoeError(f"quantization_config pattern {target!r} is not a valid regular expression ({exc}); "
                                "the checkpoint's config.json is damaged") from None
    return target == name


def module_weights(quantization: dict, module: str) -> dict | None:
    """The ``weights`` arguments of the config group vLLM would give ``module``: the first group with a
    name or regex target that matches it, else one targeting the class "Linear" (None: neither, or ignored)."""
    if ignored(quantization, module):
        return None
    groups = [g for g in ((quantization or {}).get("config_groups") or {}).values() if isinstance(g, dict)]
    named = next((g for g in groups if any(_matches(module, t) for t in g.get("targets") or [])), None)
    chosen = named or next((g for g in groups if "Linear" in (g.get("targets") or [])), None)
    weights = (chosen or {}).get("weights")
    return weights if isinstance(weights, dict) else None


def ignored(quantization: dict, module: str) -> bool:
    """Whether a compressed-tensors config's ``ignore`` list names ``module`` (kept unquantized)."""
    return any(_matches(module, t) for t in (quantization or {}).get("ignore") or [])


# -- reading a checkpoint ------------------------------------------------------------
@dataclass(frozen=True)
class CompressedTensorsReader:
    name: str = "compressed-tensors"

    def recognizes(self, quantization: dict) -> bool:
        # Float weights are FP8 (fp8.CompressedFp8Reader reads those), not pack-quantized integers.
        return quantization.get("quant_method") == "compressed-tensors" and not has_float_weights(quantization)

    def describe(self, quantization: dict) -> dict:

        weights = [(g.get("weights") or {}) for g in (quantization.get("config_groups") or {}).values()]
        bits = {w.get("num_bits") for w in weights}
        sym = {w.get("symmetric") for w in weights}
        group = config_group_size(quantization)
        widths = "/".join(f"int{b}" for b in sorted(b for b in bits if isinstance(b, int)))  # several: per-module
        bits_one = bits.pop() if len(bits) == 1 else None
        # quantmoe's own exports name their backend (gptq or rtn) in "meta"; other tools' do not.
        backend = (quantization.get("meta") or {}).get("backend")
        return {"method": "compressed-tensors", "backend": backend or self.name, "bits": bits_one, "group_size": group,
                "sym": sym.pop() if len(sym) == 1 else None,
                "label": (f"{backend} " if backend else "") + f"compressed-tensors {widths}"
                         + ("" if group is None else f" g{group}")}

    def quantized_linears(self, ckpt) -> dict[str, QuantizedLinear]:

        names = set(ckpt.names())
        out = {}
        for module in compressed_modules(names):
            shape = tuple(int(x) for x in ckpt.tensor(f"{module}.weight_shape").tolist())
            out[module] = QuantizedLinear(module, shape, tuple(f"{module}.{s}" for s in CT_SUFFIXES
                                                               if f"{module}.{s}" in names))
        return out

    def dequantize(self, ckpt, linear: QuantizedLinear) -> Tensor:
        return self.stored(ckpt, linear, copy=False).dequantize()

    def stored(self, ckpt, linear: QuantizedLinear, copy: bool = True, pin: bool = False) -> StoredWeight:
        """The linear's tensors (copies unless ``copy`` is False, page-locked with ``pin``), to dequantize where
        they go."""
        read = tensor_reader(ckpt, copy, pin)
        parts = {t.rpartition(".")[2]: read(t) for t in linear.tensors}
        weights = module_weights(ckpt.quantization, ckpt.stored_name(linear.module)) or {}
        decode = partial(dequantize_compressed, group_size=weights.get("group_size")
                         or config_group_size(ckpt.quantization), bits=weights.get("num_bits"))
        return StoredWeight(parts, decode, torch.Size(linear.shape), torch.float32, f"{linear.module}.weight")


READERS = (CompressedTensorsReader(),)
