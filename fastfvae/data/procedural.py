"""Procedural dSprites: all 737,280 images rendered from the factor grid, deterministically.

The real dataset (Matthey et al. 2017) is not reachable from every machine (CI has no
internet), so fastfvae renders a faithful copy, calibrated against 320 real frames
(frames of the dataset's preview animation; docs/data.md and ``bench/dsprites_fidelity.py`` give
the figure).

Geometry (measured from the real frames, then the constants below fitted by search):

* no anti-aliasing: pixel (row r, column c) is on iff its centre (c + 0.5, r + 0.5) lies
  inside the shape;
* the sprite centre, in pixel-edge coordinates, is ``16 + 32 * pos``; posX moves along
  columns (0 = left), posY along rows (0 = top); rotation is about that centre;
* orientation value ``theta`` (``linspace(0, 2*pi, 40)``) turns the sprite anticlockwise
  on screen; at 0 the ellipse's long axis is horizontal and the heart's tip points down;
* square: side ``2 * SQUARE_HALF * scale``; ellipse: semi-axes ``ELLIPSE_AXES * scale``;
  heart: the parametric curve (16 sin^3 t, 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t),
  ``HEART_PX`` pixels per curve unit across and ``HEART_ASPECT`` times that vertically
  at scale 1 (a ~19.2 px box), rotated about curve point ``(0, HEART_CENTRE_Y)``.

The fitted constants give a mean best-match IoU of 0.9993 (min 0.989) over the 320 frames.

Speed: a horizontal line meets a (rotated) outline in at most a few intervals, and an
image row is one 64-bit word. So for each (shape, scale, orientation) the renderer finds
where each of the 32 x 64 possible sample lines (one per posY class and image row) lies
inside the polygon outline (``_line_intervals``: crossings of each edge with the lines it
spans, sorted per line, paired by the even-odd rule), then turns each interval into the bit
mask of the pixel centres it covers, for all 32 posX classes at once (``_row_masks``). No
per-pixel work is done; the words, stored big-endian, are the `pack_images` layout.
Curved outlines are polygons of `_VERTICES` points (chord error below 1e-4 px).
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fastfvae.data.dsprites import (
    FACTOR_SIZES, IMAGE_SIZE, NUM_IMAGES, PACKED_ROW_BYTES, DSprites, classes_of, possible_values,
    unpack_images, values_of,
)

# --- calibrated geometry (pixels at scale 1) ----------------------------------------------
SQUARE_HALF = 9.6
ELLIPSE_AXES = (12.76, 7.22)
HEART_PX = 0.5995
HEART_CENTRE_Y = -2.17
HEART_ASPECT = 1.105

_NPOS = FACTOR_SIZES[4]  # 32 positions per axis
_VERTICES = 4096  # outline points of the curved shapes (chord error < 1e-4 px)
_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


def _heart_curve(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The classic parametric heart, in curve units (y up): x in [-16, 16], y in [-17, 11.9]."""
    return (16.0 * np.sin(t) ** 3,
            13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))


@functools.lru_cache(maxsize=None)
def _outline(shape: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Closed outline of shape 0/1/2 at ``scale``: (u right, v up) in pixels about the rotation centre."""
    if shape == 0:
        h = SQUARE_HALF * scale
        return np.array([h, -h, -h, h]), np.array([h, h, -h, -h])
    t = np.linspace(0.0, 2.0 * np.pi, _VERTICES, endpoint=False)
    if shape == 1:
        return ELLIPSE_AXES[0] * scale * np.cos(t), ELLIPSE_AXES[1] * scale * np.sin(t)
    hx, hy = _heart_curve(t)
    k = HEART_PX * scale
    return k * hx, k * HEART_ASPECT * (hy - HEART_CENTRE_Y)


def _line_intervals(x: np.ndarray, y: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where horizontal lines ``y = ys`` [L] lie inside a closed polygon (even-odd rule).

    Returns ``(lo, hi)`` [L, K]: line l is inside on ``[lo[l, k], hi[l, k]]``; unused slots
    are empty (lo = +inf, hi = -inf). An edge counts for a line when ``min(y) <= line < max(y)``.
    """
    order = np.argsort(ys, kind="stable")
    sorted_ys = ys[order]
    x0, y0, x1, y1 = x, y, np.roll(x, -1), np.roll(y, -1)
    first = np.searchsorted(sorted_ys, np.minimum(y0, y1), side="left")
    last = np.searchsorted(sorted_ys, np.maximum(y0, y1), side="left")
    counts = last - first
    total = int(counts.sum())
    lines = ys.shape[0]
    if total == 0:
        return np.full((lines, 1), np.inf), np.full((lines, 1), -np.inf)
    edge = np.repeat(np.arange(x.shape[0]), counts)
    offset = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    pos = first[edge] + offset  # index into sorted_ys
    line_y = sorted_ys[pos]
    cross = x0[edge] + (line_y - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    by_line = np.lexsort((cross, pos))
    pos, cross = pos[by_line], cross[by_line]
    starts = np.searchsorted(pos, np.arange(lines), side="left")
    rank = np.arange(total) - starts[pos]
    slots = int(rank.max()) // 2 + 1
    lo = np.full((lines, slots), np.inf)
    hi = np.full((lines, slots), -np.inf)
    line = order[pos]
    lo[line[rank % 2 == 0], rank[rank % 2 == 0] // 2] = cross[rank % 2 == 0]
    hi[line[rank % 2 == 1], rank[rank % 2 == 1] // 2] = cross[rank % 2 == 1]
    return lo, hi


#: ``_COLS_FROM[n]``: a row word with columns >= n set (column 0 is the most significant bit).
_COLS_FROM = np.array([_ONES >> np.uint64(n) for n in range(64)] + [np.uint64(0)], dtype=np.uint64)


def _row_masks(lo: np.ndarray, hi: np.ndarray, cx: np.ndarray) -> np.ndarray:
    """uint64 words of image rows whose inside-intervals (offsets from the sprite centre)
    are ``lo, hi`` [L, K], for sprite centre columns ``cx`` [P]: returns [P, L].

    Pixel column c is on iff ``lo <= c + 0.5 - cx <= hi``.
    """
    shift = cx[:, None, None] - 0.5
    first = np.clip(np.ceil(lo[None] + shift), 0, 64).astype(np.intp)
    stop = np.clip(np.floor(hi[None] + shift) + 1.0, 0, 64).astype(np.intp)
    masks = _COLS_FROM[first] & ~_COLS_FROM[stop]
    return np.bitwise_or.reduce(masks, axis=-1) if masks.shape[-1] > 1 else masks[..., 0]


def _centres(pos_idx: np.ndarray) -> np.ndarray:
    """Sprite centre (pixel-edge coordinates) for position classes 0..31."""
    return 16.0 + 32.0 * possible_values()["posX"][np.asarray(pos_idx)]


def _sprite_block(shape: int, scale: float, theta: float) -> np.ndarray:
    """uint64 [posX 32, posY 32, row 64] words of one (shape, scale, orientation) sprite."""
    u, v = _outline(shape, scale)
    cos, sin = math.cos(theta), math.sin(theta)
    x = cos * u - sin * v  # screen offsets: x right, y down; the sprite turns anticlockwise
    y = -(sin * u + cos * v)
    centres = _centres(np.arange(_NPOS))
    ys = ((np.arange(IMAGE_SIZE)[None, :] + 0.5) - centres[:, None]).reshape(-1)  # [posY * row]
    lo, hi = _line_intervals(x, y, ys)
    hit = np.flatnonzero(np.isfinite(lo[:, 0]))  # lines that cross the sprite at all
    words = np.zeros((_NPOS, _NPOS * IMAGE_SIZE), dtype=np.uint64)
    words[:, hit] = _row_masks(lo[hit], hi[hit], centres)
    return words.reshape(_NPOS, _NPOS, IMAGE_SIZE)


def _sprite_key_block(key: int) -> np.ndarray:
    """`_sprite_block` of sprite ``key = shape * 240 + scale * 40 + orientation`` (class indices)."""
    values = possible_values()
    return _sprite_block(key // 240, float(values["scale"][key // 40 % 6]),
                         float(values["orientation"][key % 40]))


def _to_packed(rows: np.ndarray) -> np.ndarray:
    """uint64 [n, 64] row masks -> np.packbits layout uint8 [n, 512]."""
    return rows.astype(">u8").view(np.uint8).reshape(rows.shape[0], PACKED_ROW_BYTES)


def render_packed_rows(classes: np.ndarray) -> np.ndarray:
    """Bit-packed images (uint8 [n, 512], `pack_images` layout) of [n, 6] latents_classes rows."""
    classes = np.asarray(classes, dtype=np.int64).reshape(-1, 6)
    out = np.zeros((len(classes), IMAGE_SIZE), dtype=np.uint64)
    sprite = classes[:, 1] * 240 + classes[:, 2] * 40 + classes[:, 3]
    for key in np.unique(sprite):
        sel = np.flatnonzero(sprite == key)
        out[sel] = _sprite_key_block(int(key))[classes[sel, 4], classes[sel, 5]]
    return _to_packed(out)


def render(classes: np.ndarray) -> np.ndarray:
    """Images (uint8 {0,1} [n, 64, 64]) of [n, 6] latents_classes rows."""
    return unpack_images(render_packed_rows(classes))


def _render_sprites(sprites: range, out: np.ndarray) -> None:
    """Render sprites (see `_sprite_key_block`) into their rows of packed ``out``."""
    words = out.view(">u8").reshape(-1, _NPOS, _NPOS, IMAGE_SIZE)
    for key in sprites:
        words[key] = _sprite_key_block(key)


def render_packed(workers: int | None = None) -> np.ndarray:
    """All 737,280 images in the real row order, bit-packed: uint8 [737280, 512].

    ``workers`` threads (default: the usable CPUs, at most 8) render interleaved sprites;
    numpy releases the GIL in the bulk of the work.
    """
    packed = np.empty((NUM_IMAGES, PACKED_ROW_BYTES), dtype=np.uint8)
    sprites = 3 * 6 * 40
    if workers is None:
        workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if workers <= 1:
        _render_sprites(range(sprites), packed)
        return packed
    with ThreadPoolExecutor(workers) as pool:
        for job in [pool.submit(_render_sprites, range(w, sprites, workers), packed) for w in range(workers)]:
            job.result()
    return packed


@functools.lru_cache(maxsize=1)
def _procedural_cached() -> DSprites:
    classes = classes_of(np.arange(NUM_IMAGES, dtype=np.int64))
    data = DSprites(render_packed(), classes, values_of(classes), source="procedural")
    data.packed.setflags(write=False)
    return data


def procedural_dsprites() -> DSprites:
    """The full procedural dSprites (737,280 rows, real order), rendered once per process.

    Rendering takes about 1.2 s on one core. It is not cached on disk: reading a compressed
    copy back took 0.6 s, and writing it 5 s, which too few runs would earn back (measured
    on the 2-core development machine). Treat the result as read-only.
    """
    return _procedural_cached()
