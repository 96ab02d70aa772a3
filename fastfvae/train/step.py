"""The training step, written once for every method and every mechanism.

One step, in this order (Kim & Mnih 2018, Algorithm 1, generalised over methods as
disentanglement_lib's ``GaussianEncoderModel`` does):

1. Draw all randomness (`draw_step_inputs`), in this fixed order:
   (a) ``rows``  = sampler.next_rows()                            the VAE batch
   (b) ``rows2`` = sampler.next_rows()     [method.second_batch]   the adversary's second batch
   (c) ``eps``   = randn([B, z], generator)                        reparameterisation of batch
   (d) ``eps2``  = randn([B, z], generator) [method.second_batch]  reparameterisation of batch2
   (e) ``keys``  = rand(method.adversary_noise_shape(B, z), generator)  [adversarial methods]
       (FactorVAE: [d_steps, B, z], one permutation key slice per discriminator update)
   (f) ``obs``   = rand(data.observation_noise_shape(B), generator)  [colour / noisy dSprites]
   (g) ``obs2``  = the same for batch2                                [and method.second_batch]
   The generator is a CPU ``torch.Generator``; the draws are moved to the device afterwards,
   so a run's noise does not depend on the device.
2. Observations: x = data.render(images of rows, obs) (the identity for plain datasets).
3. VAE forward: (mu, logvar) = enc(x), z = mu + eps * exp(logvar / 2), logits = dec(z).
4. VAE loss = recon + method.regularizer(kl, mu, logvar, z, step) (`fastfvae.methods`).
5. VAE update: backward into the VAE's parameters only, then Adam. A regulariser that runs an
   adversary network (FactorVAE's TC) sends its gradient *through* that network into the
   encoder; the network's own parameters get no gradient from the VAE loss.
6. The method's adversary updates, if it has any (`AdversarialMethod.adversary_step`).

`train_step` is that algorithm; *how* each piece runs is the mechanism's business
(`EagerMechanism` here: the modules as they are, torch's Adam, fp32 — the readable reference;
`fastfvae.fast` gives compiled, CUDA-graph and by-hand CPU mechanisms of the same pieces).
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import numpy as np
import torch

from fastfvae.objectives import gaussian_kl, permute_dims, recon_loss, reparameterize


class StepInputs(NamedTuple):
    """Everything random in one step (see the module docstring for the draw order)."""

    rows: np.ndarray                 # int64 [B]
    rows2: np.ndarray | None         # int64 [B] (method.second_batch only)
    eps: torch.Tensor | None         # float32 [B, z], CPU (None: the step draws its own noise)
    eps2: torch.Tensor | None        # float32 [B, z], CPU (method.second_batch only)
    keys: torch.Tensor | None        # float32 method.adversary_noise_shape, CPU (adversarial methods)
    obs: torch.Tensor | None = None   # float32 data.observation_noise_shape(B), CPU (colour / noise)
    obs2: torch.Tensor | None = None  # the same for batch2


#: A built step: takes the step's random inputs, updates the models in place, returns metrics
#: (0-dim tensors: loss, recon, kl and the method's `metric_names`). The loop reads two
#: optional attributes: ``defers_sync`` (check the loss only when it reads back anyway) and
#: ``draws_own_noise`` (the step ignores eps/eps2/keys/obs: the loop draws the rows only).
StepFn = Callable[[StepInputs], dict]


class StepShapes(NamedTuple):
    """What `draw_step_inputs` draws for a run: from its config, method and dataset."""

    batch_size: int
    z_dim: int
    second_batch: bool
    keys: tuple[int, ...] | None
    obs: tuple[int, ...] | None

    @classmethod
    def of(cls, cfg, method=None, data=None) -> "StepShapes":
        method = cfg.method() if method is None else method
        b, z = cfg.batch_size, cfg.z_dim
        keys = method.adversary_noise_shape(b, z) if method.adversarial else None
        obs = None if data is None else data.observation_noise_shape(b)
        return cls(b, z, bool(method.second_batch), None if keys is None else tuple(keys),
                   None if obs is None else tuple(obs))


def draw_step_inputs(shapes, sampler, generator: torch.Generator, noise: bool = True) -> StepInputs:
    """Draw one step's randomness, in the documented order, from the sampler and the generator.

    ``shapes``: a `StepShapes` (or a `TrainConfig`, for a dataset without observation noise).
    ``noise=False`` (a step that draws its own noise on the device, ``draws_own_noise``): the
    rows only. The sampler advances exactly as with ``noise=True`` (same batches); the generator
    does not advance at all.
    """
    if not isinstance(shapes, StepShapes):
        shapes = StepShapes.of(shapes)
    b, z, second = shapes.batch_size, shapes.z_dim, shapes.second_batch
    rows = sampler.next_rows()
    rows2 = sampler.next_rows() if second else None
    if not noise:
        return StepInputs(rows, rows2, None, None, None)
    eps = torch.randn(b, z, generator=generator)
    eps2 = torch.randn(b, z, generator=generator) if second else None
    keys = None if shapes.keys is None else torch.rand(shapes.keys, generator=generator)
    obs = obs2 = None
    if shapes.obs is not None:
        obs = torch.rand(shapes.obs, generator=generator)
        obs2 = torch.rand(shapes.obs, generator=generator) if second else None
    return StepInputs(rows, rows2, eps, eps2, keys, obs, obs2)


def train_step(mech, method, x: torch.Tensor, x2: torch.Tensor | None, eps: torch.Tensor,
               eps2: torch.Tensor | None, keys: torch.Tensor | None, step) -> dict:
    """One step on device tensors (steps 3-6 of the module docstring); returns 0-dim metrics.

    ``mech``: the mechanism (`EagerMechanism` or a `fastfvae.fast` one); ``method``: a
    `fastfvae.methods.Method` (an adversarial one attached to ``mech.adversary``); ``step``:
    the number of VAE updates done so far (an int, or a 0-dim tensor inside a CUDA graph).
    """
    mu, logvar = mech.encode(x)
    z, kl_per_sample = mech.sample_kl(mu, logvar, eps)
    recon = mech.recon_loss(mech.decode(z), x)
    kl = kl_per_sample.mean(dim=-1)
    regularizer, aux = method.vae_terms(kl, mu, logvar, z, step)
    loss = recon + regularizer
    # an adversary's first update reuses the regulariser's forward through it: keep its graph
    mech.vae_update(loss, retain_graph=method.adversarial)
    metrics = {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach()}
    if method.adversarial:
        metrics.update(method.adversary_step(mech, z, x2, eps2, keys, aux))
    return metrics


class EagerMechanism:
    """The reference mechanism: the models as they are, torch's Adam, fp32, nothing fused.

    Every piece `train_step` and a method's adversary step use: ``encode``, ``decode``,
    ``recon_loss`` (of ``decode``'s logits and the batch), ``sample_kl``, ``permute``,
    ``autocast``, ``adversary`` (the network's forward, attached to the method),
    ``adversary_pair`` (its logits on the two halves of an update), ``vae_update`` and
    ``adversary_update`` (backward into one set of parameters, then Adam).
    """

    def __init__(self, models, optims) -> None:
        self.vae, self.disc = models
        self.optims = optims
        self.vae_params = list(self.vae.parameters())
        self.disc_params = [] if self.disc is None else list(self.disc.parameters())

    def autocast(self):
        return contextlib.nullcontext()

    def encode(self, x):
        return self.vae.encode(x)

    def decode(self, z):
        return self.vae.decode(z)

    def recon_loss(self, logits, x):
        """The Bernoulli reconstruction loss (`fastfvae.objectives.recon_loss`)."""
        return recon_loss(logits, x)

    def sample_kl(self, mu, logvar, eps):
        """(z, per-sample KL [B])."""
        return reparameterize(mu, logvar, eps), gaussian_kl(mu, logvar)

    def permute(self, z, keys):
        return permute_dims(z, keys)

    def adversary(self, z):
        return self.disc(z)

    def adversary_pair(self, z_q, z_perm, logits_q=None):
        """The adversary's logits on z_q (``logits_q`` when the caller has them from this
        network's current parameters) and on z_perm."""
        return (self.disc(z_q) if logits_q is None else logits_q), self.disc(z_perm)

    def vae_update(self, loss, retain_graph: bool = False) -> None:
        self.optims.vae.zero_grad(set_to_none=True)
        loss.backward(inputs=self.vae_params, retain_graph=retain_graph)
        self.optims.vae.step()

    def adversary_update(self, loss, logits_q=None, logits_p=None) -> None:
        self.optims.disc.zero_grad(set_to_none=True)
        loss.backward(inputs=self.disc_params)
        self.optims.disc.step()
