// The float32 hot loops of the Gaussian ops: AVX-512 and AVX2 variants (function target
// attributes, one translation unit, so no code compiled for a wider ISA can leak into the
// baseline through shared inline functions) and the scalar loop, picked at run time.
//
// The vector exp is glibc's libmvec (_ZGVeN16v_expf / _ZGVdN8v_expf, within 1 ulp as the
// scalar expf); lanes where exp(lv / 2) would overflow and the leftover tail go through the
// scalar formulas, so every variant computes the same formulas in the same order.
#include "cpu_isa.h"
#include "gaussian_math.h"

#if defined(FASTFVAE_HAVE_SIMD)
#include <immintrin.h>

extern "C" {
__attribute__((target("avx512f"))) __m512 _ZGVeN16v_expf(__m512);
__attribute__((target("avx2"))) __m256 _ZGVdN8v_expf(__m256);
}
#endif

namespace fastfvae_native {

static void forward_scalar(const float* mu, const float* lv, const float* eps, float* z, float* term,
                           int64_t begin, int64_t n) {
  for (int64_t i = begin; i < n; ++i) {
    forward_one(mu[i], lv[i], z != nullptr ? eps[i] : 0.0f, z != nullptr ? z + i : nullptr,
                term != nullptr ? term + i : nullptr);
  }
}

static void backward_scalar(const float* mu, const float* lv, const float* eps, const float* gz, const float* gk,
                            float* gmu, float* glv, int64_t begin, int64_t n) {
  for (int64_t i = begin; i < n; ++i) {
    backward_one(mu[i], lv[i], gz != nullptr ? eps + i : nullptr, gz != nullptr ? gz + i : nullptr,
                 gk != nullptr ? gk + i : nullptr, gmu + i, glv + i);
  }
}

#if defined(FASTFVAE_HAVE_SIMD)

__attribute__((target("avx512f"))) static void forward_avx512(const float* mu, const float* lv, const float* eps,
                                                              float* z, float* term, int64_t n) {
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f), huge = _mm512_set1_ps(kHugeHalfLogvar);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 m = _mm512_loadu_ps(mu + i), l = _mm512_loadu_ps(lv + i);
    if (z != nullptr) {
      const __m512 h = _mm512_mul_ps(half, l);
      const __m512 p = _mm512_mul_ps(_ZGVeN16v_expf(h), _mm512_loadu_ps(eps + i));
      _mm512_storeu_ps(z + i, _mm512_add_ps(m, p));
      const __mmask16 big = _mm512_cmp_ps_mask(h, huge, _CMP_GT_OQ);
      if (big != 0) {
        for (int k = 0; k < 16; ++k) {
          if ((big >> k) & 1) forward_one(mu[i + k], lv[i + k], eps[i + k], z + i + k, static_cast<float*>(nullptr));
        }
      }
    }
    if (term != nullptr) {
      const __m512 s = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(m, m), _ZGVeN16v_expf(l)), l);
      _mm512_storeu_ps(term + i, _mm512_mul_ps(half, _mm512_sub_ps(s, one)));
    }
  }
  forward_scalar(mu, lv, eps, z, term, i, n);
}

__attribute__((target("avx512f"))) static void backward_avx512(const float* mu, const float* lv, const float* eps,
                                                               const float* gz, const float* gk, float* gmu,
                                                               float* glv, int64_t n) {
  const __m512 half = _mm512_set1_ps(0.5f), two = _mm512_set1_ps(2.0f), huge = _mm512_set1_ps(kHugeHalfLogvar);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 l = _mm512_loadu_ps(lv + i);
    __m512 gm = _mm512_setzero_ps(), gl = _mm512_setzero_ps();
    __mmask16 big = 0;
    if (gz != nullptr) {
      const __m512 g = _mm512_loadu_ps(gz + i), h = _mm512_mul_ps(half, l);
      gm = g;
      gl = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(g, _mm512_loadu_ps(eps + i)), _ZGVeN16v_expf(h)), half);
      big = _mm512_cmp_ps_mask(h, huge, _CMP_GT_OQ);
    }
    if (gk != nullptr) {
      const __m512 g = _mm512_loadu_ps(gk + i);
      const __m512 gm_kl = _mm512_mul_ps(g, _mm512_mul_ps(two, _mm512_loadu_ps(mu + i)));
      const __m512 gl_kl = _mm512_sub_ps(_mm512_mul_ps(g, _ZGVeN16v_expf(l)), g);  // x + (-g) == x - g
      gm = gz != nullptr ? _mm512_add_ps(gm, gm_kl) : gm_kl;
      gl = gz != nullptr ? _mm512_add_ps(gl, gl_kl) : gl_kl;
    }
    _mm512_storeu_ps(gmu + i, gm);
    _mm512_storeu_ps(glv + i, gl);
    if (big != 0) {
      for (int k = 0; k < 16; ++k) {
        if ((big >> k) & 1) backward_scalar(mu, lv, eps, gz, gk, gmu, glv, i + k, i + k + 1);
      }
    }
  }
  backward_scalar(mu, lv, eps, gz, gk, gmu, glv, i, n);
}

__attribute__((target("avx2"))) static void forward_avx2(const float* mu, const float* lv, const float* eps,
                                                         float* z, float* term, int64_t n) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), huge = _mm256_set1_ps(kHugeHalfLogvar);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 m = _mm256_loadu_ps(mu + i), l = _mm256_loadu_ps(lv + i);
    if (z != nullptr) {
      const __m256 h = _mm256_mul_ps(half, l);
      const __m256 p = _mm256_mul_ps(_ZGVdN8v_expf(h), _mm256_loadu_ps(eps + i));
      _mm256_storeu_ps(z + i, _mm256_add_ps(m, p));
      const int big = _mm256_movemask_ps(_mm256_cmp_ps(h, huge, _CMP_GT_OQ));
      if (big != 0) {
        for (int k = 0; k < 8; ++k) {
          if ((big >> k) & 1) forward_one(mu[i + k], lv[i + k], eps[i + k], z + i + k, static_cast<float*>(nullptr));
        }
      }
    }
    if (term != nullptr) {
      const __m256 s = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(m, m), _ZGVdN8v_expf(l)), l);
      _mm256_storeu_ps(term + i, _mm256_mul_ps(half, _mm256_sub_ps(s, one)));
    }
  }
  forward_scalar(mu, lv, eps, z, term, i, n);
}

__attribute__((target("avx2"))) static void backward_avx2(const float* mu, const float* lv, const float* eps,
                                                          const float* gz, const float* gk, float* gmu, float* glv,
                                                          int64_t n) {
  const __m256 half = _mm256_set1_ps(0.5f), two = _mm256_set1_ps(2.0f), huge = _mm256_set1_ps(kHugeHalfLogvar);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 l = _mm256_loadu_ps(lv + i);
    __m256 gm = _mm256_setzero_ps(), gl = _mm256_setzero_ps();
    int big = 0;
    if (gz != nullptr) {
      const __m256 g = _mm256_loadu_ps(gz + i), h = _mm256_mul_ps(half, l);
      gm = g;
      gl = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(g, _mm256_loadu_ps(eps + i)), _ZGVdN8v_expf(h)), half);
      big = _mm256_movemask_ps(_mm256_cmp_ps(h, huge, _CMP_GT_OQ));
    }
    if (gk != nullptr) {
      const __m256 g = _mm256_loadu_ps(gk + i);
      const __m256 gm_kl = _mm256_mul_ps(g, _mm256_mul_ps(two, _mm256_loadu_ps(mu + i)));
      const __m256 gl_kl = _mm256_sub_ps(_mm256_mul_ps(g, _ZGVdN8v_expf(l)), g);
      gm = gz != nullptr ? _mm256_add_ps(gm, gm_kl) : gm_kl;
      gl = gz != nullptr ? _mm256_add_ps(gl, gl_kl) : gl_kl;
    }
    _mm256_storeu_ps(gmu + i, gm);
    _mm256_storeu_ps(glv + i, gl);
    if (big != 0) {
      for (int k = 0; k < 8; ++k) {
        if ((big >> k) & 1) backward_scalar(mu, lv, eps, gz, gk, gmu, glv, i + k, i + k + 1);
      }
    }
  }
  backward_scalar(mu, lv, eps, gz, gk, gmu, glv, i, n);
}

#endif  // FASTFVAE_HAVE_SIMD

void forward_f32(const float* mu, const float* lv, const float* eps, float* z, float* term, int64_t n) {
#if defined(FASTFVAE_HAVE_SIMD)
  switch (active_isa()) {
    case Isa::Avx512: return forward_avx512(mu, lv, eps, z, term, n);
    case Isa::Avx2: return forward_avx2(mu, lv, eps, z, term, n);
    default: break;
  }
#endif
  forward_scalar(mu, lv, eps, z, term, 0, n);
}

void backward_f32(const float* mu, const float* lv, const float* eps, const float* gz, const float* gk,
                  float* gmu, float* glv, int64_t n) {
#if defined(FASTFVAE_HAVE_SIMD)
  switch (active_isa()) {
    case Isa::Avx512: return backward_avx512(mu, lv, eps, gz, gk, gmu, glv, n);
    case Isa::Avx2: return backward_avx2(mu, lv, eps, gz, gk, gmu, glv, n);
    default: break;
  }
#endif
  backward_scalar(mu, lv, eps, gz, gk, gmu, glv, 0, n);
}

}  // namespace fastfvae_native
