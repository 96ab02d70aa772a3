// relu_grad_bias (relu_bias.h): the mask and the per-block channel sums in one pass, the
// channels (the fastest dimension of channels_last) in the vector lanes.
#include "relu_bias.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv_common.h"
#include "parallel_probe.h"

namespace fastfvae_native {
namespace {

// Pixel rows per block: about this many elements, whatever the thread count (the block sums'
// order fixes the bias's bits).
constexpr int64_t kBlockElements = 8192;
// Blocks per task so a task holds at least this many elements (small tensors stay on one thread).
constexpr int64_t kElementsPerTask = 65536;

using conv::bf16f;
using conv::use_avx512;

// All ones where threshold_backward passes the element (not out <= 0: a NaN passes), else
// zero: a mask, not a branch (the ReLU's output is zero about half the time).
template <typename U>
inline U keep_mask(float out) {
  return static_cast<U>(U{0} - static_cast<U>(!(out <= 0.0f)));
}

// A block of `rows` rows of C channels (g, o, m at its first element): acc (C floats, or null:
// the mask alone) gets each channel's sum over the rows, added row after row in float32.
// bfloat16 is handled as its bits (a passed element keeps them, a masked one is +0).
void block_scalar(const uint16_t* g, const uint16_t* o, uint16_t* m, int64_t rows, int64_t C, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = r * C + c;
      const uint16_t v = g[i] & keep_mask<uint16_t>(bf16f(o[i]));
      m[i] = v;
      if (acc != nullptr) acc[c] += bf16f(v);
    }
  }
}

void block_scalar(const float* g, const float* o, float* m, int64_t rows, int64_t C, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = r * C + c;
      uint32_t bits;
      std::memcpy(&bits, g + i, sizeof bits);
      bits &= keep_mask<uint32_t>(o[i]);
      float v;
      std::memcpy(&v, &bits, sizeof v);
      m[i] = v;
      if (acc != nullptr) acc[c] += v;
    }
  }
}

#if defined(FASTFVAE_MLP_SIMD)
// 16 lanes of grad (bf16: widened to float32 in load_f32), out's mask, the masked lanes stored.
// Full vectors use plain loads and stores (masked ones are slow on some cores: AMD Zen 4), only
// a channel tail (TAIL, the lanes in `tail`) the masked forms.
template <bool TAIL>
FFV_TARGET_AVX512 inline __m512 step_f32(const float* g, const float* o, float* m, __mmask16 tail) {
  const __m512 gv = TAIL ? _mm512_maskz_loadu_ps(tail, g) : _mm512_loadu_ps(g);
  const __m512 ov = TAIL ? _mm512_maskz_loadu_ps(tail, o) : _mm512_loadu_ps(o);
  const __m512 mv = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(ov, _mm512_setzero_ps(), _CMP_NLE_UQ), gv);
  if (TAIL) {
    _mm512_mask_storeu_ps(m, tail, mv);
  } else {
    _mm512_storeu_ps(m, mv);
  }
  return mv;
}

FFV_TARGET_AVX512 inline __m512 widen(__m256i raw) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <bool TAIL>
FFV_TARGET_AVX512 inline __m512 step_bf16(const uint16_t* g, const uint16_t* o, uint16_t* m, __mmask16 tail) {
  const __m256i graw = TAIL ? _mm256_maskz_loadu_epi16(tail, g) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g));
  const __m256i oraw = TAIL ? _mm256_maskz_loadu_epi16(tail, o) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(o));
  const __m256i mraw = _mm256_maskz_mov_epi16(_mm512_cmp_ps_mask(widen(oraw), _mm512_setzero_ps(), _CMP_NLE_UQ), graw);
  if (TAIL) {
    _mm256_mask_storeu_epi16(m, tail, mraw);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(m), mraw);
  }
  return widen(mraw);
}

// The same sums for channels [c0, c0 + 16 NV) (with TAIL the last vector holds the C % 16
// channels left), NV accumulators in registers, one add per element in row order as
// block_scalar: the two give the same bits.
// Software prefetch distance: the step's tensors come from memory, and the hardware prefetcher
// alone left the pass behind threshold_backward's there (cold, bf16: 0.47 vs 0.37 ms at
// 64 x 32 x 32 x 32); prefetching grad and out this far ahead made it 0.31. A prefetch past the
// tensor's end is a hint and never faults.
constexpr int64_t kAhead = 2048;

template <bool BF16, int NV, bool TAIL>
FFV_TARGET_AVX512 void block_512(const void* g, const void* o, void* m, int64_t rows, int64_t C, int64_t c0, float* acc) {
  const __mmask16 tail = TAIL ? __mmask16((1u << (C % 16)) - 1) : __mmask16(0xffff);
  __m512 sum[NV];
  for (int v = 0; v < NV; ++v) sum[v] = _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const int64_t i = r * C + c0 + 16 * v;
      if (!BF16 || v % 2 == 0) {  // each 64-byte line of grad and out, kAhead bytes ahead
        _mm_prefetch(static_cast<const char*>(g) + i * (BF16 ? 2 : 4) + kAhead, _MM_HINT_T0);
        _mm_prefetch(static_cast<const char*>(o) + i * (BF16 ? 2 : 4) + kAhead, _MM_HINT_T0);
      }
      const bool part = TAIL && v == NV - 1;
      __m512 mv;
      if constexpr (BF16) {
        const auto* gp = static_cast<const uint16_t*>(g) + i;
        const auto* op = static_cast<const uint16_t*>(o) + i;
        auto* mp = static_cast<uint16_t*>(m) + i;
        mv = part ? step_bf16<true>(gp, op, mp, tail) : step_bf16<false>(gp, op, mp, tail);
      } else {
        const float* gp = static_cast<const float*>(g) + i;
        const float* op = static_cast<const float*>(o) + i;
        float* mp = static_cast<float*>(m) + i;
        mv = part ? step_f32<true>(gp, op, mp, tail) : step_f32<false>(gp, op, mp, tail);
      }
      if (acc != nullptr) sum[v] = _mm512_add_ps(sum[v], mv);
    }
  }
  for (int v = 0; acc != nullptr && v < NV; ++v) {
    if (TAIL && v == NV - 1) {
      _mm512_mask_storeu_ps(acc + c0 + 16 * v, tail, sum[v]);
    } else {
      _mm512_storeu_ps(acc + c0 + 16 * v, sum[v]);
    }
  }
}

template <bool BF16, int NV>
void block_nv(const void* g, const void* o, void* m, int64_t rows, int64_t C, int64_t c0, float* acc) {
  if (c0 + 16 * NV > C) {
    block_512<BF16, NV, true>(g, o, m, rows, C, c0, acc);
  } else {
    block_512<BF16, NV, false>(g, o, m, rows, C, c0, acc);
  }
}

// A block's rows, 64 channels (four vectors) at a time.
template <bool BF16>
void block_avx512(const void* g, const void* o, void* m, int64_t rows, int64_t C, float* acc) {
  for (int64_t c0 = 0; c0 < C; c0 += 64) {
    switch (std::min<int64_t>(4, (C - c0 + 15) / 16)) {
      case 1: block_nv<BF16, 1>(g, o, m, rows, C, c0, acc); break;
      case 2: block_nv<BF16, 2>(g, o, m, rows, C, c0, acc); break;
      case 3: block_nv<BF16, 3>(g, o, m, rows, C, c0, acc); break;
      default: block_nv<BF16, 4>(g, o, m, rows, C, c0, acc); break;
    }
  }
}
#endif

void check_inputs(const at::Tensor& grad, const at::Tensor& out, bool meta) {
  TORCH_CHECK((meta || grad.device().is_cpu()) && grad.dim() == 4 &&
                  (grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kBFloat16),
              "fastfvae_native relu_grad_bias: grad must be a float32 or bfloat16 [B, C, H, W] CPU tensor, got ",
              grad.scalar_type(), " ", grad.sizes(), " on ", grad.device());
  TORCH_CHECK(out.sizes() == grad.sizes() && out.scalar_type() == grad.scalar_type() && out.device() == grad.device(),
              "fastfvae_native relu_grad_bias: out must be grad's ", grad.scalar_type(), " ", grad.sizes(), " on ",
              grad.device(), ", got ", out.scalar_type(), " ", out.sizes(), " on ", out.device());
  TORCH_CHECK(grad.is_contiguous(at::MemoryFormat::ChannelsLast) && out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "fastfvae_native relu_grad_bias: grad and out must be channels_last contiguous (the channels the "
              "fastest dimension), got strides ", grad.strides(), " and ", out.strides());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> relu_grad_bias_meta(const at::Tensor& grad, const at::Tensor& out,
                                                       bool need_bias) {
  check_inputs(grad, out, true);
  at::Tensor masked = at::empty(grad.sizes(), grad.options(), at::MemoryFormat::ChannelsLast);
  at::Tensor bias = at::empty({need_bias ? grad.size(1) : 0}, grad.options().dtype(at::kFloat));
  return {masked, bias};
}

std::tuple<at::Tensor, at::Tensor> relu_grad_bias(const at::Tensor& grad, const at::Tensor& out, bool need_bias) {
  check_inputs(grad, out, false);
  const int64_t C = grad.size(1), rows = grad.size(0) * grad.size(2) * grad.size(3);
  at::Tensor masked = at::empty(grad.sizes(), grad.options(), at::MemoryFormat::ChannelsLast);
  at::Tensor bias = at::zeros({need_bias ? C : 0}, grad.options().dtype(at::kFloat));
  if (C == 0 || rows == 0) return {masked, bias};
  const int64_t block_rows = std::max<int64_t>(1, kBlockElements / C);
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / (block_rows * C));
  std::vector<float> partial(need_bias ? blocks * C : 0, 0.0f);  // [block][channel]
  const bool bf16 = grad.scalar_type() == at::kBFloat16, simd = use_avx512();
  const void* g = grad.const_data_ptr();
  const void* o = out.const_data_ptr();
  void* m = masked.mutable_data_ptr();
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * block_rows, n = std::min(rows, r0 + block_rows) - r0, off = r0 * C;
      float* acc = need_bias ? partial.data() + b * C : nullptr;
      if (bf16) {
        const auto* gp = static_cast<const uint16_t*>(g) + off;
        const auto* op = static_cast<const uint16_t*>(o) + off;
        auto* mp = static_cast<uint16_t*>(m) + off;
#if defined(FASTFVAE_MLP_SIMD)
        if (simd) {
          block_avx512<true>(gp, op, mp, n, C, acc);
          continue;
        }
#endif
        block_scalar(gp, op, mp, n, C, acc);
      } else {
        const float* gp = static_cast<const float*>(g) + off;
        const float* op = static_cast<const float*>(o) + off;
        float* mp = static_cast<float*>(m) + off;
#if defined(FASTFVAE_MLP_SIMD)
        if (simd) {
          block_avx512<false>(gp, op, mp, n, C, acc);
          continue;
        }
#endif
        block_scalar(gp, op, mp, n, C, acc);
      }
    }
  });
  (void)simd;
  if (need_bias) {
    std::vector<double> total(C, 0.0);
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t c = 0; c < C; ++c) total[c] += static_cast<double>(partial[b * C + c]);
    }
    float* pb = bias.mutable_data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) pb[c] = static_cast<float>(total[c]);
  }
  return {masked, bias};
}

std::string relu_grad_isa() { return use_avx512() ? "avx512" : "scalar"; }

FASTFVAE_PARALLEL_PROBE(parallel_probe_relu_bias)

}  // namespace fastfvae_native
