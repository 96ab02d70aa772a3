"""beta-VAE (Higgins et al. 2017): recon + beta * KL.

disentanglement_lib's ``BetaVAE.regularizer``: ``beta * kl_loss``. beta = 1 is the plain VAE.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastfvae.methods import register
from fastfvae.methods.base import Hyperparameters, Method, at_least, hparam


@dataclass(frozen=True)
class BetaVAEHparams(Hyperparameters):
    beta: float = hparam(4.0, "KL weight, >= 0", at_least(0.0),
                         "Higgins et al. 2017 (their dSprites choice); dlib sweeps 1, 2, 4, 6, 8, 16")


@register
class BetaVAE(Method):
    name = "betavae"
    summary = "recon + beta * KL"
    citation = "Higgins et al., beta-VAE, ICLR 2017"
    Hparams = BetaVAEHparams

    def regularizer(self, kl, mu, logvar, z, step):
        return self.hparams.beta * kl
