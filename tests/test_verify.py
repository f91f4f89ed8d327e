"""``quantmoe verify`` passes a fresh export and catches each kind of damage on its own.

Each damaged copy is re-hashed into its manifest (except for the flipped byte), so the
check under test is the only one that can fire.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from clirun import cli_forked, one_error_line
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import make_model, write_text

import quantmoe
from quantmoe.apps.verify import verify
from quantmoe.base.files import MANIFEST, write_manifest
from quantmoe.base.options import LAYOUTS, QuantConfig
from quantmoe.formats.gptq_v1 import dequantize_linear, dequantizes_to_zero, pack_linear
from quantmoe.model.architectures import ARCHITECTURES
from quantmoe.model.checkpoint import Checkpoint

EXPERT = "model.layers.1.block_sparse_moe.experts.1.w2"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(model_type, layout) -> a fresh tiny export (built once each)."""
    root = tmp_path_factory.mktemp("verify")
    text = write_text(root / "docs.jsonl")
    models: dict[str, Path] = {}
    cache: dict[tuple[str, str], Path] = {}

    def build(model_type: str, layout: str = "source") -> Path:
        if (model_type, layout) not in cache:
            if model_type not in models:
                models[model_type] = make_model(model_type, root / model_type / "model")
            out = root / model_type / layout / "out"
            quantmoe.quantize(models[model_type], out, QuantConfig(group_size=32, layout=layout), calib=text,
                              nsamples=4, seqlen=32, run_eval=False, quiet=True)
            cache[model_type, layout] = out
        return cache[model_type, layout]

    return build


@pytest.fixture
def damaged(export, tmp_path):
    """A copy of the Mixtral export to damage."""
    return Path(shutil.copytree(export("mixtral"), tmp_path / "out"))


def shard_of(folder: Path, tensor: str) -> Path:
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def edit_tensor(folder: Path, name: str, edit) -> None:
    """Rewrite the shard holding ``name`` with ``edit(tensor)`` in its place, then re-hash the manifest."""
    shard = shard_of(folder, name)
    with safe_open(str(shard), framework="pt") as f:
        meta, tensors = f.metadata(), {n: f.get_tensor(n) for n in f.keys()}
    tensors[name] = edit(tensors[name].clone())
    save_file(tensors, str(shard), metadata=meta)
    rehash(folder)


def rehash(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest.pop("files")
    write_manifest(folder, manifest)


@pytest.mark.parametrize(("model_type", "layout"), [
    (m, layout) for m in sorted(ARCHITECTURES) for layout in LAYOUTS
    if layout == "source" or ARCHITECTURES[m].gptqmodel])  # GraniteMoE refuses the gptqmodel layout
def test_a_fresh_export_verifies(export, model_type, layout):
    report = verify(export(model_type, layout))
    assert report.problems == []
    names = Checkpoint(export(model_type, layout)).names()
    assert report.quantized_modules == sum(n.endswith(".qweight") for n in names) > 0 and report.files > 0


def test_flipped_byte_in_a_shard_is_caught(damaged):
    shard = shard_of(damaged, f"{EXPERT}.qweight")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # in the tensor data, past the header: only the hash can tell
    shard.write_bytes(bytes(data))
    assert verify(damaged).problems == [f"{shard.name}: sha256 differs from the manifest (file changed or corrupt)"]


# Two ways an expert ends up all zero: no scale, or every level on the zero point (sym int4: 8).
ZEROED = {
    "scales": ("scales", torch.zeros_like, "every scale is 0"),
    "levels": ("qweight", lambda t: torch.full_like(t, int.from_bytes(b"\x88" * 4, "little", signed=True)),
               "its dequantized weight is 0 everywhere"),
}


@pytest.mark.parametrize("how", sorted(ZEROED))
def test_all_zero_expert_is_caught(damaged, how):
    suffix, edit, message = ZEROED[how]
    edit_tensor(damaged, f"{EXPERT}.{suffix}", edit)
    assert verify(damaged).problems == [f"{EXPERT} is all zero: {message}" +
                                        (" (an expert that saw no calibration tokens?)" if how == "scales" else "")]


def _linear(bits: int, grouped: bool, make) -> dict[str, torch.Tensor]:
    """A GPTQ v1 linear (32 outputs, 64 inputs, groups of 16) whose levels, scales and zeros ``make`` edits;
    g_idx in quantmoe's order, or shuffled (each column its group still, in another order)."""
    g = torch.Generator().manual_seed(bits)
    R, C, G = 32, 64, 4
    q = torch.randint(0, 2**bits, (R, C), generator=g)
    scales = torch.rand(R, G, generator=g) + 0.1
    zeros = torch.randint(1, 2**bits, (R, G), generator=g)
    g_idx = torch.arange(C) // (C // G)
    if not grouped:
        g_idx = g_idx[torch.randperm(C, generator=g)]
    q, scales, zeros = make(q, scales, zeros, g_idx)
    return pack_linear(q, scales, zeros, g_idx, bits)


def _all_zero(q, scales, zeros, g_idx):  # every level on its zero point
    return zeros[:, g_idx], scales, zeros


def _zero_but_a_dead_group(q, scales, zeros, g_idx):  # levels off their zeros only where the scale is 0
    q, scales, zeros = _all_zero(q, scales, zeros, g_idx)
    q[:, g_idx == 2] = torch.where(zeros[:, 2:3] == 1, 2, 1)  # not the zero, on every row
    scales[:, 2] = 0
    return q, scales, zeros


def _one_level_off(q, scales, zeros, g_idx):  # one level off its zero in a live group
    q, scales, zeros = _all_zero(q, scales, zeros, g_idx)
    q[5, 7] = 0
    return q, scales, zeros


def _wrapped_zero(q, scales, zeros, g_idx):  # a zero of 0 is stored wrapped: loaders read 2**bits, no level's
    q, scales, zeros = _all_zero(q, scales, zeros, g_idx)
    zeros[3, 1] = 0
    return q, scales, zeros


LINEARS = {"random": lambda *a: a[:3], "all zero": _all_zero, "zero but a dead group": _zero_but_a_dead_group,
           "one level off": _one_level_off, "wrapped zero": _wrapped_zero}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "shuffled g_idx"])
@pytest.mark.parametrize("case", sorted(LINEARS))
def test_the_all_zero_check_reads_the_packed_levels_as_the_dequantized_weight(bits, grouped, case):
    """verify's all-zero check reads the packed words (a DeepSeek-V3 export's 45k expert linears each dequantized
    took hours of CPU): the same answer as the dequantized weight's, on every kind of linear."""
    parts = _linear(bits, grouped, LINEARS[case])
    expected = not bool(dequantize_linear(parts, bits).any())
    assert dequantizes_to_zero(parts, bits) == expected
    assert expected == (case in ("all zero", "zero but a dead group"))


def test_nan_is_caught(damaged):
    def poison(t):
        t[0] = float("nan")
        return t

    edit_tensor(damaged, "model.norm.weight", poison)
    assert verify(damaged).problems == ["model.norm.weight holds NaN or Inf"]


def test_shapes_are_checked_against_the_config(damaged):
    for name in ("config.json", "quantize_config.json"):
        cfg = json.loads((damaged / name).read_text())
        qc = cfg.get("quantization_config", cfg)
        qc["group_size"] = 16  # the tensors were packed with 32: twice as many groups expected
        (damaged / name).write_text(json.dumps(cfg))
    rehash(damaged)
    problems = verify(damaged).problems
    assert problems and all(".qzeros is" in p or ".scales is" in p for p in problems), problems
    assert (f"{EXPERT}.scales is torch.float16 (3, 64); the config (64x96, 4-bit, group size 16) needs "
            "torch.float16 (6, 64)") in problems


def test_index_entry_without_a_tensor_is_caught(damaged):
    index = damaged / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = data["weight_map"][f"{EXPERT}.qweight"]
    data["weight_map"]["model.layers.1.extra.weight"] = shard
    index.write_text(json.dumps(data))
    rehash(damaged)
    assert verify(damaged).problems == [f"model.layers.1.extra.weight is listed in the index but missing from {shard}"]


def test_cli_exit_status_and_output(damaged, export):
    edit_tensor(damaged, f"{EXPERT}.scales", torch.zeros_like)  # a copy: the export itself stays good
    good, bad, missing = cli_forked([["verify", export("mixtral")], ["verify", damaged],
                                     ["verify", damaged.parent / "nowhere"]], preload=("quantmoe.apps.verify",))
    assert good.returncode == 0 and good.stdout.startswith("ok: "), good.stderr
    assert bad.returncode == 1
    assert bad.stdout.splitlines() == [f"- {EXPERT} is all zero: every scale is 0 (an expert that saw no calibration tokens?)"]
    assert one_error_line(bad.stderr).startswith("error: 1 problem(s) found in")
    assert missing.returncode == 2 and "does not exist" in one_error_line(missing.stderr)
