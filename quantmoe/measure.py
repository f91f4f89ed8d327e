"""Wall time and peak memory of a stage, sampled while it runs."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import psutil
import torch


@contextmanager
def stage(record: dict, name: str, interval: float = 0.05):
    """Time the block and sample this process's RSS; store {seconds, peak_rss_mb, peak_gpu_mb} under record[name]."""
    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample():
        while not stop.wait(interval):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - t0
        stop.set()
        thread.join()
        peak[0] = max(peak[0], proc.memory_info().rss)
        record[name] = {
            "seconds": round(seconds, 3),
            "peak_rss_mb": round(peak[0] / 2**20, 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        }
