"""What every on-disk format reader provides: which linears a checkpoint stores quantized, and
how to turn one back into a plain weight. ``ckpt`` is any object with ``names()``, ``has()``,
``shape()``, ``tensor()`` and ``quantization`` (``model.checkpoint.Checkpoint``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass(frozen=True)
class QuantizedLinear:
    """One quantized linear as stored in a checkpoint."""

    module: str                 # full on-disk module path, e.g. model.layers.0.block_sparse_moe.experts.3.w1
    shape: tuple[int, int]      # the weight it stands for: (out_features, in_features)
    tensors: tuple[str, ...]    # every tensor name that stores it (packed weight, scales, ...)


class Reader(Protocol):
    """One on-disk format of quantized linears (named after the backend that writes it).

    The readers of releases that are quantized *from* (FP8: ``fp8.Fp8Reader``) also have
    ``source = True`` and ``stored(ckpt, linear)``, the linear as stored, which the quantize
    pipeline moves to its device and dequantizes there (``fp8.Fp8Weight``).
    """

    name: str

    def recognizes(self, quantization: dict) -> bool:
        """True when a checkpoint's ``quantization_config`` is in this format."""
        ...

    def describe(self, quantization: dict) -> dict:
        """Method, label and settings of a checkpoint in this format, for reports."""
        ...

    def quantized_linears(self, ckpt) -> dict[str, QuantizedLinear]:
        """Every quantized linear of the checkpoint, keyed by module path."""
        ...

    def dequantize(self, ckpt, linear: QuantizedLinear) -> Tensor:
        """The weight (out, in) that ``linear`` stands for, in the dtype its quantization restores."""
        ...
