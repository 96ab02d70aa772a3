"""Fused, torch.compile-safe ops (``torch.ops.fastfvae.*``): Triton kernels on CUDA, torch on CPU.

See `fastfvae.ops.dispatch` for which implementation a call runs.
"""

from fastfvae.ops.gaussian import gaussian_kl, gaussian_sample_kl, reparameterize
from fastfvae.ops.mlp import FusedDiscriminator, FusedMLP, linear_leaky_relu
from fastfvae.ops.permute import permute_dims

__all__ = [
    "FusedDiscriminator",
    "FusedMLP",
    "gaussian_kl",
    "gaussian_sample_kl",
    "linear_leaky_relu",
    "permute_dims",
    "reparameterize",
]
