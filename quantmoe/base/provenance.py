"""Where numbers were measured: the machine, the library versions and the quantmoe commit."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil
import torch

from .paths import PACKAGE

# The checkout the package runs from, when it is one (an installed wheel has no git history).
CHECKOUT = PACKAGE.parent


def optional_versions() -> dict[str, str]:
    """Versions of the optional libraries that backends' numbers depend on (bitsandbytes), where installed."""

    out = {}
    for name in ("bitsandbytes",):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: other work on the machine slows every row alike, and shows here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict:
    """What the numbers were measured on."""

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "gpu": gpu,
            "platform": platform.platform(), "summary": f"{cores}-core CPU ({cpu})" + (f", {gpu}" if gpu else ", no GPU")}


def git_commit() -> str | None:
    """The quantmoe commit the numbers came from (``-dirty`` with uncommitted changes), if it is a git checkout."""

    try:
        sha = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(CHECKOUT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")
