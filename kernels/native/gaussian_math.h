// Element formulas of the Gaussian ops, in the torch reference's operation order
// (fastfvae/ops/gaussian.py: _reference_forward / _reference_backward), so each result is
// rounded at the same steps. T is the accumulation type: float (float16/bfloat16/float32
// inputs) or double (float64).
#pragma once

#include <cmath>
#include <cstdint>

namespace fastfvae_native {

// Above this half-logvar exp(half_lv) overflows float32 (exp(88.7)); the reference switches
// to exp(half_lv + log|eps|) * sign(eps) there, which stays finite while the product is.
constexpr float kHugeHalfLogvar = 80.0f;

template <typename T>
inline T sign_of(T x) {
  return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
}

// exp(half_lv) * eps, overflow-safe (the reference's _std_times_eps).
template <typename T>
inline T std_times_eps(T half_lv, T eps) {
  if (half_lv > T(kHugeHalfLogvar)) {
    return std::exp(half_lv + std::log(std::fabs(eps))) * sign_of(eps);
  }
  return std::exp(half_lv) * eps;
}

// One element of the forward: z = mu + exp(lv / 2) * eps and the KL term
// 0.5 * (mu^2 + exp(lv) - lv - 1); either pointer may be null (not wanted).
template <typename T>
inline void forward_one(T m, T lv, T e, T* z, T* term) {
  if (z != nullptr) *z = m + std_times_eps(T(0.5) * lv, e);
  if (term != nullptr) *term = T(0.5) * (((m * m + std::exp(lv)) - lv) - T(1));
}

// One element of the backward. gz: the gradient of z (with eps), gk: 0.5 * the gradient of
// this row's KL; either may be null. Neither: zero gradients.
template <typename T>
inline void backward_one(T m, T lv, const T* e, const T* gz, const T* gk, T* gmu, T* glv) {
  T gm = T(0), gl = T(0);
  if (gz != nullptr) {
    const T g = *gz, half_lv = T(0.5) * lv;
    gm = g;
    gl = ((g * *e) * std::exp(half_lv)) * T(0.5);
    if (half_lv > T(kHugeHalfLogvar)) gl = (T(0.5) * g) * std_times_eps(half_lv, *e);
  }
  if (gk != nullptr) {
    const T g = *gk;
    const T gm_kl = g * (T(2) * m), gl_kl = g * std::exp(lv) + (-g);
    gm = gz != nullptr ? gm + gm_kl : gm_kl;
    gl = gz != nullptr ? gl + gl_kl : gl_kl;
  }
  *gmu = gm;
  *glv = gl;
}

// float32 hot loops over n contiguous elements, in the variant active_isa() picks.
void forward_f32(const float* mu, const float* lv, const float* eps, float* z, float* term, int64_t n);
void backward_f32(const float* mu, const float* lv, const float* eps, const float* gz, const float* gk,
                  float* gmu, float* glv, int64_t n);

}  // namespace fastfvae_native
