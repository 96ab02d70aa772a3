"""The figures a run is judged by: reconstructions, latent traversals (PNG + GIF), loss curves.

`write_run_figures(vae, data, out)` writes, into ``out``:

- ``reconstructions.png``: pairs of rows, originals above their reconstructions sigmoid(dec(mu(x))).
- ``traversals.png``: one panel per fixed image; in each, one row per latent dim, ordered by
  decreasing mean KL (the informative dims first; the KL of each is in the row label), each dim
  swept over [-3, 3] with the other dims at the image's posterior mean.
- ``traversals.gif``: the same sweeps animated (-3 -> 3 -> -3): rows = fixed images,
  columns = dims in KL order.
- ``loss_curves.png``: the JSONL log's curves (loss, recon, KL, TC, D accuracy) against steps.

Any registered dataset (`fastfvae.data.base.GroundTruthData`): a 1-channel one gives gray
figures, a 3-channel one RGB figures. The images shown are the observations the model sees
(`shown_images`): for colour / noisy dSprites, ``data.observations(rows,
np.random.RandomState(0))`` (disentanglement_lib's draw of their noise), not the base sprites.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from fastfvae.data.dsprites import FACTOR_SIZES, LATENT_FACTOR_INDICES  # noqa: E402
from fastfvae.metrics.encode import check_channels, has_observation_noise  # noqa: E402
from fastfvae.viz.decode import as_pictures, kl_per_dim, reconstructions, traversals  # noqa: E402
from fastfvae.viz.grids import tile, to_uint8  # noqa: E402

SWEEP = np.linspace(-3.0, 3.0, 10)
GIF_SWEEP = np.linspace(-3.0, 3.0, 16)


#: Seed of the observation noise of the images shown (colour / noisy dSprites).
NOISE_SEED = 0
#: dSprites' 5 latent factors (shape, scale, orientation, posX, posY): the grid whose
#: images `fixed_rows` picks by factor.
DSPRITES_FACTOR_SIZES = tuple(FACTOR_SIZES[k] for k in LATENT_FACTOR_INDICES)


def fixed_rows(data, count: int) -> np.ndarray:
    """Rows of the images to show.

    On the full dSprites (and its colour / noisy variants: the full grid of dSprites' 5
    latent factors), one centred image per shape (large, unrotated), then random ones;
    otherwise ``count`` distinct rows drawn with a fixed seed (on a full grid, rows are
    factor combinations: uniform rows are uniformly drawn factors).
    """
    n = len(data)
    rng = np.random.default_rng(0)
    if getattr(data, "is_full", False) and tuple(data.latent_grid.sizes) == DSPRITES_FACTOR_SIZES:
        # (shape, scale, orientation, posX, posY) over the 5 varying factors
        shapes = np.array([[s, 5, 0, 16, 16] for s in range(3)])
        picked = list(data.rows_from_factors(shapes))
        rest = [int(r) for r in rng.choice(n, count, replace=False) if r not in picked]
        return np.array((picked + rest)[:count], dtype=np.int64)
    return np.sort(rng.choice(n, min(count, n), replace=False)).astype(np.int64)


def shown_images(data, rows: np.ndarray):
    """float32 [n, channels, 64, 64]: the observations of ``rows`` the model sees; for a
    dataset with observation noise, drawn with ``np.random.RandomState(NOISE_SEED)``."""
    if has_observation_noise(data):
        return data.observations(rows, np.random.RandomState(NOISE_SEED))
    return data.float_batch(rows)


def save_reconstruction_grid(vae, images, path: Path, cols: int = 8) -> Path:
    """Originals over reconstructions, ``cols`` per row (images [n, C, 64, 64], C = 1: gray,
    3: RGB; the images past the last multiple of ``cols`` are left out)."""
    cols = min(cols, len(images))
    images = images[:len(images) // cols * cols]
    originals = as_pictures(images)
    recons = reconstructions(vae, images)
    rows = []
    for start in range(0, len(originals), cols):
        rows += [originals[start:start + cols], recons[start:start + cols]]
    grid = tile(np.stack(rows), pad=2)
    Image.fromarray(to_uint8(grid, scale=2)).save(path)
    return path


def save_traversal_png(sweeps: np.ndarray, dims: np.ndarray, kls: np.ndarray, path: Path) -> Path:
    """sweeps [n_images, n_dims, n_values, H, W] (gray) or [..., H, W, 3] (RGB) -> one
    labelled panel per image."""
    n_img, n_dims, n_val, h, w = sweeps.shape[:5]
    panels = [tile(sweeps[i], pad=2) for i in range(n_img)]
    ph, pw = panels[0].shape[:2]
    dpi = 100
    fig_w = (n_img * pw + (n_img - 1) * 20 + 90) / dpi
    fig_h = (ph + 60) / dpi
    fig, axes = plt.subplots(1, n_img, figsize=(fig_w, fig_h), dpi=dpi, squeeze=False)
    for i, ax in enumerate(axes[0]):
        if panels[i].ndim == 2:
            ax.imshow(panels[i], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(np.clip(panels[i], 0.0, 1.0), interpolation="nearest")
        ax.set_xticks([(w + 2) * j + w / 2 for j in (0, n_val - 1)], [f"{SWEEP[0]:+.0f}", f"{SWEEP[-1]:+.0f}"],
                      fontsize=7)
        ax.set_yticks([(h + 2) * r + h / 2 for r in range(n_dims)])
        ax.set_yticklabels([f"z{d} KL {k:.2f}" for d, k in zip(dims, kls[dims])] if i == 0 else [], fontsize=7)
        ax.set_title(f"image {i + 1}", fontsize=8)
    fig.suptitle("latent traversals (rows: dims by decreasing KL; columns: value -3 .. +3)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_traversal_gif(sweeps: np.ndarray, path: Path, ms_per_frame: int = 120) -> Path:
    """sweeps [n_images, n_dims, n_frames, H, W] (or [..., H, W, 3]) -> GIF; frame t shows
    every (image, dim) at value t (RGB frames get an adaptive palette each, as PIL saves them)."""
    n_frames = sweeps.shape[2]
    order = list(range(n_frames)) + list(range(n_frames - 2, 0, -1))  # ping-pong
    frames = [Image.fromarray(to_uint8(tile(sweeps[:, :, t], pad=2), scale=2)) for t in order]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
    return path


def save_loss_curves(records: list[dict], path: Path) -> Path:
    """Plot each logged metric against step (metrics absent from the log are skipped)."""
    panels = [("loss", "VAE loss"), ("recon", "reconstruction (nats/image)"), ("kl", "KL (nats)"),
              ("tc", "TC estimate"), ("d_acc", "discriminator accuracy")]
    panels = [(k, t) for k, t in panels if any(r.get(k) is not None for r in records)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.2 * max(len(panels), 1), 2.8), dpi=100,
                             squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        if key in ("loss", "recon") and all(p[1] > 0 for p in pts):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no logged steps", ha="center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_run_figures(vae, data, out, records: list[dict] | None = None, num_images: int = 3,
                      num_recons: int = 16, kl_rows: int = 1024) -> dict[str, Path]:
    """Write the four figures into ``out``; returns {name: path}. ``records``: the JSONL log."""
    out = Path(out)
    check_channels(vae, data)
    was_training = vae.training
    vae.eval()
    try:
        rng = np.random.default_rng(1)
        kl_images = shown_images(data, np.sort(rng.choice(len(data), min(kl_rows, len(data)), replace=False)))
        kls = kl_per_dim(vae, kl_images)
        dims = np.argsort(-kls, kind="stable")
        shown = shown_images(data, fixed_rows(data, num_images))
        recon_rows = np.sort(rng.choice(len(data), min(num_recons, len(data)), replace=False))
        paths = {
            "reconstructions": save_reconstruction_grid(vae, shown_images(data, recon_rows),
                                                        out / "reconstructions.png"),
            "traversals": save_traversal_png(traversals(vae, shown, dims, SWEEP), dims, kls, out / "traversals.png"),
            "traversals_gif": save_traversal_gif(traversals(vae, shown, dims, GIF_SWEEP), out / "traversals.gif"),
        }
        if records is not None:
            paths["loss_curves"] = save_loss_curves(records, out / "loss_curves.png")
        return paths
    finally:
        vae.train(was_training)
