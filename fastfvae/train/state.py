"""The mutable state of a run: models, optimisers, the noise generator, the batch sampler, the step.

Everything a checkpoint must hold to continue a run bit-exactly lives here (plus the global
RNG states, which `fastfvae.train.checkpoint` adds). Initialisation is deterministic:
``torch.manual_seed(cfg.seed)`` then the VAE, then the discriminator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from fastfvae.data.sampling import EpochSampler
from fastfvae.errors import FastFVAEError
from fastfvae.models import VAE
from fastfvae.train.config import TrainConfig


class Models(NamedTuple):
    vae: VAE
    disc: torch.nn.Module | None  # the method's adversary network (FactorVAE's D); None without one


class Optimizers(NamedTuple):
    vae: torch.optim.Adam
    disc: torch.optim.Optimizer | None


def own_storage(t):
    """``t`` if it spans its whole storage, else a copy of it: a view of a larger buffer (the
    fast step's flat D buffers) would save that whole buffer and come back as a view."""
    if torch.is_tensor(t) and t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone()
    return t


def _owning(state_dict: dict) -> dict:
    """A module's state dict (its type and ``_metadata`` kept) with `own_storage` tensors."""
    for key, value in state_dict.items():
        state_dict[key] = own_storage(value)
    return state_dict


def noise_seed(seed: int) -> int:
    """Seed of the step-noise generator, derived from (and decorrelated from) the run seed."""
    return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FastFVAEError("device 'cuda' requested but no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def dataset_channels(cfg: TrainConfig) -> int:
    """Channels of ``cfg.dataset``'s observations (the model's input and output channels)."""
    from fastfvae.data.registry import dataset_channels as channels_of

    return channels_of(cfg.dataset)


def build_models(cfg: TrainConfig, device: torch.device | str = "cpu") -> Models:
    """Fresh models, initialised from ``cfg.seed`` (VAE first, then the method's adversary)."""
    method = cfg.method()
    torch.manual_seed(cfg.seed)
    vae = VAE(cfg.z_dim, cfg.fc_dim, channels=dataset_channels(cfg)).to(device)
    if cfg.fast and cfg.channels_last:  # the fast path's layout (values and state_dict unchanged)
        vae.to(memory_format=torch.channels_last)
    disc = method.build_adversary(cfg.z_dim).to(device) if method.adversarial else None
    return Models(vae, disc)


def build_optimizers(cfg: TrainConfig, models: Models) -> Optimizers:
    """Adam for the VAE (encoder + decoder) and the method's optimiser for its adversary."""
    vae_opt = torch.optim.Adam(models.vae.parameters(), lr=cfg.vae_lr, betas=tuple(cfg.vae_betas), eps=cfg.adam_eps)
    disc_opt = None
    if models.disc is not None:
        disc_opt = cfg.method().adversary_optimizer(models.disc.parameters(), cfg.adam_eps)
    return Optimizers(vae_opt, disc_opt)


@dataclass
class TrainState:
    """Everything that changes during training. ``step`` = VAE updates done so far."""

    cfg: TrainConfig
    models: Models
    optims: Optimizers
    generator: torch.Generator  # CPU generator for all step noise (eps, eps2, permutation keys)
    sampler: EpochSampler
    device: torch.device
    step: int = 0

    @classmethod
    def create(cls, cfg: TrainConfig, num_rows: int, device: torch.device | str = "cpu") -> "TrainState":
        device = torch.device(device)
        models = build_models(cfg, device)
        generator = torch.Generator().manual_seed(noise_seed(cfg.seed))
        sampler = EpochSampler(num_rows, cfg.batch_size, seed=cfg.seed)
        return cls(cfg, models, build_optimizers(cfg, models), generator, sampler, device)

    def state_dict(self) -> dict:
        """Models, optimisers, generator, sampler and step (tensors stay on their device)."""
        m, o = self.models, self.optims
        return {
            "step": self.step,
            "vae": m.vae.state_dict(),
            "disc": None if m.disc is None else _owning(m.disc.state_dict()),
            "vae_opt": o.vae.state_dict(),
            "disc_opt": None if o.disc is None else o.disc.state_dict(),
            "generator": self.generator.get_state(),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        m, o = self.models, self.optims
        m.vae.load_state_dict(state["vae"])
        o.vae.load_state_dict(state["vae_opt"])
        if m.disc is not None:
            m.disc.load_state_dict(state["disc"])
            o.disc.load_state_dict(state["disc_opt"])
        self.generator.set_state(state["generator"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
