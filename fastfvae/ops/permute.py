"""``permute_dims(z, keys)``: each column of z [B, D] shuffled across the batch by its own keys.

FactorVAE (Kim & Mnih 2018, sec. 3) samples from prod_j q(z_j) by permuting every latent
dimension independently across the batch. Contract:

    permute_dims(z, keys) == z.gather(0, keys.argsort(dim=0, stable=True))

z [B, D] any dtype, any strides; keys [B, D] float16/bfloat16/float32/float64 on z's device,
typically ``torch.rand_like(z)`` from the caller's generator -- the op draws no randomness
itself, so it is reproducible and CUDA-graph safe. Equal keys keep their row order (stable;
``torch.rand`` float32 keys tie with probability ~B^2/2^25 per column, so the stable rule
matters), NaN keys sort last, -0.0 equals +0.0. The result is contiguous. The backward is
the inverse scatter (re-ranking the keys instead of saving indices); keys get no gradient.
"""

import torch
from torch import Tensor

from fastfvae.errors import FastFVAEError
from fastfvae.ops import native
from fastfvae.ops.dispatch import KERNEL_FLOAT_DTYPES, NATIVE_FLOAT_DTYPES, kernels, use_native, use_triton


def _check(z: Tensor, keys: Tensor) -> None:
    if z.dim() != 2:
        raise FastFVAEError(f"permute_dims: z must be 2-D [batch, dims], got shape {tuple(z.shape)}")
    if keys.shape != z.shape:
        raise FastFVAEError(
            f"permute_dims: keys must have z's shape {tuple(z.shape)}, got {tuple(keys.shape)}"
        )
    if not keys.is_floating_point():
        raise FastFVAEError(f"permute_dims: keys must be a float tensor (torch.rand_like(z)), got {keys.dtype}")
    if keys.device != z.device:
        raise FastFVAEError(f"permute_dims: keys are on {keys.device}, z on {z.device}; expected one device")


def _run(src: Tensor, keys: Tensor, inverse: bool) -> Tensor:
    _check(src, keys)
    out = torch.empty(src.shape, dtype=src.dtype, device=src.device)
    if src.numel() == 0:
        return out
    if use_triton(src) and use_triton(keys, dtypes=KERNEL_FLOAT_DTYPES):
        module = kernels("permute")
        if src.shape[0] <= module.MAX_BATCH:
            module.permute_columns(src, keys, out, inverse)
            return out
    if use_native(keys, dtypes=NATIVE_FLOAT_DTYPES) and use_native(src):
        run = native.ops().permute_dims_backward if inverse else native.ops().permute_dims
        return run(src, keys)
    order = keys.argsort(dim=0, stable=True)
    if inverse:
        return out.scatter_(0, order, src)
    return torch.gather(src, 0, order, out=out)


@torch.library.custom_op("fastfvae::permute_dims", mutates_args=())
def _permute_dims(z: Tensor, keys: Tensor) -> Tensor:
    return _run(z, keys, inverse=False)


@torch.library.custom_op("fastfvae::permute_dims_backward", mutates_args=())
def _permute_dims_backward(grad: Tensor, keys: Tensor) -> Tensor:
    return _run(grad, keys, inverse=True)


def _fake(src: Tensor, keys: Tensor) -> Tensor:
    _check(src, keys)
    return src.new_empty(src.shape)


def _save_keys(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])


def _grad_of_forward(ctx, grad: Tensor):
    (keys,) = ctx.saved_tensors
    return _permute_dims_backward(grad, keys), None


def _grad_of_backward(ctx, grad: Tensor):
    (keys,) = ctx.saved_tensors
    return _permute_dims(grad, keys), None


_permute_dims.register_fake(_fake)
_permute_dims_backward.register_fake(_fake)
_permute_dims.register_autograd(_grad_of_forward, setup_context=_save_keys)
_permute_dims_backward.register_autograd(_grad_of_backward, setup_context=_save_keys)


def permute_dims(z: Tensor, keys: Tensor) -> Tensor:
    """Column j of z [B, D] reordered by ``argsort(keys[:, j])`` (stable); see the module doc."""
    return _permute_dims(z, keys)
