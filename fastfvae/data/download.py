"""Download a dataset file into the cache directory, resumably and atomically.

`download_file` fetches any `DownloadTarget`; `download_dsprites` is the canonical dSprites
NPZ from the dataset's public repository (deepmind/dsprites-dataset), and
`fastfvae.data.shapes3d.download_shapes3d` the 3dshapes HDF5 file. Bytes go to
``<name>.part`` next to the final file; an interrupted transfer resumes from where it
stopped with an HTTP ``Range`` request (automatically, up to ``retries`` times, or on the
next call). The finished ``.part`` is checked and only then renamed onto the final name
with ``os.replace`` (atomic within a directory), so the cache never holds a partial,
corrupt or foreign file under the real name. A payload that fails the check is deleted.

The check: its size against the server's, then its SHA-256 against the expected digest:
``--sha256`` / ``sha256=``, else the target's environment variable
(``$FASTFVAE_DSPRITES_SHA256`` for dSprites), else its pinned digest. dSprites' pinned digest
`DSPRITES_SHA256` is None: the real file's digest could not be measured on the machines this
was written on (no internet). With no digest the download must pass the target's own content
check — for dSprites the zip members' CRC-32s and the layout
(`fastfvae.data.files.check_npz_archive`: the members, the metadata, the shapes of the images
and factor tables, all 737,280 rows in the real order) — and the digest it got is printed so
it can be pinned. A target may ask for its content check after the digest too. A file
already under the real name is checked the same way before it is reported as present; one
that fails is downloaded again.

Failures, each one line (`FastFVAEError`), found as early as possible:

* before any request: a URL that is not http(s) with a host, a ``dest`` that is a file or
  cannot be created or written in, a bad digest, ``retries`` < 0, ``timeout`` <= 0;
* at the first answer, not retried: an unknown host, a refused connection, an unreachable
  network, a rejected TLS certificate, HTTP 4xx;
* retried (``retries`` times at most): a dropped connection (resumed where it stopped), a
  timeout — no data for ``timeout`` seconds (default 30) — and HTTP 5xx; but
  `ATTEMPTS_WITHOUT_PROGRESS` attempts in a row that receive nothing end the download, so a
  stalled server fails after about two timeouts.

A folder made for ``dest`` is removed again when the download fails with nothing kept in it.
One download of a file at a time per ``dest`` (`download_lock`): a second one fails at once,
naming the first one's PID.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Callable

from fastfvae.data.dsprites import NUM_IMAGES
from fastfvae.data.files import PartialSetError, _one_line, check_npz_archive
from fastfvae.data.paths import make_folder, remove_empty_folders
from fastfvae.errors import FastFVAEError
from fastfvae.train.lock import ExclusiveFileLock

DSPRITES_FILENAME = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
DSPRITES_URL = f"https://github.com/deepmind/dsprites-dataset/raw/master/{DSPRITES_FILENAME}"
#: SHA-256 of the canonical NPZ; None = not yet known (size + zip CRC check, digest printed).
DSPRITES_SHA256: str | None = None
SHA256_ENV = "FASTFVAE_DSPRITES_SHA256"
HOME_ENV = "FASTFVAE_HOME"
#: Seconds an attempt waits for data (connecting, or between two reads) before it fails.
DEFAULT_TIMEOUT = 30.0
#: Consecutive attempts that may fail without receiving a byte: a stalled or silent server
#: fails after this many timeouts, not after every retry.
ATTEMPTS_WITHOUT_PROGRESS = 2
_BLOCK = 1 << 16
#: The lock file (`download_lock`) beside the ``.part`` file while a download runs.
LOCK_NAME = DSPRITES_FILENAME + ".lock"

#: What a content check found wrong with a file: (what the file is, in words — "corrupt",
#: "not the dSprites NPZ" — and the problem), or None when the file is the one wanted.
ContentProblem = tuple[str, str] | None


@dataclass(frozen=True)
class DownloadTarget:
    """One file `download_file` can fetch, and how to tell it is the right one.

    ``label`` names it in progress bars and messages ("dSprites"); ``what`` describes it
    ("the dSprites NPZ"); ``sha256`` is its pinned digest (None: unknown), overridden by the
    environment variable ``sha256_env`` and then by an explicit digest. ``content_problem(path,
    require_full)`` checks a file's content: it is the whole check when no digest is known,
    and runs after the digest too when ``check_content_with_digest``.
    """

    label: str
    filename: str
    url: str
    sha256: str | None
    sha256_env: str
    what: str
    content_problem: Callable[[Path, bool], ContentProblem]
    check_content_with_digest: bool = False

    @property
    def lock_name(self) -> str:
        return self.filename + ".lock"


def check_url(url: str, example: str = DSPRITES_URL) -> str:
    """``url`` if it is an http(s) address with a host; else a one-line `FastFVAEError`."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise FastFVAEError(f"URL {url!r} is not valid ({exc}); expected e.g. {example}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FastFVAEError(f"URL {url!r} is not an http:// or https:// address with a host; "
                            f"expected e.g. {example}")
    return url


def cache_dir() -> Path:
    """``$FASTFVAE_HOME``, default ``~/.cache/fastfvae`` (not created here)."""
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser() if home else Path.home() / ".cache" / "fastfvae"


def expected_sha256(sha256: str | None = None, target: DownloadTarget | None = None) -> str | None:
    """The digest to check against: argument, else the target's environment variable, else
    its pinned digest (dSprites by default: ``$FASTFVAE_DSPRITES_SHA256``, `DSPRITES_SHA256`)."""
    target = DSPRITES if target is None else target
    digest = sha256 or os.environ.get(target.sha256_env) or target.sha256
    if digest is None:
        return None
    digest = digest.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise FastFVAEError(f"SHA-256 digest {digest!r} is not valid, expected 64 hex digits")
    return digest


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _progress(enabled: bool, label: str = "dSprites"):
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    return Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled,
                    transient=True)


class _Attempt:
    """What one request received (``received``: bytes appended to the ``.part`` file)."""

    def __init__(self) -> None:
        self.received = 0


def _fetch_once(url: str, part: Path, timeout: float, bar, task, attempt: _Attempt) -> int:
    """Append the rest of ``url`` to ``part``; returns the total size. Raises on a dropped link."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "fastfvae",
                                                   **({"Range": f"bytes={have}-"} if have else {})})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and have:  # nothing left to send or stale part: start over
            part.unlink()
            return _fetch_once(url, part, timeout, bar, task, attempt)
        raise
    with response:
        if have and response.status == 206:
            match = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != have:
                raise FastFVAEError(f"download of {url}: server resumed at the wrong offset "
                                    f"(Content-Range {response.headers.get('Content-Range')!r}, expected {have})")
            total = int(match.group(2))
            mode = "ab"
        else:  # 200: the server ignored Range, so start from the beginning
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else -1
            have, mode = 0, "wb"
        bar.update(task, total=total if total >= 0 else None, completed=have)
        try:
            out = open(part, mode)
        except OSError as exc:
            raise FastFVAEError(f"cannot write {part}: {exc.strerror or exc}") from None
        with out:
            # read1: whatever has arrived, so a dropped link keeps every byte received.
            for block in iter(lambda: response.read1(_BLOCK), b""):
                try:
                    out.write(block)
                except OSError as exc:  # a full disk is not a network error: no retry
                    raise FastFVAEError(f"cannot write {part}: {exc.strerror or exc}") from None
                have += len(block)
                attempt.received += len(block)
                bar.update(task, completed=have)
            out.flush()
            os.fsync(out.fileno())
    if total >= 0 and have < total:
        raise ConnectionError(f"connection closed after {have} of {total} bytes")
    return total if total >= 0 else have


def _diagnose(exc: BaseException, url: str, timeout: float) -> tuple[bool, str]:
    """(whether another attempt may succeed, what went wrong in words) for a failed request.

    Retrying cannot fix an unknown host, a refused connection, an unreachable network, a
    rejected TLS certificate or an HTTP 4xx answer; it may fix a dropped or stalled link
    and an HTTP 5xx answer.
    """
    parts = urllib.parse.urlsplit(url)
    host, hostname = parts.netloc, parts.hostname
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500, f"HTTP {exc.code} {exc.reason}"
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, socket.gaierror):
        return False, f"cannot resolve host {hostname} ({reason.strerror or reason})"
    if isinstance(reason, ConnectionRefusedError):
        return False, f"connection refused by {host}"
    if isinstance(reason, ssl.SSLCertVerificationError):
        return False, f"TLS certificate of {hostname} not accepted ({reason.verify_message or reason})"
    if isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return False, f"{host} is unreachable ({reason.strerror})"
    if isinstance(reason, TimeoutError):
        return True, f"no data from {host} for {timeout:g} s"
    if isinstance(reason, str):
        return False, reason
    return True, _one_line(reason)


def _transfer(url: str, part: Path, retries: int, timeout: float, progress: bool, label: str = "dSprites") -> int:
    """Fetch ``url`` into ``part`` with up to ``retries`` retries; returns the size the server gave."""
    without_progress = 0
    with _progress(progress, label) as bar:
        task = bar.add_task("download", total=None)
        for number in range(1, retries + 2):
            attempt = _Attempt()
            try:
                return _fetch_once(url, part, timeout, bar, task, attempt)
            except (OSError, HTTPException) as exc:  # URLError, timeouts, resets are OSErrors
                retryable, why = _diagnose(exc, url, timeout)
                kept = part.stat().st_size if part.exists() else 0
                without_progress = 0 if attempt.received else without_progress + 1
                if without_progress >= ATTEMPTS_WITHOUT_PROGRESS:
                    why += f" on {without_progress} attempts in a row (--timeout sets how long to wait)"
                if not retryable or number > retries or without_progress >= ATTEMPTS_WITHOUT_PROGRESS:
                    if not kept:
                        part.unlink(missing_ok=True)  # an empty .part is nothing to resume from
                        raise FastFVAEError(f"download of {url} failed: {why}") from None
                    raise FastFVAEError(f"download of {url} interrupted ({why}); {kept} bytes kept in {part}, "
                                        "run the command again to resume") from None
                what = (f"transfer interrupted after {kept} bytes ({why}), resuming" if attempt.received
                        else f"{why}, retrying")
                print(f"fastfvae: {what} (retry {number} of {retries})", file=sys.stderr)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def download_lock(dest: Path, lock_name: str = LOCK_NAME) -> ExclusiveFileLock:
    """One download of a file per ``dest``: an exclusive flock on ``<dest>/<lock_name>``
    (``<file name>.lock``) for the whole call.

    Two downloads of one file into one folder would append to the same ``.part`` (interleaved
    bytes), and the one that renames it would pull the file from under the other. The lock is
    the run folder's kind (`fastfvae.train.lock.ExclusiveFileLock`): the holder's PID is named
    to a second process, which gets a one-line `FastFVAEError` at once; the kernel drops it
    when its holder exits however it exits, so a file left by a killed download is taken over.
    """
    return ExclusiveFileLock(dest / lock_name, grace=0.0, in_use=lambda pid: (
        f"another fastfvae download into {dest} is running (PID {pid}); "
        "wait for it to finish or stop it, or choose another --dest"))


def download_file(target: DownloadTarget, url: str | None = None, sha256: str | None = None,
                  dest: str | Path | None = None, retries: int = 5, timeout: float = DEFAULT_TIMEOUT,
                  progress: bool | None = None, force: bool = False, require_full: bool = True) -> Path:
    """Fetch ``target`` (from ``url``, default its own) into ``dest`` (default `cache_dir`)
    and return its path.

    Every argument, the URL and ``dest`` are checked before any request. ``timeout``: seconds
    without data before an attempt fails. ``require_full=False`` (tests, subset mirrors) lets
    the content check accept a subset of the dataset.
    """
    url = target.url if url is None else url
    if retries < 0:
        raise FastFVAEError(f"retries must be 0 or more, got {retries}")
    if not timeout > 0:
        raise FastFVAEError(f"timeout must be more than 0 seconds, got {timeout}")
    check_url(url, target.url)
    digest = expected_sha256(sha256, target)
    dest = Path(dest).expanduser() if dest is not None else cache_dir()
    final = dest / target.filename
    part = dest / (target.filename + ".part")
    for path in (final, part, dest / target.lock_name):
        if os.path.lexists(path) and not path.is_file():
            raise FastFVAEError(f"{path} exists and is not a file; expected {target.what} or nothing there")
    created = make_folder(dest, "--dest")
    try:
        with download_lock(dest, target.lock_name):
            if final.exists() and not force:
                problem = _problem_with(final, digest, require_full, target)
                if problem is None:
                    print(f"fastfvae: {target.label} already in {final}", file=sys.stderr)
                    return final
                print(f"fastfvae: {problem}; downloading again", file=sys.stderr)
            if progress is None:
                progress = sys.stderr.isatty()
            total = _transfer(url, part, retries, timeout, progress, target.label)
            _verify(part, total, digest, url, require_full, target)
            os.replace(part, final)
    except BaseException:
        remove_empty_folders(created)  # only folders this call made, and only if empty
        raise
    _fsync_dir(dest)
    print(f"fastfvae: {target.label} saved to {final}", file=sys.stderr)
    return final


def download_dsprites(url: str = DSPRITES_URL, sha256: str | None = None, dest: str | Path | None = None,
                      retries: int = 5, timeout: float = DEFAULT_TIMEOUT, progress: bool | None = None,
                      force: bool = False, require_full: bool = True) -> Path:
    """Fetch the dSprites NPZ into ``dest`` (default `cache_dir`) and return its path
    (`download_file` of `DSPRITES`). ``require_full=False`` (tests, subset mirrors) accepts
    an archive with fewer than 737,280 rows when no digest is pinned.
    """
    return download_file(DSPRITES, url, sha256, dest, retries, timeout, progress, force, require_full)


def _problem_with(final: Path, digest: str | None, require_full: bool, target: DownloadTarget) -> str | None:
    """Why the file already at ``final`` is not the file wanted, or None if it is."""
    if digest is not None:
        if _sha256_of(final) != digest:
            return f"{final} does not match the expected SHA-256"
        if not target.check_content_with_digest:
            return None
    found = target.content_problem(final, require_full)
    return None if found is None else f"{final} is {found[0]} ({found[1]})"


def _zip_problem(path: Path) -> str | None:
    """A member whose bytes fail their CRC-32 (read streaming: `ZipFile.testzip`), or an
    unreadable zip; None if every member is intact."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        return f"not a readable zip ({type(exc).__name__})"
    return None if bad is None else f"member {bad} fails its CRC check"


def _layout_problem(path: Path, require_full: bool) -> str | None:
    """What makes ``path`` not a dSprites NPZ (`check_npz_archive`), or None."""
    try:
        check_npz_archive(path, require_full)
    except PartialSetError as exc:
        return f"holds {exc.rows} images, expected {NUM_IMAGES}"
    except FastFVAEError as exc:
        return str(exc).removeprefix(f"{path}: ")
    return None


def _dsprites_content_problem(path: Path, require_full: bool) -> ContentProblem:
    """The zip CRCs of every member, then the dSprites layout."""
    problem = _zip_problem(path)
    if problem is not None:
        return "corrupt", problem
    problem = _layout_problem(path, require_full)
    return None if problem is None else ("not the dSprites NPZ", problem)


DSPRITES = DownloadTarget(label="dSprites", filename=DSPRITES_FILENAME, url=DSPRITES_URL,
                          sha256=DSPRITES_SHA256, sha256_env=SHA256_ENV, what="the dSprites NPZ",
                          content_problem=_dsprites_content_problem)


def _verify(part: Path, total: int, digest: str | None, url: str, require_full: bool,
            target: DownloadTarget = DSPRITES) -> None:
    """Size, then SHA-256 (or, with no digest known, the target's content check); deletes a
    bad payload."""
    size = part.stat().st_size
    found: ContentProblem = None
    if size != total:
        found = "corrupt", f"size {size} bytes, expected {total}"
    elif digest is not None:
        got = _sha256_of(part)
        if got != digest:
            found = "corrupt", f"SHA-256 {got}, expected {digest}"
    if found is None and (digest is None or target.check_content_with_digest):
        found = target.content_problem(part, require_full)
        if found is None and digest is None:
            print(f"fastfvae: no SHA-256 pinned for {target.label}; downloaded file has SHA-256 "
                  f"{_sha256_of(part)} (pin it with --sha256 or ${target.sha256_env})", file=sys.stderr)
    if found is not None:
        part.unlink(missing_ok=True)
        raise FastFVAEError(f"download of {url} is {found[0]} ({found[1]}); nothing was saved")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
