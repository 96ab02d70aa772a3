"""The VAE's forward with a cheaper convolution backward (the fast step on CPU).

`encode` / `decode` run `models.Encoder` / `models.Decoder` layer by layer from their own
parameters (no copy, same arithmetic as the modules' forward) with changes that matter on
CPU (oneDNN); their per-layer timings are in docs/fast-path.md:

- `conv_split` — convolution whose backward computes the bias gradient as a plain sum
  instead of inside oneDNN's weight-gradient primitive. For the transposed convolutions that
  fused bias gradient is the slow part of the backward; the gradients are the same up to
  summation order.
- ``dtype``: the layers run in that dtype (bf16 for ``--precision bf16``) with the weights
  cast inside the graph (gradients reach the fp32 parameters).
- ``s2d``: the one-channel image-side layers in space-to-depth form (`first_conv_s2d`,
  `last_deconv_s2d`), where oneDNN's one-channel kernels are slow.
- native image-side layers: with the native library loaded (`fastfvae.ops.native_conv.enabled`)
  the first and last layers run on its kernels instead, in the space-to-depth form (bf16 step)
  or on the plain image (fp32 too while `NATIVE_PLAIN_FP32`), several times faster than oneDNN
  there (docs/ops.md, "Native convolutions"), on the CPUs where they measured faster
  (`native_conv.IMAGE_ISAS`); otherwise the oneDNN path below.

A ReLU after a convolution is part of it: on CPU one oneDNN primitive with a ReLU post-op
(``mkldnn._convolution_pointwise``) for the forward convolutions, the mask applied in the
convolution's backward; other ReLUs run in place (no linear backward needs its output).
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from torch import nn

from fastfvae.models.vae import FEATURE_SHAPE, Decoder, Encoder
from fastfvae.ops import native_conv

#: the image-side layers on the plain image (no space-to-depth) on the native kernels in float32
#: too (3-8x oneDNN per pass, docs/ops.md)
NATIVE_PLAIN_FP32 = True

#: the switches that route the float32 step's convolutions to the native kernels (their AVX-512
#: variants; each on, `native_fp32_convolutions` sets them all): (module, flag name);
#: `fastfvae.fast.conv` itself stands for this module
FP32_NATIVE_ROUTES = (("fastfvae.fast.conv", "NATIVE_PLAIN_FP32"), ("fastfvae.ops.native_conv", "S2_FP32"),
                      ("fastfvae.ops.native_conv", "S2_DGRAD_FP32"), ("fastfvae.ops.native_conv", "S2_FWD_FP32"),
                      ("fastfvae.ops.native_conv", "S2_WGRAD_FP32"),
                      ("fastfvae.ops.native_conv", "FUSED_RELU_BIAS_FP32"))


def fp32_routes() -> dict:
    """The `FP32_NATIVE_ROUTES` flags as they are now: {(module name, flag name): on}, which
    `native_fp32_convolutions` takes back."""
    return {(mod, name): getattr(sys.modules[mod], name) for mod, name in FP32_NATIVE_ROUTES}


@contextlib.contextmanager
def native_fp32_convolutions(on: bool | dict = True):
    """Within the block, every convolution of the float32 fast step that has a native kernel runs
    on it (``on``, the default state: `FP32_NATIVE_ROUTES`, as the bf16 step does), or none does
    (``on=False``: oneDNN's kernels, the reference loop's, for an A/B or a run in the reference's
    summation order), or each route as a `fp32_routes` mapping says; restored on exit. The routes
    make the fp32 step 1.19-1.27x faster (1 and 2 threads). Their summation order is another fp32
    rounding of the same sums, so a ReLU input within round-off of zero can land on the other
    side; in adversarial runs that parts the trajectories within 50 steps, while each step stays
    the reference loop's step within the fp32 tolerance (docs/fast-path.md, "Native convolutions
    in the fp32 step")."""
    saved = fp32_routes()
    try:
        for mod, name in FP32_NATIVE_ROUTES:
            setattr(sys.modules[mod], name, on[(mod, name)] if isinstance(on, dict) else on)
        yield
    finally:
        for (mod, name), value in saved.items():
            setattr(sys.modules[mod], name, value)

_aten = torch.ops.aten


def _mkldnn_fusable(x: torch.Tensor) -> bool:
    # oneDNN's fused primitive takes float32/bfloat16 only (float64 raises): the rest falls back
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available())


class _ConvSplitBackward(torch.autograd.Function):
    """``aten.convolution`` (stride s, padding p, transposed or not), optionally followed by a
    ReLU, with a split backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, transposed, relu):
        # the bias arrives in its own dtype (float32) so the backward can return a float32 sum
        bias = None if bias is None else bias.to(x.dtype)
        if transposed and native_conv.s2_fits(x, weight, stride, padding):
            # the 4-phase native kernel, the ReLU fused (docs/ops.md, "Native convolutions")
            out = native_conv.conv_transpose_4s2(x, weight, bias, relu)
        elif not transposed and native_conv.s2_fwd_fits(x, weight, stride, padding):
            # the native strided convolution, the ReLU fused (docs/ops.md, "Native convolutions")
            out = native_conv.conv_4s2(x, weight, bias, relu)
        elif relu and not transposed and _mkldnn_fusable(x):
            # one oneDNN primitive with a ReLU post-op: no second pass over the output
            out = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, [1, 1], 1, "relu", [], "")
        else:
            out = _aten.convolution(x, weight, bias, stride, padding, [1, 1], transposed, [0, 0], 1)
            if relu:
                out = out.relu_()
        ctx.save_for_backward(x, weight, out if relu else None)
        ctx.conf = (stride, padding, transposed, bias is not None, relu)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        stride, padding, transposed, has_bias, relu = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if relu and native_conv.relu_bias_fits(grad, out):
            # the mask and the float32 bias gradient in one pass (docs/ops.md, "Native convolutions")
            grad, grad_b = native_conv.relu_grad_bias(grad, out, has_bias and need_b)
        elif relu:
            grad = _aten.threshold_backward(grad, out, 0)
        if (need_x and not transposed and x.shape[-1] <= native_conv.DGRAD_MAX_WIDTH
                and list(x.shape[-2:]) == [2 * n for n in grad.shape[-2:]]
                and native_conv.s2_fits(grad, weight, stride, padding, dgrad=True)):
            # a 4x4 stride-2 convolution's input gradient is the transposed convolution of grad
            grad_x, need_x = native_conv.conv_transpose_4s2(grad, weight, None, False), False
        elif (need_x and transposed and list(grad.shape[-2:]) == [2 * n for n in x.shape[-2:]]
              and native_conv.s2_fwd_fits(grad, weight, stride, padding)):
            # a 4x4 stride-2 transposed convolution's input gradient is the strided convolution
            # of grad with its weight read as a Conv2d weight [Cin, Cout, 4, 4]
            grad_x, need_x = native_conv.conv_4s2(grad, weight, None, False), False
        big, small = (grad, x) if transposed else (x, grad)
        if need_w and native_conv.s2_wgrad_fits(big, small, weight, stride, padding):
            # both kinds of 4x4 stride-2 layer: one native sum (docs/ops.md, "Native convolutions"),
            # in the weight's dtype, channels_last, as oneDNN returns it
            grad_w, need_w = native_conv.conv_4s2_weight_grad(big, small, weight.dtype), False
        if (need_x or need_w) and _narrowing(weight, stride, padding, transposed):
            gx, gw = _narrowing_backward(grad, x, weight, padding, need_x, need_w)
            grad_x = gx if need_x else grad_x
            grad_w = gw if need_w else grad_w
        elif need_x or need_w:
            gx, gw, _ = _aten.convolution_backward(
                grad, x, weight, None, stride, padding, [1, 1], transposed, [0, 0], 1,
                [need_x, need_w, False])
            grad_x = gx if need_x else grad_x
            grad_w = gw if need_w else grad_w
        if has_bias and need_b and grad_b is None:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None


def _narrowing(weight, stride, padding, transposed: bool) -> bool:
    """A stride-1 convolution to fewer channels than it reads (the decoder's last layer in
    space-to-depth form, 32 -> 4): oneDNN's backward kernels are slow there."""
    k = weight.shape[2:]
    return (not transposed and list(stride) == [1, 1] and weight.shape[0] < weight.shape[1]
            and all(0 <= p <= kk - 1 for p, kk in zip(padding, k)))


def _narrowing_backward(grad, x, weight, padding, need_x: bool, need_w: bool):
    """(grad_x, grad_w) of a `_narrowing` convolution through the *widening* convolution with
    the transposed, flipped kernel (padding k - 1 - p), for which oneDNN has fast kernels.
    Same sums, in another order."""
    flipped = weight.flip(2, 3).transpose(0, 1).contiguous(memory_format=torch.channels_last)
    swapped = [kk - 1 - p for p, kk in zip(padding, weight.shape[2:])]
    grad_x = grad_w = None
    if need_x:  # the input gradient of a stride-1 conv is the flipped-kernel conv of grad
        grad_x = _aten.convolution(grad, flipped, None, [1, 1], swapped, [1, 1], False, [0, 0], 1)
    if need_w:  # the swapped conv's weight gradient (input grad, output grad x), flipped back
        grad_w = _aten.convolution_backward(x, grad, flipped, None, [1, 1], swapped, [1, 1], False, [0, 0], 1,
                                            [False, True, False])[1]
        grad_w = grad_w.flip(2, 3).transpose(0, 1)
    return grad_x, grad_w


def conv_split(x, weight, bias, stride, padding, transposed: bool, dtype: torch.dtype,
               relu: bool = False) -> torch.Tensor:
    """``aten.convolution`` (+ ReLU) in ``dtype`` with the split backward (module docstring);
    the bias is cast to ``dtype`` inside, so its gradient can come back in float32."""
    return _ConvSplitBackward.apply(x.to(dtype), weight.to(dtype), bias, list(stride), list(padding), transposed,
                                    relu)


def layer_split(x: torch.Tensor, layer: nn.Conv2d | nn.ConvTranspose2d, dtype: torch.dtype,
                relu: bool = False) -> torch.Tensor:
    """``layer(x)`` (then a ReLU) through `conv_split`."""
    transposed = isinstance(layer, nn.ConvTranspose2d)
    if layer.dilation != (1, 1) or layer.groups != 1 or isinstance(layer.padding, str) or (
            layer.padding_mode != "zeros") or (transposed and layer.output_padding != (0, 0)):
        raise ValueError("conv_split supports plain convolutions (no dilation, groups, output_padding, "
                         "string padding or padding_mode other than 'zeros')")
    return conv_split(x, layer.weight, layer.bias, layer.stride, layer.padding, transposed, dtype, relu)


# --- the image-side layers in space-to-depth layout ---------------------------------------
# A 64x64 one-channel image in space-to-depth layout is [B, 4, 32, 32] with channel 2*rh + rw
# holding pixel (2i + rh, 2j + rw). In it the encoder's first layer (conv 4x4, stride 2,
# padding 1, 1 -> C channels) is a 3x3 stride-1 convolution with 4 input channels, and the
# decoder's last layer (transposed conv 4x4, stride 2, padding 1, C -> 1) a 3x3 stride-1
# convolution with 4 output channels: the same sums (the extra taps are zeros), in a form
# oneDNN runs several times faster than the one-channel layers (docs/fast-path.md).

def _check_s2d_layer(layer, transposed: bool) -> None:
    one = layer.out_channels if transposed else layer.in_channels
    if (isinstance(layer, nn.ConvTranspose2d) != transposed or one != 1 or layer.kernel_size != (4, 4)
            or layer.stride != (2, 2) or layer.padding != (1, 1) or layer.groups != 1 or layer.dilation != (1, 1)
            or layer.padding_mode != "zeros" or (transposed and layer.output_padding != (0, 0))):
        kind = "ConvTranspose2d(C, 1" if transposed else "Conv2d(1, C"
        raise ValueError(f"space-to-depth form needs {kind}, 4, stride=2, padding=1), got {layer}")


def space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, 2H, 2W] -> [B, 4, H, W] (channels_last), channel 2*rh + rw = pixel (2i+rh, 2j+rw)."""
    b, _, h2, w2 = x.shape
    blocks = x.reshape(b, h2 // 2, 2, w2 // 2, 2).permute(0, 1, 3, 2, 4).reshape(b, h2 // 2, w2 // 2, 4)
    return blocks.permute(0, 3, 1, 2)


def depth_to_space(y: torch.Tensor) -> torch.Tensor:
    """The inverse of `space_to_depth`: [B, 4, H, W] -> [B, 1, 2H, 2W]."""
    b, _, h, w = y.shape
    return y.permute(0, 2, 3, 1).reshape(b, h, w, 2, 2).permute(0, 1, 3, 2, 4).reshape(b, 1, 2 * h, 2 * w)


def first_conv_s2d(x_s2d: torch.Tensor, layer: nn.Conv2d, dtype: torch.dtype, relu: bool = False) -> torch.Tensor:
    """``layer(depth_to_space(x_s2d))`` (then a ReLU) as a 3x3 convolution of the space-to-depth input."""
    _check_s2d_layer(layer, transposed=False)
    if native_conv.fits(layer, x_s2d, False, dtype):
        return native_conv.first_conv(x_s2d, layer, dtype, relu, s2d=True)
    c = layer.out_channels
    # kernel tap (a, c') of block offset a - 1, sub-pixel rh: original tap kh = 2a + rh - 1
    taps = F.pad(layer.weight[:, 0], (1, 1, 1, 1)).view(c, 3, 2, 3, 2)      # [C, a, rh, c', rw]
    kernel = taps.permute(0, 2, 4, 1, 3).reshape(c, 4, 3, 3)
    return conv_split(x_s2d, kernel.contiguous(memory_format=torch.channels_last), layer.bias, (1, 1), (1, 1),
                      False, dtype, relu)


def last_deconv_s2d(h: torch.Tensor, layer: nn.ConvTranspose2d, dtype: torch.dtype) -> torch.Tensor:
    """``space_to_depth(layer(h))`` as a 3x3 convolution with 4 output channels."""
    _check_s2d_layer(layer, transposed=True)
    if native_conv.fits(layer, h, True, dtype):
        return native_conv.last_deconv(h, layer, dtype, s2d=True)
    c = layer.in_channels
    # output sub-pixel rh of block i takes input i + a - 1 through original tap kh = 3 + rh - 2a
    taps = F.pad(layer.weight[:, 0], (1, 1, 1, 1)).flip(1, 2).view(c, 3, 2, 3, 2).flip(2, 4)  # [C, a, rh, c', rw]
    kernel = taps.permute(2, 4, 0, 1, 3).reshape(4, c, 3, 3)
    bias = None if layer.bias is None else layer.bias.expand(4)
    return conv_split(h, kernel.contiguous(memory_format=torch.channels_last), bias, (1, 1), (1, 1), False, dtype)


def run_layers(layers, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Convolutions, linears, ReLUs and Flatten (an iterable of modules), computed in ``dtype``."""
    layers = list(layers)
    fused = False  # the previous convolution applied this ReLU
    for i, layer in enumerate(layers):
        if fused:
            fused = False
            continue
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            fused = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
            h = layer_split(h, layer, dtype, relu=fused)
        elif isinstance(layer, nn.Linear):
            bias = None if layer.bias is None else layer.bias.to(dtype)
            h = F.linear(h.to(dtype), layer.weight.to(dtype), bias)
        elif isinstance(layer, nn.ReLU):
            h = h.relu_()
        elif isinstance(layer, nn.Flatten):
            h = h.flatten(layer.start_dim, layer.end_dim)
        else:
            raise TypeError(f"run_layers does not know {type(layer).__name__}")
    return h


def encode(encoder: Encoder, x: torch.Tensor, dtype: torch.dtype = torch.float32, s2d: bool = False):
    """`Encoder.forward` by layers: (mu, logvar), float32. ``s2d``: x is `space_to_depth` of the
    images and the first layer runs as `first_conv_s2d`."""
    layers = list(encoder.net)
    relu = len(layers) > 1 and isinstance(layers[1], nn.ReLU)
    if s2d:
        x, layers = first_conv_s2d(x, layers[0], dtype, relu), layers[1 + relu:]
    elif _native_plain(layers[0], x, False, dtype):
        x, layers = native_conv.first_conv(x, layers[0], dtype, relu), layers[1 + relu:]
    stats = run_layers(layers, x, dtype).float()
    return stats[:, :encoder.z_dim], stats[:, encoder.z_dim:]


def decode(decoder: Decoder, z: torch.Tensor, dtype: torch.dtype = torch.float32, s2d: bool = False) -> torch.Tensor:
    """`Decoder.forward` by layers: logits [B, 1, 64, 64] in ``dtype``; ``s2d``: their
    `space_to_depth` [B, 4, 32, 32], the last layer running as `last_deconv_s2d`."""
    features = run_layers(decoder.fc, z, dtype).view(-1, *FEATURE_SHAPE)
    layers = list(decoder.deconv)
    if s2d:
        return last_deconv_s2d(run_layers(layers[:-1], features, dtype), layers[-1], dtype)
    if layers and _native_plain(layers[-1], features, True, dtype):
        return native_conv.last_deconv(run_layers(layers[:-1], features, dtype), layers[-1], dtype)
    return run_layers(layers, features, dtype)


def _native_plain(layer, x: torch.Tensor, transposed: bool, dtype: torch.dtype) -> bool:
    """The native kernels take this layer on the plain image in ``dtype`` (the first layer: a
    one-channel input of even height and width)."""
    image_ok = transposed or (x.dim() == 4 and x.shape[1] == 1 and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0)
    precision_ok = dtype == torch.bfloat16 or NATIVE_PLAIN_FP32
    return precision_ok and image_ok and native_conv.fits(layer, x, transposed, dtype)
