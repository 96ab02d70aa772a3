"""Shared helpers of the metric tests: the parity tables and a tiny dSprites-like set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
TABLES = ("disentangled", "entangled", "ignore")


def expected() -> dict:
    return json.loads((DATA / "expected.json").read_text())


def load_table(name: str) -> tuple[np.ndarray, tuple[int, ...]]:
    with np.load(DATA / f"{name}.npz") as npz:
        return npz["codes"], tuple(int(s) for s in npz["factor_sizes"])


def tiny_dsprites(sizes=(3, 4, 4, 4)):
    """A small DSprites over (shape, scale, posX, posY), full row-major grid, drawn blobs."""
    from fastfvae.data import DSprites
    from fastfvae.data.grid import FactorGrid

    grid = FactorGrid(sizes)
    f = grid.all_factors()
    classes = np.zeros((grid.num_rows, 6), dtype=np.int64)
    classes[:, [1, 2, 4, 5]] = f
    images = np.zeros((grid.num_rows, 64, 64), dtype=np.uint8)
    for i, (shape, scale, x, y) in enumerate(f):
        half = 3 + 2 * scale
        cx, cy = 12 + 13 * x, 12 + 13 * y
        patch = images[i, cy - half:cy + half, cx - half:cx + half]
        if shape == 0:
            patch[:] = 1
        elif shape == 1:
            patch[half - 1:half + 1, :] = 1
            patch[:, half - 1:half + 1] = 1
        else:
            np.fill_diagonal(patch, 1)
    return DSprites.from_images(images, classes)
