"""The DALI loader in CPU mode (device_id=None): infinite stream, no hang, clear error without DALI."""

import sys

import numpy as np
import pytest

from fastfvae.data import DSprites, EpochSampler
from fastfvae.data.dsprites import classes_of
from fastfvae.data.loaders import make_loader
from fastfvae.errors import FastFVAEError

N, B = 130, 32  # 4 batches an epoch


@pytest.fixture(scope="module")
def data():
    images = np.random.default_rng(3).integers(0, 2, (N, 64, 64), dtype=np.uint8)
    return DSprites.from_images(images, classes_of(np.arange(N)))


@pytest.mark.requires_extra("dali")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("depth", [1, 3])
def test_no_hang_at_epoch_ends(data, depth):
    sampler = EpochSampler(N, B, 11)
    with make_loader("dali", data, B, 11, prefetch_queue_depth=depth) as loader:
        assert loader.device_id is None  # CPU-only mode
        for step in range(4 * 5 + 1):  # five epoch boundaries
            images, rows = loader.next_batch_with_rows()
            assert np.array_equal(rows.numpy(), sampler.next_rows()), f"step {step}"
            assert images.shape == (B, 1, 64, 64)
        assert loader.epoch == 5


def test_clear_error_without_dali(data, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import of it raises ImportError
    monkeypatch.setitem(sys.modules, "nvidia.dali.plugin.pytorch", None)
    with pytest.raises(FastFVAEError, match=r"fastfvae\[dali\]"):
        make_loader("dali", data, B)


@pytest.mark.requires_extra("dali")
def test_rejects_other_devices(data):
    with pytest.raises(FastFVAEError, match="cpu or cuda"):
        make_loader("dali", data, B, device="meta")
