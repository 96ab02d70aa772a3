"""One process per run folder: an exclusive OS lock on ``<run>/.lock`` for the run's whole life.

Two ``fastfvae train`` on one ``--out`` would write the same checkpoint, config and log, and
leave a run that is neither's. `RunFolderLock` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on
``<run>/.lock`` and writes its PID there; a second process gets a one-line `FastFVAEError`
naming that PID. The kernel drops an flock when its holder exits, however it exits (kill -9
included), so a lock never outlives its process: a ``.lock`` file left by a killed run is
taken over by the next one. `release` removes the file while still holding the lock; a
process that opened the file just before (and then locked the removed inode) notices that
the path no longer names the file it locked and tries again. `check_not_in_use` probes a
folder without creating anything (the lock taken and dropped at once); a lock found taken
is retried for a moment before it counts as held, so such a probe never refuses a run.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from fastfvae.errors import FastFVAEError

LOCK_NAME = ".lock"
#: How long a lock that is taken is retried before it counts as held by a running process.
PROBE_GRACE_S = 0.25


def _holder_pid(fd: int) -> str:
    """The PID the holder wrote (it writes it right after locking: wait briefly for it)."""
    for _ in range(20):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown"


def _flock_within(fd: int, kind: int, seconds: float) -> bool:
    """Take an flock of ``kind`` without blocking, retrying for ``seconds`` (a probe of
    `check_not_in_use` holds the lock for microseconds); False if it stays taken."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def _in_use_message(folder: Path, pid: str) -> str:
    return (f"{folder} is in use by another fastfvae process (PID {pid}); "
            f"wait for it to finish or stop it, or choose another --out")


def check_not_in_use(folder: str | os.PathLike) -> None:
    """FastFVAEError if a process holds ``folder``'s lock; creates nothing (a probe: the lock is
    taken and dropped at once when it is free)."""
    folder = Path(folder)
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return  # no lock file (or none readable): no run holds the folder
    try:
        free = _flock_within(fd, fcntl.LOCK_SH, PROBE_GRACE_S)
        if not free:
            raise FastFVAEError(_in_use_message(folder, _holder_pid(fd)))
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        return  # no flock on this file system: `RunFolderLock.acquire` will say so
    finally:
        os.close(fd)


class ExclusiveFileLock:
    """An exclusive flock on the file ``path`` (created; its folder must exist), with the holder's
    PID written in it. Use as a context manager or call `acquire` / `release`; `acquire` raises
    the one-line FastFVAEError ``in_use(pid)`` when another process holds it (after retrying for
    ``grace`` seconds: a `check_not_in_use` probe holds a lock for microseconds)."""

    def __init__(self, path: str | os.PathLike, in_use, grace: float = PROBE_GRACE_S) -> None:
        self.path, self._in_use, self._grace = Path(path), in_use, grace
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self):
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise FastFVAEError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
            try:
                free = _flock_within(fd, fcntl.LOCK_EX, self._grace)
            except OSError as exc:  # a file system without flock (ENOLCK)
                os.close(fd)
                raise FastFVAEError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
            if not free:
                error = FastFVAEError(self._in_use(_holder_pid(fd)))
                os.close(fd)
                raise error
            try:
                current = os.stat(self.path)
                locked = os.fstat(fd)
                if (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the previous holder removed the file we locked: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunFolderLock(ExclusiveFileLock):
    """Exclusive ownership of a run folder (which must exist): `ExclusiveFileLock` on
    ``<folder>/.lock``, refusing a second process with the holder's PID."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        super().__init__(self.folder / LOCK_NAME, lambda pid: _in_use_message(self.folder, pid))
