"""AnnealedVAE (Burgess et al. 2018): recon + gamma * |KL - C|, the capacity C raised over time.

Burgess et al., "Understanding disentangling in beta-VAE" (arXiv:1804.03599), Eq. 8: the KL is
pulled towards a target capacity C that grows linearly from 0 to ``c_max`` nats over
``iteration_threshold`` steps and stays at ``c_max`` after, so the code takes on information a
little at a time. disentanglement_lib's ``AnnealedVAE.regularizer`` with its ``anneal``
schedule, ``C = min(c_max, c_max * step / iteration_threshold)``, ``step`` being the global step
(the number of updates done before this one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastfvae.methods import register
from fastfvae.methods.base import Hyperparameters, Method, as_step_tensor, at_least, hparam


@dataclass(frozen=True)
class AnnealedVAEHparams(Hyperparameters):
    gamma: float = hparam(1000.0, "weight of |KL - C|, >= 0", at_least(0.0),
                          "disentanglement_lib's unsupervised_study_v1 sweep (fixed at 1000); "
                          "Burgess et al. 2018 use 1000 on dSprites")
    c_max: float = hparam(25.0, "capacity C reached at iteration-threshold, in nats, >= 0", at_least(0.0),
                          "Burgess et al. 2018 (25 nats on dSprites); dlib sweeps 5, 10, 25, 50, 75, 100")
    iteration_threshold: int = hparam(100000, "steps over which C rises linearly from 0 to c-max, >= 1",
                                      at_least(1, integer=True),
                                      "disentanglement_lib's unsupervised_study_v1 sweep (fixed at 100000)")


@register
class AnnealedVAE(Method):
    name = "annealedvae"
    summary = "recon + gamma * |KL - C(step)|, C rising linearly to c-max"
    citation = "Burgess et al., Understanding disentangling in beta-VAE, arXiv:1804.03599, 2018"
    Hparams = AnnealedVAEHparams

    def capacity(self, step, like: torch.Tensor) -> torch.Tensor:
        """C(step) as a 0-dim tensor of ``like``'s dtype and device. Torch ops only, so a step
        held in a tensor (a CUDA graph's step counter) is read on the device, with no sync."""
        hp = self.hparams
        step_t = as_step_tensor(step, like).to(like.dtype)
        return torch.clamp(hp.c_max * step_t / hp.iteration_threshold, max=hp.c_max)

    def regularizer(self, kl, mu, logvar, z, step):
        return self.hparams.gamma * torch.abs(kl - self.capacity(step, kl))
