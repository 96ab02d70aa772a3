// conv_transpose_4s2 (conv_s2.h): three variants, chosen at run time with the GEMM's variant
// (mlp_gemm.h): bfloat16 with vdpbf16ps (AVX-512-BF16, an even Cin), float32 on AVX-512 (FMA),
// and a scalar loop for the rest (bfloat16 without vdpbf16ps, CPUs without AVX-512); the
// Python side (native_conv.s2_fits) calls it only where it measured faster than oneDNN.
//
// AVX-512 tile: MR output pixels of one phase x NR vectors of 16 output channels, MR x NR
// float32 accumulators. bfloat16: per (tap, input-channel pair) NR weight vectors (packed per
// phase as [tap][Cin / 2][Cout][2]) and MR broadcasts of the input pair; float32: the same per
// input channel (weights [tap][Cin][Cout]). The input is read in place (pixels outside it read
// a zero row instead).
#include "conv_s2.h"
#include "parallel_probe.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "mlp_gemm.h"
#include "simd_bf16.h"

#if defined(FASTFVAE_MLP_SIMD)
#include <immintrin.h>
#endif

namespace fastfvae_native {
namespace {

// Output phase r (0 / 1) along one axis: its two taps read the input at offset kD[r][a]
// through kernel index kK[r][a].
constexpr int kD[2][2] = {{0, -1}, {1, 0}};
constexpr int kK[2][2] = {{1, 3}, {0, 2}};

inline float bf16f(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

struct Dims {
  int64_t B, Ci, Co, H, W;  // input grid H x W, output 2H x 2W
};

template <typename T>
float ld(const T* p, int64_t i) {
  if constexpr (std::is_same<T, float>::value) return p[i];
  return bf16f(reinterpret_cast<const uint16_t*>(p)[i]);
}

// w: float32 [Ci, Co, 4, 4]; bias float32 [Co] or null.
template <typename T>
void deconv_scalar(const T* x, const float* w, const float* bias, bool relu, T* out, Dims d, int64_t b0, int64_t b1) {
  std::vector<float> acc(d.Co);
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t oh = 0; oh < 2 * d.H; ++oh) {
      for (int64_t ow = 0; ow < 2 * d.W; ++ow) {
        const int rh = oh & 1, rw = ow & 1;
        for (int64_t co = 0; co < d.Co; ++co) acc[co] = bias ? bias[co] : 0.0f;
        for (int a = 0; a < 2; ++a) {
          const int64_t i = (oh >> 1) + kD[rh][a];
          if (i < 0 || i >= d.H) continue;
          for (int c = 0; c < 2; ++c) {
            const int64_t j = (ow >> 1) + kD[rw][c];
            if (j < 0 || j >= d.W) continue;
            const int k = kK[rh][a] * 4 + kK[rw][c];
            const int64_t base = ((b * d.H + i) * d.W + j) * d.Ci;
            for (int64_t ci = 0; ci < d.Ci; ++ci) {
              const float v = ld(x, base + ci);
              const float* wr = w + ci * d.Co * 16 + k;
              for (int64_t co = 0; co < d.Co; ++co) acc[co] += v * wr[co * 16];
            }
          }
        }
        T* o = out + ((b * 2 * d.H + oh) * 2 * d.W + ow) * d.Co;
        for (int64_t co = 0; co < d.Co; ++co) o[co] = static_cast<T>(relu ? std::max(acc[co], 0.0f) : acc[co]);
      }
    }
  }
}

#if defined(FASTFVAE_MLP_SIMD) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define FFV_S2_BF16 1
#define FFV_S2 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

FFV_S2 inline __m512i bcast32(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(static_cast<int>(v));
}

struct Tile {
  const uint16_t* x;       // this item's input [H][W][Ci]
  const uint16_t* zero;    // Ci zeros
  const uint16_t* wp;      // this phase's packed weight [4][Ci / 2][cop][2]
  const float* bias;       // [cop]
  uint16_t* out;           // this item's output [2H][2W][Co]
  int64_t c2, cop, co0;
  bool relu;
};

// A tile's pixels (i, j) of phase (rh, rw), pixels m0 .. m0 + MR - 1 of the H x W grid (stepped
// without divisions), and where each of its 4 taps reads: the input pixel's Ci channels in x
// (this item's [H][W][Ci]), or zero for pixels outside the input and past the n in the tile.
template <int MR, typename T>
inline void tile_sources(const T* x, const T* zero, const Dims& d, int rh, int rw, int64_t m0, int64_t n,
                         const T* (&src)[4][MR], int64_t (&pi)[MR], int64_t (&pj)[MR]) {
  for (int64_t u = 0, i = m0 / d.W, j = m0 % d.W; u < MR; ++u) {
    pi[u] = i, pj[u] = j;
    if (++j == d.W) j = 0, ++i;
  }
  for (int u = 0; u < MR; ++u) {
    for (int k = 0; k < 4; ++k) {
      const int64_t ii = pi[u] + kD[rh][k >> 1], jj = pj[u] + kD[rw][k & 1];
      src[k][u] = (u < n && ii >= 0 && ii < d.H && jj >= 0 && jj < d.W) ? x + (ii * d.W + jj) * d.Ci : zero;
    }
  }
}

template <int MR, int NR>
FFV_S2 void tile(const Tile& t, const Dims& d, int rh, int rw, int64_t m0, int64_t n) {
  const uint16_t* src[4][MR];
  int64_t pi[MR], pj[MR];
  tile_sources<MR>(t.x, t.zero, d, rh, rw, m0, n, src, pi, pj);
  __m512 acc[MR][NR];
  for (int u = 0; u < MR; ++u)
    for (int v = 0; v < NR; ++v) acc[u][v] = _mm512_loadu_ps(t.bias + t.co0 + 16 * v);
  for (int k = 0; k < 4; ++k) {
    const uint16_t* w = t.wp + (k * t.c2 * t.cop + t.co0) * 2;
    for (int64_t cp = 0; cp < t.c2; ++cp, w += t.cop * 2) {
      __m512i wv[NR];
      for (int v = 0; v < NR; ++v) wv[v] = _mm512_loadu_si512(w + 32 * v);
      for (int u = 0; u < MR; ++u) {
        const __m512i xv = bcast32(src[k][u] + 2 * cp);
        for (int v = 0; v < NR; ++v) acc[u][v] = _mm512_dpbf16_ps(acc[u][v], (__m512bh)xv, (__m512bh)wv[v]);
      }
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int u = 0; u < n; ++u) {
    const int64_t i = pi[u], j = pj[u];
    uint16_t* o = t.out + ((2 * i + rh) * 2 * d.W + 2 * j + rw) * d.Co + t.co0;
    for (int v = 0; v < NR; ++v) {
      const int64_t left = d.Co - t.co0 - 16 * v;
      if (left <= 0) break;
      const __mmask16 mk = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
      _mm256_mask_storeu_epi16(o + 16 * v, mk, simd::to_bf16(t.relu ? _mm512_max_ps(acc[u][v], zero) : acc[u][v]));
    }
  }
}

template <int MR, int NR>
FFV_S2 void phase_block(const Tile& t, const Dims& d, int rh, int rw) {
  const int64_t M = d.H * d.W;
  for (int64_t m0 = 0; m0 < M; m0 += MR) tile<MR, NR>(t, d, rh, rw, m0, std::min<int64_t>(MR, M - m0));
}

FFV_S2 void deconv_512bf16(const uint16_t* x, const uint16_t* wp, const float* bias, bool relu, uint16_t* out, Dims d,
                           int64_t b0, int64_t b1) {
  const int64_t c2 = d.Ci / 2, cop = (d.Co + 15) / 16 * 16;
  std::vector<uint16_t> zero(d.Ci + 2, 0);
  for (int64_t b = b0; b < b1; ++b) {
    for (int p = 0; p < 4; ++p) {
      const int rh = p >> 1, rw = p & 1;
      for (int64_t co0 = 0; co0 < d.Co; co0 += 64) {
        const Tile t{x + b * d.H * d.W * d.Ci, zero.data(), wp + p * 4 * c2 * cop * 2, bias,
                     out + b * 4 * d.H * d.W * d.Co, c2, cop, co0, relu};
        switch (std::min<int64_t>(4, (d.Co - co0 + 15) / 16)) {
          case 1: phase_block<12, 1>(t, d, rh, rw); break;
          case 2: phase_block<12, 2>(t, d, rh, rw); break;
          case 3: phase_block<8, 3>(t, d, rh, rw); break;
          default: phase_block<6, 4>(t, d, rh, rw); break;
        }
      }
    }
  }
}

// float32: the same tiles with FMA on one input channel at a time (weights [phase][tap][Ci][cop]).
struct TileF {
  const float* x;
  const float* zero;
  const float* wp;
  const float* bias;
  float* out;
  int64_t ci, cop, co0;
  bool relu;
};

template <int MR, int NR>
FFV_S2 void tile_f32(const TileF& t, const Dims& d, int rh, int rw, int64_t m0, int64_t n) {
  const float* src[4][MR];
  int64_t pi[MR], pj[MR];
  tile_sources<MR>(t.x, t.zero, d, rh, rw, m0, n, src, pi, pj);
  __m512 acc[MR][NR];
  for (int u = 0; u < MR; ++u)
    for (int v = 0; v < NR; ++v) acc[u][v] = _mm512_loadu_ps(t.bias + t.co0 + 16 * v);
  for (int k = 0; k < 4; ++k) {
    const float* w = t.wp + k * t.ci * t.cop + t.co0;
    for (int64_t c = 0; c < t.ci; ++c, w += t.cop) {
      __m512 wv[NR];
      for (int v = 0; v < NR; ++v) wv[v] = _mm512_loadu_ps(w + 16 * v);
      for (int u = 0; u < MR; ++u) {
        const __m512 xv = _mm512_set1_ps(src[k][u][c]);
        for (int v = 0; v < NR; ++v) acc[u][v] = _mm512_fmadd_ps(xv, wv[v], acc[u][v]);
      }
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int u = 0; u < n; ++u) {
    float* o = t.out + ((2 * pi[u] + rh) * 2 * d.W + 2 * pj[u] + rw) * d.Co + t.co0;
    for (int v = 0; v < NR; ++v) {
      const int64_t left = d.Co - t.co0 - 16 * v;
      if (left <= 0) break;
      const __mmask16 mk = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
      _mm512_mask_storeu_ps(o + 16 * v, mk, t.relu ? _mm512_max_ps(acc[u][v], zero) : acc[u][v]);
    }
  }
}

template <int MR, int NR>
FFV_S2 void phase_block_f32(const TileF& t, const Dims& d, int rh, int rw) {
  const int64_t M = d.H * d.W;
  for (int64_t m0 = 0; m0 < M; m0 += MR) tile_f32<MR, NR>(t, d, rh, rw, m0, std::min<int64_t>(MR, M - m0));
}

FFV_S2 void deconv_512f32(const float* x, const float* wp, const float* bias, bool relu, float* out, Dims d,
                          int64_t b0, int64_t b1) {
  const int64_t cop = (d.Co + 15) / 16 * 16;
  std::vector<float> zero(d.Ci, 0.0f);
  for (int64_t b = b0; b < b1; ++b) {
    for (int p = 0; p < 4; ++p) {
      for (int64_t co0 = 0; co0 < d.Co; co0 += 64) {
        const TileF t{x + b * d.H * d.W * d.Ci, zero.data(), wp + p * 4 * d.Ci * cop, bias,
                      out + b * 4 * d.H * d.W * d.Co, d.Ci, cop, co0, relu};
        switch (std::min<int64_t>(4, (d.Co - co0 + 15) / 16)) {
          case 1: phase_block_f32<12, 1>(t, d, p >> 1, p & 1); break;
          case 2: phase_block_f32<12, 2>(t, d, p >> 1, p & 1); break;
          case 3: phase_block_f32<8, 3>(t, d, p >> 1, p & 1); break;
          default: phase_block_f32<6, 4>(t, d, p >> 1, p & 1); break;
        }
      }
    }
  }
}
#endif

}  // namespace

at::Tensor conv_transpose_4s2(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              bool relu) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "fastfvae_native conv_transpose_4s2: x must be a float32 or bfloat16 [B, Cin, H, W] CPU tensor, got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(weight.device().is_cpu() && weight.is_floating_point() && weight.dim() == 4 &&
                  weight.size(0) == x.size(1) && weight.size(2) == 4 && weight.size(3) == 4,
              "fastfvae_native conv_transpose_4s2: weight must be a floating [", x.size(1),
              ", Cout, 4, 4] CPU tensor, got ", weight.scalar_type(), " ", weight.sizes(), " on ", weight.device());
  const Dims d{x.size(0), x.size(1), weight.size(1), x.size(2), x.size(3)};
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const float* wf = w.data_ptr<float>();
  const int64_t cop = (d.Co + 15) / 16 * 16;
  std::vector<float> bv(cop, 0.0f);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->is_floating_point() && bias->numel() == d.Co,
                "fastfvae_native conv_transpose_4s2: bias must be a floating CPU tensor of ", d.Co,
                " elements, got ", bias->scalar_type(), " ", bias->sizes(), " on ", bias->device());
    const at::Tensor bc = bias->to(at::kFloat).contiguous();
    std::copy(bc.data_ptr<float>(), bc.data_ptr<float>() + d.Co, bv.begin());
  }
  at::Tensor out = at::empty({d.B, d.Co, 2 * d.H, 2 * d.W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const bool bf16 = x.scalar_type() == at::kBFloat16;
#if defined(FFV_S2_BF16)
  if (bf16 && d.Ci % 2 == 0 && mlp::gemm_isa() == mlp::GemmIsa::Avx512Bf16) {
    const int64_t c2 = d.Ci / 2;
    std::vector<uint16_t> wp(4 * 4 * c2 * cop * 2, 0);  // [phase][tap][ci / 2][co][ci % 2]
    for (int p = 0; p < 4; ++p)
      for (int k = 0; k < 4; ++k) {
        const int kk = kK[p >> 1][k >> 1] * 4 + kK[p & 1][k & 1];
        for (int64_t ci = 0; ci < d.Ci; ++ci)
          for (int64_t co = 0; co < d.Co; ++co)
            wp[(((p * 4 + k) * c2 + ci / 2) * cop + co) * 2 + ci % 2] = at::BFloat16(wf[(ci * d.Co + co) * 16 + kk]).x;
      }
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
    uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
    at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) {
      deconv_512bf16(xp, wp.data(), bv.data(), relu, op, d, b0, b1);
    });
    return out;
  }
#endif
#if defined(FFV_S2_BF16)
  if (!bf16 && static_cast<int>(mlp::gemm_isa()) >= static_cast<int>(mlp::GemmIsa::Avx512)) {
    std::vector<float> wp(4 * 4 * d.Ci * cop, 0.0f);  // [phase][tap][ci][co]
    for (int p = 0; p < 4; ++p)
      for (int k = 0; k < 4; ++k) {
        const int kk = kK[p >> 1][k >> 1] * 4 + kK[p & 1][k & 1];
        for (int64_t ci = 0; ci < d.Ci; ++ci)
          for (int64_t co = 0; co < d.Co; ++co) wp[((p * 4 + k) * d.Ci + ci) * cop + co] = wf[(ci * d.Co + co) * 16 + kk];
      }
    const float* xp = xc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) {
      deconv_512f32(xp, wp.data(), bv.data(), relu, op, d, b0, b1);
    });
    return out;
  }
#endif
  const float* bp = has_bias ? bv.data() : nullptr;
  at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) {
    if (bf16) {
      deconv_scalar(xc.data_ptr<at::BFloat16>(), wf, bp, relu, out.data_ptr<at::BFloat16>(), d, b0, b1);
    } else {
      deconv_scalar(xc.data_ptr<float>(), wf, bp, relu, out.data_ptr<float>(), d, b0, b1);
    }
  });
  return out;
}

FASTFVAE_PARALLEL_PROBE(parallel_probe_conv_s2)

}  // namespace fastfvae_native
