"""The shard writer: the sha256 it records of each shard is the file's, the manifest takes it instead of
reading the shard again, and the next layer file is read ahead on a second thread, one layer at most.
Beside the layers (BackgroundExport), it takes each layer file only once it is finished, writes the same
shards as after the layers, and ends when the run stops or reports its own failure."""

from __future__ import annotations

import threading
import time
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


def _exported_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def background(layers):
    """background(folder, done=0) -> the export of ``layers`` beside (imagined) layers; stopped after the test,
    whatever happened in it, so that no export is left waiting for a layer (the interpreter would wait too)."""
    ckpt, work = layers
    files = [layer_file(work, i) for i in range(LAYERS)]
    started: list[export.BackgroundExport] = []

    def start(folder: Path, done: int = 0) -> export.BackgroundExport:
        started.append(export.BackgroundExport(
            lambda into, finished: export.write_shards(ckpt, architecture_for(ckpt.config), files, into, 40_000,
                                                       layers=finished), folder, done))
        return started[-1]

    yield start
    for each in started:
        each.stop()


def _recorded_reads(monkeypatch) -> list[int]:
    """The index of each layer file the export reads, in order."""
    read: list[int] = []
    real_read = export.read_layer
    monkeypatch.setattr(export, "read_layer", lambda file: read.append(int(file.stem.rpartition("-")[2]))
                        or real_read(file))
    return read


def _until(condition, seconds: float = 30.0) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_beside_the_layers_each_layer_file_is_taken_once_finished_and_the_shards_are_the_same(layers, background,
                                                                                              tmp_path, monkeypatch):
    ckpt, work = layers
    after = tmp_path / "after"
    hashes = shards(ckpt, work, after)
    read = _recorded_reads(monkeypatch)
    (tmp_path / "beside").mkdir()
    (tmp_path / "beside" / "left-over").write_text("an earlier, stopped run's")
    background = background(tmp_path / "beside")
    for i in range(LAYERS):
        time.sleep(0.1)
        assert read == list(range(i)), "a layer file is read only once it is finished"
        background.layers.finished(i)
        assert _until(lambda: len(read) > i), f"layer {i} was finished but never read"
    assert background.result() == hashes
    assert _exported_files(tmp_path / "beside") == _exported_files(after)
    timings = background.timings()
    assert 0 <= timings["waiting_seconds"] <= timings["background_seconds"]  # how much: the next test


def test_a_stopped_run_ends_the_export_beside_it_and_removes_what_it_wrote(background, tmp_path):
    background = background(tmp_path / "beside")
    background.layers.finished(0)
    assert _until(lambda: (tmp_path / "beside").is_dir()
                  and any(p.name.startswith(".shard-") for p in (tmp_path / "beside").iterdir()))
    stopper = threading.Thread(target=background.stop)
    stopper.start()
    stopper.join(30)
    assert not stopper.is_alive(), "stop() waits for the export, which must end at its wait for layer 1"
    assert not (tmp_path / "beside").exists()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("quantmoe-export")]
    with pytest.raises(export.ExportStopped):
        background.result()


def test_an_export_beside_the_layers_that_fails_is_raised_by_check_once_it_has(layers, background, tmp_path):
    ckpt, work = layers
    file = layer_file(work, 1)
    original = file.read_bytes()
    file.write_bytes(original[:-4] + bytes(b ^ 0xFF for b in original[-4:]))
    try:
        background = background(tmp_path / "beside", done=1)  # layer 0 finished by an earlier run
        background.check()  # nothing failed yet: layer 1 is not finished
        background.layers.finished(1)

        def failed() -> bool:
            try:
                background.check()
            except QuantMoeError as exc:
                return f"{file.name} changed after it was written" in str(exc)
            return False

        assert _until(failed)
    finally:
        file.write_bytes(original)
    background.stop()
    assert not (tmp_path / "beside").exists()


def test_a_held_export_takes_no_layer_file_until_released(background, tmp_path, monkeypatch):
    """A layer that leaves the export no room in the host budget holds it back (FinishedLayers.hold): it takes
    no finished layer file until released, and the time held counts as waiting for the layers."""
    read = _recorded_reads(monkeypatch)
    background = background(tmp_path / "beside")
    background.layers.hold(True)
    for i in range(LAYERS):
        background.layers.finished(i)
    time.sleep(0.3)
    assert read == []
    background.layers.hold(False)
    background.result()
    assert read == list(range(LAYERS))


def test_the_export_waits_only_until_a_layer_may_be_taken():
    """waiting_seconds counts, of each wait, the part before the layer was finished (and not held back)."""
    layers = export.FinishedLayers(1)  # layer 0 finished by an earlier run
    layers.waited(0, time.perf_counter())
    assert layers.waiting_seconds == 0.0
    since = time.perf_counter()
    time.sleep(0.05)
    layers.finished(1)
    layers.waited(1, since)
    assert 0.05 <= layers.waiting_seconds < 5
    layers.waited(1, time.perf_counter())  # asked for once it was there: no wait
    first = layers.waiting_seconds
    layers.hold(True)
    since = time.perf_counter()
    layers.finished(2)  # finished, but held back
    time.sleep(0.05)
    layers.hold(False)
    layers.waited(2, since)
    assert layers.waiting_seconds - first >= 0.05
