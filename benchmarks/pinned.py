"""Fresh page-locked host memory on one GPU's host: what a layer's first copies to the host pay.

    python3 benchmarks/pinned.py [GB]      # writes $OUT/pinned.json (or ./pinned.json); default 5.64 GB

A device tensor of GB bytes (default: a DeepSeek-V3 MoE layer's packed 4-bit levels, 256 experts x 3 matrices of
2048 x 7168) is copied to the host with ``non_blocking=True`` twice, as gptq_v1.pack_result copies a layer's
packed tensors: the first copy allocates the page-locked block, the second reuses PyTorch's cached one. Each
setting runs in a fresh process: PyTorch's default (one cudaHostAlloc), then blocks made by malloc with their pages
touched by 8 and by 32 threads and registered with CUDA (PYTORCH_CUDA_ALLOC_CONF
pinned_use_cuda_host_register, pinned_num_register_threads: what quantmoe sets for CUDA runs,
base.measure.register_pinned_in_parallel). Seconds to queue the copy and until it is done.
"""
import json
import os
import subprocess
import sys
import time

SETTINGS = ["", "pinned_use_cuda_host_register:True,pinned_num_register_threads:8",
            "pinned_use_cuda_host_register:True,pinned_num_register_threads:32"]


def one(gigabytes: float) -> dict:
    import torch

    x = torch.empty(int(gigabytes * 1e9) // 4, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    out = {}
    for rep in ("first", "cached"):
        t0 = time.perf_counter()
        h = x.to("cpu", non_blocking=True)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        out[rep] = {"queue_s": round(t1 - t0, 3), "done_s": round(time.perf_counter() - t0, 3),
                    "pinned": h.is_pinned(), "gb": round(h.nbytes / 1e9, 3)}
        del h
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one(float(sys.argv[2]))))
        sys.exit()
    import torch

    gigabytes = float(sys.argv[1]) if len(sys.argv) > 1 else 256 * 3 * 2048 * 7168 / 2 / 1e9
    result = {"benchmark": "pinned", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cpus": len(os.sched_getaffinity(0)), "gigabytes": round(gigabytes, 3), "runs": []}
    for conf in SETTINGS:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
        if conf:
            env["PYTORCH_CUDA_ALLOC_CONF"] = conf
        done = subprocess.run([sys.executable, __file__, "--one", str(gigabytes)], env=env, check=True,
                              capture_output=True, text=True)
        result["runs"].append({"PYTORCH_CUDA_ALLOC_CONF": conf, **json.loads(done.stdout.splitlines()[-1])})
    path = os.path.join(os.environ.get("OUT", "."), "pinned.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
