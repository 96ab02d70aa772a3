"""3dshapes: the file's checks (one line each), lazy / memory-mapped / in-memory reads, dlib's
sampling and observations, the cache location and a verified, resumable download.

The full-size files here have the real shapes ([480000, 64, 64, 3] images) but write only a few
image rows: the chunks never written take no space and read as HDF5's fill value (0), so a
file is about 1.5 MB.
"""

import hashlib
import pickle

import h5py
import numpy as np
import pytest

from fastfvae.data import load_dataset
from fastfvae.data.download import cache_dir
from fastfvae.data.shapes3d import (
    FACTOR_NAMES, FACTOR_SIZES, NUM_IMAGES, SHAPES3D_FILENAME, SHAPES3D_SHA256, PartialShapes3DError, Shapes3D,
    check_shapes3d_file, download_shapes3d, load_shapes3d, possible_values, read_shapes3d, save_shapes3d, values_of,
)
from fastfvae.data.grid import FactorGrid
from fastfvae.errors import FastFVAEError

from test_data_download import Server

#: The rows written with images in the sparse full-size files.
WRITTEN = np.array([0, 1, 17, 4095, 4096, 250_000, 479_999])


def grid_labels() -> np.ndarray:
    """The labels of the full set, built independently of the module: the value tables of the
    dataset's description, repeated row-major (orientation fastest)."""
    tables = [np.arange(10) / 10] * 3 + [np.linspace(0.75, 1.25, 8), np.arange(4.0), np.linspace(-30, 30, 15)]
    mesh = np.meshgrid(*tables, indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], axis=1)


def images_of(rows) -> np.ndarray:
    """Deterministic, distinct uint8 images for the given rows."""
    return np.stack([np.random.default_rng(int(r)).integers(0, 256, (64, 64, 3), dtype=np.uint8) for r in rows])


def write_sparse(path, labels=None, images_shape=(NUM_IMAGES, 64, 64, 3), images_dtype=np.uint8,
                 keys=("images", "labels"), labels_dtype=np.float64):
    labels = grid_labels() if labels is None else labels
    with h5py.File(path, "w") as h5:
        if "images" in keys:
            images = h5.create_dataset("images", shape=images_shape, dtype=images_dtype,
                                       chunks=(16, *images_shape[1:]), compression="gzip")
            if images_shape == (NUM_IMAGES, 64, 64, 3) and images_dtype == np.uint8:
                for row, image in zip(WRITTEN, images_of(WRITTEN)):
                    images[row] = image
        if "labels" in keys:
            h5.create_dataset("labels", data=labels.astype(labels_dtype), chunks=(20000, labels.shape[1]),
                              compression="gzip", shuffle=True)
    return path


@pytest.fixture(scope="module")
def sparse_file(tmp_path_factory):
    return write_sparse(tmp_path_factory.mktemp("shapes3d") / SHAPES3D_FILENAME)


@pytest.fixture(scope="module")
def data(sparse_file):
    return load_shapes3d(sparse_file)


def small_set(n=50, seed=0):
    rows = np.sort(np.random.default_rng(seed).choice(NUM_IMAGES, n, replace=False))
    classes = FactorGrid(FACTOR_SIZES).factors_of(rows)
    images = np.random.default_rng(seed + 1).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    return Shapes3D.from_images(images, classes)


# --- the full set, read on demand -----------------------------------------------------------
def test_full_file_is_the_grid_read_on_demand(data, sparse_file):
    assert (data.name, data.channels, data.base_channels, data.storage) == ("shapes3d", 3, 3, "uint8")
    assert data.factor_names == FACTOR_NAMES == ("floor_hue", "wall_hue", "object_hue", "scale", "shape",
                                                 "orientation")
    assert data.factor_sizes == (10, 10, 10, 8, 4, 15) and len(data) == 480_000 and data.is_full
    assert not data.in_memory and data.source == str(sparse_file)
    assert np.array_equal(data.latents_classes, FactorGrid(FACTOR_SIZES).all_factors())
    assert np.array_equal(data.labels, grid_labels())


def test_images_at_returns_rows_in_the_order_asked(data):
    rows = np.array([479_999, 17, 2, 17, 0, 4096, 4095, 1])  # unsorted, a repeat, an unwritten row
    images = data.images_at(rows)
    assert images.dtype == np.uint8 and images.shape == (8, 64, 64, 3)
    for image, row in zip(images, rows):
        expected = images_of([row])[0] if row in WRITTEN else np.zeros((64, 64, 3), np.uint8)
        assert np.array_equal(image, expected), row
    assert data.images_at(np.array([], dtype=np.int64)).shape == (0, 64, 64, 3)
    with pytest.raises(FastFVAEError, match=r"row indices must lie in \[0, 480000\)"):
        data.images_at([480_000])
    assert not data.in_memory  # nothing read beyond the rows asked for


def test_float_batch_is_dlibs_images_over_255_in_nchw(data):
    rows = np.array([250_000, 0, 17])
    batch = data.float_batch(rows)
    assert batch.dtype.is_floating_point and batch.shape == (3, 3, 64, 64) and batch.is_contiguous()
    # disentanglement_lib's Shapes3D: images.astype(np.float32) / 255., NHWC.
    expected = images_of(rows).astype(np.float32) / 255.
    assert np.array_equal(batch.permute(0, 2, 3, 1).numpy(), expected)


def test_sampling_and_observations_are_dlibs(data):
    a, b = np.random.RandomState(9), np.random.RandomState(9)
    factors = data.sample_factors(200, a)
    expected = np.stack([b.randint(size, size=200) for size in FACTOR_SIZES], axis=1)
    assert np.array_equal(factors, expected)
    # dlib: indices = dot(factors, prod(sizes) / cumprod(sizes)), every factor latent.
    bases = np.prod(FACTOR_SIZES) / np.cumprod(FACTOR_SIZES)
    rows = np.array(np.dot(factors, bases), dtype=np.int64)
    assert np.array_equal(data.rows_from_factors(factors), rows)
    written = data.latents_classes[WRITTEN]
    state = np.random.RandomState(1)
    observed = data.sample_observations_from_factors(written, state)
    assert observed.dtype == np.float32 and observed.shape == (len(WRITTEN), 64, 64, 3)
    assert np.array_equal(observed, images_of(WRITTEN).astype(np.float32) / 255.)
    assert state.randint(1 << 30) == np.random.RandomState(1).randint(1 << 30)  # nothing drawn
    assert data.observation_noise_shape(8) is None


def test_a_lazy_set_pickles_and_reopens_its_file(data):
    """A spawned DataLoader worker gets the set pickled: the file handle does not travel."""
    data.images_at([0])  # the handle is open in this process
    clone = pickle.loads(pickle.dumps(data))
    assert np.array_equal(clone.images_at([17, 0]), data.images_at([17, 0]))


# --- the checks -----------------------------------------------------------------------------
def bad_files():
    labels = grid_labels()
    swapped = labels.copy()
    swapped[[7, 8]] = swapped[[8, 7]]
    off_table = labels.copy()
    off_table[300_000, 3] += 0.03
    return {
        "missing images": (dict(keys=("labels",)), "missing images; expected datasets images and labels"),
        "missing labels": (dict(keys=("images",)), "missing labels; expected datasets images and labels"),
        "gray images": (dict(images_shape=(NUM_IMAGES, 64, 64)), "images has shape [480000, 64, 64], "
                        "expected [480000, 64, 64, 3]"),
        "float images": (dict(images_dtype=np.float32), "images has dtype float32, expected uint8"),
        "short labels": (dict(labels=labels[:, :5]), "labels has shape [480000, 5], expected [480000, 6]"),
        "integer labels": (dict(labels_dtype=np.int64), "labels has dtype int64, expected float64"),
        "rows out of order": (dict(labels=swapped), "labels are not the 3dshapes grid in order: row 7 is "
                              "[0, 0, 0, 0.75, 0, 4.28571], expected [0, 0, 0, 0.75, 0, 0] (row-major over floor_hue, "
                              "wall_hue, object_hue, scale, shape, orientation; orientation fastest)"),
        "value off the table": (dict(labels=off_table), "labels are not the 3dshapes grid in order: row 300000"),
    }


@pytest.mark.parametrize("case", list(bad_files()))
def test_bad_files_give_one_line_errors(case, tmp_path):
    kwargs, message = bad_files()[case]
    path = write_sparse(tmp_path / "bad.h5", **kwargs)
    with pytest.raises(FastFVAEError) as info:
        load_shapes3d(path)
    assert str(info.value).startswith(f"{path}: {message}"), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["missing", "folder", "not hdf5", "truncated"])
def test_unreadable_paths_give_one_line_errors(case, sparse_file, tmp_path):
    path = tmp_path / "x.h5"
    expected = {"missing": "no such file; expected the 3dshapes.h5 file",
                "folder": "is a directory; expected the 3dshapes.h5 file",
                "not hdf5": "not an HDF5 file; expected the 3dshapes.h5 file",
                "truncated": "corrupt or truncated HDF5"}[case]
    if case == "folder":
        path.mkdir()
    elif case == "not hdf5":
        path.write_bytes(b"PK\x03\x04 a zip, say")
    elif case == "truncated":
        path.write_bytes(sparse_file.read_bytes()[:5000])
    with pytest.raises(FastFVAEError) as info:
        load_shapes3d(path)
    assert str(info.value).startswith(f"{path}: {expected}"), str(info.value)
    assert "\n" not in str(info.value)


def test_a_subset_needs_require_full_false(tmp_path):
    small = small_set(20)
    path = tmp_path / "subset.h5"
    save_shapes3d(small, path)
    with pytest.raises(PartialShapes3DError, match="holds 20 images, expected 480000 .*fastfvae data download "
                                                   "--dataset shapes3d") as info:
        load_shapes3d(path)
    assert "--allow-partial" in str(info.value.with_option("--allow-partial"))
    subset = load_shapes3d(path, require_full=False)
    assert len(subset) == 20 and not subset.is_full
    assert np.array_equal(subset.latents_classes, small.latents_classes)
    assert np.array_equal(subset.images_at(np.arange(20)[::-1]), small.images_at(np.arange(20)[::-1]))
    with pytest.raises(FastFVAEError, match="factor lookups need the full shapes3d set"):
        subset.rows_from_factors(small.latents_classes[:2])
    # A subset's labels must still be values of the tables.
    off = tmp_path / "off.h5"
    save_shapes3d(small, off)
    with h5py.File(off, "a") as h5:
        h5["labels"][4, 5] = 1.0  # between the classes at 0 and 4.29 degrees
    with pytest.raises(FastFVAEError, match=r"labels row 4 has orientation 1, not one of its 15 values"):
        read_shapes3d(off, require_full=False)


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_contiguous_files_are_memory_mapped_and_chunked_ones_read_on_demand(compression, tmp_path):
    small = small_set(30, seed=4)
    path = tmp_path / "s.h5"
    save_shapes3d(small, path, compression=compression)
    data = read_shapes3d(path, require_full=False)
    assert data.in_memory == (compression is None)
    if compression is None:
        assert isinstance(data.packed, np.memmap)
    rows = np.array([29, 3, 3, 0])
    assert np.array_equal(data.images_at(rows), small.images_at(rows))
    assert np.array_equal(data.stored_block(5, 12), small.images_at(np.arange(5, 12)))
    # `packed` reads a lazily read set into memory, once.
    assert np.array_equal(data.packed, small.packed) and data.in_memory
    in_memory = read_shapes3d(path, require_full=False, in_memory=True)
    assert in_memory.in_memory and np.array_equal(in_memory.packed, small.packed)


def test_values_tables():
    values = possible_values()
    assert list(values) == list(FACTOR_NAMES)
    assert [len(v) for v in values.values()] == list(FACTOR_SIZES)
    assert np.array_equal(values_of(FactorGrid(FACTOR_SIZES).all_factors()), grid_labels())


# --- where it comes from ----------------------------------------------------------------------
def test_registry_default_is_the_cached_file_or_a_clear_error(sparse_file, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFVAE_HOME", str(tmp_path / "home"))
    with pytest.raises(FastFVAEError) as info:
        load_dataset("shapes3d")
    assert str(info.value) == (f"shapes3d: no 3dshapes.h5 in {tmp_path / 'home'}; `fastfvae data download "
                               "--dataset shapes3d` fetches it (268 MB), or give the file's path")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / SHAPES3D_FILENAME).symlink_to(sparse_file)
    data = load_dataset("shapes3d")
    assert len(data) == NUM_IMAGES and data.source.endswith(SHAPES3D_FILENAME)
    assert len(load_dataset("shapes3d", str(sparse_file))) == NUM_IMAGES


# --- download -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def payload(sparse_file) -> bytes:
    return sparse_file.read_bytes()


@pytest.fixture
def server(payload):
    with Server(payload) as s:
        yield s


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_lands_in_the_cache_and_is_checked(server, payload, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTFVAE_HOME", str(tmp_path / "home"))
    path = download_shapes3d(url=server.url, sha256=sha(payload), progress=False)
    assert path == cache_dir() / SHAPES3D_FILENAME and path.read_bytes() == payload
    assert sorted(p.name for p in path.parent.iterdir()) == [SHAPES3D_FILENAME]  # no .part, no lock
    assert "3dshapes saved to" in capsys.readouterr().err
    assert len(load_dataset("shapes3d")) == NUM_IMAGES
    # Found and re-checked, not fetched again.
    assert download_shapes3d(url=server.url, sha256=sha(payload), progress=False) == path
    assert server.requests == [None] and "3dshapes already in" in capsys.readouterr().err


def test_download_resumes_a_dropped_transfer(server, payload, tmp_path):
    server.mode = "drop"
    path = download_shapes3d(url=server.url, dest=tmp_path, sha256=sha(payload), progress=False)
    assert path.read_bytes() == payload
    assert server.requests == [None, f"bytes={len(payload) // 2}-"]


def test_the_pinned_digest_is_checked_by_default(server, payload, tmp_path):
    assert SHAPES3D_SHA256 != sha(payload)
    with pytest.raises(FastFVAEError) as info:
        download_shapes3d(url=server.url, dest=tmp_path, progress=False)
    assert str(info.value) == (f"download of {server.url} is corrupt (SHA-256 {sha(payload)}, expected "
                               f"{SHAPES3D_SHA256}); nothing was saved")
    assert list(tmp_path.iterdir()) == []


def test_digest_from_the_environment(server, payload, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFVAE_SHAPES3D_SHA256", sha(payload).upper())
    assert download_shapes3d(url=server.url, dest=tmp_path, progress=False).read_bytes() == payload


def test_a_file_with_the_digest_but_not_the_layout_is_not_saved(server, tmp_path):
    """The layout is checked after the digest, so a digest pinned for the wrong file cannot
    put it in the cache under the real name."""
    wrong = write_sparse(tmp_path / "wrong.h5", keys=("images",)).read_bytes()
    server.payload = wrong
    dest = tmp_path / "dest"
    with pytest.raises(FastFVAEError) as info:
        download_shapes3d(url=server.url, dest=dest, sha256=sha(wrong), progress=False)
    assert str(info.value).startswith(f"download of {server.url} is not the 3dshapes file (missing labels")
    assert str(info.value).endswith("nothing was saved") and not dest.exists()


def test_an_existing_file_that_fails_its_checks_is_fetched_again(server, payload, tmp_path, capsys):
    final = tmp_path / SHAPES3D_FILENAME
    final.write_bytes(payload[:1000])
    path = download_shapes3d(url=server.url, dest=tmp_path, sha256=sha(payload), progress=False)
    assert path.read_bytes() == payload and server.requests == [None]
    assert f"{final} does not match the expected SHA-256; downloading again" in capsys.readouterr().err


def test_check_shapes3d_file_counts_rows(sparse_file):
    assert check_shapes3d_file(sparse_file) == NUM_IMAGES


def test_cli_download_dataset_shapes3d(server, payload, tmp_path, capsys):
    from fastfvae.cli import main

    code = main(["data", "download", "--dataset", "shapes3d", "--url", server.url, "--dest", str(tmp_path),
                 "--sha256", sha(payload)])
    assert code == 0 and capsys.readouterr().out.strip() == str(tmp_path / SHAPES3D_FILENAME)
    assert (tmp_path / SHAPES3D_FILENAME).read_bytes() == payload
    code = main(["data", "download", "--dataset", "noisy_dsprites", "--dest", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["fastfvae: error: --dataset 'noisy_dsprites' cannot be downloaded; expected one of "
                                 "dsprites, shapes3d (color_dsprites and noisy_dsprites use the dsprites file)"]
    assert not (tmp_path / "x").exists()
