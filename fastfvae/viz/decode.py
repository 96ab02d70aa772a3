"""What the figures show, computed from a trained VAE (duck-typed: ``encode``/``decode``).

All functions run without gradients in eval mode and return numpy arrays of probabilities
as pictures: ``[..., 64, 64]`` for a 1-channel model, ``[..., 64, 64, 3]`` (channels last,
as `fastfvae.viz.grids` and PIL take them) for a 3-channel one.
"""

from __future__ import annotations

import numpy as np
import torch

from fastfvae.objectives import gaussian_kl_per_dim


def _device(vae) -> torch.device:
    return next(vae.parameters()).device


def as_pictures(images: torch.Tensor) -> np.ndarray:
    """float images [n, C, H, W] -> numpy [n, H, W] (C = 1) or [n, H, W, C] (channels last)."""
    images = images.float().cpu()
    if images.shape[1] == 1:
        return images[:, 0].numpy()
    return np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())


@torch.no_grad()
def reconstructions(vae, images: torch.Tensor) -> np.ndarray:
    """Bernoulli means sigmoid(dec(mu(x))) of images [n, C, 64, 64], as `as_pictures`."""
    mu, _ = vae.encode(images.to(_device(vae)))
    return as_pictures(torch.sigmoid(vae.decode(mu)))


@torch.no_grad()
def kl_per_dim(vae, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Mean KL(q(z_j|x) || N(0,1)) of each latent dim over the images: [z_dim] (nats)."""
    total = None
    for start in range(0, images.shape[0], batch):
        mu, logvar = vae.encode(images[start:start + batch].to(_device(vae)))
        kl = gaussian_kl_per_dim(mu, logvar).sum(dim=0)
        total = kl if total is None else total + kl
    return (total / images.shape[0]).float().cpu().numpy()


@torch.no_grad()
def traversals(vae, images: torch.Tensor, dims: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sweep each dim in ``dims`` over ``values`` around each image's posterior mean.

    Returns [n_images, len(dims), len(values), 64, 64] Bernoulli means (``[..., 3]`` for a
    3-channel model).
    """
    mu, _ = vae.encode(images.to(_device(vae)))
    n, v, d = mu.shape[0], len(values), len(dims)
    codes = mu[:, None, None, :].repeat(1, d, v, 1)  # [n, d, v, z]
    sweep = torch.as_tensor(values, dtype=mu.dtype, device=mu.device)
    for i, dim in enumerate(dims):
        codes[:, i, :, int(dim)] = sweep
    pictures = as_pictures(torch.sigmoid(vae.decode(codes.reshape(-1, mu.shape[1]))))
    return pictures.reshape(n, d, v, *pictures.shape[1:])
