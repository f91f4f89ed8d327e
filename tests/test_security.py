"""Untrusted checkpoints and shared machines (issue 23): one test per case of the audit, each through
the real command line, plus hostile inputs the audit did not list (SECURITY.md names them).

Every refusal is one ``error:`` line, a non-zero exit, no traceback, and nothing already written is
changed. Commands run in this process (click's runner: fast) unless what is checked needs a real
process: a terminal prompt, a second process holding a lock.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from clirun import cli, digest, one_error_line, time_limit
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import make_model, write_text

import quantmoe
from quantmoe.apps.verify import verify
from quantmoe.base.files import MANIFEST, write_manifest
from quantmoe.base.options import QuantConfig
from quantmoe.cli import main
from quantmoe.model.checkpoint import Checkpoint
from quantmoe.stages.quantize import work_dir
from quantmoe.stages.resume import layer_file

EXPERT = "model.layers.1.block_sparse_moe.experts.2.w2"
SECRET = "hf_s3cretT0kenThatMustNeverLeave"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Mixtral, calibration and eval text, a secret outside every model folder (a stand-in for
    ~/.cache/huggingface/token), and a finished rtn export of the model."""
    root = tmp_path_factory.mktemp("security")
    w = {"root": root, "model": make_model("mixtral", root / "model"), "text": write_text(root / "docs.jsonl"),
         "short": write_text(root / "short.jsonl", repeats=3), "secret": root / "hf-token"}
    w["secret"].write_text(SECRET)
    w["export"] = root / "export"
    quantmoe.quantize(w["model"], w["export"], QuantConfig(backend="rtn", group_size=32), calib=w["text"],
                      nsamples=4, seqlen=32, run_eval=False, quiet=True)
    return w


def rtn(w) -> list[str]:
    """The quickest recipe: rtn on the tiny model, no eval."""
    return ["--backend", "rtn", "--calib", str(w["text"]), "--nsamples", "4", "--seqlen", "32", "--group-size", "32",
            "--no-eval", "--quiet"]




def run(*args, limit: float = 120):
    """``quantmoe ARGS`` in this process, within ``limit`` seconds."""
    with time_limit(limit):
        return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result, status: int = 2) -> str:
    """The one ``error:`` line of a command that failed cleanly with ``status`` (no traceback; ``note:``
    lines said on the way are fine)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"not a clean error: {type(result.exception).__name__}: {result.exception}"
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert result.exit_code == status and len(lines) == 1 and lines[0].startswith("error: "), \
        f"status {result.exit_code}, stderr:\n{result.stderr}"
    assert "internal error" not in lines[0], lines[0]  # a check named the problem, not the catch-all
    return lines[0]


def copy_model(w, folder: Path) -> Path:
    return Path(shutil.copytree(w["model"], folder))


def copy_export(w, folder: Path) -> Path:
    return Path(shutil.copytree(w["export"], folder))


def edit_shard(folder: Path, edit) -> None:
    """Rewrite a single-shard folder's tensors with ``edit(tensors)`` (in place)."""
    shard = next(folder.glob("*.safetensors"))
    with safe_open(str(shard), framework="pt") as f:
        meta, tensors = f.metadata(), {n: f.get_tensor(n) for n in f.keys()}
    edit(tensors)
    save_file(tensors, str(shard), metadata=meta)


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def rehash(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest.pop("files")
    write_manifest(folder, manifest)


def no_secret_under(folder: Path) -> bool:
    return not any(SECRET.encode() in p.read_bytes() for p in Path(folder).rglob("*")
                   if p.is_file() and not p.is_symlink())


# ---------------------------------------------------------------------------------------------
# High: side files linked out of the model folder; --overwrite deleting any folder


@pytest.mark.parametrize("name", ["generation_config.json", "chat_template.jinja", "special_tokens_map.json",
                                  "tokenizer.json"])
def test_a_side_file_linked_out_of_the_model_folder_is_refused_not_copied(world, tmp_path, name):
    model = copy_model(world, tmp_path / "model")
    target = world["secret"]
    if name == "tokenizer.json":  # a real tokenizer, kept outside: still not read
        target = Path(shutil.copy(model / name, tmp_path / "outside-tokenizer.json"))
    (model / name).unlink(missing_ok=True)
    (model / name).symlink_to(target)
    out = tmp_path / "out"
    line = error_line(run("quantize", model, "--out", out, *rtn(world)))
    assert f"{model / name} links outside the model folder" in line and "replace the link with a copy" in line
    assert not out.exists() and not work_dir(out).exists()
    assert no_secret_under(tmp_path)


def test_a_data_folder_file_linked_out_of_it_is_refused_and_nothing_is_written(world, tmp_path):
    """A stranger's folder of text for calibrate or eval: a link in it to a file of this machine (a token) would be read
    into calibration tokens (a file that gets shared) or an eval; it is refused, naming the link. Links inside it read."""
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copyfile(world["text"], folder / "docs.jsonl")
    (folder / "notes.txt").symlink_to(world["secret"])
    out = tmp_path / "tokens.safetensors"
    line = error_line(run("calibrate", "--tokenizer", world["model"], "--data", folder, "--nsamples", "2", "--seqlen",
                          "16", "--out", out))
    assert f"{folder / 'notes.txt'} links outside the data folder" in line and not out.exists()
    line = error_line(run("eval", world["model"], "--data", folder, "--seqlen", "32", "--device", "cpu", "--quiet"))
    assert "links outside the data folder" in line
    (folder / "notes.txt").unlink()
    (folder / "again.jsonl").symlink_to("docs.jsonl")
    result = run("calibrate", "--tokenizer", world["model"], "--data", folder, "--nsamples", "2", "--seqlen", "16",
                 "--out", out)
    assert result.exit_code == 0 and out.is_file(), result.stderr


def test_a_side_file_that_is_not_json_is_refused_and_json_ones_are_written_anew(world, tmp_path):
    model = copy_model(world, tmp_path / "model")
    (model / "generation_config.json").write_text(SECRET)  # a regular file inside the folder, but not JSON
    out = tmp_path / "out"
    line = error_line(run("quantize", model, "--out", out, *rtn(world)))
    assert "generation_config.json is not valid JSON" in line
    assert not out.exists() and not (work_dir(out) / "export").exists()
    generation = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    (model / "generation_config.json").write_text(json.dumps(generation, separators=(",", ":")))
    assert run("quantize", model, "--out", out, *rtn(world)).exit_code == 0
    assert (out / "generation_config.json").read_text() == json.dumps(generation, indent=2) + "\n"


@pytest.mark.parametrize("where", ["a project folder", "the current folder (--out .)"])
def test_overwrite_never_deletes_a_folder_that_quantmoe_did_not_write(world, tmp_path, monkeypatch, where):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('my work')\n")
    (project / "notes.md").write_text("do not delete\n")
    before = digest(project)
    if where.startswith("the current"):
        monkeypatch.chdir(project)
    out = "." if where.startswith("the current") else project
    line = error_line(run("quantize", world["model"], "--out", out, "--overwrite", *rtn(world)))
    assert f"--out {project} is not an output folder of quantmoe" in line and "nothing was deleted" in line
    assert digest(project) == before


def test_overwrite_replaces_an_earlier_export(world, tmp_path):
    out = copy_export(world, tmp_path / "out")
    (out / "stale.txt").write_text("from an earlier run")  # replaced with the rest of the folder
    rehash(out)
    result = run("quantize", world["model"], "--out", out, "--overwrite", *rtn(world))
    assert result.exit_code == 0, result.stderr
    assert not (out / "stale.txt").exists() and verify(out).ok


def test_compare_never_replaces_a_backend_folder_it_did_not_write(world, tmp_path):
    out = tmp_path / "compare"
    (out / "rtn-int4").mkdir(parents=True)
    (out / "rtn-int4" / "results.csv").write_text("mine\n")
    line = error_line(run("compare", world["model"], "--backends", "rtn-int4", "--out", out, "--data", world["short"],
                          "--seqlen", "32", "--calib", world["text"], "--nsamples", "4", "--device", "cpu"))
    assert f"{out / 'rtn-int4'} is not an output folder of quantmoe" in line
    assert (out / "rtn-int4" / "results.csv").read_text() == "mine\n"


# ---------------------------------------------------------------------------------------------
# Medium: the checkpoint's own code; work folders; index entries out of the folder; push; paths


EVIL_CODE = """
from pathlib import Path
Path({marker!r}).write_text("the checkpoint's code ran")
from transformers import PretrainedConfig, PreTrainedTokenizerFast
class EvilConfig(PretrainedConfig):
    model_type = "evil_moe"
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _evil(folder: Path, marker: Path) -> None:
    (folder / "configuration_evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    (folder / "tokenization_evil.py").write_text(EVIL_CODE.format(marker=str(marker)))


def test_a_checkpoints_own_code_never_runs_even_when_the_user_would_say_yes(tmp_path):
    model, marker = tmp_path / "evil", tmp_path / "ran"
    model.mkdir()
    _evil(model, marker)
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil_moe", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    proc = cli("quantize", model, "--out", tmp_path / "out", input="y\n", timeout=300)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2
    assert "exists only as the checkpoint's own Python code (auto_map), which quantmoe never runs" in line
    assert not marker.exists() and "Do you wish to run the custom code" not in proc.stdout + proc.stderr


def test_a_known_model_type_with_an_auto_map_is_read_with_transformers_own_class(world, tmp_path, capsys):
    model, marker = copy_model(world, tmp_path / "model"), tmp_path / "ran"
    _evil(model, marker)
    edit_json(model / "config.json", lambda c: c.update(auto_map={"AutoConfig": "configuration_evil.EvilConfig"}))
    edit_json(model / "tokenizer_config.json", lambda c: c.update(
        tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}))
    ckpt = Checkpoint(model)
    assert type(ckpt.config).__name__ == "MixtralConfig"
    try:
        ckpt.tokenizer()
    except quantmoe.QuantMoeError as exc:  # refusing the custom tokenizer is fine too; running it is not
        assert "cannot load the tokenizer" in str(exc)
    assert not marker.exists()
    assert "names its own Python code (auto_map); quantmoe never runs" in capsys.readouterr().err


def _stopped_before_export(w, model: Path, out: Path, monkeypatch) -> Path:
    """Quantize until every layer is finished, then stop (as a crash would) before the export is in place
    (where the run waits for the export written beside the layers)."""
    import quantmoe.stages.quantize as pipeline

    def crash(*args, **kwargs):
        raise RuntimeError("stopped before the export")

    with monkeypatch.context() as m:
        m.setattr(pipeline.BackgroundExport, "result", crash)
        with pytest.raises(RuntimeError, match="stopped before the export"):
            quantmoe.quantize(model, out, QuantConfig(backend="rtn", group_size=32), calib=w["text"], nsamples=4,
                              seqlen=32, run_eval=False, quiet=True)
    work = work_dir(out)
    layers = Checkpoint(model).config.num_hidden_layers
    assert len(list((work / "layers").glob("layer-*.json"))) == layers  # every layer finished
    assert not (work / "export").exists()
    return work


def test_a_layer_file_edited_on_disk_is_computed_again_never_resumed_from(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    work = _stopped_before_export(world, world["model"], out, monkeypatch)
    assert stat.S_IMODE(work.stat().st_mode) == 0o700, "the work folder must be private to its owner"

    def scales_times_minus_7(tensors):
        for name in tensors:
            if name.endswith(".scales"):
                tensors[name] = tensors[name] * -7

    edit_shard_file = layer_file(work, 0)
    with safe_open(str(edit_shard_file), framework="pt") as f:
        meta, tensors = f.metadata(), {n: f.get_tensor(n) for n in f.keys()}
    scales_times_minus_7(tensors)
    save_file(tensors, str(edit_shard_file), metadata=meta)  # the same fingerprint: only the hash can tell
    capsys.readouterr()
    quantmoe.quantize(world["model"], out, QuantConfig(backend="rtn", group_size=32), calib=world["text"], nsamples=4,
                      seqlen=32, run_eval=False, quiet=True)
    assert "is not the file its run wrote" in capsys.readouterr().err
    assert digest(out)["model-00001-of-00001.safetensors"] == digest(world["export"])["model-00001-of-00001.safetensors"]
    assert verify(out).ok


def test_a_source_whose_weights_changed_at_the_same_config_and_sizes_is_quantized_again_not_resumed(
        world, tmp_path, monkeypatch):
    """A checkpoint replaced in place by another of one config and the same shard sizes (a fine-tune of the same base)
    is another source: a stopped run's layers are not resumed from, and the export is that of the new weights."""
    model = copy_model(world, tmp_path / "model")
    out = tmp_path / "out"
    _stopped_before_export(world, model, out, monkeypatch)
    tuned = make_model("mixtral", tmp_path / "tuned", seed=1)
    assert (tuned / "config.json").read_bytes() == (model / "config.json").read_bytes()
    assert (tuned / "model.safetensors").stat().st_size == (model / "model.safetensors").stat().st_size
    shutil.copyfile(tuned / "model.safetensors", model / "model.safetensors")
    fresh = tmp_path / "fresh"
    for target in (out, fresh):
        quantmoe.quantize(model, target, QuantConfig(backend="rtn", group_size=32), calib=world["text"], nsamples=4,
                          seqlen=32, run_eval=False, quiet=True)
    shard = "model-00001-of-00001.safetensors"
    assert digest(out)[shard] == digest(fresh)[shard] != digest(world["export"])[shard]


def test_a_layer_file_edited_after_the_resume_check_is_never_exported(world, tmp_path, monkeypatch):
    """The export reads each layer file again: its hash is checked there too."""
    import quantmoe.stages.export as export
    from quantmoe.stages.resume import read_layer

    out = tmp_path / "out"
    work = _stopped_before_export(world, world["model"], out, monkeypatch)

    def tampered(file):
        data = bytearray(file.read_bytes())
        data[-4] ^= 0xFF  # in the tensor data
        # Replaced whole, as an editor saves a file: the export reads beside the layers, and the resumed run's
        # replay may have the same file mapped (a file cut short under a mapping is a bus error, not an edit).
        edited = file.with_name(file.name + ".edited")
        edited.write_bytes(bytes(data))
        os.replace(edited, file)
        return read_layer(file)

    monkeypatch.setattr(export, "read_layer", tampered)
    line = error_line(run("quantize", world["model"], "--out", out, *rtn(world)))
    assert f"{layer_file(work, 0)} changed after it was written" in line
    assert not out.exists()


@pytest.fixture
def another_user(monkeypatch):
    """make(path) gives path to another user: chown when running as root, else this process stops
    recognising its own uid."""
    def make(path: Path) -> None:
        if os.geteuid() == 0:
            for p in [path, *path.rglob("*")]:
                os.chown(p, 65534, 65534, follow_symlinks=False)
        else:
            uid = os.getuid()
            monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    return make


def test_a_work_folder_planted_by_another_user_is_refused_never_trusted(world, tmp_path, another_user):
    out = tmp_path / "out"
    work = work_dir(out)
    (work / "layers").mkdir(parents=True)
    (work / "layers" / "layer-00000.json").write_text('{"planted": true}')
    another_user(work)
    before = digest(work)
    line = error_line(run("quantize", world["model"], "--out", out, *rtn(world)))
    assert f"the work folder {work} belongs to another user" in line and "neither trusts nor deletes it" in line
    assert digest(work) == before and not out.exists()


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(world, tmp_path):
    """Run A stops (on purpose) inside its export until told to go on; run B on the same --out is
    refused with A's pid, and A then finishes a sound export."""
    out, go = tmp_path / "out", tmp_path / "go"
    held = f"""
import sys, time
from pathlib import Path
import quantmoe.stages.quantize as pipeline
real = pipeline.export_checkpoint
def export_checkpoint(*args, **kwargs):
    Path({str(tmp_path / 'waiting')!r}).write_text("")
    while not Path({str(go)!r}).exists():
        time.sleep(0.05)
    return real(*args, **kwargs)
pipeline.export_checkpoint = export_checkpoint
from quantmoe.cli import main
main(sys.argv[1:], prog_name="quantmoe")
"""
    args = ["quantize", str(world["model"]), "--out", str(out), *rtn(world)]
    first = subprocess.Popen([sys.executable, "-c", held, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "waiting").exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = cli(*args)
        line = one_error_line(second.stderr)
        assert second.returncode == 2
        assert f"another quantmoe run (pid {first.pid}) is writing this --out" in line
    finally:
        go.write_text("")
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert verify(out).ok and not work_dir(out).exists()


def test_the_lock_of_a_failed_call_in_this_process_does_not_block_the_next(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _stopped_before_export(world, world["model"], out, monkeypatch)  # its lock stays with the traceback
    assert run("quantize", world["model"], "--out", out, *rtn(world)).exit_code == 0
    assert verify(out).ok


@pytest.mark.parametrize("shard", ["../outside.safetensors", "ABSOLUTE", "sub/model.safetensors"])
def test_an_index_entry_pointing_out_of_the_model_folder_is_refused(world, tmp_path, shard):
    model = copy_model(world, tmp_path / "model")
    target = {"../outside.safetensors": tmp_path / "outside.safetensors", "ABSOLUTE": tmp_path / "abs.safetensors",
              "sub/model.safetensors": model / "sub" / "model.safetensors"}[shard]
    target.parent.mkdir(exist_ok=True)
    names = list(load_file(model / "model.safetensors"))
    os.replace(model / "model.safetensors", target)
    entry = str(target) if shard == "ABSOLUTE" else shard
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: entry for n in names}}))
    out = tmp_path / "out"
    line = error_line(run("quantize", model, "--out", out, *rtn(world)))
    assert f"{entry!r} is not a plain file name in the model folder" in line
    assert not out.exists()


def test_a_shard_linked_out_of_the_model_folder_is_refused(world, tmp_path):
    model = copy_model(world, tmp_path / "model")
    os.replace(model / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (model / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    line = error_line(run("quantize", model, "--out", tmp_path / "out", *rtn(world)))
    assert f"{model / 'model.safetensors'} links outside the model folder" in line


def test_a_hub_cache_snapshot_whose_files_link_into_its_blobs_is_read(world, tmp_path):
    """What must keep working: the Hub cache stores a snapshot's files as links into ../../blobs."""
    repo = tmp_path / "hub" / "models--someorg--tiny-moe"
    snapshot, blobs = repo / "snapshots" / "0123abcd", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in world["model"].iterdir():
        shutil.copy(f, blobs / f"blob-{f.name}")
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / f"blob-{f.name}")
    out = tmp_path / "out"
    result = run("quantize", snapshot, "--out", out, *rtn(world))
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / MANIFEST).read_text())["base_model"] == "someorg/tiny-moe"
    assert "base_model: someorg/tiny-moe" in (out / "README.md").read_text()
    assert verify(out).ok


def test_a_nan_in_a_source_tensor_stops_quantize_naming_the_tensor(world, tmp_path):
    model = copy_model(world, tmp_path / "model")

    def poison(tensors):
        tensors[f"{EXPERT}.weight"][3] = float("nan")

    edit_shard(model, poison)
    earlier = copy_export(world, tmp_path / "earlier")
    before = digest(earlier)
    line = error_line(run("quantize", model, "--out", earlier, "--overwrite", *rtn(world)))
    assert f"tensor {EXPERT}.weight of {model} holds NaN or Inf" in line
    assert digest(earlier) == before


@pytest.fixture
def export_copy(tiny_rtn_export, tmp_path) -> Path:
    """A copy of conftest's evaluated export (model card, eval report): what push takes."""
    return Path(shutil.copytree(tiny_rtn_export, tmp_path / tiny_rtn_export.name))


def push(folder: Path):
    return run("push", folder, "someone/tiny", "--dry-run")


def test_push_runs_verify_first_and_refuses_a_nan(export_copy):
    assert push(export_copy).exit_code == 0

    def poison(tensors):
        tensors["model.norm.weight"][0] = float("nan")

    edit_shard(export_copy, poison)
    rehash(export_copy)  # the manifest agrees with the damaged file: only verify's checks can tell
    line = error_line(push(export_copy))
    assert "refusing to push" in line and "model.norm.weight holds NaN or Inf" in line


def test_published_files_name_sources_without_local_paths(tiny_rtn_export):
    """conftest's export was made from folders under a temp dir, with eval: nothing in it names them."""
    local = [str(tiny_rtn_export.parent), str(Path.home()), "/tmp/"]
    for path in tiny_rtn_export.iterdir():
        text = path.read_bytes().decode("utf-8", errors="replace")
        assert not any(p in text for p in local), f"{path.name} holds a local path"
    manifest = json.loads((tiny_rtn_export / MANIFEST).read_text())
    report = json.loads((tiny_rtn_export / "eval_report.json").read_text())
    assert manifest["base_model"] == "model" and manifest["calibration"]["source"] == "calib.jsonl"
    assert (report["model"], report["baseline"], report["data"]["path"]) == (tiny_rtn_export.name, "model",
                                                                              "heldout.jsonl")


def test_record_paths_keeps_full_paths_for_private_use(world, tmp_path):
    out = tmp_path / "out"
    assert run("quantize", world["model"], "--out", out, "--record-paths", *rtn(world)).exit_code == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["base_model"] == str(world["model"].resolve())
    assert manifest["calibration"]["source"] == str(world["text"])
    log = json.loads((out / "quantization_log.json").read_text())
    assert log["base_model"] == str(world["model"].resolve())


def test_an_eval_report_names_models_and_data_without_local_paths(world, tmp_path):
    report = tmp_path / "r.json"
    result = run("eval", world["export"], "--baseline", world["model"], "--data", world["short"], "--seqlen", "32",
                 "--device", "cpu", "--quiet", "--report", report)
    assert result.exit_code == 0, result.stderr
    text = report.read_text() + report.with_suffix(".md").read_text()
    assert str(world["root"]) not in text and "/tmp/" not in text
    data = json.loads(report.read_text())
    assert (data["model"], data["baseline"], data["data"]["path"]) == ("export", "model", "short.jsonl")


# ---------------------------------------------------------------------------------------------
# Low: one error line instead of a traceback


def _config(**changes):
    def make(w, tmp: Path) -> list:
        model = copy_model(w, tmp / "model")
        edit_json(model / "config.json", lambda c: c.update(changes))
        return ["quantize", model]
    return make


def _model_edit(edit):
    def make(w, tmp: Path) -> list:
        model = copy_model(w, tmp / "model")
        edit(model)
        return ["quantize", model]
    return make


def _flatten_expert(model: Path) -> None:
    def flatten(tensors):
        tensors[f"{EXPERT}.weight"] = tensors[f"{EXPERT}.weight"].flatten().contiguous()
    edit_shard(model, flatten)


def _transpose_norm(model: Path) -> None:
    def cut(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"][:10].contiguous()
    edit_shard(model, cut)


def _index(content: str):
    def edit(model: Path) -> None:
        (model / "model.safetensors.index.json").write_text(content)
    return edit


def _calibration(line: str):
    def make(w, tmp: Path) -> list:
        (tmp / "calib.jsonl").write_text(line + "\n")
        return ["quantize", w["model"], "--calib", tmp / "calib.jsonl"]
    return make


def _options(*options):
    def make(w, tmp: Path) -> list:
        return ["quantize", w["model"], *options]
    return make


# case -> (builds the command's start; a fragment its error line must hold). Every quantize case
# runs with the rtn recipe against `--out <a copy of the finished export> --overwrite`.
QUANTIZE_CASES = {
    "a NaN source tensor": (_model_edit(lambda m: edit_shard(m, lambda t: t[f"{EXPERT}.weight"].fill_(float("inf")))),
                            f"tensor {EXPERT}.weight of"),
    "a linear weight of the wrong rank": (_model_edit(_flatten_expert), f"{EXPERT}.weight has shape [6144]; a linear "
                                                                        "weight has 2 dimensions"),
    "a norm of the wrong shape": (_model_edit(_transpose_norm), "model.norm.weight in"),
    "num_attention_heads 0": (_config(num_attention_heads=0), "num_attention_heads = 0 is not an integer from 1"),
    "hidden_size 10**9": (_config(hidden_size=10**9), "hidden_size = 1000000000 is not an integer from 1"),
    "hidden_size 1e9 (a float)": (_config(hidden_size=1e9), "hidden_size = 1000000000.0 is not an integer"),
    "num_hidden_layers 10**9": (_config(num_hidden_layers=10**9), "num_hidden_layers = 1000000000 is not an integer"),
    "num_hidden_layers beyond the weights": (_config(num_hidden_layers=7), "says num_hidden_layers = 7, but the "
                                                                            "weights hold 2 decoder layers"),
    "num_experts_per_tok beyond the experts": (_config(num_experts_per_tok=5), "num_experts_per_tok = 5 is not a "
                                                                                "number of experts per token"),
    "config.json is a JSON list": (_model_edit(lambda m: (m / "config.json").write_text("[1, 2]")),
                                   "config.json holds a JSON list, not an object"),
    "quantization_config is a list": (_config(quantization_config=[1]), "quantization_config is a JSON list"),
    "the index is a JSON list": (_model_edit(_index("[]")), "model.safetensors.index.json is unreadable"),
    "weight_map is a list": (_model_edit(_index('{"weight_map": ["model.safetensors"]}')),
                             "model.safetensors.index.json is unreadable"),
    "calibration text that is not a string": (_calibration('{"text": 42}'), 'calib.jsonl:1: "text" is a JSON int, '
                                                                            "not a string"),
    "negative --nsamples": (_options("--nsamples", "-1"), "--nsamples -1 is invalid"),
    "negative --seqlen": (_options("--seqlen", "-5"), "--seqlen -5 is invalid"),
    "negative --batch-size": (_options("--batch-size", "-2"), "--batch-size -2 is invalid"),
    # Not in the audit's list:
    "a FIFO named tokenizer.json (reading it would block)": (_model_edit(
        lambda m: ((m / "tokenizer.json").unlink(), os.mkfifo(m / "tokenizer.json"))), "is not a regular file"),
    "a shard name with a NUL byte": (_model_edit(_index('{"weight_map": {"lm_head.weight": "a\\u0000b"}}')),
                                     "is not a plain file name in the model folder"),
    "a config.json larger than any checkpoint's": (_model_edit(
        lambda m: os.truncate(m / "config.json", 65 * 2**20)), "config.json is larger than 64 MiB"),
    "a --seed torch cannot take": (_options("--seed", str(2**70)), "--seed 1180591620717411303424 is out of range"),
    "a work folder that is a link": (None, "is a link, not a work folder"),
}


@pytest.mark.parametrize("case", sorted(QUANTIZE_CASES))
def test_bad_quantize_input_is_one_line_and_damages_nothing(world, tmp_path, case):
    build, fragment = QUANTIZE_CASES[case]
    earlier = copy_export(world, tmp_path / "earlier")
    if build is None:  # the link case: the work folder beside --out points at a folder of the victim's
        victim = tmp_path / "victim"
        victim.mkdir()
        (victim / "keep.txt").write_text("mine")
        work_dir(earlier).symlink_to(victim)
        start = ["quantize", world["model"]]
    else:
        start = build(world, tmp_path)
    before = digest(earlier)
    options = rtn(world)
    for given in [a for a in start[2:] if str(a).startswith("--")]:  # a case's own option wins over the recipe's
        at = options.index(given) if given in options else -1
        if at >= 0:
            del options[at:at + 2]
    line = error_line(run(*start, "--out", earlier, "--overwrite", *options, limit=120))
    assert fragment in line, line
    assert digest(earlier) == before
    if build is None:
        assert (tmp_path / "victim" / "keep.txt").read_text() == "mine"


def _quantization(**changes):
    def edit(folder: Path) -> None:
        def change(config):
            q = config["quantization_config"]
            for key, value in changes.items():
                q.pop(key) if value is None else q.__setitem__(key, value)
        edit_json(folder / "config.json", change)
    return edit


def _g_idx(shift: int):
    def edit(folder: Path) -> None:
        edit_shard(folder, lambda t: t.__setitem__(f"{EXPERT}.g_idx", t[f"{EXPERT}.g_idx"] + shift))
    return edit


# case -> (damage done to a copy of the export (then re-hashed), the problem verify and eval name)
EXPORT_CASES = {
    "bits missing": (_quantization(bits=None), "quantization_config bits = None is not one quantmoe reads"),
    "bits 0": (_quantization(bits=0), "quantization_config bits = 0 is not one quantmoe reads"),
    "bits 3": (_quantization(bits=3), "quantization_config bits = 3 is not one quantmoe reads"),
    "group_size 0": (_quantization(group_size=0), "quantization_config group_size = 0 is invalid"),
    "g_idx out of range": (_g_idx(100), f"{EXPERT}.g_idx points outside its 3 groups"),
    "g_idx negative": (_g_idx(-5), f"{EXPERT}.g_idx points outside its 3 groups"),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_a_malformed_gptq_checkpoint_is_one_line_in_eval_and_a_problem_in_verify(world, tmp_path, case):
    damage, problem = EXPORT_CASES[case]
    folder = copy_export(world, tmp_path / "export")
    damage(folder)
    rehash(folder)
    result = run("verify", folder)
    line = error_line(result, status=1)
    assert "problem(s) found in" in line
    assert any(row.startswith(f"- {problem}") for row in result.stdout.splitlines()), result.stdout
    line = error_line(run("eval", folder, "--data", world["short"], "--seqlen", "32", "--device", "cpu", "--quiet"))
    assert problem.replace(".g_idx points outside", " has a g_idx outside") in line


def test_an_export_whose_config_is_wider_than_its_experts_is_one_line_in_eval_and_quantize(world, tmp_path):
    """A quantized export's experts store no weight to check before the run, so each layer's fused experts are checked
    against the config's shapes as they load: one line naming the tensor, not a model of the wrong width."""
    folder = copy_export(world, tmp_path / "export")
    edit_json(folder / "config.json", lambda c: c.update(intermediate_size=2 * c["intermediate_size"]))
    rehash(folder)
    for command in (["eval", folder, "--data", world["short"], "--seqlen", "32", "--device", "cpu", "--quiet"],
                    ["quantize", folder, "--out", tmp_path / "again", "--calib", world["text"], "--nsamples", "4",
                     "--seqlen", "32", "--no-eval", "--quiet"]):
        line = error_line(run(*command))
        assert "layer 0 of" in line and "does not match its mixtral config: its experts make" in line, line
        assert "where config.json makes it [4, 384, 64]; restore config.json" in line, line


def test_a_malformed_manifest_is_a_problem_for_verify_and_push_not_a_traceback(export_copy):
    for content in ("[]", '{"files": ["model.safetensors"]}', '{"files": {"config.json": 1}}', "{not json"):
        (export_copy / MANIFEST).write_text(content)
        result = run("verify", export_copy)
        error_line(result, status=1)
        assert any(f"{MANIFEST} is" in line for line in result.stdout.splitlines()), result.stdout
        assert "refusing to push" in error_line(push(export_copy))


@pytest.mark.parametrize("case", ["a hidden file", "a link to a folder", "a link listed in the manifest",
                                  "no quantized module", "a manifest listing a path outside"])
def test_verify_sees_what_it_used_to_miss(world, export_copy, tmp_path, case):
    folder = export_copy
    if case == "a hidden file":
        (folder / ".hf-token").write_text(SECRET)
        problem = ".hf-token: a hidden file"
    elif case == "a link to a folder":
        (folder / "cache").symlink_to(tmp_path)
        problem = "cache: a symbolic link"
    elif case == "a link listed in the manifest":
        outside = Path(shutil.copy(folder / "generation_config.json", tmp_path / "generation_config.json"))
        (folder / "generation_config.json").unlink()
        (folder / "generation_config.json").symlink_to(outside)
        rehash(folder)  # hashes through the link: the manifest lists it with the right sha256
        problem = "generation_config.json: a symbolic link"
    elif case == "no quantized module":
        def no_layers(tensors):
            for name in [n for n in tensors if n.startswith("model.layers.")]:
                del tensors[name]
        edit_shard(folder, no_layers)
        edit_json(folder / "model.safetensors.index.json", lambda i: i.update(
            weight_map={n: s for n, s in i["weight_map"].items() if not n.startswith("model.layers.")}))
        edit_json(folder / "config.json", lambda c: c.update(num_hidden_layers=0))
        rehash(folder)
        problem = "no quantized module"
    else:
        edit_json(folder / MANIFEST, lambda m: m["files"].update({"../../hf-token": {"sha256": "0" * 64, "bytes": 1}}))
        problem = "../../hf-token: listed in the manifest but missing"
    result = run("verify", folder)
    error_line(result, status=1)
    assert any(line.startswith(f"- {problem}") for line in result.stdout.splitlines()), result.stdout
    assert "refusing to push" in error_line(push(folder))


@pytest.fixture(scope="module")
def report(tiny_rtn_export) -> dict:
    return json.loads((tiny_rtn_export / "eval_report.json").read_text())


def regress(tmp_path: Path, baseline: dict, new: dict):
    (tmp_path / "baseline.json").write_text(json.dumps(baseline))
    (tmp_path / "new.json").write_text(json.dumps(new))
    return run("regress", tmp_path / "baseline.json", tmp_path / "new.json")


@pytest.mark.parametrize("field", [("gap", "relative"), ("results", "quantized", "perplexity"), ("kl", "mean")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_regress_never_passes_a_nan_or_infinite_number(report, tmp_path, field, value):
    new = json.loads(json.dumps(report))
    target = new
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    result = regress(tmp_path, report, new)
    assert result.exit_code == 1, result.output
    assert "no regression" not in result.output and "REGRESSION" in result.output
    assert f"{'.'.join(field)} is not a finite number" in result.output
    line = error_line(regress(tmp_path, new, report))  # a baseline with it cannot be compared at all
    assert f"the baseline report's {'.'.join(field)} is NaN, infinite or not positive" in line


@pytest.mark.parametrize("edit, field", [
    (lambda r: r["results"]["quantized"].pop("perplexity"), "results.quantized.perplexity"),
    (lambda r: r["results"]["quantized"].update(perplexity="low"), "results.quantized.perplexity"),
    (lambda r: r["results"].update(original=[1.0]), "results.original.perplexity"),
    (lambda r: r.update(gap=[0.1]), "gap"),
    (lambda r: r["gap"].pop("relative"), "gap.relative"),
    (lambda r: r["kl"].update(mean=None), "kl.mean"),
    (lambda r: r.update(results=[]), "results"),
    (lambda r: r.update(quantization="gptq"), "quantization"),
])
def test_regress_refuses_a_report_with_missing_or_odd_fields(report, tmp_path, edit, field):
    odd = json.loads(json.dumps(report))
    edit(odd)
    line = error_line(regress(tmp_path, report, odd))
    assert f"new.json: {field} is missing or not" in line


def test_a_jobs_file_that_is_not_utf8_is_one_line(world, tmp_path):
    jobs = tmp_path / "jobs.toml"
    jobs.write_bytes(b'[[jobs]]\nname = "caf\xe9"\nmodel = "m"\n')  # Latin-1, not UTF-8
    line = error_line(run("batch", jobs, "--out", tmp_path / "root"))
    assert f"{jobs} is not UTF-8 text (byte 20)" in line
    assert not (tmp_path / "root").exists()


def test_calibrate_and_eval_report_never_replace_a_file_silently(world, tmp_path):
    weights = Path(shutil.copy(world["model"] / "model.safetensors", tmp_path / "model.safetensors"))
    before = digest(tmp_path)
    common = ["calibrate", "--tokenizer", world["model"], "--data", world["text"], "--nsamples", "4", "--seqlen",
              "32", "--out", weights]
    assert "already exists; pass --overwrite" in error_line(run(*common))
    assert "is not a calibration token file, so --overwrite leaves it alone" in error_line(run(*common, "--overwrite"))
    assert digest(tmp_path) == before
    tokens = tmp_path / "calib.safetensors"
    assert run(*common[:-1], tokens).exit_code == 0
    assert "already exists" in error_line(run(*common[:-1], tokens))
    assert run(*common[:-1], tokens, "--overwrite").exit_code == 0  # its own output: replaced

    (tmp_path / "notes.json").write_text('{"mine": true}')
    evaluate = ["eval", world["model"], "--data", world["short"], "--seqlen", "32", "--device", "cpu", "--quiet",
                "--report"]
    assert "already exists; pass --overwrite" in error_line(run(*evaluate, tmp_path / "notes.json"))
    assert "is not a quantmoe eval report" in error_line(run(*evaluate, tmp_path / "notes.json", "--overwrite"))
    assert "must name a .json file" in error_line(run(*evaluate, weights))
    assert (tmp_path / "notes.json").read_text() == '{"mine": true}' and digest(tmp_path)["model.safetensors"] == \
        before["model.safetensors"]


def test_any_unexpected_exception_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    from quantmoe.cli import friendly

    @friendly
    def bug():
        raise KeyError("something no check foresaw")

    monkeypatch.delenv("QUANTMOE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        bug()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: internal error (KeyError: 'something no check foresaw')")
    assert "quantmoe --debug" in err
    monkeypatch.setenv("QUANTMOE_DEBUG", "1")
    with pytest.raises(KeyError):
        bug()
    debug = subprocess.run([sys.executable, "-m", "quantmoe", "--debug", "regress", "/nonexistent.json",
                            "/nonexistent.json"], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 2 and "error: " in debug.stderr  # a QuantMoeError stays one line under --debug


def test_a_tokenizer_whose_own_code_would_run_is_never_loaded(world, tmp_path):
    """Not in the audit: tokenizer_config.json naming a tokenizer class in the checkpoint's own code."""
    model, marker = copy_model(world, tmp_path / "model"), tmp_path / "ran"
    _evil(model, marker)
    (model / "tokenizer.json").unlink()  # no fast-tokenizer file to fall back on: only the custom class
    edit_json(model / "tokenizer_config.json", lambda c: c.update(
        tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}))
    proc = cli("calibrate", "--tokenizer", model, "--data", world["text"], "--nsamples", "2", "--seqlen", "16",
               "--out", tmp_path / "c.safetensors", input="y\n", timeout=300)
    assert proc.returncode == 2 and "cannot load the tokenizer" in one_error_line(proc.stderr)
    assert not marker.exists() and "Do you wish to run the custom code" not in proc.stdout + proc.stderr


def test_private_dir_refuses_a_planted_link_and_the_lock_names_its_holder(tmp_path):
    from quantmoe.base.files import RunLock, private_dir

    (tmp_path / "victim").mkdir()
    (tmp_path / "work").symlink_to(tmp_path / "victim")
    with pytest.raises(quantmoe.QuantMoeError, match="is a link, not a work folder"):
        private_dir(tmp_path / "work")
    work = private_dir(tmp_path / "mine")
    assert stat.S_IMODE(work.stat().st_mode) == 0o700
    with RunLock(work):
        holder = subprocess.run([sys.executable, "-c", "import sys; from quantmoe.base.files import RunLock; "
                                 "RunLock(sys.argv[1])", str(work)], capture_output=True, text=True, timeout=120,
                                cwd=Path(__file__).resolve().parents[1])
        assert f"another quantmoe run (pid {os.getpid()})" in holder.stderr
    free = subprocess.run([sys.executable, "-c", "import sys; from quantmoe.base.files import RunLock; "
                           "RunLock(sys.argv[1])", str(work)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert free.returncode == 0, free.stderr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn,
                                   torch.float8_e5m2, torch.float8_e4m3fnuz])
def test_check_finite_finds_every_nan_and_inf_and_passes_huge_finite_values(dtype):
    """Whatever the dtype and wherever it is, one NaN or Inf is found; values whose sum would overflow
    the dtype, but are all finite, pass."""
    from quantmoe.model.checkpoint import NonFinite, check_finite

    big = torch.finfo(dtype).max
    for sign in (1, -1):
        check_finite("w", torch.full((64, 64), sign * big, dtype=torch.float64).to(dtype), Path("m"))
    no_inf = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)  # Inf becomes NaN there
    bad = [float("nan")] + ([float("inf"), float("-inf")] if dtype not in no_inf else [])
    for value in bad:
        for where in ((0, 0), (63, 63), (17, 40)):
            t = torch.randn(64, 64).to(dtype)
            t[where] = value
            with pytest.raises(NonFinite, match="tensor w of m holds NaN or Inf"):
                check_finite("w", t, Path("m"))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz])
def test_check_finite_agrees_with_isfinite_on_every_fp8_code(dtype):
    """Each of the 256 codes, alone among finite ones: refused exactly when torch says it is not finite."""
    from quantmoe.model.checkpoint import NonFinite, check_finite

    for code in range(256):
        t = torch.zeros(1000, dtype=torch.uint8)
        t[517] = code
        t = t.view(dtype)
        finite = bool(torch.isfinite(t.float()).all())
        if finite:
            check_finite("w", t, Path("m"))
        else:
            with pytest.raises(NonFinite):
                check_finite("w", t, Path("m"))


def test_read_copy_holds_what_safetensors_reads_for_every_dtype_and_refuses_a_shard_cut_short(tmp_path):
    """Checkpoint.read_copy reads a tensor's bytes from its shard itself: the same values and dtype as
    safetensors' own reading for every stored dtype (and converted on request), a NaN refused, and a shard
    cut short after it was opened one error naming it."""
    from safetensors.torch import save_file

    from quantmoe.base.errors import QuantMoeError
    from quantmoe.model.checkpoint import Checkpoint, NonFinite

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g)
    tensors = {f"t.{dtype}".replace("torch.", ""): base.to(dtype) for dtype in
               (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)}
    tensors.update({"t.int64": torch.arange(7), "t.int32": torch.arange(7, dtype=torch.int32) - 3,
                    "t.int16": torch.arange(4, dtype=torch.int16), "t.int8": torch.tensor([-3, 4], dtype=torch.int8),
                    "t.uint8": torch.tensor([0, 255], dtype=torch.uint8), "t.bool": torch.tensor([True, False, True]),
                    "t.scalar": torch.tensor(2.5), "t.empty": torch.zeros(0, 4)})
    save_file(tensors, str(folder / "model.safetensors"))
    ckpt = Checkpoint(folder)
    for name, want in tensors.items():
        got = ckpt.read_copy(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), ckpt.tensor(name).reshape(-1).view(torch.uint8)), name
    assert torch.equal(ckpt.read_copy("t.bfloat16", torch.float32), tensors["t.bfloat16"].float())
    assert ckpt.read_copy("t.int8", torch.float32).dtype == torch.int8  # only floating tensors are converted

    bad = base.clone()
    bad[1, 2] = float("nan")
    save_file({"w": bad}, str(folder / "model.safetensors"))
    with pytest.raises(NonFinite, match="tensor w of"):
        Checkpoint(folder).read_copy("w")

    save_file({"w": base}, str(folder / "model.safetensors"))
    ckpt = Checkpoint(folder)
    ckpt.shape("w")  # opened and checked whole
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(QuantMoeError, match="model.safetensors is truncated or corrupt"):
        ckpt.read_copy("w")
