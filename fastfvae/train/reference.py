"""The reference training step: eager, plain torch, exactly the paper's algorithm.

One step (FactorVAE, Kim & Mnih 2018, Algorithm 1), in this order:

1. Draw all randomness (`draw_step_inputs`), in this fixed order:
   (a) ``rows``  = sampler.next_rows()                         the VAE batch
   (b) ``rows2`` = sampler.next_rows()   [perm_batch="second"]  the batch for permuted codes
   (c) ``eps``   = randn([B, z], generator)                     reparameterisation of batch
   (d) ``eps2``  = randn([B, z], generator) [perm_batch="second"] reparameterisation of batch2
   (e) ``keys``  = rand([d_steps, B, z], generator)  [factorvae] permutation keys, one [B, z]
       slice per discriminator update; permute_dims(z, keys[k]) = z.gather(0, keys[k].argsort(0))
   The generator is a CPU ``torch.Generator``; the draws are moved to the device afterwards,
   so a run's noise does not depend on the device.
2. VAE forward on batch: (mu, logvar) = enc(x), z = mu + eps * exp(logvar / 2), logits = dec(z).
3. VAE loss = recon + KL + gamma * TC, TC = mean(D(z)[:, 0] - D(z)[:, 1]) (Eq. 4, 5).
   beta-VAE: recon + beta * KL, and steps 5-6 do not exist.
4. VAE update: ``loss.backward(inputs=VAE parameters)`` then Adam. The TC gradient flows
   *through* D into the encoder, but D's parameters get no gradient from the VAE loss.
5. Codes for D, with no gradient: z_q = z.detach() (class 0, from the pre-update encoder);
   z_p = z_q for perm_batch="same", else the *updated* encoder's sample for batch2,
   mu2 + eps2 * exp(logvar2 / 2) (Algorithm 1 samples the second batch after the VAE update).
6. d_steps discriminator updates; update k: loss = 0.5 * (CE(D(z_q), 0) +
   CE(D(permute_dims(z_p, keys[k])), 1)), backward, Adam. Every update uses the same codes
   z_q / z_p and its own permutation keys ``keys[k]``.

D's loss is built only from detached codes, so it never reaches the encoder, and no graph
is back-propagated after the parameters it saw were changed (the in-place error of
implementations that reuse D(z) from step 3 after the VAE update). No ``retain_graph``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from fastfvae.objectives import (
    beta_vae_loss, discriminator_accuracy, discriminator_loss, factor_vae_loss, kl_loss,
    permute_dims, recon_loss, reparameterize, tc_estimate,
)
from fastfvae.train.config import TrainConfig
from fastfvae.train.state import Models, Optimizers, TrainState


class StepInputs(NamedTuple):
    """Everything random in one step (see the module docstring for the draw order)."""

    rows: np.ndarray                 # int64 [B]
    rows2: np.ndarray | None         # int64 [B] (perm_batch="second" only)
    eps: torch.Tensor | None         # float32 [B, z], CPU (None: the step draws its own noise)
    eps2: torch.Tensor | None        # float32 [B, z], CPU (perm_batch="second" only)
    keys: torch.Tensor | None        # float32 [d_steps, B, z], CPU (factorvae only)


#: A built step: takes the step's random inputs, updates the models in place, returns metrics
#: (0-dim tensors: loss, recon, kl, and for FactorVAE tc, d_loss, d_acc). The loop reads two
#: optional attributes: ``defers_sync`` (check the loss only when it reads back anyway) and
#: ``draws_own_noise`` (the step ignores eps/eps2/keys: the loop draws the rows only).
StepFn = Callable[[StepInputs], dict]


def uses_second_batch(cfg: TrainConfig) -> bool:
    return cfg.model == "factorvae" and cfg.perm_batch == "second"


def draw_step_inputs(cfg: TrainConfig, sampler, generator: torch.Generator, noise: bool = True) -> StepInputs:
    """Draw one step's randomness, in the documented order, from the sampler and the generator.

    ``noise=False`` (a step that draws its own noise on the device, ``draws_own_noise``): the
    rows only, eps/eps2/keys None. The sampler advances exactly as with ``noise=True`` (same
    batches); the generator does not advance at all.
    """
    b, z = cfg.batch_size, cfg.z_dim
    second = uses_second_batch(cfg)
    rows = sampler.next_rows()
    rows2 = sampler.next_rows() if second else None
    if not noise:
        return StepInputs(rows, rows2, None, None, None)
    eps = torch.randn(b, z, generator=generator)
    eps2 = torch.randn(b, z, generator=generator) if second else None
    keys = torch.rand(cfg.d_steps, b, z, generator=generator) if cfg.model == "factorvae" else None
    return StepInputs(rows, rows2, eps, eps2, keys)


def reference_step(models: Models, optims: Optimizers, batch: torch.Tensor, batch2: torch.Tensor | None,
                   eps: torch.Tensor, eps2: torch.Tensor | None, keys: torch.Tensor | None,
                   cfg: TrainConfig) -> dict:
    """One training step on device tensors (batch [B,1,64,64], eps/eps2 [B,z], keys [K,B,z]).

    Updates the models in place; returns detached 0-dim metrics.
    """
    vae, disc = models
    mu, logvar = vae.encode(batch)
    z = reparameterize(mu, logvar, eps)
    recon = recon_loss(vae.decode(z), batch)
    kl = kl_loss(mu, logvar)
    if cfg.model == "betavae":
        loss = beta_vae_loss(recon, kl, cfg.beta)
        tc = None
    else:
        tc = tc_estimate(disc(z))
        loss = factor_vae_loss(recon, kl, tc, cfg.gamma)

    optims.vae.zero_grad(set_to_none=True)
    loss.backward(inputs=list(vae.parameters()))
    optims.vae.step()
    metrics = {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach()}
    if tc is None:
        return metrics

    z_q = z.detach()
    if batch2 is None:
        z_p = z_q
    else:
        with torch.no_grad():
            mu2, logvar2 = vae.encode(batch2)
            z_p = reparameterize(mu2, logvar2, eps2)
    for k in range(keys.shape[0]):
        logits_q = disc(z_q)
        logits_p = disc(permute_dims(z_p, keys[k]))
        d_loss = discriminator_loss(logits_q, logits_p)
        optims.disc.zero_grad(set_to_none=True)
        d_loss.backward()
        optims.disc.step()
    metrics.update(tc=tc.detach(), d_loss=d_loss.detach(),
                   d_acc=discriminator_accuracy(logits_q.detach(), logits_p.detach()))
    return metrics


def make_reference_step(state: TrainState, data) -> StepFn:
    """The reference `StepFn`: batches via ``data.float_batch(rows, device)``, then `reference_step`."""
    cfg, device = state.cfg, state.device

    def to_device(t):
        return None if t is None else t.to(device)

    def step(inputs: StepInputs) -> dict:
        batch = data.float_batch(inputs.rows, device)
        batch2 = None if inputs.rows2 is None else data.float_batch(inputs.rows2, device)
        return reference_step(state.models, state.optims, batch, batch2, to_device(inputs.eps),
                              to_device(inputs.eps2), to_device(inputs.keys), cfg)

    return step
