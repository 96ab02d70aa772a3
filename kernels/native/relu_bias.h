// The backward prologue of a ReLU-fused convolution in one pass over channels_last tensors:
//
//   masked[b, c, h, w] = out[b, c, h, w] > 0 ? grad[b, c, h, w] : 0     (aten.threshold_backward(grad, out, 0))
//   bias[c]            = sum_{b, h, w} masked[b, c, h, w]                (float32)
//
// grad and out are [B, C, H, W] channels_last CPU tensors of one dtype (float32 or bfloat16);
// masked has grad's dtype and layout. The mask is threshold_backward's: an element passes
// unless out <= 0, so a NaN in out passes grad's value, and a masked element is +0 whatever
// grad holds (NaN included); passed elements keep their bits. The bias sum (need_bias) runs in
// float32 over fixed blocks of pixel rows, each block's channels in the vector lanes, and the
// block partials are added in block order in float64, rounded once: the same bits on any
// thread count and in every variant (AVX-512 or the scalar loop). Without need_bias the second
// result is an empty float32 tensor [0].
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace fastfvae_native {

std::tuple<at::Tensor, at::Tensor> relu_grad_bias(const at::Tensor& grad, const at::Tensor& out, bool need_bias);
std::tuple<at::Tensor, at::Tensor> relu_grad_bias_meta(const at::Tensor& grad, const at::Tensor& out, bool need_bias);
// The variant relu_grad_bias runs: avx512 or scalar.
std::string relu_grad_isa();
int64_t parallel_probe_relu_bias(int64_t n);

}  // namespace fastfvae_native
