"""Run the real ``python -m quantmoe`` in a subprocess, and compare folders byte for byte.

A subprocess is the only honest way to check what a user sees: the exit status, and a
stderr with one ``error:`` line and no traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import quantmoe

# The fast recipe every CLI test uses on the tiny models.
QUICK = ["--nsamples", "4", "--seqlen", "32", "--no-eval", "--group-size", "32", "--quiet"]


REPO = Path(__file__).resolve().parent.parent


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


# vary run to run (``replay``: a resumed run's replay of the layers before its first, logged with that layer)
MEASUREMENTS = {"seconds", "before_seconds", "timings", "peak_gpu_mb", "stage_peak_gpu_mb", "peak_rss_mb", "replay"}


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


class Stop(Exception):
    """Stands in for a crash right after a layer file is written (``stopped_after_layer``)."""


@contextmanager
def stopped_after_layer(monkeypatch, index: int):
    """Within it, a quantize run raises Stop right after layer ``index``'s file is written: a crash there,
    the finished layers left in the work folder for the next run to resume from."""
    import quantmoe.stages.quantize as pipeline

    real = pipeline.write_layer

    def write_layer(work, i, *args):
        file = real(work, i, *args)
        if i == index:
            raise Stop
        return file

    with monkeypatch.context() as m:
        m.setattr(pipeline, "write_layer", write_layer)
        yield


@contextmanager
def products_rounding_by_rows(monkeypatch):
    """Within it, every matrix product's result depends on how many rows it is made over, as on a GPU, where
    cuBLAS picks its kernel by the shapes: two runs give the same bytes only where they make each product over
    the same rows."""
    linear = torch.nn.functional.linear

    def by_rows(x, weight, bias=None):
        rows = x.numel() // x.shape[-1]
        return linear(x, weight, bias) * (1 + (rows % 7) * 2.0 ** -10)

    with monkeypatch.context() as m:
        m.setattr(torch.nn.functional, "linear", by_rows)
        yield


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


def one_process(src: Path, out: Path, calib: Path) -> Path:
    """The reference of the torchrun tests: ``src`` quantized in this process with one thread (as torchrun
    gives each process), group size 32, batches of 3, on CPU, no evaluation, into ``out``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        quantmoe.quantize(src, out, quantmoe.QuantConfig(group_size=32), calib=calib, nsamples=8, seqlen=64,
                          device="cpu", run_eval=False, quiet=True, batch_size=3)
    finally:
        torch.set_num_threads(threads)
    return out


def one_and_two_processes(src: Path, calib: Path, tmp_path: Path, *two_only: str) -> tuple[Path, Path]:
    """Quantize ``src`` in this process (one thread, as torchrun gives each process) into tmp_path/one and
    with two gloo processes under torchrun into tmp_path/two (group size 32, batches of 3, CPU; ``two_only``:
    more options for them alone, which must not change the bytes), and assert they wrote the same shards,
    byte for byte. Returns the two output folders."""
    one, two = one_process(src, tmp_path / "one", calib), tmp_path / "two"
    run = two_processes(src, two, calib, *two_only)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert_same_shards(one, two)
    return one, two


def two_processes(src: Path, out: Path, calib: Path, *options: str) -> subprocess.CompletedProcess:
    """``one_process``'s quantization with two gloo processes under torchrun (one thread each), into ``out``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "quantmoe", "quantize", str(src), "--out", str(out), "--calib", str(calib),
                           "--nsamples", "8", "--seqlen", "64", "--group-size", "32", "--batch-size", "3",
                           "--no-eval", "--quiet", "--device", "cpu", *options], env=env, capture_output=True,
                          text=True, timeout=600)


def assert_same_shards(a: Path, b: Path) -> None:
    """Both output folders hold the same model shards, byte for byte."""
    shards = sorted(p.name for p in a.glob("model*.safetensors*"))
    assert shards and shards == sorted(p.name for p in b.glob("model*.safetensors*"))
    for name in shards:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# A batch of `python -m quantmoe ...` runs that share one interpreter start: the imports every run pays
# (torch, transformers: seconds each) are made once, then each command runs in a fork of that process
# with its own stdout, stderr and exit status, as `python -m` runs it. What the imports printed is put
# at the head of every run's stderr, where a process of its own would have printed it.
_FORKED = r"""
import json, os, runpy, shutil, sys, tempfile, threading

spec, tmp = json.loads(sys.stdin.read()), tempfile.mkdtemp()
saved = [os.dup(1), os.dup(2)]
printed = [os.open(os.path.join(tmp, f"imports.{s}"), os.O_RDWR | os.O_CREAT, 0o600) for s in ("out", "err")]
os.dup2(printed[0], 1), os.dup2(printed[1], 2)
if spec["cli"]:
    import quantmoe.cli
    quantmoe.cli.main.callback(debug=False)  # the CLI's own setup (OpenMP and logging), made before torch is imported
for name in spec["preload"]:
    __import__(name)
sys.stdout.flush(), sys.stderr.flush()
os.dup2(saved[0], 1), os.dup2(saved[1], 2)
assert threading.active_count() == 1, "the imports started threads, which a fork would not carry"
for fd in (*saved, *printed):
    os.close(fd)
printed = [open(os.path.join(tmp, f"imports.{s}"), "rb").read() for s in ("out", "err")]
runs, pids = spec["commands"], {}
for n, argv in enumerate(runs):
    if len(pids) >= spec["jobs"]:
        pid, status = os.wait()
        runs[pids.pop(pid)] = os.waitstatus_to_exitcode(status)
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child ends as the interpreter ends a `python -m`/`-c` run: nothing here catches it
        for fd, s in ((1, "out"), (2, "err")):
            f = os.open(os.path.join(tmp, f"{n}.{s}"), os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(f, printed[fd - 1])
            os.dup2(f, fd), os.close(f)
        if spec["cli"]:
            sys.argv = ["-m", *argv]
            runpy.run_module("quantmoe", run_name="__main__", alter_sys=True)
        else:  # python -c CODE ARGS...
            sys.argv = ["-c", *argv[1:]]
            exec(compile(argv[0], "<string>", "exec"), {"__name__": "__main__"})
        sys.exit(0)
    pids[pid] = n
while pids:
    pid, status = os.wait()
    runs[pids.pop(pid)] = os.waitstatus_to_exitcode(status)
results = [[rc, *(open(os.path.join(tmp, f"{n}.{s}"), encoding="utf-8", errors="replace").read()
                  for s in ("out", "err"))] for n, rc in enumerate(runs)]
shutil.rmtree(tmp)
print(json.dumps(results))
"""


def cli_forked(commands: list[list], preload: tuple[str, ...] = ("quantmoe.backends",), jobs: int = 2,
               timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Each of ``commands`` (the arguments after ``python -m quantmoe``) run as by :func:`cli`, ``jobs`` at a
    time, in forks of one process that imported ``preload`` first (what those commands import anyway)."""
    return _forked(commands, preload, jobs, timeout, cli=True)


def scripts_forked(code: str, args: list[list], preload: tuple[str, ...], jobs: int = 2, timeout: float = 600,
                   **kwargs) -> list[subprocess.CompletedProcess]:
    """``python -c code *a`` for each ``a`` of ``args``, as by subprocess.run(..., **kwargs), ``jobs`` at a time,
    in forks of one process that imported ``preload`` first."""
    return _forked([[code, *a] for a in args], preload, jobs, timeout, cli=False, **kwargs)


def _forked(commands, preload, jobs, timeout, cli, **kwargs):
    commands = [[str(a) for a in c] for c in commands]
    spec = {"commands": commands, "preload": list(preload), "jobs": jobs, "cli": cli}
    run = subprocess.run([sys.executable, "-c", _FORKED], input=json.dumps(spec), capture_output=True, text=True,
                         timeout=timeout, check=False, **kwargs)
    assert run.returncode == 0 and not run.stderr, run.stderr
    head = [sys.executable, "-m", "quantmoe"] if cli else [sys.executable, "-c"]
    return [subprocess.CompletedProcess([*head, *c], rc, out, err)
            for c, (rc, out, err) in zip(commands, json.loads(run.stdout))]
