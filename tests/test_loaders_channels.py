"""Loaders over uint8 (3-channel) storage: every kind gives images / 255 in NCHW for the
EpochSampler's rows, from an in-memory, memory-mapped or lazily read set; gather_uint8 is
graph-safe; the device loader shares a CPU set and uploads a large one block by block."""

import numpy as np
import pytest
import torch

import fastfvae.data.loaders.device as device_loader
from fastfvae.data import EpochSampler, FactorGrid
from fastfvae.data.loaders import LOADER_KINDS, gather_batch, gather_uint8, gather_unpack, make_loader, uint8_to_float
from fastfvae.data.shapes3d import FACTOR_SIZES, NUM_IMAGES, Shapes3D, read_shapes3d, save_shapes3d
from fastfvae.errors import FastFVAEError

from extras import with_extras

N, B, SEED = 150, 32, 3  # 4 batches an epoch, 22 rows dropped each epoch
STEPS = 10


def expected_pixels(images_nhwc: np.ndarray) -> np.ndarray:
    """What a batch must be, in numpy: disentanglement_lib's images.astype(float32) / 255., NCHW."""
    return (images_nhwc.astype(np.float32) / 255.).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (N, 64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def classes():
    rows = np.sort(np.random.default_rng(1).choice(NUM_IMAGES, N, replace=False))
    return FactorGrid(FACTOR_SIZES).factors_of(rows)


@pytest.fixture(scope="module", params=["memory", "memmap", "lazy"])
def data(request, images, classes, tmp_path_factory):
    """The same small set three ways: an array, a memory-mapped file, a gzip file read on demand."""
    in_memory = Shapes3D.from_images(images, classes)
    if request.param == "memory":
        return in_memory
    path = tmp_path_factory.mktemp("channels") / f"{request.param}.h5"
    save_shapes3d(in_memory, path, compression=None if request.param == "memmap" else "gzip")
    loaded = read_shapes3d(path, require_full=False)
    assert loaded.in_memory == (request.param == "memmap")
    return loaded


@pytest.fixture(scope="module")
def reference():
    sampler = EpochSampler(N, B, SEED)
    return [sampler.next_rows() for _ in range(STEPS)]


LOADERS = [pytest.param(kind, options, id=name, marks=[pytest.mark.requires_extra("dali")] if kind == "dali" else [])
           for kind, options, name in [("device", {}, "device"), ("dali", {}, "dali"), ("torch", {}, "torch"),
                                       ("torch", {"num_workers": 2}, "torch-2workers")]]
KINDS = with_extras(LOADER_KINDS, lambda kind: "dali" if kind == "dali" else None)


@pytest.mark.parametrize("kind, options", LOADERS)
def test_every_loader_gives_images_over_255_in_nchw(data, images, reference, kind, options):
    with make_loader(kind, data, B, SEED, "cpu", **options) as loader:
        for step, rows in enumerate(reference):
            batch, got_rows = loader.next_batch_with_rows()
            assert np.array_equal(np.asarray(got_rows), rows), f"step {step}"
            assert batch.dtype == torch.float32 and batch.shape == (B, 3, 64, 64)
            assert np.array_equal(batch.numpy(), expected_pixels(images[rows])), f"step {step}"
        assert loader.state_dict()["sampler"]["epoch"] == 2


@pytest.mark.parametrize("resume_kind", KINDS)
@pytest.mark.parametrize("kind", KINDS)
def test_resume_mid_epoch_on_any_kind(data, images, reference, kind, resume_kind):
    first = make_loader(kind, data, B, SEED)
    for _ in range(6):
        first.next_batch()
    second = make_loader(resume_kind, data, B, SEED + 1)
    second.load_state_dict(first.state_dict())
    for step in range(6, STEPS):
        batch, rows = second.next_batch_with_rows()
        assert np.array_equal(np.asarray(rows), reference[step]), f"step {step}"
        assert np.array_equal(batch.numpy(), expected_pixels(images[reference[step]]))
    first.close()
    second.close()


def test_the_cpu_device_loader_shares_the_array(images, classes, tmp_path):
    in_memory = Shapes3D.from_images(images, classes)
    loader = make_loader("device", in_memory, B)
    assert loader.storage == "uint8" and loader.packed.shape == (N, 64, 64, 3)
    assert loader.packed.data_ptr() == in_memory.packed.ctypes.data  # no copy
    path = tmp_path / "m.h5"
    save_shapes3d(in_memory, path, compression=None)
    mapped = read_shapes3d(path, require_full=False)
    loader = make_loader("device", mapped, B)  # read-only memmap: shared, and no warning about it
    assert loader.packed.data_ptr() == mapped.packed.ctypes.data


def test_a_large_set_is_uploaded_block_by_block(images, classes, tmp_path, monkeypatch):
    """Off the CPU the loader copies `stored_block`s, so a file read on demand is never read
    whole into host memory. (Run here on the CPU by calling the upload itself.)"""
    path = tmp_path / "lazy.h5"
    save_shapes3d(Shapes3D.from_images(images, classes), path)
    lazy = read_shapes3d(path, require_full=False)
    blocks = []
    stored_block = lazy.stored_block
    monkeypatch.setattr(lazy, "stored_block", lambda a, b: blocks.append((a, b)) or stored_block(a, b))
    monkeypatch.setattr(device_loader, "UPLOAD_ROWS", 64)
    uploaded = device_loader.upload_blocks(lazy, torch.device("cpu"))
    assert blocks == [(0, 64), (64, 128), (128, 150)]
    assert np.array_equal(uploaded.numpy(), images) and not lazy.in_memory


def test_gather_uint8_is_one_graph_without_host_sync(images):
    packed = torch.from_numpy(images)
    rows = torch.tensor([5, 0, 149, 5])
    compiled = torch.compile(gather_uint8, fullgraph=True, backend="aot_eager")
    expected = torch.from_numpy(expected_pixels(images[rows.numpy()]))
    assert torch.equal(compiled(packed, rows), expected)
    assert torch.equal(gather_uint8(packed, rows), expected)
    assert torch.equal(torch.compile(gather_batch, fullgraph=True, backend="aot_eager")(packed, rows), expected)


def test_gather_batch_dispatches_on_the_storage(images):
    bits = torch.randint(0, 256, (10, 512), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([9, 2])
    assert torch.equal(gather_batch(bits, rows), gather_unpack(bits, rows))
    assert gather_batch(torch.from_numpy(images), rows).shape == (2, 3, 64, 64)


def test_uint8_to_float_layout_and_dtype_options(images):
    x = torch.from_numpy(images[:4])
    nchw = uint8_to_float(x)
    assert nchw.is_contiguous()
    last = uint8_to_float(x, memory_format=torch.channels_last)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, nchw)
    half = uint8_to_float(x, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), nchw, rtol=4e-3, atol=0)


def test_unknown_storage_is_refused(images, classes):
    data = Shapes3D.from_images(images, classes)
    data.storage = "jpeg"
    with pytest.raises(FastFVAEError, match="unknown dataset storage 'jpeg'; expected bits or uint8"):
        make_loader("device", data, B)


@pytest.mark.slow
def test_gather_uint8_under_inductor(images):
    packed = torch.from_numpy(images)
    rows = torch.randint(0, N, (64,), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(gather_uint8, fullgraph=True)
    assert torch.equal(compiled(packed, rows), torch.from_numpy(expected_pixels(images[rows.numpy()])))
