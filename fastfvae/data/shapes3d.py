"""3dshapes (Burgess & Kim 2018, https://github.com/deepmind/3d-shapes): the ``shapes3d`` dataset.

480,000 RGB 64x64 images of an object in a room, one per combination of 6 factors, stored
row-major over them with orientation fastest — the order disentanglement_lib's ``Shapes3D``
assumes (its factor bases are ``prod(sizes) / cumprod(sizes)``):

    floor_hue 10, wall_hue 10, object_hue 10, scale 8, shape 4, orientation 15.

The file, ``3dshapes.h5``, holds two HDF5 datasets: ``images`` uint8 [480000, 64, 64, 3] and
``labels`` float64 [480000, 6], the factor *values* (not classes): hues 0.0, 0.1, ..., 0.9;
scale ``linspace(0.75, 1.25, 8)``; shape 0, 1, 2, 3; orientation ``linspace(-30, 30, 15)``
(`possible_values`). `load_shapes3d` checks all of it before any long work — the datasets,
their shapes and dtypes, and that every label row is the value of its row's factor
combination (to within a thousandth of the spacing of that factor's values) — and says what
is wrong in one line naming the file.

Images are not read up front (the set is 5.9 GB as uint8; the file, gzip-compressed, 268 MB):

* a contiguous, unfiltered ``images`` dataset is memory-mapped (`packed` is an ``np.memmap``);
* a chunked or compressed one (the published file) is read on demand through h5py:
  `images_at` reads the rows asked for (sorted, then put back in the order asked), and
  `packed` — the whole array, which the device loader keeps resident on the CPU — reads the
  set into memory once, on first use;
* ``in_memory=True`` reads the whole set into memory at load time.

The h5py file is opened per process (a forked torch DataLoader worker opens its own), never
shared across a fork.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from pathlib import Path

import numpy as np

from fastfvae.data.base import IMAGE_SIZE, GroundTruthData
from fastfvae.data.download import DEFAULT_TIMEOUT, DownloadTarget, cache_dir, download_file
from fastfvae.data.files import HDF5_MAGIC, _one_line
from fastfvae.data.grid import FactorGrid
from fastfvae.data.paths import check_input_file, open_input
from fastfvae.errors import FastFVAEError

log = logging.getLogger("fastfvae.data")

FACTOR_NAMES = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
FACTOR_SIZES = (10, 10, 10, 8, 4, 15)
NUM_IMAGES = int(np.prod(FACTOR_SIZES))  # 480,000
CHANNELS = 3
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, CHANNELS)
LATENT_GRID = FactorGrid(FACTOR_SIZES)
IMAGES_KEY, LABELS_KEY = "images", "labels"
#: Rows read at a time when the whole set is read (48 MiB of images).
CHUNK_ROWS = 4096
#: A label may differ from its table value by this fraction of the factor's value spacing.
LABEL_TOLERANCE = 1e-3
#: h5py's chunk cache for lazy reads (the published file's chunks are compressed, so a
#: cached chunk saves decompressing it again for the next row in it).
CHUNK_CACHE_BYTES = 64 << 20

SHAPES3D_FILENAME = "3dshapes.h5"
SHAPES3D_URL = "https://storage.googleapis.com/3d-shapes/3dshapes.h5"
#: SHA-256 and size of the published file as TensorFlow Datasets records them
#: (``tensorflow_datasets/url_checksums/shapes3d.txt``).
SHAPES3D_SHA256: str | None = "0a0f6ed98baff276a50f3a081a7434d788da63cb135a98189b2a5b5769be1785"
SHAPES3D_BYTES = 267_573_662
SHA256_ENV = "FASTFVAE_SHAPES3D_SHA256"
EXPECTED_FILE = "the 3dshapes.h5 file (Burgess & Kim 2018)"
DOWNLOAD_HINT = "`fastfvae data download --dataset shapes3d` fetches it"


def possible_values() -> dict[str, np.ndarray]:
    """The value of each class of each factor, as the file's ``labels`` hold them."""
    hues = np.arange(10) / 10
    return {
        "floor_hue": hues, "wall_hue": hues.copy(), "object_hue": hues.copy(),
        "scale": np.linspace(0.75, 1.25, 8),
        "shape": np.arange(4, dtype=np.float64),
        "orientation": np.linspace(-30.0, 30.0, 15),
    }


def values_of(classes: np.ndarray) -> np.ndarray:
    """[n, 6] float64 labels for [n, 6] factor classes."""
    table = possible_values()
    classes = np.asarray(classes, dtype=np.int64)
    return np.stack([table[name][classes[:, k]] for k, name in enumerate(FACTOR_NAMES)], axis=1)


class PartialShapes3DError(FastFVAEError):
    """A file holds fewer rows than the full set where the full set is required (the message
    names no option; `with_option` adds the caller's, as `fastfvae.data.files.PartialSetError`)."""

    def __init__(self, path: Path, rows: int):
        self.path, self.rows = path, rows
        super().__init__(f"{path}: holds {rows} images, expected {NUM_IMAGES} "
                         f"(the full 3dshapes set, which {DOWNLOAD_HINT})")

    def with_option(self, option: str) -> FastFVAEError:
        return FastFVAEError(f"{self.path}: holds {self.rows} images, expected {NUM_IMAGES} "
                             f"(the full 3dshapes set; accept a subset with {option})")


# --- the lazily read images --------------------------------------------------------------------
class _H5Images:
    """The ``images`` dataset of an HDF5 file, opened on first use in each process."""

    def __init__(self, path: Path, num_rows: int):
        self.path, self.num_rows = path, num_rows
        self._pid, self._file = None, None

    def dataset(self):
        if self._pid != os.getpid():  # first use, or a forked child: never reuse a parent's handle
            import h5py

            self._file = h5py.File(self.path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
            self._pid = os.getpid()
        return self._file[IMAGES_KEY]

    def read_sorted(self, rows: np.ndarray) -> np.ndarray:
        """uint8 [n, 64, 64, 3] of strictly increasing ``rows``: one read per run of
        consecutive rows, which is cheaper than h5py's list indexing (docs/data.md)."""
        out = np.empty((len(rows), *IMAGE_SHAPE), dtype=np.uint8)
        if not len(rows):
            return out
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate([[0], breaks])
        stops = np.concatenate([breaks, [len(rows)]])
        with _read_errors(self.path):
            dataset = self.dataset()
            for a, b in zip(starts.tolist(), stops.tolist()):
                first = int(rows[a])
                dataset.read_direct(out, np.s_[first:first + (b - a)], np.s_[a:b])
        return out

    def read_block(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty((stop - start, *IMAGE_SHAPE), dtype=np.uint8)
        if stop > start:
            with _read_errors(self.path):
                self.dataset().read_direct(out, np.s_[start:stop], np.s_[0:stop - start])
        return out

    def read_all(self) -> np.ndarray:
        out = np.empty((self.num_rows, *IMAGE_SHAPE), dtype=np.uint8)
        for start in range(0, self.num_rows, CHUNK_ROWS):
            stop = min(self.num_rows, start + CHUNK_ROWS)
            self.read_block(start, stop, out[start:stop])
        return out

    def __getstate__(self):  # a spawned worker reopens the file itself
        return {"path": self.path, "num_rows": self.num_rows, "_pid": None, "_file": None}


@contextlib.contextmanager
def _read_errors(path: Path):
    """A failed read of a lazily read file (a corrupt chunk, the file gone) as one line."""
    try:
        yield
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise FastFVAEError(f"{path}: cannot read images ({_one_line(exc)}); expected {EXPECTED_FILE}") from None


# --- the dataset -----------------------------------------------------------------------------------
class Shapes3D(GroundTruthData):
    """3dshapes images (uint8 [N, 64, 64, 3], in memory, memory-mapped or read on demand) with
    their factor tables; see the module docstring. Small sets (tests) may hold fewer rows, in
    which case row i is the i-th stored image and factor lookups are refused."""

    name = "shapes3d"
    channels = CHANNELS
    base_channels = CHANNELS
    storage = "uint8"
    factor_names = FACTOR_NAMES
    factor_sizes = FACTOR_SIZES

    def __init__(self, images, labels: np.ndarray, latents_classes: np.ndarray, source: str = "memory"):
        """``images``: a uint8 [N, 64, 64, 3] array (or memmap), or the lazy reader of a file."""
        n = len(labels)
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.shape != (n, *IMAGE_SHAPE):
                raise FastFVAEError(f"shapes3d images must be uint8 [{n}, 64, 64, 3], got "
                                    f"{images.dtype} {list(images.shape)}")
            self._array, self._lazy = images, None
        else:
            self._array, self._lazy = None, images
        for name, table in (("labels", labels), ("latents_classes", latents_classes)):
            if table.shape != (n, len(FACTOR_SIZES)):
                raise FastFVAEError(f"shapes3d {name} must have shape [{n}, 6], got {list(table.shape)}")
        self.labels = labels
        self.latents_classes = latents_classes
        self.source = source

    @classmethod
    def from_images(cls, images: np.ndarray, latents_classes: np.ndarray, source: str = "memory") -> "Shapes3D":
        """Build from uint8 [N, 64, 64, 3] images and their [N, 6] factor classes."""
        classes = np.asarray(latents_classes, dtype=np.int64)
        return cls(np.asarray(images), values_of(classes), classes, source)

    # --- content ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.labels)

    @property
    def latent_grid(self) -> FactorGrid:
        return LATENT_GRID

    @property
    def latents_values(self) -> np.ndarray:
        """The labels (factor values), under dSprites' name for them."""
        return self.labels

    @property
    def possible_values(self) -> dict[str, np.ndarray]:
        return possible_values()

    @property
    def in_memory(self) -> bool:
        """True when the images are an array (in memory or memory-mapped), not read on demand."""
        return self._array is not None

    @property
    def packed(self) -> np.ndarray:
        """All images, uint8 [N, 64, 64, 3]: the array itself when in memory or memory-mapped;
        for a file read on demand, read into memory on first use (5.9 GB for the full set)."""
        if self._array is None:
            self.load_into_memory()
        return self._array

    def load_into_memory(self) -> "Shapes3D":
        """Read every image into memory now (later reads touch no file); returns self."""
        if self._array is None:
            _say(f"shapes3d: reading all {len(self)} images of {self.source} into memory "
                 f"({len(self) * int(np.prod(IMAGE_SHAPE)) / 2**30:.1f} GiB)")
            self._array, self._lazy = self._lazy.read_all(), None
        return self

    @property
    def nbytes(self) -> int:
        images = self._array.nbytes if self._array is not None else 0
        return images + self.labels.nbytes + self.latents_classes.nbytes

    def images_at(self, rows: np.ndarray) -> np.ndarray:
        """uint8 [n, 64, 64, 3] images of ``rows``, in the order given (repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise FastFVAEError(f"row indices must lie in [0, {len(self)}), got out-of-range rows")
        if self._array is not None:
            return np.asarray(self._array[rows])
        unique, inverse = np.unique(rows, return_inverse=True)
        return self._lazy.read_sorted(unique)[inverse.reshape(-1)]

    def stored_block(self, start: int, stop: int) -> np.ndarray:
        if self._array is not None:
            return np.asarray(self._array[start:stop])
        return self._lazy.read_block(start, min(stop, len(self)))

    def classes_of(self, rows: np.ndarray) -> np.ndarray:
        return self.latents_classes[np.asarray(rows, dtype=np.int64)]

    def __repr__(self) -> str:
        where = "in memory" if self.in_memory else "read on demand"
        return f"Shapes3D({self.source!r}, rows={len(self)}, {where})"


# --- reading and checking the file ---------------------------------------------------------------
def _say(message: str) -> None:
    if log.hasHandlers():
        log.info(message)
    else:
        print(f"fastfvae: {message}", file=sys.stderr)


def _check_datasets(path: Path, h5, require_full: bool):
    import h5py

    missing = [k for k in (IMAGES_KEY, LABELS_KEY) if k not in h5 or not isinstance(h5[k], h5py.Dataset)]
    if missing:
        raise FastFVAEError(f"{path}: missing {', '.join(missing)}; expected datasets "
                            f"{IMAGES_KEY} and {LABELS_KEY} ({EXPECTED_FILE})")
    images, labels = h5[IMAGES_KEY], h5[LABELS_KEY]
    if len(images.shape) != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise FastFVAEError(f"{path}: images has shape {list(images.shape)}, expected [{NUM_IMAGES}, 64, 64, 3]")
    if images.dtype != np.uint8:
        raise FastFVAEError(f"{path}: images has dtype {images.dtype}, expected uint8")
    num = int(images.shape[0])
    if num < 1:
        raise FastFVAEError(f"{path}: images is empty, expected {NUM_IMAGES} images")
    if labels.shape != (num, len(FACTOR_SIZES)):
        raise FastFVAEError(f"{path}: labels has shape {list(labels.shape)}, expected [{num}, 6]")
    if labels.dtype.kind != "f":
        raise FastFVAEError(f"{path}: labels has dtype {labels.dtype}, expected float64")
    if require_full and num != NUM_IMAGES:
        raise PartialShapes3DError(path, num)
    return images, labels


def _tolerances() -> np.ndarray:
    return np.array([LABEL_TOLERANCE * np.diff(v).min() for v in possible_values().values()])


def _grid_labels() -> np.ndarray:
    """[480000, 6] float64: the label row of every row of the full set, in order."""
    return values_of(LATENT_GRID.all_factors())


def _check_full_labels(path: Path, labels: np.ndarray) -> np.ndarray:
    """The [480000, 6] classes of the full set, after checking its labels are the grid in order."""
    expected = _grid_labels()
    bad = np.abs(labels - expected) > _tolerances()
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        got = ", ".join(f"{v:g}" for v in labels[row])
        want = ", ".join(f"{v:g}" for v in expected[row])
        raise FastFVAEError(f"{path}: labels are not the 3dshapes grid in order: row {row} is [{got}], "
                            f"expected [{want}] (row-major over {', '.join(FACTOR_NAMES)}; "
                            f"{FACTOR_NAMES[-1]} fastest)")
    return LATENT_GRID.all_factors()


def _classes_of_labels(path: Path, labels: np.ndarray) -> np.ndarray:
    """[n, 6] classes of arbitrary label rows (a subset), each value within tolerance of a class."""
    classes = np.empty(labels.shape, dtype=np.int64)
    for k, (name, values) in enumerate(possible_values().items()):
        distance = np.abs(labels[:, k, None] - values[None, :])
        classes[:, k] = distance.argmin(axis=1)
        far = distance.min(axis=1) > _tolerances()[k]
        if far.any():
            row = int(np.flatnonzero(far)[0])
            raise FastFVAEError(f"{path}: labels row {row} has {name} {labels[row, k]:g}, not one of its "
                                f"{len(values)} values ({', '.join(f'{v:g}' for v in values)})")
    return classes


def _memory_map(path: Path, images) -> np.ndarray | None:
    """An ``np.memmap`` of a contiguous, unfiltered, allocated ``images`` dataset; else None."""
    if images.chunks is not None or images.compression is not None:
        return None
    offset = images.id.get_offset()
    if offset is None:  # never written: no storage to map
        return None
    return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=images.shape)


def _sniff(path: Path) -> None:
    with open_input(path, EXPECTED_FILE) as fh:
        head = fh.read(8)
    if head != HDF5_MAGIC:
        raise FastFVAEError(f"{path}: not an HDF5 file; expected {EXPECTED_FILE}")


def read_shapes3d(path: str | Path, require_full: bool = True, in_memory: bool = False) -> Shapes3D:
    """Check and open a 3dshapes HDF5 file (uncached; `load_shapes3d` caches per path)."""
    import h5py

    path = Path(path)
    _sniff(path)
    try:
        with h5py.File(path, "r") as h5:
            images, labels_dataset = _check_datasets(path, h5, require_full)
            labels = labels_dataset[()].astype(np.float64, copy=False)
            num = len(labels)
            # A set of the full size is taken as the grid (factor lookups are row arithmetic),
            # so its order is checked whether or not the full set was required.
            classes = (_check_full_labels(path, labels) if num == NUM_IMAGES
                       else _classes_of_labels(path, labels))
            mapped = _memory_map(path, images)
    except FastFVAEError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise FastFVAEError(f"{path}: corrupt or truncated HDF5 ({_one_line(exc)}); expected {EXPECTED_FILE}") from None
    data = Shapes3D(mapped if mapped is not None else _H5Images(path, num), labels, classes, source=str(path))
    if in_memory:
        data.load_into_memory()
    return data


def check_shapes3d_file(path: str | Path, require_full: bool = True) -> int:
    """Check that ``path`` is a 3dshapes file (everything but the pixels); returns its rows."""
    return len(read_shapes3d(path, require_full))


def cached_file() -> Path | None:
    """The 3dshapes file in the cache directory, if it is there."""
    path = cache_dir() / SHAPES3D_FILENAME
    return path if path.is_file() else None


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, require_full: bool, in_memory: bool, mtime_ns: int) -> Shapes3D:
    return read_shapes3d(path, require_full, in_memory)


def load_shapes3d(path: str | Path | None = None, require_full: bool = True, in_memory: bool = False) -> Shapes3D:
    """A `Shapes3D`: the given file, else the one in the cache directory.

    ``require_full=False`` accepts a file with fewer rows (subsets, tests); ``in_memory``
    reads every image at once. Loaded sets are shared within the process: treat them as
    read-only.
    """
    if path is None:
        path = cached_file()
        if path is None:
            raise FastFVAEError(f"shapes3d: no {SHAPES3D_FILENAME} in {cache_dir()}; {DOWNLOAD_HINT} "
                                f"({SHAPES3D_BYTES / 1e6:.0f} MB), or give the file's path")
    path = check_input_file(Path(path).expanduser(), EXPECTED_FILE)
    data = _load_cached(str(path.resolve()), require_full, in_memory, path.stat().st_mtime_ns)
    _say(f"shapes3d: {path} ({'in memory' if data.in_memory else 'read on demand'})")
    return data


def save_shapes3d(data: Shapes3D, path: str | Path, compression: str | None = "gzip") -> None:
    """Write ``data`` in the published layout (``images``, ``labels``), images chunk by chunk."""
    import h5py

    with h5py.File(path, "w") as h5:
        chunks = (min(len(data), 64), *IMAGE_SHAPE) if compression else None
        images = h5.create_dataset(IMAGES_KEY, shape=(len(data), *IMAGE_SHAPE), dtype=np.uint8,
                                   chunks=chunks, compression=compression)
        for start in range(0, len(data), CHUNK_ROWS):
            stop = min(len(data), start + CHUNK_ROWS)
            images[start:stop] = data.stored_block(start, stop)
        h5.create_dataset(LABELS_KEY, data=data.labels)


# --- download ------------------------------------------------------------------------------------
def _content_problem(path: Path, require_full: bool):
    """The 3dshapes layout (datasets, shapes, dtypes, labels), or what is wrong with it."""
    try:
        check_shapes3d_file(path, require_full)
    except PartialShapes3DError as exc:
        return "not the 3dshapes file", f"holds {exc.rows} images, expected {NUM_IMAGES}"
    except FastFVAEError as exc:
        return "not the 3dshapes file", str(exc).removeprefix(f"{path}: ")
    return None


SHAPES3D = DownloadTarget(label="3dshapes", filename=SHAPES3D_FILENAME, url=SHAPES3D_URL,
                          sha256=SHAPES3D_SHA256, sha256_env=SHA256_ENV, what=EXPECTED_FILE,
                          content_problem=_content_problem, check_content_with_digest=True)


def download_shapes3d(url: str = SHAPES3D_URL, sha256: str | None = None, dest: str | Path | None = None,
                      retries: int = 5, timeout: float = DEFAULT_TIMEOUT, progress: bool | None = None,
                      force: bool = False, require_full: bool = True) -> Path:
    """Fetch ``3dshapes.h5`` into ``dest`` (default the cache directory) and return its path.

    Checked by size, by SHA-256 (``sha256``, else ``$FASTFVAE_SHAPES3D_SHA256``, else the
    pinned `SHAPES3D_SHA256`), then by its layout (`check_shapes3d_file`); resumable and
    atomic as `fastfvae.data.download.download_file` describes.
    """
    return download_file(SHAPES3D, url, sha256, dest, retries, timeout, progress, force, require_full)
