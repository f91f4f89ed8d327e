"""Each on-disk format, read and written in one file: GPTQ v1 (``gptq_v1``), bitsandbytes
(``bnb``), compressed-tensors (``compressed_tensors``), and the FP8 releases quantized from
(``fp8``: DeepSeek-style and compressed-tensors FP8). The loader asks ``reader_for`` which
format a checkpoint holds; backends (the layer above) write them."""

from __future__ import annotations

from ..base.errors import QuantMoeError
from . import bnb, compressed_tensors, fp8, gptq_v1
from .base import QuantizedLinear, Reader

# FP8 first: a compressed-tensors FP8 release is told from a pack-quantized export by its config groups.
READERS: tuple[Reader, ...] = (*fp8.READERS, *gptq_v1.READERS, *bnb.READERS, *compressed_tensors.READERS)

__all__ = ["QuantizedLinear", "Reader", "READERS", "reader_for"]


def reader_for(quantization: dict | None) -> Reader | None:
    """The reader of a checkpoint with this ``quantization_config`` (None: not quantized)."""
    if quantization is None:
        return None
    if not isinstance(quantization, dict):
        raise QuantMoeError(f"quantization_config is a {type(quantization).__name__}, not an object; "
                            "restore config.json or re-download the checkpoint")
    for reader in READERS:
        if reader.recognizes(quantization):
            return reader
    known = ", ".join(r.name for r in READERS)
    fmt = quantization.get("format") or quantization.get("fmt")
    named = f"{quantization.get('quant_method')!r}" + (f" (format {fmt!r})" if fmt else "")
    raise QuantMoeError(f"quantization method {named} is not one quantmoe reads "
                        f"(it reads checkpoints of {known}); pass the original checkpoint instead")
