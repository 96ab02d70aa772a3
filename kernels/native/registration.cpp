// The native CPU ops, in their own namespace (torch.ops.fastfvae_native.*); fastfvae/ops
// calls them from the CPU branch of the public torch.ops.fastfvae.* ops, which keep the
// autograd and fake-tensor registrations.
#include <torch/library.h>

#include "cpu_isa.h"
#include "gaussian.h"
#include "permute.h"

namespace {

std::string active_isa_name() { return fastfvae_native::isa_name(fastfvae_native::active_isa()); }

}  // namespace

TORCH_LIBRARY(fastfvae_native, m) {
  m.def("permute_dims(Tensor z, Tensor keys) -> Tensor");
  m.def("permute_dims_backward(Tensor grad, Tensor keys) -> Tensor");
  m.def("gaussian_sample_kl(Tensor mu, Tensor logvar, Tensor eps) -> (Tensor, Tensor)");
  m.def("reparameterize(Tensor mu, Tensor logvar, Tensor eps) -> Tensor");
  m.def("gaussian_kl(Tensor mu, Tensor logvar) -> Tensor");
  m.def("gaussian_backward(Tensor mu, Tensor logvar, Tensor? eps, Tensor? grad_z, Tensor? grad_kl) -> (Tensor, Tensor)");
  // The SIMD variant the hot loops run (avx512 / avx2 / scalar), for `fastfvae info`.
  m.def("isa() -> str", &active_isa_name);
}

TORCH_LIBRARY_IMPL(fastfvae_native, CPU, m) {
  m.impl("permute_dims", &fastfvae_native::permute_dims);
  m.impl("permute_dims_backward", &fastfvae_native::permute_dims_backward);
  m.impl("gaussian_sample_kl", &fastfvae_native::gaussian_sample_kl);
  m.impl("reparameterize", &fastfvae_native::reparameterize);
  m.impl("gaussian_kl", &fastfvae_native::gaussian_kl);
  m.impl("gaussian_backward", &fastfvae_native::gaussian_backward);
}
