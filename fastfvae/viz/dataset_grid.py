"""A picture of a ground-truth dataset: random images, then one sweep per factor.

Any `fastfvae.data.base.GroundTruthData`: gray for a 1-channel dataset, RGB for a 3-channel
one; the images are its observations (for colour / noisy dSprites, drawn with
``np.random.RandomState(seed)``, disentanglement_lib's draw of their noise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastfvae.data.dsprites import FACTOR_NAMES, FACTOR_SIZES, LATENT_FACTOR_INDICES
from fastfvae.viz.grids import tile, to_uint8

#: Base latents (shape, scale, orientation, posX, posY) the dSprites sweeps start from: a
#: large heart in the middle, so every factor's effect is visible.
SWEEP_BASE = (2, 5, 0, 16, 16)
SWEEP_NAMES = tuple(FACTOR_NAMES[k] for k in LATENT_FACTOR_INDICES)
DSPRITES_FACTOR_SIZES = tuple(FACTOR_SIZES[k] for k in LATENT_FACTOR_INDICES)
#: How a dataset's registry name is written in the title.
TITLES = {"dsprites": "dSprites", "color_dsprites": "colour dSprites", "noisy_dsprites": "noisy dSprites",
          "shapes3d": "3D Shapes"}


def _is_dsprites_grid(data) -> bool:
    return tuple(data.latent_grid.sizes) == DSPRITES_FACTOR_SIZES


def sweep_start(data) -> tuple[int, ...]:
    """The factor classes the sweeps start from: `SWEEP_BASE` on dSprites' grid, else the
    middle class of every factor."""
    if _is_dsprites_grid(data):
        return SWEEP_BASE
    return tuple(size // 2 for size in data.latent_grid.sizes)


def _pictures(data, rows: np.ndarray, seed: int) -> np.ndarray:
    """float32 [n, 64, 64] (1 channel) or [n, 64, 64, C] observations of ``rows``."""
    from fastfvae.metrics.encode import has_observation_noise
    from fastfvae.viz.decode import as_pictures

    if has_observation_noise(data):
        return as_pictures(data.observations(rows, np.random.RandomState(seed)))
    return as_pictures(data.float_batch(rows))


def dataset_panels(data, columns: int = 10, random_rows: int = 2, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """[rows, columns, 64, 64] (or [..., 64, 64, C]) float images and a label per row.

    Random images first (``random_rows`` rows, drawn with ``seed``); then, for a full set,
    one row per factor sweeping it over up to ``columns`` evenly spaced classes from
    `sweep_start` (blank cells where a factor has fewer classes).
    """
    rng = np.random.default_rng(seed)
    count = min(len(data), columns * random_rows)
    picked = np.sort(rng.choice(len(data), size=count, replace=False))
    pictures = _pictures(data, picked, seed)
    cell = pictures.shape[1:]
    random_imgs = np.zeros((columns * random_rows, *cell), dtype=np.float32)
    random_imgs[:count] = pictures
    panels = [random_imgs.reshape(random_rows, columns, *cell)]
    labels = ["random"] * random_rows
    if data.is_full:
        sizes = data.latent_grid.sizes
        names = SWEEP_NAMES if _is_dsprites_grid(data) else tuple(data.factor_names)
        for k, (name, size) in enumerate(zip(names, sizes)):
            classes = np.unique(np.linspace(0, size - 1, min(size, columns)).round().astype(np.int64))
            factors = np.tile(np.asarray(sweep_start(data), dtype=np.int64), (len(classes), 1))
            factors[:, k] = classes
            row = np.zeros((1, columns, *cell), dtype=np.float32)
            row[0, :len(classes)] = _pictures(data, data.rows_from_factors(factors), seed)
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
    if grid.ndim == 2:
        ax.imshow(to_uint8(grid), cmap="gray", interpolation="nearest", vmin=0, vmax=255)
    else:
        ax.imshow(to_uint8(grid), interpolation="nearest")
    ax.set_yticks([r * 66 + 32 for r in range(len(labels))], labels, fontsize=8)
    ax.set_xticks([])
    name = getattr(data, "name", "dsprites")
    ax.set_title(f"{TITLES.get(name, name)}: {data.source} ({len(data)} images)", fontsize=9)
    fig.savefig(path)
    plt.close(fig)
    return path
