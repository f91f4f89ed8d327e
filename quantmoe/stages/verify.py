"""``quantmoe verify DIR``: is an exported checkpoint whole and sane?

Here, below the apps, because ``quantmoe push`` runs it before publishing (``apps.publish``).

Checks, each problem reported as one line naming the file, tensor or module:

0. files: no symbolic link (to a file or a folder), no hidden file or folder, nothing but regular
   files and folders, at any depth (nothing is followed or hashed through a link);
1. manifest: every file's sha256 matches ``manifest.json``, none missing, none stray;
2. index: every tensor the index lists is in its shard, and no shard holds unlisted ones;
3. layout: every linear the architecture table quantizes has ``qweight`` int32
   (in*bits/32, out), ``qzeros`` int32 (groups, out*bits/32), ``scales`` fp16 (groups, out)
   and ``g_idx`` int32 (in,) with in/out taken from the model config, and routers are
   kept in full precision;
4. no NaN or Inf in any floating-point tensor;
5. no quantized module is all zero (every scale zero, or a dequantized weight of zeros):
   what routed-only calibration leaves behind for an expert that saw no tokens; and there is at
   least one quantized module (an export that quantized nothing is not one).

A config.json whose quantization settings quantmoe cannot read (bits 3, group size 0 ...), or
whose layer count does not match the weights, is a problem on its line too, never a traceback.

A checkpoint of another backend (bitsandbytes, compressed-tensors) gets 1, 2 and 4, and instead of
3 and 5: every linear the architecture table quantizes is stored quantized, and each one, read back
through its backend, has the config's shape, is finite and is not all zero.

Tensors are read one at a time, so memory holds one module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..base.errors import QuantMoeError
from ..base.files import check_manifest, check_tree, read_manifest
from ..formats.compressed_tensors import ignored
from ..formats.gptq_v1 import (
    GPTQ_SUFFIXES,
    check_linear,
    dequantizes_to_zero,
    module_settings,
    quantized_modules,
    settings,
)
from ..model.architectures import architecture_for, plan_layer
from ..model.checkpoint import Checkpoint, NonFinite
from ..model.stream import model_config, skeleton
from .export import QUANTIZE_CONFIG, read_json


@dataclass
class VerifyReport:
    folder: Path
    problems: list[str] = field(default_factory=list)
    files: int = 0                # files checked against the manifest
    shards: int = 0
    tensors: int = 0
    quantized_modules: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return (f"ok: {self.folder}: {self.files} files match the manifest; {self.tensors} tensors in {self.shards} "
                f"shards; {self.quantized_modules} quantized modules with the expected shapes and dtypes; "
                "no NaN/Inf; no all-zero module")


def expected_linears(config, layout: str = "source") -> dict[str, tuple[int, int]]:
    """Full path (in the export's ``layout`` naming) -> (out, in) of every linear quantmoe
    quantizes, from the config alone."""
    arch = architecture_for(config)
    model = skeleton(config)
    named = (lambda n: arch.gptqmodel_name(f"{n}.weight")[: -len(".weight")]) if layout == "gptqmodel" else (lambda n: n)
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(config.num_hidden_layers):
        plan = plan_layer(arch, config, i, layout)
        layer = model.model.layers[i]
        local: dict[str, tuple[int, int]] = {}  # on-disk source names, relative to the layer
        if plan.experts is not None:
            fused = layer.get_submodule(plan.fused.module)
            _, two_inner, hidden = getattr(fused, plan.fused.gate_up).shape  # (E, 2I, H)
            for e in range(plan.num_experts):
                local[plan.experts.linear("gate", e)] = (two_inner // 2, hidden)
                local[plan.experts.linear("up", e)] = (two_inner // 2, hidden)
                local[plan.experts.linear("down", e)] = tuple(getattr(fused, plan.fused.down).shape[1:])  # (H, I)
        for name in plan.quantized_linears():
            if name not in local:
                local[name] = tuple(layer.get_submodule(arch.to_memory(name)).weight.shape)
        shapes.update({f"model.layers.{i}.{named(n)}": shape for n, shape in local.items()})
    return shapes


def gptq_layout(out_features: int, in_features: int, bits: int, group_size: int) -> dict[str, tuple[tuple, torch.dtype]]:
    """Shape and dtype of each GPTQ v1 tensor of an (out, in) linear."""
    groups = 1 if group_size == -1 else -(-in_features // group_size)
    return {
        "qweight": ((in_features * bits // 32, out_features), torch.int32),
        "qzeros": ((groups, out_features * bits // 32), torch.int32),
        "scales": ((groups, out_features), torch.float16),
        "g_idx": ((in_features,), torch.int32),
    }


def verify(folder: str | Path) -> VerifyReport:
    """Run every check on ``folder``; the report lists each problem found (empty when sound)."""
    folder = Path(folder).expanduser()
    ckpt = Checkpoint(folder)  # a missing folder or config.json is an error, not a finding
    report = VerifyReport(folder=folder)
    problems = report.problems

    problems += check_tree(folder)
    found = check_manifest(folder)
    problems += found
    if not found:
        report.files = len(read_manifest(folder)[0]["files"])

    present = _check_index(ckpt, report)
    if present is None:
        return report
    qc = ckpt.quantization
    expected: dict[str, tuple[int, int]] = {}
    if qc is not None and not isinstance(qc, dict):
        problems.append(f"config.json's quantization_config is a {type(qc).__name__}, not an object")
        return report
    if qc is None:
        problems.append("config.json has no quantization_config: not a quantized checkpoint")
    elif qc.get("quant_method") != "gptq":
        # bitsandbytes, compressed-tensors: no GPTQ levels to check; each linear is read back through
        # its backend and checked as a weight (present where the table quantizes, finite, not all zero).
        _verify_other(ckpt, report, present)
        return report
    else:
        try:
            bits, group_size = settings(qc)
        except QuantMoeError as exc:
            problems.append(str(exc))
            return report
        if (folder / QUANTIZE_CONFIG).is_file() and _read_quantize_config(folder) != qc:
            problems.append(f"{QUANTIZE_CONFIG} differs from config.json's quantization_config")
        try:
            ckpt.check_layers()
            expected = expected_linears(model_config(ckpt), (qc.get("meta") or {}).get("layout", "source"))
            # Each module's own settings under the config's dynamic rules (--recipe); "-:" ones stay in 16 bits.
            own = {m: module_settings(qc, ckpt.stored_name(m)) for m in expected}
            expected = {m: shape for m, shape in expected.items() if own[m] is not None}
        except QuantMoeError as exc:
            problems.append(f"cannot derive the expected layout from config.json: {exc}")

    modules = set(quantized_modules(present))
    # Tensors of an unreadable shard were reported with the shard; don't report each again as missing.
    unreadable = {n[: n.rindex(".")] for n in set(ckpt.weight_map) - present} if report.shards < len(ckpt.shards) else set()
    if qc is not None:
        for module in expected:
            if module in modules or module in unreadable:
                continue
            problems.append(f"{module} is not quantized ({module}.weight kept)" if f"{module}.weight" in present
                            else f"{module} is missing from the checkpoint")
        for module in sorted(modules):
            if expected and module not in expected:
                problems.append(f"{module} is quantized but the architecture table keeps it in full precision "
                                "(a router or another module that must not be quantized)")
            parts = _read_parts(ckpt, module, present, problems)
            if parts is None:
                continue
            report.quantized_modules += 1
            try:
                bits, group_size = module_settings(qc, ckpt.stored_name(module)) or (bits, group_size)
            except QuantMoeError as exc:
                problems.append(str(exc))
                continue
            if module in expected and not _check_layout(module, parts, *expected[module], bits, group_size, problems):
                continue
            try:
                check_linear(module, parts, bits)  # what the layout check did not cover: never index outside
            except QuantMoeError as exc:
                problems.append(str(exc))
                continue
            _check_values(module, parts, bits, problems)

    _check_finite(ckpt, present - {f"{m}.{s}" for m in modules for s in GPTQ_SUFFIXES}, problems)
    if qc is not None and report.quantized_modules == 0:
        problems.append("no quantized module: the checkpoint says it is quantized, but no linear is stored "
                        "quantized")
    return report


def _read_quantize_config(folder: Path):
    try:
        return read_json(folder / QUANTIZE_CONFIG)
    except (OSError, ValueError):
        return None


def _verify_other(ckpt: Checkpoint, report: VerifyReport, present: set[str]) -> None:
    """The checks for a checkpoint of a non-GPTQ backend (``ckpt.format`` reads it)."""
    problems = report.problems
    try:
        arch = architecture_for(ckpt.config)
        ckpt.check_layers()
        expected = expected_linears(model_config(ckpt))
        if ckpt.format.name == "compressed-tensors":  # modules in its ignore list (--recipe) stay in 16 bits
            expected = {m: s for m, s in expected.items() if not ignored(ckpt.quantization, ckpt.stored_name(m))}
        # Other tools' unfused expert names (llm-compressor's experts.E.gate_proj) under the source's.
        linears = {_source_module(arch, m): lin for m, lin in ckpt.quantized_linears.items()}
    except QuantMoeError as exc:
        problems.append(str(exc))
        return
    for module in sorted(set(expected) - set(linears)):
        problems.append(f"{module} is not quantized ({module}.weight kept)" if f"{module}.weight" in present
                        else f"{module} is missing from the checkpoint")
    for module, linear in sorted(linears.items()):
        if module not in expected:
            problems.append(f"{module} is quantized but the architecture table keeps it in full precision "
                            "(a router or another module that must not be quantized)")
        if missing := [t for t in linear.tensors if t not in present]:
            problems.append(f"{module} lacks {', '.join(missing)}")
            continue
        try:
            weight = ckpt.format.dequantize(ckpt, linear)
        except NonFinite:
            problems.append(f"{module} holds NaN or Inf once dequantized")
            continue
        except (QuantMoeError, RuntimeError, ValueError) as exc:
            problems.append(f"{module} cannot be dequantized: {exc}")
            continue
        report.quantized_modules += 1
        want = expected.get(module, linear.shape)
        if tuple(weight.shape) != tuple(want):
            problems.append(f"{module} dequantizes to {tuple(weight.shape)}; the config needs {tuple(want)}")
        elif not bool(torch.isfinite(weight).all()):
            problems.append(f"{module} holds NaN or Inf once dequantized")
        elif not bool(weight.any()):
            problems.append(f"{module} is all zero once dequantized")
    stored = {t for linear in linears.values() for t in linear.tensors}
    _check_finite(ckpt, present - stored, problems)
    if report.quantized_modules == 0:
        problems.append("no quantized module: the checkpoint says it is quantized, but no linear could be read "
                        "back quantized")


def _source_module(arch, module: str) -> str:
    m = re.match(r"(model\.layers\.\d+\.)(.+)", module)
    return module if m is None else m.group(1) + arch.from_gptqmodel_name(m.group(2) + ".weight")[: -len(".weight")]


def _check_finite(ckpt: Checkpoint, names: set[str], problems: list[str]) -> None:
    """No NaN or Inf in any floating-point tensor of ``names`` (one tensor read at a time)."""
    for name in sorted(names):
        try:
            ckpt.tensor(name)  # reading checks it (Checkpoint.tensor: check_finite)
        except NonFinite:
            problems.append(f"{name} holds NaN or Inf")
        except QuantMoeError as exc:
            problems.append(str(exc))


def _check_index(ckpt: Checkpoint, report: VerifyReport) -> set[str] | None:
    """Tensors both listed in the index and present in their shard (None: no readable index)."""
    present: set[str] = set()
    try:
        weight_map = ckpt.weight_map
    except QuantMoeError as exc:
        report.problems.append(str(exc))
        return None
    for shard in ckpt.shards:
        try:
            keys = set(ckpt.shard_keys(shard))
        except QuantMoeError as exc:
            report.problems.append(str(exc))
            continue
        report.shards += 1
        listed = {n for n, s in weight_map.items() if s == shard}
        for name in sorted(listed - keys):
            report.problems.append(f"{name} is listed in the index but missing from {shard}")
        for name in sorted(keys - listed):
            report.problems.append(f"{shard} holds {name}, which the index does not list")
        present |= listed & keys
    report.tensors = len(present)
    return present


def _read_parts(ckpt: Checkpoint, module: str, present: set[str], problems: list[str]) -> dict | None:
    missing = [s for s in GPTQ_SUFFIXES if f"{module}.{s}" not in present]
    if missing:
        problems.append(f"{module} lacks {', '.join(missing)}")
        return None
    parts = {}
    for s in GPTQ_SUFFIXES:
        try:
            parts[s] = ckpt.tensor(f"{module}.{s}")
        except NonFinite:
            problems.append(f"{module}.{s} holds NaN or Inf")
            return None
        except QuantMoeError as exc:
            problems.append(str(exc))
            return None
    return parts


def _check_layout(module: str, parts: dict, rows: int, cols: int, bits: int, group_size: int,
                  problems: list[str]) -> bool:
    ok = True
    for suffix, (shape, dtype) in gptq_layout(rows, cols, bits, group_size).items():
        t = parts[suffix]
        if tuple(t.shape) != shape or t.dtype != dtype:
            problems.append(f"{module}.{suffix} is {t.dtype} {tuple(t.shape)}; the config "
                            f"({rows}x{cols}, {bits}-bit, group size {group_size}) needs {dtype} {shape}")
            ok = False
    if ok:
        groups = parts["scales"].shape[0]
        g = parts["g_idx"]
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= groups):
            problems.append(f"{module}.g_idx points outside its {groups} groups")
            ok = False
    return ok


def _check_values(module: str, parts: dict, bits: int, problems: list[str]) -> None:
    scales = parts["scales"]
    if not bool(torch.isfinite(scales).all()):
        problems.append(f"{module}.scales holds NaN or Inf")
    elif not bool(scales.any()):
        problems.append(f"{module} is all zero: every scale is 0 (an expert that saw no calibration tokens?)")
    elif dequantizes_to_zero(parts, bits):
        problems.append(f"{module} is all zero: its dequantized weight is 0 everywhere")
