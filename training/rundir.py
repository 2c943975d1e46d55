"""Run-directory safety: one live run per directory (a lock) and durable writes (fsync).

The lock is a POSIX record lock (`fcntl.lockf`) on `<run_dir>/run.lock`, held by global rank 0 for
the life of the process: the kernel drops it when the process dies, however it dies, so a crashed
run never leaves it behind. Unlike `flock`, it is not inherited by forked children (data-loader
workers), which can outlive a killed rank by seconds and would otherwise keep the lock. The file
itself keeps the holder's pid and host, for the message a second launch gets. POSIX locks work on
local file systems and on NFS / Lustre mounted with locking; where a shared file system ignores
locks, two launches on different hosts are not detected. (A POSIX lock is also released when the
holder closes *any* descriptor of the file, so nothing else in the process opens it.)
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = "run.lock"


class RunLock:
    """The exclusive lock of one run directory; released when closed or when the process exits."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = Path(self.path).read_text().strip() or "a process that has not written its name yet"
            os.close(fd)
            raise ValueError(
                f"run directory {self.path.parent} is in use by another run ({holder}); one run "
                f"directory takes one live run: wait for it to end, stop it, or use another run_dir"
            ) from None
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {started}\n".encode())
        self._fd: int | None = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (renames, new files), to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: str | bytes) -> None:
    """Replace `path` atomically: a reader sees the old or the new content, also after a power cut."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
