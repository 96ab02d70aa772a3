// The VAE's 4x4 stride-2 padding-1 transposed convolution (the decoder's inner layers' forward,
// and the encoder's strided convolutions' input gradient, which is the same sum) on CPU tensors.
//
//   out[b, 2i + rh, 2j + rw, co] = bias[co] + sum_{ci, (di, dj)} x[b, i + di, j + dj, ci] w[ci, co, kh, kw]
//
// split into its four output phases (rh, rw), each a 2x2-tap convolution: per phase a GEMM of
// the phase's pixels (M) by the output channels (N, in the vector lanes) over 4 taps x the input
// channels (K, two at a time with vdpbf16ps). x is [B, Cin, H, W] (read channels_last), w
// [Cin, Cout, 4, 4] (a ConvTranspose2d weight, or a Conv2d weight [Cout', Cin', 4, 4] for that
// convolution's input gradient); the result is [B, Cout, 2H, 2W] channels_last in x's dtype,
// ReLU after the bias when asked. w and bias may have any floating dtype: the bias is converted
// to float32, the weights to bfloat16 for the vdpbf16ps variant (fastfvae.ops.native_conv passes
// them already in x's dtype) and to float32 for the others; the sums run in float32 and round
// to the output's dtype once (bfloat16: to nearest even). With vdpbf16ps (bfloat16 input on
// AVX-512-BF16, an even Cin) a subnormal product or partial sum is flushed to zero, and so is a
// result below 2^-126 in magnitude when rounded to bfloat16: all-1e-20 bfloat16 inputs give 0
// (products of 1e-40) where the float64 sums are 8e-40. The fused ReLU keeps a NaN, as torch's relu.
#pragma once

#include <ATen/ATen.h>

namespace fastfvae_native {

at::Tensor conv_transpose_4s2(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              bool relu);

}  // namespace fastfvae_native
