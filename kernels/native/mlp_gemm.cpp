// The GEMM of mlp_gemm.h: panel packing, register-blocked microkernels per instruction set
// (function target attributes in one translation unit, chosen at run time) and the epilogue.
//
// A microkernel computes an MR x (16 * NR) block of C over the whole reduction (K of the
// discriminator is at most ~1000, so a bfloat16 panel of B, 48 columns x K, is ~96 KB and
// stays in L2 while every row block of A goes past it), keeping the accumulators in registers
// and storing them to a float32 tile once; the epilogue then reads the tile. AVX-512-BF16
// uses vdpbf16ps (8 x 3 accumulators); AVX-512 without it and AVX2 widen bfloat16 to float32
// by shifts (a bfloat16 is the high half of a float32) and use FMAs; the scalar variant is
// plain loops.
#include "mlp_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "parallel_probe.h"

#if defined(FASTFVAE_MLP_SIMD)
// GCC 12's AVX-512 headers warn about their own _mm512_undefined_* placeholders.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif


namespace fastfvae_native {
namespace mlp {
namespace {

constexpr int kMaxRows = 8;

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, NaN to the canonical quiet NaN: c10::BFloat16's rounding.
inline uint16_t f32_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline uint32_t load_u32(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// --- Adam -------------------------------------------------------------------------------------

// One element of torch.optim.Adam: exp_avg.lerp_(g, 1 - beta1) (torch's lerp: the weight < 0.5
// branch or the other), exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2),
// denom = sqrt(exp_avg_sq) / bias_correction2_sqrt + eps, w.addcdiv_(exp_avg, denom, -step_size).
inline __attribute__((always_inline)) void adam_one(float& w, float& m, float& v, float g, const AdamScalars& s) {
  const float w1 = s.one_minus_beta1;
  const float mi = w1 < 0.5f ? m + w1 * (g - m) : g - (g - m) * (1.0f - w1);
  const float vi = v * s.beta2 + s.one_minus_beta2 * g * g;
  const float denom = std::sqrt(vi) / s.bias_correction2_sqrt + s.eps;
  m = mi;
  v = vi;
  w = w + (-s.step_size) * mi / denom;
}

inline __attribute__((always_inline)) void adam_span(float* w, float* m, float* v, const float* g, int64_t n,
                                                     const AdamScalars& s) {
  for (int64_t i = 0; i < n; ++i) adam_one(w[i], m[i], v[i], g[i], s);
}

inline __attribute__((always_inline)) uint16_t round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t{0x7FC0} : static_cast<uint16_t>(r);
}

// The body of adam_rows, inlined into one clone per instruction set so its loops vectorise for it.
inline __attribute__((always_inline)) void adam_rows_body(float* w, float* m, float* v, const float* g, int64_t N,
                                                          int64_t K, int64_t r0, int64_t r1, const AdamScalars& s,
                                                          Elem e, void* packed, void* packed_t, uint16_t* b16) {
  const int64_t K2 = (K + 1) / 2, N2 = (N + 1) / 2, panels = panel_count(K);
  for (int64_t r = r0; r < r1; r += 2) {
    const int64_t rows = std::min<int64_t>(2, r1 - r);
    for (int64_t h = 0; h < rows; ++h) adam_span(w + (r + h) * K, m + (r + h) * K, v + (r + h) * K, g + (r + h) * K, K, s);
    if (e == Elem::F32) {
      float* f = static_cast<float*>(packed);
      float* t = static_cast<float*>(packed_t);
      for (int64_t h = 0; h < rows; ++h) {
        const float* wr = w + (r + h) * K;
        const int64_t p = (r + h) / kPanel, c = (r + h) % kPanel;
        float* fp = f + p * K * kPanel + c;
        for (int64_t k = 0; k < K; ++k) fp[k * kPanel] = wr[k];
        for (int64_t kb = 0; kb < panels; ++kb) {
          const int64_t cols = std::min<int64_t>(kPanel, K - kb * kPanel);
          float* tp = t + (kb * N + r + h) * kPanel;
          for (int64_t kk = 0; kk < cols; ++kk) tp[kk] = wr[kb * kPanel + kk];
        }
      }
      continue;
    }
    for (int64_t h = 0; h < rows; ++h) {
      const float* wr = w + (r + h) * K;
      uint16_t* br = b16 + h * (K2 * 2);
      for (int64_t k = 0; k < K; ++k) br[k] = round_bf16(wr[k]);
      if (K & 1) br[K] = 0;
    }
    if (rows == 1) std::fill(b16 + K2 * 2, b16 + K2 * 4, uint16_t{0});
    // forward copy: the pair (k, k + 1) of column r + h is one 32-bit word, 48 words apart
    uint32_t* f = static_cast<uint32_t*>(packed);
    for (int64_t h = 0; h < rows; ++h) {
      const int64_t p = (r + h) / kPanel, c = (r + h) % kPanel;
      uint32_t* fp = f + p * K2 * kPanel + c;
      const uint16_t* br = b16 + h * (K2 * 2);
      for (int64_t kp = 0; kp < K2; ++kp) {
        fp[kp * kPanel] = static_cast<uint32_t>(br[2 * kp]) | (static_cast<uint32_t>(br[2 * kp + 1]) << 16);
      }
    }
    // input-gradient copy: rows r and r + 1 interleaved, one 48-column run per panel
    uint16_t* t = static_cast<uint16_t*>(packed_t);
    const uint16_t* b0 = b16;
    const uint16_t* b1 = b16 + K2 * 2;
    for (int64_t kb = 0; kb < panels; ++kb) {
      const int64_t cols = std::min<int64_t>(kPanel, K - kb * kPanel);
      uint16_t* tp = t + (kb * N2 + r / 2) * kPanel * 2;
      for (int64_t kk = 0; kk < cols; ++kk) {
        tp[2 * kk] = b0[kb * kPanel + kk];
        tp[2 * kk + 1] = b1[kb * kPanel + kk];
      }
    }
  }
}

// --- scalar -----------------------------------------------------------------------------------

void kernel_scalar(int mr, int ncols, int64_t K, const void* A, int64_t lda, Elem e, const void* B, float* tile) {
  for (int i = 0; i < mr; ++i) std::fill(tile + i * kPanel, tile + i * kPanel + ncols, 0.0f);
  if (e == Elem::F32) {
    const float* a = static_cast<const float*>(A);
    const float* b = static_cast<const float*>(B);
    for (int64_t k = 0; k < K; ++k) {
      for (int i = 0; i < mr; ++i) {
        const float av = a[i * lda + k];
        for (int c = 0; c < ncols; ++c) tile[i * kPanel + c] += av * b[k * kPanel + c];
      }
    }
    return;
  }
  const uint16_t* a = static_cast<const uint16_t*>(A);
  const uint16_t* b = static_cast<const uint16_t*>(B);
  const int64_t K2 = (K + 1) / 2;
  for (int64_t kp = 0; kp < K2; ++kp) {
    for (int i = 0; i < mr; ++i) {
      const float a0 = bf16_to_f32(a[i * lda + 2 * kp]), a1 = bf16_to_f32(a[i * lda + 2 * kp + 1]);
      for (int c = 0; c < ncols; ++c) {
        const uint16_t* bp = b + (kp * kPanel + c) * 2;
        tile[i * kPanel + c] += a0 * bf16_to_f32(bp[0]) + a1 * bf16_to_f32(bp[1]);
      }
    }
  }
}

inline float gate_value(const Epilogue& e, int64_t m, int64_t n) {
  if (e.gate_elem == Elem::F32) return static_cast<const float*>(e.gate)[m * e.ldg + n];
  return bf16_to_f32(static_cast<const uint16_t*>(e.gate)[m * e.ldg + n]);
}

void epilogue_scalar(const float* tile, int mr, int64_t m0, int64_t n0, int ncols, const Epilogue& e) {
  for (int i = 0; i < mr; ++i) {
    const int64_t m = m0 + i;
    for (int c = 0; c < ncols; ++c) {
      const int64_t n = n0 + c;
      float v = tile[i * kPanel + c];
      if (e.bias != nullptr) v += e.bias[n];
      if (e.act && !(v > 0.0f)) v *= e.slope;
      if (e.gate != nullptr && !(gate_value(e, m, n) > 0.0f)) v *= e.slope;
      if (e.out_elem == Elem::F32) {
        static_cast<float*>(e.out)[m * e.ldc + n] = v;
      } else {
        static_cast<uint16_t*>(e.out)[m * e.ldc + n] = f32_to_bf16(v);
      }
    }
  }
}

// --- AVX-512 ----------------------------------------------------------------------------------
#if defined(FASTFVAE_MLP_SIMD)
#define FFV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define FFV_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define FFV_AVX2 __attribute__((target("avx2,fma")))

template <int MR, int NR>
FFV_AVX512 void k512_f32(int64_t K, const void* Av, int64_t lda, const void* Bv, float* tile) {
  const float* A = static_cast<const float*>(Av);
  const float* B = static_cast<const float*>(Bv);
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NR];
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) b[j] = _mm512_loadu_ps(B + k * kPanel + 16 * j);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * lda + k]);
#pragma GCC unroll 3
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(tile + i * kPanel + 16 * j, acc[i][j]);
}

template <int MR, int NR>
FFV_AVX512BF16 void k512_bf16(int64_t K, const void* Av, int64_t lda, const void* Bv, float* tile) {
  const uint16_t* A = static_cast<const uint16_t*>(Av);
  const uint16_t* B = static_cast<const uint16_t*>(Bv);
  const int64_t K2 = (K + 1) / 2;
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K2; ++kp) {
    __m512bh b[NR];
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) b[j] = (__m512bh)_mm512_loadu_si512(B + (kp * kPanel + 16 * j) * 2);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_u32(A + i * lda + 2 * kp)));
#pragma GCC unroll 3
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(tile + i * kPanel + 16 * j, acc[i][j]);
}

// bfloat16 pairs without vdpbf16ps: the even element of a 32-bit lane is its low half, shifted
// up it is that bfloat16 as a float32; the odd one is the high half with the low half cleared.
template <int MR, int NR>
FFV_AVX512 void k512_bf16_widen(int64_t K, const void* Av, int64_t lda, const void* Bv, float* tile) {
  const uint16_t* A = static_cast<const uint16_t*>(Av);
  const uint16_t* B = static_cast<const uint16_t*>(Bv);
  const int64_t K2 = (K + 1) / 2;
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K2; ++kp) {
    __m512 b0[NR], b1[NR];
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) {
      const __m512i raw = _mm512_loadu_si512(B + (kp * kPanel + 16 * j) * 2);
      b0[j] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
      b1[j] = _mm512_castsi512_ps(_mm512_and_si512(raw, high));
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(load_u32(A + i * lda + 2 * kp)));
      const __m512 a0 = _mm512_castsi512_ps(_mm512_slli_epi32(a, 16));
      const __m512 a1 = _mm512_castsi512_ps(_mm512_and_si512(a, high));
#pragma GCC unroll 3
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(a1, b1[j], _mm512_fmadd_ps(a0, b0[j], acc[i][j]));
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(tile + i * kPanel + 16 * j, acc[i][j]);
}

FFV_AVX512 inline __m512 leaky512(__m512 v, __m512 ref, __m512 slope) {
  const __mmask16 pos = _mm512_cmp_ps_mask(ref, _mm512_setzero_ps(), _CMP_GT_OQ);
  return _mm512_mask_blend_ps(pos, _mm512_mul_ps(v, slope), v);
}

// adam_one on the lanes of `k` of 16 consecutive elements (the same operations, so the same
// bits), in place; returns the new weights. Inlined, so the broadcasts are hoisted out of the
// callers' loops.
FFV_AVX512 inline __attribute__((always_inline)) __m512 adam16(float* wp, float* mp, float* vp, const float* gp,
                                                               const AdamScalars& s, __mmask16 k) {
  const __m512 m = _mm512_maskz_loadu_ps(k, mp), v = _mm512_maskz_loadu_ps(k, vp), w = _mm512_maskz_loadu_ps(k, wp);
  const __m512 g = _mm512_maskz_loadu_ps(k, gp);
  const __m512 d = _mm512_sub_ps(g, m);
  const __m512 mi = s.one_minus_beta1 < 0.5f ? _mm512_add_ps(m, _mm512_mul_ps(_mm512_set1_ps(s.one_minus_beta1), d))
                                             : _mm512_sub_ps(g, _mm512_mul_ps(d, _mm512_set1_ps(1.0f - s.one_minus_beta1)));
  const __m512 vi = _mm512_add_ps(_mm512_mul_ps(v, _mm512_set1_ps(s.beta2)),
                                  _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(s.one_minus_beta2), g), g));
  const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), _mm512_set1_ps(s.bias_correction2_sqrt)),
                                     _mm512_set1_ps(s.eps));
  const __m512 wi = _mm512_add_ps(w, _mm512_div_ps(_mm512_mul_ps(_mm512_set1_ps(-s.step_size), mi), denom));
  _mm512_mask_storeu_ps(mp, k, mi);
  _mm512_mask_storeu_ps(vp, k, vi);
  _mm512_mask_storeu_ps(wp, k, wi);
  return wi;
}

// round_bf16 on 16 lanes: round to nearest even in integers, NaN to 0x7FC0.
FFV_AVX512 inline __m256i bf16x16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

FFV_AVX512 inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// adam_rows for one forward panel (rows r0..r0 + rows of W, r0 a multiple of kPanel) in vector
// code. Adam streams the panel's rows (contiguous in W, its moments and g); the updated rows go
// to the input-gradient copy as 48-column runs (row pairs interleaved in bfloat16) and, through
// `band` (the rows as float32 or bfloat16 pairs, zero past K and past the last row), to the
// forward copy, whose panel is one contiguous [k][48] block written as a blocked transposition.
FFV_AVX512 void adam_panel_512(float* w, float* m, float* v, const float* g, int64_t N, int64_t K, int64_t r0,
                               int rows, const AdamScalars& s, Elem e, void* packed, void* packed_t, uint32_t* band) {
  const int64_t p = r0 / kPanel, kpanels = panel_count(K), width = kpanels * kPanel;
  if (e == Elem::F32) {
    float* f = static_cast<float*>(packed) + p * K * kPanel;
    float* t = static_cast<float*>(packed_t);
    float* bandf = reinterpret_cast<float*>(band);
    for (int i = 0; i < rows; ++i) {
      const int64_t off = (r0 + i) * K;
      float* br = bandf + i * width;
      for (int64_t c = 0; c < K; c += 16) {
        const __mmask16 k = lanes(K - c);
        _mm512_mask_storeu_ps(br + c, k, adam16(w + off + c, m + off + c, v + off + c, g + off + c, s, k));
      }
      for (int64_t kb = 0; kb < kpanels; ++kb) {
        const int64_t cols = std::min<int64_t>(kPanel, K - kb * kPanel);
        std::memcpy(t + (kb * N + r0 + i) * kPanel, br + kb * kPanel, sizeof(float) * cols);
      }
    }
    for (int64_t k0 = 0; k0 < K; k0 += 16) {  // f[k][c] = band[c][k], 16 k at a time
      const int64_t k1 = std::min<int64_t>(K, k0 + 16);
      for (int64_t k = k0; k < k1; ++k)
        for (int c = 0; c < rows; ++c) f[k * kPanel + c] = bandf[c * width + k];
    }
    return;
  }
  const int64_t K2 = (K + 1) / 2, N2 = (N + 1) / 2;
  uint16_t* band16 = reinterpret_cast<uint16_t*>(band);  // row i: width bfloat16 (K, then zeros)
  const int64_t stride16 = width;
  for (int i = 0; i < rows; ++i) {
    const int64_t off = (r0 + i) * K;
    uint16_t* br = band16 + i * stride16;
    for (int64_t c = 0; c < K; c += 16) {
      const __mmask16 k = lanes(K - c);
      _mm256_mask_storeu_epi16(br + c, k, bf16x16(adam16(w + off + c, m + off + c, v + off + c, g + off + c, s, k)));
    }
    std::fill(br + K, br + stride16, uint16_t{0});
  }
  if (rows & 1) std::fill(band16 + rows * stride16, band16 + (rows + 1) * stride16, uint16_t{0});
  uint16_t* t = static_cast<uint16_t*>(packed_t);
  for (int i = 0; i < rows; i += 2) {  // rows r0 + i and r0 + i + 1 interleaved, 48 columns per panel
    const uint16_t* lo_row = band16 + i * stride16;
    const uint16_t* hi_row = lo_row + stride16;
    for (int64_t kb = 0; kb < kpanels; ++kb) {
      uint16_t* tp = t + (kb * N2 + (r0 + i) / 2) * kPanel * 2;
      for (int j = 0; j < 3; ++j) {
        const int64_t c = kb * kPanel + 16 * j;
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo_row + c)));
        const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi_row + c)));
        _mm512_storeu_si512(tp + 32 * j, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
  }
  uint32_t* f = static_cast<uint32_t*>(packed) + p * K2 * kPanel;  // f[kp][c] = pair kp of row c
  const int64_t words = stride16 / 2;
  for (int64_t k0 = 0; k0 < K2; k0 += 16) {
    const int64_t k1 = std::min<int64_t>(K2, k0 + 16);
    for (int64_t kp = k0; kp < k1; ++kp)
      for (int c = 0; c < rows; ++c) f[kp * kPanel + c] = band[c * words + kp];
  }
}

FFV_AVX512 void epilogue512(const float* tile, int mr, int64_t m0, int64_t n0, int ncols, const Epilogue& e) {
  const __m512 slope = _mm512_set1_ps(e.slope);
  for (int i = 0; i < mr; ++i) {
    const int64_t m = m0 + i;
    for (int c = 0; c < ncols; c += 16) {
      const int left = ncols - c;
      const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
      const int64_t n = n0 + c;
      __m512 v = _mm512_loadu_ps(tile + i * kPanel + c);
      if (e.bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, e.bias + n));
      if (e.act) v = leaky512(v, v, slope);
      if (e.gate != nullptr) {
        __m512 g;
        if (e.gate_elem == Elem::F32) {
          g = _mm512_maskz_loadu_ps(mask, static_cast<const float*>(e.gate) + m * e.ldg + n);
        } else {
          const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(e.gate) + m * e.ldg + n);
          g = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        }
        v = leaky512(v, g, slope);
      }
      if (e.out_elem == Elem::F32) {
        _mm512_mask_storeu_ps(static_cast<float*>(e.out) + m * e.ldc + n, mask, v);
      } else {
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(e.out) + m * e.ldc + n, mask, bf16x16(v));
      }
    }
  }
}

// --- AVX2: 16 columns (two 8-wide vectors) per call, three calls per panel ---------------------

template <int MR>
FFV_AVX2 void k2_f32(int64_t K, const void* Av, int64_t lda, const void* Bv, float* tile) {
  const float* A = static_cast<const float*>(Av);
  const float* B = static_cast<const float*>(Bv);
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B + k * kPanel), b1 = _mm256_loadu_ps(B + k * kPanel + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_set1_ps(A[i * lda + k]);
      acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(tile + i * kPanel, acc[i][0]);
    _mm256_storeu_ps(tile + i * kPanel + 8, acc[i][1]);
  }
}

template <int MR>
FFV_AVX2 void k2_bf16(int64_t K, const void* Av, int64_t lda, const void* Bv, float* tile) {
  const uint16_t* A = static_cast<const uint16_t*>(Av);
  const uint16_t* B = static_cast<const uint16_t*>(Bv);
  const int64_t K2 = (K + 1) / 2;
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t kp = 0; kp < K2; ++kp) {
    __m256 b0[2], b1[2];
    for (int j = 0; j < 2; ++j) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + (kp * kPanel + 8 * j) * 2));
      b0[j] = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
      b1[j] = _mm256_castsi256_ps(_mm256_and_si256(raw, high));
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256i a = _mm256_set1_epi32(static_cast<int>(load_u32(A + i * lda + 2 * kp)));
      const __m256 a0 = _mm256_castsi256_ps(_mm256_slli_epi32(a, 16));
      const __m256 a1 = _mm256_castsi256_ps(_mm256_and_si256(a, high));
      for (int j = 0; j < 2; ++j) acc[i][j] = _mm256_fmadd_ps(a1, b1[j], _mm256_fmadd_ps(a0, b0[j], acc[i][j]));
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(tile + i * kPanel, acc[i][0]);
    _mm256_storeu_ps(tile + i * kPanel + 8, acc[i][1]);
  }
}

using Kernel = void (*)(int64_t, const void*, int64_t, const void*, float*);

#define FFV_ROW(fn, mr) {&fn<mr, 1>, &fn<mr, 2>, &fn<mr, 3>}
const Kernel kF32_512[8][3] = {FFV_ROW(k512_f32, 1), FFV_ROW(k512_f32, 2), FFV_ROW(k512_f32, 3),
                               FFV_ROW(k512_f32, 4), FFV_ROW(k512_f32, 5), FFV_ROW(k512_f32, 6),
                               FFV_ROW(k512_f32, 7), FFV_ROW(k512_f32, 8)};
const Kernel kBf16_512[8][3] = {FFV_ROW(k512_bf16, 1), FFV_ROW(k512_bf16, 2), FFV_ROW(k512_bf16, 3),
                                FFV_ROW(k512_bf16, 4), FFV_ROW(k512_bf16, 5), FFV_ROW(k512_bf16, 6),
                                FFV_ROW(k512_bf16, 7), FFV_ROW(k512_bf16, 8)};
const Kernel kWiden_512[6][3] = {FFV_ROW(k512_bf16_widen, 1), FFV_ROW(k512_bf16_widen, 2),
                                 FFV_ROW(k512_bf16_widen, 3), FFV_ROW(k512_bf16_widen, 4),
                                 FFV_ROW(k512_bf16_widen, 5), FFV_ROW(k512_bf16_widen, 6)};
#undef FFV_ROW
const Kernel kF32_2[6] = {&k2_f32<1>, &k2_f32<2>, &k2_f32<3>, &k2_f32<4>, &k2_f32<5>, &k2_f32<6>};
const Kernel kBf16_2[4] = {&k2_bf16<1>, &k2_bf16<2>, &k2_bf16<3>, &k2_bf16<4>};
#endif  // FASTFVAE_MLP_SIMD

GemmIsa detect_gemm_isa() {
  GemmIsa best = GemmIsa::Scalar;
#if defined(FASTFVAE_MLP_SIMD)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq")) {
    best = GemmIsa::Avx512;
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
    if (__builtin_cpu_supports("avx512bf16")) best = GemmIsa::Avx512Bf16;
#endif
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    best = GemmIsa::Avx2;
  }
#endif
  const char* cap = std::getenv("FASTFVAE_NATIVE_ISA");
  if (cap != nullptr) {
    GemmIsa limit = best;
    if (std::strcmp(cap, "scalar") == 0) limit = GemmIsa::Scalar;
    if (std::strcmp(cap, "avx2") == 0) limit = GemmIsa::Avx2;
    if (std::strcmp(cap, "avx512") == 0) limit = GemmIsa::Avx512;
    if (static_cast<int>(limit) < static_cast<int>(best)) best = limit;
  }
  return best;
}

// Rows per microkernel call for each variant and operand type.
int rows_per_block(GemmIsa isa, Elem e) {
  switch (isa) {
    case GemmIsa::Avx512Bf16: return 8;
    case GemmIsa::Avx512: return e == Elem::F32 ? 8 : 6;
    case GemmIsa::Avx2: return e == Elem::F32 ? 6 : 4;
    default: return 4;
  }
}

void run_block(GemmIsa isa, int mr, int ncols, int64_t K, const void* A, int64_t lda, Elem e, const void* B,
               float* tile) {
#if defined(FASTFVAE_MLP_SIMD)
  const int nr = (ncols + 15) / 16;
  const int64_t esize = e == Elem::F32 ? 4 : 2;
  switch (isa) {
    case GemmIsa::Avx512Bf16:
      if (e == Elem::BF16) return kBf16_512[mr - 1][nr - 1](K, A, lda, B, tile);
      return kF32_512[mr - 1][nr - 1](K, A, lda, B, tile);
    case GemmIsa::Avx512:
      if (e == Elem::BF16) return kWiden_512[mr - 1][nr - 1](K, A, lda, B, tile);
      return kF32_512[mr - 1][nr - 1](K, A, lda, B, tile);
    case GemmIsa::Avx2:
      for (int c = 0; c < nr; ++c) {
        // column chunk c of the panel: B's elements of columns 16c.. (pairs in bf16)
        const void* Bc = static_cast<const char*>(B) + 16 * c * esize * (e == Elem::BF16 ? 2 : 1);
        if (e == Elem::BF16) {
          kBf16_2[mr - 1](K, A, lda, Bc, tile + 16 * c);
        } else {
          kF32_2[mr - 1](K, A, lda, Bc, tile + 16 * c);
        }
      }
      return;
    default: break;
  }
#endif
  kernel_scalar(mr, ncols, K, A, lda, e, B, tile);
}

void run_epilogue(GemmIsa isa, const float* tile, int mr, int64_t m0, int64_t n0, int ncols, const Epilogue& e) {
#if defined(FASTFVAE_MLP_SIMD)
  if (isa == GemmIsa::Avx512Bf16 || isa == GemmIsa::Avx512) return epilogue512(tile, mr, m0, n0, ncols, e);
#endif
  epilogue_scalar(tile, mr, m0, n0, ncols, e);
}

#if defined(FASTFVAE_MLP_SIMD)
FFV_AVX2 void adam_rows_2(float* w, float* m, float* v, const float* g, int64_t N, int64_t K, int64_t r0, int64_t r1,
                          const AdamScalars& s, Elem e, void* packed, void* packed_t, uint16_t* b16) {
  adam_rows_body(w, m, v, g, N, K, r0, r1, s, e, packed, packed_t, b16);
}
#endif

}  // namespace

void adam_vector(float* w, float* m, float* v, const float* g, int64_t n, const AdamScalars& s) {
  adam_span(w, m, v, g, n, s);
}

void adam_rows(float* w, float* m, float* v, const float* g, int64_t N, int64_t K, int64_t r0, int64_t r1,
               const AdamScalars& s, Elem e, void* packed, void* packed_t) {
#if defined(FASTFVAE_MLP_SIMD)
  const GemmIsa isa = gemm_isa();
  if (isa == GemmIsa::Avx512Bf16 || isa == GemmIsa::Avx512) {
    // one panel's rows, 48-column padded: float32, or bfloat16 with a zero row after an odd count
    std::vector<uint32_t> band(static_cast<size_t>(kPanel * panel_count(K) * kPanel));
    for (int64_t r = r0; r < r1; r += kPanel) {
      adam_panel_512(w, m, v, g, N, K, r, static_cast<int>(std::min<int64_t>(kPanel, r1 - r)), s, e, packed, packed_t,
                     band.data());
    }
    return;
  }
#endif
  std::vector<uint16_t> b16(static_cast<size_t>(4 * ((K + 1) / 2)));
#if defined(FASTFVAE_MLP_SIMD)
  switch (isa) {
    case GemmIsa::Avx2: return adam_rows_2(w, m, v, g, N, K, r0, r1, s, e, packed, packed_t, b16.data());
    default: break;
  }
#endif
  adam_rows_body(w, m, v, g, N, K, r0, r1, s, e, packed, packed_t, b16.data());
}

GemmIsa gemm_isa() {
  static const GemmIsa isa = detect_gemm_isa();
  return isa;
}

const char* gemm_isa_name(GemmIsa isa) {
  switch (isa) {
    case GemmIsa::Avx512Bf16: return "avx512_bf16";
    case GemmIsa::Avx512: return "avx512";
    case GemmIsa::Avx2: return "avx2";
    default: return "scalar";
  }
}

namespace {

inline float src_value(const void* src, Src t, int64_t at) {
  return t == Src::F32 ? static_cast<const float*>(src)[at] : bf16_to_f32(static_cast<const uint16_t*>(src)[at]);
}

inline uint16_t src_bf16(const void* src, Src t, int64_t at) {
  return t == Src::BF16 ? static_cast<const uint16_t*>(src)[at] : f32_to_bf16(static_cast<const float*>(src)[at]);
}

// Panel p of B packed from src. Every element of the panel is written (zeros past K and N).
void pack_panel(const void* src, Src st, int64_t ld, bool transposed, int64_t K, int64_t N, Elem e, int64_t p,
                void* out) {
  const int64_t n0 = p * kPanel, cols = std::min<int64_t>(kPanel, N - n0);
  if (e == Elem::F32) {
    float* o = static_cast<float*>(out) + p * K * kPanel;
    if (transposed) {  // B[k][n] = src[n][k]: the panel's rows of src, each scattered down a column
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t k = 0; k < K; ++k) o[k * kPanel + c] = src_value(src, st, (n0 + c) * ld + k);
      for (int64_t k = 0; k < K; ++k) std::fill(o + k * kPanel + cols, o + (k + 1) * kPanel, 0.0f);
    } else {  // B[k][n] = src[k][n]: 48-column runs of src's rows
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t c = 0; c < cols; ++c) o[k * kPanel + c] = src_value(src, st, k * ld + n0 + c);
        std::fill(o + k * kPanel + cols, o + (k + 1) * kPanel, 0.0f);
      }
    }
    return;
  }
  const int64_t K2 = (K + 1) / 2;
  uint16_t* o = static_cast<uint16_t*>(out) + p * K2 * kPanel * 2;
  if (transposed) {  // the pair (k, k + 1) of column n is src[n][k], src[n][k + 1]: adjacent in src
    uint32_t* o32 = reinterpret_cast<uint32_t*>(o);
    if (st == Src::BF16) {  // the pairs are 32-bit words of src's rows, as they are
      for (int64_t c = 0; c < cols; ++c) {
        const uint16_t* row = static_cast<const uint16_t*>(src) + (n0 + c) * ld;
        for (int64_t kp = 0; kp < K / 2; ++kp) o32[kp * kPanel + c] = load_u32(row + 2 * kp);
        if (K & 1) o32[(K2 - 1) * kPanel + c] = row[K - 1];
      }
      for (int64_t kp = 0; kp < K2; ++kp) std::fill(o32 + kp * kPanel + cols, o32 + (kp + 1) * kPanel, 0u);
      return;
    }
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t row = (n0 + c) * ld;
      for (int64_t kp = 0; kp < K / 2; ++kp) {
        o32[kp * kPanel + c] = static_cast<uint32_t>(src_bf16(src, st, row + 2 * kp)) |
                               (static_cast<uint32_t>(src_bf16(src, st, row + 2 * kp + 1)) << 16);
      }
      if (K & 1) o32[(K2 - 1) * kPanel + c] = src_bf16(src, st, row + K - 1);
    }
    for (int64_t kp = 0; kp < K2; ++kp) std::fill(o32 + kp * kPanel + cols, o32 + (kp + 1) * kPanel, 0u);
    return;
  }
  for (int64_t kp = 0; kp < K2; ++kp) {  // rows 2kp and 2kp + 1 of src interleaved
    uint16_t* op = o + kp * kPanel * 2;
    const int64_t r0 = 2 * kp * ld + n0;
    if (st == Src::BF16 && 2 * kp + 1 < K) {
      const uint16_t* a = static_cast<const uint16_t*>(src) + r0;
      const uint16_t* b = a + ld;
      for (int64_t c = 0; c < cols; ++c) {
        op[2 * c] = a[c];
        op[2 * c + 1] = b[c];
      }
    } else if (2 * kp + 1 < K) {
      const int64_t r1 = r0 + ld;
      for (int64_t c = 0; c < cols; ++c) {
        op[2 * c] = src_bf16(src, st, r0 + c);
        op[2 * c + 1] = src_bf16(src, st, r1 + c);
      }
    } else {
      for (int64_t c = 0; c < cols; ++c) {
        op[2 * c] = src_bf16(src, st, r0 + c);
        op[2 * c + 1] = 0;
      }
    }
    std::fill(op + 2 * cols, op + 2 * kPanel, uint16_t{0});
  }
}

}  // namespace

void pack_b(const void* src, Src src_type, int64_t ld, bool transposed, int64_t K, int64_t N, Elem e, void* out) {
  const int64_t panels = panel_count(N), rows = reduction_rows(K, e);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, rows * kPanel));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) pack_panel(src, src_type, ld, transposed, K, N, e, p, out);
  });
}

namespace {

// gemm with an Adam epilogue, in bands of one forward panel (48 rows of C = 48 rows of W): the
// band's gradient tiles go to a float32 buffer that stays in L2, then adam_rows streams the band's
// rows of W and its moments, which are contiguous. (Adam on each tile as it left the registers
// touched 3 x 8 short row segments per tile, which the hardware prefetchers follow poorly.) One
// band is one task, so no two threads write one cache line of the packed copies.
void gemm_adam(GemmIsa isa, int MR, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, Elem e,
               const void* B, const AdamUpdate& a) {
  const int64_t bands = (M + kPanel - 1) / kPanel, panels = panel_count(N);
  const int64_t esize = e == Elem::F32 ? 4 : 2;
  const int64_t panel_bytes = reduction_rows(K, e) * kPanel * esize * (e == Elem::BF16 ? 2 : 1);
  at::parallel_for(0, bands, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> grad(static_cast<size_t>(kPanel * N));
    alignas(64) float tile[kMaxRows * kPanel];
    for (int64_t band = b0; band < b1; ++band) {
      const int64_t r0 = band * kPanel, r1 = std::min<int64_t>(M, r0 + kPanel);
      for (int64_t m0 = r0; m0 < r1; m0 += MR) {  // MR divides kPanel
        const int mr = static_cast<int>(std::min<int64_t>(MR, r1 - m0));
        const void* ap = static_cast<const char*>(A) + m0 * lda * esize;
        for (int64_t p = 0; p < panels; ++p) {
          const int64_t n0 = p * kPanel;
          const int ncols = static_cast<int>(std::min<int64_t>(kPanel, N - n0));
          run_block(isa, mr, ncols, K, ap, lda, e, static_cast<const char*>(B) + p * panel_bytes, tile);
          for (int i = 0; i < mr; ++i)
            std::memcpy(grad.data() + (m0 - r0 + i) * N + n0, tile + i * kPanel, sizeof(float) * ncols);
        }
      }
      // adam_rows indexes the gradient by W's row: this band's rows start at grad
      adam_rows(a.w, a.m, a.v, grad.data() - r0 * N, a.N, a.K, r0, r1, a.s, a.e, a.packed, a.packed_t);
    }
  });
}

}  // namespace

void gemm(int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, Elem e, const void* B, const Epilogue& epi) {
  if (M <= 0 || N <= 0) return;
  const GemmIsa isa = gemm_isa();
  const int MR = rows_per_block(isa, e);
  if (epi.adam != nullptr) return gemm_adam(isa, MR, M, N, K, A, lda, e, B, *epi.adam);
  const int64_t blocks = (M + MR - 1) / MR, panels = panel_count(N);
  const int64_t esize = e == Elem::F32 ? 4 : 2;
  const int64_t panel_bytes = reduction_rows(K, e) * kPanel * esize * (e == Elem::BF16 ? 2 : 1);
  // tiles of about 2^21 multiply-adds per task, so small products stay on one thread
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 21) / std::max<int64_t>(1, MR * kPanel * K));
  at::parallel_for(0, panels * blocks, grain, [&](int64_t t0, int64_t t1) {
    alignas(64) float tile[kMaxRows * kPanel];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t / blocks, b = t % blocks;
      const int64_t m0 = b * MR, n0 = p * kPanel;
      const int mr = static_cast<int>(std::min<int64_t>(MR, M - m0));
      const int ncols = static_cast<int>(std::min<int64_t>(kPanel, N - n0));
      const void* a = static_cast<const char*>(A) + m0 * lda * esize;
      const void* bp = static_cast<const char*>(B) + p * panel_bytes;
      run_block(isa, mr, ncols, K, a, lda, e, bp, tile);
      run_epilogue(isa, tile, mr, m0, n0, ncols, epi);
    }
  });
}

}  // namespace mlp

FASTFVAE_PARALLEL_PROBE(parallel_probe_mlp_gemm)

}  // namespace fastfvae_native
