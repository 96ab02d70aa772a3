"""Readers for the real dSprites files: the canonical NPZ and the HDF5 release.

* NPZ (``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz``): a zip of ``.npy`` members
  ``imgs`` uint8 [N, 64, 64], ``latents_values`` float64 [N, 6], ``latents_classes`` int64
  [N, 6] and ``metadata``, a dict pickled by Python 2 (read with ``encoding="latin1"``
  through an unpickler that only accepts plain containers and numpy arrays).
* HDF5 (``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.hdf5``): datasets ``imgs``,
  ``latents/classes`` and ``latents/values`` with the same shapes, read through h5py.

The format is recognised by the file's first bytes, never by its extension. Images are
read and bit-packed ``CHUNK_ROWS`` rows at a time, so the 3 GB uint8 array is never held
in memory (peak: the 0.38 GB packed array plus one 32 MB chunk).

With ``require_full=True`` (the default) a file must hold all 737,280 rows in the real
order; ``require_full=False`` accepts any number of rows with valid factor classes (small
synthetic files in tests, subsets); a file with fewer rows where the full set is required
raises `PartialSetError`, whose message names no command-line option (``fastfvae data``
adds its ``--allow-partial``; ``train`` and ``eval`` take none). Any problem raises
`FastFVAEError` with one line naming the file and what was expected; a path that is not a
readable regular file says what it is instead (a directory, a symlink loop, unreadable).

`check_npz_archive` checks an NPZ's layout without unpacking its images (``fastfvae data
download`` uses it on a download with no pinned digest, and on a file already in place).
"""

from __future__ import annotations

import contextlib
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np

from fastfvae.data.dsprites import (
    FACTOR_NAMES, FACTOR_SIZES, IMAGE_SIZE, NUM_IMAGES, PACKED_ROW_BYTES, DSprites, classes_of,
    pack_images, possible_values, unpack_images,
)
from fastfvae.data.paths import open_input
from fastfvae.errors import FastFVAEError

NPZ_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
CHUNK_ROWS = 8192
NPZ_KEYS = ("imgs", "latents_values", "latents_classes", "metadata")
HDF5_KEYS = ("imgs", "latents/classes", "latents/values")
_IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE


EXPECTED_FILE = "a dSprites .npz or .hdf5 file"


class PartialSetError(FastFVAEError):
    """A file holds fewer rows than the full dSprites set where the full set is required.

    The message names no option: a caller that accepts subsets (``fastfvae data`` with
    ``--allow-partial``) says so with `with_option`; the others (``train``, ``eval``) do not
    take one, so their users are pointed at the full file instead.
    """

    def __init__(self, path: Path, rows: int):
        self.path, self.rows = path, rows
        super().__init__(f"{path}: holds {rows} images, expected {NUM_IMAGES} "
                         "(the full dSprites set, which `fastfvae data download` fetches)")

    def with_option(self, option: str) -> FastFVAEError:
        """The same problem, naming the caller's option that accepts a subset."""
        return FastFVAEError(f"{self.path}: holds {self.rows} images, expected {NUM_IMAGES} "
                             f"(the full dSprites set; accept a subset with {option})")


def sniff_format(path: str | Path) -> str:
    """``"npz"`` or ``"hdf5"`` from the file's first bytes.

    A path that is not a readable regular file (missing, a directory, a symlink loop,
    unreadable) is a one-line `FastFVAEError` saying which (`fastfvae.data.paths.open_input`).
    """
    path = Path(path)
    with open_input(path, EXPECTED_FILE) as fh:
        head = fh.read(8)
    if head.startswith(NPZ_MAGIC):
        return "npz"
    if head == HDF5_MAGIC:
        return "hdf5"
    raise FastFVAEError(f"{path}: not a dSprites file (expected an NPZ zip archive or an HDF5 file)")


def load_file(path: str | Path, require_full: bool = True) -> DSprites:
    """Load a dSprites NPZ or HDF5 file, whichever its content is."""
    kind = sniff_format(path)
    return load_npz(path, require_full) if kind == "npz" else load_hdf5(path, require_full)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())


# --- shared validation ------------------------------------------------------------------------
def _check_tables(path: Path, num: int, classes: np.ndarray, values: np.ndarray,
                  require_full: bool) -> tuple[np.ndarray, np.ndarray]:
    for name, table in (("latents_classes", classes), ("latents_values", values)):
        if table.shape != (num, 6):
            raise FastFVAEError(f"{path}: {name} has shape {list(table.shape)}, expected [{num}, 6]")
    if not np.issubdtype(classes.dtype, np.integer):
        raise FastFVAEError(f"{path}: latents_classes has dtype {classes.dtype}, expected integers")
    if not np.issubdtype(values.dtype, np.floating):
        raise FastFVAEError(f"{path}: latents_values has dtype {values.dtype}, expected floats")
    classes = classes.astype(np.int64, copy=False)
    if (classes < 0).any() or (classes >= np.asarray(FACTOR_SIZES)).any():
        raise FastFVAEError(f"{path}: latents_classes out of range, expected classes below {list(FACTOR_SIZES)}")
    if require_full:
        if num != NUM_IMAGES:
            raise PartialSetError(path, num)
        if not np.array_equal(classes, classes_of(np.arange(NUM_IMAGES))):
            raise FastFVAEError(f"{path}: rows are not in the dSprites order "
                                "(expected row-major over the factors, posY fastest)")
    return classes, values.astype(np.float64, copy=False)


def _pack_chunk(path: Path, chunk: np.ndarray, out: np.ndarray) -> None:
    if chunk.size and chunk.max() > 1:
        raise FastFVAEError(f"{path}: imgs holds values other than 0 and 1, expected binary images")
    out[...] = pack_images(chunk)


def _check_image_shape(path: Path, shape: tuple, dtype: np.dtype) -> int:
    if len(shape) != 3 or tuple(shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise FastFVAEError(f"{path}: imgs has shape {list(shape)}, expected [N, 64, 64]")
    if dtype.kind not in "biu" or dtype.itemsize != 1:
        raise FastFVAEError(f"{path}: imgs has dtype {dtype}, expected uint8")
    if shape[0] < 1:
        raise FastFVAEError(f"{path}: imgs is empty, expected at least one image")
    return int(shape[0])


# --- NPZ -----------------------------------------------------------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays/dtypes and plain Python containers (no arbitrary code)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"),
        ("collections", "OrderedDict"), ("_codecs", "encode"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _npy_header(fh) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    return np.lib.format.read_array_header_2_0(fh)


def _read_exact(fh, nbytes: int, path: Path, name: str) -> bytes:
    data = fh.read(nbytes)
    if len(data) != nbytes:
        raise FastFVAEError(f"{path}: member {name} is truncated ({len(data)} of {nbytes} bytes)")
    return data


def _read_npz_table(zf: zipfile.ZipFile, path: Path, name: str) -> np.ndarray:
    with zf.open(f"{name}.npy") as fh:
        shape, fortran, dtype = _npy_header(fh)
        if dtype.hasobject or fortran:
            raise FastFVAEError(f"{path}: {name} is not a plain C-ordered numeric array")
        count = int(np.prod(shape, dtype=np.int64))
        data = _read_exact(fh, count * dtype.itemsize, path, name)
        return np.frombuffer(data, dtype=dtype).reshape(shape)


def _read_metadata(zf: zipfile.ZipFile, path: Path) -> dict:
    with zf.open("metadata.npy") as fh:
        shape, _, dtype = _npy_header(fh)
        if not dtype.hasobject:
            raise FastFVAEError(f"{path}: metadata is not a pickled dict")
        try:
            meta = _MetadataUnpickler(fh, encoding="latin1").load()
        except Exception as exc:  # noqa: BLE001 - any failure is a bad file
            raise FastFVAEError(f"{path}: metadata cannot be read ({_one_line(exc)}); expected a pickled dict") from None
    meta = meta.item() if isinstance(meta, np.ndarray) and meta.shape == () else meta
    if not isinstance(meta, dict):
        raise FastFVAEError(f"{path}: metadata is {type(meta).__name__}, expected a dict")
    return meta


@contextlib.contextmanager
def _npz_errors(path: Path):
    """Any zip/npy failure inside becomes one `FastFVAEError` line naming ``path``."""
    try:
        yield
    except FastFVAEError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as exc:
        raise FastFVAEError(f"{path}: corrupt or truncated NPZ ({_one_line(exc)}); expected the dSprites NPZ") from None


def _npz_tables(zf: zipfile.ZipFile, path: Path, require_full: bool) -> tuple[int, np.ndarray, np.ndarray]:
    """(rows, classes, values) after checking members, metadata, the imgs header and the tables."""
    members = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    missing = [k for k in NPZ_KEYS if k not in members]
    if missing:
        raise FastFVAEError(f"{path}: missing {', '.join(missing)}; expected keys {', '.join(NPZ_KEYS)}")
    _read_metadata(zf, path)
    with zf.open("imgs.npy") as fh:
        shape, fortran, dtype = _npy_header(fh)
    if fortran:
        raise FastFVAEError(f"{path}: imgs is Fortran-ordered, expected a C-ordered array")
    num = _check_image_shape(path, shape, dtype)
    classes = _read_npz_table(zf, path, "latents_classes")
    values = _read_npz_table(zf, path, "latents_values")
    classes, values = _check_tables(path, num, classes, values, require_full)
    return num, classes, values


def check_npz_archive(path: str | Path, require_full: bool = True) -> int:
    """Check that ``path`` is a dSprites NPZ without unpacking its images; returns its rows.

    Checks what `load_npz` checks except the pixels: the members, the metadata dict, the
    images' shape and dtype, the factor tables (and, with ``require_full``, all 737,280 rows
    in the real order). Reads the small members only, so it takes a fraction of a second on
    the real file; a zip CRC check (``ZipFile.testzip``) covers the images' bytes.
    """
    path = Path(path)
    if sniff_format(path) != "npz":
        raise FastFVAEError(f"{path}: is an HDF5 file; expected the dSprites NPZ")
    with _npz_errors(path), zipfile.ZipFile(path) as zf:
        return _npz_tables(zf, path, require_full)[0]


def load_npz(path: str | Path, require_full: bool = True) -> DSprites:
    """Read the canonical dSprites NPZ (see module docstring)."""
    path = Path(path)
    with _npz_errors(path), zipfile.ZipFile(path) as zf:
        num, classes, values = _npz_tables(zf, path, require_full)
        packed = np.empty((num, PACKED_ROW_BYTES), dtype=np.uint8)
        with zf.open("imgs.npy") as fh:
            _npy_header(fh)
            for start in range(0, num, CHUNK_ROWS):
                rows = min(CHUNK_ROWS, num - start)
                data = _read_exact(fh, rows * _IMAGE_BYTES, path, "imgs")
                chunk = np.frombuffer(data, dtype=np.uint8).reshape(rows, IMAGE_SIZE, IMAGE_SIZE)
                _pack_chunk(path, chunk, packed[start:start + rows])
    return DSprites(packed, classes, values, source=str(path))


# --- HDF5 ----------------------------------------------------------------------------------------
def load_hdf5(path: str | Path, require_full: bool = True) -> DSprites:
    """Read the dSprites HDF5 release (see module docstring)."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            missing = [k for k in HDF5_KEYS if k not in h5 or not isinstance(h5[k], h5py.Dataset)]
            if missing:
                raise FastFVAEError(f"{path}: missing {', '.join(missing)}; expected datasets {', '.join(HDF5_KEYS)}")
            imgs = h5["imgs"]
            num = _check_image_shape(path, imgs.shape, imgs.dtype)
            classes, values = h5["latents/classes"][()], h5["latents/values"][()]
            classes, values = _check_tables(path, num, classes, values, require_full)
            packed = np.empty((num, PACKED_ROW_BYTES), dtype=np.uint8)
            for start in range(0, num, CHUNK_ROWS):
                stop = min(num, start + CHUNK_ROWS)
                _pack_chunk(path, imgs[start:stop], packed[start:stop])
    except FastFVAEError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise FastFVAEError(f"{path}: corrupt or truncated HDF5 ({_one_line(exc)}); "
                            "expected the dSprites HDF5 file") from None
    return DSprites(packed, classes, values, source=str(path))


# --- writers (subsets, test fixtures, conversions) ----------------------------------------------
def _default_metadata() -> dict:
    return {
        "date": "April 2017", "version": 1, "shape": (NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE),
        "latents_sizes": np.asarray(FACTOR_SIZES), "latents_names": FACTOR_NAMES,
        "latents_possible_values": possible_values(),
        "title": "dSprites dataset", "description": "written by fastfvae",
        "author": "fastfvae",
    }


def save_npz(data: DSprites, path: str | Path, metadata: dict | None = None) -> None:
    """Write ``data`` in the canonical NPZ layout (compressed), images chunk by chunk."""
    path = Path(path)
    meta = _default_metadata() if metadata is None else metadata
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        with zf.open("imgs.npy", "w", force_zip64=True) as fh:
            header = {"descr": "|u1", "fortran_order": False, "shape": (len(data), IMAGE_SIZE, IMAGE_SIZE)}
            np.lib.format.write_array_header_1_0(fh, header)
            for start in range(0, len(data), CHUNK_ROWS):
                fh.write(unpack_images(data.packed[start:start + CHUNK_ROWS]).tobytes())
        for name, array in (("latents_values", data.latents_values),
                            ("latents_classes", data.latents_classes),
                            ("metadata", np.array(meta, dtype=object))):
            with zf.open(f"{name}.npy", "w") as fh:
                np.lib.format.write_array(fh, array, allow_pickle=True)


def save_hdf5(data: DSprites, path: str | Path) -> None:
    """Write ``data`` in the HDF5 layout (imgs, latents/classes, latents/values)."""
    import h5py

    with h5py.File(path, "w") as h5:
        imgs = h5.create_dataset("imgs", shape=(len(data), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8,
                                 compression="gzip", chunks=(min(len(data), 1024), IMAGE_SIZE, IMAGE_SIZE))
        for start in range(0, len(data), CHUNK_ROWS):
            stop = min(len(data), start + CHUNK_ROWS)
            imgs[start:stop] = unpack_images(data.packed[start:stop])
        h5.create_dataset("latents/classes", data=data.latents_classes)
        h5.create_dataset("latents/values", data=data.latents_values)
