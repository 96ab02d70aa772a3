"""Checks on the files a command reads and writes, made before any long work.

A path that cannot be used should fail in one line naming what it is, not with a traceback
minutes into a run:

* `open_input` / `check_input_file`: a file to read. Says what the path is when it is not a
  readable regular file: missing, a directory, a symlink loop, a dangling symlink, a FIFO or
  device, or unreadable (permission denied).
* `check_output_file`: a file to write. Its folder must exist and accept a new file — probed
  by creating and removing a temporary file there, since permission bits say nothing for
  root or for read-only and virtual file systems such as ``/proc`` — and the path must not be
  a folder. Nothing is left behind.
* `make_folder` / `remove_empty_folders`: a folder to write into (``data download --dest``,
  ``train`` / ``traverse --out``), created with its missing parents; the caller removes the
  ones it created if the command then fails with nothing written in them.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from fastfvae.errors import FastFVAEError


def _kind_of(mode: int) -> str | None:
    """What a non-regular, non-directory file is, in words (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _missing_reason(path: Path, exc: OSError) -> str:
    """Why ``os.stat(path)`` failed, in words."""
    if exc.errno == errno.ELOOP:
        return "is a symlink loop"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return f"is a dangling symlink (to {os.readlink(path)}, which does not exist)"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "no such file"
    if exc.errno == errno.EACCES:
        return "permission denied (a folder on the path cannot be searched)"
    return f"cannot be read ({exc.strerror or exc})"


def open_input(path: str | Path, expected: str):
    """``open(path, "rb")``, or a one-line `FastFVAEError` saying what ``path`` is instead.

    ``expected`` describes the file wanted, e.g. ``"a dSprites .npz or .hdf5 file"``.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise FastFVAEError(f"{path}: {_missing_reason(path, exc)}; expected {expected}") from None
    if stat.S_ISDIR(mode):
        raise FastFVAEError(f"{path}: is a directory; expected {expected}")
    kind = _kind_of(mode)
    if kind is not None:  # opening a FIFO would block; a device is not a data file
        raise FastFVAEError(f"{path}: is {kind}; expected {expected}")
    try:
        return open(path, "rb")
    except PermissionError:
        raise FastFVAEError(f"{path}: permission denied (the file is not readable); expected {expected}") from None
    except OSError as exc:
        raise FastFVAEError(f"{path}: cannot be opened ({exc.strerror or exc}); expected {expected}") from None


def check_input_file(path: str | Path, expected: str) -> Path:
    """`open_input` without keeping the file open; returns ``path`` as a `Path`."""
    open_input(path, expected).close()
    return Path(path)


def _probe_folder(folder: Path) -> None:
    """Create and remove a temporary file in ``folder``; raises `OSError` if it cannot."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".fastfvae-probe-")
    os.close(fd)
    os.unlink(name)


def check_output_file(path: str | Path, flag: str) -> Path:
    """Check that ``path`` can be written (without writing it); returns it as a `Path`.

    ``flag`` names where the path came from in messages, e.g. ``"--json"``.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise FastFVAEError(f"{flag} {path} is a folder; expected a file name")
    folder = path.parent
    if not folder.exists():
        raise FastFVAEError(f"{flag} {path}: no such folder {folder}; expected an existing folder")
    if not folder.is_dir():
        raise FastFVAEError(f"{flag} {path}: {folder} is not a folder; expected an existing folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise FastFVAEError(f"{flag} {path}: the file exists and is not writable; expected a writable file")
    try:
        _probe_folder(folder)
    except OSError as exc:
        raise FastFVAEError(f"{flag} {path}: cannot write in {folder} ({exc.strerror or exc}); "
                            "expected a writable folder") from None
    return path


def make_folder(path: str | Path, flag: str) -> list[Path]:
    """Create folder ``path`` and its missing parents; returns the folders created, outermost first.

    Raises a one-line `FastFVAEError` (after removing what it created) when ``path`` is a
    file or cannot be created or written in. Safe against processes creating the same folders
    at once (tasks of one sweep share ``runs/``): a folder someone else made is not "created".
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FastFVAEError(f"{flag} {path} is a file; expected a folder")
    missing = []
    for folder in (path, *path.parents):
        if os.path.lexists(folder):
            break
        missing.append(folder)
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                # Another process (a parallel sweep task) made it since the check above:
                # theirs, so it is used but never removed here.
                if not folder.is_dir():
                    raise
                continue
            created.append(folder)
        _probe_folder(path)
    except OSError as exc:
        remove_empty_folders(created)
        raise FastFVAEError(f"{flag} {path}: cannot create or write in this folder ({exc.strerror or exc}); "
                            "expected a writable folder") from None
    return created


def remove_empty_folders(created: list[Path]) -> None:
    """Remove the folders `make_folder` created, innermost first, stopping at one not empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return
