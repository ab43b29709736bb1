"""One run per run folder: an OS lock (`flock`) on `<run folder>/.lock`, held by the main process for the whole run.

The OS drops the lock when its holder exits in any way (including kill -9), so a lock is never stale; the file keeps
the holder's pid, host, start time and command line, to name it to a second run, and is removed on a clean release,
so that a file found unlocked tells of a run that died. flock is local to one machine (and unreliable on
some network filesystems): runs on different nodes writing one folder on shared storage are not guarded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from finetune.errors import UserError

LOCK_NAME = ".lock"
NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}  # a filesystem without flock


class RunLock:
    """The held lock; `release()` (or process exit) gives it up."""

    def __init__(self, path: Path, handle, previous: dict | None, *, created_folder: bool = False):
        self.path = path
        self._handle = handle
        self.previous = previous  # the holder record a dead run left behind, if any
        self.created_folder = created_folder
        self.note: str | None = None  # why the folder could not be locked, when it could not

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Take the lock of `run_dir` (created if needed), or stop with one line naming the run that holds it."""
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        while True:
            handle = path.open("a+", encoding="utf-8")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(handle)
                handle.close()
                raise UserError(
                    f"{run_dir}: run folder in use by another run ({_describe(holder)}); wait for it to end or "
                    f"choose another output.dir"
                ) from None
            except OSError as err:
                if err.errno not in NO_FLOCK:
                    raise
                handle.close()  # some network filesystems (NFS without lockd, Lustre -o noflock) have no flock
                lock = cls(path, None, None, created_folder=False)
                lock.note = f"{run_dir}: its filesystem has no locks ({err.strerror}); the run folder is not locked"
                return lock
            # The holder before us may have removed the file between our open and our lock: then the lock is on
            # a file nobody else will open; start again with the file at the path.
            try:
                if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        previous = _read(handle)
        handle.seek(0)
        handle.truncate()
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:500],
        }
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        return cls(path, handle, previous, created_folder=created)

    def release(self) -> None:
        """Remove the lock file (a clean end leaves none; a killed run leaves its record) and unlock; remove the
        run folder too if this run created it and left nothing in it."""
        if self._handle is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        self._handle.close()  # closing the file releases the flock
        self._handle = None
        if self.created_folder:
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # only if empty


def _read(handle) -> dict | None:
    handle.seek(0)
    text = handle.read().strip()
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {"command": text[:200]}
    return record if isinstance(record, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    parts = [f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"]
    if holder.get("started"):
        parts.append(f"since {holder['started']}")
    if holder.get("command"):
        parts.append(f"`{holder['command']}`")
    return ", ".join(parts)


def describe_previous(lock: RunLock) -> str | None:
    """A line about a run that died holding the folder (its lock record was never cleared), if there was one, or
    about a folder that could not be locked."""
    if lock.note:
        return lock.note
    if not lock.previous:
        return None
    return f"the previous run in this folder ({_describe(lock.previous)}) did not end cleanly (killed or crashed)"
