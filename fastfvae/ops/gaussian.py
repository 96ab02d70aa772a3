"""Reparameterised sample and KL of a diagonal Gaussian posterior, as fused custom ops.

For q = N(mu, exp(logvar)) and the prior N(0, I), over the last dimension:

    reparameterize(mu, logvar, eps)     -> z  = mu + exp(logvar / 2) * eps      (mu's shape, dtype)
    gaussian_kl(mu, logvar)             -> kl = 0.5 * sum(mu^2 + exp(logvar) - 1 - logvar, -1)
    gaussian_sample_kl(mu, logvar, eps) -> (z, kl), one fused kernel each way

mu, logvar, eps: one shape [..., D] (usually [B, D]), one float dtype, one device; eps is
the caller's noise (``torch.randn_like(mu, generator=...)``), so nothing is random inside.
kl has shape [...] and dtype float32 (float64 for float64 inputs): it is computed in float32
for float16/bfloat16 inputs and a loss should be summed in float32 anyway. Gradients flow to
mu, logvar and eps (first order). Numerics: ``exp(lv/2) * eps`` stays finite while the product
is (lv up to ~+340 with small eps; eps = 0 gives z = mu exactly); kl is +inf only where it
exceeds the float32 range (an entry with logvar > ~88.7, or logvar = -inf); logvar = +inf gives
z = nan. The Triton kernels also evaluate ``exp(lv) - 1 - lv`` without cancellation near
lv = 0; the torch reference (CPU) computes the textbook formulas in plain torch's operation
order, forward and backward, so on CPU it matches eager torch bit for bit in the usual range
(absolute error ~1e-7 per entry near lv = 0, as eager's).
"""

import torch
from torch import Tensor

from fastfvae.errors import FastFVAEError
from fastfvae.ops import native
from fastfvae.ops.dispatch import KERNEL_FLOAT_DTYPES, NATIVE_FLOAT_DTYPES, kernels, use_native, use_triton


def _check(mu: Tensor, logvar: Tensor, eps: Tensor | None = None) -> None:
    for name, t in (("logvar", logvar), ("eps", eps)):
        if t is None:
            continue
        if t.shape != mu.shape or t.dtype != mu.dtype or t.device != mu.device:
            raise FastFVAEError(
                f"gaussian ops: {name} is {tuple(t.shape)} {t.dtype} on {t.device}; expected mu's "
                f"{tuple(mu.shape)} {mu.dtype} on {mu.device}"
            )
    if mu.dim() < 1 or not mu.is_floating_point():
        raise FastFVAEError(f"gaussian ops: mu must be a float tensor [..., D], got {tuple(mu.shape)} {mu.dtype}")


def _kl_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_rows(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous().view(-1, t.shape[-1])


# --- torch reference (CPU, float64, and anything the kernels do not take) -------------------

def _std_times_eps(half_lv: Tensor, eps: Tensor) -> Tensor:
    """exp(half_lv) * eps, through exp(half_lv + log|eps|) where exp(half_lv) would overflow."""
    # No data-dependent branch (``if big.any()`` would be a host synchronisation, which fails
    # inside a CUDA-graph capture of the FASTFVAE_NO_TRITON=1 path): both forms are computed and
    # selected; where no entry is big, the result is the plain product bit for bit.
    product = torch.exp(half_lv) * eps
    huge = torch.exp(half_lv + eps.abs().log()) * eps.sign()
    return torch.where(half_lv > 80.0, huge, product)


def _reference_forward(mu, logvar, eps, want_z: bool, want_kl: bool):
    acc = _kl_dtype(mu.dtype)
    m, lv = mu.to(acc), logvar.to(acc)
    z = (m + _std_times_eps(0.5 * lv, eps.to(acc))).to(mu.dtype) if want_z else None
    kl = (0.5 * (m.pow(2) + lv.exp() - lv - 1.0)).sum(-1) if want_kl else None
    return z, kl


def _reference_backward(mu, logvar, eps, grad_z, grad_kl):
    """The gradients autograd computes for the textbook formulas, in autograd's operation order
    (so the CPU path matches plain torch to the last bit in the usual range), with the
    overflow-safe product where exp(logvar / 2) overflows."""
    acc = _kl_dtype(mu.dtype)
    m, lv = mu.to(acc), logvar.to(acc)
    gmu = glv = None
    if grad_z is not None:
        gz, e = grad_z.to(acc), eps.to(acc)
        half_lv = 0.5 * lv
        gmu, glv = gz, ((gz * e) * torch.exp(half_lv)) * 0.5
        glv = torch.where(half_lv > 80.0, 0.5 * gz * _std_times_eps(half_lv, e), glv)  # no host sync
    if grad_kl is not None:
        g = (grad_kl.to(acc).unsqueeze(-1) * 0.5).expand_as(m)
        gmu_kl, glv_kl = g * (2.0 * m), g * torch.exp(lv) + (-g)
        gmu = gmu_kl if gmu is None else gmu + gmu_kl
        glv = glv_kl if glv is None else glv + glv_kl
    if gmu is None:
        gmu, glv = torch.zeros_like(m), torch.zeros_like(lv)
    gmu = gmu.to(mu.dtype)
    return (gmu.clone() if gmu is grad_z else gmu), glv.to(logvar.dtype)  # an op's output must not alias an input


# --- implementation shared by the three forward ops --------------------------------------

def _forward(mu: Tensor, logvar: Tensor, eps: Tensor | None, want_z: bool, want_kl: bool):
    _check(mu, logvar, eps)
    if mu.numel() == 0:
        return (mu.new_empty(mu.shape) if want_z else None,
                mu.new_zeros(mu.shape[:-1], dtype=_kl_dtype(mu.dtype)) if want_kl else None)
    if not use_triton(mu, dtypes=KERNEL_FLOAT_DTYPES) and use_native(mu, dtypes=NATIVE_FLOAT_DTYPES):
        if want_z and want_kl:
            return native.ops().gaussian_sample_kl(mu, logvar, eps)
        if want_z:
            return native.ops().reparameterize(mu, logvar, eps), None
        return None, native.ops().gaussian_kl(mu, logvar)
    if not use_triton(mu, dtypes=KERNEL_FLOAT_DTYPES):
        z, kl = _reference_forward(mu, logvar, eps, want_z, want_kl)
        return (z.contiguous() if want_z else None), (kl.contiguous() if want_kl else None)
    z = mu.new_empty(mu.shape) if want_z else None
    kl = mu.new_empty(mu.shape[:-1], dtype=torch.float32) if want_kl else None
    kernels("gaussian").gaussian_forward(
        _as_rows(mu), _as_rows(logvar), _as_rows(eps),
        None if z is None else z.view(-1, mu.shape[-1]), None if kl is None else kl.view(-1),
    )
    return z, kl


@torch.library.custom_op("fastfvae::gaussian_sample_kl", mutates_args=())
def _gaussian_sample_kl(mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    return _forward(mu, logvar, eps, True, True)


@torch.library.custom_op("fastfvae::reparameterize", mutates_args=())
def _reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    return _forward(mu, logvar, eps, True, False)[0]


@torch.library.custom_op("fastfvae::gaussian_kl", mutates_args=())
def _gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    return _forward(mu, logvar, None, False, True)[1]


@torch.library.custom_op("fastfvae::gaussian_backward", mutates_args=())
def _gaussian_backward(
    mu: Tensor, logvar: Tensor, eps: Tensor | None, grad_z: Tensor | None, grad_kl: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(grad_mu, grad_logvar) of z and/or kl; grad_z needs eps; either gradient may be None."""
    _check(mu, logvar, eps)
    if not use_triton(mu, dtypes=KERNEL_FLOAT_DTYPES) and use_native(mu, dtypes=NATIVE_FLOAT_DTYPES):
        return native.ops().gaussian_backward(mu, logvar, eps, grad_z, grad_kl)
    if mu.numel() == 0 or not use_triton(mu, dtypes=KERNEL_FLOAT_DTYPES):
        gmu, glv = _reference_backward(mu, logvar, eps, grad_z, grad_kl)
        return gmu.contiguous(), glv.contiguous()
    gmu, glv = mu.new_empty(mu.shape), mu.new_empty(mu.shape)
    gkl = None if grad_kl is None else grad_kl.contiguous().view(-1)
    kernels("gaussian").gaussian_backward(
        _as_rows(mu), _as_rows(logvar), _as_rows(eps), _as_rows(grad_z), gkl,
        gmu.view(-1, mu.shape[-1]), glv.view(-1, mu.shape[-1]),
    )
    return gmu, glv


@_gaussian_sample_kl.register_fake
def _(mu, logvar, eps):
    _check(mu, logvar, eps)
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape[:-1], dtype=_kl_dtype(mu.dtype))


@_reparameterize.register_fake
def _(mu, logvar, eps):
    _check(mu, logvar, eps)
    return mu.new_empty(mu.shape)


@_gaussian_kl.register_fake
def _(mu, logvar):
    _check(mu, logvar)
    return mu.new_empty(mu.shape[:-1], dtype=_kl_dtype(mu.dtype))


@_gaussian_backward.register_fake
def _(mu, logvar, eps, grad_z, grad_kl):
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape)


# --- autograd ------------------------------------------------------------------------------

def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grads(ctx, grad_z, grad_kl):
    mu, logvar, *rest = ctx.saved_tensors
    eps = rest[0] if rest else None
    gmu, glv = _gaussian_backward(mu, logvar, eps, grad_z, grad_kl)
    if eps is None:
        return gmu, glv
    geps = None
    if ctx.needs_input_grad[2] and grad_z is not None:
        geps = (grad_z.to(_kl_dtype(mu.dtype)) * torch.exp(0.5 * logvar.to(_kl_dtype(mu.dtype)))).to(eps.dtype)
    return gmu, glv, geps


_gaussian_sample_kl.register_autograd(lambda ctx, gz, gkl: _grads(ctx, gz, gkl), setup_context=_save_inputs)
_reparameterize.register_autograd(lambda ctx, gz: _grads(ctx, gz, None), setup_context=_save_inputs)
_gaussian_kl.register_autograd(lambda ctx, gkl: _grads(ctx, None, gkl), setup_context=_save_inputs)


def gaussian_sample_kl(mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """``(mu + exp(logvar/2) * eps, per-sample KL to N(0, I))`` in one kernel; see the module doc."""
    return _gaussian_sample_kl(mu, logvar, eps)


def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """``mu + exp(logvar / 2) * eps``, overflow-safe; see the module doc."""
    return _reparameterize(mu, logvar, eps)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the last dimension, float32; see the module doc."""
    return _gaussian_kl(mu, logvar)
