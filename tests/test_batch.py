"""quantmoe batch: a jobs file over two tiny MoEs x {gptq, rtn}, a failing job, skipping finished
jobs, a batch killed midway, and the summary checked against each job's own eval_report.json."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantmoe.batch import Job, job_state, load_jobs, result_row, run_batch
from quantmoe.cli import main
from quantmoe.config import QuantConfig
from quantmoe.errors import QuantMoeError
from tiny import write_text

# Small enough that one job takes seconds: 4 calibration windows of 32 tokens, ~5 eval windows.
DEFAULTS = """
[defaults]
calib = "calib.jsonl"
eval_data = "heldout.jsonl"
seqlen = 32
nsamples = 4
group_size = 32
device = "cpu"
batch_size = 4
"""


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("batch-models")
    (base / "mix").symlink_to(tiny_model("mixtral"))  # the matrix names jobs after these folder names
    (base / "qwen").symlink_to(tiny_model("qwen2_moe"))
    write_text(base / "calib.jsonl", repeats=10)
    write_text(base / "heldout.jsonl", repeats=3)
    return base


@pytest.fixture(scope="module")
def first_run(models):
    """One batch: a job whose model does not exist, then two models x {gptq, rtn}."""
    jobs = models / "jobs.toml"
    jobs.write_text(DEFAULTS + """
[[jobs]]
name = "broken"
model = "no-such-model-folder"
backend = "rtn"

[matrix]
models = ["mix", "qwen"]
recipes = [{backend = "gptq", bits = 4}, {name = "rtn4", backend = "rtn", bits = 4}]
""")
    root = models / "out"
    result = CliRunner().invoke(main, ["batch", str(jobs), "--out", str(root), "--quiet"])
    summary = json.loads((root / "batch_summary.json").read_text())
    return {"jobs": jobs, "root": root, "result": result, "summary": summary}


DONE = ["mix-gptq-int4-g32", "mix-rtn4", "qwen-gptq-int4-g32", "qwen-rtn4"]


def test_batch_runs_every_job_and_the_summary_agrees_with_each_report(first_run):
    summary, root = first_run["summary"], first_run["root"]
    rows = {r["job"]: r for r in summary["jobs"]}
    assert [r["job"] for r in summary["jobs"]] == ["broken"] + DONE
    assert summary["counts"] == {"done": 4, "skipped": 0, "failed": 1, "pending": 0}
    md = (root / "batch_summary.md").read_text()
    for name in DONE:
        row = rows[name]
        assert row["status"] == "done"
        report = json.loads((root / name / "eval_report.json").read_text())
        assert row["ppl_original"] == report["results"]["original"]["perplexity"]
        assert row["ppl_quantized"] == report["results"]["quantized"]["perplexity"]
        assert row["gap_absolute"] == report["gap"]["absolute"]
        assert row["gap_relative"] == report["gap"]["relative"]
        assert row["bits_per_weight"] == report["quantization"]["bits_per_weight"]
        assert row["size_bytes"] == report["quantization"]["size_bytes"]
        assert f"| {name} | done | " in md and f"{report['results']['quantized']['perplexity']:.4f}" in md
    assert rows["mix-rtn4"]["recipe"] == "rtn int4 g32"
    assert json.loads((root / "mix-rtn4" / "config.json").read_text())["quantization_config"]["meta"]["backend"] == "rtn"
    # job-level progress: which job of how many, and the batch ETA once a job has finished
    out = first_run["result"].output
    assert "[job 2/5] mix-gptq-int4-g32: starting" in out and "[job 5/5] qwen-rtn4: done" in out
    assert "ETA" in out


def test_a_failing_job_does_not_stop_the_others_and_the_exit_status_says_so(first_run):
    result, rows = first_run["result"], {r["job"]: r for r in first_run["summary"]["jobs"]}
    assert result.exit_code == 1
    assert rows["broken"]["status"] == "failed"
    assert "no-such-model-folder" in rows["broken"]["error"] and "\n" not in rows["broken"]["error"]
    assert not (first_run["root"] / "broken").exists()
    assert "1 of 5 jobs failed" in result.stderr


def test_rerun_skips_finished_jobs_without_recomputing_them(first_run):
    root = first_run["root"]
    before = {n: os.stat(root / n / "model-00001-of-00001.safetensors").st_mtime_ns for n in DONE}
    result = CliRunner().invoke(main, ["batch", str(first_run["jobs"]), "--out", str(root), "--quiet"])
    summary = json.loads((root / "batch_summary.json").read_text())
    assert result.exit_code == 1  # the broken job still fails
    assert {r["job"]: r["status"] for r in summary["jobs"]} == {"broken": "failed", **{n: "skipped" for n in DONE}}
    assert {n: os.stat(root / n / "model-00001-of-00001.safetensors").st_mtime_ns for n in DONE} == before
    assert "starting" not in result.output.replace("[job 1/5] broken: starting", "")
    plan = CliRunner().invoke(main, ["batch", str(first_run["jobs"]), "--out", str(root), "--dry-run"])
    assert plan.exit_code == 0 and "broken: run (rtn int4 g32" in plan.output and "qwen-rtn4: skip" in plan.output
    # a skipped job still reports its numbers, read from its own report
    row = next(r for r in summary["jobs"] if r["job"] == "qwen-rtn4")
    report = json.loads((root / "qwen-rtn4" / "eval_report.json").read_text())
    assert row["ppl_quantized"] == report["results"]["quantized"]["perplexity"]


def test_a_damaged_or_different_finished_folder_is_not_skipped(first_run, tmp_path):
    done = first_run["root"] / "mix-rtn4"
    model = str(first_run["jobs"].parent / "mix")
    same = Job("mix-rtn4", model, QuantConfig(backend="rtn", group_size=32), {})
    assert job_state(same, done) == "complete"
    other = Job("mix-rtn4", model, QuantConfig(backend="rtn", bits=8, group_size=32), {})
    with pytest.raises(QuantMoeError, match="made with bits 4, but the jobs file asks for 8"):
        job_state(other, done)
    copy = tmp_path / "mix-rtn4"
    shutil.copytree(done, copy)
    shard = copy / "model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(QuantMoeError, match="model-00001-of-00001.safetensors: sha256 differs"):
        job_state(same, copy)


def test_killed_batch_finishes_only_what_is_missing(models, tmp_path):
    jobs = models / "jobs-kill.toml"
    jobs.write_text(DEFAULTS + """
[[jobs]]
name = "first"
model = "mix"
backend = "rtn"

[[jobs]]
name = "second"
model = "mix"
backend = "gptq"
""")
    root = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "quantmoe", "batch", str(jobs), "--out", str(root), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (root / "first").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (root / "first").exists(), "the batch never finished its first job"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (root / "second").exists(), "the second job finished before the kill; nothing was interrupted"
    first_mtime = os.stat(root / "first" / "manifest.json").st_mtime_ns

    lines = []
    summary = run_batch(load_jobs(jobs), root, jobs, quiet=True, log=lines.append)
    assert [(r["job"], r["status"]) for r in summary["jobs"]] == [("first", "skipped"), ("second", "done")]
    assert os.stat(root / "first" / "manifest.json").st_mtime_ns == first_mtime
    assert any(line.startswith("[job 2/2] second: ") and ("starting" in line or "resuming" in line) for line in lines)
    assert not (root / ".second.quantmoe-work").exists()


def test_jobs_file_mistakes_are_one_line_errors_naming_key_and_job(models, tmp_path):
    def load(text: str, suffix: str = ".toml"):
        f = tmp_path / f"jobs{suffix}"
        f.write_text(text)
        return load_jobs(f)

    with pytest.raises(QuantMoeError, match=r"job 'a' has unknown key 'bitz'"):
        load('[[jobs]]\nname = "a"\nmodel = "m"\nbitz = 4\n')
    with pytest.raises(QuantMoeError, match=r"job 'a': backend 'bnb-nf5' is unknown; use one of gptq, rtn"):
        load('[[jobs]]\nname = "a"\nmodel = "m"\nbackend = "bnb-nf5"\n')
    with pytest.raises(QuantMoeError, match=r"job 'a': bits = '4' should be int"):
        load('[[jobs]]\nname = "a"\nmodel = "m"\nbits = "4"\n')
    with pytest.raises(QuantMoeError, match=r"two jobs are named 'a'"):
        load('[[jobs]]\nname = "a"\nmodel = "m"\n[[jobs]]\nname = "a"\nmodel = "n"\n')
    with pytest.raises(QuantMoeError, match=r"\[matrix\] recipe 2 has unknown key 'colour'"):
        load('[matrix]\nmodels = ["m"]\nrecipes = [{bits = 4}, {colour = "red"}]\n')
    with pytest.raises(QuantMoeError, match="not valid TOML"):
        load('[[jobs]\nname = "a"\n')

    # defaults < recipe < job; YAML reads the same as TOML; relative paths resolve beside the file
    toml = load(DEFAULTS + '[[jobs]]\nname = "x"\nmodel = "m"\nbits = 8\nact-order = false\neval = false\n'
                '[matrix]\nmodels = ["org/model"]\nrecipes = [{backend = "rtn", group_size = -1}]\n')
    (tmp_path / "calib.jsonl").write_text("{}\n")
    yaml = load("""
defaults: {calib: calib.jsonl, eval_data: heldout.jsonl, seqlen: 32, nsamples: 4, group_size: 32, device: cpu, batch_size: 4}
jobs:
  - {name: x, model: m, bits: 8, act-order: false, eval: false}
matrix: {models: [org/model], recipes: [{backend: rtn, group_size: -1}]}
""", ".yaml")
    assert [j.name for j in yaml] == ["x", "model-rtn-int4"]
    x = yaml[0]
    assert x.qcfg == QuantConfig(bits=8, group_size=32, act_order=False)
    assert x.run == {"calib": str(tmp_path / "calib.jsonl"), "eval_data": "heldout.jsonl", "seqlen": 32,
                     "nsamples": 4, "device": "cpu", "batch_size": 4, "run_eval": False}
    assert yaml[1].model == "org/model" and yaml[1].qcfg == QuantConfig(backend="rtn", group_size=-1)
    assert [(j.name, j.qcfg) for j in toml] == [("x", QuantConfig(bits=8, group_size=32, act_order=False)),
                                                ("model-rtn-int4", QuantConfig(backend="rtn", group_size=-1))]

    bad = tmp_path / "bad.toml"
    bad.write_text('[[jobs]]\nname = "a"\nmodel = "m"\nbitz = 4\n')
    result = CliRunner().invoke(main, ["batch", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "unknown key 'bitz'" in result.stderr
    assert not (tmp_path / "o").exists()  # nothing runs until the whole file is right


def test_a_job_without_eval_reports_size_measured_from_its_files(first_run, tmp_path):
    done = tmp_path / "no-eval"
    shutil.copytree(first_run["root"] / "mix-rtn4", done)
    report = json.loads((done / "eval_report.json").read_text())
    (done / "eval_report.json").unlink()
    row = result_row(Job("no-eval", "mix", QuantConfig(backend="rtn", group_size=32), {}), done, "done", 1.0)
    assert row["ppl_quantized"] is None and row["gap_relative"] is None
    assert row["bits_per_weight"] == report["quantization"]["bits_per_weight"]
    assert row["size_bytes"] == report["quantization"]["size_bytes"]
