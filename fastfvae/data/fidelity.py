"""How faithful a dSprites set is to real frames: the best-match IoU of each frame.

Real frames (an NPZ of 320 frames from the dataset's preview animation; docs/data.md)
come without their latents, so each frame is matched by search: its best IoU over the
generated images whose mass and centroid could match it. Candidates: every (shape, scale,
orientation) sprite whose mass is within ``MASS_TOLERANCE`` of the frame's, at the
positions within one class of where the frame's centroid puts that sprite's centre.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from fastfvae.data.dsprites import FACTOR_SIZES, IMAGE_SIZE, index_of

MASS_TOLERANCE = 0.25  # relative; plus 8 pixels (mass moves with the sub-pixel phase)
_NPOS = FACTOR_SIZES[4]


@dataclass
class FidelityReport:
    """Best-match IoU per frame and the matching row (latents_classes) of each frame."""

    iou: np.ndarray  # float64 [F]
    best_classes: np.ndarray  # int64 [F, 6]

    @property
    def mean(self) -> float:
        return float(self.iou.mean())

    @property
    def min(self) -> float:
        return float(self.iou.min())

    def worst(self, k: int = 5) -> np.ndarray:
        """Indices of the k frames with the lowest IoU, worst first."""
        return np.argsort(self.iou, kind="stable")[:k]


def _mass_centroid(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mass [n] and centroid (x, y) [n] in pixel-edge coordinates of uint8 [n, 64, 64] images."""
    images = images.astype(np.float64)
    mass = images.sum(axis=(1, 2))
    centres = np.arange(IMAGE_SIZE) + 0.5
    safe = np.maximum(mass, 1.0)
    cx = (images.sum(axis=1) * centres).sum(axis=1) / safe
    cy = (images.sum(axis=2) * centres).sum(axis=1) / safe
    return mass, cx, cy


def _sprite_table(render_fn: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, ...]:
    """Every (shape, scale, orientation) sprite at position (15, 15): classes, mass, centroid offset."""
    shape, scale, orient = np.meshgrid(np.arange(3), np.arange(6), np.arange(40), indexing="ij")
    n = shape.size
    classes = np.zeros((n, 6), dtype=np.int64)
    classes[:, 1], classes[:, 2], classes[:, 3] = shape.ravel(), scale.ravel(), orient.ravel()
    classes[:, 4] = classes[:, 5] = 15
    mass, cx, cy = _mass_centroid(render_fn(classes))
    centre = 16.0 + 32.0 * 15 / (_NPOS - 1)
    return classes, mass, cx - centre, cy - centre


def best_match_iou(frames: np.ndarray, render_fn: Callable[[np.ndarray], np.ndarray]) -> FidelityReport:
    """Best IoU of each uint8 {0,1} [F, 64, 64] frame against the images ``render_fn`` gives.

    ``render_fn`` maps [n, 6] latents_classes to uint8 [n, 64, 64] images (for a full set:
    ``lambda c: data.images_at(index_of(c))``).
    """
    frames = np.asarray(frames).astype(bool)
    sprites, s_mass, s_dx, s_dy = _sprite_table(render_fn)
    f_mass, f_cx, f_cy = _mass_centroid(frames)
    ious = np.zeros(len(frames))
    best = np.zeros((len(frames), 6), dtype=np.int64)
    steps = np.array([-1, 0, 1])
    gx, gy = np.meshgrid(steps, steps, indexing="ij")
    for i, frame in enumerate(frames):
        ok = np.abs(s_mass - f_mass[i]) <= MASS_TOLERANCE * f_mass[i] + 8.0
        cand = sprites[ok]
        ex = np.rint((f_cx[i] - s_dx[ok] - 16.0) * (_NPOS - 1) / 32.0).astype(np.int64)
        ey = np.rint((f_cy[i] - s_dy[ok] - 16.0) * (_NPOS - 1) / 32.0).astype(np.int64)
        classes = np.repeat(cand, gx.size, axis=0)
        classes[:, 4] = np.clip(np.repeat(ex, gx.size) + np.tile(gx.ravel(), len(cand)), 0, _NPOS - 1)
        classes[:, 5] = np.clip(np.repeat(ey, gy.size) + np.tile(gy.ravel(), len(cand)), 0, _NPOS - 1)
        classes = np.unique(classes, axis=0)
        if len(classes) == 0:
            continue
        images = render_fn(classes).astype(bool)
        inter = (images & frame).sum(axis=(1, 2))
        union = (images | frame).sum(axis=(1, 2))
        iou = inter / np.maximum(union, 1)
        j = int(np.argmax(iou))
        ious[i], best[i] = iou[j], classes[j]
    return FidelityReport(ious, best)


def dataset_render_fn(data) -> Callable[[np.ndarray], np.ndarray]:
    """``render_fn`` reading the images of a full `DSprites`."""
    return lambda classes: data.images_at(index_of(classes))
