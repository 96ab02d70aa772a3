"""The encoder and decoder for 64x64 images with 1 (dSprites) or 3 (colour) channels.

Architecture (Kim & Mnih 2018, Section 6: "same as in [8]", i.e. Higgins et al. 2017;
the same shapes as disentanglement_lib's ``conv_encoder`` / ``deconv_decoder``):

- Encoder q(z|x) = N(mu(x), diag exp(logvar(x))):
  4 x [conv 4x4 stride 2 pad 1, ReLU] with 32, 32, 64, 64 channels (64 -> 32 -> 16 -> 8 -> 4),
  flatten (64*4*4 = 1024), FC to ``fc_dim`` (128; disentanglement_lib uses 256) + ReLU,
  linear head to 2*z_dim = (mu, logvar).
- Decoder p(x|z), the mirror: FC z -> ``fc_dim`` + ReLU, FC -> 64*4*4 + ReLU, reshape to
  [64, 4, 4], 3 x [transposed conv 4x4 stride 2 pad 1, ReLU] with 64, 32, 32 channels and a
  last transposed conv 4x4 stride 2 to ``channels``: Bernoulli logits [B, channels, 64, 64]
  (disentanglement_lib's Bernoulli loss, used for its colour datasets too).

Weights use PyTorch's default initialisation (no custom init).
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SIZE = 64
CONV_CHANNELS = (32, 32, 64, 64)
FEATURE_SHAPE = (64, 4, 4)  # the encoder's last conv output, and the decoder's first reshape
FEATURE_SIZE = FEATURE_SHAPE[0] * FEATURE_SHAPE[1] * FEATURE_SHAPE[2]
FC_DIM = 128


def _check_dims(z_dim: int, fc_dim: int, channels: int = 1) -> None:
    if z_dim < 1 or fc_dim < 1:
        raise ValueError(f"z_dim and fc_dim must be >= 1, got z_dim={z_dim}, fc_dim={fc_dim}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")


class Encoder(nn.Module):
    """x [B, channels, 64, 64] -> (mu, logvar), each [B, z_dim]."""

    def __init__(self, z_dim: int = 10, fc_dim: int = FC_DIM, channels: int = 1) -> None:
        super().__init__()
        _check_dims(z_dim, fc_dim, channels)
        self.z_dim, self.channels = z_dim, channels
        layers: list[nn.Module] = []
        in_ch = channels
        for out_ch in CONV_CHANNELS:
            layers += [nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1), nn.ReLU()]
            in_ch = out_ch
        layers += [nn.Flatten(), nn.Linear(FEATURE_SIZE, fc_dim), nn.ReLU(), nn.Linear(fc_dim, 2 * z_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stats = self.net(x)
        return stats[:, :self.z_dim], stats[:, self.z_dim:]


class Decoder(nn.Module):
    """z [B, z_dim] -> Bernoulli logits [B, channels, 64, 64]."""

    def __init__(self, z_dim: int = 10, fc_dim: int = FC_DIM, channels: int = 1) -> None:
        super().__init__()
        _check_dims(z_dim, fc_dim, channels)
        self.z_dim, self.channels = z_dim, channels
        self.fc = nn.Sequential(nn.Linear(z_dim, fc_dim), nn.ReLU(), nn.Linear(fc_dim, FEATURE_SIZE), nn.ReLU())
        widths = (FEATURE_SHAPE[0],) + tuple(reversed(CONV_CHANNELS[:-1])) + (channels,)  # 64, 64, 32, 32, C
        layers: list[nn.Module] = []
        for i, (in_ch, out_ch) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.fc(z).view(-1, *FEATURE_SHAPE))


class VAE(nn.Module):
    """Encoder + decoder. ``forward(x)`` reconstructs from the posterior mean (no sampling);
    training steps call `encode`, reparameterise with their own noise, then `decode`."""

    def __init__(self, z_dim: int = 10, fc_dim: int = FC_DIM, channels: int = 1) -> None:
        super().__init__()
        self.z_dim, self.fc_dim, self.channels = z_dim, fc_dim, channels
        self.encoder = Encoder(z_dim, fc_dim, channels)
        self.decoder = Decoder(z_dim, fc_dim, channels)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the reconstruction of x from its posterior mean."""
        return self.decode(self.encode(x)[0])
