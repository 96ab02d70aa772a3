// float32 -> bfloat16 rounding for 16 AVX-512 lanes, for the kernels that must also run without
// AVX-512-BF16's vcvtne2ps2bf16 (conv_image.cpp). Compiled for AVX-512 by its target attribute, so
// it inlines into any AVX-512 (or AVX-512-BF16) function of a source that includes it.
#pragma once

#if defined(FASTFVAE_MLP_SIMD)
#include <immintrin.h>

namespace fastfvae_native {
namespace simd {

// Round to nearest even (NaN -> 0x7fc0), the bits c10::BFloat16 gives.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

}  // namespace simd
}  // namespace fastfvae_native
#endif
