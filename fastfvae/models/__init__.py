"""The networks: the VAE (encoder + decoder) and the FactorVAE discriminator."""

from fastfvae.models.discriminator import Discriminator  # noqa: F401
from fastfvae.models.vae import VAE, Decoder, Encoder  # noqa: F401
