"""FactorVAE's total-correlation machinery: dimension-wise permutation, TC estimate, D loss.

Kim & Mnih (2018): samples of prod_j q(z_j) are made by permuting each latent dimension
independently across the batch (``permute_dims``); a discriminator D separates codes from
q(z) (class 0) from permuted codes (class 1), and the TC is estimated with the density-ratio
trick, TC ~= E_q(z)[log D(z) / (1 - D(z))] = mean(logit0 - logit1) (Eq. 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def permute_dims(z: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Permute each column of z [..., B, D] independently across the batch: column j is
    reordered by argsort(keys[..., :, j]).

    ``keys`` ~ U[0, 1) of z's shape (drawn by the caller, so the permutation is reproducible);
    argsort of iid uniforms is a uniformly random permutation.
    """
    # stable: equal keys (float32 rand ties ~B^2/2^25 per column) keep row order on every device,
    # exactly as fastfvae.ops.permute_dims; torch's default sort orders ties differently above 16 rows
    return z.gather(-2, keys.argsort(dim=-2, stable=True))


def tc_estimate(logits: torch.Tensor) -> torch.Tensor:
    """TC estimate from D's logits [..., B, 2] on codes from q(z): mean(logit0 - logit1) (Eq. 5)."""
    return (logits[..., 0] - logits[..., 1]).mean(dim=-1)


def factor_vae_loss(recon: torch.Tensor, kl: torch.Tensor, tc: torch.Tensor, gamma: float) -> torch.Tensor:
    """FactorVAE's VAE loss (Eq. 4 negated, TC by Eq. 5): recon + KL + gamma * TC."""
    return recon + kl + gamma * tc


def discriminator_loss(logits_q: torch.Tensor, logits_perm: torch.Tensor) -> torch.Tensor:
    """D's loss: cross-entropy of codes as class 0 and permuted codes as class 1, the two halves averaged.

    ``0.5 * (CE(D(z), 0) + CE(D(permute_dims(z')), 1))``, each CE averaged over its batch
    (as in 1Konny's FactorVAE; the factor 0.5 only rescales D's gradient, and Adam is
    invariant to that scale up to its epsilon).
    """
    if logits_q.dim() > 2:  # models of a pack: one loss each
        def per_model_ce(logits, label):
            targets = torch.full(logits.shape[:-1], label, dtype=torch.long, device=logits.device)
            return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view(
                logits.shape[:-1]).mean(dim=-1)

        return 0.5 * (per_model_ce(logits_q, 0) + per_model_ce(logits_perm, 1))
    zeros = torch.zeros(logits_q.shape[0], dtype=torch.long, device=logits_q.device)
    ones = torch.ones(logits_perm.shape[0], dtype=torch.long, device=logits_perm.device)
    return 0.5 * (F.cross_entropy(logits_q, zeros) + F.cross_entropy(logits_perm, ones))


def discriminator_accuracy(logits_q: torch.Tensor, logits_perm: torch.Tensor) -> torch.Tensor:
    """Fraction of codes and permuted codes D classifies correctly (in [0, 1]; one per model)."""
    correct = (logits_q.argmax(dim=-1) == 0).sum(dim=-1) + (logits_perm.argmax(dim=-1) == 1).sum(dim=-1)
    return correct.float() / (logits_q.shape[-2] + logits_perm.shape[-2])
