// The weight gradient of the VAE's inner 4x4 stride-2 padding-1 layers (the encoder's
// Conv2d(Cin, Cout, 4, 2, 1) and the decoder's ConvTranspose2d(Cin, Cout, 4, 2, 1)) on CPU
// tensors, one sum for both kinds:
//
//   dw[cs, cb, kh, kw] = sum_{b, i, j} small[b, cs, i, j] big[b, cb, 2i + kh - 1, 2j + kw - 1]
//
// (big read as zero outside its 2H x 2W grid), with big [B, Cb, 2H, 2W] and small [B, Cs, H, W]:
//   Conv2d:           big = the layer's input x, small = the output's gradient; dw [Cout, Cin, 4, 4]
//   ConvTranspose2d:  big = the output's gradient, small = the layer's input;  dw [Cin, Cout, 4, 4]
// i.e. dw has the layer's weight layout in both cases. Per tap (kh, kw) it is a GEMM of
// small^T [Cs x P] by a shifted, stride-2 view of big [P x Cb] over the P = B H W pixels.
//
// big and small are float32 or bfloat16 (the same dtype; read channels_last, other layouts are
// copied); the products accumulate in float32, and dw [Cs, Cb, 4, 4] is channels_last (the
// layout of the fast step's weights) in `dtype`: float32 (the default) or bfloat16 (the float32
// sums rounded once, as oneDNN's bf16 weight gradient). With vdpbf16ps (bfloat16 inputs on
// AVX-512-BF16) a subnormal product or partial sum is flushed to zero: all-1e-20 bfloat16 inputs
// (products of 1e-40) give 0 where the float64 sums are of order 1e-39. The threads split the
// outputs (taps x channel blocks), never the pixels: every element is summed in one order, so the
// result has the same bits on any thread count.
#pragma once

#include <ATen/ATen.h>

namespace fastfvae_native {

at::Tensor conv_4s2_weight_grad(const at::Tensor& big, const at::Tensor& small, c10::optional<at::ScalarType> dtype);
// The shape, layout and dtype of its result, for fake tensors (Meta).
at::Tensor conv_4s2_weight_grad_meta(const at::Tensor& big, const at::Tensor& small,
                                     c10::optional<at::ScalarType> dtype);

// parallel_probe.h's probe of conv_s2_wgrad.cpp.
int64_t parallel_probe_conv_s2_wgrad(int64_t n);

}  // namespace fastfvae_native
