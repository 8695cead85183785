"""Advisory file locks (flock) that a process holds for a whole run.

An exclusive holder writes its pid into the lock file, so a refused process can name it. flock
conflicts between processes, and between two opens in one process; a lock this process already
holds is taken again without a second open (in-process runs, one after another).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)
HELD: dict[Path, IO[str]] = {}  # the locks this process holds, by lock file


class LockBusy(Exception):
    """Another process holds a conflicting lock; `holder` is the pid an exclusive holder wrote, or "unknown";
    `shared`: the holders hold it shared (the pid in the file is then an earlier exclusive holder's)."""

    def __init__(self, path: Path, holder: str, shared: bool = False) -> None:
        super().__init__(f"{path}: held by pid {holder}")
        self.path, self.holder, self.shared = path, holder, shared


def take(path: str | os.PathLike, exclusive: bool) -> bool:
    """Hold `path`'s lock, exclusive or shared, until `release`. False where the file system has no flock (some
    NFS and Lustre mounts): warned, and the caller goes on unguarded. Raises LockBusy on a conflict."""
    path = Path(path).resolve()
    if path in HELD:
        return True
    handle = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = opened(path, exclusive)
        fcntl.flock(handle, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        shared = exclusive and shared_now(handle)
        handle.close()
        raise LockBusy(path, "unknown" if shared else holder, shared) from None
    except OSError as err:  # a read-only store (features shared with other users), a file system without flock
        if handle is not None:
            handle.close()
        log.warning("%s: cannot lock (%s); a conflicting run here would not be refused", path, err.strerror or err)
        return False
    if exclusive:  # a shared holder leaves the file alone: others share it
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    HELD[path] = handle
    return True


def shared_now(handle: IO[str]) -> bool:
    """Whether the holders that refused an exclusive lock hold it shared (a shared lock is granted beside them)."""
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def opened(path: Path, exclusive: bool) -> IO[str]:
    """The lock file, held open for the whole run; a shared lock needs only to read it (a lock file another user
    made in a shared store)."""
    try:
        return open(path, "a+")
    except PermissionError:
        if exclusive or not path.is_file():
            raise
        return open(path)


def release(path: str | os.PathLike) -> bool:
    """Let go of a lock this process holds; whether it held it."""
    handle = HELD.pop(Path(path).resolve(), None)
    if handle is None:
        return False
    handle.close()  # closing releases the flock
    return True


def release_all() -> None:
    for path in list(HELD):
        release(path)
