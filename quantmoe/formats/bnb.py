"""The bitsandbytes format (what the bnb-nf4, bnb-fp4 and bnb-int8 backends write), per quantized
linear ``P`` under its on-disk name, exactly what transformers' bitsandbytes serialization
writes for one ``Linear4bit`` / ``Linear8bitLt``:

- 4-bit: ``P.weight`` uint8 (ceil(out*in/2), 1) packed codes, ``P.weight.absmax``,
  ``P.weight.quant_map``, with double quantization ``P.weight.nested_absmax`` and
  ``P.weight.nested_quant_map``, and ``P.weight.quant_state.bitsandbytes__nf4|fp4`` (a
  JSON blob: blocksize, dtype, shape);
- 8-bit: ``P.weight`` int8 (out, in), ``P.SCB`` float32 (out,) row scales (absmax),
  ``P.weight_format`` uint8.

config.json carries a bitsandbytes ``quantization_config`` (``quant_method:
"bitsandbytes"``, with routers and ``lm_head`` in ``llm_int8_skip_modules``). bitsandbytes
itself is an optional extra: it is imported on first use (``require_bitsandbytes``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from ..base.errors import QuantMoeError
from ..base.options import BnbConfig
from .base import QuantizedLinear

INSTALL = "pip install 'quantmoe[bnb]'"
_4BIT_STATS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def require_bitsandbytes(backend: str):
    """The bitsandbytes module, or a one-line error that names the command installing it."""
    loaded = sys.modules.get("bitsandbytes")
    if loaded is not None and "bitsandbytes.functional" in sys.modules:
        return loaded
    # On CPUs with AVX512-BF16, bitsandbytes warns at import that the optional `kernels` package
    # (a faster 4-bit matmul) is missing. quantmoe does not use that matmul, so the warning is noise.
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        raise QuantMoeError(f"the {backend} backend needs bitsandbytes, which is not installed; run: {INSTALL}") from None
    except Exception as exc:  # a broken native library shows up as OSError/RuntimeError at import
        raise QuantMoeError(f"bitsandbytes is installed but does not import ({type(exc).__name__}: {exc}); "
                            f"reinstall it: {INSTALL}") from None
    finally:
        cpu_ops.setLevel(level)
    return bitsandbytes


# -- one linear ----------------------------------------------------------------------
def quantize_weight(W: Tensor, cfg: BnbConfig) -> dict[str, Tensor]:
    """A weight (out, in) -> its bitsandbytes tensors, keyed by name relative to the module.

    4-bit: ``weight`` (packed) and ``weight.<stat>``; int8: ``weight``, ``SCB`` and
    ``weight_format``. Quantized from W's own dtype, as ``Params4bit`` does (int8 from
    float16, as ``Int8Params`` does).
    """

    F = require_bitsandbytes(f"bnb-{cfg.quant_type}").functional
    if cfg.four_bit:
        packed, state = F.quantize_4bit(W.contiguous(), blocksize=cfg.blocksize,
                                        compress_statistics=cfg.double_quantize(W.numel()), quant_type=cfg.quant_type,
                                        quant_storage=torch.uint8)
        return {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    CB, SCB, _ = F.int8_vectorwise_quant(W.contiguous().to(torch.float16))
    # weight_format 0 = row-major, the only layout bitsandbytes 0.45+ writes.
    return {"weight": CB, "SCB": SCB, "weight_format": torch.tensor(0, dtype=torch.uint8)}


def dequantize_weight(tensors: dict[str, Tensor], backend: str = "bnb") -> Tensor:
    """The weight (out, in) that bitsandbytes tensors (names relative to the module) stand for.

    4-bit: ``dequantize_4bit``, in the dtype the weight was quantized from; int8:
    ``int8_vectorwise_dequant`` (W * SCB / 127), in float32. Both are elementwise, so the
    result is the same on every run and device.
    """
    F = require_bitsandbytes(backend).functional
    weight = tensors["weight"]
    if "SCB" in tensors:
        return F.int8_vectorwise_dequant(weight, tensors["SCB"].to(weight.device))
    stats = {k[len("weight."):]: v for k, v in tensors.items() if k.startswith("weight.")}
    state = F.QuantState.from_dict(stats, device=weight.device)
    return F.dequantize_4bit(weight, state)


def _4bit_shape(blob: Tensor) -> tuple[int, int]:
    """(out, in) from the JSON blob ``weight.quant_state.bitsandbytes__*`` that every 4-bit linear carries."""

    return tuple(json.loads(bytes(blob.to(torch.uint8).tolist()).decode())["shape"])


def quantization_config(cfg: BnbConfig, backend: str, skip: list[str], not_quantized: list[str], version: str) -> dict:
    """The bitsandbytes ``quantization_config`` transformers reads, plus quantmoe's own record."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": cfg.four_bit,
        "load_in_8bit": not cfg.four_bit,
        "bnb_4bit_quant_type": cfg.quant_type if cfg.four_bit else "fp4",
        # Loaders read double quantization per linear (from its quant_state); "auto" may mix both.
        "bnb_4bit_use_double_quant": cfg.four_bit and cfg.double_quant != "off",
        "bnb_4bit_compute_dtype": cfg.compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_threshold": cfg.int8_threshold,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
        # In-memory module paths, matched from the start by transformers; giving any list turns off
        # its default skips, so lm_head is listed too.
        "llm_int8_skip_modules": skip + ["lm_head"],
        "quantmoe": {
            "backend": backend,
            "version": version,
            "blocksize": cfg.blocksize if cfg.four_bit else None,
            "double_quant": cfg.double_quant if cfg.four_bit else None,
            "experts": "per expert, under the row's per-expert on-disk names (block_sparse_moe.experts.E.w1 / "
                       "mlp.experts.E.gate_proj ...); experts fused on disk are cut per expert",
            "modules_not_quantized": not_quantized,
        },
    }


# -- reading ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BnbReader:
    """bitsandbytes checkpoints of one quant type (nf4, fp4 or int8), as the bnb-* backends write them."""

    name: str
    quant_type: str

    def recognizes(self, quantization: dict) -> bool:
        if quantization.get("quant_method") != "bitsandbytes":
            return False
        if quantization.get("load_in_8bit"):
            return self.quant_type == "int8"
        return quantization.get("load_in_4bit", False) and quantization.get("bnb_4bit_quant_type", "fp4") == self.quant_type

    def describe(self, quantization: dict) -> dict:
        q = quantization
        four = self.quant_type != "int8"
        double = (q.get("quantmoe") or {}).get("double_quant") or ("on" if q.get("bnb_4bit_use_double_quant") else "off")
        label = f"{self.name} (double quant {double})" if four else self.name
        return {"method": "bitsandbytes", "backend": self.name, "bits": 4 if four else 8, "label": label,
                "compute_dtype": q.get("bnb_4bit_compute_dtype") if four else None,
                "double_quant": double if four else None,
                "int8_threshold": None if four else q.get("llm_int8_threshold")}

    def quantized_linears(self, ckpt) -> dict[str, QuantizedLinear]:
        out = {}
        for name in ckpt.names():
            m = re.fullmatch(r"(.+)\.weight\.quant_state\.bitsandbytes__(?:nf4|fp4)", name)
            if m:
                module = m.group(1)
                names = [f"{module}.weight"] + [f"{module}.weight.{s}" for s in _4BIT_STATS] + [name]
                out[module] = QuantizedLinear(module, _4bit_shape(ckpt.tensor(name)), tuple(n for n in names if ckpt.has(n)))
            elif name.endswith(".SCB"):
                module = name[: -len(".SCB")]
                names = (f"{module}.weight", name, f"{module}.weight_format")
                out[module] = QuantizedLinear(module, ckpt.shape(f"{module}.weight"), tuple(n for n in names if ckpt.has(n)))
        return out

    def dequantize(self, ckpt, linear: QuantizedLinear) -> Tensor:
        prefix = linear.module + "."
        return dequantize_weight({n[len(prefix):]: ckpt.tensor(n) for n in linear.tensors}, self.name)


READERS = (BnbReader("bnb-nf4", "nf4"), BnbReader("bnb-fp4", "fp4"), BnbReader("bnb-int8", "int8"))
