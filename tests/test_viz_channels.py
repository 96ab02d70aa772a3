"""Figures of any registered dataset: gray for 1 channel (unchanged), RGB for 3.

* The gray figures of a fixed model are pixel for pixel those of the code before colour
  datasets (`GRAY_PIXELS`: SHA-256 of the decoded pixels, recorded with that code);
* 3-channel images travel channels-last through `tile` / `to_uint8`, `reconstructions`,
  `traversals` and every figure file (RGB);
* datasets with observation noise show their observations (colour / noisy dSprites drawn
  with ``RandomState(0)``), and `fixed_rows` picks dSprites' centred shapes only on
  dSprites' own factor grid;
* ``fastfvae traverse`` draws a run's figures from the dataset its config names.
"""

import hashlib

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from fastfvae.data.grid import FactorGrid
from fastfvae.errors import FastFVAEError
from fastfvae.viz.dataset_grid import dataset_panels, save_dataset_grid
from fastfvae.viz.decode import reconstructions, traversals
from fastfvae.viz.figures import GIF_SWEEP, NOISE_SEED, fixed_rows, write_run_figures
from fastfvae.viz.grids import tile, to_uint8
from metrics_helpers import tiny_dsprites
from rgb_data import TinyRGB


class PixelVAE(torch.nn.Module):
    """A fixed model with exactly computed outputs on binary images: the code of dim j is
    the share of white pixels in the stripe of columns 16j..16j+15 (integer sums), and the
    decoder paints each dim's value into its own stripe (channel c scaled by 1 + c)."""

    def __init__(self, z_dim: int = 4, channels: int = 1):
        super().__init__()
        self.z_dim, self.channels = z_dim, channels
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        r = torch.arange(64)
        self.register_buffer("region", ((r[:, None] // 16) * 4 + r[None, :] // 16) % z_dim)

    def encode(self, x):
        masks = torch.stack([(self.region == j) for j in range(self.z_dim)]).to(x.dtype)  # [z, 64, 64]
        sums = (x.sum(1)[:, None] * masks).sum((2, 3))
        mu = 40 * sums / masks.sum((1, 2)) - 1
        logvar = -torch.arange(self.z_dim, dtype=x.dtype).repeat(x.shape[0], 1)
        return mu, logvar

    def decode(self, z):
        painted = z[:, self.region]
        return torch.stack([painted * (1 + c) for c in range(self.channels)], 1)


def pixel_hash(path) -> str:
    """SHA-256 of every frame's decoded RGBA pixels (independent of the PNG/GIF encoder)."""
    digest = hashlib.sha256()
    with Image.open(path) as image:
        for frame in ImageSequence.Iterator(image):
            digest.update(np.ascontiguousarray(np.asarray(frame.convert("RGBA"))).tobytes())
    return digest.hexdigest()


#: `write_run_figures(PixelVAE(), tiny_dsprites(), out)` as the code before colour datasets drew it.
GRAY_PIXELS = {
    "reconstructions": "5e14d77e265f782233ce2bd35bc6cf881775a3e88351231606ee3de8d977a449",
    "traversals_gif": "adf3a888b695800ccafdc598dba0ef45ffa90fc02d0b9c74fd36620c7ee97b5a",
}
#: traversals.png is drawn by matplotlib, whose text rendering may change between versions.
GRAY_TRAVERSALS_PNG = ("3.11.2", "8ab946d91aacd495e9180f38669c4bc8ecc88253fdb4873c8fa4ec96e83a26c2")


@pytest.fixture(scope="module")
def gray_figures(tmp_path_factory):
    return write_run_figures(PixelVAE(), tiny_dsprites(), tmp_path_factory.mktemp("gray"))


@pytest.mark.parametrize("name", sorted(GRAY_PIXELS))
def test_gray_figures_are_unchanged(gray_figures, name):
    assert pixel_hash(gray_figures[name]) == GRAY_PIXELS[name]
    with Image.open(gray_figures[name]) as image:
        assert image.mode in ("L", "P")  # a gray PNG; a GIF is always a palette


@pytest.mark.skipif(matplotlib.__version__ != GRAY_TRAVERSALS_PNG[0],
                    reason=f"the traversals.png pixels were recorded with matplotlib {GRAY_TRAVERSALS_PNG[0]}")
def test_gray_traversal_png_is_unchanged(gray_figures):
    assert pixel_hash(gray_figures["traversals"]) == GRAY_TRAVERSALS_PNG[1]


def test_tile_and_to_uint8_keep_a_trailing_channel_axis():
    images = np.random.RandomState(0).rand(2, 3, 5, 4, 3).astype(np.float32)
    tiled = tile(images, pad=1, pad_value=0.25)
    assert tiled.shape == (2 * 6 - 1, 3 * 5 - 1, 3)
    for c in range(3):
        np.testing.assert_array_equal(tiled[..., c], tile(images[..., c], pad=1, pad_value=0.25))
    big = to_uint8(tiled, scale=2)
    assert big.shape == (2 * tiled.shape[0], 2 * tiled.shape[1], 3) and big.dtype == np.uint8
    np.testing.assert_array_equal(big[::2, ::2], to_uint8(tiled))
    with pytest.raises(ValueError, match="tile takes"):
        tile(images[0, 0])


def test_reconstructions_and_traversals_of_a_3_channel_model_are_channels_last():
    vae, x = PixelVAE(channels=3), torch.rand(2, 3, 64, 64)
    mu, _ = vae.encode(x)
    recon = reconstructions(vae, x)
    assert recon.shape == (2, 64, 64, 3)
    for c in range(3):  # channel c of the picture is the decoder's channel c
        np.testing.assert_allclose(recon[..., c], torch.sigmoid(mu[:, vae.region] * (1 + c)).numpy(), rtol=1e-6)
    sweeps = traversals(vae, x, np.array([1, 0]), np.array([-3.0, 3.0]))
    assert sweeps.shape == (2, 2, 2, 64, 64, 3)
    np.testing.assert_allclose(sweeps[0, 0, 1, 0, 16], 1 / (1 + np.exp(-3.0 * np.arange(1, 4))), rtol=1e-6)


def _has_colour(pixels: np.ndarray) -> bool:
    rgb = pixels[..., :3].astype(int)
    return bool(np.any(rgb[..., 0] != rgb[..., 1]) or np.any(rgb[..., 1] != rgb[..., 2]))


def test_3_channel_figures_are_rgb(tmp_path):
    from fastfvae.models import VAE

    torch.manual_seed(0)
    records = [{"step": s, "loss": 10.0 / s} for s in (1, 2)]
    paths = write_run_figures(VAE(4, 32, channels=3), TinyRGB(), tmp_path, records, num_images=2)
    assert sorted(paths) == ["loss_curves", "reconstructions", "traversals", "traversals_gif"]
    with Image.open(paths["reconstructions"]) as im:
        assert im.mode == "RGB" and im.size == (2 * (8 * 66 - 2), 2 * (4 * 66 - 2))
        pixels = np.asarray(im)
    with Image.open(paths["traversals_gif"]) as gif:
        assert gif.n_frames == 2 * len(GIF_SWEEP) - 2
        assert gif.size == (2 * (4 * 66 - 2), 2 * (2 * 66 - 2))  # 4 dims x 2 images, 2x enlarged
        assert _has_colour(np.asarray(gif.convert("RGB")))
    with Image.open(paths["traversals"]) as png:
        assert _has_colour(np.asarray(png))
    assert _has_colour(pixels)


def test_the_reconstruction_grid_shows_each_original_in_colour(tmp_path):
    data = TinyRGB()
    rows = np.arange(8)
    images = data.float_batch(rows)
    from fastfvae.viz.figures import save_reconstruction_grid

    path = save_reconstruction_grid(PixelVAE(channels=3), images, tmp_path / "r.png")
    with Image.open(path) as im:
        pixels = np.asarray(im)
    for i, row in enumerate(rows):  # originals on the first line, 2x enlarged, 66-pixel cells
        cell = pixels[0:128:2, i * 132:i * 132 + 128:2]
        np.testing.assert_array_equal(cell, to_uint8(data.packed[row] / 255.0))


def test_colour_dsprites_figures_show_observations(tmp_path):
    from fastfvae.data.variants import ColorDSprites

    data = ColorDSprites(tiny_dsprites())
    paths = write_run_figures(PixelVAE(channels=3), data, tmp_path, num_recons=8)
    rng = np.random.default_rng(1)
    rng.choice(len(data), min(1024, len(data)), replace=False)  # the KL rows, drawn first
    recon_rows = np.sort(rng.choice(len(data), 8, replace=False))
    observed = data.observations(recon_rows, np.random.RandomState(NOISE_SEED)).permute(0, 2, 3, 1).numpy()
    with Image.open(paths["reconstructions"]) as im:
        assert im.mode == "RGB"
        pixels = np.asarray(im)
    for i in range(8):
        np.testing.assert_array_equal(pixels[0:128:2, i * 132:i * 132 + 128:2], to_uint8(observed[i]))
    assert _has_colour(pixels[:128])


def test_a_model_of_other_channels_is_one_line(tmp_path):
    with pytest.raises(FastFVAEError, match="^the model takes 1-channel images but tiny_rgb's observations have 3"):
        write_run_figures(PixelVAE(channels=1), TinyRGB(), tmp_path)
    assert list(tmp_path.iterdir()) == []


class _FullGrid:
    """Just enough of a full dataset for `fixed_rows`: its grid."""

    def __init__(self, sizes):
        self.latent_grid = FactorGrid(sizes)
        self.factor_sizes = sizes
        self.is_full = True

    def __len__(self):
        return self.latent_grid.num_rows

    def rows_from_factors(self, factors):
        return self.latent_grid.rows_from_factors(factors)


def test_fixed_rows_pick_dsprites_centred_shapes_only_on_its_grid():
    dsprites = _FullGrid((3, 6, 40, 32, 32))
    rows = fixed_rows(dsprites, 5)
    centred = dsprites.rows_from_factors(np.array([[s, 5, 0, 16, 16] for s in range(3)]))
    np.testing.assert_array_equal(rows[:3], centred)
    assert len(set(rows.tolist())) == 5
    shapes3d_like = _FullGrid((10, 10, 10, 8, 4, 15))  # 3dshapes' factors: no shape/scale/pos
    rows = fixed_rows(shapes3d_like, 3)
    assert len(set(rows.tolist())) == 3 and rows.min() >= 0 and rows.max() < len(shapes3d_like)
    small = fixed_rows(TinyRGB(), 40)  # more asked for than there are rows
    np.testing.assert_array_equal(small, np.arange(32))


def test_dataset_grid_of_3_channel_data(tmp_path):
    data = TinyRGB()
    panels, labels = dataset_panels(data, columns=4)
    assert panels.shape == (2 + 3, 4, 64, 64, 3)
    assert labels == ["random", "random", "red", "green", "blue"]
    # the green sweep: the right half's green channel brightens with the factor
    greens = panels[3, :, :, 32:, 1].mean((1, 2))
    assert np.all(np.diff(greens) > 0.1)
    path = save_dataset_grid(data, tmp_path / "grid.png", columns=4)
    with Image.open(path) as im:
        assert _has_colour(np.asarray(im))


def test_traverse_draws_a_run_on_its_dataset(tmp_path, monkeypatch, capsys):
    import fastfvae.train.loop as loop
    from fastfvae.cli import main
    from fastfvae.data.variants import ColorDSprites
    from fastfvae.models import VAE
    from fastfvae.train.checkpoint import save_checkpoint
    from fastfvae.train.config import TrainConfig

    run = tmp_path / "run"
    cfg = TrainConfig(model="betavae", z_dim=3, fc_dim=16, dataset="color_dsprites", data="/the/run's.npz")
    save_checkpoint(run, {"config": cfg.to_dict(), "state": {"step": 0, "vae": VAE(3, 16, channels=3).state_dict(),
                                                             "disc": None}})
    asked, data = [], ColorDSprites(tiny_dsprites())
    monkeypatch.setattr(loop, "load_training_data", lambda path, dataset: asked.append((path, dataset)) or data)
    assert main(["traverse", str(run), "--out", str(tmp_path / "figs"), "--images", "2"]) == 0, capsys.readouterr().err
    assert asked == [("/the/run's.npz", "color_dsprites")]
    with Image.open(tmp_path / "figs" / "reconstructions.png") as im:
        assert im.mode == "RGB" and _has_colour(np.asarray(im))
    assert main(["traverse", str(run), "--out", str(tmp_path / "figs"), "--data", "other.npz"]) == 0
    assert asked[-1] == ("other.npz", "color_dsprites")
