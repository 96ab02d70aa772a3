"""Image-grid helpers: tile [rows, cols, H, W] images into one array with separators."""

from __future__ import annotations

import numpy as np


def tile(images: np.ndarray, pad: int = 2, pad_value: float = 0.5) -> np.ndarray:
    """[rows, cols, H, W] floats in [0, 1] -> one [rows*(H+pad)-pad, cols*(W+pad)-pad] image."""
    rows, cols, h, w = images.shape
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad), pad_value, dtype=np.float32)
    for r in range(rows):
        for c in range(cols):
            out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = images[r, c]
    return out


def to_uint8(image: np.ndarray, scale: int = 1) -> np.ndarray:
    """Floats in [0, 1] -> uint8, optionally enlarged ``scale`` x by pixel repetition."""
    image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return image.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else image
