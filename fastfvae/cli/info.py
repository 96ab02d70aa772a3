"""`fastfvae info`: which implementation each fused op runs on CPU and on CUDA, and why.

The rules are `fastfvae.ops.dispatch`'s (read at call time from the same environment
variables), so this prints what a call made now would run.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

DESCRIPTION = """\
One line per fused op (torch.ops.fastfvae.*): the implementation CPU tensors and CUDA tensors
run (native: the C++ library that `pip install` builds, or CMake by hand; triton: the Triton
kernels; reference: plain torch) and why: for native, which library file was loaded and where
it came from ($FASTFVAE_NATIVE_LIB, the source checkout's build/, or the one pip install put in
the package), or why none was (an install that skipped the build says what it lacked). Float
dtypes the kernels do not take (float64) always run the reference.
"""

#: The public ops, in the order they are listed.
OPS = (
    "permute_dims", "permute_dims_backward",
    "gaussian_sample_kl", "reparameterize", "gaussian_kl", "gaussian_backward",
    "linear_leaky_relu", "linear_leaky_relu_grad_input", "linear_leaky_relu_grad_weight",
)


def _flag(name: str) -> bool:
    import os

    return os.environ.get(name, "0") not in ("", "0")


def cpu_choice(op: str) -> tuple[str, str]:
    """(implementation, why) for CPU tensors."""
    from fastfvae.ops import native

    if _flag("FASTFVAE_TRITON_ON_CPU"):
        return "triton", "FASTFVAE_TRITON_ON_CPU=1: the Triton kernels under Triton's interpreter"
    if op not in native.NATIVE_OPS:
        return "reference", "no native implementation of this op yet"
    runs_native, why = native.status()
    if runs_native and op.startswith("linear_leaky_relu"):
        from fastfvae.ops.mlp import NATIVE_MLP_DTYPES

        names = ", ".join(str(d).removeprefix("torch.") for d in NATIVE_MLP_DTYPES)
        why += f"; for {names} (other dtypes run the reference: in bfloat16 it is faster for this op)"
    return ("native" if runs_native else "reference"), why


def cuda_choice(op: str) -> tuple[str, str]:
    """(implementation, why) for CUDA tensors."""
    here = "" if torch.cuda.is_available() else " (no CUDA device here)"
    if _flag("FASTFVAE_NO_TRITON"):
        return "reference", f"FASTFVAE_NO_TRITON=1{here}"
    if importlib.util.find_spec("triton") is None:
        return "triton", f"Triton is not installed: CUDA calls fail{here}"
    return "triton", f"the Triton kernels{here}"


def lines() -> list[str]:
    """The table `fastfvae info` prints: a header, then one line per op."""
    rows = [("op", "cpu", "cuda", "why")]
    for op in OPS:
        cpu, cpu_why = cpu_choice(op)
        cuda, cuda_why = cuda_choice(op)
        rows.append((op, cpu, cuda, f"cpu: {cpu_why}; cuda: {cuda_why}"))
    width = max(len(r[0]) for r in rows)
    return [f"{op:<{width}}  {cpu:<9}  {cuda:<9}  {why}" for op, cpu, cuda, why in rows]


def run(args) -> int:
    print("\n".join(lines()))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="which implementation each fused op runs (native, triton, reference)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=run)
