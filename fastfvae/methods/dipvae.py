"""DIP-VAE (Kumar et al. 2018): recon + KL + a penalty pulling a latent covariance to identity.

Kumar, Sattigeri & Balakrishnan, "Variational Inference of Disentangled Latent Concepts from
Unlabeled Observations", ICLR 2018, Eqs. 6 (DIP-VAE-I) and 7 (DIP-VAE-II). The covariance is
the batch's: for "i" that of the encoder means, Cov[mu] = E[mu mu^T] - E[mu] E[mu]^T; for "ii"
that of the aggregate posterior, Cov[mu] + E[diag(exp(logvar))]. The penalty is
``lambda_od * sum(off-diagonal^2) + lambda_d * sum((diagonal - 1)^2)`` with
``lambda_d = lambda_d_factor * lambda_od``, as in disentanglement_lib's ``DIPVAE.regularizer``
(``compute_covariance_z_mean``, ``regularize_diag_off_diag_dip``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastfvae.methods import register
from fastfvae.methods.base import Hyperparameters, Method, at_least, hparam, one_of


@dataclass(frozen=True)
class DIPVAEHparams(Hyperparameters):
    lambda_od: float = hparam(10.0, "weight of the squared off-diagonal covariance entries, >= 0", at_least(0.0),
                              "disentanglement_lib requires it (no gin default); 10 is in its "
                              "unsupervised_study_v1 sweep 1, 2, 5, 10, 20, 50")
    lambda_d_factor: float = hparam(10.0, "weight of the squared diagonal deviations from 1, as a multiple "
                                          "of lambda-od, >= 0", at_least(0.0),
                                    "disentanglement_lib's unsupervised_study_v1 sweep: fixed at 10 for "
                                    "dip-type i, at 1 for dip-type ii")
    dip_type: str = hparam("i", "which covariance: i (of the encoder means) or ii (of the aggregate "
                                "posterior)", one_of("i", "ii"),
                           "disentanglement_lib's DIPVAE default; its sweep trains both")


def covariance_of_means(mu: torch.Tensor) -> torch.Tensor:
    """[..., z, z] batch covariance of the encoder means [..., B, z], E[mu mu^T] - E[mu] E[mu]^T
    (dlib's ``compute_covariance_z_mean``: divided by the batch size, not batch size - 1)."""
    mean = mu.mean(dim=-2)
    return (mu.transpose(-1, -2) @ mu) / mu.shape[-2] - mean.unsqueeze(-1) * mean.unsqueeze(-2)


def off_diagonal_and_diagonal_penalty(cov: torch.Tensor, lambda_od: float, lambda_d: float) -> torch.Tensor:
    """``lambda_od * sum(off-diagonal^2) + lambda_d * sum((diagonal - 1)^2)``: how far ``cov`` is
    from the identity."""
    diagonal = torch.diagonal(cov, dim1=-2, dim2=-1)
    off_diagonal = cov - torch.diag_embed(diagonal)
    return lambda_od * off_diagonal.square().sum(dim=(-2, -1)) + lambda_d * (diagonal - 1).square().sum(dim=-1)


@register
class DIPVAE(Method):
    name = "dipvae"
    summary = "recon + KL + lambda-od * off-diag(Cov)^2 + lambda-d * (diag(Cov) - 1)^2"
    citation = ("Kumar, Sattigeri & Balakrishnan, Variational Inference of Disentangled Latent Concepts "
                "from Unlabeled Observations, ICLR 2018")
    Hparams = DIPVAEHparams

    def latent_covariance(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """The covariance the penalty pulls to identity (see the module's docstring)."""
        cov = covariance_of_means(mu)
        if self.hparams.dip_type == "ii":
            cov = cov + torch.diag_embed(logvar.exp().mean(dim=-2))
        return cov

    def regularizer(self, kl, mu, logvar, z, step):
        hp = self.hparams
        penalty = off_diagonal_and_diagonal_penalty(self.latent_covariance(mu, logvar), hp.lambda_od,
                                                    hp.lambda_d_factor * hp.lambda_od)
        return kl + penalty
