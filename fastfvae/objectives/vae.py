"""The VAE terms: reparameterisation, Bernoulli reconstruction loss, Gaussian KL, beta-VAE loss.

Plain torch: these are the reference formulas the fused ops (`fastfvae.ops`) are checked against.
All losses are summed over pixels / latent dims and averaged over the batch (nats per image).
Leading dimensions before the batch are independent models (a pack, `fastfvae.study.pack`):
codes are [..., B, z], images [..., B, C, H, W], and a loss is one value per model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + eps * exp(logvar / 2), with caller-supplied noise eps ~ N(0, I) of mu's shape."""
    return mu + eps * torch.exp(0.5 * logvar)


def gaussian_kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_j, exp(logvar_j)) || N(0, 1)) of every sample and dim: [B, D]."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(N(mu, diag exp(logvar)) || N(0, I)) summed over dims: [..., B]."""
    return gaussian_kl_per_dim(mu, logvar).sum(dim=-1)


def kl_loss(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL to the prior, summed over latent dims, averaged over the batch (one per model)."""
    return gaussian_kl(mu, logvar).mean(dim=-1)


def recon_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bernoulli negative log-likelihood: BCE-with-logits summed over pixels, averaged over the
    batch (images [..., B, C, H, W]: one value per model)."""
    if x.dim() == 4:
        return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]
    per_element = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    return per_element.flatten(start_dim=-4).sum(dim=-1) / x.shape[-4]


def beta_vae_loss(recon: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """beta-VAE (Higgins et al. 2017; Kim & Mnih Eq. 2 negated): recon + beta * KL."""
    return recon + beta * kl
