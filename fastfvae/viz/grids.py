"""Image-grid helpers: tile images into one array with separators, and make them bytes.

Images are gray ``[..., H, W]`` or colour ``[..., H, W, C]`` (a trailing channel axis, as
PIL and matplotlib take them); every helper keeps whichever it was given.
"""

from __future__ import annotations

import numpy as np


def tile(images: np.ndarray, pad: int = 2, pad_value: float = 0.5) -> np.ndarray:
    """[rows, cols, H, W] (or [rows, cols, H, W, C]) floats in [0, 1] -> one
    [rows*(H+pad)-pad, cols*(W+pad)-pad] (or [..., C]) image, the cells separated by
    ``pad`` pixels of ``pad_value``."""
    if images.ndim not in (4, 5):
        raise ValueError(f"tile takes [rows, cols, H, W] or [rows, cols, H, W, C] images, got shape {images.shape}")
    rows, cols, h, w = images.shape[:4]
    channels = images.shape[4:]
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, *channels), pad_value, dtype=np.float32)
    for r in range(rows):
        for c in range(cols):
            out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = images[r, c]
    return out


def to_uint8(image: np.ndarray, scale: int = 1) -> np.ndarray:
    """Floats in [0, 1], [H, W] or [H, W, C] -> uint8 of the same shape, optionally enlarged
    ``scale`` x by pixel repetition (the channel axis is left alone)."""
    image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return image.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else image
