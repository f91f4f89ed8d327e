"""FP8 source checkpoints: the format of DeepSeek-V3/R1, Kimi K2, Qwen3-*-FP8 and MiniMax-M2
releases, read (dequantized per linear, on whichever device holds the tensors) and written
(for tests and synthetic benchmark releases).

The format, as DeepSeek-V3's ``inference/kernel.py`` (``weight_quant``/``weight_dequant``) makes
and reads it:

* ``config.json`` has ``quantization_config: {quant_method: "fp8", fmt: "e4m3",
  activation_scheme: "dynamic", weight_block_size: [128, 128]}``. MiniMax-M2 writes
  ``fmt: "float8_e4m3fn"`` and a ``modules_to_not_convert`` list; DeepSeek-V3.1+ adds
  ``scale_fmt: "ue8m0"`` (every scale a power of two); transformers' ``FineGrainedFP8Config``
  reads all of them.
* Per FP8 linear ``P`` with weight (out, in): ``P.weight`` float8_e4m3fn (out, in) and
  ``P.weight_scale_inv`` float32 (ceil(out / bo), ceil(in / bi)). Despite its name the scale
  multiplies: weight[i, j] = float(P.weight[i, j]) * scale_inv[i // bo, j // bi]. The last row
  and column blocks are ragged when bo or bi does not divide out or in.
* Without ``weight_block_size`` (vLLM's per-tensor FP8, e.g. ``activation_scheme: static``
  releases) the scale is ``P.weight_scale``: one value, shape [] or [1]. The per-channel layout
  (``P.weight_scale`` of shape [out] or [out, 1]) is read by ``dequantize_fp8`` too.
* Routers, norms, embeddings and the head stay BF16 (MiniMax's routers FP32).

Also read, by its own reader (``CompressedFp8Reader``): compressed-tensors FP8
(``quant_method: compressed-tensors`` whose ``config_groups`` hold float 8-bit weights,
``format: float-quantized`` or ``naive-quantized``), which is how GLM-4.5/4.6-FP8 and
GLM-4.5-Air-FP8 are released: ``P.weight`` float8_e4m3fn and ``P.weight_scale`` per channel
[out, 1] (``strategy: channel``), per tensor (``tensor``), per block (``block``,
``block_structure``) or per group of columns (``group``, ``group_size``); the same multiply.
Not read: DeepSeek-V4's FP4-packed experts (``expert_dtype: fp4``).

A source read for the quantize pipeline keeps each FP8 linear as stored (``Fp8Weight``: codes
and scale) until it reaches the device, where it is dequantized to BF16 as its layer streams in
(``model.stream.LayerStream.load_layer``); every other reader of the checkpoint gets the
dequantized weight (``dequantize``).

Departures from DeepSeek's reference, each with its reason:

* An all-zero block is written with scale 1 (as transformers' ``Fp8Quantize`` does), not
  amax / 448 = 0: DeepSeek's kernel divides 0 by 0 there and stores NaN codes.
* A zero scale is legal when read: the block dequantizes to exactly 0, which is what the
  block was. NaN codes under a zero scale (what DeepSeek's kernel writes for an all-zero
  block) are read as 0 for the same reason; NaN codes anywhere else are an error.
* Negative, NaN or infinite scales are errors: a scale is amax / 448, finite and >= 0.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..base.errors import QuantMoeError
from ..gptq.triton_kernels import fp8_blocks_as_bf16
from .base import QuantizedLinear, StoredWeight, tensor_reader

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
BLOCK_SCALE = "_scale_inv"  # P.weight -> P.weight_scale_inv (block-wise)
PLAIN_SCALE = "_scale"  # P.weight -> P.weight_scale (per-tensor / per-channel)
FMT_NAMES = ("e4m3", "float8_e4m3fn", "e5m2", "float8_e5m2")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
REDOWNLOAD = "the checkpoint is damaged: re-download it"


def is_fp8_config(quantization_config: dict | None) -> bool:
    """Whether a checkpoint's ``quantization_config`` is the FP8 release format read here.

    True for ``quant_method: "fp8"`` (DeepSeek-V3/R1, Kimi K2, Qwen3-*-FP8, MiniMax-M2); False
    for None and for every other method, compressed-tensors FP8 included. Raises QuantMoeError
    for an fp8 config of a variant this module cannot read, so a run stops before it starts.
    """
    if not isinstance(quantization_config, dict):
        return False
    if str(quantization_config.get("quant_method", "")).lower() != "fp8":
        return False
    fmt = quantization_config.get("fmt")
    if fmt is not None and str(fmt).lower() not in FMT_NAMES:
        raise QuantMoeError(f"quantization_config.fmt is {fmt!r}; quantmoe reads FP8 checkpoints in "
                            f"{' or '.join(FMT_NAMES)}: convert the checkpoint to BF16 first")
    if (quantization_config.get("expert_dtype") or "fp8") != "fp8":
        raise QuantMoeError(f"quantization_config.expert_dtype is {quantization_config['expert_dtype']!r} "
                            "(FP4-packed experts, as DeepSeek-V4); quantmoe reads FP8 experts only: "
                            "convert the experts to BF16 first")
    block_size(quantization_config)  # a malformed weight_block_size fails here, not mid-run
    return True


def block_size(quantization_config: dict | None) -> tuple[int, int] | None:
    """(rows, cols) of a scale block from ``weight_block_size``; None when absent (per-tensor or
    per-channel scales)."""
    block = (quantization_config or {}).get("weight_block_size")
    if block is None:
        return None
    if not _is_block(block):
        raise QuantMoeError(f"quantization_config.weight_block_size is {block!r}; expected two positive integers "
                            "such as [128, 128]: fix config.json or re-download it")
    return int(block[0]), int(block[1])


def block_scale_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the block scale for a weight of ``shape`` (out, in): (ceil(out/bo), ceil(in/bi))."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def scale_name(weight_name: str, block: tuple[int, int] | None) -> str:
    """The scale tensor's name for a weight's: ``P.weight_scale_inv`` with blocks, else ``P.weight_scale``."""
    return weight_name + (BLOCK_SCALE if block is not None else PLAIN_SCALE)


def fp8_linears(names: Iterable[str]) -> dict[str, str]:
    """{weight name: scale name} for every FP8 weight among a checkpoint's tensor names.

    A weight ``P.weight`` is FP8 when ``P.weight_scale_inv`` (block-wise) or ``P.weight_scale``
    (per-tensor/per-channel) is among the names; ``_scale_inv`` wins if both are. A reader
    dequantizes the keys with their values and does not pass the values on as tensors.
    """
    names = set(names)
    found = {}
    for name in sorted(names):
        if not name.endswith(".weight"):
            continue
        for suffix in (BLOCK_SCALE, PLAIN_SCALE):
            if name + suffix in names:
                found[name] = name + suffix
                break
    return found


def dequantize_fp8(weight: Tensor, scale: Tensor | None, block: tuple[int, int] | None,
                   dtype: torch.dtype = torch.bfloat16, name: str = "") -> Tensor:
    """The weight (out, in) in ``dtype`` that an FP8 ``weight`` (out, in) and its ``scale`` stand for.

    ``block`` (bo, bi) from ``block_size``: ``scale`` is (ceil(out/bo), ceil(in/bi)) and
    element [i, j] is multiplied by scale[i // bo, j // bi]. ``block`` None: ``scale`` is one
    value ([] or [1]) or one per output row ([out] or [out, 1]). ``name`` is the weight's tensor
    name (``P.weight``), used in errors.

    Computed in float32 (the one fp32 copy of the weight, scaled in place) on the weight's
    device and cast to ``dtype`` once; the result equals float32(code) * scale rounded to
    ``dtype``, element by element. One host sync, for the validity check. Raises QuantMoeError
    for a missing, misshapen, negative or non-finite scale, a weight that is not FP8, NaN codes
    outside a zero-scale block, and values that overflow ``dtype``.
    """
    return _dequantize(weight, scale, block, dtype, name)[0]


def _dequantize(weight: Tensor, scale: Tensor | None, block: tuple[int, int] | None, dtype: torch.dtype,
                name: str) -> tuple[Tensor, bool]:
    """``dequantize_fp8``, and whether its result is ``_scaled(weight, scale, block).to(dtype)``
    (False: the slow path repaired NaN codes of zero-scale blocks)."""
    wname = name or "an FP8 weight"
    sname = scale_name(name, block) if name else "its scale"
    _check_layout(weight, scale, block, wname, sname)
    s = scale.to(device=weight.device, dtype=torch.float32)
    out = _scaled(weight, s, block)
    if out.numel() == 0:
        return out.to(dtype), True
    # Min and max reductions, which pass NaN on, instead of torch.isfinite, which builds an |x|
    # copy and three masks of the weight's size. A value just under dtype's rounding edge only
    # sends a valid weight through the exact checks of the slow path.
    checks = torch.stack([*torch.aminmax(s), *torch.aminmax(out)])
    result = out.to(dtype)
    del out  # the slow path recomputes it: the peak stays at one fp32 copy plus the result
    s_min, s_max, lo, hi = checks.tolist()  # the one host sync
    limit = torch.finfo(dtype).max
    if not (s_min >= 0 and math.isfinite(s_max) and -limit <= lo and hi <= limit):  # False for NaN
        return _explain_or_repair(weight, s, block, dtype, wname, sname), False
    return result, True


def _scaled(weight: Tensor, s: Tensor, block: tuple[int, int] | None) -> Tensor:
    """float32(codes) * scale (fp32 ``s``), unchecked: what every FP8 dequantization here computes."""
    out = weight.to(torch.float32)
    _apply_scale(out, s, block)
    return out


def quantize_fp8_blocks(W: Tensor, block: tuple[int, int] = (128, 128)) -> tuple[Tensor, Tensor]:
    """W (out, in) -> (float8_e4m3fn codes (out, in), float32 ``weight_scale_inv`` (ceil(out/bo), ceil(in/bi))),
    as DeepSeek's ``weight_quant`` makes them: scale = amax(|block|) / 448, codes = W / scale.

    An all-zero block gets scale 1 (its codes are 0). Ragged last blocks take their amax over
    the elements they have.
    """
    _check_block(block)
    if W.ndim != 2:
        raise QuantMoeError(f"quantize_fp8_blocks takes a 2-D weight (out, in); got shape {list(W.shape)}")
    rows, cols = W.shape
    bo, bi = block
    nbo, nbi = block_scale_shape((rows, cols), block)
    Wf = W.to(torch.float32, copy=True)
    # Zero padding leaves each ragged block's amax unchanged.
    padded = torch.nn.functional.pad(Wf.abs(), (0, nbi * bi - cols, 0, nbo * bo - rows))
    amax = padded.reshape(nbo, bo, nbi, bi).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    _apply_scale(Wf, scale, block, divide=True)
    # W / (amax / 448) can land a rounding step above 448, which float8_e4m3fn has no code for.
    return Wf.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_fp8_tensor(W: Tensor) -> tuple[Tensor, Tensor]:
    """W (out, in) -> (float8_e4m3fn codes, float32 ``weight_scale`` of shape []): one scale for the tensor."""
    q, scale = quantize_fp8_blocks(W, tuple(W.shape) if W.ndim == 2 else (1, 1))
    return q, scale.reshape(())


def quantize_fp8_channels(W: Tensor) -> tuple[Tensor, Tensor]:
    """W (out, in) -> (float8_e4m3fn codes, float32 ``weight_scale`` (out, 1)): one scale per output row."""
    return quantize_fp8_blocks(W, (1, W.shape[1]) if W.ndim == 2 else (1, 1))


def write_fp8_release(src_folder: Path, dst_folder: Path, block: tuple[int, int] = (128, 128),
                      skip: Callable[[str], bool] | None = None, layers: str = "model.layers.") -> Path:
    """Copy a BF16/FP16/FP32 safetensors checkpoint into an FP8 release at ``dst_folder``.

    Every 2-D floating ``<layers>*.weight`` (``layers``: where the decoder layers are stored; a
    vision-language release's ``model.language_model.layers.``) for which ``skip(name)`` is false becomes
    float8_e4m3fn plus ``weight_scale_inv`` (``quantize_fp8_blocks``); everything else is
    copied unchanged: norms and biases (1-D), embeddings and the head (outside
    ``model.layers``), and what ``skip`` names (pass the routers: this module does not know
    where they are). config.json gets DeepSeek's ``quantization_config``; the shard index is
    rewritten; other files are copied. ``dst_folder`` must be new or empty; each file is written
    under a temporary name and then renamed. Returns ``dst_folder``.
    """
    _check_block(block)
    src, dst = Path(src_folder), Path(dst_folder)
    if dst.exists() and dst.resolve() == src.resolve():
        raise QuantMoeError(f"the FP8 release would overwrite its source {src}; choose another folder")
    if dst.exists() and any(dst.iterdir()):
        raise QuantMoeError(f"{dst} is not empty; choose a new folder for the FP8 release or delete this one")
    config = _read_json(src / "config.json")
    if config.get("quantization_config"):
        raise QuantMoeError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')}); "
                            "pass a BF16, FP16 or FP32 checkpoint")
    index = _read_json(src / INDEX_NAME) if (src / INDEX_NAME).is_file() else None
    shards = sorted(set(index["weight_map"].values())) if index else [SINGLE_NAME]
    dst.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for shard in shards:
        tensors = _fp8_shard(_load_shard(src / shard), block, skip or (lambda name: False), layers)
        _atomic(dst / shard, partial(_save_shard, tensors))
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if index:
        new_index = {"metadata": {**index.get("metadata", {}), "total_size": total},
                     "weight_map": dict(sorted(weight_map.items()))}
        _atomic(dst / INDEX_NAME, lambda tmp: tmp.write_text(json.dumps(new_index, indent=2) + "\n"))
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": list(block)}
    _atomic(dst / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    for path in sorted(src.iterdir()):
        if path.is_file() and path.suffix != ".safetensors" and path.name not in (INDEX_NAME, "config.json"):
            _atomic(dst / path.name, partial(shutil.copyfile, path))
    return dst


# ----------------------------------------------------------------------------- reading a checkpoint

COMPUTE_DTYPE = torch.bfloat16  # what the releases compute in, so what their FP8 weights are dequantized to
FP8_STORED = ("F8_E4M3", "F8_E5M2")  # safetensors' names of the FP8 dtypes
_SAFETENSORS_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
                       "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}


@dataclass(frozen=True)
class Fp8Weight:
    """One FP8 linear's weight as stored, codes and scale, standing in for the weight in a layer's
    state until that state is on the device it is used on; ``dequantize`` makes the weight there.

    It answers what the code between reading a layer and loading it asks of a tensor: ``shape``,
    ``dtype`` (the dequantized weight's, BF16), ``device``, ``nbytes`` (stored: codes plus scale),
    ``to``, ``pin_memory`` and ``is_pinned``. Anything else (stacking, arithmetic) fails loudly instead of
    computing with codes that miss their scale.
    """

    codes: Tensor                     # (out, in) float8
    scale: Tensor                     # per block, channel or tensor (see dequantize_fp8)
    block: tuple[int, int] | None     # (rows, cols) of a scale block; None: per channel or per tensor
    name: str                         # the weight's tensor name (P.weight), for errors
    dtype: torch.dtype = COMPUTE_DTYPE

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()

    def to(self, device, non_blocking: bool = False) -> Fp8Weight:
        return replace(self, codes=self.codes.to(device, non_blocking=non_blocking),
                       scale=self.scale.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Fp8Weight:
        return replace(self, codes=self.codes.pin_memory(), scale=self.scale.pin_memory())

    def is_pinned(self) -> bool:
        return self.codes.is_pinned()

    def dequantize(self) -> Tensor:
        """The weight (out, in) in ``dtype``, on the device the codes are on; bad scales raise (dequantize_fp8)."""
        return dequantize_fp8(self.codes, self.scale, self.block, self.dtype, self.name)


class Fp8Experts:
    """A layer's routed experts of one fused kind, kept as the release stores them: the FP8 codes of
    E experts stacked (E, R, C), and per part (the row blocks each expert's matrix is made of: gate
    and up, or down alone) their scales. Half the bytes of BF16; each expert is dequantized when it
    is used (``weights``), by the arithmetic of ``dequantize_fp8``, so to the same numbers.

    Filled one expert part at a time (``put``), each checked then by ``dequantize_fp8`` itself (a
    bad scale raises there, naming the tensor); the rare part whose codes only that function's
    repair reads (NaN codes under a zero scale) is kept dequantized instead.
    """

    def __init__(self, experts: int, parts: list[Fp8Weight], device: torch.device):
        """``parts``: expert 0's Fp8Weight of each part, in row order (they give the shapes)."""
        self.rows = tuple(p.shape[0] for p in parts)
        self.block, self.dtype = parts[0].block, parts[0].dtype
        self.codes = torch.empty(experts, sum(self.rows), parts[0].shape[1], dtype=parts[0].codes.dtype, device=device)
        self.scales = [torch.empty(experts, *p.scale.shape, dtype=torch.float32, device=device) for p in parts]
        self.repaired: dict[tuple[int, int], Tensor] = {}

    @staticmethod
    def fits(weights: list[list]) -> bool:
        """Whether ``weights`` (per expert, its parts) are all Fp8Weights one Fp8Experts can hold: the same
        shapes, code dtype, block, scale size and dtype to dequantize to, part by part."""
        def layout(w):
            return (tuple(w.shape), w.codes.dtype, w.block, w.scale.numel(), w.dtype) if isinstance(w, Fp8Weight) else None

        first = [layout(w) for w in weights[0]]
        return None not in first and len({w.shape[1] for w in weights[0]}) == 1 and \
            all([layout(w) for w in parts] == first for parts in weights)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        return (self.codes.numel() * self.codes.element_size() + sum(s.numel() * 4 for s in self.scales)
                + sum(t.numel() * t.element_size() for t in self.repaired.values()))

    def put(self, e: int, k: int, weight: Fp8Weight) -> None:
        """Expert e's part k, as stored (on this object's device: the check runs there)."""
        r0 = sum(self.rows[:k])
        self.codes[e, r0:r0 + self.rows[k]].copy_(weight.codes, non_blocking=True)
        self.scales[k][e].copy_(weight.scale.reshape(self.scales[k].shape[1:]), non_blocking=True)
        result, plain = _dequantize(weight.codes, weight.scale, weight.block, weight.dtype, weight.name)
        if not plain:
            self.repaired[e, k] = result

    def share(self, start: int, stop: int) -> Fp8Experts:
        """Experts start..stop-1 alone (renumbered from 0), in tensors of their own: this one's can be freed."""
        out = Fp8Experts.__new__(Fp8Experts)
        out.rows, out.block, out.dtype = self.rows, self.block, self.dtype
        out.codes = self.codes[start:stop].clone()
        out.scales = [s[start:stop].clone() for s in self.scales]
        out.repaired = {(e - start, k): t for (e, k), t in self.repaired.items() if start <= e < stop}
        return out

    def weights(self, start: int, stop: int, dtype: torch.dtype | None = None) -> Tensor:
        """Experts start..stop-1's weights (n, R, C), dequantized to the release's compute dtype (BF16) and
        stored in ``dtype`` (default: that one): each element float32(code) * scale rounded once to BF16."""
        out = torch.empty(stop - start, *self.codes.shape[1:], dtype=dtype or self.dtype, device=self.codes.device)
        for j, e in enumerate(range(start, stop)):
            r0 = 0
            for k, rows in enumerate(self.rows):
                codes, dest, part = self.codes[e, r0:r0 + rows], out[j, r0:r0 + rows], self.repaired.get((e, k))
                r0 += rows
                if part is None and self.dtype == torch.bfloat16 and self.block is not None and \
                        fp8_blocks_as_bf16(codes, self.scales[k][e], self.block, dest):
                    continue  # the same numbers, made in one kernel on CUDA
                if part is None:
                    part = _scaled(codes, self.scales[k][e], self.block).to(self.dtype)
                dest.copy_(part)
        return out


def dequantize_stored(state: dict, skip: Collection[str] = ()) -> dict:
    """``state`` with each weight as stored (Fp8Weight, or a quantized export's base.StoredWeight) replaced
    by its weight, dequantized on the device it lies on (those named in ``skip`` are left as they are, for
    the caller to dequantize one at a time)."""
    return {name: t.dequantize() if isinstance(t, (Fp8Weight, StoredWeight)) and name not in skip else t
            for name, t in state.items()}


def is_compressed_fp8_config(quantization_config: dict | None) -> bool:
    """Whether a ``quantization_config`` is compressed-tensors FP8 (GLM-4.5/4.6-FP8): every config
    group's weights are 8-bit floats (``format: float-quantized`` or ``naive-quantized``)."""
    q = quantization_config
    if not isinstance(q, dict) or q.get("quant_method") != "compressed-tensors":
        return False
    weights = [(g or {}).get("weights") or {} for g in (q.get("config_groups") or {}).values()]
    return bool(weights) and all(w.get("type") == "float" and w.get("num_bits") == 8 for w in weights)


def has_float_weights(quantization_config: dict | None) -> bool:
    """Whether any config group of a compressed-tensors ``quantization_config`` stores float weights."""
    groups = ((quantization_config or {}).get("config_groups") or {}).values()
    return any(((g or {}).get("weights") or {}).get("type") == "float" for g in groups)


def compressed_fp8_block(quantization_config: dict) -> tuple[int, int] | None:
    """The scale block of a compressed-tensors FP8 config: ``block_structure`` (strategy block) or
    (1, group_size) (strategy group); None when every group scales per channel or per tensor."""
    blocks = set()
    for name, group in (quantization_config.get("config_groups") or {}).items():
        w = (group or {}).get("weights") or {}
        strategy = w.get("strategy")
        if strategy == "block":
            block = w.get("block_structure")
        elif strategy == "group":
            block = [1, w.get("group_size")]
        elif strategy in ("channel", "tensor", None):
            continue
        else:
            raise QuantMoeError(f"quantization_config.config_groups.{name}.weights.strategy is {strategy!r}; quantmoe "
                                "reads compressed-tensors FP8 per tensor, channel, group or block: convert the "
                                "checkpoint to BF16 first")
        if not _is_block(block):
            raise QuantMoeError(f"quantization_config.config_groups.{name}.weights gives the scale block "
                                f"{block!r}; expected two positive integers: fix config.json or re-download it")
        blocks.add(tuple(block))
    if len(blocks) > 1:
        raise QuantMoeError(f"the config groups of this compressed-tensors FP8 checkpoint use {len(blocks)} scale "
                            f"blocks ({', '.join(f'{a}x{b}' for a, b in sorted(blocks))}); quantmoe reads one: "
                            "convert the checkpoint to BF16 first")
    return blocks.pop() if blocks else None


class _Fp8Source:
    """What both FP8 source readers do: find each FP8 linear by its scale tensor, check the pair
    from the safetensors headers (so a missing or misshapen scale fails before any work), and
    dequantize with ``dequantize_fp8``. Subclasses say which block a linear's scale has."""

    name = ""
    source = True  # a release to quantize from: the pipeline dequantizes it on the device (``stored``)

    def block(self, quantization: dict, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]):
        raise NotImplementedError

    def quantized_linears(self, ckpt) -> dict[str, QuantizedLinear]:
        names = ckpt.names()
        present = set(names)
        pairs = fp8_linears(names)
        out = {}
        for weight, scale in pairs.items():
            module = weight[: -len(".weight")]
            w, s = _header_tensor(ckpt, weight), _header_tensor(ckpt, scale)
            _check_layout(w, s, self.block(ckpt.quantization, tuple(w.shape), tuple(s.shape)), weight, scale)
            extra = tuple(n for n in (f"{module}.input_scale",) if n in present)  # static activation scales: unused
            out[module] = QuantizedLinear(module, tuple(w.shape), (weight, scale, *extra))
        for name in names:
            if name.endswith(".weight") and name not in pairs and ckpt.dtype(name) in FP8_STORED:
                block = self.block(ckpt.quantization, ckpt.shape(name), ())
                _check_layout(_header_tensor(ckpt, name), None, block, name, scale_name(name, block))
        return out

    def dequantize(self, ckpt, linear: QuantizedLinear) -> Tensor:
        return self.stored(ckpt, linear, copy=False).dequantize()

    def stored(self, ckpt, linear: QuantizedLinear, copy: bool = True, pin: bool = False) -> Fp8Weight:
        """The linear as stored (codes and scale, copied out of the shard; with ``pin`` into page-locked memory),
        to dequantize later on a device."""
        weight, scale = linear.tensors[:2]
        read = tensor_reader(ckpt, copy, pin)
        codes, s = read(weight), read(scale)
        return Fp8Weight(codes, s, self.block(ckpt.quantization, tuple(codes.shape), tuple(s.shape)), weight)


def _description(method: str, name: str, block, label: str, without_blocks: str) -> dict:
    """A reader's ``describe``: an 8-bit float source, with its scale layout in the label."""
    layout = f"{block[0]}x{block[1]} blocks" if block else without_blocks
    return {"method": method, "backend": name, "bits": 8, "group_size": None, "sym": True,
            "block_size": list(block) if block else None, "label": f"{label}, {layout}"}


class Fp8Reader(_Fp8Source):
    """DeepSeek-style FP8 releases (``quant_method: fp8``): one block size for every linear."""

    name = "fp8"

    def recognizes(self, quantization: dict) -> bool:
        return is_fp8_config(quantization)

    def describe(self, quantization: dict) -> dict:
        return _description("fp8", self.name, block_size(quantization), f"fp8 {quantization.get('fmt', 'e4m3')}",
                            "per-tensor or per-channel scales")

    def block(self, quantization, weight_shape, scale_shape):
        return block_size(quantization)


class CompressedFp8Reader(_Fp8Source):
    """compressed-tensors FP8 (GLM-4.5/4.6-FP8): ``P.weight_scale`` per channel or tensor, or per
    block or group when a config group says so."""

    name = "compressed-tensors-fp8"

    def recognizes(self, quantization: dict) -> bool:
        return is_compressed_fp8_config(quantization)

    def describe(self, quantization: dict) -> dict:
        return _description("compressed-tensors", self.name, compressed_fp8_block(quantization),
                            "compressed-tensors fp8", "per-channel scales")

    def block(self, quantization, weight_shape, scale_shape):
        rows = weight_shape[0] if weight_shape else None
        if math.prod(scale_shape) == 1 or tuple(scale_shape) in ((rows,), (rows, 1)):
            return None  # per tensor or per channel, whatever the groups say
        return compressed_fp8_block(quantization)


READERS = (Fp8Reader(), CompressedFp8Reader())


def _header_tensor(ckpt, name: str) -> Tensor:
    """A meta tensor of the stored tensor's shape and dtype, from the shard's header (no data read)."""
    return torch.empty(ckpt.shape(name), dtype=_SAFETENSORS_DTYPES.get(ckpt.dtype(name), torch.float32),
                       device="meta")


# ----------------------------------------------------------------------------- helpers


def _is_block(block) -> bool:
    return (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block))


def _check_block(block) -> None:
    if not _is_block(block):
        raise QuantMoeError(f"an FP8 block size is two positive integers such as (128, 128); got {block!r}")


def _shape(t) -> str:
    return str(list(t))


def _check_layout(weight: Tensor, scale: Tensor | None, block, wname: str, sname: str) -> None:
    """What can be checked without reading values: dtypes and shapes (no device sync)."""
    if weight.dtype not in FP8_DTYPES:
        hint = (" (packed FP4, as DeepSeek-V4's experts: not read by quantmoe)"
                if weight.dtype in (torch.int8, torch.uint8) else "")
        raise QuantMoeError(f"{wname} is {str(weight.dtype).removeprefix('torch.')}{hint}, but an FP8 checkpoint "
                            "stores float8_e4m3fn weights: the checkpoint does not match its quantization_config; "
                            "re-download it")
    if weight.ndim != 2:
        raise QuantMoeError(f"{wname} has shape {_shape(weight.shape)}; an FP8 linear weight is 2-D (out, in): "
                            "the checkpoint does not match its config; re-download it")
    if scale is None:
        raise QuantMoeError(f"{sname} is missing ({wname} is FP8 and needs it); the checkpoint is incomplete: "
                            "re-download it")
    if not scale.is_floating_point():
        raise QuantMoeError(f"{sname} is {str(scale.dtype).removeprefix('torch.')}, expected a float32 scale; "
                            f"{REDOWNLOAD}")
    rows, cols = weight.shape
    if block is not None:
        _check_block(block)
        expected = block_scale_shape((rows, cols), block)
        if tuple(scale.shape) != expected:
            raise QuantMoeError(f"{sname} has shape {_shape(scale.shape)}, expected {_shape(expected)} for a "
                                f"{_shape(weight.shape)} weight in {block[0]}x{block[1]} blocks; {REDOWNLOAD}")
    elif scale.numel() != 1 and tuple(scale.shape) not in ((rows,), (rows, 1)):
        hint = (" (a grid of block scales: is weight_block_size missing from config.json's quantization_config?)"
                if scale.ndim == 2 else "")
        raise QuantMoeError(f"{sname} has shape {_shape(scale.shape)}, expected [] or [1] (per tensor) or "
                            f"[{rows}] or [{rows}, 1] (per channel) for a {_shape(weight.shape)} weight{hint}; "
                            f"{REDOWNLOAD}")


def _apply_scale(W: Tensor, s: Tensor, block, divide: bool = False) -> None:
    """W (out, in) fp32 *= (or /=) its scale, in place, without a weight-sized scale tensor."""
    op = Tensor.div_ if divide else Tensor.mul_
    rows, cols = W.shape
    if block is None:
        op(W, s.reshape(()) if s.numel() == 1 else s.reshape(rows, 1))
        return
    bo, bi = block
    nbo, nbi = s.shape
    # Rows expanded to one scale row per weight row: (out, nbi), 1/bi of the weight's size.
    row_scale = s[:, None, :].expand(nbo, bo, nbi).reshape(nbo * bo, nbi)[:rows]
    full = cols // bi
    if full:
        op(W[:, :full * bi].unflatten(1, (full, bi)), row_scale[:, :full, None])
    if cols % bi:  # the ragged last column block
        op(W[:, full * bi:], row_scale[:, full:])


def _expanded_scale(s: Tensor, block, rows: int, cols: int) -> Tensor:
    """The scale of every element (out, in); weight-sized, so for the error path only."""
    full = torch.ones(rows, cols, dtype=torch.float32, device=s.device)
    _apply_scale(full, s, block)
    return full


def _where(mask: Tensor) -> str:
    return _shape(mask.nonzero()[0].tolist())


def _explain_or_repair(weight: Tensor, s: Tensor, block, dtype: torch.dtype, wname: str, sname: str) -> Tensor:
    """Slow path, after the quick check flagged a value: raise the error that names it, or return
    the dequantized weight (NaN codes of zero-scale blocks read as 0; a flag at dtype's rounding
    edge turns out fine)."""
    for bad, what in ((~torch.isfinite(s), "NaN or infinite"), (s < 0, "negative")):
        if bad.any():
            raise QuantMoeError(f"{sname} holds {int(bad.sum())} {what} value(s) (the first at {_where(bad)}); "
                                f"a scale is amax/448, finite and >= 0, so {REDOWNLOAD}")
    out = weight.to(torch.float32)
    bad_codes = ~torch.isfinite(out)
    bad_codes &= _expanded_scale(s, block, *out.shape) != 0  # NaN codes under a zero scale: an all-zero block
    if bad_codes.any():
        raise QuantMoeError(f"{wname} holds {int(bad_codes.sum())} NaN or infinite code(s) (the first at "
                            f"{_where(bad_codes)}); {REDOWNLOAD}")
    out.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    _apply_scale(out, s, block)
    result = out.to(dtype)
    overflow = ~torch.isfinite(result)
    if overflow.any():
        narrow = torch.finfo(dtype).max < torch.finfo(torch.bfloat16).max  # float16: the scale may be fine
        raise QuantMoeError(f"{wname} times its scale reaches {out.abs().max().item():.4g}, beyond "
                            f"{str(dtype).removeprefix('torch.')}'s range (the first at {_where(overflow)}); "
                            + ("dequantize to bfloat16 or float32 instead" if narrow else REDOWNLOAD))
    return result


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise QuantMoeError(f"{path} is missing; pass a transformers checkpoint folder") from None
    except ValueError as exc:
        raise QuantMoeError(f"{path} is not valid JSON ({exc}); restore it or re-download the checkpoint") from None


def _load_shard(path: Path) -> dict[str, Tensor]:

    if not path.is_file():
        raise QuantMoeError(f"shard {path} is missing; re-download the checkpoint")
    return load_file(str(path))


def _save_shard(tensors: dict[str, Tensor], path: Path) -> None:

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _fp8_shard(tensors: dict[str, Tensor], block, skip: Callable[[str], bool], layers: str) -> dict[str, Tensor]:
    out = {}
    for name, t in tensors.items():
        if (name.startswith(layers) and name.endswith(".weight") and t.ndim == 2
                and t.is_floating_point() and t.dtype not in FP8_DTYPES and not skip(name)):
            out[name], out[name + BLOCK_SCALE] = quantize_fp8_blocks(t, block)
        else:
            out[name] = t
    return out


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename tmp to path, so a crash never leaves a torn file under its final name."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise QuantMoeError(f"could not write {path} ({exc.strerror or exc}); free disk space or choose "
                            "another folder") from None
