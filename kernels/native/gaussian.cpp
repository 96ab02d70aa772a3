// Gaussian ops on CPU tensors: dtype conversion, row blocking and threading around the
// element formulas of gaussian_math.h (the float32 loops run in the active SIMD variant).
#include "gaussian.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <vector>

#include "gaussian_math.h"
#include "parallel_probe.h"

namespace fastfvae_native {
namespace {

// Blocks per task so a task holds at least this many elements (small batches stay on one thread).
constexpr int64_t kElementsPerTask = 32768;
// Elements per block converted to float32 at once (float16/bfloat16) or summed into KL rows.
constexpr int64_t kBlockElements = 4096;

void check_like(const at::Tensor& mu, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.sizes() == mu.sizes() && t.scalar_type() == mu.scalar_type() && t.device() == mu.device(),
              "fastfvae_native gaussian ops: ", name, " is ", t.sizes(), " ", t.scalar_type(), " on ", t.device(),
              "; expected mu's ", mu.sizes(), " ", mu.scalar_type(), " on ", mu.device());
}

void check_inputs(const at::Tensor& mu, const at::Tensor& logvar, const c10::optional<at::Tensor>& eps) {
  TORCH_CHECK(mu.dim() >= 1 && at::isFloatingType(mu.scalar_type()),
              "fastfvae_native gaussian ops: mu must be a float tensor [..., D], got ", mu.sizes(), " ",
              mu.scalar_type());
  TORCH_CHECK(mu.device().is_cpu(), "fastfvae_native gaussian ops: CPU tensors only, got ", mu.device());
  check_like(mu, logvar, "logvar");
  if (eps.has_value()) check_like(mu, *eps, "eps");
}

at::ScalarType kl_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<int64_t> row_shape(const at::Tensor& mu) {
  return std::vector<int64_t>(mu.sizes().begin(), mu.sizes().end() - 1);
}

// Rows [r0, r1) of D columns, in blocks of whole rows of about kBlockElements elements. The
// blocks are fixed (block b is rows b * block_rows ..), whatever the thread count: the SIMD
// loops run a block's last n % 16 (or n % 8) elements through the scalar formulas, whose exp
// may differ from libmvec's in the last bit, so the block boundaries must not move with the
// threads' share of the rows. Threads take whole blocks.
template <typename F>
void for_row_blocks(int64_t rows, int64_t D, F&& block) {
  const int64_t block_rows = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(D, 1));
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / (block_rows * std::max<int64_t>(D, 1)));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) block(b * block_rows, std::min(rows, (b + 1) * block_rows));
  });
}

// KL of each row from its D terms, summed in double and rounded once to the KL dtype.
template <typename acc_t>
void sum_rows(const acc_t* term, acc_t* kl, int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0.0;
    for (int64_t j = 0; j < D; ++j) s += static_cast<double>(term[r * D + j]);
    kl[r] = static_cast<acc_t>(s);
  }
}

// Contiguous input pointers, float32 copies for 16-bit inputs, and the block loop.
template <typename scalar_t>
void forward_typed(const at::Tensor& mu, const at::Tensor& lv, const at::Tensor* eps, at::Tensor* z,
                   at::Tensor* kl, int64_t rows, int64_t D) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const scalar_t* pm = mu.const_data_ptr<scalar_t>();
  const scalar_t* pl = lv.const_data_ptr<scalar_t>();
  const scalar_t* pe = eps != nullptr ? eps->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* pz = z != nullptr ? z->mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* pk = kl != nullptr ? kl->mutable_data_ptr<acc_t>() : nullptr;
  for_row_blocks(rows, D, [&](int64_t r0, int64_t r1) {
    const int64_t off = r0 * D, n = (r1 - r0) * D;
    std::vector<acc_t> term(pk != nullptr ? n : 0);
    acc_t* t = pk != nullptr ? term.data() : nullptr;
    if constexpr (std::is_same_v<scalar_t, float>) {
      forward_f32(pm + off, pl + off, pe != nullptr ? pe + off : nullptr, pz != nullptr ? pz + off : nullptr, t, n);
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      for (int64_t i = 0; i < n; ++i) {
        forward_one(pm[off + i], pl[off + i], pe != nullptr ? pe[off + i] : 0.0,
                    pz != nullptr ? pz + off + i : nullptr, t != nullptr ? t + i : nullptr);
      }
    } else {  // float16 / bfloat16: computed in float32
      std::vector<float> m(n), l(n), e(pe != nullptr ? n : 0), zf(pz != nullptr ? n : 0);
      for (int64_t i = 0; i < n; ++i) {
        m[i] = static_cast<float>(pm[off + i]);
        l[i] = static_cast<float>(pl[off + i]);
      }
      if (pe != nullptr) {
        for (int64_t i = 0; i < n; ++i) e[i] = static_cast<float>(pe[off + i]);
      }
      forward_f32(m.data(), l.data(), pe != nullptr ? e.data() : nullptr, pz != nullptr ? zf.data() : nullptr, t, n);
      if (pz != nullptr) {
        for (int64_t i = 0; i < n; ++i) pz[off + i] = static_cast<scalar_t>(zf[i]);
      }
    }
    if (pk != nullptr) sum_rows(t, pk + r0, r1 - r0, D);
  });
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& mu_in, const at::Tensor& lv_in,
                                           const c10::optional<at::Tensor>& eps_in, bool want_z, bool want_kl) {
  check_inputs(mu_in, lv_in, eps_in);
  TORCH_CHECK(!want_z || eps_in.has_value(), "fastfvae_native gaussian ops: the sample needs eps");
  const at::Tensor mu = mu_in.contiguous(), lv = lv_in.contiguous();
  const at::Tensor eps = want_z ? eps_in->contiguous() : at::Tensor();
  const int64_t D = mu.size(-1), rows = D == 0 ? 0 : mu.numel() / D;
  at::Tensor z = want_z ? at::empty(mu.sizes(), mu.options()) : at::Tensor();
  at::Tensor kl = want_kl ? at::zeros(row_shape(mu), mu.options().dtype(kl_dtype(mu.scalar_type()))) : at::Tensor();
  if (mu.numel() == 0) return {z, kl};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "fastfvae_native_gaussian_forward", [&] {
    forward_typed<scalar_t>(mu, lv, want_z ? &eps : nullptr, want_z ? &z : nullptr, want_kl ? &kl : nullptr, rows, D);
  });
  return {z, kl};
}

template <typename scalar_t>
void backward_typed(const at::Tensor& mu, const at::Tensor& lv, const at::Tensor* eps, const at::Tensor* gz,
                    const at::Tensor* gkl, at::Tensor& gmu, at::Tensor& glv, int64_t rows, int64_t D) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const scalar_t* pm = mu.const_data_ptr<scalar_t>();
  const scalar_t* pl = lv.const_data_ptr<scalar_t>();
  const scalar_t* pe = gz != nullptr ? eps->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* pg = gz != nullptr ? gz->const_data_ptr<scalar_t>() : nullptr;
  const acc_t* pk = gkl != nullptr ? gkl->const_data_ptr<acc_t>() : nullptr;
  scalar_t* pgm = gmu.mutable_data_ptr<scalar_t>();
  scalar_t* pgl = glv.mutable_data_ptr<scalar_t>();
  for_row_blocks(rows, D, [&](int64_t r0, int64_t r1) {
    const int64_t off = r0 * D, n = (r1 - r0) * D;
    // 0.5 * grad_kl of each element's row (the reference's g, expanded)
    std::vector<acc_t> gk(pk != nullptr ? n : 0);
    for (int64_t r = r0; pk != nullptr && r < r1; ++r) {
      std::fill(gk.begin() + (r - r0) * D, gk.begin() + (r - r0 + 1) * D, pk[r] * acc_t(0.5));
    }
    const acc_t* k = pk != nullptr ? gk.data() : nullptr;
    if constexpr (std::is_same_v<scalar_t, float>) {
      backward_f32(pm + off, pl + off, pe != nullptr ? pe + off : nullptr, pg != nullptr ? pg + off : nullptr, k,
                   pgm + off, pgl + off, n);
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      for (int64_t i = 0; i < n; ++i) {
        backward_one(pm[off + i], pl[off + i], pe != nullptr ? pe + off + i : nullptr,
                     pg != nullptr ? pg + off + i : nullptr, k != nullptr ? k + i : nullptr, pgm + off + i,
                     pgl + off + i);
      }
    } else {
      std::vector<float> m(n), l(n), e(pg != nullptr ? n : 0), g(pg != nullptr ? n : 0), gm(n), gl(n);
      for (int64_t i = 0; i < n; ++i) {
        m[i] = static_cast<float>(pm[off + i]);
        l[i] = static_cast<float>(pl[off + i]);
      }
      for (int64_t i = 0; pg != nullptr && i < n; ++i) {
        e[i] = static_cast<float>(pe[off + i]);
        g[i] = static_cast<float>(pg[off + i]);
      }
      backward_f32(m.data(), l.data(), pg != nullptr ? e.data() : nullptr, pg != nullptr ? g.data() : nullptr, k,
                   gm.data(), gl.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        pgm[off + i] = static_cast<scalar_t>(gm[i]);
        pgl[off + i] = static_cast<scalar_t>(gl[i]);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gaussian_sample_kl(const at::Tensor& mu, const at::Tensor& logvar,
                                                      const at::Tensor& eps) {
  return forward(mu, logvar, eps, true, true);
}

at::Tensor reparameterize(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& eps) {
  return std::get<0>(forward(mu, logvar, eps, true, false));
}

at::Tensor gaussian_kl(const at::Tensor& mu, const at::Tensor& logvar) {
  return std::get<1>(forward(mu, logvar, c10::nullopt, false, true));
}

std::tuple<at::Tensor, at::Tensor> gaussian_backward(const at::Tensor& mu_in, const at::Tensor& lv_in,
                                                     const c10::optional<at::Tensor>& eps_in,
                                                     const c10::optional<at::Tensor>& grad_z,
                                                     const c10::optional<at::Tensor>& grad_kl) {
  check_inputs(mu_in, lv_in, eps_in);
  TORCH_CHECK(!grad_z.has_value() || eps_in.has_value(), "fastfvae_native gaussian_backward: grad_z needs eps");
  const at::Tensor mu = mu_in.contiguous(), lv = lv_in.contiguous();
  at::Tensor gmu = at::empty(mu.sizes(), mu.options()), glv = at::empty(mu.sizes(), mu.options());
  if (mu.numel() == 0) return {gmu, glv};
  at::Tensor eps, gz, gkl;
  if (grad_z.has_value()) {
    TORCH_CHECK(grad_z->sizes() == mu.sizes(), "fastfvae_native gaussian_backward: grad_z is ", grad_z->sizes(),
                "; expected mu's ", mu.sizes());
    eps = eps_in->contiguous();
    gz = grad_z->to(mu.scalar_type()).contiguous();
  }
  if (grad_kl.has_value()) {
    TORCH_CHECK(grad_kl->sizes() == at::IntArrayRef(row_shape(mu)), "fastfvae_native gaussian_backward: grad_kl is ",
                grad_kl->sizes(), "; expected ", at::IntArrayRef(row_shape(mu)));
    gkl = grad_kl->to(kl_dtype(mu.scalar_type())).contiguous();
  }
  const int64_t D = mu.size(-1), rows = mu.numel() / D;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "fastfvae_native_gaussian_backward", [&] {
    backward_typed<scalar_t>(mu, lv, grad_z.has_value() ? &eps : nullptr, grad_z.has_value() ? &gz : nullptr,
                             grad_kl.has_value() ? &gkl : nullptr, gmu, glv, rows, D);
  });
  return {gmu, glv};
}

FASTFVAE_PARALLEL_PROBE(parallel_probe_gaussian)

}  // namespace fastfvae_native
