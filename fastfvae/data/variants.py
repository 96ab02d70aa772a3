"""Colour and noisy dSprites: dSprites whose observations carry randomness beyond their factors.

Both as disentanglement_lib defines them (``disentanglement_lib/data/ground_truth/dsprites.py``,
``ColorDSprites`` and ``NoisyDSprites``, used in Locatello et al. 2019 as ``color_dsprites``
and ``noisy_dsprites`` with the 5 latent factors of ``dsprites_full``):

* **colour**: the binary sprite times one colour per observation, each RGB channel drawn
  from U[0.5, 1): ``obs = image * uniform(0.5, 1, [n, 1, 1, 3])`` (the background stays black);
* **noisy**: the sprite (white) over a background of uniform noise drawn per pixel and
  channel: ``obs = min(image + uniform(0, 1, [n, 64, 64, 3]), 1)``.

A variant wraps a `DSprites` and shares everything stored with it — the factors, the rows,
the bit-packed images (``storage`` "bits", ``base_channels`` 1) and so every loader — and
adds only how a base image becomes an observation (``channels`` 3):

* the training step draws uniforms U[0,1) of `observation_noise_shape` ([B, 3] for colour,
  [B, 3, 64, 64] for noise) in its own random stream and calls `render(base, noise)`, pure
  torch, which maps them to disentanglement_lib's distributions (``0.5 + 0.5 u`` for colour,
  ``u`` for noise, as numpy's ``uniform(low, high)`` computes ``low + (high - low) u``);
* metrics call `sample_observations_from_factors(factors, random_state)`, which draws from
  the numpy ``RandomState`` exactly as disentanglement_lib does (the same calls in the same
  order), so the same ``random_state`` gives disentanglement_lib's arrays (which are float64
  there; float32 here);
* `float_batch(rows)` and `images_at(rows)` are the *base* images, 1 channel, exactly as
  the loaders deliver them; `observations(rows, random_state)` renders them with noise
  drawn as disentanglement_lib draws it (for figures and metrics).
"""

from __future__ import annotations

import numpy as np

from fastfvae.data.base import IMAGE_SIZE, GroundTruthData
from fastfvae.data.dsprites import DSprites
from fastfvae.data.grid import FactorGrid
from fastfvae.errors import FastFVAEError

RGB = 3
#: Colour dSprites: each channel's colour is drawn from U[COLOR_LOW, 1).
COLOR_LOW = 0.5


class DSpritesVariant(GroundTruthData):
    """A dSprites with observation noise; see the module docstring. Subclasses give the
    noise's shape, its numpy draw (disentanglement_lib's) and its torch rendering."""

    channels = RGB
    base_channels = 1
    storage = "bits"

    def __init__(self, base: DSprites):
        if not isinstance(base, DSprites):
            raise FastFVAEError(f"{type(self).__name__} wraps a DSprites, got {type(base).__name__}")
        self.base = base

    # --- everything stored is the base's ---------------------------------------------------
    @property
    def packed(self) -> np.ndarray:
        return self.base.packed

    @property
    def source(self) -> str:
        return self.base.source

    @property
    def factor_names(self) -> tuple[str, ...]:
        return self.base.factor_names

    @property
    def factor_sizes(self) -> tuple[int, ...]:
        return self.base.factor_sizes

    @property
    def latent_grid(self) -> FactorGrid:
        return self.base.latent_grid

    @property
    def latents_classes(self) -> np.ndarray:
        return self.base.latents_classes

    @property
    def latents_values(self) -> np.ndarray:
        return self.base.latents_values

    @property
    def is_full(self) -> bool:
        return self.base.is_full

    @property
    def nbytes(self) -> int:
        return self.base.nbytes

    def __len__(self) -> int:
        return len(self.base)

    def images_at(self, rows: np.ndarray) -> np.ndarray:
        """uint8 {0, 1} [n, 64, 64]: the stored binary sprites (not observations)."""
        return self.base.images_at(rows)

    def float_batch(self, rows: np.ndarray, device=None):
        """float32 [n, 1, 64, 64] in {0., 1.}: the *base* images, as the loaders deliver
        them; `render` or `observations` turns them into 3-channel observations."""
        return self.base.float_batch(rows, device)

    def stored_block(self, start: int, stop: int) -> np.ndarray:
        return self.base.stored_block(start, stop)

    def rows_from_factors(self, factors: np.ndarray) -> np.ndarray:
        return self.base.rows_from_factors(factors)

    # --- observations ----------------------------------------------------------------------
    def _draw_numpy(self, n: int, random_state: np.random.RandomState) -> np.ndarray:
        """disentanglement_lib's draw of the noise for ``n`` observations (NHWC-broadcastable)."""
        raise NotImplementedError

    def _observe_numpy(self, images: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """disentanglement_lib's float64 observations from float [n, 64, 64, 3] images."""
        raise NotImplementedError

    def _observations_numpy(self, rows: np.ndarray, random_state: np.random.RandomState) -> np.ndarray:
        """float32 [n, 64, 64, 3]: disentanglement_lib's ``sample_observations_from_factors``
        for the factors of ``rows`` (its no-colour observations draw nothing: the only
        non-latent factor, colour, has one value and ``randint(1)`` consumes no randomness)."""
        if random_state is None:
            raise FastFVAEError(f"{self.name} observations are random: pass a numpy RandomState")
        images = self.base.images_at(rows).astype(np.float32)[..., None]
        images = np.repeat(images, RGB, axis=3)
        noise = self._draw_numpy(images.shape[0], random_state)
        return self._observe_numpy(images, noise).astype(np.float32)

    def sample_observations_from_factors(self, factors: np.ndarray,
                                         random_state: np.random.RandomState) -> np.ndarray:
        """float32 [n, 64, 64, 3], drawn from ``random_state`` as disentanglement_lib does."""
        return self._observations_numpy(self.rows_from_factors(factors), random_state)

    def observations(self, rows: np.ndarray, random_state: np.random.RandomState | None = None,
                     device=None):
        """float32 [n, 3, 64, 64] observations of ``rows``, their noise drawn from
        ``random_state`` as `sample_observations_from_factors` draws it (required)."""
        import torch

        observed = self._observations_numpy(np.asarray(rows, dtype=np.int64), random_state)
        return torch.from_numpy(observed).permute(0, 3, 1, 2).contiguous().to(device)

    def _check_render(self, base, noise) -> None:
        """Shapes only (static metadata: no host sync inside a compiled step)."""
        expected = self.observation_noise_shape(base.shape[0])
        if base.dim() != 4 or tuple(base.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise FastFVAEError(f"{self.name} renders base images [B, 1, 64, 64], got {list(base.shape)}")
        if noise is None or tuple(noise.shape) != expected:
            got = None if noise is None else list(noise.shape)
            raise FastFVAEError(f"{self.name} needs uniforms of shape {list(expected)}, got {got}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base.source!r}, rows={len(self)})"


class ColorDSprites(DSpritesVariant):
    """``color_dsprites``: the sprite in a random colour, U[0.5, 1) per RGB channel."""

    name = "color_dsprites"

    def observation_noise_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, RGB)

    def render(self, base, noise):
        """[B, 3, 64, 64] = base [B, 1, 64, 64] * (0.5 + 0.5 noise)[B, 3], in base's dtype."""
        self._check_render(base, noise)
        color = COLOR_LOW + (1.0 - COLOR_LOW) * noise
        return (base * color[:, :, None, None]).to(base.dtype)

    def _draw_numpy(self, n: int, random_state: np.random.RandomState) -> np.ndarray:
        return random_state.uniform(COLOR_LOW, 1, [n, 1, 1, RGB])

    def _observe_numpy(self, images: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return images * noise


class NoisyDSprites(DSpritesVariant):
    """``noisy_dsprites``: the white sprite over uniform noise, per pixel and channel."""

    name = "noisy_dsprites"

    def observation_noise_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, RGB, IMAGE_SIZE, IMAGE_SIZE)

    def render(self, base, noise):
        """[B, 3, 64, 64] = min(base [B, 1, 64, 64] + noise [B, 3, 64, 64], 1), in base's dtype."""
        self._check_render(base, noise)
        return (base + noise).clamp(max=1.0).to(base.dtype)

    def _draw_numpy(self, n: int, random_state: np.random.RandomState) -> np.ndarray:
        return random_state.uniform(0, 1, [n, IMAGE_SIZE, IMAGE_SIZE, RGB])

    def _observe_numpy(self, images: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return np.minimum(images + noise, 1.0)
