"""Whether this CPU runs bf16 at all (`fastfvae.fast.precision.bf16_support`): on a CPU without
AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT, e.g. AVX2 only, oneDNN refuses bf16 convolutions and
fastfvae refuses ``--precision bf16``, so the tests that run the bf16 step or oneDNN's bf16
layers skip there, with the reason. The native kernels' own bf16 variants do not need oneDNN and
run everywhere."""

import pytest
import torch

from fastfvae.fast.precision import BF16_UNSUPPORTED, bf16_support

LEVEL, WHY = bf16_support("cpu")
#: oneDNN runs bf16 on this CPU (natively or emulated)
RUNS = LEVEL != BF16_UNSUPPORTED
needs_cpu_bf16 = pytest.mark.skipif(not RUNS, reason=f"bf16 cannot run on this CPU: {WHY}")


def bf16_param(*values, id: str | None = None):
    """A parametrize entry (default: ``torch.bfloat16``) that skips where bf16 cannot run."""
    return pytest.param(*(values or (torch.bfloat16,)), marks=needs_cpu_bf16, id=id)
