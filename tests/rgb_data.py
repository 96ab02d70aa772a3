"""Test data and probe models for the colour (3-channel) figure and metric tests.

`TinyRGB`: a full 4 x 4 x 2 factor grid of random 64x64 RGB images stored as uint8 (the
``"uint8"`` storage of 3dshapes), whose factors set the brightness of three regions: red in
the left half, green in the right half, blue in the top half; `RegionMeans` encodes exactly
those three means, so it disentangles the set perfectly.
"""

from __future__ import annotations

import numpy as np
import torch

from fastfvae.data.base import GroundTruthData
from fastfvae.data.grid import FactorGrid


class TinyRGB(GroundTruthData):
    name = "tiny_rgb"
    channels = 3
    base_channels = 3
    storage = "uint8"
    factor_names = ("red", "green", "blue")
    factor_sizes = (4, 4, 2)
    source = "test"

    def __init__(self, seed: int = 0):
        factors = FactorGrid(self.factor_sizes).all_factors()
        images = np.random.RandomState(seed).randint(0, 40, size=(len(factors), 64, 64, 3))
        images[:, :, :32, 0] += 40 + 55 * factors[:, 0, None, None]
        images[:, :, 32:, 1] += 40 + 55 * factors[:, 1, None, None]
        images[:, :32, :, 2] += 40 + 150 * factors[:, 2, None, None]
        self.packed = images.astype(np.uint8)

    def __len__(self) -> int:
        return self.packed.shape[0]

    def images_at(self, rows: np.ndarray) -> np.ndarray:
        return self.packed[np.asarray(rows, dtype=np.int64)]


class RegionMeans(torch.nn.Module):
    """encode: (red of the left half, green of the right half, blue of the top half) means of
    images [B, 3, 64, 64]; decode: logits painting each code into its own channel."""

    channels = 3

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        mu = torch.stack([x[:, 0, :, :32].mean((1, 2)), x[:, 1, :, 32:].mean((1, 2)),
                          x[:, 2, :32, :].mean((1, 2))], 1)
        return mu, torch.zeros_like(mu)

    def decode(self, z):
        return z[:, :, None, None].expand(-1, -1, 64, 64) * 4 - 2


class ChannelMeans(torch.nn.Module):
    """encode: the mean of each of the 3 channels (for colour / noisy dSprites observations)."""

    channels = 3

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        mu = x.mean((2, 3))
        return mu, torch.zeros_like(mu)

    def decode(self, z):
        return z[:, :, None, None].expand(-1, -1, 64, 64)
