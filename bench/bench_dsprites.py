"""Procedural dSprites render speed and memory: `pytest bench/bench_dsprites.py --benchmark-only`.

One call renders all 737,280 images, bit-packed, in the real row order (what
`procedural_dsprites` does before wrapping them). Rows: 1 worker thread and 2 worker
threads. ``extra_info["peak_mb"]`` is the peak resident memory above the start of the call
(sampled every 2 ms; goal <= 4 GB), ``extra_info["images_per_s"]`` the render rate. The
goal is <= 10 s on 2 cores. For comparison, ``load-npz-cache`` reads the same packed array
back from a compressed .npz (the on-disk cache that was measured and not adopted).
"""

import numpy as np
import pytest
import torch

from bench.conftest import peak_memory, timing
from fastfvae.data import NUM_IMAGES
from fastfvae.data.procedural import render_packed


@pytest.mark.parametrize("workers", [1, 2])
def test_render_full_set(benchmark, workers):
    benchmark.group = "dsprites-render"
    stats = {}

    def run():
        with peak_memory(torch.device("cpu"), stats):
            return render_packed(workers=workers)

    packed = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    assert packed.shape == (NUM_IMAGES, 512)
    assert stats["peak_mb"] < 4096
    if timing(benchmark) is None:
        return
    benchmark.extra_info["peak_mb"] = round(stats["peak_mb"], 1)
    benchmark.extra_info["images_per_s"] = round(NUM_IMAGES / timing(benchmark).mean)


def test_load_npz_cache(benchmark, tmp_path):
    benchmark.group = "dsprites-render"
    path = tmp_path / "packed.npz"
    np.savez_compressed(path, packed=render_packed())

    def load():
        with np.load(path) as npz:
            return npz["packed"]

    packed = benchmark.pedantic(load, rounds=3, iterations=1)
    assert packed.shape == (NUM_IMAGES, 512)
