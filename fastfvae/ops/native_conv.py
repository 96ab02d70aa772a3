"""The VAE's convolutions on the native library where it beats oneDNN (kernels/native/conv_*.cpp).

The encoder's first layer (``Conv2d(1, C, 4, 2, 1)``, + ReLU) and the decoder's last layer
(``ConvTranspose2d(C, 1, 4, 2, 1)``) are where oneDNN is slowest at this model's sizes: one
image channel (or the 4 channels of the space-to-depth form) leaves most of each vector of its
kernels empty. Three native kernels cover every pass of both layers:

* ``image_conv`` — the first layer's forward (bias, ReLU fused) and the last layer's input gradient;
* ``image_conv_transpose`` — the last layer's forward and the first layer's input gradient;
* ``image_conv_weight_grad`` — both layers' weight gradients (float32).

and one for the decoder's inner transposed convolutions (4x4, stride 2): ``conv_transpose_4s2``,
their forward (ReLU fused) and the encoder's strided convolutions' input gradient (the same
sum), where it measured faster than oneDNN (`s2_fits`): in the bf16 step with vdpbf16ps, in the
float32 step with AVX-512 FMA; ``conv_4s2``, the encoder's strided convolutions' forward and the
transposed convolutions' input gradient (`s2_fwd_fits`); and ``conv_4s2_weight_grad``, the
weight gradient of both kinds of inner 4x4 stride-2 layers (`s2_wgrad_fits`).
``relu_grad_bias`` is every ReLU-fused convolution's backward prologue (the masked gradient and
the float32 bias gradient in one pass, `relu_bias_fits`).

The image side is the plain [B, 1, 2H, 2W] image or its space-to-depth form [B, 4, H, W]
(`fastfvae.fast.conv.space_to_depth`, what the bf16 fast step feeds). The layers run in the
activations' dtype (float32 or bfloat16) with the weights rounded to it, float32 sums, as the
oneDNN path; the parameter gradients are float32. Measured ratios: docs/ops.md, "Native
convolutions"; `bench/bench_conv_native.py` measures them again.

`enabled` says whether `fastfvae.fast.conv` can take this path: the library loaded (with these
calls), not ``FASTFVAE_NO_NATIVE=1``, and not ``FASTFVAE_NATIVE_CONV=0`` (this path alone off,
to compare). The image-side layers then go native only on the variants measured faster than
oneDNN (`IMAGE_ISAS`: AVX-512, with or without vdpbf16ps), the strided kernels only where their
``*_fits`` say; `fastfvae.fast.conv.native_fp32_convolutions(False)` keeps the float32 step on
oneDNN.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from fastfvae.ops import native

CONV_ENV = "FASTFVAE_NATIVE_CONV"
DTYPES = (torch.float32, torch.bfloat16)


#: the library's convolution calls; a library built before them lacks them (`has_ops`)
CONV_OPS = ("image_conv", "image_conv_transpose", "image_conv_weight_grad", "conv_transpose_4s2",
            "conv_4s2_weight_grad", "conv_4s2", "conv_isa")


def has_ops() -> bool:
    """Whether the loaded library has every convolution call (an older build does not)."""
    return native.loaded() and native.has(*CONV_OPS)


def enabled() -> bool:
    """Whether the native convolutions can run (module doc)."""
    if os.environ.get(CONV_ENV, "1") in ("0", ""):
        return False
    return native.active() and has_ops()


def isa() -> str:
    """The variant the kernels run: avx512_bf16, avx512 or scalar."""
    return native.query("conv_isa") if enabled() else "not loaded"


#: the variants whose image-side kernels measured faster than oneDNN in fp32 and bf16
#: (docs/ops.md, "Native convolutions"); with the scalar loops oneDNN runs those layers
IMAGE_ISAS = ("avx512_bf16", "avx512")


def image_isa_fits() -> bool:
    """The image-side kernels run a variant that measured faster than oneDNN (`IMAGE_ISAS`)."""
    return isa() in IMAGE_ISAS


def fits(layer: nn.Module, x: torch.Tensor, transposed: bool, dtype: torch.dtype | None = None) -> bool:
    """``layer`` is the one-channel 4x4 stride-2 padding-1 layer these kernels compute, ``x`` a
    CPU float32/bfloat16 input they take, ``dtype`` (the dtype the layer runs in; default x's)
    one they run in, and the variant here one that beats oneDNN (`image_isa_fits`)."""
    kind = nn.ConvTranspose2d if transposed else nn.Conv2d
    dtype = x.dtype if dtype is None else dtype
    if (type(layer) is not kind or x.device.type != "cpu" or x.dtype not in DTYPES or dtype not in DTYPES
            or x.dim() != 4 or not image_isa_fits()):
        return False
    one = layer.out_channels if transposed else layer.in_channels
    return (one == 1 and layer.kernel_size == (4, 4) and layer.stride == (2, 2) and layer.padding == (1, 1)
            and layer.groups == 1 and layer.dilation == (1, 1) and layer.padding_mode == "zeros"
            and (not transposed or layer.output_padding == (0, 0)) and layer.weight.device.type == "cpu"
            and (layer.bias is None or layer.bias.device.type == "cpu"))


#: `conv_transpose_4s2` in the fast step (bf16 with vdpbf16ps): the decoder's transposed
#: convolutions (1.5-2.1x oneDNN's, 1.2-1.3x its forward convolution at the same FLOPs, 1 thread)
#: and the encoder's strided convolutions' input gradients (1.75-1.89x oneDNN's), docs/ops.md,
#: "Native convolutions"
S2_IN_STEP = True
#: `conv_transpose_4s2` for the float32 step's transposed convolutions (the AVX-512 FMA variant;
#: with the input gradients below the fp32 step 1.12x, docs/fast-path.md, "Native convolutions in
#: the fp32 step"); `fastfvae.fast.conv.native_fp32_convolutions(False)` turns every fp32 route off
S2_FP32 = True
#: ... and for the float32 step's strided input gradients (with `S2_FP32`)
S2_DGRAD_FP32 = True
#: the strided convolutions' input gradients go native up to this input width: the encoder's
#: (32, 16 and 8), where the kernel measured 1.75-1.89x oneDNN's backward-data kernel and the
#: bf16 step 1.02-1.03x faster than with the 32 x 32 one on oneDNN (2 threads); wider inputs
#: were not measured
DGRAD_MAX_WIDTH = 32


def s2_fits(x: torch.Tensor, weight: torch.Tensor, stride, padding, dgrad: bool = False) -> bool:
    """``conv_transpose_4s2`` computes this 4x4 stride-2 padding-1 transposed convolution of
    ``x`` where it measured faster than oneDNN: bfloat16 with vdpbf16ps, and float32 (AVX-512)
    for the transposed convolutions' forward (`S2_FP32`) and, with `S2_DGRAD_FP32`, a strided
    convolution's input gradient (``dgrad``)."""
    if not (x.device.type == "cpu" and weight.device.type == "cpu" and x.dim() == 4 and x.shape[1] % 2 == 0 and tuple(weight.shape[2:]) == (4, 4)
            and list(stride) == [2, 2] and list(padding) == [1, 1] and S2_IN_STEP and enabled()):
        return False
    return _s2_variant_fits(x.dtype, S2_FP32 and (not dgrad or S2_DGRAD_FP32))


#: the variants with the strided kernels' float32 code (AVX-512 FMA), which the fp32 routes need
FP32_S2_ISAS = ("avx512_bf16", "avx512")


def _s2_variant_fits(dtype: torch.dtype, fp32_routed: bool) -> bool:
    """The strided kernels' variant measured faster than oneDNN for ``dtype``: bfloat16 with
    vdpbf16ps; float32 (AVX-512 FMA) only where its route into the fp32 step is switched on."""
    if dtype == torch.bfloat16:
        return isa() == "avx512_bf16"
    return dtype == torch.float32 and fp32_routed and isa() in FP32_S2_ISAS


def conv_transpose_4s2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       relu: bool) -> torch.Tensor:
    """The 4x4 stride-2 padding-1 transposed convolution (+ bias, ReLU), [B, Cout, 2H, 2W] channels_last."""
    return native.ops().conv_transpose_4s2(x, weight, bias, relu)


#: `conv_4s2` in the bf16 step (vdpbf16ps): the encoder's strided convolutions' forward (ReLU
#: fused) and the decoder's transposed convolutions' input gradients (the same sum), where it
#: measured faster than oneDNN's forward primitive (docs/ops.md, "Native convolutions")
S2_FWD_IN_STEP = True
#: ... from this input width: the VAE's narrowest, 8 x 8 (64 -> 64, a 4 x 4 output), measured
#: 1.02-1.12x oneDNN too; narrower inputs were not measured
S2_FWD_MIN_WIDTH = 8
#: `conv_4s2` in the float32 step (AVX-512 FMA): 0.95x alone, a part of the 1.19-1.27x of all the
#: fp32 routes together, where the layers pass native tensors to each other (docs/fast-path.md,
#: "Native convolutions in the fp32 step")
S2_FWD_FP32 = True


def s2_fwd_fits(x: torch.Tensor, weight: torch.Tensor, stride, padding) -> bool:
    """``conv_4s2(x, weight)`` computes this 4x4 stride-2 padding-1 convolution where it measured
    faster than oneDNN: bfloat16 with vdpbf16ps, an even input channel count, inputs of at least
    `S2_FWD_MIN_WIDTH` columns; float32 (AVX-512) while `S2_FWD_FP32`."""
    return (x.dtype in DTYPES and x.device.type == "cpu" and weight.device.type == "cpu" and x.dim() == 4
            and weight.dim() == 4 and weight.shape[1] == x.shape[1] and x.shape[1] % 2 == 0
            and tuple(weight.shape[2:]) == (4, 4) and list(stride) == [2, 2] and list(padding) == [1, 1]
            and x.shape[-1] >= S2_FWD_MIN_WIDTH and x.shape[-2] >= 2 and S2_FWD_IN_STEP and enabled()
            and _s2_variant_fits(x.dtype, S2_FWD_FP32))


def conv_4s2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """The 4x4 stride-2 padding-1 convolution (+ bias, ReLU) of x [B, Cin, H, W] with weight
    [Cout, Cin, 4, 4]: [B, Cout, H // 2, W // 2] channels_last. With a ConvTranspose2d(Cout, Cin,
    4, 2, 1)'s weight it is that layer's input gradient (x: the output's gradient)."""
    return native.ops().conv_4s2(x, weight, bias, relu)


#: `conv_4s2_weight_grad` for the bf16 step's inner 4x4 stride-2 layers' weight gradients
#: (vdpbf16ps): 1.4-2.0x oneDNN's weight-gradient primitives at the VAE's six layers on 1
#: thread, 1.8-4.5x on 2, the bf16 step 1.04-1.05x / 1.075x (docs/ops.md, "Native convolutions")
S2_WGRAD_IN_STEP = True
#: `conv_4s2_weight_grad` in the float32 step (AVX-512 FMA), as `S2_FWD_FP32`
S2_WGRAD_FP32 = True


def s2_wgrad_fits(big: torch.Tensor, small: torch.Tensor, weight: torch.Tensor, stride, padding) -> bool:
    """``conv_4s2_weight_grad(big, small)`` is the weight gradient of this 4x4 stride-2
    padding-1 layer (big: a Conv2d's input or a ConvTranspose2d's output gradient, [B, Cb, 2H,
    2W]; small: the other operand, [B, Cs, H, W]) where it measured faster than oneDNN: bfloat16
    with vdpbf16ps; float32 (AVX-512) while `S2_WGRAD_FP32`."""
    return (big.dtype in DTYPES and small.dtype == big.dtype and big.device.type == "cpu"
            and small.device.type == "cpu" and big.dim() == 4 and small.dim() == 4
            and big.shape[0] == small.shape[0] and list(big.shape[2:]) == [2 * n for n in small.shape[2:]]
            and tuple(weight.shape[2:]) == (4, 4) and weight.dtype in DTYPES and list(stride) == [2, 2]
            and list(padding) == [1, 1] and S2_WGRAD_IN_STEP and enabled()
            and _s2_variant_fits(big.dtype, S2_WGRAD_FP32))


def conv_4s2_weight_grad(big: torch.Tensor, small: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """dw[cs, cb, kh, kw] = sum small[b, cs, i, j] big[b, cb, 2i + kh - 1, 2j + kw - 1]: the
    weight gradient [Cs, Cb, 4, 4] (channels_last; float32 sums, in ``dtype``: float32 by
    default, or bfloat16) of a Conv2d(Cb, Cs, 4, 2, 1) (big = its input, small = the output's
    gradient) or a ConvTranspose2d(Cs, Cb, 4, 2, 1) (big = the output's gradient, small = its input)."""
    return native.ops().conv_4s2_weight_grad(big, small, dtype)


#: `relu_grad_bias` (the ReLU mask and the float32 bias gradient in one pass) in the bf16 step's
#: ReLU-fused convolutions' backward and the native first layer's: 2.5-4.4x threshold_backward
#: (+ sum) per call in bf16 (cache-warm; 1.65x from memory), the bf16 step 1.013-1.038x on 1 and
#: 2 threads (per-round medians; the profiler: 1.2-1.4 ms a step against 2.9-3.3), docs/ops.md
FUSED_RELU_BIAS_IN_STEP = True
#: the same in the float32 step: 1.5-1.8x per call with a bias (the mask alone 0.96x); the only
#: native piece of an fp32 step it made it 1.00-1.045x faster over several runs on 1 and 2 threads
#: (docs/ops.md, docs/fast-path.md), and it is part of all the fp32 routes' 1.19-1.27x
FUSED_RELU_BIAS_FP32 = True


def relu_bias_fits(grad: torch.Tensor, out: torch.Tensor) -> bool:
    """``relu_grad_bias(grad, out)`` takes these tensors where it measured faster than
    ``threshold_backward`` + ``sum``: CPU float32/bfloat16 [B, C, H, W], both channels_last
    (other layouts keep the torch ops), on the AVX-512 variant."""
    if not (FUSED_RELU_BIAS_IN_STEP and grad.dtype in DTYPES and grad.dtype == out.dtype and grad.dim() == 4
            and grad.shape == out.shape and grad.device.type == "cpu" and out.device.type == "cpu"
            and grad.is_contiguous(memory_format=torch.channels_last)
            and out.is_contiguous(memory_format=torch.channels_last)):
        return False
    if grad.dtype == torch.float32 and not FUSED_RELU_BIAS_FP32:
        return False
    return enabled() and native.has("relu_grad_bias") and relu_grad_isa() == "avx512"


def relu_grad_isa() -> str:
    """The variant `relu_grad_bias` runs: avx512 or scalar."""
    return native.query("relu_grad_isa")


def relu_grad_bias(grad: torch.Tensor, out: torch.Tensor, need_bias: bool):
    """(``threshold_backward(grad, out, 0)``, its float32 sum over (0, 2, 3) or None) in one pass."""
    masked, bias = native.ops().relu_grad_bias(grad, out, need_bias)
    return masked, bias if need_bias else None


def _rounded(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.detach().to(dtype)


class _ImageConv(torch.autograd.Function):
    """The first layer: img -> relu?(conv(img, w) + b), [B, C, H, W] channels_last."""

    @staticmethod
    def forward(ctx, img, weight, bias, relu: bool, s2d: bool):
        ops = native.ops()
        w = _rounded(weight, img.dtype)
        out = ops.image_conv(img, w, _rounded(bias, img.dtype), relu, s2d)
        ctx.save_for_backward(img, w, out if relu else None)
        ctx.conf = (relu, s2d, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad):
        img, w, out = ctx.saved_tensors
        relu, s2d, has_bias = ctx.conf
        ops = native.ops()
        grad = grad.to(img.dtype)
        need_img, need_w, need_b = ctx.needs_input_grad[:3]
        grad_b = None
        if relu and relu_bias_fits(grad, out):
            grad, grad_b = relu_grad_bias(grad, out, has_bias and need_b)
        elif relu:
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
        grad_img = ops.image_conv_transpose(grad, w, None, s2d) if need_img else None
        grad_w = ops.image_conv_weight_grad(img, grad, s2d) if need_w else None
        if has_bias and need_b and grad_b is None:
            grad_b = grad.sum((0, 2, 3), dtype=torch.float32)
        return grad_img, grad_w, grad_b, None, None


class _ImageConvTranspose(torch.autograd.Function):
    """The last layer: h [B, C, H, W] -> the image [B, 1, 2H, 2W] (or its space-to-depth form)."""

    @staticmethod
    def forward(ctx, h, weight, bias, s2d: bool):
        ops = native.ops()
        w = _rounded(weight, h.dtype)
        h = h.contiguous(memory_format=torch.channels_last)
        out = ops.image_conv_transpose(h, w, _rounded(bias, h.dtype), s2d)
        ctx.save_for_backward(h, w)
        ctx.conf = (s2d, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, w = ctx.saved_tensors
        s2d, has_bias = ctx.conf
        ops = native.ops()
        grad = grad.to(h.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = ops.image_conv(grad, w, None, False, s2d) if need_h else None
        grad_w = ops.image_conv_weight_grad(grad, h, s2d) if need_w else None
        grad_b = grad.sum(dtype=torch.float32).reshape(1) if has_bias and need_b else None
        return grad_h, grad_w, grad_b, None


def first_conv(img: torch.Tensor, layer: nn.Conv2d, dtype: torch.dtype, relu: bool = False,
               s2d: bool = False) -> torch.Tensor:
    """``layer(img)`` (then a ReLU) in ``dtype``; ``s2d``: img is the space-to-depth form [B, 4, H, W]."""
    return _ImageConv.apply(img.to(dtype), layer.weight, layer.bias, relu, s2d)


def last_deconv(h: torch.Tensor, layer: nn.ConvTranspose2d, dtype: torch.dtype, s2d: bool = False) -> torch.Tensor:
    """``layer(h)`` in ``dtype``; ``s2d``: its space-to-depth form [B, 4, H, W] (channels_last)."""
    return _ImageConvTranspose.apply(h.to(dtype), layer.weight, layer.bias, s2d)
