"""Shared fixtures: tiny checkpoints per architecture row, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_model, write_text  # noqa: E402

from quantmoe.model.architectures import ARCHITECTURES  # noqa: E402

ARCH_NAMES = sorted(ARCHITECTURES)


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws its unseeded random inputs from the same state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("text") / "docs.jsonl")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(model_type) -> folder of a saved tiny checkpoint (cached per type)."""
    cache: dict[str, Path] = {}

    def build(model_type: str) -> Path:
        if model_type not in cache:
            cache[model_type] = make_model(model_type, tmp_path_factory.mktemp(model_type) / "model")
        return cache[model_type]

    return build


@pytest.fixture(scope="session")
def tiny_rtn_export(tiny_model, tmp_path_factory) -> Path:
    """A finished, evaluated RTN int4 export of the tiny Mixtral (manifest, card, eval_report.json):
    read it as it is; copy it before changing it."""
    from quantmoe.base.options import QuantConfig
    from quantmoe.stages.quantize import quantize

    base = tmp_path_factory.mktemp("tiny-export")
    write_text(base / "calib.jsonl", repeats=10)
    write_text(base / "heldout.jsonl", repeats=3)
    out = base / "tiny-mixtral-rtn-int4"
    quantize(tiny_model("mixtral"), out, QuantConfig(backend="rtn", group_size=32), calib=base / "calib.jsonl",
             nsamples=4, seqlen=32, device="cpu", eval_data=base / "heldout.jsonl", batch_size=4, quiet=True)
    return out


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
