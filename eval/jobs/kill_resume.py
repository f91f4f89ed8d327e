"""Stop ``quantmoe batch eval/jobs/demo.toml`` inside a job, twice, and run it again; check that only
what was missing is redone and that the results equal an uninterrupted run.

    python eval/jobs/kill_resume.py --reference quantmoe-out/batch-demo --root /tmp/batch-demo-kill \
        --log eval/results/batch-demo-kill-resume.md

``--reference`` is the ROOT of an uninterrupted ``quantmoe batch eval/jobs/demo.toml --out REF``.
Into a fresh ``--root``, the batch is run four times:
1. Ctrl-C (SIGINT) once job 2 (mixtral-demo-rtn-int4-g128) has 2 of its 4 layers finished;
2. SIGKILL once job 4 (qwen2moe-demo-gptq-int4-g128) has 2 of its 4 layers finished;
3. to the end; 4. once more, with nothing left to do.
Then every job's shards are compared (sha256, from the manifests) with the reference run's, and every
summary row with the job's own eval_report.json. Writes the log as Markdown to ``--log``.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

JOBS_FILE = Path(__file__).resolve().parent / "demo.toml"
STOPS = [("mixtral-demo-rtn-int4-g128", 2, signal.SIGINT), ("qwen2moe-demo-gptq-int4-g128", 2, signal.SIGKILL)]
REPORTED = {"ppl_original": ("results", "original", "perplexity"), "ppl_quantized": ("results", "quantized", "perplexity"),
            "gap_absolute": ("gap", "absolute"), "gap_relative": ("gap", "relative"),
            "bits_per_weight": ("quantization", "bits_per_weight"), "size_bytes": ("quantization", "size_bytes")}


def state(root: Path) -> str:
    """Finished job folders and the layers each unfinished job has in its work folder."""
    done = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.exists() else []
    work = {p.name[1:-len(".quantmoe-work")]: len(list((p / "layers").glob("layer-*.json")))
            for p in sorted(root.glob(".*.quantmoe-work"))} if root.exists() else {}
    return (f"finished folders: {', '.join(done) or 'none'}; work folders: "
            + (", ".join(f"{k} ({v} layers)" for k, v in work.items()) or "none"))


def run(root: Path, stop: tuple[str, int, signal.Signals] | None) -> dict:
    """One ``quantmoe batch`` run; with ``stop`` = (job, layers, signal), the signal is sent once that
    job's work folder holds that many finished layers."""
    cmd = [sys.executable, "-m", "quantmoe", "batch", str(JOBS_FILE), "--out", str(root), "--quiet"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    at = None
    if stop is not None:
        job, layers, sig = stop
        marker = root / f".{job}.quantmoe-work" / "layers" / f"layer-{layers - 1:05d}.json"
        while not marker.exists() and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(sig)
            at = f"{sig.name} at {time.monotonic() - t0:.0f} s, once {marker.relative_to(root)} existed"
    stderr = proc.communicate()[1]
    return {"command": " ".join(["quantmoe", *cmd[3:]]), "signal": at, "exit": proc.returncode,
            "seconds": round(time.monotonic() - t0), "log": [line for line in stderr.splitlines() if line.strip()],
            "after": state(root)}


def shards(folder: Path) -> dict[str, str]:
    files = json.loads((folder / "manifest.json").read_text())["files"]
    return {name: meta["sha256"] for name, meta in files.items() if name.endswith(".safetensors") or name == "config.json"}


def dig(report: dict, path: tuple[str, ...]):
    for key in path:
        report = (report or {}).get(key)
    return report


def check(root: Path, reference: Path) -> tuple[list[str], bool]:
    summary = json.loads((root / "batch_summary.json").read_text())
    lines = ["| job | status (last run) | ppl quantized | gap | bits/weight | shards + config vs uninterrupted run "
             "| summary = job's eval_report.json |", "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    ok = True
    for row in summary["jobs"]:
        folder = root / row["job"]
        report = json.loads((folder / "eval_report.json").read_text())
        same_files = shards(folder) == shards(reference / row["job"])
        agrees = all(row[k] == dig(report, path) for k, path in REPORTED.items())
        ok &= same_files and agrees
        lines.append(f"| {row['job']} | {row['status']} | {row['ppl_quantized']:.4f} | {100 * row['gap_relative']:+.2f}% | "
                     f"{row['bits_per_weight']:.3f} | {'identical' if same_files else 'DIFFERENT'} ({len(shards(folder))} files) | "
                     f"{'yes' if agrees else 'NO'} ({', '.join(REPORTED)}) |")
    return lines, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, required=True, help="ROOT of an uninterrupted run of eval/jobs/demo.toml")
    ap.add_argument("--root", type=Path, required=True, help="a fresh folder for the interrupted runs")
    ap.add_argument("--log", type=Path, required=True, help="Markdown log to write")
    args = ap.parse_args()
    if args.root.exists():
        sys.exit(f"{args.root} exists; give a fresh --root")
    sys.path.insert(0, str(JOBS_FILE.parents[2]))
    from quantmoe.base.provenance import git_commit, machine

    runs = [run(args.root, stop) for stop in [*STOPS, None, None]]
    table, ok = check(args.root, args.reference)
    md = ["# Killing `quantmoe batch eval/jobs/demo.toml` inside a job, and running it again", "",
          f"quantmoe commit `{git_commit()}`; {machine()['summary']}; {time.strftime('%Y-%m-%d', time.gmtime())}. "
          f"Made by `python eval/jobs/kill_resume.py` (its docstring says what it does); the uninterrupted "
          f"reference run is eval/results/batch-demo.md.", ""]
    for n, r in enumerate(runs, 1):
        md += [f"## Run {n}: " + (r["signal"] or "to the end"), "", f"`{r['command']}` exited {r['exit']} after {r['seconds']} s.",
               "", "```", *r["log"], "```", "", f"Then: {r['after']}.", ""]
    md += ["## Result", "", *table, "",
           "All jobs equal the uninterrupted run and the summary agrees with every job's report." if ok else
           "**MISMATCH**: see the table.", ""]
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text("\n".join(md))
    print("\n".join(md))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
