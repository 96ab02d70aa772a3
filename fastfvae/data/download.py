"""Download the canonical dSprites NPZ into the cache directory, resumably and atomically.

The file comes from the dataset's public repository (deepmind/dsprites-dataset). Bytes go
to ``<name>.part`` next to the final file; an interrupted transfer resumes from where it
stopped with an HTTP ``Range`` request (automatically, up to ``retries`` times, or on the
next call). The finished ``.part`` is checked — its size against the server's, its SHA-256
against the expected digest — and only then renamed onto the final name with
``os.replace`` (atomic within a directory), so the cache never holds a partial or corrupt
dataset under the real name. A payload that fails the check is deleted.

The expected digest: ``--sha256`` / ``sha256=``, else ``$FASTFVAE_DSPRITES_SHA256``, else
`DSPRITES_SHA256`. That constant is None: the real file's digest could not be measured on
the machines this was written on (no internet). With no digest the download is checked by
size and by the zip members' CRC-32s, and the digest it got is printed so it can be pinned.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
import urllib.error
import urllib.request
import zipfile
import zlib
from http.client import HTTPException
from pathlib import Path

from fastfvae.data.files import _one_line
from fastfvae.errors import FastFVAEError

DSPRITES_FILENAME = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
DSPRITES_URL = f"https://github.com/deepmind/dsprites-dataset/raw/master/{DSPRITES_FILENAME}"
#: SHA-256 of the canonical NPZ; None = not yet known (size + zip CRC check, digest printed).
DSPRITES_SHA256: str | None = None
SHA256_ENV = "FASTFVAE_DSPRITES_SHA256"
HOME_ENV = "FASTFVAE_HOME"
_BLOCK = 1 << 16


def cache_dir() -> Path:
    """``$FASTFVAE_HOME``, default ``~/.cache/fastfvae`` (not created here)."""
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser() if home else Path.home() / ".cache" / "fastfvae"


def expected_sha256(sha256: str | None = None) -> str | None:
    """The digest to check against: argument, else environment, else `DSPRITES_SHA256`."""
    digest = sha256 or os.environ.get(SHA256_ENV) or DSPRITES_SHA256
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


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    return Progress(TextColumn("dSprites"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled,
                    transient=True)


def _fetch_once(url: str, part: Path, timeout: float, bar, task) -> int:
    """Append the rest of ``url`` to ``part``; returns the total size. Raises on a dropped link."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "fastfvae",
                                                   **({"Range": f"bytes={have}-"} if have else {})})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send or stale part: start over
            part.unlink()
            return _fetch_once(url, part, timeout, bar, task)
        raise FastFVAEError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
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
        with open(part, mode) as out:
            # read1: whatever has arrived, so a dropped link keeps every byte received.
            for block in iter(lambda: response.read1(_BLOCK), b""):
                out.write(block)
                have += len(block)
                bar.update(task, completed=have)
            out.flush()
            os.fsync(out.fileno())
    if total >= 0 and have < total:
        raise ConnectionError(f"connection closed after {have} of {total} bytes")
    return total if total >= 0 else have


def download_dsprites(url: str = DSPRITES_URL, sha256: str | None = None, dest: str | Path | None = None,
                      retries: int = 5, timeout: float = 60.0, progress: bool | None = None,
                      force: bool = False) -> Path:
    """Fetch the dSprites NPZ into ``dest`` (default `cache_dir`) and return its path."""
    if retries < 0:
        raise FastFVAEError(f"retries must be 0 or more, got {retries}")
    digest = expected_sha256(sha256)
    dest = Path(dest).expanduser() if dest is not None else cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / DSPRITES_FILENAME
    part = dest / (DSPRITES_FILENAME + ".part")
    if final.exists() and not force:
        if digest is None or _sha256_of(final) == digest:
            print(f"fastfvae: dSprites already in {final}", file=sys.stderr)
            return final
        print(f"fastfvae: {final} does not match the expected SHA-256; downloading again", file=sys.stderr)
    if progress is None:
        progress = sys.stderr.isatty()
    with _progress(progress) as bar:
        task = bar.add_task("download", total=None)
        for attempt in range(retries + 1):
            try:
                total = _fetch_once(url, part, timeout, bar, task)
                break
            except (ConnectionError, HTTPException, socket.timeout, TimeoutError, urllib.error.URLError) as exc:
                if attempt == retries:
                    kept = part.stat().st_size if part.exists() else 0
                    why = _one_line(exc)
                    if not kept:
                        raise FastFVAEError(f"download of {url} failed ({why})") from None
                    raise FastFVAEError(f"download of {url} interrupted ({why}); {kept} bytes kept in {part}, "
                                        "run the command again to resume") from None
                print(f"fastfvae: transfer interrupted ({type(exc).__name__}), resuming", file=sys.stderr)
    _verify(part, total, digest, url)
    os.replace(part, final)
    _fsync_dir(dest)
    print(f"fastfvae: dSprites saved to {final}", file=sys.stderr)
    return final


def _verify(part: Path, total: int, digest: str | None, url: str) -> None:
    """Size, then SHA-256 (or, with no digest known, the zip CRCs); deletes a bad payload."""
    size = part.stat().st_size
    problem = None
    if size != total:
        problem = f"size {size} bytes, expected {total}"
    elif digest is not None:
        got = _sha256_of(part)
        if got != digest:
            problem = f"SHA-256 {got}, expected {digest}"
    else:
        try:
            with zipfile.ZipFile(part) as zf:
                bad = zf.testzip()
            if bad is not None:
                problem = f"member {bad} fails its CRC check"
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
            problem = f"not a readable zip ({type(exc).__name__})"
        if problem is None:
            print(f"fastfvae: no SHA-256 pinned for dSprites; downloaded file has SHA-256 {_sha256_of(part)} "
                  f"(pin it with --sha256 or ${SHA256_ENV})", file=sys.stderr)
    if problem is not None:
        part.unlink(missing_ok=True)
        raise FastFVAEError(f"download of {url} is corrupt ({problem}); nothing was saved")


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
