"""Metric speed: `pytest bench/bench_metrics.py --benchmark-only`.

* ``table-*``: dlib's default evaluation (FactorVAE, beta-VAE, MIG, SAP at dlib's study
  sizes, seed 0) from a precomputed dSprites code table [737,280, 10], all four together and
  each alone; plus DCI (parity, GradientBoosting) beside the fast DCI (HistGradientBoosting)
  at 2000/1000 points.
* ``model-cpu``: the same four metrics from a model on the CPU, *including* encoding all
  737,280 images once (a random-init paper VAE; the cost does not depend on its weights or
  on the image content, so the images are random bits). The encode seconds are stored in
  ``extra_info["encode_s"]``. Set ``FASTFVAE_BENCH_ENCODE_ROWS=N`` to encode only the first
  N rows (the metrics then run on a table with the remaining rows zero): a quick estimate
  on slow machines.

Reported, not asserted. Intra-op threads: torch's default.
"""

import os

import numpy as np
import pytest

from fastfvae.data import NUM_IMAGES, DSprites
from fastfvae.data.dsprites import LATENT_GRID, classes_of, values_of
from fastfvae.metrics import DLIB_QUICK_METRICS, encode_dataset, evaluate_codes
from fastfvae.metrics.evaluate import evaluate_model

SIZES = LATENT_GRID.sizes


@pytest.fixture(scope="module")
def codes() -> np.ndarray:
    """A plausible code table: each factor in one dim plus noise, 5 mixed noise dims."""
    rng = np.random.default_rng(0)
    f = LATENT_GRID.all_factors() / (np.asarray(SIZES) - 1.0)
    noise = rng.standard_normal((f.shape[0], 5))
    return np.concatenate([f + 0.05 * rng.standard_normal(f.shape), noise], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> DSprites:
    rng = np.random.default_rng(0)
    rows = np.arange(NUM_IMAGES)
    classes = classes_of(rows)
    packed = rng.integers(0, 256, size=(NUM_IMAGES, 512), dtype=np.uint8)
    return DSprites(packed, classes, values_of(classes), source="random bits")


@pytest.mark.benchmark(group="metrics-table")
def test_table_dlib_default(benchmark, codes):
    timings = {}
    scores = benchmark.pedantic(evaluate_codes, args=(codes, SIZES, DLIB_QUICK_METRICS),
                                kwargs={"timings": timings}, rounds=3, iterations=1)
    benchmark.extra_info.update({f"{k}_s": v for k, v in timings.items()})
    assert set(scores) == set(DLIB_QUICK_METRICS)


@pytest.mark.benchmark(group="metrics-table-each")
@pytest.mark.parametrize("metric", DLIB_QUICK_METRICS)
def test_table_each(benchmark, codes, metric):
    benchmark.pedantic(evaluate_codes, args=(codes, SIZES, (metric,)), rounds=3, iterations=1)


@pytest.mark.benchmark(group="metrics-dci-2000")
@pytest.mark.parametrize("metric", ["dci", "dci_fast"])
def test_table_dci(benchmark, codes, metric):
    config = {metric: {"num_train": 2000, "num_test": 1000}}
    benchmark.pedantic(evaluate_codes, args=(codes, SIZES, (metric,)), kwargs={"config": config},
                       rounds=1, iterations=1)


@pytest.mark.benchmark(group="metrics-model")
@pytest.mark.timeout(7200)  # 737,280 conv-net encodes: minutes on a 2-core CPU
def test_model_cpu_including_encoding(benchmark, data):
    import torch

    from fastfvae.models.vae import VAE

    torch.manual_seed(0)
    vae = VAE(z_dim=10).eval()
    rows = int(os.environ.get("FASTFVAE_BENCH_ENCODE_ROWS", NUM_IMAGES))
    timings = {}
    if rows >= NUM_IMAGES:
        run = lambda: evaluate_model(vae, data, DLIB_QUICK_METRICS, device="cpu", timings=timings)  # noqa: E731
    else:
        def run():
            import time

            start = time.perf_counter()
            part = encode_dataset(vae, DSprites(data.packed[:rows], data.latents_classes[:rows],
                                                data.latents_values[:rows]))
            timings["encode"] = time.perf_counter() - start
            table = np.zeros((NUM_IMAGES, part.shape[1]), np.float32)
            table[:rows] = part
            table[rows:] = np.random.default_rng(0).standard_normal((NUM_IMAGES - rows, part.shape[1]))
            return evaluate_codes(table, SIZES, DLIB_QUICK_METRICS, timings=timings)
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update({f"{k}_s": v for k, v in timings.items()})
    benchmark.extra_info["encoded_rows"] = min(rows, NUM_IMAGES)
    benchmark.extra_info["threads"] = torch.get_num_threads()
