"""`GroundTruthData`: the one interface every layer (loaders, training step, metrics, figures)
uses to reach a dataset, in the spirit of disentanglement_lib's ``GroundTruthData``
(Locatello et al. 2019, ``disentanglement_lib/data/ground_truth/ground_truth_data.py``).

A dataset is a full factorial grid of discrete ground-truth factors with one stored 64x64
image per factor combination, row-major over the factors (last factor fastest), so a factor
combination *is* a row index (`fastfvae.data.grid.FactorGrid`). What differs between
datasets is how the images are stored and what the model sees:

* ``storage`` — how `packed` holds the images, which decides how the loaders deliver them:

  - ``"bits"``: uint8 [N, 512], each row ``np.packbits`` of a binary 64x64 image
    (dSprites and its variants); loaders give float32 [B, 1, 64, 64] in {0., 1.};
  - ``"uint8"``: uint8 [N, 64, 64, C], values 0..255, NHWC as the files hold them
    (3dshapes); loaders give float32 [B, C, 64, 64] = images / 255.

* ``base_channels`` — the channels of what the loaders deliver (the stored images);
  ``channels`` — the channels of the observations the model sees. They differ only for
  datasets whose observations carry randomness beyond their factors (colour and noisy
  dSprites): the step draws uniforms U[0,1) of `observation_noise_shape` in its own random
  stream and calls `render(base, noise)` to turn the delivered base images into
  observations. For every other dataset `render` is the identity and
  `observation_noise_shape` is None.

Metrics use disentanglement_lib's own API, `sample_factors` and
`sample_observations_from_factors`, which draw from a numpy ``RandomState`` exactly as
disentanglement_lib does, so a seeded evaluation sees the same observations.
"""

from __future__ import annotations

import abc

import numpy as np

from fastfvae.data.grid import FactorGrid
from fastfvae.errors import FastFVAEError

IMAGE_SIZE = 64
STORAGES = ("bits", "uint8")


class GroundTruthData(abc.ABC):
    """A dataset of 64x64 observations over a full grid of discrete ground-truth factors.

    Subclasses set the class attributes below (or instance attributes of the same names),
    hold the stored images as ``packed`` and implement `__len__` and `images_at`; the rest
    has defaults that fit a dataset whose observations are its stored images.
    """

    #: The registry name (`fastfvae.data.registry.DATASETS`).
    name: str
    #: Channels of the observations the model sees (1 or 3).
    channels: int
    #: Channels of the images the loaders deliver (the stored images).
    base_channels: int
    #: ``"bits"`` (``packed`` is uint8 [N, 512]) or ``"uint8"`` (uint8 [N, 64, 64, C]).
    storage: str
    #: The latent factors, as disentanglement_lib uses them (a factor of size 1, such as
    #: dSprites' colour, is not one).
    factor_names: tuple[str, ...]
    factor_sizes: tuple[int, ...]
    #: Where the images came from (a file path, "procedural", "memory").
    source: str = "memory"
    #: The stored images the device loader makes resident (see ``storage``).
    packed: np.ndarray

    # --- geometry ------------------------------------------------------------------------
    @property
    def latent_grid(self) -> FactorGrid:
        """The grid over `factor_sizes` whose row-major rows are this dataset's rows."""
        return FactorGrid(tuple(self.factor_sizes))

    @property
    def num_factors(self) -> int:
        return len(self.factor_sizes)

    @property
    def is_full(self) -> bool:
        """True when every factor combination is present, in row-major order."""
        return len(self) == self.latent_grid.num_rows

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of stored images (rows)."""

    # --- stored images -------------------------------------------------------------------
    @abc.abstractmethod
    def images_at(self, rows: np.ndarray) -> np.ndarray:
        """uint8 images of the stored base for the given rows, in the order given.

        ``"bits"`` storage: {0, 1} [n, 64, 64]; ``"uint8"``: 0..255 [n, 64, 64, C].
        """

    def stored_block(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of `packed`, as stored (the device loader uploads a large set
        block by block through this, so a lazily read file never sits whole in host memory)."""
        return np.asarray(self.packed[start:stop])

    def float_batch(self, rows: np.ndarray, device=None):
        """float32 [n, base_channels, 64, 64] in [0, 1]: the stored images of ``rows``, as
        the loaders deliver them ({0., 1.} for bits; images / 255, NCHW, for uint8).

        For datasets with observation noise (colour / noisy dSprites) these are the *base*
        images, not observations: `render` or `observations` makes those.
        """
        import torch

        images = torch.from_numpy(np.ascontiguousarray(self.images_at(rows)))
        if self.storage == "bits":
            return images.to(device=device, dtype=torch.float32).unsqueeze(1)
        images = images.to(device=device).permute(0, 3, 1, 2).to(torch.float32)
        return images.div_(255.0).contiguous()

    # --- factors (disentanglement_lib semantics) -------------------------------------------
    def sample_factors(self, n: int, random_state: np.random.RandomState) -> np.ndarray:
        """[n, num_factors] int64 classes: one ``randint(size_k, size=n)`` per factor, in
        order, as disentanglement_lib draws them."""
        return self.latent_grid.sample_factors(n, random_state)

    def rows_from_factors(self, factors: np.ndarray) -> np.ndarray:
        """Row index of each [n, num_factors] factor combination (full dataset only)."""
        if not self.is_full:
            raise FastFVAEError(
                f"factor lookups need the full {self.name} set ({self.latent_grid.num_rows} rows), "
                f"this one has {len(self)}"
            )
        return self.latent_grid.rows_from_factors(factors)

    # --- observations ----------------------------------------------------------------------
    def observation_noise_shape(self, batch_size: int) -> tuple[int, ...] | None:
        """Shape of the U[0,1) uniforms `render` needs for a batch; None when observations
        are the stored images (no randomness beyond the factors)."""
        return None

    def render(self, base, noise=None):
        """Observations [B, channels, 64, 64] from delivered base images [B, base_channels,
        64, 64] and uniforms U[0,1) of `observation_noise_shape` (None here): the identity.

        Pure torch, no host sync: a compiled or CUDA-graph-captured step may call it.
        """
        return base

    def observations(self, rows: np.ndarray, random_state: np.random.RandomState | None = None,
                     device=None):
        """float32 [n, channels, 64, 64] observations of ``rows`` (for metrics and figures).

        Datasets with observation noise draw it from ``random_state`` exactly as
        disentanglement_lib's ``sample_observations_from_factors`` does; here there is none,
        so this is `float_batch`.
        """
        return self.float_batch(rows, device)

    def sample_observations_from_factors(self, factors: np.ndarray,
                                         random_state: np.random.RandomState) -> np.ndarray:
        """float32 [n, 64, 64, channels] observations (NHWC, as disentanglement_lib returns
        them) of the given latent factors. Every latent factor of a registered dataset is
        drawn by the caller, so ``random_state`` is used only for observation noise."""
        rows = self.rows_from_factors(factors)
        images = self.images_at(rows)
        if self.storage == "bits":
            return images.astype(np.float32)[..., None]
        return images.astype(np.float32) / np.float32(255.0)

    # --- housekeeping ----------------------------------------------------------------------
    @property
    def observation_shape(self) -> tuple[int, int, int]:
        """[64, 64, channels], disentanglement_lib's ``observation_shape``."""
        return (IMAGE_SIZE, IMAGE_SIZE, self.channels)

    def describe(self) -> str:
        """One line: name, rows, channels, source (for log lines)."""
        return f"{self.name}: {len(self)} images, {self.channels} channel(s), from {self.source}"
