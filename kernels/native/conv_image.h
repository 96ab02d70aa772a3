// The VAE's one-channel image-side convolutions on CPU tensors (float32 / bfloat16).
//
// Both layers have a 4x4 kernel, stride 2, padding 1 and one image channel:
//   encoder's first layer  Conv2d(1, C):           h[q, c] = b[c] + sum_k img[2q - 1 + k] w[c, k]
//   decoder's last layer   ConvTranspose2d(C, 1):  img[2q - 1 + k] += h[q, c] w[c, k]   (+ b)
// (q a block (i, j) of the H x W grid, k = (kh, kw), img the 2H x 2W image), so three kernels
// cover every pass the training step runs:
//   image_conv            the first layer's forward (+ bias, ReLU) and the last layer's input gradient
//   image_conv_transpose  the last layer's forward
//   image_conv_weight_grad  both layers' weight gradients: dw[c, k] = sum_q img[2q - 1 + k] h[q, c]
// oneDNN runs these one-channel shapes at a fraction of its GEMM speed (one output channel, or
// a 4-channel space-to-depth form, leaves most of each vector empty); these kernels put the
// channels (image_conv, weight grad) or 16 image blocks (transpose) in the vector lanes.
//
// The image is [B, 1, 2H, 2W] (s2d false) or its space-to-depth form [B, 4, H, W] (s2d true,
// channel 2 rh + rw = pixel (2i + rh, 2j + rw)), any strides; h is [B, C, H, W] (read
// channels_last; other layouts are copied). Weights [C, 1, 4, 4], any floating dtype, are
// converted to float32: the scalar and AVX-512 variants multiply by those values, the
// AVX-512-BF16 variants (bfloat16 input, vdpbf16ps) round them to bfloat16 first
// (fastfvae.ops.native_conv passes weights already rounded to the input's dtype, so every
// variant multiplies by the same values). The sums run in float32 and the result is rounded
// once to the input's dtype; bias, any floating dtype, is converted to float32.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace fastfvae_native {

// [B, C, H, W] channels_last, img's dtype; relu: max(0, .) after the bias.
at::Tensor image_conv(const at::Tensor& img, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      bool relu, bool s2d);
// [B, 1, 2H, 2W] contiguous, or [B, 4, H, W] channels_last with s2d; h's dtype; bias: one element.
at::Tensor image_conv_transpose(const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                bool s2d);
// [C, 1, 4, 4] float32.
at::Tensor image_conv_weight_grad(const at::Tensor& img, const at::Tensor& h, bool s2d);
// The variant these kernels run: avx512_bf16, avx512 or scalar.
std::string conv_isa();

}  // namespace fastfvae_native
