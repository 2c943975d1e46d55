"""Run-directory safety: one live run per directory (a lock) and durable writes (fsync).

The lock is two locks, held by global rank 0 for the life of the process, both dropped by the kernel
when the process dies however it dies, so a crashed run never leaves them behind:

- a POSIX record lock (`fcntl.lockf`) on `<run_dir>/run.lock`, checked after locking to be on the
  file the path names now (a lock on a file someone deleted or replaced guards nothing, so it is
  taken again on the new one). The file keeps the holder's pid and host, for the message a second
  launch gets. (A POSIX lock is released when the holder closes *any* descriptor of the file, so
  nothing else in the process opens it.)
- a `flock` on the run directory itself, which no `rm run.lock` can take away. flock locks are
  shared with forked children, so a forked child (a data-loader worker, which can outlive a killed
  rank by seconds) closes its copy at once (os.register_at_fork).

Shared file systems: NFS (v3 with lockd, v4) and Lustre mounted with `flock` honour the record lock
across hosts. The directory lock is local-only there: NFS emulates flock with record locks, which
need a file open for writing, so it is refused (EBADF) on a directory, and Lustre without `flock`
refuses it (ENOSYS) or keeps it on one node (`localflock`); the record lock alone then guards the
directory, and deleting `run.lock` under a live run is detected only on the same host. Where the
file system ignores locks altogether (NFS mounted `nolock`/`local_lock=all`, Lustre `localflock`),
two launches on different hosts are not detected.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = "run.lock"
_DIR_LOCK_UNSUPPORTED = (errno.EBADF, errno.EINVAL, errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)
_HELD_DIR_FDS: set[int] = set()  # directory locks of this process, closed in every forked child


def _close_held_dir_fds() -> None:
    for fd in _HELD_DIR_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_DIR_FDS.clear()


os.register_at_fork(after_in_child=_close_held_dir_fds)


class RunLock:
    """The exclusive lock of one run directory; released when closed or when the process exits."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._dir_fd = self._lock_directory()
        try:
            fd = self._lock_file()
        except BaseException:
            self._release_directory()
            raise
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {started}\n".encode())
        self._fd: int | None = fd

    def _in_use(self) -> ValueError:
        try:
            holder = self.path.read_text().strip() or "a process that has not written its name yet"
        except OSError:
            holder = f"a process whose {LOCK_FILE} was deleted"
        return ValueError(
            f"run directory {self.path.parent} is in use by another run ({holder}); one run "
            f"directory takes one live run: wait for it to end, stop it, or use another run_dir"
        )

    def _lock_directory(self) -> int | None:
        """flock the directory itself; None where the file system does not support it (NFS)."""
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise self._in_use() from None
            if e.errno in _DIR_LOCK_UNSUPPORTED:
                return None
            raise
        _HELD_DIR_FDS.add(fd)
        return fd

    def _lock_file(self) -> int:
        """lockf run.lock, and make sure the lock is on the file the path names once locked."""
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._in_use() from None
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                now = None
            held = os.fstat(fd)
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd
            os.close(fd)  # deleted or replaced between open and lock: lock the file there now
        raise ValueError(f"{self.path} keeps being replaced while this launch locks it")

    def _release_directory(self) -> None:
        if self._dir_fd is not None:
            _HELD_DIR_FDS.discard(self._dir_fd)
            os.close(self._dir_fd)
            self._dir_fd = None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
        self._release_directory()


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
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves the old file and nothing else
        raise
    fsync_path(path.parent)
