"""What every on-disk format reader provides: which linears a checkpoint stores quantized, and
how to turn one back into a plain weight. ``ckpt`` is any object with ``names()``, ``has()``,
``shape()``, ``tensor()`` (a view of the stored tensor), ``read_copy()`` (a copy of it in this process's
memory) and ``quantization`` (``model.checkpoint.Checkpoint``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class QuantizedLinear:
    """One quantized linear as stored in a checkpoint."""

    module: str                 # full on-disk module path, e.g. model.layers.0.block_sparse_moe.experts.3.w1
    shape: tuple[int, int]      # the weight it stands for: (out_features, in_features)
    tensors: tuple[str, ...]    # every tensor name that stores it (packed weight, scales, ...)


@dataclass(frozen=True)
class StoredWeight:
    """One quantized linear's tensors as stored (``parts``, names relative to the module), standing in for
    its weight in a layer's state until that state is on the device it is used on, where ``dequantize``
    makes the weight with the reader's own arithmetic (elementwise, so the same numbers on any device).

    It answers what the code between reading a layer and loading it asks of a tensor: ``shape`` (the
    weight's, (out, in)), ``dtype`` (the dequantized weight's), ``device``, ``nbytes`` (as stored), ``to``,
    ``pin_memory`` and ``is_pinned``; anything else fails loudly instead of computing with packed integers.
    """

    parts: dict[str, Tensor]
    decode: Callable[[dict[str, Tensor]], Tensor]  # the reader's dequantization of ``parts``
    shape: torch.Size
    dtype: torch.dtype
    name: str  # the weight's tensor name (P.weight), for errors

    @property
    def device(self) -> torch.device:
        return next(iter(self.parts.values())).device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def to(self, device, non_blocking: bool = False) -> StoredWeight:
        return replace(self, parts={k: t.to(device, non_blocking=non_blocking) for k, t in self.parts.items()})

    def pin_memory(self) -> StoredWeight:
        return replace(self, parts={k: t.pin_memory() for k, t in self.parts.items()})

    def is_pinned(self) -> bool:
        return all(t.is_pinned() for t in self.parts.values())

    def dequantize(self) -> Tensor:
        """The weight (out, in) in ``dtype``, on the device the parts are on."""
        return self.decode(self.parts)


def tensor_reader(ckpt, copy: bool = True, pin: bool = False) -> Callable[[str], Tensor]:
    """How a reader's ``stored`` reads a linear's tensors by name: copies out of the shard (``read_copy``; straight
    into page-locked memory with ``pin``), or with ``copy`` False the tensors as the shard holds them."""
    return partial(ckpt.read_copy, pin=pin) if copy else ckpt.tensor


class Reader(Protocol):
    """One on-disk format of quantized linears (named after the backend that writes it).

    The readers of releases that are quantized *from* (FP8: ``fp8.Fp8Reader``) also have
    ``source = True`` and ``stored(ckpt, linear, pin=False)``, the linear as stored (read straight into
    page-locked memory with ``pin``), which the quantize pipeline moves to its device and dequantizes
    there (``fp8.Fp8Weight``). The readers of quantized exports (GPTQ, compressed-tensors) have
    ``stored`` too (a ``StoredWeight``), which the layer stream dequantizes on its device when it loads
    a layer (evaluation, verification).
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
