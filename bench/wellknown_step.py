"""The well-known PyTorch FactorVAE's training iteration, written out for the benchmarks.

The step rate fastfvae is compared against is that of the PyTorch FactorVAE most people start
from (1Konny/FactorVAE, its dSprites model `FactorVAE1`). This module is this project's own
rewrite of what one of its iterations computes, in its order, so that the interleaved
benchmark can time it beside the reference loop and the fast step in the same rounds:

- the networks as that implementation writes them: convolutions throughout (the fully
  connected layers of Kim & Mnih 2018 as a 4 x 4 convolution on the 4 x 4 feature map and
  1 x 1 convolutions), in-place ReLUs, the convolutions' and linear layers' weights drawn from
  N(0, 0.02) with zero biases (its initialiser takes ``nn.Linear`` and ``nn.Conv2d`` only: the
  decoder's transposed convolutions keep torch's default initialisation); D is six
  linear layers with LeakyReLU(0.2), that is five hidden layers of 1000 units (its reading of
  the paper's "6-layer MLP"; fastfvae's D, like disentanglement_lib's, has six hidden layers
  and two logits, so a step of the well-known one computes ~3% fewer FLOPs: 11.2 GFLOP
  against the reference step's 11.6 at the paper config);
- the iteration: the VAE forward on the first batch, D on its codes, the VAE loss
  (Bernoulli reconstruction summed over pixels and averaged over the batch, the Gaussian KL,
  gamma times the mean logit difference), its backward keeping the graph and the VAE's Adam
  step; then the second batch encoded (no decoder), its codes permuted column by column with
  one ``torch.randperm`` each, D on them, D's cross-entropy over both halves, and D's Adam
  step; one D update per iteration; torch's default Adam (for-each loop off on CPU).

One change keeps it running on current torch: its D loss back-propagated through the first
half's logits into the encoder, whose weights the VAE's Adam step had just changed in place,
which torch >= 1.5 refuses ("modified by an inplace operation"). Here D's backward stops at
D's parameters (``inputs=``), which gives D the same gradient and skips the encoder work the
original spent on gradients it then discarded: the rate measured is, if anything, above what
the original would reach. Its data loader (a ``DataLoader`` over float32 images) is not timed:
the batches are gathered from the resident dataset as the reference row's are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: a TC weight; its value does not change what a step costs
GAMMA = 35.0
VAE_LR, VAE_BETAS = 1e-4, (0.9, 0.999)
D_LR, D_BETAS = 1e-4, (0.5, 0.9)


def _normal_init(module: nn.Module) -> None:
    """N(0, 0.02) weights and zero biases for the linear layers and the convolutions, as that
    implementation's initialiser (an ``nn.ConvTranspose2d`` is not an ``nn.Conv2d``: it keeps
    torch's default)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)


class WellKnownVAE(nn.Module):
    """The dSprites encoder/decoder of the well-known implementation (64 x 64 x 1 images)."""

    def __init__(self, z_dim: int = 10) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.encode = nn.Sequential(
            nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(True),
            nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(True),
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(True),
            nn.Conv2d(64, 64, 4, 2, 1), nn.ReLU(True),
            nn.Conv2d(64, 128, 4, 1), nn.ReLU(True),
            nn.Conv2d(128, 2 * z_dim, 1),
        )
        self.decode = nn.Sequential(
            nn.Conv2d(z_dim, 128, 1), nn.ReLU(True),
            nn.ConvTranspose2d(128, 64, 4), nn.ReLU(True),
            nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU(True),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(True),
            nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(True),
            nn.ConvTranspose2d(32, 1, 4, 2, 1),
        )
        _normal_init(self)

    def forward(self, x: torch.Tensor, decode: bool = True):
        stats = self.encode(x)
        mu, logvar = stats[:, : self.z_dim], stats[:, self.z_dim :]
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        if not decode:
            return z.squeeze()
        return self.decode(z).view(x.size()), mu, logvar, z.squeeze()


class WellKnownDiscriminator(nn.Sequential):
    """D: five hidden layers of 1000 units with LeakyReLU(0.2), then two logits."""

    def __init__(self, z_dim: int = 10, hidden: int = 1000, hidden_layers: int = 5) -> None:
        layers: list[nn.Module] = []
        width = z_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.2, True)]
            width = hidden
        super().__init__(*layers, nn.Linear(width, 2))
        _normal_init(self)


def permute_dims(z: torch.Tensor) -> torch.Tensor:
    """Each column of ``z`` shuffled with its own ``torch.randperm``, as that implementation does."""
    return torch.cat([column[torch.randperm(z.shape[0], device=z.device)] for column in z.split(1, 1)], 1)


class WellKnownStep:
    """One iteration per call on the batches ``x1`` (the VAE's) and ``x2`` (the permuted codes')."""

    def __init__(self, z_dim: int = 10, device: torch.device | str = "cpu", seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.vae = WellKnownVAE(z_dim).to(device)
        self.d = WellKnownDiscriminator(z_dim).to(device)
        self.vae_opt = torch.optim.Adam(self.vae.parameters(), lr=VAE_LR, betas=VAE_BETAS)
        self.d_opt = torch.optim.Adam(self.d.parameters(), lr=D_LR, betas=D_BETAS)

    def __call__(self, x1: torch.Tensor, x2: torch.Tensor) -> dict:
        batch = x1.shape[0]
        x_recon, mu, logvar, z = self.vae(x1)
        recon = F.binary_cross_entropy_with_logits(x_recon, x1, reduction="sum") / batch
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1).mean()
        d_z = self.d(z)
        tc = (d_z[:, :1] - d_z[:, 1:]).mean()
        vae_loss = recon + kl + GAMMA * tc
        self.vae_opt.zero_grad()
        vae_loss.backward(retain_graph=True)
        self.vae_opt.step()

        z_perm = permute_dims(self.vae(x2, decode=False)).detach()
        d_z_perm = self.d(z_perm)
        zeros = torch.zeros(batch, dtype=torch.long, device=x1.device)
        d_loss = 0.5 * (F.cross_entropy(d_z, zeros) + F.cross_entropy(d_z_perm, torch.ones_like(zeros)))
        self.d_opt.zero_grad()
        d_loss.backward(inputs=list(self.d.parameters()))
        self.d_opt.step()
        return {"loss": vae_loss.detach(), "d_loss": d_loss.detach()}
