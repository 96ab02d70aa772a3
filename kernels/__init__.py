"""Triton kernels and native sources, installed as `fastfvae.kernels`.

Raw ``@triton.jit`` kernels and their launch helpers only: no ``torch.nn``, no other
fastfvae imports. The torch-facing ops live in `fastfvae.ops`.
"""
