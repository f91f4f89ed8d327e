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
layer's whole trace takes longer to read back than the layer takes. `scale.py --layer-profile LAYER
[--layer-profile-stages S1,S2]` runs it on a checkpoint that scale.py wrote (quantmoe is the installed one, or the tree
on PYTHONPATH, as scale.py's --quantmoe sets it).
"""

from __future__ import annotations

import argparse
import json
import sys
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
    args, quantize = ap.parse_args(argv[:cut]), argv[cut + 1:]
    wanted = set(args.stages.split(",")) if args.stages else set()
    timed, run = Stopwatch.__call__, LayerQuantizer.run
    current: list[int] = []  # the index of the layer being quantized
    sessions: dict[str, dict] = {}
    active: list[str] = []

    @contextmanager
    def marked(self, name: str):
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
        try:
            if wanted:
                out = run(self)
            else:
                with profiled_into(whole, "stages"):
                    out = run(self)
        finally:
            current.clear()
        record = {"layer": args.layer, "command": quantize, "seconds": self.clock.rounded(), "stages": whole["stages"],
                  "first_entry_of": sessions if wanted else None}
        args.result.parent.mkdir(parents=True, exist_ok=True)
        args.result.write_text(json.dumps(record, indent=1))
        print(f"wrote {args.result}", flush=True)
        return out

    Stopwatch.__call__, LayerQuantizer.run = marked, profiled
    try:
        cli.main(["quantize", *quantize], standalone_mode=False)
    finally:
        Stopwatch.__call__, LayerQuantizer.run = timed, run
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
