"""Arithmetic precision of the fast step: ``fp32`` (the default and the parity mode) or ``bf16``.

``bf16``: convolutions and GEMMs run in bfloat16 (CPU: oneDNN with AVX-512 BF16 / AMX; GPU:
tensor cores), weights, optimiser state and the loss reductions stay float32 (the logits are
cast back to float32 before the losses). The autograd fast step uses ``torch.autocast``; the
by-hand CPU step (`fastfvae.fast.conv`, `fastfvae.fast.disc_by_hand`) casts explicitly, to
the same effect. Each autocast region
is closed before the parameters it cast are updated, so no stale bfloat16 weight copy from
autocast's cache is ever used.

Not every CPU can run bf16 (`bf16_support`): oneDNN's bf16 convolutions need AVX-512
(BW/VL/DQ) or AVX-NE-CONVERT and refuse to run without them, and bf16 is only faster than fp32
where the CPU has bfloat16 dot products (AVX-512 BF16, AMX). `check_bf16_runs` turns the first
case into one line before any work; a preset's bf16 (the quickstart) gives way to fp32 on both
(`fastfvae.cli.train`).

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


#: `bf16_support` levels: bf16 on bfloat16 instructions / converted to fp32 inside oneDNN and
#: slower than fp32 / not runnable at all.
BF16_NATIVE, BF16_EMULATED, BF16_UNSUPPORTED = "native", "emulated", "unsupported"


def _cpu_isa() -> str:
    """The widest vector ISA torch dispatches to on this CPU, as a word ("AVX2", "AVX512")."""
    return torch.backends.cpu.get_cpu_capability()


def bf16_support(device: torch.device | str) -> tuple[str, str]:
    """(level, why) for bf16 arithmetic on ``device``: `BF16_NATIVE` where the hardware has
    bfloat16 dot products (CPU: AVX-512 BF16 or AMX; CUDA: compute capability 8.0+),
    `BF16_EMULATED` where it runs converted to fp32 (slower than fp32: a CPU with AVX-512 but no
    BF16, a pre-Ampere GPU), `BF16_UNSUPPORTED` where oneDNN refuses bf16 convolutions (a CPU
    without AVX-512 BW/VL/DQ or AVX-NE-CONVERT, e.g. AVX2 only). ``why`` names what was found."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return BF16_NATIVE, "this GPU has bf16 tensor cores"
        return BF16_EMULATED, "this GPU has no bf16 tensor cores (compute capability below 8.0)"
    if device.type != "cpu":
        return BF16_NATIVE, f"{device.type} device"
    if torch.cpu._is_amx_tile_supported():
        return BF16_NATIVE, "this CPU has AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return BF16_NATIVE, "this CPU has AVX-512 BF16"
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return BF16_EMULATED, f"this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX; it has {_cpu_isa()})"
    return BF16_UNSUPPORTED, (f"this CPU has {_cpu_isa()}, and oneDNN's bf16 convolutions need AVX-512 "
                              f"(BW/VL/DQ) or AVX-NE-CONVERT")


def check_bf16_runs(precision: str, device: torch.device | str, source: str = "--precision bf16",
                    fix: str = "use --precision fp32") -> None:
    """FastFVAEError (one line) if ``precision`` is bf16 and ``device`` cannot run it at all
    (`BF16_UNSUPPORTED`); ``source`` names where the bf16 came from and ``fix`` what to do
    instead, for the message."""
    if precision != "bf16":
        return
    level, why = bf16_support(device)
    if level == BF16_UNSUPPORTED:
        raise FastFVAEError(f"{source} cannot run on this machine: {why}; {fix}")


def autocast(precision: str, device: torch.device):
    """The autocast context of ``precision`` on ``device`` (a null context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
