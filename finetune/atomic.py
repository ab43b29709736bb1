"""Folders that are either complete or absent: written beside their destination, fsynced, renamed into place, with
a manifest (every file, its size and sha256) written last, so that a reader can tell a whole folder from one that a
kill, a full disk or a flipped bit left behind.

Cost: hashing reads every byte once more after writing (about 1 s per GB); the manifest check on resume reads them
again. For a LoRA run that is milliseconds; for a full 2B checkpoint with optimizer state, tens of seconds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds either its old content or all of `text`, never a part (written aside, fsynced, renamed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:  # a write's OSError names no file: the error line must
        err.filename = err.filename or str(path)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_manifest(folder: Path) -> None:
    """Fsync every file of `folder`, then record it (relative path, size, sha256) in `manifest.json`, atomically."""
    entries = {}
    for path in _files(folder):
        fsync_path(path)
        entries[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    for sub in sorted({p.parent for p in _files(folder)}, reverse=True):
        fsync_path(sub)
    write_text_atomic(folder / MANIFEST, json.dumps({"files": entries}, indent=1, sort_keys=True) + "\n")


def manifest_problem(folder: Path, *, required: tuple[str, ...] = ()) -> str | None:
    """What is wrong with `folder` against its manifest (one phrase naming the file), or None if it is whole: every
    listed file present with its size and sha256, every `required` file listed."""
    path = folder / MANIFEST
    if not path.is_file():
        return f"{MANIFEST} is missing (never completed, or written before checkpoints had manifests)"
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{MANIFEST} is unreadable"
    for name in required:
        if name not in files:
            return f"{name} is missing (required to continue the run exactly)"
    for name, entry in sorted(files.items()):
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry.get("size"):
            return f"{name} is {size} bytes, the manifest says {entry.get('size')} (truncated or replaced)"
        if sha256_of(file) != entry.get("sha256"):
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


def _aside(dest: Path, what: str) -> Path:
    return dest.with_name(f".{dest.name}.{what}")


def staging_path(dest: Path) -> Path:
    """Where `staging_folder(dest)` stages `dest`'s next content (the same on every process)."""
    return _aside(Path(dest), "tmp")


def recover(dest: Path) -> None:
    """Undo what a kill between the two renames of `commit` left: the previous folder put aside and no new one in
    place (the previous one comes back). Removes a half-written new folder."""
    old, tmp = _aside(dest, "old"), _aside(dest, "tmp")
    if old.exists() and not dest.exists():
        os.replace(old, dest)
    for leftover in (old, tmp):
        if leftover.exists():
            shutil.rmtree(leftover)


def staging_folder(dest: Path) -> Path:
    """A fresh, empty folder beside `dest` to write `dest`'s next content into (see `commit`)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest)
    tmp = staging_path(dest)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, dest: Path, *, manifest: bool = True) -> None:
    """Make the staged folder `tmp` the content of `dest`: files fsynced, manifest written last, renamed into place
    (an earlier `dest` stays whole until the rename)."""
    if manifest:
        write_manifest(tmp)
    if dest.exists():
        old = _aside(dest, "old")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dest)
    fsync_path(dest.parent)


@contextlib.contextmanager
def atomic_folder(dest: Path, *, manifest: bool = True) -> Iterator[Path]:
    """Yield a fresh folder to write into; on a clean exit it replaces `dest` (see `commit`). On an error the
    partial folder is removed and `dest` is untouched."""
    dest = Path(dest)
    tmp = staging_folder(dest)
    try:
        yield tmp
        commit(tmp, dest, manifest=manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_error(err: BaseException, folder: Path) -> str | None:
    """For an error raised while writing into `folder`: `PATH: [Errno N ENAME] reason` when the machine refused the
    write (disk full, quota, read-only, permission), else None (a bug, to be raised as is). Call it before removing
    what the failed write left (that frees the space). torch.save writes through C++ streams ("basic_ios::clear:
    iostream error", "unexpected pos") and safetensors through Rust ("os error 28"), losing or burying the errno:
    it is read from the message, or recovered by a small probe write into the same folder."""
    if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
        return f"{err.filename or folder}: {describe_errno(err.errno)}"
    if isinstance(err, OSError) or type(err).__name__ not in ("RuntimeError", "SafetensorError"):
        return None
    found = re.search(r"(?:os error|Errno) (\d+)", str(err))
    if found and int(found.group(1)) in WRITE_ERRNOS:
        return f"{folder}: {describe_errno(int(found.group(1)))}"
    probe_folder = folder if folder.is_dir() else folder.parent
    probe = probe_folder / f".write-probe-{os.getpid()}"
    try:
        with probe.open("wb") as handle:
            handle.write(b"\0" * _CHUNK)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as probe_err:
        if probe_err.errno in WRITE_ERRNOS:
            return f"{folder}: {describe_errno(probe_err.errno)}"
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}


def describe_errno(code: int) -> str:
    return f"[Errno {code} {errno.errorcode.get(code, '?')}] {os.strerror(code)}"
