"""The plain VAE (Kingma & Welling 2014): recon + KL, beta-VAE with beta = 1."""

from __future__ import annotations

from dataclasses import dataclass

from fastfvae.methods import register
from fastfvae.methods.base import Hyperparameters, Method


@dataclass(frozen=True)
class VAEHparams(Hyperparameters):
    pass


@register
class VAE(Method):
    name = "vae"
    summary = "recon + KL (the evidence lower bound)"
    citation = "Kingma & Welling, Auto-Encoding Variational Bayes, ICLR 2014"
    Hparams = VAEHparams

    def regularizer(self, kl, mu, logvar, z, step):
        return kl
