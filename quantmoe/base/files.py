"""Atomic writes, hashes and manifests: nothing half-written is ever left under a final name.

Also what keeps one run's files safe from another's on a shared machine: only a folder holding a
quantmoe manifest is ever replaced (``check_replaceable``), work folders are private to their
owner (``private_dir``) and locked for the whole run (``RunLock``).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import platform
import secrets
import shutil
import stat
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


def _whole(t):
    """t in storage of its own, contiguous: a view of a larger tensor (``formats.gptq_v1.pack_result``'s) is
    copied out, as safetensors will not write tensors that share storage."""
    if t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t.contiguous()
    return t.clone(memory_format=torch.contiguous_format)


def save_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors.save_file through a temp name, so a crash never leaves a torn shard."""

    path = Path(path)
    tmp = temp_path(path)
    try:
        save_file({k: _whole(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)
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


def file_hashes(folder: Path, known: dict[str, str] | None = None) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} of every file under folder except the manifest.

    ``known``: sha256 by relative path of files that this process hashed as it wrote them into a folder
    private to it (the export's shards), taken instead of reading them again; every other file is read.
    """
    known = known or {}
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            name = p.relative_to(folder).as_posix()
            out[name] = {"sha256": known.get(name) or sha256_file(p), "bytes": p.stat().st_size}
    return out


def versions() -> dict[str, str]:



    return {"quantmoe": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def hash_json(obj) -> str:
    """sha256 of ``obj`` as JSON with sorted keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def made_from(folder: Path) -> str | None:
    """The source model's identity (``Checkpoint.identity``) that an export's manifest records, or None where
    the folder has no usable manifest or it records none."""
    manifest, _ = read_manifest(folder)
    inputs = manifest.get("inputs") if isinstance(manifest, dict) else None
    source = inputs.get("model") if isinstance(inputs, dict) else None
    return source if isinstance(source, str) else None


def write_manifest(folder: Path, extra: dict, files: dict[str, dict] | None = None) -> dict:
    """manifest.json: ``files`` (``file_hashes`` of the folder, computed here unless given) and ``extra``."""
    manifest = {"files": file_hashes(folder) if files is None else files, **extra}
    atomic_write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> tuple[dict | None, str | None]:
    """(the manifest, None), or (None, why it cannot be used): missing, a link, not JSON, not an object
    whose ``files`` map each name to its sha256."""
    path = Path(folder) / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None, f"{path} is missing" if not path.is_symlink() else f"{path} is a symbolic link, not a file"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        return None, f"{path} is unreadable ({exc})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(m, dict) and isinstance(m.get("sha256"), str)
                                              for m in files.values()):
        return None, f"{path} is malformed (it needs \"files\": {{name: {{\"sha256\": ...}}}})"
    return manifest, None


def check_manifest(folder: Path) -> list[str]:
    """Problems found comparing the folder with its manifest (empty when it matches)."""
    folder = Path(folder)
    manifest, why = read_manifest(folder)
    if manifest is None:
        return [why]
    listed = manifest["files"]
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


def check_tree(folder: Path) -> list[str]:
    """What an export must not hold, at any depth: symbolic links (to files or folders), hidden
    files or folders, and anything that is not a regular file or folder. Links are never followed."""
    problems = []
    for root, dirs, files in os.walk(folder):  # os.walk lists a link to a folder but does not enter it
        for name in sorted(dirs + files):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                problems.append(f"{rel}: a symbolic link (an export holds only regular files)")
            elif name.startswith("."):
                problems.append(f"{rel}: a hidden {'folder' if stat.S_ISDIR(mode) else 'file'} (stray file: an export "
                                "holds nothing hidden)")
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                problems.append(f"{rel}: not a regular file (an export holds only regular files)")
    return problems


def is_quantmoe_output(folder: Path) -> bool:
    """True for a folder that quantmoe wrote: it holds a quantmoe ``manifest.json`` (a regular file)."""
    manifest, _ = read_manifest(folder)
    made_with = manifest.get("versions") if manifest is not None else None
    return isinstance(made_with, dict) and "quantmoe" in made_with


def check_replaceable(final: Path, overwrite: bool) -> None:
    """Raise unless ``final`` may be replaced: it does not exist, or ``overwrite`` is set and it is a
    quantmoe output (or an empty folder). Anything else is the user's, and is never deleted."""
    final = Path(final)
    if not final.exists() and not final.is_symlink():
        return
    if not overwrite:
        raise QuantMoeError(f"{final} already exists; pass --overwrite or choose another --out")
    if final.is_symlink() or not final.is_dir():
        raise QuantMoeError(f"--out {final} is {'a link' if final.is_symlink() else 'a file'}, not an output folder "
                            "of quantmoe; --overwrite replaces only those: choose another --out")
    if not is_quantmoe_output(final) and any(final.iterdir()):
        raise QuantMoeError(f"--out {final} is not an output folder of quantmoe (it has no quantmoe {MANIFEST}); "
                            "--overwrite replaces only those, so nothing was deleted: choose another --out")


def replace_dir(staging: Path, final: Path, overwrite: bool) -> None:
    """Move a finished staging folder to its final name; the old one goes only after the new one is in place.
    Only a quantmoe output is ever replaced (``check_replaceable``)."""
    final = Path(final)
    check_replaceable(final, overwrite)
    if final.exists():
        old = final.with_name(f".{final.name}.old{os.getpid()}")
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner can enter (0700), created if missing.

    A folder that already exists must be a real folder (not a link) owned by this user: one that
    someone else made, e.g. planted beside ``--out`` in a shared /tmp, is refused rather than
    trusted, emptied or written into.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise QuantMoeError(f"{path} is {'a link' if stat.S_ISLNK(info.st_mode) else 'a file'}, not a work folder; "
                            "remove it or choose another --out")
    if info.st_uid != os.getuid():
        raise QuantMoeError(f"the work folder {path} belongs to another user (uid {info.st_uid}); quantmoe neither "
                            "trusts nor deletes it: ask them to remove it, or choose another --out")
    if stat.S_IMODE(info.st_mode) != 0o700:
        path.chmod(0o700)
    return path


def clear_dir(path: Path, keep: tuple[str, ...] = ()) -> None:
    """Delete everything in ``path`` except the names in ``keep`` (links are removed, never followed)."""
    for entry in Path(path).iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


class RunLock:
    """An exclusive lock on a work folder (``flock`` on its ``LOCK_NAME`` file), held for a whole run,
    so two runs never write the same ``--out``: the second gets an error naming the first's pid.

    A process holds at most one lock per folder: locking a folder again (an earlier call in this
    process failed, and its traceback still holds that lock) takes the old lock over.
    """

    LOCK_NAME = ".lock"
    _held: dict[str, RunLock] = {}  # lock file -> the lock this process holds on it

    def __init__(self, folder: Path):
        self.path = Path(folder) / self.LOCK_NAME
        self.fd: int | None = None
        earlier = RunLock._held.pop(str(self.path), None)
        if earlier is not None:
            earlier.release()
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise QuantMoeError(f"another quantmoe run (pid {holder}) is writing this --out (its work folder "
                                    f"{folder} is locked); wait for it to finish, or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file that its last holder removed while this run was opening it
                self.fd = fd
            else:
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        RunLock._held[str(self.path)] = self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if RunLock._held.get(str(self.path)) is self:
            del RunLock._held[str(self.path)]

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
