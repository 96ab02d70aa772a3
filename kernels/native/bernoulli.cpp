// bernoulli_nll_sum / bernoulli_nll_grad (bernoulli.h): the per-element formulas over the flat
// memory in fixed blocks, 16 elements to a vector.
#include "bernoulli.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "conv_common.h"
#include "parallel_probe.h"
#include "simd_bf16.h"

// The vector exp and log: glibc's libmvec (GLIBC_2.22), linked when CMake found it
// (FASTFVAE_HAVE_SIMD); without it the scalar loop runs.
#if defined(FASTFVAE_MLP_SIMD) && defined(FASTFVAE_HAVE_SIMD)
#define FFV_BERNOULLI_SIMD 1
extern "C" {
__attribute__((target("avx512f"))) __m512 _ZGVeN16v_expf(__m512);
__attribute__((target("avx512f"))) __m512 _ZGVeN16v_logf(__m512);
}
#endif

namespace fastfvae_native {
namespace {

// Elements per block (a multiple of 16): the block sums' order fixes the sum's bits, whatever
// the thread count.
constexpr int64_t kBlockElements = 8192;
// Blocks per task so a task holds at least this many elements (small tensors stay on one thread).
constexpr int64_t kElementsPerTask = 65536;

using conv::bf16f;
using conv::use_avx512;

inline float load1(const float* p, int64_t i) { return p[i]; }
inline float load1(const uint16_t* p, int64_t i) { return bf16f(p[i]); }
inline void store1(float* p, int64_t i, float v) { p[i] = v; }
inline void store1(uint16_t* p, int64_t i, float v) { p[i] = c10::BFloat16(v).x; }

// log1p(t) for t in [0, 1] (or NaN) from log alone: u = 1 + t is exact up to one rounding and
// u - 1 exactly what was added, so log(u) * t / (u - 1) is accurate to a few ulps (t when u == 1).
inline float log1p_of(float t) {
  const float u = 1.0f + t;
  return u == 1.0f ? t : std::log(u) * t / (u - 1.0f);
}

// (1 - x) l - (min(l, 0) - log1p(exp(-|l|))): torch's per-element BCE with logits.
inline float nll_one(float l, float x) {
  const float log_sigmoid = std::min(l, 0.0f) - log1p_of(std::exp(-std::fabs(l)));
  return (1.0f - x) * l - log_sigmoid;
}

// (1 / (1 + exp(-l)) - x) * scale.
inline float grad_one(float l, float x, float scale) { return (1.0f / (1.0f + std::exp(-l)) - x) * scale; }

// The block's 16 lane partials in one fixed order (both variants).
inline float reduce16(float* lanes) {
  for (int w = 8; w >= 1; w /= 2) {
    for (int k = 0; k < w; ++k) lanes[k] += lanes[k + w];
  }
  return lanes[0];
}

// One block of n elements: element i adds to lane i % 16 over the whole vectors, the lanes are
// reduced (`reduce16`), then the tail is added element by element.
template <typename L, typename X>
float block_sum_scalar(const L* l, const X* x, int64_t n) {
  float lanes[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int k = 0; k < 16; ++k) lanes[k] += nll_one(load1(l, i + k), load1(x, i + k));
  }
  float s = reduce16(lanes);
  for (; i < n; ++i) s += nll_one(load1(l, i), load1(x, i));
  return s;
}

template <typename L, typename X>
void block_grad_scalar(const L* l, const X* x, L* g, int64_t begin, int64_t n, float scale) {
  for (int64_t i = begin; i < n; ++i) store1(g, i, grad_one(load1(l, i), load1(x, i), scale));
}

#if defined(FFV_BERNOULLI_SIMD)
FFV_TARGET_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
FFV_TARGET_AVX512 inline __m512 load16(const uint16_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
FFV_TARGET_AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
FFV_TARGET_AVX512 inline void store16(uint16_t* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), simd::to_bf16(v));
}

// nll_one on 16 lanes: the same operations in the same order, exp and log from libmvec.
FFV_TARGET_AVX512 inline __m512 nll16(__m512 l, __m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  const __m512 t = _ZGVeN16v_expf(_mm512_sub_ps(zero, _mm512_abs_ps(l)));
  const __m512 u = _mm512_add_ps(one, t);
  const __m512 q = _mm512_div_ps(_mm512_mul_ps(_ZGVeN16v_logf(u), t), _mm512_sub_ps(u, one));
  const __m512 log1p = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u, one, _CMP_EQ_OQ), q, t);
  // min(l, 0) is l for a NaN l (as std::min(l, 0.0f)); the (1 - x) l term is NaN there anyway
  const __m512 lmin = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(l, zero, _CMP_GT_OQ), l, zero);
  const __m512 log_sigmoid = _mm512_sub_ps(lmin, log1p);
  return _mm512_sub_ps(_mm512_mul_ps(_mm512_sub_ps(one, x), l), log_sigmoid);
}

template <typename L, typename X>
FFV_TARGET_AVX512 float block_sum_512(const L* l, const X* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_add_ps(acc, nll16(load16(l + i), load16(x + i)));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, acc);
  float s = reduce16(lanes);
  for (; i < n; ++i) s += nll_one(load1(l, i), load1(x, i));
  return s;
}

template <typename L, typename X>
FFV_TARGET_AVX512 void block_grad_512(const L* l, const X* x, L* g, int64_t n, float scale) {
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps(), sv = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 lv = load16(l + i);
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, _ZGVeN16v_expf(_mm512_sub_ps(zero, lv))));
    store16(g + i, _mm512_mul_ps(_mm512_sub_ps(sig, load16(x + i)), sv));
  }
  block_grad_scalar(l, x, g, i, n, scale);
}
#endif

bool run_simd() {
#if defined(FFV_BERNOULLI_SIMD)
  return use_avx512();
#else
  return false;
#endif
}

// The same sizes and the same strides, but for dimensions of size 1 (whose stride addresses
// nothing: a [B, 1, H, W] tensor's channels_last and contiguous strides are one memory layout).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

void check_inputs(const at::Tensor& logits, const at::Tensor& x, bool meta) {
  const auto lt = logits.scalar_type(), xt = x.scalar_type();
  TORCH_CHECK((meta || (logits.device().is_cpu() && x.device().is_cpu())) && x.device() == logits.device() &&
                  (lt == at::kFloat || lt == at::kBFloat16) && (xt == at::kFloat || xt == lt) &&
                  same_layout(logits, x) && logits.is_non_overlapping_and_dense(),
              "fastfvae_native bernoulli_nll: logits must be a float32 or bfloat16 CPU tensor and x a float32 "
              "(or logits' dtype) one of the same sizes and strides, non-overlapping and dense; got logits ",
              lt, " ", logits.sizes(), " strides ", logits.strides(), " on ", logits.device(), ", x ", xt, " ",
              x.sizes(), " strides ", x.strides(), " on ", x.device());
}

// f(l, x) with the flat pointers of the dtypes' pair: (float, float), (bf16, float), (bf16, bf16).
template <typename F>
void with_types(const at::Tensor& logits, const at::Tensor& x, F&& f) {
  const bool lbf = logits.scalar_type() == at::kBFloat16, xbf = x.scalar_type() == at::kBFloat16;
  const void* l = logits.const_data_ptr();
  const void* xp = x.const_data_ptr();
  if (!lbf) {
    f(static_cast<const float*>(l), static_cast<const float*>(xp));
  } else if (!xbf) {
    f(static_cast<const uint16_t*>(l), static_cast<const float*>(xp));
  } else {
    f(static_cast<const uint16_t*>(l), static_cast<const uint16_t*>(xp));
  }
}

}  // namespace

at::Tensor bernoulli_nll_sum_meta(const at::Tensor& logits, const at::Tensor& x) {
  check_inputs(logits, x, true);
  return at::empty({}, logits.options().dtype(at::kFloat));
}

at::Tensor bernoulli_nll_grad_meta(const at::Tensor& logits, const at::Tensor& x, double scale) {
  check_inputs(logits, x, true);
  (void)scale;
  return at::empty_strided(logits.sizes(), logits.strides(), logits.options());
}

at::Tensor bernoulli_nll_sum(const at::Tensor& logits, const at::Tensor& x) {
  check_inputs(logits, x, false);
  at::Tensor out = at::empty({}, logits.options().dtype(at::kFloat));
  const int64_t n = logits.numel();
  const int64_t blocks = (n + kBlockElements - 1) / kBlockElements;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / kBlockElements);
  std::vector<float> partial(blocks, 0.0f);
  const bool simd = run_simd();
  with_types(logits, x, [&](const auto* l, const auto* xp) {
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t off = b * kBlockElements, m = std::min(n, off + kBlockElements) - off;
#if defined(FFV_BERNOULLI_SIMD)
        if (simd) {
          partial[b] = block_sum_512(l + off, xp + off, m);
          continue;
        }
#endif
        partial[b] = block_sum_scalar(l + off, xp + off, m);
      }
    });
  });
  (void)simd;
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) total += static_cast<double>(partial[b]);
  *out.mutable_data_ptr<float>() = static_cast<float>(total);
  return out;
}

at::Tensor bernoulli_nll_grad(const at::Tensor& logits, const at::Tensor& x, double scale) {
  check_inputs(logits, x, false);
  at::Tensor grad = at::empty_strided(logits.sizes(), logits.strides(), logits.options());
  const int64_t n = logits.numel();
  const int64_t blocks = (n + kBlockElements - 1) / kBlockElements;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / kBlockElements);
  const float s = static_cast<float>(scale);
  const bool simd = run_simd();
  void* gp = grad.mutable_data_ptr();
  with_types(logits, x, [&](const auto* l, const auto* xp) {
    using L = std::remove_const_t<std::remove_pointer_t<decltype(l)>>;
    L* g = static_cast<L*>(gp);
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t off = b * kBlockElements, m = std::min(n, off + kBlockElements) - off;
#if defined(FFV_BERNOULLI_SIMD)
        if (simd) {
          block_grad_512(l + off, xp + off, g + off, m, s);
          continue;
        }
#endif
        block_grad_scalar(l + off, xp + off, g + off, 0, m, s);
      }
    });
  });
  (void)simd;
  return grad;
}

std::string bernoulli_isa() { return run_simd() ? "avx512" : "scalar"; }

FASTFVAE_PARALLEL_PROBE(parallel_probe_bernoulli)

}  // namespace fastfvae_native
