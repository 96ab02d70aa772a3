"""The Bernoulli reconstruction loss on the native library (kernels/native/bernoulli.cpp).

``recon_loss(logits, x)`` is `fastfvae.objectives.recon_loss` for a batch [B, C, H, W] --
``binary_cross_entropy_with_logits(logits, x, reduction="sum") / B`` -- in one native pass
(``bernoulli_nll_sum``: torch's per-element formula in float32 on logits as they are, float32 or
bfloat16, the block partials added in float64), and its backward in one more
(``bernoulli_nll_grad``: ``(sigmoid(l) - x) * grad / B``, written in logits' dtype and layout).
In the bf16 fast step it replaces six torch ops: the logits' cast to float32, the loss, and in
the backward sigmoid, sub, the scalar multiply and the cast back to bfloat16 (docs/ops.md, "The
reconstruction loss: bernoulli_nll").

`fits` says whether it takes a pair of tensors: CPU, logits float32/bfloat16 [B, C, H, W]
(channels_last or contiguous) and x float32 (or logits' dtype) of the same sizes and strides;
the library loaded with the op (an older build lacks it and keeps the torch ops), not
``FASTFVAE_NO_NATIVE=1``, the AVX-512 variant; and float32 logits only with
`FUSED_BERNOULLI_FP32`.
"""

from __future__ import annotations

import torch

from fastfvae.ops import native

#: the library's calls for this loss (a library built before them lacks them: `available`)
CALLS = ("bernoulli_nll_sum", "bernoulli_nll_grad", "bernoulli_isa")
DTYPES = (torch.float32, torch.bfloat16)

#: the fused loss in the bf16 by-hand step (on the AVX-512 variant): one pass each way instead of
#: the cast + BCE-with-logits forward and sigmoid, sub, mul, cast backward (docs/ops.md)
FUSED_BERNOULLI_IN_STEP = True
#: the same for float32 logits in the step: off. fp32 is the parity precision, whose losses keep
#: torch's own summation order (the native sum's blocks and float64 total are another order, and
#: its exp / log other last bits), so the fp32 step's loss stays torch's BCE-with-logits
FUSED_BERNOULLI_FP32 = False


def available() -> bool:
    """The library is active (loaded, not disabled) with these calls and runs their AVX-512
    variant (the scalar loop is kept for correctness, not measured faster than torch's ops)."""
    return native.active() and native.has(*CALLS) and isa() == "avx512"


def isa() -> str:
    """The variant the loss and its gradient run: avx512 or scalar (call only when loaded)."""
    return native.query("bernoulli_isa")


def takes_logits(logits: torch.Tensor) -> bool:
    """The fused loss would take these logits (the step's decoder output, before x is at hand):
    a [B, C, H, W] CPU tensor of a dtype the step fuses, contiguous or channels_last (the op takes
    any dense layout; these are the step's), the op available."""
    if not (FUSED_BERNOULLI_IN_STEP and logits.dtype in DTYPES and logits.device.type == "cpu" and logits.dim() == 4
            and (logits.is_contiguous(memory_format=torch.channels_last) or logits.is_contiguous())):
        return False
    if logits.dtype == torch.float32 and not FUSED_BERNOULLI_FP32:
        return False
    return available()


def fits(logits: torch.Tensor, x: torch.Tensor) -> bool:
    """`recon_loss` takes this pair: `takes_logits`, and x a CPU float32 (or logits' dtype)
    tensor of logits' sizes and strides (`same_layout`) that needs no gradient (the observations)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, logits.dtype) and x.shape == logits.shape
            and same_layout(logits, x) and not x.requires_grad and takes_logits(logits))


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same strides but for dimensions of size 1 (whose stride addresses nothing: the fp32
    step's [B, 1, 64, 64] logits are channels_last, its images contiguous, one memory layout)."""
    return all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


class _BernoulliNLL(torch.autograd.Function):
    """sum(BCE-with-logits) / B as one node: its backward writes the logits' gradient directly."""

    @staticmethod
    def forward(ctx, logits, x):
        ctx.save_for_backward(logits, x)
        return native.ops().bernoulli_nll_sum(logits, x) / x.shape[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        logits, x = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        scale = grad / x.shape[0]  # the division's backward, in float32 as torch's
        if scale.device.type != "cpu":  # a CPU-only op: read the scalar only where that is free
            return ((torch.sigmoid(logits.float()) - x) * scale).to(logits.dtype), None
        return native.ops().bernoulli_nll_grad(logits, x, scale.item()), None


def recon_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`fastfvae.objectives.recon_loss` for a [B, C, H, W] batch on the native library (when `fits`)."""
    return _BernoulliNLL.apply(logits, x)
