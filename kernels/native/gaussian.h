// Gaussian ops on CPU tensors, with the semantics of fastfvae/ops/gaussian.py.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace fastfvae_native {

std::tuple<at::Tensor, at::Tensor> gaussian_sample_kl(const at::Tensor& mu, const at::Tensor& logvar,
                                                      const at::Tensor& eps);
at::Tensor reparameterize(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& eps);
at::Tensor gaussian_kl(const at::Tensor& mu, const at::Tensor& logvar);
std::tuple<at::Tensor, at::Tensor> gaussian_backward(const at::Tensor& mu, const at::Tensor& logvar,
                                                     const c10::optional<at::Tensor>& eps,
                                                     const c10::optional<at::Tensor>& grad_z,
                                                     const c10::optional<at::Tensor>& grad_kl);

}  // namespace fastfvae_native
