"""One writer at a time per run folder and per soft-target store: an exclusive lock held for the whole job.

The lock is ``fcntl.flock`` on a small file that also names its holder (pid, host, start time). The kernel drops
a flock when its process dies, however it dies, so a stale lock of a dead process is simply taken over; the
names it left are overwritten. (The ``filelock`` package truncates the lock file before it tries to lock it, which
would erase the holder's name that a second writer is meant to read.)

Locks are re-entrant within a process: a job that holds its run folder can call code that locks it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import DarkKnowledgeError

LOCK_FILE = ".darkknowledge.lock"

_held: dict[str, list[int]] = {}  # resolved lock path -> [fd, depth]


@contextlib.contextmanager
def hold(lock_path: str | os.PathLike, what: str, wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the exclusive lock ``lock_path`` (created with its folder) while the block runs; ``what`` names the
    thing locked. When another process holds it: raise a one-line :class:`DarkKnowledgeError` naming that
    process, or with ``wait`` (a log function) say whom it waits for and wait."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    key = str(lock_path.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        if wait is None:
            os.close(fd)
            raise DarkKnowledgeError(f"{what} is in use by another darkknowledge process ({holder}); wait for it "
                                     "to finish or stop it, or choose another output directory") from None
        wait(f"{what} is being written by another process ({holder}); waiting for it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode(), 0)
        _held[key] = [fd, 1]
        yield
    finally:
        _held.pop(key, None)
        os.close(fd)  # releases the lock; the file stays (removing it would race with the next writer)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {int(info['pid'])} on host {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def hold_folder(folder: str | os.PathLike, what: str = "run folder") -> contextlib.AbstractContextManager:
    """The lock of a run (or ensemble) folder: ``folder/.darkknowledge.lock``."""
    return hold(Path(folder) / LOCK_FILE, f"{what} {folder}")
