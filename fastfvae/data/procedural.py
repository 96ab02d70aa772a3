"""Procedural dSprites: all 737,280 images rendered from the factor grid, deterministically.

The real dataset (Matthey et al. 2017) is not reachable from every machine (CI has no
internet), so fastfvae renders a faithful copy, calibrated against 320 real frames
(``shared/dsprites/real_frames.npz``; see ``bench/dsprites_fidelity.py`` for the figure).

Geometry (measured from the real frames, then the constants below fitted by search):

* no anti-aliasing: pixel (row r, column c) is on iff its centre (c + 0.5, r + 0.5) lies
  inside the shape;
* the sprite centre, in pixel-edge coordinates, is ``16 + 32 * pos``; posX moves along
  columns (0 = left), posY along rows (0 = top); rotation is about that centre;
* orientation value ``theta`` (``linspace(0, 2*pi, 40)``) turns the sprite anticlockwise
  on screen; at 0 the ellipse's long axis is horizontal and the heart's tip points down;
* square: side ``2 * SQUARE_HALF * scale``; ellipse: semi-axes ``ELLIPSE_AXES * scale``;
  heart: the parametric curve (16 sin^3 t, 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t),
  ``HEART_PX`` pixels per curve unit at scale 1, rotated about curve point
  ``(0, HEART_CENTRE_Y)``.

Speed: each image only needs the window of pixels its sprite can reach, and that window
can sit at a fixed offset from ``(posY, posX)`` in the image (the centre's sub-pixel part
``32*pos - floor(...)`` stays inside one pixel). So for one (shape, scale) the inside test
runs on a ``[40, 32, 32, W, W]`` tensor and is written through one strided view into the
``[40, 32, 32, 64, 64]`` images, then bit-packed. The heart's inside test is a table
lookup (a scanline-filled mask of the curve at 1/`HEART_LUT_RES` of its width).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from fastfvae.data.dsprites import (
    FACTOR_SIZES, IMAGE_SIZE, NUM_IMAGES, PACKED_ROW_BYTES, DSprites, possible_values,
)

# --- calibrated geometry (pixels at scale 1) ----------------------------------------------
SQUARE_HALF = 9.6
ELLIPSE_AXES = (12.76, 7.22)
HEART_PX = 0.6
HEART_CENTRE_Y = -2.17
HEART_ASPECT = 1.104
HEART_LUT_RES = 2048

_NPOS = FACTOR_SIZES[4]  # 32 positions per axis
#: Each window starts at (posY + off, posX + off) in the image; see module docstring.
_WINDOW_MAX = 32


@functools.lru_cache(maxsize=4)
def _heart_lut(res: int = HEART_LUT_RES) -> tuple[torch.Tensor, float, float, float]:
    """Boolean mask of the heart curve's interior on a ``res``-wide grid of cell centres.

    Returns ``(lut [rows, res], x0, y0, cell)``: cell (i, j) has centre
    ``(x0 + (j + 0.5) * cell, y0 + (i + 0.5) * cell)`` in curve units (y up).
    """
    t = np.linspace(0.0, 2.0 * np.pi, 8193)
    px, py = _heart_curve(t)
    x0, x1, y0, y1 = -16.5, 16.5, -17.5, 12.5
    cell = (x1 - x0) / res
    rows = int(math.ceil((y1 - y0) / cell))
    yc = y0 + (np.arange(rows) + 0.5) * cell
    xc = x0 + (np.arange(res) + 0.5) * cell
    ax, ay, bx, by = px[:-1], py[:-1], px[1:], py[1:]
    lut = np.zeros((rows, res), dtype=bool)
    for i, y in enumerate(yc):  # even-odd scanline fill of the closed polygon
        hit = (ay <= y) != (by <= y)
        xs = np.sort(ax[hit] + (y - ay[hit]) * (bx[hit] - ax[hit]) / (by[hit] - ay[hit]))
        for lo, hi in zip(xs[0::2], xs[1::2]):
            lut[i, (xc >= lo) & (xc <= hi)] = True
    return torch.from_numpy(lut), x0, y0, cell


@functools.lru_cache(maxsize=1)
def _heart_reach() -> float:
    """Farthest curve point from the heart's rotation centre, in curve units."""
    t = np.linspace(0.0, 2.0 * np.pi, 8193)
    px, py = _heart_curve(t)
    return float(np.hypot(px, (py - HEART_CENTRE_Y) * HEART_ASPECT).max())


def _heart_curve(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (16.0 * np.sin(t) ** 3,
            13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))


def _inside(shape: int, u: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Whether sprite-frame points (u right, v up; pixels) are inside shape 0/1/2 at ``scale``."""
    if shape == 0:
        half = SQUARE_HALF * scale
        return (u.abs() <= half) & (v.abs() <= half)
    if shape == 1:
        a, b = ELLIPSE_AXES[0] * scale, ELLIPSE_AXES[1] * scale
        return (u * (1.0 / a)) ** 2 + (v * (1.0 / b)) ** 2 <= 1.0
    lut, x0, y0, cell = _heart_lut()
    kx = 1.0 / (HEART_PX * scale * cell)
    ky = kx / HEART_ASPECT
    ix = torch.floor(u * kx - (x0 / cell)).to(torch.int64)
    iy = torch.floor(v * ky + ((HEART_CENTRE_Y - y0) / cell)).to(torch.int64)
    ok = (ix >= 0) & (ix < lut.shape[1]) & (iy >= 0) & (iy < lut.shape[0])
    flat = (iy.clamp(0, lut.shape[0] - 1) * lut.shape[1] + ix.clamp(0, lut.shape[1] - 1))
    return lut.reshape(-1)[flat] & ok


def _centres(pos_idx: np.ndarray) -> np.ndarray:
    """Sprite centre (pixel-edge coordinates) for position classes 0..31."""
    return 16.0 + 32.0 * possible_values()["posX"][np.asarray(pos_idx)]


def _window(scale: float) -> int:
    """Even window width that holds any sprite of this scale plus one pixel of phase."""
    reach = max(SQUARE_HALF * math.sqrt(2.0), ELLIPSE_AXES[0], HEART_PX * _heart_reach()) * scale
    return min(_WINDOW_MAX, 2 * int(math.ceil(reach)) + 4)


def _axis_offsets(window: int) -> torch.Tensor:
    """[32, W] float32: pixel-centre offset from the sprite centre along one axis, per position."""
    off = (_WINDOW_MAX - window) // 2
    pos = np.arange(_NPOS)
    pix = pos[:, None] + off + np.arange(window)[None, :] + 0.5
    return torch.from_numpy((pix - _centres(pos)[:, None]).astype(np.float32))


def _rotated(dx: torch.Tensor, dy: torch.Tensor, theta: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Sprite-frame (u, v) of screen offsets; theta turns the sprite anticlockwise on screen."""
    cos = torch.from_numpy(np.cos(theta).astype(np.float32))
    sin = torch.from_numpy(np.sin(theta).astype(np.float32))
    return cos * dx - sin * dy, -sin * dx - cos * dy


def render(classes: np.ndarray) -> np.ndarray:
    """Render arbitrary rows: [n, 6] latents_classes -> uint8 {0,1} [n, 64, 64].

    The per-row path (used for checks and small sets); `procedural_dsprites` renders the same
    pixels in bulk.
    """
    classes = np.asarray(classes, dtype=np.int64).reshape(-1, 6)
    values = possible_values()
    out = np.zeros((len(classes), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for shape in range(3):
        for si, scale in enumerate(values["scale"]):
            sel = np.flatnonzero((classes[:, 1] == shape) & (classes[:, 2] == si))
            if sel.size == 0:
                continue
            window = _window(float(scale))
            off = (_WINDOW_MAX - window) // 2
            px, py = classes[sel, 4], classes[sel, 5]
            dx = _axis_offsets(window)[torch.from_numpy(px)][:, None, :]  # [n, 1, W]
            dy = _axis_offsets(window)[torch.from_numpy(py)][:, :, None]  # [n, W, 1]
            theta = values["orientation"][classes[sel, 3]][:, None, None]
            u, v = _rotated(dx, dy, theta)
            mask = _inside(shape, u, v, float(scale)).numpy()
            for n, row in enumerate(sel):
                r0, c0 = py[n] + off, px[n] + off
                out[row, r0:r0 + window, c0:c0 + window] = mask[n]
    return out


def _render_block(shape: int, scale_idx: int) -> np.ndarray:
    """All 40 * 32 * 32 images of one (shape, scale), bit-packed: uint8 [40960, 512]."""
    scale = float(possible_values()["scale"][scale_idx])
    theta = possible_values()["orientation"]
    window = _window(scale)
    off = (_WINDOW_MAX - window) // 2
    axis = _axis_offsets(window)
    dx = axis[None, :, None, None, :]  # posX varies along columns
    dy = axis[None, None, :, :, None]  # posY varies along rows
    images = torch.zeros((40, _NPOS, _NPOS, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.bool)
    # Window of image (o, x, y) starts at row y + off, column x + off: one strided view.
    stride = (_NPOS * _NPOS * IMAGE_SIZE * IMAGE_SIZE, _NPOS * IMAGE_SIZE * IMAGE_SIZE + 1,
              IMAGE_SIZE * IMAGE_SIZE + IMAGE_SIZE, IMAGE_SIZE, 1)
    view = images.as_strided((40, _NPOS, _NPOS, window, window), stride,
                             off * IMAGE_SIZE + off)
    for o in range(0, 40, 8):  # 8 orientations at a time bounds the temporaries
        u, v = _rotated(dx, dy, theta[o:o + 8, None, None, None, None])
        view[o:o + 8] = _inside(shape, u, v, scale)
    return np.packbits(images.numpy().reshape(-1, IMAGE_SIZE * IMAGE_SIZE), axis=1)


def _all_classes() -> np.ndarray:
    from fastfvae.data.dsprites import classes_of

    return classes_of(np.arange(NUM_IMAGES, dtype=np.int64))


def render_packed(num_threads: int | None = None) -> np.ndarray:
    """All 737,280 images in the real row order, bit-packed: uint8 [737280, 512]."""
    packed = np.empty((NUM_IMAGES, PACKED_ROW_BYTES), dtype=np.uint8)
    block = 40 * _NPOS * _NPOS
    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        for shape in range(3):
            for si in range(6):
                start = (shape * 6 + si) * block
                packed[start:start + block] = _render_block(shape, si)
    finally:
        torch.set_num_threads(previous)
    return packed


@functools.lru_cache(maxsize=1)
def _procedural_cached() -> DSprites:
    classes = _all_classes()
    from fastfvae.data.dsprites import values_of

    data = DSprites(render_packed(), classes, values_of(classes), source="procedural")
    data.packed.setflags(write=False)
    return data


def procedural_dsprites() -> DSprites:
    """The full procedural dSprites (737,280 rows, real order), rendered once per process."""
    return _procedural_cached()
