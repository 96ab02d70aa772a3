"""beta-TCVAE (Chen et al. 2018): recon + KL + (beta - 1) * TC, TC estimated on the batch.

Chen, Li, Grosse & Duvenaud, "Isolating Sources of Disentanglement in Variational
Autoencoders", NeurIPS 2018: with alpha = gamma = 1 their decomposed objective is the ELBO
with an extra (beta - 1) times the total correlation TC = KL(q(z) || prod_l q(z_l)).

TC is disentanglement_lib's ``total_correlation``: the minibatch-weighted estimate, each
aggregate density q(z_j) approximated by the mixture of the batch's posteriors q(z_j | x_i),

    TC ~ mean_j [ logsumexp_i sum_l log q(z_jl | x_i) - sum_l logsumexp_i log q(z_jl | x_i) ].

The constant (z - 1) * log(batch size * data set size) is left out, as dlib does: it does
not change the gradient, but it makes the estimate negative (about -(z - 1) log B for
independent codes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastfvae.methods import register
from fastfvae.methods.base import Hyperparameters, Method, at_least, hparam

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class BetaTCVAEHparams(Hyperparameters):
    beta: float = hparam(6.0, "total-correlation weight (beta = 1 is the plain VAE), >= 0", at_least(0.0),
                         "disentanglement_lib requires it (no gin default); its unsupervised_study_v1 "
                         "sweep trains 1, 2, 4, 6, 8, 10")


def gaussian_log_density(samples: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(samples; mean, exp(logvar)), broadcasting its arguments."""
    diff = samples - mean
    return -0.5 * (diff * diff * torch.exp(-logvar) + logvar + _LOG_2PI)


def total_correlation(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The minibatch-weighted TC estimate of the batch (see the module's docstring): codes
    [..., B, z] -> [...] (0-dim for one model; leading dimensions are models of a pack)."""
    # [..., j, i, l]: log q(z_jl | x_i), sample j's code under sample i's posterior
    log_q = gaussian_log_density(z.unsqueeze(-2), mu.unsqueeze(-3), logvar.unsqueeze(-3))
    log_q_joint = torch.logsumexp(log_q.sum(dim=-1), dim=-1)
    log_q_marginals = torch.logsumexp(log_q, dim=-2).sum(dim=-1)
    return (log_q_joint - log_q_marginals).mean(dim=-1)


@register
class BetaTCVAE(Method):
    name = "betatcvae"
    summary = "recon + KL + (beta - 1) * TC (minibatch-weighted estimate)"
    citation = ("Chen, Li, Grosse & Duvenaud, Isolating Sources of Disentanglement in Variational "
                "Autoencoders, NeurIPS 2018")
    Hparams = BetaTCVAEHparams

    def regularizer(self, kl, mu, logvar, z, step):
        return (self.hparams.beta - 1.0) * total_correlation(z, mu, logvar) + kl
