// conv_transpose_4s2 (conv_s2.h): three variants, chosen at run time with the GEMM's variant
// (mlp_gemm.h): bfloat16 with vdpbf16ps (AVX-512-BF16, an even Cin), float32 on AVX-512 (FMA),
// and a scalar loop for the rest (bfloat16 without vdpbf16ps, CPUs without AVX-512); the
// Python side (native_conv.s2_fits) calls it only where it measured faster than oneDNN.
//
// AVX-512 tile: MR consecutive output pixels (row-major) of one phase x NR vectors of 16 output
// channels, MR x NR float32 accumulators. bfloat16: per (tap, input-channel pair) NR weight
// vectors (packed once per call as [phase][tap][Cin / 2][Cout][2]) and MR broadcasts of the
// input pair; float32: the same per input channel (weights [phase][tap][Cin][Cout]). Each image
// is first copied into a buffer with a zero border one pixel wide, so that every tap of every
// pixel reads at a fixed offset from the pixel's own input, with no per-pixel edge test; a tap
// whose input row is outside the image for all of a tile's pixels is skipped. A row is split
// into tiles of equal size (differing by at most one pixel) when it is at least as wide as the
// largest tile, else a tile takes as many whole rows as fit; MR is a template parameter, so the
// accumulators stay in registers through the stores.
#include "conv_s2.h"
#include "parallel_probe.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
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

// One call's AVX-512 work, shared by its threads. T: uint16_t (bfloat16 bits, vdpbf16ps) or
// float (FMA); a K step is an input-channel pair (bfloat16) or one input channel (float32).
template <typename T>
struct Plan {
  const T* x;         // the input, [B][H][W][Ci]
  const T* wp;        // packed weights [phase][tap][ks][cop] (bfloat16: each entry a channel pair)
  const float* bias;  // [cop]
  T* out;             // [B][2H][2W][Co]
  Dims d;
  int64_t ks, cop;    // K steps per tap, Co rounded up to 16
  bool relu;
};

// A tile: MR consecutive pixels (row-major) of one phase's H x W grid from (i0, j0) x NR
// vectors of 16 output channels from co0, MR x NR float32 accumulators. xp is the image's
// input with a zero border ([H + 2][W + 2][Ci]), so every tap of every pixel reads in place;
// a tap whose input row lies outside the image for all the tile's pixels is skipped.
template <int MR, int NR, typename T>
FFV_S2 void tile(const Plan<T>& t, const T* xp, T* out, int rh, int rw, int64_t i0, int64_t j0, int64_t co0) {
  const int64_t W = t.d.W, Ci = t.d.Ci, Co = t.d.Co, ks = t.ks, cop = t.cop;
  constexpr int64_t kE = std::is_same<T, float>::value ? 1 : 2;  // elements per K step
  const T* src[MR];
  T* dst[MR];
  int64_t i1 = i0;
  for (int64_t u = 0, i = i0, j = j0; u < MR; ++u) {
    src[u] = xp + ((i + 1) * (W + 2) + j + 1) * Ci;
    dst[u] = out + ((2 * i + rh) * 2 * W + 2 * j + rw) * Co + co0;
    i1 = i;
    if (++j == W) j = 0, ++i;
  }
  __m512 acc[MR][NR];
  for (int v = 0; v < NR; ++v) {
    const __m512 b = _mm512_loadu_ps(t.bias + co0 + 16 * v);
    for (int u = 0; u < MR; ++u) acc[u][v] = b;
  }
  for (int k = 0; k < 4; ++k) {
    const int di = kD[rh][k >> 1], dj = kD[rw][k & 1];
    if ((di < 0 && i1 == 0) || (di > 0 && i0 == t.d.H - 1)) continue;
    const int64_t off = (di * (W + 2) + dj) * Ci;
    const T* w = t.wp + (k * ks * cop + co0) * kE;
    for (int64_t s = 0; s < ks; ++s, w += cop * kE) {
      if constexpr (std::is_same<T, float>::value) {
        __m512 wv[NR];
        for (int v = 0; v < NR; ++v) wv[v] = _mm512_loadu_ps(w + 16 * v);
        for (int u = 0; u < MR; ++u) {
          const __m512 xv = _mm512_set1_ps(src[u][off + s]);
          for (int v = 0; v < NR; ++v) acc[u][v] = _mm512_fmadd_ps(xv, wv[v], acc[u][v]);
        }
      } else {
        __m512i wv[NR];
        for (int v = 0; v < NR; ++v) wv[v] = _mm512_loadu_si512(w + 32 * v);
        for (int u = 0; u < MR; ++u) {
          uint32_t pair;
          std::memcpy(&pair, src[u] + off + 2 * s, sizeof pair);
          const __m512i xv = _mm512_set1_epi32(static_cast<int>(pair));
          for (int v = 0; v < NR; ++v) acc[u][v] = _mm512_dpbf16_ps(acc[u][v], (__m512bh)xv, (__m512bh)wv[v]);
        }
      }
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int v = 0; v < NR; ++v) {
    const int64_t left = Co - co0 - 16 * v;
    const __mmask16 mk = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
    for (int u = 0; u < MR; ++u) {
      const __m512 r = t.relu ? _mm512_max_ps(acc[u][v], zero) : acc[u][v];
      if constexpr (std::is_same<T, float>::value) {
        _mm512_mask_storeu_ps(dst[u] + 16 * v, mk, r);
      } else {
        _mm256_mask_storeu_epi16(dst[u] + 16 * v, mk, simd::to_bf16(r));
      }
    }
  }
}

template <typename T>
using TileFn = void (*)(const Plan<T>&, const T*, T*, int, int, int64_t, int64_t, int64_t);

// kMaxMR[NR - 1]: the most pixels per tile, MR x NR accumulators + NR weight vectors + one
// broadcast within the 32 zmm registers.
constexpr int kMaxMR[4] = {12, 12, 8, 6};

template <int NR, typename T, int... M>
constexpr std::array<TileFn<T>, sizeof...(M)> tile_table(std::integer_sequence<int, M...>) {
  return {&tile<M + 1, NR, T>...};
}

template <int NR, typename T>
FFV_S2 void run_tile(int mr, const Plan<T>& t, const T* xp, T* out, int rh, int rw, int64_t i0, int64_t j0,
                     int64_t co0) {
  static constexpr auto table = tile_table<NR, T>(std::make_integer_sequence<int, kMaxMR[NR - 1]>{});
  table[mr - 1](t, xp, out, rh, rw, i0, j0, co0);
}

// The tiles covering an H x W grid with at most mmax pixels each: a row wider than mmax in
// equal pieces (sizes differing by at most one), else as many whole rows as fit.
struct TileAt {
  int64_t i0, j0;
  int mr;
};

inline std::vector<TileAt> tiling(int64_t H, int64_t W, int mmax) {
  std::vector<TileAt> ts;
  if (W >= mmax) {
    const int64_t n = (W + mmax - 1) / mmax;
    for (int64_t i = 0; i < H; ++i)
      for (int64_t p = 0, j = 0; p < n; ++p) {
        const int64_t mr = W / n + (p < W % n ? 1 : 0);
        ts.push_back({i, j, static_cast<int>(mr)});
        j += mr;
      }
  } else {
    const int64_t rows = mmax / W;
    for (int64_t i = 0; i < H; i += rows) ts.push_back({i, 0, static_cast<int>(std::min(rows, H - i) * W)});
  }
  return ts;
}

// Images b0 .. b1 - 1: each copied into a zero-bordered buffer, then per phase and block of
// up to 64 output channels, its tiles.
template <typename T>
FFV_S2 void deconv_512(const Plan<T>& t, const std::vector<TileAt> (&tilings)[4], int64_t b0, int64_t b1) {
  const Dims& d = t.d;
  std::vector<T> xp((d.H + 2) * (d.W + 2) * d.Ci, T(0));
  for (int64_t b = b0; b < b1; ++b) {
    const T* xb = t.x + b * d.H * d.W * d.Ci;
    for (int64_t i = 0; i < d.H; ++i)
      std::memcpy(xp.data() + ((i + 1) * (d.W + 2) + 1) * d.Ci, xb + i * d.W * d.Ci, d.W * d.Ci * sizeof(T));
    T* ob = t.out + b * 4 * d.H * d.W * d.Co;
    for (int p = 0; p < 4; ++p) {
      const Plan<T> tp{t.x, t.wp + p * 4 * t.ks * t.cop * (std::is_same<T, float>::value ? 1 : 2), t.bias, t.out, d,
                       t.ks, t.cop, t.relu};
      for (int64_t co0 = 0; co0 < d.Co; co0 += 64) {
        const int nr = static_cast<int>(std::min<int64_t>(4, (d.Co - co0 + 15) / 16));
        for (const TileAt& a : tilings[nr - 1]) {
          switch (nr) {
            case 1: run_tile<1>(a.mr, tp, xp.data(), ob, p >> 1, p & 1, a.i0, a.j0, co0); break;
            case 2: run_tile<2>(a.mr, tp, xp.data(), ob, p >> 1, p & 1, a.i0, a.j0, co0); break;
            case 3: run_tile<3>(a.mr, tp, xp.data(), ob, p >> 1, p & 1, a.i0, a.j0, co0); break;
            default: run_tile<4>(a.mr, tp, xp.data(), ob, p >> 1, p & 1, a.i0, a.j0, co0); break;
          }
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
  const bool use_bf16 = bf16 && d.Ci % 2 == 0 && mlp::gemm_isa() == mlp::GemmIsa::Avx512Bf16;
  const bool use_f32 = !bf16 && static_cast<int>(mlp::gemm_isa()) >= static_cast<int>(mlp::GemmIsa::Avx512);
  if (use_bf16 || use_f32) {
    // Kernel position (kh, kw) = (kK[rh][a], kK[rw][c]) is tap 2a + c of phase 2rh + rw:
    // slot[kh * 4 + kw] = phase * 4 + tap.
    int slot[16];
    for (int p = 0; p < 4; ++p)
      for (int k = 0; k < 4; ++k) slot[kK[p >> 1][k >> 1] * 4 + kK[p & 1][k & 1]] = p * 4 + k;
    std::vector<TileAt> tilings[4];
    for (int nr = 1; nr <= 4; ++nr) tilings[nr - 1] = tiling(d.H, d.W, kMaxMR[nr - 1]);
    if (use_bf16) {
      // [phase][tap][Ci / 2][cop] channel pairs (input channel 2s in the low half)
      const at::Tensor w = weight.to(at::kBFloat16).contiguous();
      const uint16_t* wb = reinterpret_cast<const uint16_t*>(w.data_ptr());
      const int64_t ks = d.Ci / 2;
      std::vector<uint32_t> wp(16 * ks * cop, 0u);
      for (int64_t s = 0; s < ks; ++s)
        for (int64_t co = 0; co < d.Co; ++co) {
          const uint16_t* lo = wb + (2 * s * d.Co + co) * 16;
          const uint16_t* hi = lo + d.Co * 16;
          for (int kk = 0; kk < 16; ++kk)
            wp[(slot[kk] * ks + s) * cop + co] = static_cast<uint32_t>(lo[kk]) | static_cast<uint32_t>(hi[kk]) << 16;
        }
      const Plan<uint16_t> t{reinterpret_cast<const uint16_t*>(xc.data_ptr()), reinterpret_cast<const uint16_t*>(wp.data()),
                             bv.data(), reinterpret_cast<uint16_t*>(out.data_ptr()), d, ks, cop, relu};
      at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) { deconv_512(t, tilings, b0, b1); });
    } else {
      const at::Tensor w = weight.to(at::kFloat).contiguous();
      const float* wf = w.data_ptr<float>();
      std::vector<float> wp(16 * d.Ci * cop, 0.0f);  // [phase][tap][Ci][cop]
      for (int64_t ci = 0; ci < d.Ci; ++ci)
        for (int64_t co = 0; co < d.Co; ++co)
          for (int kk = 0; kk < 16; ++kk) wp[(slot[kk] * d.Ci + ci) * cop + co] = wf[(ci * d.Co + co) * 16 + kk];
      const Plan<float> t{xc.data_ptr<float>(), wp.data(), bv.data(), out.data_ptr<float>(), d, d.Ci, cop, relu};
      at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) { deconv_512(t, tilings, b0, b1); });
    }
    return out;
  }
#endif
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const float* wf = w.data_ptr<float>();
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
