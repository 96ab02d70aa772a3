"""Loss terms (plain torch reference formulas): VAE terms and FactorVAE's total correlation."""

from fastfvae.objectives.total_correlation import (  # noqa: F401
    discriminator_accuracy, discriminator_loss, factor_vae_loss, permute_dims, tc_estimate,
)
from fastfvae.objectives.vae import (  # noqa: F401
    beta_vae_loss, gaussian_kl, gaussian_kl_per_dim, kl_loss, recon_loss, reparameterize,
)
