"""Loader throughput (samples/s) on a full-size dSprites: `pytest bench/bench_loaders.py --benchmark-only`.

One benchmark group per batch size, so each row shows its ratio to the fastest loader. One
call is one ``next_batch()`` (float32 [B, 1, 64, 64] on the CPU); samples/s = B / mean time
is stored as ``extra_info["samples_per_s"]``. The images are random bits (a loader's cost does
not depend on the content): 737,280 rows, bit-packed, as the real set.

Rows: ``device`` (resident packed set, eager gather+unpack), ``device-compiled`` (the same
gather+unpack under ``torch.compile``, as inside the compiled step), ``dali`` (CPU mode),
``torch`` (DataLoader, no workers) and ``torch-2workers``. Intra-op threads: 1.
"""

import numpy as np
import pytest
import torch

from bench.conftest import timing
from fastfvae.data import NUM_IMAGES, DSprites
from fastfvae.data.dsprites import classes_of, values_of
from fastfvae.data.loaders import gather_unpack, make_loader

VARIANTS = {
    "device": ("device", {}),
    "device-compiled": ("device", {}),
    "dali": ("dali", {}),
    "torch": ("torch", {}),
    "torch-2workers": ("torch", {"num_workers": 2}),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Loaders measured on one intra-op thread (the step would get the other core; 2-thread
    OpenMP regions stall when other processes hold a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def full_dsprites():
    packed = np.random.default_rng(0).integers(0, 256, (NUM_IMAGES, 512), dtype=np.uint8)
    classes = classes_of(np.arange(NUM_IMAGES))
    return DSprites(packed, classes, values_of(classes), source="synthetic random bits")


@pytest.mark.parametrize("batch_size", [64, 256])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loader_samples_per_s(benchmark, full_dsprites, variant, batch_size):
    if variant == "dali":
        pytest.importorskip("nvidia.dali")
    kind, options = VARIANTS[variant]
    loader = make_loader(kind, full_dsprites, batch_size, seed=0, device="cpu", **options)
    next_batch = loader.next_batch
    if variant == "device-compiled":
        unpack = torch.compile(gather_unpack, fullgraph=True, dynamic=False)

        def next_batch():
            return unpack(loader.packed, loader.next_rows())

    for _ in range(5):  # start workers / pipelines, compile
        next_batch()
    benchmark.group = f"loaders, batch {batch_size}"
    benchmark.extra_info["batch_size"] = batch_size
    out = benchmark(next_batch)
    assert out.shape == (batch_size, 1, 64, 64) and out.dtype == torch.float32
    loader.close()
    stats = timing(benchmark)
    if stats is not None:
        benchmark.extra_info["samples_per_s"] = batch_size / stats.mean
        benchmark.extra_info["samples_per_s_median"] = batch_size / stats.median  # robust to load spikes
