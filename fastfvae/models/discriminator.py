"""The FactorVAE discriminator D(z): is a code from q(z) (class 0) or dimension-wise permuted (class 1)?

Kim & Mnih (2018), Section 6: an MLP with 6 layers of 1000 units, LeakyReLU(0.2), 2 logits.
The only submodule is ``net`` so the state_dict keys are ``net.0.weight, net.0.bias,
net.2.weight, ..., net.12.weight/bias`` (for 6 layers) — `fastfvae.ops.FusedDiscriminator`
uses the same keys, so checkpoints load into either.
"""

from __future__ import annotations

import torch
from torch import nn


class Discriminator(nn.Module):
    """z [B, z_dim] -> logits [B, 2] (class 0 = code from q(z), class 1 = permuted)."""

    def __init__(self, z_dim: int = 10, hidden: int = 1000, num_layers: int = 6, slope: float = 0.2) -> None:
        super().__init__()
        if z_dim < 1 or hidden < 1 or num_layers < 1:
            raise ValueError(f"z_dim, hidden and num_layers must be >= 1, got {z_dim}, {hidden}, {num_layers}")
        self.z_dim, self.hidden, self.num_layers, self.slope = z_dim, hidden, num_layers, slope
        layers: list[nn.Module] = [nn.Linear(z_dim, hidden), nn.LeakyReLU(slope)]
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden, hidden), nn.LeakyReLU(slope)]
        layers.append(nn.Linear(hidden, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
