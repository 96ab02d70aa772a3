"""`load_dsprites`: the one entry point to a dSprites set.

* a path -> that file (NPZ or HDF5, recognised by content, not by extension);
* no path -> the real file in the cache directory (``$FASTFVAE_HOME``, default
  ``~/.cache/fastfvae``; put there by ``fastfvae data download``) if it is present,
  else the procedural set (`procedural_dsprites`, rendered once per process).

A given path that is not a readable regular file (missing, a directory, a symlink loop,
unreadable) fails at once with one line saying which. A file with fewer than the full
737,280 rows raises `fastfvae.data.files.PartialSetError` unless ``require_full=False``.

Which one was picked is said in one log line (logger ``fastfvae.data``, and on stderr when
logging is not configured). Loaded files are kept per path for the life of the process.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

from fastfvae.data.download import DSPRITES_FILENAME, cache_dir
from fastfvae.data.dsprites import DSprites
from fastfvae.data.files import EXPECTED_FILE, load_file
from fastfvae.data.paths import check_input_file
from fastfvae.data.procedural import procedural_dsprites

log = logging.getLogger("fastfvae.data")


def _say(message: str) -> None:
    if log.hasHandlers():
        log.info(message)
    else:
        print(f"fastfvae: {message}", file=sys.stderr)


def cached_file() -> Path | None:
    """The real dSprites NPZ in the cache directory, if it is there."""
    path = cache_dir() / DSPRITES_FILENAME
    return path if path.is_file() else None


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, require_full: bool, mtime_ns: int) -> DSprites:
    data = load_file(path, require_full=require_full)
    data.packed.setflags(write=False)
    return data


def load_dsprites(path: str | Path | None = None, require_full: bool = True) -> DSprites:
    """A `DSprites`: the given file, else the cached real file, else the procedural set.

    ``require_full=False`` lets a given file hold any number of rows (subsets, tests).
    Returned sets are shared within the process: treat them as read-only.
    """
    if path is None:
        path = cached_file()
        if path is None:
            _say(f"dSprites: procedural set (no {DSPRITES_FILENAME} in {cache_dir()}; "
                 "`fastfvae data download` fetches the real one)")
            return procedural_dsprites()
    path = check_input_file(Path(path).expanduser(), EXPECTED_FILE)
    key, mtime = str(path.resolve()), path.stat().st_mtime_ns
    data = _load_cached(key, require_full, mtime)
    _say(f"dSprites: real file {path}")
    return data
