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
from tiny import write_text

from quantmoe.apps.batch import Job, job_state, load_jobs, result_row, run_batch
from quantmoe.base.errors import QuantMoeError
from quantmoe.base.options import QuantConfig
from quantmoe.cli import main

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
        assert row["kl"] == report["kl"]["mean"] > 0
        assert row["bits_per_weight"] == report["quantization"]["bits_per_weight"]
        assert row["size_bytes"] == report["quantization"]["size_bytes"]
        assert f"| {name} | done | " in md and f"{report['results']['quantized']['perplexity']:.4f}" in md
        assert f" | {1000 * report['kl']['mean']:.2f} | " in md
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
    same = Job("mix-rtn4", model, "rtn", QuantConfig(backend="rtn", group_size=32), {})
    assert job_state(same, done) == "complete"
    other = Job("mix-rtn4", model, "rtn", QuantConfig(backend="rtn", bits=8, group_size=32), {})
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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_batch_killed_inside_a_job_resumes_it_from_its_finished_layers(first_run, models, tmp_path, sig):
    """Ctrl-C (SIGINT) or SIGKILL after the second job's first layer is written: the re-run skips the
    first job, resumes the second from its finished layers, and writes the same shard as a job that
    was never stopped (first_run's mix-gptq-int4-g32 has the same model, recipe and data)."""
    jobs = models / "jobs-kill.toml"
    jobs.write_text(DEFAULTS + """
[[jobs]]
name = "first"
model = "mix"
backend = "rtn"
eval = false

[[jobs]]
name = "second"
model = "mix"
backend = "gptq"
""")
    root = tmp_path / "out"
    layer0 = root / ".second.quantmoe-work" / "layers" / "layer-00000.json"
    proc = subprocess.Popen([sys.executable, "-m", "quantmoe", "batch", str(jobs), "--out", str(root), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not layer0.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert layer0.exists(), "the batch never finished a layer of its second job"
    finally:
        proc.send_signal(sig)
        stderr = proc.communicate(timeout=120)[1]
    assert (root / "first").exists()
    assert not (root / "second").exists(), "the second job finished before the kill; nothing was interrupted"
    if sig == signal.SIGINT:  # a clean stop: exit 130, one line, and a summary saying what happened
        assert proc.returncode == 130 and stderr.strip().splitlines()[-1].startswith("error: interrupted"), stderr
        assert "Traceback" not in stderr
        stopped = json.loads((root / "batch_summary.json").read_text())
        assert [(r["job"], r["status"], r["error"]) for r in stopped["jobs"]] == [
            ("first", "done", None), ("second", "failed", "interrupted")]
    else:
        assert proc.returncode == -signal.SIGKILL
    first_mtime = os.stat(root / "first" / "manifest.json").st_mtime_ns

    lines = []
    summary = run_batch(load_jobs(jobs), root, jobs, quiet=True, log=lines.append)
    assert [(r["job"], r["status"]) for r in summary["jobs"]] == [("first", "skipped"), ("second", "done")]
    assert os.stat(root / "first" / "manifest.json").st_mtime_ns == first_mtime
    resumed = [line for line in lines if line.startswith("[job 2/2] second: resuming (")]
    assert resumed and int(resumed[0].split("(")[1].split()[0]) >= 1, lines
    assert not (root / ".second.quantmoe-work").exists()
    shard = "model-00001-of-00001.safetensors"
    reference = json.loads((first_run["root"] / "mix-gptq-int4-g32" / "manifest.json").read_text())["files"][shard]
    assert json.loads((root / "second" / "manifest.json").read_text())["files"][shard] == reference
    report = json.loads((root / "second" / "eval_report.json").read_text())
    row = summary["jobs"][1]
    assert (row["ppl_quantized"], row["gap_relative"], row["bits_per_weight"]) == (
        report["results"]["quantized"]["perplexity"], report["gap"]["relative"], report["quantization"]["bits_per_weight"])


def test_bnb_recipes_take_only_the_defaults_that_apply(tmp_path):
    """[defaults] group_size (a gptq setting) does not reach a bnb-nf4 recipe; written in the job it is an error."""
    from quantmoe.formats.bnb import BnbConfig

    f = tmp_path / "jobs.toml"
    f.write_text(DEFAULTS + '[[jobs]]\nname = "nf4-own"\nmodel = "m"\nbackend = "bnb-nf4"\nnsamples = 8\n'
                 'double-quant = "off"\n[matrix]\nmodels = ["org/m"]\n'
                 'recipes = [{backend = "gptq"}, {backend = "bnb-nf4"}, {backend = "bnb-int8", int8_threshold = 0}]\n')
    own, gptq, nf4, int8 = load_jobs(f)
    assert [j.name for j in (gptq, nf4, int8)] == ["m-gptq-int4-g32", "m-bnb-nf4", "m-bnb-int8"]
    assert gptq.config == QuantConfig(group_size=32) and gptq.recipe() == "gptq int4 g32"
    assert nf4.backend == "bnb-nf4" and nf4.config == BnbConfig(quant_type="nf4") and nf4.recipe() == "bnb-nf4"
    assert int8.config == BnbConfig(quant_type="int8", int8_threshold=0.0)
    assert own.config == BnbConfig(quant_type="nf4", double_quant="off")
    assert own.notes == ("bnb-nf4 uses no calibration data; nsamples is ignored",) and nf4.notes == ()
    f.write_text('[[jobs]]\nname = "a"\nmodel = "m"\nbackend = "bnb-nf4"\ngroup_size = 64\n')
    with pytest.raises(QuantMoeError, match=r"job 'a': --group-size does not apply to the bnb-nf4 backend"):
        load_jobs(f)


def test_bnb_job_runs_is_skipped_when_done_and_resumes_when_interrupted(models, tmp_path):
    pytest.importorskip("bitsandbytes")
    jobs = models / "jobs-bnb.toml"
    jobs.write_text(DEFAULTS + '[matrix]\nmodels = ["mix"]\nrecipes = [{backend = "bnb-nf4"}]\n')
    root = tmp_path / "out"
    summary = run_batch(load_jobs(jobs), root, jobs, quiet=True, log=lambda line: None)
    row = summary["jobs"][0]
    assert (row["job"], row["status"], row["recipe"]) == ("mix-bnb-nf4", "done", "bnb-nf4")
    report = json.loads((root / "mix-bnb-nf4" / "eval_report.json").read_text())
    assert (row["ppl_original"], row["ppl_quantized"], row["gap_absolute"], row["bits_per_weight"], row["size_bytes"]) == (
        report["results"]["original"]["perplexity"], report["results"]["quantized"]["perplexity"],
        report["gap"]["absolute"], report["quantization"]["bits_per_weight"], report["quantization"]["size_bytes"])
    assert json.loads((root / "mix-bnb-nf4" / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "bitsandbytes"
    again = run_batch(load_jobs(jobs), root, jobs, quiet=True, log=lambda line: None)
    assert again["jobs"][0]["status"] == "skipped" and again["jobs"][0]["ppl_quantized"] == row["ppl_quantized"]
    # a gptq job pointed at the bnb folder is not "complete": the folder is another backend's
    gptq = Job("mix-bnb-nf4", str(models / "mix"), "gptq", QuantConfig(group_size=32), {})
    with pytest.raises(QuantMoeError, match="made with backend 'bnb-nf4', but the jobs file asks for 'gptq'"):
        job_state(gptq, root / "mix-bnb-nf4")
    # an interrupted bnb job leaves its work folder, and bnb resumes from it as gptq does (the one pipeline)
    shutil.rmtree(root / "mix-bnb-nf4")
    (root / ".mix-bnb-nf4.quantmoe-work" / "export").mkdir(parents=True)
    assert job_state(load_jobs(jobs)[0], root / "mix-bnb-nf4") == "resume"
    result = CliRunner().invoke(main, ["batch", str(jobs), "--out", str(root), "--dry-run"])
    assert result.exit_code == 0 and "mix-bnb-nf4: resume (bnb-nf4 of " in result.output


def test_jobs_file_mistakes_are_one_line_errors_naming_key_and_job(models, tmp_path):
    def load(text: str, suffix: str = ".toml"):
        f = tmp_path / f"jobs{suffix}"
        f.write_text(text)
        return load_jobs(f)

    with pytest.raises(QuantMoeError, match=r"job 'a' has unknown key 'bitz'"):
        load('[[jobs]]\nname = "a"\nmodel = "m"\nbitz = 4\n')
    with pytest.raises(QuantMoeError, match=r"job 'a': unknown backend 'bnb-nf5'; choose one of .*bnb-nf4.*gptq, rtn"):
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
    assert x.backend == "gptq" and x.config == QuantConfig(bits=8, group_size=32, act_order=False)
    assert x.run == {"calib": str(tmp_path / "calib.jsonl"), "eval_data": "heldout.jsonl", "seqlen": 32,
                     "nsamples": 4, "device": "cpu", "batch_size": 4, "run_eval": False}
    assert yaml[1].model == "org/model" and yaml[1].config == QuantConfig(backend="rtn", group_size=-1)
    assert [(j.name, j.config) for j in toml] == [("x", QuantConfig(bits=8, group_size=32, act_order=False)),
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
    row = result_row(Job("no-eval", "mix", "rtn", QuantConfig(backend="rtn", group_size=32), {}), done, "done", 1.0)
    assert row["ppl_quantized"] is None and row["gap_relative"] is None
    assert row["bits_per_weight"] == report["quantization"]["bits_per_weight"]
    assert row["size_bytes"] == report["quantization"]["size_bytes"]
