"""fastfvae: fast, faithful FactorVAE (Kim & Mnih, 2018) training and disentanglement metrics."""

__version__ = "0.1.0"
