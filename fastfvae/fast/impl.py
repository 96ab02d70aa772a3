"""Which implementation of each small op the fast step uses: the reference formulas
(`fastfvae.objectives`) or the fused Triton ops (`fastfvae.ops`, drop-in, same contracts).

Fused ops are the default on CUDA (where launches dominate); on CPU the reference formulas
are used unless asked for (`fastfvae.ops` on CPU runs its own torch reference, opaque to
Inductor). The discriminator is always the run's `Discriminator` parameters: with fused ops
they are called through `FusedDiscriminator` via ``torch.func.functional_call``, so the
optimiser, the checkpoint and the state_dict keys are unchanged.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from fastfvae.errors import FastFVAEError
from fastfvae.objectives import gaussian_kl, permute_dims, reparameterize


class OpSet(NamedTuple):
    """The small ops of a step. ``sample_kl(mu, logvar, eps) -> (z, per-sample KL [B])``,
    ``permute(z, keys)``, ``disc(z) -> logits [B, 2]``."""

    name: str
    sample_kl: Callable
    permute: Callable
    disc: Callable | None


def _reference_sample_kl(mu, logvar, eps):
    return reparameterize(mu, logvar, eps), gaussian_kl(mu, logvar)


def fused_ops_available() -> bool:
    try:
        from fastfvae import ops
    except ImportError:
        return False
    return all(hasattr(ops, name) for name in ("gaussian_sample_kl", "permute_dims", "FusedDiscriminator"))


def select_ops(disc: torch.nn.Module | None, fused: bool) -> OpSet:
    """The reference op set, or the fused one (FastFVAEError if `fastfvae.ops` lacks it)."""
    if not fused:
        return OpSet("reference", _reference_sample_kl, permute_dims, disc)
    if not fused_ops_available():
        raise FastFVAEError("fused ops requested but fastfvae.ops does not provide them; use the reference ops")
    from fastfvae import ops

    disc_fn = None
    if disc is not None:
        fused_disc = ops.FusedDiscriminator(disc.z_dim, disc.hidden, disc.num_layers, disc.slope)
        fused_disc.to(next(disc.parameters()).device)
        params = dict(disc.named_parameters())

        def disc_fn(z):
            return torch.func.functional_call(fused_disc, params, (z,))

    return OpSet("fused", ops.gaussian_sample_kl, ops.permute_dims, disc_fn)
