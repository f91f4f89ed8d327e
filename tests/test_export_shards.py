"""The shard writer: the sha256 it records of each shard is the file's, the manifest takes it instead of
reading the shard again, and the next layer file is read ahead on a second thread, one layer at most."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from tiny import make_model

from quantmoe.base.errors import QuantMoeError
from quantmoe.base.files import file_hashes, sha256_file
from quantmoe.model.architectures import architecture_for, plan_layer
from quantmoe.model.checkpoint import Checkpoint
from quantmoe.stages import export
from quantmoe.stages.resume import layer_file, write_layer

LAYERS = 4


@pytest.fixture(scope="module")
def layers(tmp_path_factory) -> tuple[Checkpoint, Path]:
    """A tiny 4-layer Mixtral and a work folder with a finished (random) GPTQ layer file for each layer."""
    root = tmp_path_factory.mktemp("export-shards")
    ckpt = Checkpoint(make_model("mixtral", root / "model", num_hidden_layers=LAYERS))
    arch = architecture_for(ckpt.config)
    gen = torch.Generator().manual_seed(0)
    (root / "work" / "layers").mkdir(parents=True)
    for i in range(LAYERS):
        tensors = {}
        for linear in plan_layer(arch, ckpt.config, i).quantized_linears():
            name = ckpt.layer_prefix(i) + linear
            tensors |= {f"{name}.qweight": torch.randint(0, 2**31 - 1, (8, 96), dtype=torch.int32, generator=gen),
                        f"{name}.qzeros": torch.randint(0, 2**31 - 1, (2, 12), dtype=torch.int32, generator=gen),
                        f"{name}.scales": torch.rand(2, 96, generator=gen).half(),
                        f"{name}.g_idx": (torch.arange(64) // 32).int()}
        write_layer(root / "work", i, tensors, {"index": i}, "fp")
    return ckpt, root / "work"


def shards(ckpt: Checkpoint, work: Path, folder: Path) -> dict[str, str]:
    files = [layer_file(work, i) for i in range(LAYERS)]
    return export.write_shards(ckpt, architecture_for(ckpt.config), files, folder, max_shard_size=40_000)


def test_each_shard_hash_recorded_is_the_files(layers, tmp_path):
    ckpt, work = layers
    hashes = shards(ckpt, work, tmp_path)
    written = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(written) > 2 and sorted(hashes) == written  # several shards, each recorded under its final name
    assert hashes == {name: sha256_file(tmp_path / name) for name in written}
    assert not list(tmp_path.glob(".*"))  # no temp name left behind


def test_the_manifest_reads_only_the_files_it_has_no_hash_for(tmp_path, monkeypatch):
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(b"shard")
    (tmp_path / "config.json").write_text("{}")
    read = []
    monkeypatch.setattr("quantmoe.base.files.sha256_file", lambda p: read.append(p.name) or "hashed-here")
    listed = file_hashes(tmp_path, {"model-00001-of-00001.safetensors": "recorded"})
    assert listed == {"config.json": {"sha256": "hashed-here", "bytes": 2},
                      "model-00001-of-00001.safetensors": {"sha256": "recorded", "bytes": 5}}
    assert read == ["config.json"]
    assert file_hashes(tmp_path)["model-00001-of-00001.safetensors"]["sha256"] == "hashed-here"  # none recorded


def test_the_next_layer_is_read_on_another_thread_one_layer_ahead_at_most(layers, tmp_path, monkeypatch):
    ckpt, work = layers
    events: list[tuple[str, int]] = []
    threads = set()
    real_read, real_tensors = export.read_layer, export.layer_tensors

    def read(file: Path):
        threads.add(threading.get_ident())
        events.append(("read", int(file.stem.rpartition("-")[2])))
        return real_read(file)

    def tensors(ckpt, arch, index, *args, **kwargs):
        events.append(("used", index))
        return real_tensors(ckpt, arch, index, *args, **kwargs)

    monkeypatch.setattr(export, "read_layer", read)
    monkeypatch.setattr(export, "layer_tensors", tensors)
    shards(ckpt, work, tmp_path)
    assert threading.get_ident() not in threads
    assert [i for kind, i in events if kind == "read"] == list(range(LAYERS))
    for k in range(2, LAYERS):  # when layer k is read, every layer before k - 1 is written
        used = {i for kind, i in events[:events.index(("read", k))] if kind == "used"}
        assert set(range(k - 1)) <= used, events


@pytest.mark.parametrize("edited", [0, 2])  # 2: read ahead while layer 1 is written
def test_a_layer_file_edited_after_it_was_logged_stops_the_export(layers, tmp_path, edited):
    ckpt, work = layers
    file = layer_file(work, edited)
    original = file.read_bytes()
    data = bytearray(original)
    data[-4] ^= 0xFF  # in the tensor data
    file.write_bytes(bytes(data))
    try:
        with pytest.raises(QuantMoeError, match=f"{file.name} changed after it was written"):
            shards(ckpt, work, tmp_path)
    finally:
        file.write_bytes(original)
    assert not list(tmp_path.glob("model-*.safetensors"))  # no shard took its final name
