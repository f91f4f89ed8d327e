"""Atomic writes, hashes and manifests: nothing half-written is ever left under a final name."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import shutil
from pathlib import Path

import safetensors
import torch
import transformers
from safetensors.torch import save_file

from .errors import QuantMoeError
from .version import __version__

MANIFEST = "manifest.json"


def write_error(path: Path, exc: OSError) -> QuantMoeError:
    """A failed write as a one-line error; a full disk is the usual cause, and a re-run resumes."""
    return QuantMoeError(f"could not write {path} ({exc.strerror or exc}); free disk space or choose another --out, "
                         "then re-run the same command (finished layers are kept)")


def temp_path(path: Path) -> Path:
    """A hidden name beside ``path`` that no other process picks: workers on several hosts may write
    the same file of a shared folder (batch --shard's merged summary), and their pids may coincide
    (every container's first process is pid 1)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors.save_file through a temp name, so a crash never leaves a torn shard."""

    path = Path(path)
    tmp = temp_path(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: Path) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} of every file under folder except the manifest."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            out[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def versions() -> dict[str, str]:



    return {"quantmoe": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def write_manifest(folder: Path, extra: dict) -> dict:
    manifest = {"files": file_hashes(folder), **extra}
    atomic_write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def check_manifest(folder: Path) -> list[str]:
    """Problems found comparing the folder with its manifest (empty when it matches)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return [f"{path} is missing"]
    try:
        listed = json.loads(path.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return [f"{path} is unreadable ({exc})"]
    problems = []
    actual = file_hashes(folder)
    for name, meta in listed.items():
        if name not in actual:
            problems.append(f"{name}: listed in the manifest but missing")
        elif actual[name]["sha256"] != meta["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (file changed or corrupt)")
    for name in actual:
        if name not in listed:
            problems.append(f"{name}: not listed in the manifest (stray file)")
    return problems


def replace_dir(staging: Path, final: Path, overwrite: bool) -> None:
    """Move a finished staging folder to its final name; the old one goes only after the new one is in place."""
    final = Path(final)
    if final.exists():
        if not overwrite:
            raise QuantMoeError(f"{final} already exists; pass --overwrite or choose another --out")
        old = final.with_name(f".{final.name}.old{os.getpid()}")
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
