"""NPZ and HDF5 loaders on small synthetic files in the real formats, and every bad-file case."""

import pickle
import zipfile

import h5py
import numpy as np
import pytest

from fastfvae.cli import main
from fastfvae.data import NUM_IMAGES, DSprites, classes_of, load_dsprites, load_file, save_hdf5, save_npz
from fastfvae.data.files import PartialSetError, _check_tables, check_npz_archive, sniff_format
from fastfvae.errors import FastFVAEError

N = 96


@pytest.fixture(scope="module")
def small() -> DSprites:
    rows = np.random.RandomState(0).choice(NUM_IMAGES, size=N, replace=False)
    classes = classes_of(np.sort(rows))
    images = np.zeros((N, 64, 64), np.uint8)
    for i, c in enumerate(classes):  # any binary content will do; make every image distinct
        images[i, c[4] + 2:c[4] + 12, c[5] + 2:c[5] + 4 + c[2]] = 1
        images[i, 60, i % 64] = 1
    return DSprites.from_images(images, classes, source="synthetic")


@pytest.fixture(scope="module")
def files(small, tmp_path_factory):
    d = tmp_path_factory.mktemp("dsprites")
    save_npz(small, d / "small.npz")
    save_hdf5(small, d / "small.hdf5")
    return d


def raw_npz(path, **arrays):
    """An NPZ written by numpy itself (np.savez), as the real file was."""
    np.savez(path, **arrays)
    return path


def good_arrays(small):
    return dict(imgs=small.images, latents_values=small.latents_values,
                latents_classes=small.latents_classes,
                metadata=np.array({"title": "dSprites", "latents_sizes": np.array([1, 3, 6, 40, 32, 32])}))


def assert_same(a: DSprites, b: DSprites):
    assert np.array_equal(a.packed, b.packed)
    assert np.array_equal(a.latents_classes, b.latents_classes)
    assert np.array_equal(a.latents_values, b.latents_values)
    assert a.latents_classes.dtype == np.int64 and a.latents_values.dtype == np.float64


@pytest.mark.parametrize("name", ["small.npz", "small.hdf5"])
def test_round_trip_in_both_formats(small, files, name):
    loaded = load_file(files / name, require_full=False)
    assert_same(loaded, small)
    assert loaded.source == str(files / name)


def test_numpy_written_npz_with_py2_style_metadata_loads(small, tmp_path):
    path = raw_npz(tmp_path / "np.npz", **good_arrays(small))
    assert_same(load_file(path, require_full=False), small)


def test_format_is_detected_by_content_not_extension(small, files, tmp_path):
    swapped_npz = tmp_path / "really_npz.hdf5"
    swapped_npz.write_bytes((files / "small.npz").read_bytes())
    swapped_h5 = tmp_path / "really_h5.npz"
    swapped_h5.write_bytes((files / "small.hdf5").read_bytes())
    assert sniff_format(swapped_npz) == "npz" and sniff_format(swapped_h5) == "hdf5"
    assert_same(load_dsprites(swapped_npz, require_full=False), small)
    assert_same(load_dsprites(swapped_h5, require_full=False), small)


def test_chunked_packing_matches_whole_array(small, files, monkeypatch):
    import fastfvae.data.files as files_mod

    monkeypatch.setattr(files_mod, "CHUNK_ROWS", 7)  # many chunks, the last one partial
    assert_same(load_file(files / "small.npz", require_full=False), small)
    assert_same(load_file(files / "small.hdf5", require_full=False), small)


def test_partial_file_is_rejected_when_the_full_set_is_required(files):
    with pytest.raises(FastFVAEError, match=rf"small.npz: holds {N} images, expected 737280"):
        load_file(files / "small.npz")
    with pytest.raises(FastFVAEError, match=rf"small.hdf5: holds {N} images, expected 737280"):
        load_file(files / "small.hdf5")


def test_full_set_must_be_in_the_real_row_order(tmp_path):
    classes = classes_of(np.arange(NUM_IMAGES))
    values = np.zeros((NUM_IMAGES, 6))
    _check_tables(tmp_path, NUM_IMAGES, classes, values, require_full=True)  # the real order passes
    classes[[5, 6]] = classes[[6, 5]]
    with pytest.raises(FastFVAEError, match="not in the dSprites order"):
        _check_tables(tmp_path, NUM_IMAGES, classes, values, require_full=True)


def bad_npz_cases(small, tmp_path):
    good = good_arrays(small)
    cases = {}
    cases["missing"] = (tmp_path / "nope.npz", "no such file")
    (tmp_path / "text.npz").write_text("imgs,latents\n1,2\n")
    cases["not_dsprites"] = (tmp_path / "text.npz", "not a dSprites file")
    no_meta = {k: v for k, v in good.items() if k != "metadata"}
    cases["no_metadata"] = (raw_npz(tmp_path / "nometa.npz", **no_meta), "missing metadata")
    cases["wrong_shape"] = (raw_npz(tmp_path / "shape.npz", **{**good, "imgs": good["imgs"][:, :32, :32]}),
                            r"imgs has shape \[96, 32, 32\], expected \[N, 64, 64\]")
    cases["wrong_dtype"] = (raw_npz(tmp_path / "dtype.npz", **{**good, "imgs": good["imgs"].astype(np.float32)}),
                            "imgs has dtype float32, expected uint8")
    twos = good["imgs"].copy()
    twos[3, 5, 5] = 2
    cases["not_binary"] = (raw_npz(tmp_path / "twos.npz", **{**good, "imgs": twos}), "values other than 0 and 1")
    cases["short_latents"] = (raw_npz(tmp_path / "rows.npz", **{**good, "latents_classes": good["latents_classes"][:-1]}),
                              r"latents_classes has shape \[95, 6\], expected \[96, 6\]")
    big = good["latents_classes"].copy()
    big[0, 3] = 40
    cases["class_range"] = (raw_npz(tmp_path / "range.npz", **{**good, "latents_classes": big}), "out of range")
    whole = (tmp_path / "np_ok.npz")
    raw_npz(whole, **good)
    data = whole.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (tmp_path / "truncated.npz", "corrupt or truncated NPZ")
    return cases


@pytest.mark.parametrize("case", ["missing", "not_dsprites", "no_metadata", "wrong_shape", "wrong_dtype",
                                  "not_binary", "short_latents", "class_range", "truncated"])
def test_bad_npz_files_give_one_line_errors(small, tmp_path, case, capsys):
    path, message = bad_npz_cases(small, tmp_path)[case]
    with pytest.raises(FastFVAEError, match=message) as info:
        load_file(path, require_full=False)
    text = str(info.value)
    assert "\n" not in text and str(path) in text
    # through the CLI: exit 2, one line on stderr, no traceback
    assert main(["data", "info", str(path), "--allow-partial"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastfvae: error: ") and str(path) in err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("case", ["missing", "not_dsprites", "no_metadata", "wrong_shape", "wrong_dtype",
                                  "short_latents", "class_range", "truncated"])
def test_archive_check_rejects_what_the_loader_rejects_without_unpacking(small, tmp_path, case):
    """`check_npz_archive` (used by `data download`) finds every layout problem `load_file`
    finds; only pixel values (not_binary) need the images unpacked."""
    path, message = bad_npz_cases(small, tmp_path)[case]
    with pytest.raises(FastFVAEError, match=message) as info:
        check_npz_archive(path, require_full=False)
    assert "\n" not in str(info.value)


def test_archive_check_counts_rows_and_requires_the_full_set_by_default(files):
    assert check_npz_archive(files / "small.npz", require_full=False) == N
    with pytest.raises(PartialSetError, match=rf"holds {N} images, expected 737280"):
        check_npz_archive(files / "small.npz")
    with pytest.raises(FastFVAEError, match="is an HDF5 file; expected the dSprites NPZ"):
        check_npz_archive(files / "small.hdf5", require_full=False)


def test_corrupt_compressed_payload_is_rejected(small, files, tmp_path):
    data = bytearray((files / "small.npz").read_bytes())
    with zipfile.ZipFile(files / "small.npz") as zf:
        info = zf.getinfo("imgs.npy")
    middle = info.header_offset + 30 + len(info.filename) + 40 + info.compress_size // 2
    for k in range(8):
        data[middle + k] ^= 0xFF
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(FastFVAEError, match="corrupt or truncated NPZ"):
        load_file(bad, require_full=False)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_metadata_unpickler_refuses_arbitrary_objects(small, tmp_path, capsys):
    path = raw_npz(tmp_path / "evil.npz", **{**good_arrays(small), "metadata": np.array(Evil(), dtype=object)})
    with pytest.raises(FastFVAEError, match="metadata cannot be read"):
        load_file(path, require_full=False)
    assert "this must never run" not in capsys.readouterr().out
    assert pickle.dumps(1)  # the module stays usable


def test_bad_hdf5_files(small, files, tmp_path):
    whole = (files / "small.hdf5").read_bytes()
    (tmp_path / "trunc.hdf5").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(FastFVAEError, match="trunc.hdf5: corrupt or truncated HDF5"):
        load_file(tmp_path / "trunc.hdf5", require_full=False)
    with h5py.File(tmp_path / "nolatents.hdf5", "w") as h5:
        h5["imgs"] = small.images
        h5["latents/values"] = small.latents_values
    with pytest.raises(FastFVAEError, match="missing latents/classes"):
        load_file(tmp_path / "nolatents.hdf5", require_full=False)
    with h5py.File(tmp_path / "shape.hdf5", "w") as h5:
        h5["imgs"] = small.images[:, :, :63]
        h5["latents/classes"] = small.latents_classes
        h5["latents/values"] = small.latents_values
    with pytest.raises(FastFVAEError, match=r"imgs has shape \[96, 64, 63\]"):
        load_file(tmp_path / "shape.hdf5", require_full=False)
    with h5py.File(tmp_path / "values.hdf5", "w") as h5:
        h5["imgs"] = small.images
        h5["latents/classes"] = small.latents_classes
        h5["latents/values"] = small.latents_classes  # integers where floats belong
    with pytest.raises(FastFVAEError, match="latents_values has dtype int64, expected floats"):
        load_file(tmp_path / "values.hdf5", require_full=False)


def test_cli_info_and_show_on_a_small_file(files, tmp_path, capsys):
    assert main(["data", "info", str(files / "small.hdf5"), "--allow-partial"]) == 0
    out = capsys.readouterr().out
    assert f"{N} x 64 x 64" in out and "partial set" in out and "orientation 40" in out
    png = tmp_path / "grid.png"
    assert main(["data", "show", str(files / "small.npz"), "--allow-partial", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["data", "info", str(files / "small.npz")]) == 2  # partial without --allow-partial
    assert "--allow-partial" in capsys.readouterr().err


def test_python2_style_metadata_pickle_loads(small, tmp_path):
    """The real file's metadata: protocol 2, globals under ``numpy.core.multiarray``."""
    meta = np.array({"title": "dSprites", "latents_sizes": np.array([1, 3, 6, 40, 32, 32]),
                     "latents_possible_values": {"scale": np.linspace(0.5, 1, 6)}}, dtype=object)
    blob = pickle.dumps(meta, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path = tmp_path / "py2.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for name, array in good_arrays(small).items():
            with zf.open(f"{name}.npy", "w") as fh:
                if name == "metadata":
                    np.lib.format.write_array_header_1_0(fh, {"descr": "|O", "fortran_order": False, "shape": ()})
                    fh.write(blob)
                else:
                    np.lib.format.write_array(fh, array)
    assert_same(load_file(path, require_full=False), small)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["npz", "hdf5"])
def test_full_size_file_round_trip(fmt, tmp_path):
    from fastfvae.data import procedural_dsprites

    full = procedural_dsprites()
    path = tmp_path / f"full.{fmt}"
    (save_npz if fmt == "npz" else save_hdf5)(full, path)
    loaded = load_dsprites(path)  # require_full: all rows, in the real order
    assert loaded.is_full and np.array_equal(loaded.packed, full.packed)
    assert np.array_equal(loaded.latents_classes, full.latents_classes)
