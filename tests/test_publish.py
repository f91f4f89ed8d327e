"""quantmoe push: validation of an export (manifest, stray files, config, model card), the
--dry-run listing, and one-line errors without network or without huggingface_hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantmoe.base.files import write_manifest
from quantmoe.base.options import QuantConfig
from quantmoe.cli import main
from quantmoe.stages.report import CARD_SECTIONS, base_model_name, model_card


@pytest.fixture(scope="module")
def export(tiny_rtn_export) -> Path:
    return tiny_rtn_export


@pytest.fixture
def copy(export, tmp_path) -> Path:
    dst = tmp_path / export.name
    shutil.copytree(export, dst)
    return dst


def push(*args):
    return CliRunner().invoke(main, ["push", *map(str, args)])


def test_dry_run_validates_and_lists_every_file(export):
    result = push(export, "someone/tiny-mixtral-rtn-int4", "--dry-run")
    assert result.exit_code == 0, result.output
    listed = json.loads((export / "manifest.json").read_text())["files"]
    for name in [*listed, "manifest.json"]:
        assert f"  {name} " in result.output
    assert f"would upload {len(listed) + 1} files" in result.output
    assert "dry run: nothing uploaded" in result.output


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    return result.stderr


def test_refuses_a_shard_with_one_byte_changed(copy):
    shard = copy / "model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) - 100] ^= 0x01
    shard.write_bytes(bytes(data))
    err = _one_line_error(push(copy, "someone/x", "--dry-run"))
    assert "model-00001-of-00001.safetensors: sha256 differs" in err and "--overwrite" in err


@pytest.mark.parametrize("stray, problem", [
    ("notes.txt", "notes.txt: not listed in the manifest (stray file)"),
    (".DS_Store", ".DS_Store: a hidden file (stray file"),  # hidden files are never part of an export
    ("extra/weights.bin", "extra/weights.bin: not listed in the manifest (stray file)"),
])
def test_refuses_a_stray_file(copy, stray, problem):
    (copy / stray).parent.mkdir(exist_ok=True)
    (copy / stray).write_text("not part of the export")
    err = _one_line_error(push(copy, "someone/x", "--dry-run"))
    assert problem in err and "move the stray files" in err


def test_refuses_a_card_that_does_not_say_how_to_load_with_gptqmodel(copy):
    card = copy / "README.md"
    text = card.read_text()
    card.write_text(text[: text.index("### GPTQModel")] + text[text.index("### quantmoe"):])
    manifest = json.loads((copy / "manifest.json").read_text())
    write_manifest(copy, {k: v for k, v in manifest.items() if k != "files"})  # consistent hashes: only the card is short
    err = _one_line_error(push(copy, "someone/x", "--dry-run"))
    assert "README.md does not state how to load it in GPTQModel" in err


def test_refuses_a_folder_that_is_not_a_quantized_export(copy):
    config = json.loads((copy / "config.json").read_text())
    del config["quantization_config"]
    (copy / "config.json").write_text(json.dumps(config))
    manifest = json.loads((copy / "manifest.json").read_text())
    write_manifest(copy, {k: v for k, v in manifest.items() if k != "files"})
    assert "config.json has no quantization_config" in _one_line_error(push(copy, "someone/x", "--dry-run"))


def test_model_card_states_everything_push_requires(export):
    card = (export / "README.md").read_text()
    for what, marker in CARD_SECTIONS.items():
        assert marker in card, what
    base = json.loads((export / "manifest.json").read_text())["base_model"]
    assert f"`{Path(base).name}` (mixtral)" in card and "| original |" in card and "calib.jsonl" in card
    assert "vllm serve" in card and "GPTQModel.load" in card and "quantmoe.load_quantized" in card
    assert "does not run this checkpoint's routed experts quantized" in card  # transformers: not for a MoE
    # a Hub download is named by its id, not by its cache folder
    hub = "/cache/huggingface/hub/models--mistralai--Mixtral-8x7B-v0.1/snapshots/0123abc"
    assert base_model_name(hub) == "mistralai/Mixtral-8x7B-v0.1"
    info = {"name": "x", "base_model": hub, "model_type": "mixtral", "version": "0",
            "quantization_config": json.loads((export / "config.json").read_text())["quantization_config"],
            "options": QuantConfig().to_dict(), "fallback_count": 0, "calibration": "c"}
    text = model_card(None, info)
    assert "base_model: mistralai/Mixtral-8x7B-v0.1" in text and "0123abc" not in text
    assert "## Perplexity" not in text  # no eval, no table: push refuses such a card


def test_push_without_network_is_one_line_error(export, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_not_a_real_token",
           "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-m", "quantmoe", "push", str(export), "someone/tiny-mixtral-rtn-int4"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: upload to someone/tiny-mixtral-rtn-int4 failed"), proc.stderr
    assert "uploading" in proc.stdout  # it validated and listed the files before trying


def test_push_without_huggingface_hub_names_the_extra(export, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    err = _one_line_error(push(export, "someone/x", "--dry-run"))
    assert "pip install 'quantmoe[hub]'" in err
