// permute_dims on CPU tensors, with the semantics of fastfvae/ops/permute.py:
// out = src.gather(0, keys.argsort(0, stable=True)), and the inverse scatter for the backward.
#pragma once

#include <ATen/ATen.h>

namespace fastfvae_native {

at::Tensor permute_dims(const at::Tensor& z, const at::Tensor& keys);
at::Tensor permute_dims_backward(const at::Tensor& grad, const at::Tensor& keys);

}  // namespace fastfvae_native
