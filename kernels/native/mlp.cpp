// Linear + LeakyReLU and the discriminator on CPU tensors, over the GEMM of mlp_gemm.h.
//
// The public op (fastfvae::linear_leaky_relu and its two backward ops) packs the weight for
// each call, as any GEMM library must for a weight it sees once. The discriminator calls
// (mlp_forward / mlp_backward / mlp_adam) take weights already packed: `mlp_pack_weight` once
// when the weights are set, and `mlp_adam` rewrites both packed copies as it updates the
// float32 master weights, so a training step packs nothing.
//
// Per layer l (y = act(x W^T + b), W [N, K]):
//   forward   A = x [M, K]                   B = W^T, packed from W ("packed")
//   dgrad     A = g' [M, N] (g * act'(y))    B = W,   packed from W ("packed_t")
//   wgrad     A = g'^T [N, M]                B = x [M, K], packed per call
// with g' formed in the epilogue of the layer above (the LeakyReLU derivative from the sign
// of the layer's output, exact for slope >= 0) and the bias gradient summed while g' is
// transposed for the wgrad.
#include "mlp.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "mlp_gemm.h"
#include "parallel_probe.h"

namespace fastfvae_native {
namespace {

using mlp::Elem;

Elem elem_of(at::ScalarType t, const char* what) {
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16, "fastfvae_native ", what,
              ": float32 or bfloat16 tensors only, got ", t);
  return t == at::kFloat ? Elem::F32 : Elem::BF16;
}

mlp::Src src_of(Elem e) { return e == Elem::F32 ? mlp::Src::F32 : mlp::Src::BF16; }

// Row stride of a GEMM A operand of K columns: even for bfloat16 (read in pairs).
int64_t padded(int64_t K, Elem e) { return e == Elem::BF16 ? (K + 1) / 2 * 2 : K; }

inline float to_f32(const void* p, Elem e, int64_t i) {
  if (e == Elem::F32) return static_cast<const float*>(p)[i];
  uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline void store(void* p, Elem e, int64_t i, float v) {
  if (e == Elem::F32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<at::BFloat16*>(p)[i] = at::BFloat16(v);
  }
}

// x [M, K] as a contiguous A operand of type e with an even row stride in bfloat16 (zero pad).
at::Tensor as_operand(const at::Tensor& x, at::ScalarType dtype) {
  const int64_t M = x.size(0), K = x.size(1), Kp = padded(K, elem_of(dtype, "linear_leaky_relu"));
  if (Kp == K) return x.to(dtype).contiguous();
  at::Tensor out = at::zeros({M, Kp}, x.options().dtype(dtype));
  out.narrow(1, 0, K).copy_(x);
  return out;
}

at::Tensor pack(const at::Tensor& src, bool transposed, int64_t K, int64_t N, Elem e) {
  at::Tensor s = src.contiguous();
  at::Tensor out = at::empty({mlp::packed_numel(K, N, e)}, src.options().dtype(e == Elem::F32 ? at::kFloat : at::kBFloat16));
  mlp::pack_b(s.const_data_ptr(), s.scalar_type() == at::kFloat ? mlp::Src::F32 : mlp::Src::BF16, s.stride(0),
              transposed, K, N, e, out.mutable_data_ptr());
  return out;
}

inline float bits_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// One row of g' = g * act'(y): float32, or bfloat16 (g * slope rounded to bfloat16, as torch's
// bfloat16 leaky_relu_backward rounds it).
void gate_row(const float* g, const float* y, float* out, int64_t N, float slope) {
  for (int64_t n = 0; n < N; ++n) out[n] = y[n] > 0.0f ? g[n] : g[n] * slope;
}

// v rounded to nearest even bfloat16 bits, NaN to 0x7FC0 (c10::BFloat16's rounding),
// branch-free so loops over it vectorise.
inline uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return v != v ? uint16_t{0x7FC0} : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

void gate_row(const uint16_t* g, const uint16_t* y, uint16_t* out, int64_t N, float slope) {
  for (int64_t n = 0; n < N; ++n) {
    const uint16_t scaled = bf16_bits(bits_to_f32(g[n]) * slope);
    out[n] = (static_cast<int16_t>(y[n]) > 0 && (y[n] & 0x7FFF) <= 0x7F80) ? g[n] : scaled;
  }
}

// g' = g * act'(y) (slope 1.0: g), [M, N] in e, row stride padded(N).
at::Tensor gated(const at::Tensor& grad, const at::Tensor& out, double slope, Elem e) {
  const int64_t M = grad.size(0), N = grad.size(1), Np = padded(N, e);
  const at::ScalarType dtype = e == Elem::F32 ? at::kFloat : at::kBFloat16;
  at::Tensor g = grad.to(dtype).contiguous();
  if (slope == 1.0 && Np == N) return g;
  at::Tensor res = Np == N ? at::empty({M, Np}, g.options()) : at::zeros({M, Np}, g.options());
  if (slope == 1.0) {
    res.narrow(1, 0, N).copy_(g);
    return res;
  }
  at::Tensor y = out.to(dtype).contiguous();
  const float s = static_cast<float>(slope);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (e == Elem::F32) {
        gate_row(g.const_data_ptr<float>() + m * N, y.const_data_ptr<float>() + m * N,
                 res.mutable_data_ptr<float>() + m * Np, N, s);
      } else {
        gate_row(static_cast<const uint16_t*>(g.const_data_ptr()) + m * N,
                 static_cast<const uint16_t*>(y.const_data_ptr()) + m * N,
                 static_cast<uint16_t*>(res.mutable_data_ptr()) + m * Np, N, s);
      }
    }
  });
  return res;
}

// a [M, N] (row stride lda) transposed into o [N, Mp] for the columns [n0, n1), and their sums.
// Rows m < scaled are multiplied by row_scale[m] on the way (bfloat16: rounded once, as a
// bfloat16 product is); the sums are of the values stored.
template <typename T>
void transpose_columns(const T* a, int64_t lda, int64_t M, int64_t Mp, int64_t n0, int64_t n1, T* o, float* colsum,
                       const float* row_scale, int64_t scaled) {
  constexpr int64_t kCols = 16;
  for (int64_t nb = n0; nb < n1; nb += kCols) {
    const int64_t cols = std::min(n1, nb + kCols) - nb;
    float sums[kCols] = {};
    for (int64_t m = 0; m < M; ++m) {
      const T* row = a + m * lda + nb;
      if (m < scaled) {
        const float f = row_scale[m];
        T v[kCols];
        for (int64_t c = 0; c < cols; ++c) {  // the products first, in a loop that vectorises
          if constexpr (std::is_same_v<T, float>) {
            v[c] = row[c] * f;
          } else {
            v[c] = bf16_bits(bits_to_f32(row[c]) * f);
          }
        }
        for (int64_t c = 0; c < cols; ++c) {
          o[(nb + c) * Mp + m] = v[c];
          if constexpr (std::is_same_v<T, float>) {
            sums[c] += v[c];
          } else {
            sums[c] += bits_to_f32(v[c]);
          }
        }
        continue;
      }
      for (int64_t c = 0; c < cols; ++c) {
        o[(nb + c) * Mp + m] = row[c];
        if constexpr (std::is_same_v<T, float>) {
          sums[c] += row[c];
        } else {
          sums[c] += bits_to_f32(row[c]);
        }
      }
    }
    if (colsum != nullptr)
      for (int64_t c = 0; c < cols; ++c) colsum[nb + c] = sums[c];
  }
}

// a [M, N] (row stride lda, type e) transposed to [N, padded(M)] (zero pad), and the float32
// column sums of a (the bias gradient) into colsum when given; rows m < scaled times row_scale[m].
at::Tensor transpose_operand(const void* a, int64_t lda, int64_t M, int64_t N, Elem e, float* colsum,
                             const at::TensorOptions& opts, const float* row_scale = nullptr, int64_t scaled = 0) {
  const int64_t Mp = padded(M, e);
  at::Tensor out = Mp == M ? at::empty({N, Mp}, opts) : at::zeros({N, Mp}, opts);
  void* o = out.mutable_data_ptr();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    if (e == Elem::F32) {
      transpose_columns(static_cast<const float*>(a), lda, M, Mp, n0, n1, static_cast<float*>(o), colsum, row_scale,
                        scaled);
    } else {
      transpose_columns(static_cast<const uint16_t*>(a), lda, M, Mp, n0, n1, static_cast<uint16_t*>(o), colsum,
                        row_scale, scaled);
    }
  });
  return out;
}

void check_matrix(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.device().is_cpu(), "fastfvae_native ", op, ": ", name,
              " must be a 2-D CPU tensor, got ", t.sizes(), " on ", t.device());
}

}  // namespace

// --- the public op --------------------------------------------------------------------------

at::Tensor linear_leaky_relu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             double slope) {
  check_matrix(x, "linear_leaky_relu", "x");
  check_matrix(weight, "linear_leaky_relu", "weight");
  TORCH_CHECK(x.size(1) == weight.size(1), "fastfvae_native linear_leaky_relu: x ", x.sizes(), " and weight ",
              weight.sizes(), " do not match");
  const Elem e = elem_of(x.scalar_type(), "linear_leaky_relu");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  at::Tensor a = as_operand(x, x.scalar_type());
  at::Tensor b = pack(weight.to(x.scalar_type()), true, K, N, e);
  at::Tensor bias32;
  mlp::Epilogue epi;
  if (bias.has_value() && bias->defined()) {
    bias32 = bias->to(at::kFloat).contiguous();
    epi.bias = bias32.const_data_ptr<float>();
  }
  epi.out = out.mutable_data_ptr();
  epi.ldc = N;
  epi.out_elem = e;
  epi.act = slope != 1.0;
  epi.slope = static_cast<float>(slope);
  mlp::gemm(M, N, K, a.const_data_ptr(), a.stride(0), e, b.const_data_ptr(), epi);
  return out;
}

at::Tensor linear_leaky_relu_grad_input(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& out,
                                        double slope) {
  check_matrix(grad, "linear_leaky_relu_grad_input", "grad");
  check_matrix(weight, "linear_leaky_relu_grad_input", "weight");
  const Elem e = elem_of(grad.scalar_type(), "linear_leaky_relu_grad_input");
  const int64_t M = grad.size(0), N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(grad.size(1) == N && out.sizes() == grad.sizes(), "fastfvae_native linear_leaky_relu_grad_input: grad ",
              grad.sizes(), ", out ", out.sizes(), " and weight ", weight.sizes(), " do not match");
  at::Tensor gx = at::empty({M, K}, grad.options());
  if (M == 0 || K == 0) return gx;
  at::Tensor g = gated(grad, out, slope, e);
  at::Tensor b = pack(weight.to(grad.scalar_type()), false, N, K, e);
  mlp::Epilogue epi;
  epi.out = gx.mutable_data_ptr();
  epi.ldc = K;
  epi.out_elem = e;
  mlp::gemm(M, K, N, g.const_data_ptr(), g.stride(0), e, b.const_data_ptr(), epi);
  return gx;
}

std::tuple<at::Tensor, at::Tensor> linear_leaky_relu_grad_weight(const at::Tensor& grad, const at::Tensor& x,
                                                                 const at::Tensor& out, double slope) {
  check_matrix(grad, "linear_leaky_relu_grad_weight", "grad");
  check_matrix(x, "linear_leaky_relu_grad_weight", "x");
  const Elem e = elem_of(grad.scalar_type(), "linear_leaky_relu_grad_weight");
  const int64_t M = grad.size(0), N = grad.size(1), K = x.size(1);
  TORCH_CHECK(x.size(0) == M && out.sizes() == grad.sizes(), "fastfvae_native linear_leaky_relu_grad_weight: grad ",
              grad.sizes(), ", out ", out.sizes(), " and x ", x.sizes(), " do not match");
  at::Tensor gw = at::empty({N, K}, grad.options());
  at::Tensor gb32 = at::zeros({N}, grad.options().dtype(at::kFloat));
  if (N > 0 && M > 0) {
    at::Tensor g = gated(grad, out, slope, e);
    at::Tensor gt = transpose_operand(g.const_data_ptr(), g.stride(0), M, N, e, gb32.mutable_data_ptr<float>(),
                                      g.options());
    if (K > 0) {
      at::Tensor b = pack(x.to(grad.scalar_type()), false, M, K, e);
      mlp::Epilogue epi;
      epi.out = gw.mutable_data_ptr();
      epi.ldc = K;
      epi.out_elem = e;
      mlp::gemm(N, K, M, gt.const_data_ptr(), gt.stride(0), e, b.const_data_ptr(), epi);
    }
  } else {
    gw.zero_();
  }
  return {gw, gb32.to(grad.scalar_type())};
}

// --- the discriminator ------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> mlp_pack_weight(const at::Tensor& weight, at::ScalarType dtype) {
  check_matrix(weight, "mlp_pack_weight", "weight");
  const Elem e = elem_of(dtype, "mlp_pack_weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  return {pack(weight, true, K, N, e), pack(weight, false, N, K, e)};
}

namespace {

void check_net(at::TensorList acts, at::IntArrayRef widths, size_t layers, const char* op) {
  TORCH_CHECK(widths.size() == layers + 1 && acts.size() == layers, "fastfvae_native ", op, ": ", layers,
              " layers need ", layers + 1, " widths and ", layers, " activation buffers, got ", widths.size(), " and ",
              acts.size());
  const Elem e = elem_of(acts[0].scalar_type(), op);
  for (size_t l = 0; l < layers; ++l) {
    TORCH_CHECK(acts[l].dim() == 2 && acts[l].is_contiguous() && acts[l].size(1) == padded(widths[l], e) &&
                    acts[l].scalar_type() == acts[0].scalar_type(),
                "fastfvae_native ", op, ": activation buffer ", l, " must be contiguous [rows, ", padded(widths[l], e),
                "] of ", acts[0].scalar_type(), ", got ", acts[l].sizes());
  }
}

}  // namespace

at::Tensor mlp_forward(const at::Tensor& x, at::TensorList packed, at::TensorList bias, at::IntArrayRef widths,
                       double slope, at::TensorList acts, int64_t start) {
  const size_t L = packed.size();
  TORCH_CHECK(L >= 1 && bias.size() == L, "fastfvae_native mlp_forward: one packed weight and bias per layer");
  check_net(acts, widths, L, "mlp_forward");
  check_matrix(x, "mlp_forward", "x");
  const Elem e = elem_of(acts[0].scalar_type(), "mlp_forward");
  const int64_t n = x.size(0);
  TORCH_CHECK(x.size(1) == widths[0] && start >= 0 && start + n <= acts[0].size(0), "fastfvae_native mlp_forward: x ",
              x.sizes(), " does not fit rows ", start, ":", start + n, " of [", acts[0].size(0), ", ", widths[0], "]");
  acts[0].narrow(0, start, n).narrow(1, 0, widths[0]).copy_(x);
  at::Tensor logits = at::empty({n, widths[L]}, x.options().dtype(at::kFloat));
  for (size_t l = 0; l < L; ++l) {
    const int64_t K = widths[l], N = widths[l + 1];
    TORCH_CHECK(packed[l].numel() == mlp::packed_numel(K, N, e) && bias[l].numel() == N &&
                    bias[l].scalar_type() == at::kFloat && bias[l].is_contiguous(),
                "fastfvae_native mlp_forward: layer ", l, "'s packed weight or float32 bias does not match ", K, " -> ", N);
    mlp::Epilogue epi;
    epi.bias = bias[l].const_data_ptr<float>();
    epi.slope = static_cast<float>(slope);
    if (l + 1 < L) {
      epi.act = true;
      epi.out_elem = e;
      epi.ldc = acts[l + 1].stride(0);
      epi.out = static_cast<char*>(acts[l + 1].mutable_data_ptr()) + start * epi.ldc * acts[l + 1].element_size();
    } else {
      epi.out_elem = Elem::F32;
      epi.ldc = N;
      epi.out = logits.mutable_data_ptr();
    }
    const char* a = static_cast<const char*>(acts[l].const_data_ptr()) + start * acts[l].stride(0) * acts[l].element_size();
    mlp::gemm(n, N, K, a, acts[l].stride(0), e, packed[l].const_data_ptr(), epi);
  }
  return logits;
}

namespace {

// Adam for mlp_update: per layer the float32 weight, bias and their moments, both packed copies.
struct AdamLists {
  at::TensorList weight, bias, exp_avg_w, exp_avg_sq_w, exp_avg_b, exp_avg_sq_b, packed;
  mlp::AdamScalars s;
};

void check_adam_layer(const AdamLists& a, size_t l, int64_t N, int64_t K, Elem e, at::TensorList packed_t) {
  for (const at::Tensor* t : {&a.weight[l], &a.exp_avg_w[l], &a.exp_avg_sq_w[l]}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == N * K,
                "fastfvae_native mlp_adam: layer ", l, "'s weight and moments must be contiguous float32 [", N, ", ",
                K, "]");
  }
  for (const at::Tensor* t : {&a.bias[l], &a.exp_avg_b[l], &a.exp_avg_sq_b[l]}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == N,
                "fastfvae_native mlp_adam: layer ", l, "'s bias and moments must be contiguous float32 [", N, "]");
  }
  TORCH_CHECK(a.packed[l].numel() == mlp::packed_numel(K, N, e) && packed_t[l].numel() == mlp::packed_numel(N, K, e) &&
                  a.packed[l].scalar_type() == packed_t[l].scalar_type(),
              "fastfvae_native mlp_adam: layer ", l, "'s packed weights do not match [", N, ", ", K, "]");
}

mlp::AdamScalars adam_scalars(double step_size, double bias_correction2_sqrt, double one_minus_beta1, double beta2,
                              double one_minus_beta2, double eps) {
  return {static_cast<float>(step_size), static_cast<float>(bias_correction2_sqrt), static_cast<float>(one_minus_beta1),
          static_cast<float>(beta2), static_cast<float>(one_minus_beta2), static_cast<float>(eps)};
}

// The backward of mlp_backward; with `adam`, each layer's weight gradient goes into Adam
// (48 rows of W at a time, mlp::gemm) after the layer's input gradient was formed from the old weights.
// With `signals`, layer l's d(loss)/d(pre-activation) of row r lives in row start + r of
// signals[l] (kept there for a later call); rows 0:shared of it are already there, from an
// earlier backward, and enter the weight gradient times row_scale[r] (see mlp_update).
at::Tensor backward_impl(const at::Tensor& grad, at::TensorList packed_t, at::TensorList acts, at::IntArrayRef widths,
                         double slope, int64_t start, bool input_grad, at::TensorList grad_w, at::TensorList grad_b,
                         const AdamLists* adam, at::TensorList signals, int64_t shared, const float* row_scale) {
  const size_t L = packed_t.size();
  check_net(acts, widths, L, "mlp_backward");
  check_matrix(grad, "mlp_backward", "grad");
  const bool params = !grad_w.empty() || adam != nullptr;
  TORCH_CHECK(adam != nullptr || grad_w.empty() || (grad_w.size() == L && grad_b.size() == L),
              "fastfvae_native mlp_backward: one weight and one bias gradient per layer, or none");
  if (adam != nullptr) {
    for (auto list : {adam->weight, adam->bias, adam->exp_avg_w, adam->exp_avg_sq_w, adam->exp_avg_b,
                      adam->exp_avg_sq_b, adam->packed}) {
      TORCH_CHECK(list.size() == L, "fastfvae_native mlp_update: every list needs one tensor per layer");
    }
  }
  const Elem e = elem_of(acts[0].scalar_type(), "mlp_backward");
  const int64_t n = grad.size(0);
  TORCH_CHECK(grad.size(1) == widths[L] && start >= 0 && start + n <= acts[0].size(0),
              "fastfvae_native mlp_backward: grad ", grad.sizes(), " does not fit rows ", start, ":", start + n,
              " of the [", acts[0].size(0), ", ", widths[L], "] logits");
  const bool keep = !signals.empty();
  if (keep) {
    TORCH_CHECK(signals.size() == L, "fastfvae_native mlp_backward: one signal buffer per layer, or none");
    for (size_t l = 0; l < L; ++l) {
      TORCH_CHECK(signals[l].dim() == 2 && signals[l].is_contiguous() &&
                      signals[l].scalar_type() == acts[0].scalar_type() && signals[l].size(0) == acts[0].size(0) &&
                      signals[l].size(1) == padded(widths[l + 1], e),
                  "fastfvae_native mlp_backward: signal buffer ", l, " must be contiguous [", acts[0].size(0), ", ",
                  padded(widths[l + 1], e), "] of ", acts[0].scalar_type(), ", got ", signals[l].sizes());
    }
  }
  TORCH_CHECK(shared >= 0 && shared <= n && (shared == 0 || (keep && params && !input_grad && row_scale != nullptr)),
              "fastfvae_native mlp_update: ", shared, " shared rows need signal buffers and a row scale, within the ",
              n, " rows, and no input gradient");
  const auto opts = acts[0].options();
  const auto rows = [&](const at::Tensor& t, int64_t r) {
    return static_cast<const char*>(t.const_data_ptr()) + (start + r) * t.stride(0) * t.element_size();
  };
  // g: d(loss)/d(pre-activation of layer li) of rows 0:n at row g_row0 of g, [*, padded(N_li)]
  at::Tensor g;
  int64_t g_row0 = 0;
  const auto new_signal = [&](size_t l, int64_t width) {
    if (keep) return std::pair<at::Tensor, int64_t>(signals[l], start);
    return std::pair<at::Tensor, int64_t>(padded(width, e) == width ? at::empty({n, width}, opts)
                                                                    : at::zeros({n, padded(width, e)}, opts),
                                          0);
  };
  std::tie(g, g_row0) = new_signal(L - 1, widths[L]);
  g.narrow(0, g_row0 + shared, n - shared).narrow(1, 0, widths[L]).copy_(grad.narrow(0, shared, n - shared));
  const auto g_at = [&](int64_t r) {
    return static_cast<const char*>(g.const_data_ptr()) + (g_row0 + r) * g.stride(0) * g.element_size();
  };
  at::Tensor gz;
  const int64_t fresh = n - shared;  // the rows whose signals this call forms
  for (size_t li = L; li-- > 0;) {
    const int64_t K = widths[li], N = widths[li + 1];
    TORCH_CHECK(packed_t[li].numel() == mlp::packed_numel(N, K, e),
                "fastfvae_native mlp_backward: layer ", li, "'s packed weight does not match ", K, " -> ", N);
    at::Tensor next;
    int64_t next_row0 = 0;
    if ((li > 0 || input_grad) && fresh > 0) {  // the input gradient first: Adam below overwrites packed_t[li]
      mlp::Epilogue epi;
      epi.slope = static_cast<float>(slope);
      if (li > 0) {
        std::tie(next, next_row0) = new_signal(li - 1, K);
        epi.out = static_cast<char*>(next.mutable_data_ptr()) + (next_row0 + shared) * next.stride(0) * next.element_size();
        epi.ldc = next.stride(0);
        epi.out_elem = e;
        epi.gate = rows(acts[li], shared);  // the output of layer li - 1 (after its LeakyReLU)
        epi.ldg = acts[li].stride(0);
        epi.gate_elem = e;
      } else {
        gz = at::empty({n, K}, opts.dtype(at::kFloat));
        epi.out = gz.mutable_data_ptr();
        epi.ldc = K;
      }
      mlp::gemm(fresh, K, N, g_at(shared), g.stride(0), e, packed_t[li].const_data_ptr(), epi);
    } else if (li > 0) {
      std::tie(next, next_row0) = new_signal(li - 1, K);
    }
    if (params) {
      at::Tensor gb = adam != nullptr ? at::empty({N}, opts.dtype(at::kFloat)) : grad_b[li];
      if (adam == nullptr) {
        TORCH_CHECK(grad_w[li].scalar_type() == at::kFloat && grad_w[li].is_contiguous() &&
                        grad_w[li].numel() == N * K && gb.scalar_type() == at::kFloat && gb.is_contiguous() &&
                        gb.numel() == N,
                    "fastfvae_native mlp_backward: layer ", li, "'s gradients must be contiguous float32 [", N, ", ",
                    K, "] and [", N, "]");
      } else {
        check_adam_layer(*adam, li, N, K, e, packed_t);
      }
      at::Tensor gt = transpose_operand(g_at(0), g.stride(0), n, N, e, gb.mutable_data_ptr<float>(), opts, row_scale,
                                        shared);
      at::Tensor xb = at::empty({mlp::packed_numel(n, K, e)}, opts);
      mlp::pack_b(rows(acts[li], 0), src_of(e), acts[li].stride(0), false, n, K, e, xb.mutable_data_ptr());
      mlp::Epilogue epi;
      mlp::AdamUpdate update;
      if (adam != nullptr) {
        update = {adam->weight[li].data_ptr<float>(), adam->exp_avg_w[li].data_ptr<float>(),
                  adam->exp_avg_sq_w[li].data_ptr<float>(), N, K, adam->s, e, adam->packed[li].data_ptr(),
                  packed_t[li].data_ptr()};
        epi.adam = &update;
      } else {
        epi.out = grad_w[li].mutable_data_ptr();
        epi.ldc = K;
      }
      mlp::gemm(N, K, n, gt.const_data_ptr(), gt.stride(0), e, xb.const_data_ptr(), epi);
      if (adam != nullptr) {
        mlp::adam_vector(adam->bias[li].data_ptr<float>(), adam->exp_avg_b[li].data_ptr<float>(),
                         adam->exp_avg_sq_b[li].data_ptr<float>(), gb.const_data_ptr<float>(), N, adam->s);
      }
    }
    if (li == 0) break;
    g = next;
    g_row0 = next_row0;
  }
  if (input_grad && !gz.defined()) gz = at::zeros({n, widths[0]}, opts.dtype(at::kFloat));
  return input_grad ? gz : at::Tensor();
}

}  // namespace

at::Tensor mlp_backward(const at::Tensor& grad, at::TensorList packed_t, at::TensorList acts, at::IntArrayRef widths,
                        double slope, int64_t start, bool input_grad, at::TensorList grad_w, at::TensorList grad_b,
                        at::TensorList signals) {
  return backward_impl(grad, packed_t, acts, widths, slope, start, input_grad, grad_w, grad_b, nullptr, signals, 0,
                       nullptr);
}

void mlp_update(const at::Tensor& grad, at::TensorList packed_t, at::TensorList acts, at::IntArrayRef widths,
                double slope, at::TensorList weight, at::TensorList bias, at::TensorList exp_avg_w,
                at::TensorList exp_avg_sq_w, at::TensorList exp_avg_b, at::TensorList exp_avg_sq_b,
                at::TensorList packed, double step_size, double bias_correction2_sqrt, double one_minus_beta1,
                double beta2, double one_minus_beta2, double eps, at::TensorList signals, int64_t shared,
                const c10::optional<at::Tensor>& scale) {
  const AdamLists adam{weight, bias, exp_avg_w, exp_avg_sq_w, exp_avg_b, exp_avg_sq_b, packed,
                       adam_scalars(step_size, bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps)};
  const float* row_scale = nullptr;
  if (shared > 0) {
    TORCH_CHECK(scale.has_value() && scale->device().is_cpu() && scale->scalar_type() == at::kFloat && scale->is_contiguous() &&
                    scale->dim() == 1 && scale->numel() >= shared,
                "fastfvae_native mlp_update: ", shared, " shared rows need a contiguous float32 scale of as many rows");
    row_scale = scale->const_data_ptr<float>();
  }
  backward_impl(grad, packed_t, acts, widths, slope, 0, false, {}, {}, &adam, signals, shared, row_scale);
}

void mlp_adam(at::TensorList weight, at::TensorList bias, at::TensorList exp_avg_w, at::TensorList exp_avg_sq_w,
              at::TensorList exp_avg_b, at::TensorList exp_avg_sq_b, at::TensorList grad_w, at::TensorList grad_b,
              at::TensorList packed, at::TensorList packed_t, double step_size, double bias_correction2_sqrt,
              double one_minus_beta1, double beta2, double one_minus_beta2, double eps) {
  const size_t L = weight.size();
  for (auto list : {bias, exp_avg_w, exp_avg_sq_w, exp_avg_b, exp_avg_sq_b, grad_w, grad_b, packed, packed_t}) {
    TORCH_CHECK(list.size() == L, "fastfvae_native mlp_adam: every list needs one tensor per layer");
  }
  const mlp::AdamScalars s = adam_scalars(step_size, bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps);
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor& w = weight[l];
    const int64_t N = w.size(0), K = w.size(1);
    const Elem e = elem_of(packed[l].scalar_type(), "mlp_adam");
    for (const at::Tensor* t : {&w, &exp_avg_w[l], &exp_avg_sq_w[l], &grad_w[l]}) {
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == N * K,
                  "fastfvae_native mlp_adam: layer ", l, "'s weight, moments and gradient must be contiguous float32 [",
                  N, ", ", K, "]");
    }
    for (const at::Tensor* t : {&bias[l], &exp_avg_b[l], &exp_avg_sq_b[l], &grad_b[l]}) {
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == N,
                  "fastfvae_native mlp_adam: layer ", l, "'s bias, moments and gradient must be contiguous float32 [", N, "]");
    }
    TORCH_CHECK(packed[l].numel() == mlp::packed_numel(K, N, e) && packed_t[l].numel() == mlp::packed_numel(N, K, e) &&
                    packed_t[l].scalar_type() == packed[l].scalar_type(),
                "fastfvae_native mlp_adam: layer ", l, "'s packed weights do not match [", N, ", ", K, "]");
    // one task per panel of forward columns (weight rows), so no two threads write one cache line
    at::parallel_for(0, mlp::panel_count(N), 1, [&](int64_t p0, int64_t p1) {
      mlp::adam_rows(w.data_ptr<float>(), exp_avg_w[l].data_ptr<float>(), exp_avg_sq_w[l].data_ptr<float>(),
                     grad_w[l].const_data_ptr<float>(), N, K, p0 * mlp::kPanel, std::min(N, p1 * mlp::kPanel), s, e,
                     packed[l].data_ptr(), packed_t[l].data_ptr());
    });
    mlp::adam_vector(bias[l].data_ptr<float>(), exp_avg_b[l].data_ptr<float>(), exp_avg_sq_b[l].data_ptr<float>(),
                  grad_b[l].const_data_ptr<float>(), N, s);
  }
}

std::string mlp_isa() { return mlp::gemm_isa_name(mlp::gemm_isa()); }

FASTFVAE_PARALLEL_PROBE(parallel_probe_mlp)

}  // namespace fastfvae_native
