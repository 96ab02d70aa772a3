"""Run figures: traversals sweep exactly one dim at a time, dims ordered by KL, all four files written."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastfvae.models import VAE
from fastfvae.objectives import gaussian_kl_per_dim
from fastfvae.viz.decode import kl_per_dim, traversals
from fastfvae.viz.figures import GIF_SWEEP, write_run_figures
from train_data import small_dsprites


class _ProbeVAE(torch.nn.Module):
    """encode: mu = (0.1, 0.2, 0.3), logvar = (0, -1, -2); decode writes z into the first pixels."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        n = x.shape[0]
        return torch.tensor([0.1, 0.2, 0.3]).repeat(n, 1), torch.tensor([0.0, -1.0, -2.0]).repeat(n, 1)

    def decode(self, z):
        out = torch.zeros(z.shape[0], 1, 64, 64)
        out[:, 0, 0, :3] = z
        return out


def test_traversals_sweep_one_dim_around_the_posterior_mean():
    vae, values = _ProbeVAE(), np.array([-3.0, 0.0, 3.0])
    sweeps = traversals(vae, torch.zeros(2, 1, 64, 64), np.array([2, 0]), values)
    assert sweeps.shape == (2, 2, 3, 64, 64)
    codes = np.log(sweeps[..., 0, :3] / (1 - sweeps[..., 0, :3]))  # undo the sigmoid
    np.testing.assert_allclose(codes[:, 0, :, 2], np.tile(values, (2, 1)), atol=1e-5)  # dim 2 swept
    np.testing.assert_allclose(codes[:, 0, :, :2], np.full((2, 3, 2), [0.1, 0.2]), atol=1e-5)  # others at mu
    np.testing.assert_allclose(codes[:, 1, :, 0], np.tile(values, (2, 1)), atol=1e-5)


def test_kl_per_dim_is_the_mean_kl_of_each_dim():
    vae = _ProbeVAE()
    mu, logvar = vae.encode(torch.zeros(1, 1, 64, 64))
    np.testing.assert_allclose(kl_per_dim(vae, torch.zeros(5, 1, 64, 64), batch=2),
                               gaussian_kl_per_dim(mu, logvar)[0].numpy(), rtol=1e-6)


def test_write_run_figures(tmp_path):
    torch.manual_seed(0)
    records = [{"step": s, "loss": 100.0 / s, "recon": 90.0 / s, "kl": 1.0, "tc": 0.1, "d_acc": 0.5}
               for s in (1, 2, 3)]
    paths = write_run_figures(VAE(), small_dsprites(256), tmp_path, records)
    assert sorted(paths) == ["loss_curves", "reconstructions", "traversals", "traversals_gif"]
    with Image.open(paths["traversals_gif"]) as gif:
        assert gif.n_frames == 2 * len(GIF_SWEEP) - 2
        assert gif.size == (2 * (10 * 66 - 2), 2 * (3 * 66 - 2))  # 10 dims x 3 images, 2x enlarged
    with Image.open(paths["reconstructions"]) as im:
        assert im.size == (2 * (8 * 66 - 2), 2 * (4 * 66 - 2))  # 16 images: 2 x (originals, recons)
    for name in ("traversals", "loss_curves"):
        assert paths[name].stat().st_size > 10_000
