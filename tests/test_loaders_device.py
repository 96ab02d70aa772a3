"""The device loader: bit unpacking, graph-safety, and uniform rows in the random order."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from fastfvae.data import DSprites, pack_images
from fastfvae.data.dsprites import FACTOR_SIZES, NUM_IMAGES, classes_of
from fastfvae.data.loaders import gather_unpack, make_loader, uniform_rows, unpack_bits
from fastfvae.data.loaders.unpack import _bit_table

N = 300


@pytest.fixture(scope="module")
def data():
    images = np.random.default_rng(1).integers(0, 2, (N, 64, 64), dtype=np.uint8)
    return DSprites.from_images(images, classes_of(np.arange(N)))


def test_unpack_bits_matches_numpy():
    images = np.random.default_rng(2).integers(0, 2, (5, 64, 64), dtype=np.uint8)
    images[0] = 0
    images[1] = 1
    images[2, 0, :8] = [1, 0, 0, 0, 0, 0, 0, 1]  # MSB-first bit order within a byte
    packed = torch.from_numpy(pack_images(images))
    out = unpack_bits(packed)
    assert out.dtype == torch.float32 and out.shape == (5, 1, 64, 64)
    assert np.array_equal(out.numpy()[:, 0], images.astype(np.float32))
    # The bit-table path eager GPU runs take, here on the CPU.
    table = _bit_table(torch.device("cpu")).index_select(0, packed.reshape(-1).long())
    assert torch.equal(table.reshape(out.shape), out)


def test_gather_unpack_is_one_graph_without_host_sync(data):
    packed = torch.from_numpy(data.packed)
    rows = torch.tensor([5, 0, 299, 5])
    # fullgraph=True fails on any graph break (a host sync, a data-dependent shape);
    # aot_eager also runs functionalisation, as Inductor would, in a fraction of the time.
    compiled = torch.compile(gather_unpack, fullgraph=True, backend="aot_eager")
    # The traced (shift-and-mask) path and the eager (bit-table) path agree with numpy.
    assert torch.equal(compiled(packed, rows), data.float_batch(rows.numpy()))
    assert torch.equal(gather_unpack(packed, rows), data.float_batch(rows.numpy()))
    # In-graph random rows (the default generator: Dynamo cannot trace a torch.Generator).
    drawn = torch.compile(lambda p: gather_unpack(p, uniform_rows(N, 8, p.device)), fullgraph=True,
                          backend="aot_eager")(packed)
    assert drawn.shape == (8, 1, 64, 64) and set(drawn.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.slow
def test_gather_unpack_under_inductor(data):
    packed = torch.from_numpy(data.packed)
    rows = torch.randint(0, N, (64,), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(gather_unpack, fullgraph=True)
    assert torch.equal(compiled(packed, rows), data.float_batch(rows.numpy()))


def _row_counts(loader, batches):
    rows = torch.cat([loader.next_rows() for _ in range(batches)])
    return np.bincount(rows.numpy(), minlength=N)


def test_random_order_is_uniform_over_rows(data):
    loader = make_loader("device", data, 64, seed=3, order="random")
    counts = _row_counts(loader, 300)  # 19,200 draws, 64 a row on average
    assert counts.sum() == 300 * 64
    assert chisquare(counts).pvalue > 1e-3
    # The test can fail: a sampler that never draws the top 10% of rows is rejected.
    biased = counts.copy()
    biased[: N // 10] += biased[-(N // 10):]
    biased[-(N // 10):] = 0
    assert chisquare(biased).pvalue < 1e-6


def test_random_order_factor_marginals_are_uniform():
    # Over the full-size index space: the rows' factors are each uniform.
    rows = uniform_rows(NUM_IMAGES, 20000, "cpu", torch.Generator().manual_seed(4)).numpy()
    factors = classes_of(rows)
    for k, size in enumerate(FACTOR_SIZES):
        if size > 1:
            assert chisquare(np.bincount(factors[:, k], minlength=size)).pvalue > 1e-3, k


def test_random_order_resumes_bit_exactly(data):
    loader = make_loader("device", data, 64, seed=5, order="random")
    loader.next_batch()
    state = loader.state_dict()
    ahead = [loader.next_rows() for _ in range(3)]
    other = make_loader("device", data, 64, seed=99, order="random")
    other.load_state_dict(state)
    assert all(torch.equal(other.next_rows(), rows) for rows in ahead)
    # Different seeds give different streams.
    assert not torch.equal(make_loader("device", data, 64, seed=6, order="random").next_rows(), ahead[0])


def test_rows_are_device_views_of_the_uploaded_epoch(data):
    loader = make_loader("device", data, 64, seed=0)
    rows = loader.next_rows()
    assert rows.dtype == torch.int64 and rows.device == loader.packed.device
    # The CPU "device" shares the dataset's buffer: no copy of the images.
    assert loader.packed.data_ptr() == torch.from_numpy(data.packed).data_ptr()


def test_read_only_packed_rows_are_shared_without_a_warning(data):
    """A cached render or memory-mapped file is read-only: the CPU loader shares it (no copy of
    the 0.38 GB set) and says nothing about it (torch warns about non-writable arrays)."""
    import warnings

    packed = data.packed.copy()
    packed.flags.writeable = False
    ro = DSprites(packed, data.latents_classes, data.latents_values, source="read-only")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader = make_loader("device", ro, 8, seed=0, device="cpu")
    assert loader.packed.data_ptr() == packed.ctypes.data  # shared, not copied
    assert loader.next_batch().shape == (8, 1, 64, 64)
