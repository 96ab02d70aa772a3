"""Arithmetic precision of the fast step: ``fp32`` (the default and the parity mode) or ``bf16``.

``bf16``: convolutions and GEMMs run in bfloat16 (CPU: oneDNN with AVX-512 BF16 / AMX; GPU:
tensor cores), weights, optimiser state and the loss reductions stay float32 (the logits are
cast back to float32 before the losses). The autograd fast step uses ``torch.autocast``; the
by-hand CPU step (`fastfvae.fast.conv`, `fastfvae.fast.disc_by_hand`) casts explicitly, to
the same effect. Each autocast region
is closed before the parameters it cast are updated, so no stale bfloat16 weight copy from
autocast's cache is ever used.

Tolerances (``PARITY_RTOL``) are what the parity tests assert against the reference loop.
"""

from __future__ import annotations

import contextlib

import torch

from fastfvae.errors import FastFVAEError
from fastfvae.train.config import PRECISIONS

#: Relative tolerance of the fast step against the reference loop after 50 steps, per precision
#: (losses and parameters; docs/fast-path.md, "Parity", says why).
PARITY_RTOL = {"fp32": 1e-4, "bf16": 5e-2}


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise FastFVAEError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return name


def autocast(precision: str, device: torch.device):
    """The autocast context of ``precision`` on ``device`` (a null context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
