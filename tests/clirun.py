"""Run the real ``python -m quantmoe`` in a subprocess, and compare folders byte for byte.

A subprocess is the only honest way to check what a user sees: the exit status, and a
stderr with one ``error:`` line and no traceback.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# The fast recipe every CLI test uses on the tiny models.
QUICK = ["--nsamples", "4", "--seqlen", "32", "--no-eval", "--group-size", "32", "--quiet"]


def quantize_args(model, out, calib, *extra) -> list[str]:
    return ["quantize", str(model), "--out", str(out), "--calib", str(calib), *QUICK, *extra]


def cli(*args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantmoe", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def start(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "quantmoe", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll until ``path`` exists; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {path} appeared:\n" + \
            proc.stderr.read()
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout}s"
        time.sleep(0.005)


def one_error_line(stderr: str) -> str:
    """The only line of stderr, which must be an ``error:`` line (so: no traceback, no warnings)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one error line:\n{stderr}"
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder (hidden ones too), by relative path."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


MEASUREMENTS = {"seconds", "timings", "peak_gpu_mb", "stage_peak_gpu_mb", "peak_rss_mb"}  # vary run to run


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in MEASUREMENTS}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def content(folder: Path) -> dict:
    """What must be identical between two runs of the same command: every file byte for byte,
    except the two that record wall times (the manifest's stages, the log's seconds)."""
    out = {k: v for k, v in digest(folder).items() if k not in ("manifest.json", "quantization_log.json")}
    out["quantization_log.json (no timings)"] = _without_timings(json.loads((Path(folder) / "quantization_log.json").read_text()))
    out["manifest.json files"] = {k: v for k, v in json.loads((Path(folder) / "manifest.json").read_text())["files"].items()
                                  if k != "quantization_log.json"}
    return out


class Hang(Exception):
    """An in-process command ran past its time limit (the CLI then reports it as an internal error, which
    the tests refuse)."""


@contextmanager
def time_limit(seconds: float):
    """Raise Hang in this (main) thread after ``seconds``: a hostile input must not hang a command."""
    def expire(signum, frame):
        raise Hang(f"ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
