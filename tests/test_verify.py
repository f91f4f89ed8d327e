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
