"""A picture of a dSprites set: random images, then one sweep per factor."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastfvae.data.dsprites import FACTOR_NAMES, LATENT_FACTOR_INDICES
from fastfvae.viz.grids import tile, to_uint8

#: Base latents (shape, scale, orientation, posX, posY) the sweeps start from: a large heart
#: in the middle, so every factor's effect is visible.
SWEEP_BASE = (2, 5, 0, 16, 16)
SWEEP_NAMES = tuple(FACTOR_NAMES[k] for k in LATENT_FACTOR_INDICES)


def dataset_panels(data, columns: int = 10, random_rows: int = 2, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """[rows, columns, 64, 64] float images and a label per row.

    Random images first (``random_rows`` rows, drawn with ``seed``); then, for a full set,
    one row per factor sweeping it over up to ``columns`` evenly spaced classes from
    `SWEEP_BASE` (blank cells where a factor has fewer classes).
    """
    rng = np.random.default_rng(seed)
    count = min(len(data), columns * random_rows)
    picked = np.sort(rng.choice(len(data), size=count, replace=False))
    random_imgs = np.zeros((columns * random_rows, 64, 64), dtype=np.float32)
    random_imgs[:count] = data.images_at(picked)
    panels = [random_imgs.reshape(random_rows, columns, 64, 64)]
    labels = ["random"] * random_rows
    if data.is_full:
        sizes = data.latent_grid.sizes
        for k, (name, size) in enumerate(zip(SWEEP_NAMES, sizes)):
            classes = np.unique(np.linspace(0, size - 1, min(size, columns)).round().astype(np.int64))
            factors = np.tile(np.asarray(SWEEP_BASE, dtype=np.int64), (len(classes), 1))
            factors[:, k] = classes
            row = np.zeros((1, columns, 64, 64), dtype=np.float32)
            row[0, :len(classes)] = data.images_at(data.rows_from_factors(factors))
            panels.append(row)
            labels.append(name)
    return np.concatenate(panels, axis=0), labels


def save_dataset_grid(data, path: str | Path, columns: int = 10, random_rows: int = 2, seed: int = 0) -> Path:
    """Write the `dataset_panels` grid as a PNG with a label per row; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, labels = dataset_panels(data, columns, random_rows, seed)
    grid = tile(images, pad=2, pad_value=0.35)
    path = Path(path)
    fig = plt.figure(figsize=(grid.shape[1] / 60 + 1.2, grid.shape[0] / 60 + 0.5), dpi=100)
    ax = fig.add_axes((0.12, 0.02, 0.86, 0.9))
    ax.imshow(to_uint8(grid), cmap="gray", interpolation="nearest", vmin=0, vmax=255)
    ax.set_yticks([r * 66 + 32 for r in range(len(labels))], labels, fontsize=8)
    ax.set_xticks([])
    ax.set_title(f"dSprites: {data.source} ({len(data)} images)", fontsize=9)
    fig.savefig(path)
    plt.close(fig)
    return path
