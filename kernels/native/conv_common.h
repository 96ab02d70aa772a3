// What the convolution kernels (conv_image.cpp, conv_s2.cpp, conv_s2_wgrad.cpp, relu_bias.cpp)
// share: bfloat16 loads, the AVX-512 target attributes, the variant they run (the GEMM's,
// mlp_gemm.h, so that FASTFVAE_NATIVE_ISA caps both alike) and the AVX-512 multiply-adds.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "mlp_gemm.h"

#if defined(FASTFVAE_MLP_SIMD)
#include <immintrin.h>

// AVX-512 (F, BW, VL, DQ) with FMA: the float32 kernels, on any AVX-512 CPU and compiler.
#define FFV_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
// Fully unrolled loops over a tile's pixels and vectors, so that its accumulators stay in
// registers (the run-tile kernels, conv_s2.cpp and conv_s2_fwd.cpp).
#define FFV_UNROLL _Pragma("GCC unroll 16")
// ... and AVX-512-BF16 (vdpbf16ps, vcvtne(2)ps2bf16): only with GCC >= 11, the compilers on which
// the GEMM's detection (mlp_gemm.cpp) reports AVX-512-BF16, so nothing else could run them.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define FFV_HAVE_AVX512BF16 1
#define FFV_TARGET_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#endif
#endif

namespace fastfvae_native {
namespace conv {

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The float32 value of bfloat16 bits (exact).
inline float bf16f(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Element i of a float32 array, or of a bfloat16 one (T uint16_t or at::BFloat16: its bits).
template <typename T>
inline float ld(const T* p, int64_t i) {
  if constexpr (std::is_same<T, float>::value) return p[i];
  return bf16f(reinterpret_cast<const uint16_t*>(p)[i]);
}

// The AVX-512 kernels (float32 FMA; bfloat16 widened to float32 where vdpbf16ps is not used).
inline bool use_avx512() {
#if defined(FASTFVAE_MLP_SIMD)
  return static_cast<int>(mlp::gemm_isa()) >= static_cast<int>(mlp::GemmIsa::Avx512);
#else
  return false;
#endif
}

// vdpbf16ps for bfloat16 operands (capped as the GEMM: FASTFVAE_NATIVE_ISA=avx512 turns it off).
inline bool use_bf16_dot() {
#if defined(FFV_HAVE_AVX512BF16)
  return mlp::gemm_isa() == mlp::GemmIsa::Avx512Bf16;
#else
  return false;
#endif
}

#if defined(FASTFVAE_MLP_SIMD)
// The first n of 16 lanes (none for n <= 0).
inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1u);
}

// acc + a * b per float32 lane, one rounding (FMA).
FFV_TARGET_AVX512 inline __m512 madd(__m512 acc, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, acc); }

#if defined(FFV_HAVE_AVX512BF16)
// acc + a . b per 32-bit lane over its two bfloat16 (vdpbf16ps; subnormals flush to zero).
FFV_TARGET_AVX512BF16 inline __m512 madd(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}
#endif
#endif

}  // namespace conv
}  // namespace fastfvae_native
