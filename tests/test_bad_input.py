"""Bad input through the real CLI: one ``error:`` line naming the problem and the fix, a
non-zero exit, no traceback, and nothing written earlier damaged.

"Earlier" is a finished export that every bad run targets with ``--out ... --overwrite``
(so a run that got far enough would replace it), and the source model folder. Cases that
fail before any work are launched together, in forks of one interpreter, since each start costs seconds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from clirun import (
    QUICK,
    Stop,
    cli,
    cli_forked,
    content,
    digest,
    one_error_line,
    quantize_args,
    start,
    stopped_after_layer,
    wait_for,
)
from safetensors import safe_open
from tiny import make_model, write_text

import quantmoe
import quantmoe.stages.evaluate
from quantmoe.apps.verify import verify
from quantmoe.base.errors import QuantMoeError
from quantmoe.base.options import QuantConfig
from quantmoe.model.architectures import ARCHITECTURES
from quantmoe.stages.calibrate import write_calibration
from quantmoe.stages.quantize import work_dir
from quantmoe.stages.resume import FINGERPRINT, finished_layers, layer_file


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A tiny Mixtral, good calibration text, and a finished export of them."""
    root = tmp_path_factory.mktemp("bad-input")
    model = make_model("mixtral", root / "model")
    text = write_text(root / "docs.jsonl")
    out = root / "earlier" / "out"
    quantmoe.quantize(model, out, QuantConfig(group_size=32), calib=text, nsamples=4, seqlen=32, run_eval=False,
                      quiet=True)
    return {"root": root, "model": model, "text": text, "out": out, "model_digest": digest(model),
            "out_digest": digest(out)}


def _copy_model(e, name: str) -> Path:
    return Path(shutil.copytree(e["model"], e["root"] / name))


def _truncated_shard(e) -> Path:
    model = _copy_model(e, "truncated")
    shard = model / "model.safetensors"
    os.truncate(shard, shard.stat().st_size // 2)
    return model


def _corrupt_shard(e) -> Path:
    model = _copy_model(e, "corrupt")
    shard = model / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage in the JSON header
    shard.write_bytes(bytes(data))
    return model


def _config_only(e, name: str, config) -> Path:
    folder = e["root"] / name
    config.save_pretrained(folder)
    return folder


def _bert(e) -> Path:
    from transformers import BertConfig

    return _config_only(e, "bert", BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=128))


def _gpt2(e) -> Path:
    from transformers import GPT2Config

    return _config_only(e, "gpt2", GPT2Config(n_embd=64, n_layer=2, n_head=4))


def _bad_config(e) -> Path:
    model = _copy_model(e, "bad-config")
    (model / "config.json").write_text('{"model_type": "mixtral", ')
    return model


def _file(e, name: str, data: bytes) -> Path:
    path = e["root"] / name
    path.write_bytes(data)
    return path


def _wider_experts_config(e) -> Path:
    model = _copy_model(e, "wider-experts-config")
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(config))
    return model


def _phantom_tensor(e) -> Path:
    model = _copy_model(e, "phantom-tensor")
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    weight_map = {n: "model.safetensors" for n in [*names, "model.layers.0.self_attn.q_proj.bias"]}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model


def _damaged_tokenizer(e) -> Path:
    model = _copy_model(e, "damaged-tokenizer")
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    return model


def _negative_ids(e) -> Path:
    import torch

    path = e["root"] / "negative-ids.safetensors"
    write_calibration(path, torch.full((4, 32), -3), {})
    return path


def _other_vocab(e) -> Path:
    import torch

    path = e["root"] / "other-vocab.safetensors"
    write_calibration(path, torch.randint(0, 200, (4, 32)), {"tokenizer_fingerprint": "0123456789abcdef"})
    return path


# name -> (the case's own arguments, given the fixture and this case's copy of the earlier export;
#          a fragment its error line must hold). A case naming no --out gets `--out <copy> --overwrite`.
CASES = {
    "missing model path": (lambda e, out: ["/nonexistent/model"],
                           "model path /nonexistent/model does not exist; pass a checkpoint folder"),
    "model path is a file": (lambda e, out: [e["text"]],
                             "is a file; pass the checkpoint folder that holds config.json"),
    "unreadable config": (lambda e, out: [_bad_config(e)],
                          "config.json is not valid JSON (Expecting property name enclosed in double quotes"),
    "not a causal LM": (lambda e, out: [_bert(e)],
                        "the model is a 'bert' model, not a causal language model; quantmoe quantizes decoder-only"),
    "unsupported architecture": (lambda e, out: [_gpt2(e)],
                                 f"unsupported architecture 'gpt2'; supported: {', '.join(sorted(ARCHITECTURES))}"),
    "truncated shard": (lambda e, out: [_truncated_shard(e)],
                        "model.safetensors is truncated or corrupt"),
    "corrupt shard": (lambda e, out: [_corrupt_shard(e)],
                      "model.safetensors is truncated or corrupt"),
    "empty calibration file": (lambda e, out: ["--calib", _file(e, "empty.txt", b"")],
                               "empty.txt is empty; pass a file with text in it"),
    "calibration too short": (lambda e, out: ["--calib", _file(e, "short.txt", b"a few words only")],
                              "fewer than --nsamples 4 x --seqlen 32 = 128; give more text or lower"),
    "calibration not JSONL": (lambda e, out: ["--calib", _file(e, "wrong.jsonl", b'{"content": "no text field"}\n')],
                              'wrong.jsonl:1 is not a JSON object with a "text" field'),
    "calibration not text": (lambda e, out: ["--calib", _file(e, "binary.txt", b"\xff\xfe\x00\x81" * 64)],
                             "is not UTF-8 text; pass a .txt or .jsonl file"),
    "calibration of another vocabulary": (lambda e, out: ["--calib", _other_vocab(e)],
                                          "was tokenized with another vocabulary than this model's"),
    "calibration of negative token ids": (lambda e, out: ["--calib", _negative_ids(e)],
                                          "holds token ids from -3 to -3, outside this model's vocabulary of "),
    "config wider than its experts": (lambda e, out: [_wider_experts_config(e)],
                                      "is [96, 64], but its config.json needs [192, 64]; the config does not match "
                                      "the weights"),
    "index names a tensor its shard lacks": (lambda e, out: [_phantom_tensor(e)],
                                             "tensor model.layers.0.self_attn.q_proj.bias is listed for shard "),
    "damaged tokenizer file": (lambda e, out: [_damaged_tokenizer(e)],
                               "tokenizer.json is not valid JSON (Expecting property name enclosed in double quotes"),
    "group size does not divide": (lambda e, out: ["--group-size", "64"],
                                   "--group-size 64 does not divide the input size 96 of "
                                   "model.layers.0.block_sparse_moe.experts.0.w2.weight"),
    "unsupported bits": (lambda e, out: ["--bits", "3"], "--bits 3 is not supported by the gptq backend; use 4 or 8"),
    "out inside the model folder": (lambda e, out: ["--out", e["model"] / "quantized"],
                                    "or inside it; choose a folder outside it"),
    "out equal to the model folder": (lambda e, out: ["--out", e["model"], "--overwrite"],
                                      "or inside it; choose a folder outside it"),
    "model folder inside out": (lambda e, out: ["--out", e["root"], "--overwrite"],
                                "is inside --out"),
    "block kernel for CUDA on a CPU run": (lambda e, out: ["--device", "cpu", "--block-kernel", "triton"],
                                           "--block-kernel triton needs a CUDA device and this run is on cpu; "
                                           "use --block-kernel auto"),
    "out exists without --overwrite": (lambda e, out: ["--out", out],
                                       "already exists; pass --overwrite or choose another --out"),
}


def _command(e, case: str, out: Path) -> list[str]:
    """`quantize` with the good model and text, then the case's own arguments."""
    own = [str(a) for a in CASES[case][0](e, out)]
    model = [own.pop(0)] if not own[0].startswith("--") else [str(e["model"])]
    target = [] if "--out" in own else ["--out", str(out), "--overwrite"]
    return ["quantize", *model, "--calib", str(e["text"]), *QUICK, *target, *own]


@pytest.fixture(scope="module")
def outcomes(earlier):
    """case -> (its copy of the earlier export, its --out, the finished process); launched together, in
    forks of one interpreter that made the imports once (clirun.cli_forked)."""
    prepared = {}
    for n, case in enumerate(CASES):
        copy = Path(shutil.copytree(earlier["out"], earlier["root"] / f"case{n}" / "out"))
        command = _command(earlier, case, copy)
        prepared[case] = (copy, Path(command[len(command) - 1 - command[::-1].index("--out") + 1]), command)
    runs = cli_forked([command for _, _, command in prepared.values()])
    return {case: (copy, out, run) for (case, (copy, out, _)), run in zip(prepared.items(), runs)}


def assert_nothing_damaged(e, out: Path) -> None:
    assert digest(e["model"]) == e["model_digest"], "the model folder changed"
    assert digest(out) == e["out_digest"], "the earlier --out changed"


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(outcomes, earlier, case):
    copy, out, run = outcomes[case]
    line = one_error_line(run.stderr)
    assert run.returncode == 2
    assert CASES[case][1] in line, line
    assert_nothing_damaged(earlier, copy)
    assert not work_dir(out).exists(), "a failed check must not create the work folder"


# The disk fills while the second export shard is written: the file is left half-written.
DISK_FULL = """
import errno, sys
import safetensors.torch as st
real, calls = st.save_file, []
def save_file(tensors, filename, metadata=None):
    if "/export/" in str(filename):
        calls.append(filename)
        if len(calls) == 2:
            open(filename, "wb").write(b"half a shard")
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
    return real(tensors, filename, metadata=metadata)
st.save_file = save_file
from quantmoe.cli import main
main(sys.argv[1:], prog_name="quantmoe")
"""


def test_disk_full_during_export(earlier, tmp_path):
    out = Path(shutil.copytree(earlier["out"], tmp_path / "out"))
    args = quantize_args(earlier["model"], out, earlier["text"], "--overwrite", "--max-shard-size", "40KB")
    run = subprocess.run([sys.executable, "-c", DISK_FULL, *map(str, args)], capture_output=True, text=True,
                         timeout=300)
    line = one_error_line(run.stderr)
    assert run.returncode == 2
    assert "(No space left on device); free disk space or choose another --out, then re-run the same command" in line
    assert_nothing_damaged(earlier, out)
    work = work_dir(out)
    assert not (work / "export").exists(), "the half-written export must be removed"
    assert not list(tmp_path.glob("*.old*")), "no half-replaced --out"
    # The finished layers are kept: freeing space and re-running goes straight to the export.
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert "resuming: 2 of 2 layers are already quantized" in again.stderr
    assert verify(out).ok


def test_a_run_the_disk_cannot_hold_is_refused_before_any_work(earlier, tmp_path, monkeypatch):
    """Each quantized weight is written at least twice at 4 bits (its layer's file in the work folder, then the
    export): with less free space than that, the run stops at once, not when the disk fills; an earlier run's
    finished layers count as written."""
    import quantmoe.stages.quantize as stage

    weights = 0
    for shard in earlier["out"].glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:  # qweight: int32 words of 8 levels, 2 levels a byte
            weights += sum(2 * 4 * math.prod(f.get_slice(n).get_shape()) for n in f.keys() if n.endswith(".qweight"))
    free = {"bytes": weights - 1}
    monkeypatch.setattr(stage, "disk_usage", lambda path: shutil._ntuple_diskusage(10**15, 0, free["bytes"]))
    out = tmp_path / "out"
    args = dict(calib=earlier["text"], nsamples=4, seqlen=32, run_eval=False, quiet=True)
    with pytest.raises(QuantMoeError, match=r"GB free, but this run writes at least .*choose an --out on a disk"):
        quantmoe.quantize(earlier["model"], out, QuantConfig(group_size=32), **args)
    assert not out.exists() and not work_dir(out).exists()

    free["bytes"] = weights  # room for it: stopped once layer 0 is written
    with stopped_after_layer(monkeypatch, 0), pytest.raises(Stop):
        quantmoe.quantize(earlier["model"], out, QuantConfig(group_size=32), **args)
    free["bytes"] = weights - 1  # the finished layer is on the disk already: the rest fits
    quantmoe.quantize(earlier["model"], out, QuantConfig(group_size=32), **args)
    assert verify(out).ok and content(out) == content(earlier["out"])


def test_ctrl_c_mid_run_leaves_resumable_work_and_no_out(earlier, tmp_path):
    out = Path(shutil.copytree(earlier["out"], tmp_path / "out"))
    proc = start(*quantize_args(earlier["model"], out, earlier["text"], "--overwrite"))
    wait_for(layer_file(work_dir(out), 0).with_suffix(".json"), proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted; --out was left as it was (re-run the same command: quantize resumes" in one_error_line(stderr)
    assert_nothing_damaged(earlier, out)
    work = work_dir(out)
    fp = json.loads((work / FINGERPRINT).read_text())["fingerprint"]
    assert finished_layers(work, fp, 2) >= 1
    assert not (work / "export").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [work.name, "out"]


def test_gpu_out_of_memory_is_one_line_naming_the_lighter_recipe(capsys, monkeypatch):
    """A CUDA out-of-memory error (a RuntimeError, which the CLI otherwise keeps as a bug's traceback)
    becomes one line that names what to change."""
    import torch

    from quantmoe.cli import friendly, main

    @friendly
    def run():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.56 GiB")

    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the GPU ran out of memory;")
    assert "--fit none" in err and "--batch-size" in err and "torchrun" in err

    # quantmoe eval: --fit and torchrun are not its options
    def evaluate(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 45.00 GiB")

    monkeypatch.setattr(quantmoe.stages.evaluate, "evaluate", evaluate)
    result = CliRunner().invoke(main, ["eval", "--quiet"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: the GPU ran out of memory;")
    assert "--dtype bfloat16" in result.stderr and "--batch-size" in result.stderr and "--fit" not in result.stderr

    @friendly
    def bug():
        raise RuntimeError("some other failure")

    with pytest.raises(SystemExit) as exit_info:  # any other error is a bug: one line saying how to see more
        bug()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: internal error (RuntimeError: some other failure)")
