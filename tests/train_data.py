"""Small dSprites subsets for the training tests (a few thousand rows render in well under a second)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from fastfvae.data import FACTOR_SIZES, DSprites, FactorGrid


def _squares(classes: np.ndarray) -> np.ndarray:
    """Fallback renderer: squares whose size / position follow scale / posX / posY."""
    images = np.zeros((len(classes), 64, 64), np.uint8)
    for i, (_, _, scale, _, px, py) in enumerate(classes):
        side = 6 + 2 * int(scale)
        x, y = int(px) * (64 - side) // 31, int(py) * (64 - side) // 31
        images[i, y:y + side, x:x + side] = 1
    return images


@functools.lru_cache(maxsize=4)
def small_dsprites(n: int = 2048, seed: int = 0) -> DSprites:
    """``n`` random dSprites rows (procedural renderer when available), as a DSprites."""
    classes = FactorGrid(FACTOR_SIZES).sample_factors(n, np.random.RandomState(seed))
    try:
        from fastfvae.data.procedural import render
    except ImportError:  # pragma: no cover - the renderer is part of the data layer
        render = _squares
    return DSprites.from_images(render(classes), classes, source="test-subset")


@pytest.fixture(autouse=True)
def one_thread():
    """Training tests on one intra-op thread (2-thread OpenMP regions stall on a shared 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_config(**values):
    """A `TrainConfig` from ``values``, leaving out the hyperparameters its model does not
    declare (the tests' small-discriminator settings apply to FactorVAE only)."""
    from fastfvae import methods
    from fastfvae.train.config import TrainConfig

    declared = set(methods.get(values.get("model", "factorvae")).Hparams.__dataclass_fields__)
    fields = set(TrainConfig.__dataclass_fields__)
    return TrainConfig(**{k: v for k, v in values.items() if k in fields or k in declared})
