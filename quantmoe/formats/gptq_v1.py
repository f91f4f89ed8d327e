"""GPTQ v1 checkpoint packing (the format auto-gptq defined; GPTQModel, vLLM and
transformers read it).

Per quantized linear ``P`` with weight (out, in):

* ``P.qweight`` int32 (in * bits / 32, out): levels packed along the input dim, low bits first;
* ``P.qzeros``  int32 (groups, out * bits / 32): zero points minus one (the v1 convention),
  packed along the output dim, low bits first;
* ``P.scales``  fp16 (groups, out);
* ``P.g_idx``   int32 (in,): the group of each input column.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from ..base.errors import QuantMoeError
from ..gptq.core import QuantResult, dequantize
from .base import QuantizedLinear, StoredWeight, tensor_reader


def _pack_rows(values: Tensor, bits: int) -> Tensor:
    """Pack (..., N, M) small non-negative ints along dim -2 into int32 (..., N * bits / 32, M)."""
    per = 32 // bits
    *lead, N, M = values.shape
    if N % per:
        raise ValueError(f"cannot pack {N} rows at {bits} bits: not a multiple of {per}")
    v = values.to(torch.int64).reshape(*lead, N // per, per, M)
    shifts = (torch.arange(per, dtype=torch.int64, device=v.device) * bits)[:, None]
    packed = (v << shifts).sum(dim=-2)  # < 2**32
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def _unpack_rows(packed: Tensor, bits: int) -> Tensor:
    """Inverse of _pack_rows: int32 (N * bits / 32, M) -> int64 (N, M)."""
    per = 32 // bits
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per, dtype=torch.int64, device=p.device) * bits)[None, :, None]
    v = (p[:, None, :] >> shifts) & (2**bits - 1)
    return v.reshape(-1, packed.shape[1])


def pack_linear(q: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor, bits: int) -> dict[str, Tensor]:
    """One linear's GPTQ v1 tensors from q (R, C), scales/zeros (R, G), g_idx (C,); or, with a leading
    dimension B on q, scales and zeros, B linears' at once (each tensor with that leading dimension, but g_idx)."""
    maxq = 2**bits - 1
    # v1 stores zero - 1, wrapped into `bits` bits (the loaders add 1 back).
    stored_zeros = (zeros.to(torch.int64) - 1) & maxq
    return {
        "qweight": _pack_rows(q.mT.contiguous(), bits),
        "qzeros": _pack_rows(stored_zeros, bits).mT.contiguous(),
        "scales": scales.mT.half().contiguous(),
        "g_idx": g_idx.to(torch.int32).clone(),
    }


def pack_result(result: QuantResult, bits: int) -> list[dict[str, Tensor]]:
    """Pack the B matrices of a QuantResult together on the device they lie on (the int64 bit shuffling is
    cheap on a GPU, slow on the host at Mixtral size), each tensor copied to the CPU once for all B; each
    matrix's tensors are views of those (``base.files.save_safetensors`` copies a view out as it writes).
    From a GPU the copies are only queued (into pinned memory): wait for the device, e.g. on an event
    recorded after this call, before reading them."""
    B, _, C = result.q.shape
    tensors = pack_linear(result.q, result.scales, result.zeros, result.g_idx, bits)
    tensors["g_idx"] = tensors["g_idx"].expand(B, C).contiguous()  # every matrix its own, as it is written
    packed = {name: t.to("cpu", non_blocking=True) for name, t in tensors.items()}
    return [{name: t[b] for name, t in packed.items()} for b in range(B)]


def unpack_linear(tensors: dict[str, Tensor], bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """GPTQ v1 tensors -> (q (R, C), scales (R, G), zeros (R, G), g_idx (C,))."""
    q = _unpack_rows(tensors["qweight"], bits).t()
    return q, tensors["scales"].t(), _zero_points(tensors, bits), tensors["g_idx"]


def _zero_points(tensors: dict[str, Tensor], bits: int) -> Tensor:
    """A GPTQ v1 linear's zero points (R, G), int64: qzeros' stored values plus one (a stored 2**bits - 1 wraps
    to 2**bits, which no level reaches)."""
    return _unpack_rows(tensors["qzeros"].t().contiguous(), bits) + 1


def _fields(qweight: Tensor, width: int) -> Tensor:
    """A GPTQ v1 ``qweight`` (N, M), 32-bit words -> (M, N * 32 / width) uint8: each output row's ``width``-bit
    fields, low bits first (the levels at width ``bits``; their bytes at width 8), never widened beyond a byte
    but in the shifts (``_unpack_rows``' int64 levels take 8 bytes a level)."""
    q = (qweight if qweight.dtype == torch.int32 else qweight.to(torch.int64) & 0xFFFFFFFF).t()
    shifts = torch.arange(0, 32, width, dtype=q.dtype, device=q.device)
    return ((q[..., None] >> shifts) & (2**width - 1)).to(torch.uint8).reshape(q.shape[0], -1)


def unpack_levels(tensors: dict[str, Tensor], bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ v1 tensors -> (levels (R, C * bits / 8), scales (R, G), zeros (R, G)), levels and zeros uint8: each
    row's levels as bytes, low bits first (at 4 bits two to a byte, the even column's in the low half:
    stages.experts.Levels' layout). For quantmoe's own linears, whose zeros are at least 1 (none wraps)."""
    return _fields(tensors["qweight"], 8), tensors["scales"].t(), _zero_points(tensors, bits).to(torch.uint8)


def dequantizes_to_zero(tensors: dict[str, Tensor], bits: int) -> bool:
    """Whether the weight a GPTQ v1 linear stands for (``dequantize_linear``'s) is 0 everywhere, read without
    dequantizing it: scale * (level - zero) is 0 exactly where the (finite) scale is 0 or the level is its zero.
    Where each group's columns fill whole words (g_idx[c] = c // group size, as quantmoe and most exporters
    write), a group is its zero throughout exactly where each of its words repeats the zero; otherwise level by
    level. The tensors must fit together (``check_linear``)."""
    qweight, g_idx = tensors["qweight"], tensors["g_idx"].long()
    zeros = _zero_points(tensors, bits)  # (R, G)
    live = tensors["scales"].t() != 0  # (R, G)
    per, (C,), G = 32 // bits, g_idx.shape, live.shape[1]
    if C % G == 0 and (C // G) % per == 0 and torch.equal(g_idx, torch.arange(C, device=g_idx.device) // (C // G)):
        words = (qweight.to(torch.int64) & 0xFFFFFFFF).view(G, C // G // per, -1)  # (G, words a group, R)
        repeated = zeros.t() * sum(1 << (bits * k) for k in range(per))  # (G, R): past 32 bits where it wraps
        return not bool(((words != repeated[:, None, :]).any(dim=1) & live.t()).any())
    levels = _fields(qweight, bits).to(torch.int16)  # (R, C)
    return not bool(((levels != zeros.to(torch.int16)[:, g_idx]) & live[:, g_idx]).any())


def dequantize_linear(tensors: dict[str, Tensor], bits: int) -> Tensor:
    """The fp32 weight (out, in) a GPTQ v1 linear stands for."""
    q, scales, zeros, g_idx = unpack_linear(tensors, bits)
    return dequantize(q, scales, zeros, g_idx)


GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def quantized_modules(names) -> list[str]:
    """The module paths that have a ``.qweight`` among ``names``, sorted."""
    return sorted(n[: -len(".qweight")] for n in names if n.endswith(".qweight"))


def linear_bits(parts: dict[str, Tensor]) -> int:
    """The bit width of a GPTQ v1 linear from its shapes: qweight has in * bits / 32 rows, g_idx in entries."""
    rows, inputs = parts["qweight"].shape[0], parts["g_idx"].shape[0]
    return 32 * rows // inputs if inputs else 0


def dequantize_state(tensors: dict[str, Tensor], bits: int | None = None) -> dict[str, Tensor]:
    """Replace each GPTQ linear's four tensors in ``tensors`` with its fp32 ``.weight``; the rest pass through.
    ``bits`` None: each linear's own (``linear_bits``; a layer file of a ``--recipe`` run mixes them)."""
    modules = quantized_modules(tensors)
    out = {}
    for m in modules:
        parts = {s: tensors[f"{m}.{s}"] for s in GPTQ_SUFFIXES}
        out[f"{m}.weight"] = dequantize_linear(parts, bits or linear_bits(parts))
    packed = {f"{m}.{s}" for m in modules for s in GPTQ_SUFFIXES}
    out.update({n: t for n, t in tensors.items() if n not in packed})
    return out


def quantization_config(qcfg, not_quantized: list[str], version: str,
                        full_precision_layers: dict[int, list[str]] | None = None,
                        overrides: list[tuple[str, dict | None]] = (), skipped: list[str] = ()) -> dict:
    """The GPTQ v1 ``quantization_config`` that GPTQModel, vLLM and transformers read (``qcfg``: a QuantConfig).

    ``full_precision_layers``: layer index -> its modules, for whole layers exported unquantized
    (the multi-token-prediction layers): listed in ``modules_not_quantized`` and excluded by one
    ``-:`` rule each in ``dynamic``, the only exclusion vLLM's MoE layers honour (see
    docs/architectures.md, "Multi-token prediction layers").

    ``overrides`` (``--recipe``): (regex, {bits, group_size, sym}) for modules with their own settings,
    or (regex, None) for modules kept in 16 bits (also listed in ``skipped``), written as ``+:`` and
    ``-:`` rules after the layer exclusions (the first rule that matches wins)."""
    layers = full_precision_layers or {}
    dynamic = {f"-:^{re.escape(m)}$": {} for m in not_quantized if qcfg.layout == "gptqmodel"}
    dynamic.update({f"-:^model\\.layers\\.{i}\\.": {} for i in sorted(layers)})
    dynamic.update({("-:" if o is None else "+:") + pattern: o or {} for pattern, o in overrides})
    config = {
        "quant_method": "gptq",
        "bits": qcfg.bits,
        "group_size": qcfg.group_size,
        # g_idx is always c // group_size (every column order keeps it), so loaders need no reordering.
        "desc_act": False,
        "sym": qcfg.sym,
        "static_groups": qcfg.act_order == "static",
        "true_sequential": qcfg.true_sequential,
        "damp_percent": qcfg.damp,
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "lm_head": False,
        "modules_not_quantized": not_quantized + list(skipped) + [m for i in sorted(layers) for m in layers[i]],
        # GPTQModel and vLLM read exclusions from "dynamic" ("-:" = leave this module unquantized).
        "dynamic": dynamic,
        "meta": {"quantizer": [f"quantmoe:{version}"], "act_order": qcfg.act_order, "backend": qcfg.backend,
                 "layout": qcfg.layout},
    }
    if layers:
        config["meta"]["full_precision_layers"] = sorted(layers)
    return config


def served_names(config: dict, pattern: Callable[[str], str], name: Callable[[str], str]) -> dict:
    """``config`` (quantization_config's) with the regexes of its ``dynamic`` rules rewritten by ``pattern`` and the
    module names of ``modules_not_quantized`` by ``name``: a nested release's (Nesting.served_pattern,
    Checkpoint.stored_name), which loaders match against the release's names or their own."""
    dynamic = {key[:2] + pattern(key[2:]) if key.startswith(("-:", "+:")) else pattern(key): rule
               for key, rule in config["dynamic"].items()}
    return {**config, "dynamic": dynamic, "modules_not_quantized": [name(m) for m in config["modules_not_quantized"]]}


# -- reading ---------------------------------------------------------------------------
READ_BITS = (4, 8)  # packings that fill an int32 exactly, as quantmoe writes them


def settings(quantization: dict) -> tuple[int, int]:
    """(bits, group_size) of a GPTQ ``quantization_config``, or a one-line error for values quantmoe
    cannot read (bits missing, 0 or 3; group_size 0 ...): a checkpoint is untrusted input."""
    bits, group_size = quantization.get("bits"), quantization.get("group_size", -1)
    if isinstance(bits, bool) or bits not in READ_BITS:
        raise QuantMoeError(f"quantization_config bits = {bits!r} is not one quantmoe reads ({' or '.join(map(str, READ_BITS))}); "
                            "the checkpoint's config.json is damaged or from another tool")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise QuantMoeError(f"quantization_config group_size = {group_size!r} is invalid (it must be -1 or positive); "
                            "the checkpoint's config.json is damaged")
    return bits, group_size


def module_settings(quantization: dict, module: str) -> tuple[int, int] | None:
    """(bits, group_size) of ``module`` as GPTQModel and vLLM read a config: the first ``dynamic`` rule
    whose regex matches its name (``re.match``) gives its overrides, ``-:`` none (None: not quantized);
    without one, the top-level settings. A bad rule is a one-line error (a checkpoint is untrusted)."""
    bits, group_size = settings(quantization)
    dynamic = quantization.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise QuantMoeError("quantization_config dynamic is not an object; the checkpoint's config.json is damaged")
    for key, override in dynamic.items():
        negative = key.startswith("-:")
        pattern = key[2:] if key.startswith(("-:", "+:")) else key
        try:
            if re.match(pattern, module) is None:
                continue
        except re.error as exc:
            raise QuantMoeError(f"quantization_config dynamic rule {key!r} is not a valid regular expression "
                                f"({exc}); the checkpoint's config.json is damaged") from None
        if negative:
            return None
        if not isinstance(override, dict):
            raise QuantMoeError(f"quantization_config dynamic rule {key!r} is not an object; "
                                "the checkpoint's config.json is damaged")
        return settings({"bits": override.get("bits", bits), "group_size": override.get("group_size", group_size)})
    return bits, group_size


def check_linear(module: str, parts: dict[str, Tensor], bits: int) -> None:
    """Raise unless a GPTQ v1 linear's tensors fit together: qweight (in*bits/32, out), qzeros
    (groups, out*bits/32) and scales (groups, out), integer/float dtypes as the format has them, and
    every g_idx (in,) naming one of the groups. Dequantizing never indexes outside a tensor."""
    qweight, qzeros, scales, g_idx = (parts[s] for s in GPTQ_SUFFIXES)
    per = 32 // bits
    problem = None
    if any(t.is_floating_point() for t in (qweight, qzeros, g_idx)) or not scales.is_floating_point():
        problem = "has the wrong dtypes (qweight, qzeros and g_idx are integers, scales floating point)"
    elif qweight.ndim != 2 or scales.ndim != 2 or qzeros.ndim != 2 or g_idx.ndim != 1:
        problem = "has tensors of the wrong rank"
    else:
        groups, out = scales.shape
        if qweight.shape != (g_idx.shape[0] // per, out) or g_idx.shape[0] % per or qzeros.shape != (groups, out // per) \
                or out % per:
            problem = (f"has shapes that do not fit together at {bits} bits (qweight {tuple(qweight.shape)}, qzeros "
                       f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)}, g_idx {tuple(g_idx.shape)})")
        elif g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            problem = f"has a g_idx outside its {groups} groups"
    if problem:
        raise QuantMoeError(f"{module} {problem}; the checkpoint is damaged: re-export or re-download it")


@dataclass(frozen=True)
class GptqReader:
    """GPTQ v1 checkpoints of the backend ``name`` (gptq or rtn, told apart by ``meta.backend``)."""

    name: str

    def recognizes(self, quantization: dict) -> bool:
        return quantization.get("quant_method") == "gptq" and \
            (quantization.get("meta") or {}).get("backend", "gptq") == self.name

    def describe(self, quantization: dict) -> dict:
        q = quantization
        layout = (q.get("meta") or {}).get("layout", "source")
        # "+:" rules of dynamic give some modules their own settings (--recipe)
        overrides = {f"int{v['bits']}" for k, v in (q.get("dynamic") or {}).items()
                     if not str(k).startswith("-:") and isinstance(v, dict) and v.get("bits") not in (None, q.get("bits"))}
        return {"method": "gptq", "backend": self.name, "bits": q.get("bits"), "group_size": q.get("group_size"),
                "sym": q.get("sym"), "layout": layout,
                "label": f"{self.name} int{q.get('bits')} g{q.get('group_size')}"
                         + (f" ({'/'.join(sorted(overrides))} by module)" if overrides else "")
                         + ("" if layout == "source" else f" ({layout} layout)")}

    def quantized_linears(self, ckpt) -> dict[str, QuantizedLinear]:
        settings(ckpt.quantization)
        out = {}
        for name in ckpt.names():
            if name.endswith(".qweight"):
                module = name[: -len(".qweight")]
                g_idx, scales = ckpt.shape(f"{module}.g_idx"), ckpt.shape(f"{module}.scales")
                if len(g_idx) != 1 or len(scales) != 2:
                    raise QuantMoeError(f"{module} has a g_idx of shape {list(g_idx)} and scales of shape "
                                        f"{list(scales)} (GPTQ needs (in,) and (groups, out)); the checkpoint is "
                                        "damaged: re-export or re-download it")
                inputs, outputs = g_idx[0], scales[1]
                out[module] = QuantizedLinear(module, (outputs, inputs), tuple(f"{module}.{s}" for s in GPTQ_SUFFIXES))
        return out

    def dequantize(self, ckpt, linear: QuantizedLinear) -> Tensor:
        return self.stored(ckpt, linear, copy=False).dequantize()

    def stored(self, ckpt, linear: QuantizedLinear, copy: bool = True, pin: bool = False) -> StoredWeight:
        """The linear's four tensors (copies unless ``copy`` is False, page-locked with ``pin``), checked, to
        dequantize where they go."""
        read = tensor_reader(ckpt, copy, pin)
        parts = {s: read(f"{linear.module}.{s}") for s in GPTQ_SUFFIXES}
        found = module_settings(ckpt.quantization, ckpt.stored_name(linear.module))
        if found is None:
            raise QuantMoeError(f"{linear.module} is stored quantized but the config's dynamic rules keep it "
                                "unquantized; the checkpoint is damaged: re-export or re-download it")
        bits, _ = found
        check_linear(linear.module, parts, bits)
        return StoredWeight(parts, partial(dequantize_linear, bits=bits), torch.Size(linear.shape), torch.float32,
                            f"{linear.module}.weight")


READERS = (GptqReader("gptq"), GptqReader("rtn"))
