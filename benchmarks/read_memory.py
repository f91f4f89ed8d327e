"""Peak RSS and seconds of reading one FP8 MoE layer as the quantize pipeline reads it (LayerStream.layer_state
with keep_dtype: codes and scales as stored), on CPU, for one or more quantmoe source trees.

    python benchmarks/read_memory.py --trees /path/to/old-quantmoe /path/to/this-quantmoe --out results/x.json

The checkpoint is scale.py's DeepSeek-V3 structure (--reduced widths, with the overrides below so that
the MoE layer holds about 3 GB of FP8), written once into --work. Each tree is measured in its own
process: the RSS before the read, the peak while reading (sampled every 2 ms) and the bytes the layer
holds afterwards; ``extra_mb`` is what the read held beyond the layer itself (the shards' mapped pages);
``read_seconds``, the read's wall time (the shards in the page cache: the checkpoint was just written or
read). ``--repeat`` measures the trees in turn that many times.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OVERRIDES = {"hidden_size": 2048, "moe_intermediate_size": 2048, "n_routed_experts": 256}

MEASURE = r"""
import json, sys, threading, time
tree, folder = sys.argv[1], sys.argv[2]
sys.path.insert(0, tree)
import psutil, torch
import quantmoe
from quantmoe.base.measure import steady_host_memory
from quantmoe.model.checkpoint import Checkpoint
from quantmoe.model.stream import LayerStream
assert quantmoe.__file__.startswith(tree), quantmoe.__file__
steady_host_memory()  # as quantize does
proc, peak, stop = psutil.Process(), [0], threading.Event()
ckpt = Checkpoint(folder)
stream = LayerStream(ckpt, torch.device("cpu"))
ckpt.close()
time.sleep(0.2)
before = proc.memory_info().rss
def sample():
    while not stop.wait(0.002):
        peak[0] = max(peak[0], proc.memory_info().rss)
thread = threading.Thread(target=sample)
thread.start()
t0 = time.perf_counter()
state = stream.layer_state(1, keep_dtype=True)
seconds = time.perf_counter() - t0
stop.set()
thread.join()
held = sum(t.nbytes for t in state.values())
print(json.dumps({"tree": tree, "layer_mb": round(held / 2**20), "rss_before_mb": round(before / 2**20),
                  "peak_rss_mb": round(peak[0] / 2**20), "extra_mb": round((peak[0] - before - held) / 2**20),
                  "read_seconds": round(seconds, 2)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs="+", required=True, help="quantmoe source trees (folders holding quantmoe/)")
    ap.add_argument("--work", default="/tmp/quantmoe-read-memory", help="where the checkpoint is written (once)")
    ap.add_argument("--out", required=True, help="the result JSON")
    ap.add_argument("--repeat", type=int, default=1, help="measure the trees in turn this many times")
    args = ap.parse_args()
    folder = Path(args.work) / "deepseek-v3-fp8-2L"
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(HERE))
        sys.path.insert(0, str(HERE.parent))
        import scale

        scale.make_checkpoint(folder, "deepseek-v3", 2, reduced=True, source="fp8", device="cpu", overrides=OVERRIDES)
    runs = []
    for tree in args.trees * args.repeat:
        done = subprocess.run([sys.executable, "-c", MEASURE, str(Path(tree).resolve()), str(folder)],
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(runs[-1])
    result = {"benchmark": "benchmarks/read_memory.py", "shape_name": "deepseek-v3", "source": "fp8", "reduced": True,
              "overrides": OVERRIDES, "layer": 1, "machine": platform.machine(), "python": platform.python_version(),
              "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
