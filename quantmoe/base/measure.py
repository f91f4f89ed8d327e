"""Wall time and peak memory of a stage, sampled while it runs."""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from collections.abc import Iterator
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


class Stopwatch:
    """Seconds per named stage, summed over every entry into it, and on CUDA the peak GPU
    memory allocated inside each stage (MB).

    On CUDA the device is synchronised when an outermost stage begins and ends, so queued work is
    charged to the stage that queued it rather than to whichever stage next waits for the device. A
    stage entered inside another is timed on the device instead, between two events, without a wait:
    a pass over many small batches keeps the device fed (its stages per batch would otherwise wait for
    it twice a batch). Its seconds are added when the outermost stage ends. A name with a colon
    ("experts:gather") is a part timed inside the stages, not a stage of its own. ``peaks`` False: only
    the seconds (the device's peak-memory counter is left to an enclosing ``stage``).

    The peak is read and reset by outermost stages alone, and a stage inside one is given that outermost
    stage's peak (a bound on its own): reading PyTorch's counter builds its whole table of allocator
    statistics in Python, and a pass that read it in every stage of every batch was bound by that host time.
    """

    def __init__(self, device: torch.device, peaks: bool = True):
        self.device = device
        self.cuda = device.type == "cuda"
        self.peaks = peaks and self.cuda
        self.seconds: dict[str, float] = {}
        self.peak_gpu_mb: dict[str, float] = {}
        self._depth = 0
        self._timed: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []  # nested stages' events

    @contextmanager
    def __call__(self, name: str):
        nested = self.cuda and self._depth > 0
        if self.cuda and not nested:
            torch.cuda.synchronize(self.device)
        if self.peaks and not nested:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = self._event() if nested else None
        t0 = time.perf_counter()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if nested:
                self._timed.append((name, start, self._event()))
            elif self.cuda:
                torch.cuda.synchronize(self.device)
            if not nested:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                for inner, a, b in self._timed:  # all done: the device was just synchronised
                    self.seconds[inner] = self.seconds.get(inner, 0.0) + a.elapsed_time(b) / 1000
                if self.peaks:
                    peak = torch.cuda.max_memory_allocated(self.device) / 2**20
                    for inner in {name, *(inner for inner, _, _ in self._timed)}:
                        self.peak_gpu_mb[inner] = round(max(peak, self.peak_gpu_mb.get(inner, 0.0)), 1)
                self._timed.clear()

    def _event(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


class PeakRSS:
    """This process's resident memory, sampled in a thread; ``take()`` gives the peak (MB) since the last take."""

    def __init__(self, interval: float = 0.05):
        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def take(self) -> float:
        now = self.proc.memory_info().rss
        peak, self.peak = max(self.peak, now), now
        return round(peak / 2**20, 1)


MMAP_THRESHOLD = 1 << 20  # bytes: host allocations at least this large get their own mapping


def steady_host_memory() -> None:
    """Fix glibc's mmap threshold so that memory freed by one layer goes back to the OS.

    glibc serves allocations above a threshold with their own mmap, but raises the threshold
    to the size of every such block freed (up to 32 MiB). After the first layer frees its
    Hessians and weights, blocks of that size come from the heap instead, where fragmentation
    keeps them resident: peak RSS then grew by about one layer's weights over the first
    layers (benchmarks/streaming_memory.py: 598.6 MB for 2 layers, 698.5 MB for 8). Setting
    the threshold explicitly turns that adjustment off. Called once per process; a no-op
    without glibc.
    """
    try:

        M_MMAP_THRESHOLD = -3  # malloc.h
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


@contextmanager
def frozen_collector() -> Iterator[None]:
    """Inside the block, the objects that exist when it starts (the libraries' modules and functions, the
    model's skeleton: hundreds of thousands) are left out of the garbage collector's passes. A full pass
    scans every tracked object, and the layers' work makes enough objects that full passes come several
    times a layer; inside the block they scan only what the layers made. Objects freed by their reference
    counts go at once as ever; only the frozen ones' cycles wait until the block ends. A caller that froze
    objects itself (gc.freeze) keeps its own freeze: the block then leaves the collector as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def release_freed_memory() -> None:
    """Hand memory freed by the last layer back to the OS (glibc keeps it otherwise).

    Without this the allocator's free lists grow a little with every layer, so peak RSS
    would creep up with depth even though nothing is kept.
    """
    try:

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def cached_pinned_bytes() -> int:
    """Bytes of page-locked host blocks PyTorch keeps cached after they were freed: resident, but the next
    page-locked read or copy of the same sizes reuses them (0 without CUDA, or where torch does not say)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None or not torch.cuda.is_initialized():
        return 0
    found = stats()
    return max(0, int(found.get("allocated_bytes.current", 0)) - int(found.get("active_bytes.current", 0)))


# Threads that touch a new page-locked block's pages before CUDA registers it (PyTorch's
# pinned_num_register_threads); the gain levels off well before the host's cores run out.
PINNED_REGISTER_THREADS = 8
_PINNED_KEYS = ("pinned_use_cuda_host_register", "pinned_num_register_threads")


def register_pinned_in_parallel() -> None:
    """Make PyTorch's new page-locked host blocks with malloc, their pages touched by several threads, then
    registered with CUDA (``pinned_use_cuda_host_register``), instead of one cudaHostAlloc, which pins them on
    one thread under CUDA's global lock. The first MoE layer's packed copies and captures allocate several GB
    of them (later layers reuse the cached blocks): benchmarks/README.md. The rest of PYTORCH_CUDA_ALLOC_CONF
    (or PYTORCH_ALLOC_CONF) is passed on as it is, and a user's own choice of these settings is kept. For CUDA
    runs only (``model.stream.pick_device``); a PyTorch without the setting is left alone."""
    given = ",".join(v for v in (os.environ.get(k, "") for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"))
                     if v)
    if any(key in given for key in _PINNED_KEYS):
        return
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) \
        or getattr(getattr(torch.cuda, "memory", None), "_set_allocator_settings", None)
    if setter is None:
        return
    threads = max(1, min(PINNED_REGISTER_THREADS, len(os.sched_getaffinity(0))))
    setter(",".join(filter(None, (given, f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{threads}"))))


def release_pinned_memory() -> None:
    """Hand the page-locked host blocks that PyTorch caches after they are freed (the layers' captures kept
    in host memory) back to the OS. They are reused layer after layer, so this is for when the layers are
    done: otherwise the export would run with them still resident."""
    empty = getattr(torch._C, "_host_emptyCache", None)  # CUDA builds only
    if empty is not None and torch.cuda.is_initialized():
        empty()
