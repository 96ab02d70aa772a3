// The VAE's 4x4 stride-2 padding-1 convolution (the encoder's inner layers' forward, and the
// decoder's transposed convolutions' input gradient, which is the same sum) on CPU tensors.
//
//   out[b, i, j, co] = bias[co] + sum_{ci, kh, kw} x[b, 2i + kh - 1, 2j + kw - 1, ci] w[co, ci, kh, kw]
//
// x is [B, Cin, Hin, Win] (read channels_last; out of the image is zero), w [Cout, Cin, 4, 4] (a
// Conv2d weight, or a ConvTranspose2d weight [Cin', Cout', 4, 4] for that layer's input
// gradient: w[co, ci] = W_t[co, ci]); the result is [B, Cout, Hin / 2, Win / 2] (floor, as
// torch's conv2d) channels_last in x's dtype, ReLU after the bias when asked. w and bias may
// have any floating dtype: the bias is converted to float32, the weights to bfloat16 for the
// vdpbf16ps variant and to float32 for the others; the sums run in float32 and round to the
// output's dtype once (bfloat16: to nearest even). With vdpbf16ps (bfloat16 input on
// AVX-512-BF16, an even Cin) subnormal products, partial sums and results flush to zero. The
// fused ReLU keeps a NaN, as torch's relu.
#pragma once

#include <ATen/ATen.h>

namespace fastfvae_native {

at::Tensor conv_4s2(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool relu);
// Its output's shape, dtype and layout (fake tensors: torch.compile, torch.library.opcheck).
at::Tensor conv_4s2_meta(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         bool relu);

// The threads an at::parallel_for compiled in conv_s2_fwd.cpp runs on (parallel_probe.h).
int64_t parallel_probe_conv_s2_fwd(int64_t n);

}  // namespace fastfvae_native
