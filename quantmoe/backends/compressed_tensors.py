"""Reading compressed-tensors ``pack-quantized`` checkpoints (what llm-compressor writes).

quantmoe does not write this format; it reads it so that ``quantmoe eval``,
``load_quantized`` and the peer harness (benchmarks/peers/) score llm-compressor's output
with the same evaluator. The format itself is in ``quantmoe.compressed_tensors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import QuantizedLinear

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class CompressedTensorsReader:
    name: str = "compressed-tensors"

    def recognizes(self, quantization: dict) -> bool:
        return quantization.get("quant_method") == "compressed-tensors"

    def describe(self, quantization: dict) -> dict:
        from ..compressed_tensors import config_group_size

        weights = [(g.get("weights") or {}) for g in (quantization.get("config_groups") or {}).values()]
        bits = {w.get("num_bits") for w in weights}
        sym = {w.get("symmetric") for w in weights}
        group = config_group_size(quantization)
        bits_one = bits.pop() if len(bits) == 1 else None
        return {"method": "compressed-tensors", "backend": self.name, "bits": bits_one, "group_size": group,
                "sym": sym.pop() if len(sym) == 1 else None,
                "label": f"compressed-tensors int{bits_one} g{group}"}

    def quantized_linears(self, ckpt) -> dict[str, QuantizedLinear]:
        from ..compressed_tensors import CT_SUFFIXES, compressed_modules

        names = set(ckpt.names())
        out = {}
        for module in compressed_modules(names):
            shape = tuple(int(x) for x in ckpt.tensor(f"{module}.weight_shape").tolist())
            out[module] = QuantizedLinear(module, shape, tuple(f"{module}.{s}" for s in CT_SUFFIXES
                                                               if f"{module}.{s}" in names))
        return out

    def dequantize(self, ckpt, linear: QuantizedLinear) -> Tensor:
        from ..compressed_tensors import config_group_size, dequantize_compressed

        parts = {t.rpartition(".")[2]: ckpt.tensor(t) for t in linear.tensors}
        return dequantize_compressed(parts, config_group_size(ckpt.quantization))


READERS = (CompressedTensorsReader(),)
