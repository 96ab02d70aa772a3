"""FactorVAE (Kim & Mnih 2018): recon + KL + gamma * TC, TC estimated by a discriminator.

The regulariser (disentanglement_lib's ``FactorVAE.regularizer``): ``kl + gamma * TC`` with
TC = mean(D(z)[:, 0] - D(z)[:, 1]) (Eq. 5, the density-ratio trick). Its adversary, the
discriminator D, learns to tell codes from q(z) (class 0) from codes whose dimensions were
permuted independently across the batch (class 1): after the VAE update, ``d_steps`` updates
of ``0.5 * (CE(D(z_q), 0) + CE(D(permute_dims(z_p, keys[k])), 1))``, where

- z_q = the step's codes, detached (from the encoder before the VAE update);
- z_p = z_q with ``perm_batch="same"`` (disentanglement_lib), or the *updated* encoder's codes
  of a second batch with ``perm_batch="second"`` (Algorithm 1 samples the second batch after
  the VAE update; 1Konny's implementation);
- keys[k] ~ U[0, 1) [B, z], one slice per update (argsort of iid uniforms = a uniformly random
  permutation per dimension, reproducible from the run's stream).

D(z_q) for the first update equals the logits the TC term computed (D is unchanged in between),
so the step reuses them: one D forward less, the same numbers. D's loss is built from detached
codes only, so it never reaches the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastfvae.methods import register
from fastfvae.methods.base import (
    AdversarialMethod, Hyperparameters, above, at_least, hparam, one_of, pair_in_unit_interval,
)
from fastfvae.objectives import discriminator_accuracy, discriminator_loss, tc_estimate

PERM_BATCHES = ("second", "same")


@dataclass(frozen=True)
class FactorVAEHparams(Hyperparameters):
    gamma: float = hparam(35.0, "TC weight, >= 0", at_least(0.0),
                          "Kim & Mnih 2018, Section 6; dlib sweeps 10, 20, 30, 40, 50, 100")
    d_steps: int = hparam(1, "discriminator updates per VAE update", at_least(1, integer=True),
                          "1, the common choice; Kim & Mnih 2018, Section 6, used 5")
    perm_batch: str = hparam("second", "where D's permuted codes come from: 'second' = a second batch "
                             "(Algorithm 1), 'same' = the VAE's batch (disentanglement_lib)", one_of(*PERM_BATCHES),
                             "Kim & Mnih 2018, Algorithm 1")
    d_lr: float = hparam(1e-4, "discriminator Adam learning rate", above(0.0), "Kim & Mnih 2018, appendix")
    d_betas: tuple[float, float] = hparam((0.5, 0.9), "discriminator Adam betas", pair_in_unit_interval,
                                          "Kim & Mnih 2018, appendix")
    d_hidden: int = hparam(1000, "discriminator hidden width", at_least(1, integer=True), "Kim & Mnih 2018, Section 6")
    d_layers: int = hparam(6, "discriminator hidden layers", at_least(1, integer=True), "Kim & Mnih 2018, Section 6")
    d_slope: float = hparam(0.2, "discriminator LeakyReLU negative slope", at_least(0.0), "Kim & Mnih 2018, Section 6")


@register
class FactorVAE(AdversarialMethod):
    name = "factorvae"
    summary = "recon + KL + gamma * TC, TC from a discriminator (density-ratio trick)"
    citation = "Kim & Mnih, Disentangling by Factorising, ICML 2018"
    Hparams = FactorVAEHparams
    metric_names = ("tc", "d_loss", "d_acc")
    pack_fixed = ("d_lr", "d_slope")

    @property
    def second_batch(self) -> bool:
        return self.hparams.perm_batch == "second"

    def regularizer(self, kl, mu, logvar, z, step):
        return self.vae_terms(kl, mu, logvar, z, step)[0]

    def vae_terms(self, kl, mu, logvar, z, step):
        logits_q = self._network()(z).to(kl.dtype)
        tc = tc_estimate(logits_q)
        return kl + self.hparams.gamma * tc, {"tc": tc, "logits_q": logits_q}

    # --- the adversary ------------------------------------------------------------------------
    def build_adversary(self, z_dim: int) -> torch.nn.Module:
        from fastfvae.models import Discriminator

        hp = self.hparams
        return Discriminator(z_dim, hp.d_hidden, hp.d_layers, hp.d_slope)

    def adversary_optimizer(self, params, adam_eps: float, fused: bool | None = None) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.hparams.d_lr, betas=tuple(self.hparams.d_betas), eps=adam_eps,
                                fused=fused)

    def adversary_noise_shape(self, batch_size: int, z_dim: int) -> tuple[int, ...]:
        return (self.hparams.d_steps, batch_size, z_dim)

    def adversary_step(self, mech, z, x2, eps2, noise, aux):
        z_q = z.detach()
        z_p = z_q
        if x2 is not None:  # the updated encoder's codes of the second batch
            with torch.no_grad(), mech.autocast():
                mu2, logvar2 = mech.encode(x2)
                z_p, _ = mech.sample_kl(mu2, logvar2, eps2)
        logits_q = aux["logits_q"]
        for k in range(noise.shape[-3]):  # noise [..., d_steps, B, z] (leading dims: a pack's models)
            # update 0: D(z_q) with D's current parameters is the TC term's logits_q
            logits_q, logits_p = mech.adversary_pair(z_q, mech.permute(z_p, noise[..., k, :, :]),
                                                     logits_q if k == 0 else None)
            d_loss = discriminator_loss(logits_q, logits_p)
            mech.adversary_update(d_loss, logits_q, logits_p)
        return {"tc": aux["tc"].detach(), "d_loss": d_loss.detach(),
                "d_acc": discriminator_accuracy(logits_q.detach(), logits_p.detach())}
