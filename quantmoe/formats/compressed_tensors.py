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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..base.errors import QuantMoeError
from .base import QuantizedLinear
from .fp8 import has_float_weights

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


def dequantize_compressed(parts: dict[str, Tensor], group_size: int | None = None) -> Tensor:
    """The fp32 weight (out, in) a compressed-tensors pack-quantized linear stands for.

    ``group_size`` (from the quantization_config) is needed only when groups do not divide
    the input evenly; otherwise it follows from the scale's shape."""
    if "weight_packed" not in parts or "weight_scale" not in parts or "weight_shape" not in parts:
        raise QuantMoeError(f"a compressed-tensors linear needs weight_packed, weight_scale and weight_shape; "
                            f"found {sorted(parts)}")
    rows, cols = (int(x) for x in parts["weight_shape"].tolist())
    packed = parts["weight_packed"]
    if packed.dtype != torch.int32 or packed.shape[0] != rows:
        raise QuantMoeError(f"weight_packed has shape {tuple(packed.shape)} {packed.dtype}, not int32 ({rows}, ...); "
                            "only the pack-quantized format is read")
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
        bits_one = bits.pop() if len(bits) == 1 else None
        return {"method": "compressed-tensors", "backend": self.name, "bits": bits_one, "group_size": group,
                "sym": sym.pop() if len(sym) == 1 else None,
                "label": f"compressed-tensors int{bits_one} g{group}"}

    def quantized_linears(self, ckpt) -> dict[str, QuantizedLinear]:

        names = set(ckpt.names())
        out = {}
        for module in compressed_modules(names):
            shape = tuple(int(x) for x in ckpt.tensor(f"{module}.weight_shape").tolist())
            out[module] = QuantizedLinear(module, shape, tuple(f"{module}.{s}" for s in CT_SUFFIXES
                                                               if f"{module}.{s}" in names))
        return out

    def dequantize(self, ckpt, linear: QuantizedLinear) -> Tensor:

        parts = {t.rpartition(".")[2]: ckpt.tensor(t) for t in linear.tensors}
        return dequantize_compressed(parts, config_group_size(ckpt.quantization))


READERS = (CompressedTensorsReader(),)
