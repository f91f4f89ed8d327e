"""quantmoe batch --shard i/N: N workers split one jobs file, every job runs exactly once, each share
resumes on its own, and the shares' summaries merge into one (--summary)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import write_text

from quantmoe.apps.batch import Job, Shard, merge_summaries
from quantmoe.base.errors import QuantMoeError
from quantmoe.base.options import QuantConfig
from quantmoe.cli import main

JOBS = """
[defaults]
calib = "calib.jsonl"
seqlen = 32
nsamples = 4
group_size = 32
device = "cpu"
batch_size = 4
eval = false
backend = "rtn"

[[jobs]]
name = "a"
model = "mix"

[[jobs]]
name = "b"
model = "mix"
bits = 8

[[jobs]]
name = "c"
model = "mix"
group_size = -1
"""


@pytest.fixture
def jobs_file(tiny_model, tmp_path) -> Path:
    (tmp_path / "mix").symlink_to(tiny_model("mixtral"))
    write_text(tmp_path / "calib.jsonl", repeats=10)
    (tmp_path / "jobs.toml").write_text(JOBS)
    return tmp_path / "jobs.toml"


def _batch(*args: str):
    return CliRunner().invoke(main, ["batch", *args])


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_shares_are_disjoint_cover_every_job_and_differ_by_at_most_one(count):
    jobs = [Job(f"j{k}", "m", "rtn", QuantConfig(backend="rtn"), {}) for k in range(10)]
    shares = [Shard(i, count).take(jobs) for i in range(count)]
    names = [job.name for share in shares for job in share]
    assert sorted(names) == sorted(job.name for job in jobs) and len(names) == len(set(names))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert [job.name for job in Shard(1, 3).take(jobs)] == ["j1", "j4", "j7"]  # job k goes to worker k mod N


def test_two_workers_split_three_jobs_run_each_once_and_their_summaries_merge(jobs_file, tmp_path):
    root = tmp_path / "out"
    plan = _batch(str(jobs_file), "--out", str(root), "--dry-run", "--shard", "1/2")
    assert plan.exit_code == 0, plan.output
    assert plan.output.splitlines() == [
        "shard 1/2: 1 of 3 jobs (job k of the file, counted from 0, goes to shard k mod 2): #1 b",
        f"b: run (rtn int8 g32 of {tmp_path / 'mix'})"]
    assert not root.exists()

    first = _batch(str(jobs_file), "--out", str(root), "--quiet", "--shard", "0/2")
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["a", "c"]
    share0 = json.loads((root / "batch_summary.shard-0-of-2.json").read_text())
    assert share0["shard"] == "0/2" and [(r["job"], r["status"]) for r in share0["jobs"]] == [("a", "done"),
                                                                                          ("c", "done")]
    # worker 0 merged what there was: worker 1's job has not run yet
    early = json.loads((root / "batch_summary.json").read_text())
    assert [(r["job"], r["status"]) for r in early["jobs"]] == [("a", "done"), ("b", "pending"), ("c", "done")]
    # and --summary says so with its exit status
    waiting = _batch(str(jobs_file), "--out", str(root), "--summary")
    assert waiting.exit_code == 1 and "error: 1 of 3 jobs have not run yet" in waiting.stderr

    second = _batch(str(jobs_file), "--out", str(root), "--quiet", "--shard", "1/2")
    assert second.exit_code == 0, second.output
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["a", "b", "c"]
    runs = first.stderr + second.stderr
    for name in "abc":  # every job started exactly once, by one of the two workers
        assert runs.count(f"] {name}: starting") == 1, runs
    assert "] b: starting" in second.stderr and "] a: starting" not in second.stderr

    merged = json.loads((root / "batch_summary.json").read_text())
    share1 = json.loads((root / "batch_summary.shard-1-of-2.json").read_text())
    rows = {r["job"]: r for r in share0["jobs"] + share1["jobs"]}
    assert [r["job"] for r in merged["jobs"]] == ["a", "b", "c"]  # file order
    assert merged["jobs"] == [rows[n] for n in "abc"]  # copied from the shares, not recomputed
    assert merged["counts"] == {"done": 3, "skipped": 0, "failed": 0, "pending": 0}
    assert [s["shard"] for s in merged["shards"]] == ["0/2", "1/2"]
    md = (root / "batch_summary.md").read_text()
    assert all(f"| {n} | done | " in md for n in "abc") and "merged from shard 0/2" in md

    # each share resumes on its own: worker 0 again skips its finished jobs, touching nothing
    mtime = os.stat(root / "a" / "manifest.json").st_mtime_ns
    again = _batch(str(jobs_file), "--out", str(root), "--quiet", "--shard", "0/2")
    assert again.exit_code == 0 and "starting" not in again.stderr
    assert os.stat(root / "a" / "manifest.json").st_mtime_ns == mtime
    final = _batch(str(jobs_file), "--out", str(root), "--summary")
    assert final.exit_code == 0, final.output
    statuses = {r["job"]: r["status"] for r in json.loads((root / "batch_summary.json").read_text())["jobs"]}
    assert statuses == {"a": "skipped", "b": "done", "c": "skipped"}  # the newest share's row wins


@pytest.mark.parametrize("shard", ["0/0", "2/2", "3/2", "a/b", "-1/2", "1", "1/2/3"])
def test_a_bad_shard_is_one_error_line_and_nothing_runs(jobs_file, tmp_path, shard):
    result = _batch(str(jobs_file), "--out", str(tmp_path / "out"), "--shard", shard)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: --shard ") and shard in result.stderr
    assert not (tmp_path / "out").exists()


def test_summary_needs_share_summaries_and_names_a_damaged_one(jobs_file, tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    nothing = _batch(str(jobs_file), "--out", str(root), "--summary")
    assert nothing.exit_code == 2 and "holds no share summaries" in nothing.stderr
    assert nothing.stderr.count("\n") == 1
    both = _batch(str(jobs_file), "--out", str(root), "--summary", "--shard", "0/2")
    assert both.exit_code == 2 and "drop --shard" in both.stderr
    (root / "batch_summary.shard-1-of-2.json").write_text('{"jobs": [{"job": "a", "status": "great"}]}')
    damaged = _batch(str(jobs_file), "--out", str(root), "--summary")
    assert damaged.exit_code == 2 and damaged.stderr.count("\n") == 1
    assert "batch_summary.shard-1-of-2.json is not a share summary" in damaged.stderr and "'great'" in damaged.stderr
    assert not (root / "batch_summary.json").exists()
    (root / "batch_summary.shard-1-of-2.json").write_text("{not json")
    with pytest.raises(QuantMoeError, match="delete it and run that shard again"):
        merge_summaries([], root)
