"""Diagonal-Gaussian reparameterised sample and KL to N(0, I), fused, forward and backward.

Inputs are viewed as [R, D] (D = the last dimension, R = the rest); per row:

    z  = mu + exp(logvar / 2) * eps
    kl = 0.5 * sum_d (mu^2 + exp(logvar) - 1 - logvar)

computed in float32 whatever the input type (float16/bfloat16/float32). Numerics:
``exp(lv) - 1 - lv`` is evaluated by a Taylor polynomial for |lv| < 0.5 (no cancellation
near 0) and ``std * eps`` as ``exp(lv/2 + log|eps|)`` once lv/2 > 80, so a product that is
finite in float32 is not lost to an overflowing ``exp(lv/2)`` (and eps = 0 gives exactly mu).
``kl`` overflows to +inf only where it exceeds the float32 range (lv > ~88.7 in one entry).

One program owns BLOCK_R rows and walks D in BLOCK_D chunks; each kernel is one launch.
"""

import os

import triton
import triton.language as tl

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _expm1_minus_x(x):
    """exp(x) - 1 - x, accurate near 0: x^2/2! + ... + x^8/8! (Horner) for |x| < 0.5."""
    p = x * (1.0 / 40320) + 1.0 / 5040
    p = p * x + 1.0 / 720
    p = p * x + 1.0 / 120
    p = p * x + 1.0 / 24
    p = p * x + 1.0 / 6
    p = p * x + 0.5
    return tl.where(tl.abs(x) < 0.5, x * x * p, tl.exp(x) - 1.0 - x)


@triton.jit
def _expm1(x):
    """exp(x) - 1, accurate near 0."""
    return _expm1_minus_x(x) + x


@triton.jit
def _std_times_eps(half_lv, eps):
    """exp(half_lv) * eps without overflowing exp where the product is finite."""
    big = half_lv > 80.0
    mag = tl.where(big & (eps != 0.0), tl.abs(eps), 1.0)
    huge = tl.exp(tl.where(big, half_lv, 0.0) + tl.log(mag))
    huge = tl.where(eps < 0.0, -huge, tl.where(eps == 0.0, 0.0, huge))
    return tl.where(big, huge, tl.exp(tl.where(big, 0.0, half_lv)) * eps)


@triton.jit
def _load_mu_logvar_tile(mu_ptr, lv_ptr, rows, d0, R, D, BLOCK_D: tl.constexpr):
    """The [rows, d0:d0+BLOCK_D] tile of row-major [R, D] mu and logvar, in fp32, with its mask."""
    cols = d0 + tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < R) & (cols[None, :] < D)
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lv = tl.load(lv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return mask, offs, mu, lv


@triton.jit
def _gaussian_fwd_kernel(
    mu_ptr, lv_ptr, eps_ptr, z_ptr, kl_ptr, R, D,
    WRITE_Z: tl.constexpr, WRITE_KL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kl = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask, offs, mu, lv = _load_mu_logvar_tile(mu_ptr, lv_ptr, rows, d0, R, D, BLOCK_D)
        if WRITE_Z:
            eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            z = mu + _std_times_eps(0.5 * lv, eps)
            tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)
        if WRITE_KL:
            kl += tl.sum(tl.where(mask, mu * mu + _expm1_minus_x(lv), 0.0), axis=1)
    if WRITE_KL:
        tl.store(kl_ptr + rows, (0.5 * kl).to(kl_ptr.dtype.element_ty), mask=rows < R)


@triton.jit
def _gaussian_bwd_kernel(
    mu_ptr, lv_ptr, eps_ptr, gz_ptr, gkl_ptr, gmu_ptr, glv_ptr, R, D,
    HAS_GZ: tl.constexpr, HAS_GKL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if HAS_GKL:
        gkl = tl.load(gkl_ptr + rows, mask=rows < R, other=0.0).to(tl.float32)[:, None]
    for d0 in range(0, D, BLOCK_D):
        mask, offs, mu, lv = _load_mu_logvar_tile(mu_ptr, lv_ptr, rows, d0, R, D, BLOCK_D)
        gmu = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        glv = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        if HAS_GZ:
            eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            gz = tl.load(gz_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            gmu += gz
            glv += 0.5 * gz * _std_times_eps(0.5 * lv, eps)
        if HAS_GKL:
            gmu += gkl * mu
            glv += 0.5 * gkl * _expm1(lv)
        tl.store(gmu_ptr + offs, gmu.to(gmu_ptr.dtype.element_ty), mask=mask)
        tl.store(glv_ptr + offs, glv.to(glv_ptr.dtype.element_ty), mask=mask)


def _blocks(D: int):
    block_d = min(triton.next_power_of_2(max(D, 1)), 64)
    block_r = max(1, (8192 if _INTERPRETING else 1024) // block_d)
    return block_r, block_d


def gaussian_forward(mu, logvar, eps, z, kl) -> None:
    """Fill ``z`` (if not None) and/or ``kl`` (if not None) from contiguous [R, D] inputs."""
    R, D = mu.shape
    block_r, block_d = _blocks(D)
    _gaussian_fwd_kernel[(triton.cdiv(R, block_r),)](
        mu, logvar, eps if eps is not None else mu, z if z is not None else mu,
        kl if kl is not None else mu, R, D,
        WRITE_Z=z is not None, WRITE_KL=kl is not None, BLOCK_R=block_r, BLOCK_D=block_d,
    )


def gaussian_backward(mu, logvar, eps, grad_z, grad_kl, grad_mu, grad_logvar) -> None:
    """Fill ``grad_mu``, ``grad_logvar`` [R, D] from the output gradients (either may be None)."""
    R, D = mu.shape
    block_r, block_d = _blocks(D)
    has_gz = grad_z is not None
    _gaussian_bwd_kernel[(triton.cdiv(R, block_r),)](
        mu, logvar, eps if has_gz else mu, grad_z if has_gz else mu,
        grad_kl if grad_kl is not None else mu, grad_mu, grad_logvar, R, D,
        HAS_GZ=has_gz, HAS_GKL=grad_kl is not None, BLOCK_R=block_r, BLOCK_D=block_d,
    )
