// The native CPU ops, in their own namespace (torch.ops.fastfvae_native.*); fastfvae/ops
// calls them from the CPU branch of the public torch.ops.fastfvae.* ops, which keep the
// autograd and fake-tensor registrations.
#include <torch/library.h>

#include "bernoulli.h"
#include "conv_image.h"
#include "conv_s2.h"
#include "conv_s2_fwd.h"
#include "conv_s2_wgrad.h"
#include "cpu_isa.h"
#include "gaussian.h"
#include "mlp.h"
#include "parallel_probe.h"
#include "permute.h"
#include "relu_bias.h"

namespace {

std::string active_isa_name() { return fastfvae_native::isa_name(fastfvae_native::active_isa()); }

// The threads an at::parallel_for(0, n) compiled in `source` runs on (parallel_probe.h).
int64_t parallel_threads(c10::string_view source, int64_t n) {
  using Probe = int64_t (*)(int64_t);
  static const std::pair<const char*, Probe> probes[] = {
      {"gaussian", &fastfvae_native::parallel_probe_gaussian},
      {"permute", &fastfvae_native::parallel_probe_permute},
      {"mlp", &fastfvae_native::parallel_probe_mlp},
      {"mlp_gemm", &fastfvae_native::parallel_probe_mlp_gemm},
      {"conv_image", &fastfvae_native::parallel_probe_conv_image},
      {"conv_s2", &fastfvae_native::parallel_probe_conv_s2},
      {"conv_s2_wgrad", &fastfvae_native::parallel_probe_conv_s2_wgrad},
      {"conv_s2_fwd", &fastfvae_native::parallel_probe_conv_s2_fwd},
      {"relu_bias", &fastfvae_native::parallel_probe_relu_bias},
      {"bernoulli", &fastfvae_native::parallel_probe_bernoulli},
  };
  for (const auto& [name, probe] : probes) {
    if (source == name) return probe(n);
  }
  TORCH_CHECK(false, "fastfvae_native parallel_threads: unknown source '", source,
              "'; expected gaussian, permute, mlp, mlp_gemm, conv_image, conv_s2, conv_s2_wgrad, conv_s2_fwd, relu_bias or bernoulli");
}

}  // namespace

TORCH_LIBRARY(fastfvae_native, m) {
  m.def("permute_dims(Tensor z, Tensor keys) -> Tensor");
  m.def("permute_dims_backward(Tensor grad, Tensor keys) -> Tensor");
  m.def("gaussian_sample_kl(Tensor mu, Tensor logvar, Tensor eps) -> (Tensor, Tensor)");
  m.def("reparameterize(Tensor mu, Tensor logvar, Tensor eps) -> Tensor");
  m.def("gaussian_kl(Tensor mu, Tensor logvar) -> Tensor");
  m.def("gaussian_backward(Tensor mu, Tensor logvar, Tensor? eps, Tensor? grad_z, Tensor? grad_kl) -> (Tensor, Tensor)");
  m.def("linear_leaky_relu(Tensor x, Tensor weight, Tensor? bias, float slope) -> Tensor");
  m.def("linear_leaky_relu_grad_input(Tensor grad, Tensor weight, Tensor out, float slope) -> Tensor");
  m.def("linear_leaky_relu_grad_weight(Tensor grad, Tensor x, Tensor out, float slope) -> (Tensor, Tensor)");
  // The discriminator on weights packed once per update (kernels/native/mlp.h).
  m.def("mlp_pack_weight(Tensor weight, ScalarType dtype) -> (Tensor, Tensor)");
  m.def("mlp_forward(Tensor x, Tensor[] packed, Tensor[] bias, int[] widths, float slope, Tensor(a!)[] acts, "
        "int start) -> Tensor");
  m.def("mlp_backward(Tensor grad, Tensor[] packed_t, Tensor[] acts, int[] widths, float slope, int start, "
        "bool input_grad, Tensor(a!)[] grad_w, Tensor(b!)[] grad_b, Tensor(c!)[] signals) -> Tensor");
  m.def("mlp_update(Tensor grad, Tensor(a!)[] packed_t, Tensor[] acts, int[] widths, float slope, "
        "Tensor(b!)[] weight, Tensor(c!)[] bias, Tensor(d!)[] exp_avg_w, Tensor(e!)[] exp_avg_sq_w, "
        "Tensor(f!)[] exp_avg_b, Tensor(g!)[] exp_avg_sq_b, Tensor(h!)[] packed, float step_size, "
        "float bias_correction2_sqrt, float one_minus_beta1, float beta2, float one_minus_beta2, float eps, "
        "Tensor(i!)[] signals, int shared, Tensor? scale) -> ()");
  m.def("mlp_adam(Tensor(a!)[] weight, Tensor(b!)[] bias, Tensor(c!)[] exp_avg_w, Tensor(d!)[] exp_avg_sq_w, "
        "Tensor(e!)[] exp_avg_b, Tensor(f!)[] exp_avg_sq_b, Tensor[] grad_w, Tensor[] grad_b, Tensor(g!)[] packed, "
        "Tensor(h!)[] packed_t, float step_size, float bias_correction2_sqrt, float one_minus_beta1, float beta2, "
        "float one_minus_beta2, float eps) -> ()");
  // The VAE's one-channel image-side convolutions (kernels/native/conv_image.h).
  m.def("image_conv(Tensor img, Tensor weight, Tensor? bias, bool relu, bool s2d) -> Tensor");
  m.def("image_conv_transpose(Tensor h, Tensor weight, Tensor? bias, bool s2d) -> Tensor");
  m.def("image_conv_weight_grad(Tensor img, Tensor h, bool s2d) -> Tensor");
  m.def("conv_isa() -> str", &fastfvae_native::conv_isa);
  // The 4x4 stride-2 transposed convolution (kernels/native/conv_s2.h).
  m.def("conv_transpose_4s2(Tensor x, Tensor weight, Tensor? bias, bool relu) -> Tensor");
  // The 4x4 stride-2 convolution (kernels/native/conv_s2_fwd.h).
  m.def("conv_4s2(Tensor x, Tensor weight, Tensor? bias, bool relu) -> Tensor");
  // The weight gradient of the 4x4 stride-2 layers (kernels/native/conv_s2_wgrad.h).
  m.def("conv_4s2_weight_grad(Tensor big, Tensor small, ScalarType? dtype=None) -> Tensor");
  // A ReLU convolution's backward prologue: the masked gradient and the float32 bias gradient
  // in one pass (kernels/native/relu_bias.h).
  m.def("relu_grad_bias(Tensor grad, Tensor out, bool need_bias) -> (Tensor, Tensor)");
  m.def("relu_grad_isa() -> str", &fastfvae_native::relu_grad_isa);
  // The Bernoulli reconstruction loss (BCE with logits, summed) and its gradient, one pass each
  // (kernels/native/bernoulli.h).
  m.def("bernoulli_nll_sum(Tensor logits, Tensor x) -> Tensor");
  m.def("bernoulli_nll_grad(Tensor logits, Tensor x, float scale) -> Tensor");
  m.def("bernoulli_isa() -> str", &fastfvae_native::bernoulli_isa);
  // The SIMD variant the hot loops run (avx512 / avx2 / scalar), for `fastfvae info`.
  m.def("isa() -> str", &active_isa_name);
  // The GEMM variant of the MLP ops (avx512_bf16 / avx512 / avx2 / scalar).
  m.def("mlp_isa() -> str", &fastfvae_native::mlp_isa);
  // How many threads each source's at::parallel_for runs on (1: compiled without OpenMP).
  m.def("parallel_threads(str source, int n) -> int", &parallel_threads);
}

TORCH_LIBRARY_IMPL(fastfvae_native, CPU, m) {
  m.impl("permute_dims", &fastfvae_native::permute_dims);
  m.impl("permute_dims_backward", &fastfvae_native::permute_dims_backward);
  m.impl("gaussian_sample_kl", &fastfvae_native::gaussian_sample_kl);
  m.impl("reparameterize", &fastfvae_native::reparameterize);
  m.impl("gaussian_kl", &fastfvae_native::gaussian_kl);
  m.impl("gaussian_backward", &fastfvae_native::gaussian_backward);
  m.impl("linear_leaky_relu", &fastfvae_native::linear_leaky_relu);
  m.impl("linear_leaky_relu_grad_input", &fastfvae_native::linear_leaky_relu_grad_input);
  m.impl("linear_leaky_relu_grad_weight", &fastfvae_native::linear_leaky_relu_grad_weight);
  m.impl("mlp_pack_weight", &fastfvae_native::mlp_pack_weight);
  m.impl("mlp_forward", &fastfvae_native::mlp_forward);
  m.impl("mlp_backward", &fastfvae_native::mlp_backward);
  m.impl("mlp_update", &fastfvae_native::mlp_update);
  m.impl("mlp_adam", &fastfvae_native::mlp_adam);
  m.impl("image_conv", &fastfvae_native::image_conv);
  m.impl("image_conv_transpose", &fastfvae_native::image_conv_transpose);
  m.impl("image_conv_weight_grad", &fastfvae_native::image_conv_weight_grad);
  m.impl("conv_transpose_4s2", &fastfvae_native::conv_transpose_4s2);
  m.impl("conv_4s2", &fastfvae_native::conv_4s2);
  m.impl("conv_4s2_weight_grad", &fastfvae_native::conv_4s2_weight_grad);
  m.impl("relu_grad_bias", &fastfvae_native::relu_grad_bias);
  m.impl("bernoulli_nll_sum", &fastfvae_native::bernoulli_nll_sum);
  m.impl("bernoulli_nll_grad", &fastfvae_native::bernoulli_nll_grad);
}

// Shapes for fake tensors (torch.compile, torch.library.opcheck) of the ops that have one here.
TORCH_LIBRARY_IMPL(fastfvae_native, Meta, m) {
  m.impl("conv_4s2_weight_grad", &fastfvae_native::conv_4s2_weight_grad_meta);
  m.impl("conv_4s2", &fastfvae_native::conv_4s2_meta);
  m.impl("relu_grad_bias", &fastfvae_native::relu_grad_bias_meta);
  m.impl("bernoulli_nll_sum", &fastfvae_native::bernoulli_nll_sum_meta);
  m.impl("bernoulli_nll_grad", &fastfvae_native::bernoulli_nll_grad_meta);
}
