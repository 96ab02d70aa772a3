// Linear + LeakyReLU on CPU tensors (the semantics of fastfvae/ops/mlp.py) and the whole
// FactorVAE discriminator as one call per direction on weights packed once per update.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace fastfvae_native {

// torch.ops.fastfvae.linear_leaky_relu* for float32 / bfloat16 CPU tensors (slope 1.0: no activation).
at::Tensor linear_leaky_relu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             double slope);
at::Tensor linear_leaky_relu_grad_input(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& out,
                                        double slope);
std::tuple<at::Tensor, at::Tensor> linear_leaky_relu_grad_weight(const at::Tensor& grad, const at::Tensor& x,
                                                                 const at::Tensor& out, double slope);

// The discriminator: layer l maps widths[l] -> widths[l + 1], LeakyReLU(slope) after all but the last.
// (forward panels, input-gradient panels) of one float32 weight [N, K] in `dtype` (float32 / bfloat16).
std::tuple<at::Tensor, at::Tensor> mlp_pack_weight(const at::Tensor& weight, at::ScalarType dtype);
at::Tensor mlp_forward(const at::Tensor& x, at::TensorList packed, at::TensorList bias, at::IntArrayRef widths,
                       double slope, at::TensorList acts, int64_t start);
// `signals` (one [rows, padded(widths[l + 1])] buffer per layer, or none): where the backward
// keeps each layer's d(loss)/d(pre-activation) of its rows, for a later mlp_update to reuse.
at::Tensor mlp_backward(const at::Tensor& grad, at::TensorList packed_t, at::TensorList acts, at::IntArrayRef widths,
                        double slope, int64_t start, bool input_grad, at::TensorList grad_w, at::TensorList grad_b,
                        at::TensorList signals);
// mlp_backward's parameter gradients of rows 0:n fed straight into Adam (mlp_adam's update), layer by layer.
// With `shared` > 0, rows 0:shared reuse the signals an earlier mlp_backward kept for them (same
// weights, same activations) times `scale[r]` per row: their upstream gradient is scale[r] times
// the one that backward was given, so every layer's signal is too (the backward is linear in it),
// and only rows shared:n go through the input-gradient GEMMs.
void mlp_update(const at::Tensor& grad, at::TensorList packed_t, at::TensorList acts, at::IntArrayRef widths,
                double slope, at::TensorList weight, at::TensorList bias, at::TensorList exp_avg_w,
                at::TensorList exp_avg_sq_w, at::TensorList exp_avg_b, at::TensorList exp_avg_sq_b,
                at::TensorList packed, double step_size, double bias_correction2_sqrt, double one_minus_beta1,
                double beta2, double one_minus_beta2, double eps, at::TensorList signals, int64_t shared,
                const c10::optional<at::Tensor>& scale);
void mlp_adam(at::TensorList weight, at::TensorList bias, at::TensorList exp_avg_w, at::TensorList exp_avg_sq_w,
              at::TensorList exp_avg_b, at::TensorList exp_avg_sq_b, at::TensorList grad_w, at::TensorList grad_b,
              at::TensorList packed, at::TensorList packed_t, double step_size, double bias_correction2_sqrt,
              double one_minus_beta1, double beta2, double one_minus_beta2, double eps);
std::string mlp_isa();

}  // namespace fastfvae_native
