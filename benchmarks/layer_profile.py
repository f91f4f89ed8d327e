"""Where one layer's quantization spends its time, by stage: `quantmoe quantize` run in this process with
one decoder layer under torch.profiler.

    python benchmarks/layer_profile.py LAYER RESULT.json [--stages S1,S2] -- MODEL --out OUT --calib CALIB [options]

Every stage the layer's clock times ("capture", "hessians", "experts:gate_up_solve", ...) is marked as a
profiler range; each kernel (and each copy) is charged to the nest of stages that launched it
("experts:down_statistics / hessians"). The result names each stage's seconds in the profiled layer (the
profiler slows the host: compare stages with each other, not with an unprofiled run) and, per nest, the
device time of its kernels (busy), the kernels that take the most of it, and the operators that take the
most host time themselves. A stage whose busy time is far below its seconds waits on the host. With
``--stages``, only the first entry into each named stage is profiled (``first_entry_of``): a DeepSeek-V3
layer's whole trace takes longer to read back than the layer takes. With ``--sample MS`` the whole run is also
sampled every MS milliseconds from a thread (the main thread's Python stack, as ``sys._current_frames`` shows it):
each sample's wait since the one before is charged to the innermost quantmoe lines and the nest of stages open then, for
the profiled layer from its construction (its load) to the next layer's (its write, and the wait for the next
read), as ``sampled``, with the garbage collector's pauses in that span. That shows where a stage, or the time outside every stage, waits on the host.
`scale.py --layer-profile LAYER
[--layer-profile-stages S1,S2]` runs it on a checkpoint that scale.py wrote (quantmoe is the installed one, or the tree
on PYTHONPATH, as scale.py's --quantmoe sets it).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from quantmoe.base.measure import Stopwatch
from quantmoe.cli import main as cli
from quantmoe.stages.layer import LayerQuantizer

TOP = 8  # kernels kept per stage
MARK = "stage:"
SAMPLED_TOP = 12  # lines kept per stage by --sample


class Sampler:
    """The main thread's Python stack every ``interval`` seconds, while ``layer`` says which layer is being
    quantized and ``stages`` which stages are open: seconds per (stage, innermost quantmoe line, its callers).
    ``interval`` None: it only keeps ``layer``, ``stages`` and ``running``, and samples nothing."""

    def __init__(self, interval: float | None):
        self.interval, self.layer, self.stages, self.running = interval, None, [], False
        self.seconds: dict[int, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.collections: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
        self._collecting = 0.0

    def _collected(self, phase: str, info: dict) -> None:  # gc.callbacks: the garbage collector's pauses
        if phase == "start":
            self._collecting = time.perf_counter()
        elif self.layer is not None:
            row = self.collections[self.layer][f"generation {info['generation']}" + ("" if self.running else ", outside its run")]
            row[0] += 1
            row[1] += time.perf_counter() - self._collecting

    def __enter__(self):
        if self.interval is not None:
            gc.callbacks.append(self._collected)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.interval is not None:
            self._stop.set()
            self._thread.join()
            gc.callbacks.remove(self._collected)

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self._main)
            now = time.perf_counter()
            if frame is None or self.layer is None:
                last = now
                continue
            lines = []
            while frame is not None and len(lines) < 4:
                code = frame.f_code
                if "/quantmoe/" in code.co_filename and "/benchmarks/" not in code.co_filename:
                    lines.append(f"{Path(code.co_filename).stem}.{code.co_name}:{frame.f_lineno}")
                frame = frame.f_back
            stage = " / ".join(self.stages) or "(outside the stages)"
            self.seconds[self.layer][stage][" < ".join(lines) or "(no quantmoe frame)"] += now - last
            last = now

    def summary(self, layer: int) -> dict:
        out = {"garbage collections": {g: {"count": n, "seconds": round(t, 3)}
                                       for g, (n, t) in sorted(self.collections.get(layer, {}).items())}}
        for stage, rows in sorted(self.seconds.get(layer, {}).items(), key=lambda kv: -sum(kv[1].values())):
            top = sorted(rows.items(), key=lambda kv: -kv[1])[:SAMPLED_TOP]
            out[stage] = {"seconds": round(sum(rows.values()), 3),
                          "top": [{"where": k, "seconds": round(v, 3)} for k, v in top]}
        return out


def charge(events) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per nest of stage ranges ("experts:down_statistics / hessians"): (device milliseconds of each kernel launched inside it, host milliseconds
    each operator spent itself inside it)."""
    def table():
        return defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    device, host = table(), table()
    for e in events:
        if e.name.startswith(MARK):
            continue
        marks, parent = [], e.cpu_parent
        while parent is not None:
            if parent.name.startswith(MARK) and parent.name[len(MARK):] not in marks:
                marks.append(parent.name[len(MARK):])
            parent = parent.cpu_parent
        owner = " / ".join(reversed(marks)) or "unmarked"
        row = host[owner][e.name]
        row[0] += 1
        row[1] += e.self_cpu_time_total / 1e3
        for k in e.kernels:
            row = device[owner][k.name]
            row[0] += 1
            row[1] += k.duration / 1e3
    return device, host


def _top(rows: dict[str, list[float]]) -> list[dict]:
    return [{"name": k[:100], "calls": n, "ms": round(ms, 1)}
            for k, (n, ms) in sorted(rows.items(), key=lambda kv: -kv[1][1])[:TOP]]


def summary(device: dict[str, dict], host: dict[str, dict]) -> dict:
    out = {}
    busy = {name: sum(ms for _, ms in rows.values()) for name, rows in device.items()}
    for name in sorted(set(device) | set(host), key=lambda n: -busy.get(n, 0.0)):
        kernels, ops = device.get(name, {}), host.get(name, {})
        out[name] = {"busy_ms": round(busy.get(name, 0.0), 1),
                     "kernels": sum(n for n, _ in kernels.values()),
                     "host_ms": round(sum(ms for _, ms in ops.values()), 1),
                     "top": _top(kernels), "host_top": _top(ops)}
    return out


@contextmanager
def profiled_into(record: dict, key: str):
    """Profile the block (waiting for the device at its end) and put its ``summary`` under record[key]."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    record[key] = summary(*charge(prof.events()))


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    cut = argv.index("--")
    ap = argparse.ArgumentParser(prog="layer_profile.py")
    ap.add_argument("layer", type=int)
    ap.add_argument("result", type=Path)
    ap.add_argument("--stages", help="comma-separated stage names: profile only the first entry into each "
                                     "(a smaller trace, for layers whose whole profile is too large to read back)")
    ap.add_argument("--sample", type=float, metavar="MS", help="also sample the main thread's stack every MS ms")
    args, quantize = ap.parse_args(argv[:cut]), argv[cut + 1:]
    wanted = set(args.stages.split(",")) if args.stages else set()
    timed, run, init = Stopwatch.__call__, LayerQuantizer.run, LayerQuantizer.__init__
    sampler = Sampler(args.sample / 1e3 if args.sample else None)
    current: list[int] = []  # the index of the layer being quantized
    sessions: dict[str, dict] = {}
    active: list[str] = []

    @contextmanager
    def marked(self, name: str):
        sampler.stages.append(name)
        try:
            with _marked(self, name):
                yield
        finally:
            sampler.stages.pop()

    @contextmanager
    def _marked(self, name: str):
        if current != [args.layer] or name not in wanted or name in sessions or active:
            with record_function(MARK + name), timed(self, name):
                yield
            return
        active.append(name)
        try:
            with profiled_into(sessions, name), record_function(MARK + name), timed(self, name):
                yield
        finally:
            active.clear()

    def profiled(self):
        if self.index != args.layer:
            return run(self)
        current[:] = [self.index]
        whole = {"stages": None}
        sampler.running = True
        try:
            if wanted:
                out = run(self)
            else:
                with profiled_into(whole, "stages"):
                    out = run(self)
        finally:
            current.clear()
            sampler.running = False
        records.append({"layer": args.layer, "command": quantize, "seconds": self.clock.rounded(),
                        "stages": whole["stages"], "first_entry_of": sessions if wanted else None})
        save()
        return out

    def save() -> None:
        record = dict(records[0])
        if args.sample:
            record["sampled"] = {"interval_ms": args.sample, "stages": sampler.summary(args.layer)}
        args.result.parent.mkdir(parents=True, exist_ok=True)
        args.result.write_text(json.dumps(record, indent=1))
        print(f"wrote {args.result}", flush=True)

    def constructed(self, stream, index, *a, **kw):
        sampler.layer = index
        init(self, stream, index, *a, **kw)

    records: list[dict] = []
    Stopwatch.__call__, LayerQuantizer.run, LayerQuantizer.__init__ = marked, profiled, constructed
    try:
        with sampler:
            cli.main(["quantize", *quantize], standalone_mode=False)
    finally:
        Stopwatch.__call__, LayerQuantizer.run, LayerQuantizer.__init__ = timed, run, init
    if records and args.sample:  # again, with the samples taken up to the next layer's construction
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
