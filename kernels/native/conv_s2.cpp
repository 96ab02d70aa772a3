// conv_transpose_4s2 (conv_s2.h): three variants, chosen at run time with the GEMM's variant
// (mlp_gemm.h): bfloat16 with vdpbf16ps (AVX-512-BF16, an even Cin), float32 on AVX-512 (FMA),
// and a scalar loop for the rest (bfloat16 without vdpbf16ps, CPUs without AVX-512); the
// Python side (native_conv.s2_fits) calls it only where it measured faster than oneDNN.
//
// AVX-512: per image, phase and block of up to 64 output channels, tiles of MR output pixels x
// NR vectors of 16 output channels (MR x NR float32 accumulators, MR a template parameter so
// that they stay in registers through the stores). The weights are packed once per call as
// [phase][tap][K step][Cout] (bfloat16: a K step is an input-channel pair, the operand of
// vdpbf16ps; float32: one input channel), and each image is copied into a buffer with a zero
// border one pixel wide, so that every tap reads at a fixed offset from its pixel's input with
// no per-pixel edge test.
//  - run tiles (MR pixels of one row): per input-row tap, MR + 1 broadcasts of consecutive
//    input pixels per K step, each feeding the two column taps of two neighbouring pixels
//    (2 NR products per broadcast); a row tap outside the image, and a broadcast of the zero
//    border, are skipped, so the products are only those of the sum.
//  - rows tiles (whole rows, for a grid narrower than a run tile): one broadcast per pixel and
//    tap, a tap skipped only when its input row is outside the image for the whole tile.
// A row wider than half the largest rows tile is split into run tiles of equal size (differing
// by at most one pixel); narrower rows go as many as fit to a rows tile (one row: a run tile).
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
// Fully unrolled loops over a tile's pixels and vectors, so that its accumulators stay in registers.
#define FFV_UNROLL _Pragma("GCC unroll 16")

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

// The K step s of one input pixel's channels at p: a broadcast pair (bfloat16) or value (float32).
template <typename T>
FFV_S2 inline auto bcast(const T* p, int64_t s) {
  if constexpr (std::is_same<T, float>::value) {
    return _mm512_set1_ps(p[s]);
  } else {
    uint32_t pair;
    std::memcpy(&pair, p + 2 * s, sizeof pair);
    return _mm512_set1_epi32(static_cast<int>(pair));
  }
}

template <typename T>
using WVec = typename std::conditional<std::is_same<T, float>::value, __m512, __m512i>::type;

template <typename T>
FFV_S2 inline WVec<T> load_w(const T* w, int v) {
  if constexpr (std::is_same<T, float>::value) {
    return _mm512_loadu_ps(w + 16 * v);
  } else {
    return _mm512_loadu_si512(w + 32 * v);
  }
}

// acc += x . w: FMA (float32) or vdpbf16ps (bfloat16: x's two channels against w's pair).
template <typename T>
FFV_S2 inline __m512 madd(__m512 acc, WVec<T> x, WVec<T> w) {
  if constexpr (std::is_same<T, float>::value) {
    return _mm512_fmadd_ps(x, w, acc);
  } else {
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
  }
}

// The tile's MR x NR accumulators (+ ReLU) to its MR output pixels at dst[u] + 16 v. ReLU is
// max(0, acc), which keeps a NaN. bfloat16 rounds with vcvtne(2)ps2bf16: to nearest even as
// c10::BFloat16, except that float32 subnormals (below 2^-126 in magnitude) become zero.
template <int MR, int NR, typename T>
FFV_S2 inline void store_tile(__m512 (&acc)[MR][NR], T* const (&dst)[MR], int64_t left, bool relu) {
  const __m512 zero = _mm512_setzero_ps();
  if (relu) {
    FFV_UNROLL
    for (int u = 0; u < MR; ++u) {
      FFV_UNROLL
      for (int v = 0; v < NR; ++v) acc[u][v] = _mm512_max_ps(zero, acc[u][v]);
    }
  }
  if (!std::is_same<T, float>::value && NR % 2 == 0 && left >= 16 * NR) {  // two vectors per store
    FFV_UNROLL
    for (int u = 0; u < MR; ++u) {
      FFV_UNROLL
      for (int v = 0; v + 1 < NR; v += 2)
        _mm512_storeu_si512(dst[u] + 16 * v, (__m512i)_mm512_cvtne2ps_pbh(acc[u][v + 1], acc[u][v]));
    }
    return;
  }
  FFV_UNROLL
  for (int v = 0; v < NR; ++v) {
    const int64_t n = left - 16 * v;  // this vector's channels (> 0)
    const __mmask16 mk = n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
    FFV_UNROLL
    for (int u = 0; u < MR; ++u) {
      if constexpr (std::is_same<T, float>::value) {
        _mm512_mask_storeu_ps(dst[u] + 16 * v, mk, acc[u][v]);
      } else {
        _mm256_mask_storeu_epi16(dst[u] + 16 * v, mk, (__m256i)_mm512_cvtneps_pbh(acc[u][v]));
      }
    }
  }
}

template <int MR, int NR>
FFV_S2 inline void init_acc(__m512 (&acc)[MR][NR], const float* bias) {
  FFV_UNROLL
  for (int v = 0; v < NR; ++v) {
    const __m512 b = _mm512_loadu_ps(bias + 16 * v);
    FFV_UNROLL
    for (int u = 0; u < MR; ++u) acc[u][v] = b;
  }
}

// One input-row tap of a run tile: the MR + 1 window pixels from row (a broadcast each per K
// step) against the row tap's two column taps' weights w0 (column tap 0) and w1 (tap 1).
template <int MR, int NR, typename T>
FFV_S2 inline void run_row(__m512 (&acc)[MR][NR], const T* row, const T* w0, const T* w1, int64_t Ci, int64_t ks,
                           int64_t wstep, bool first, bool last) {
  for (int64_t s = 0; s < ks; ++s, w0 += wstep, w1 += wstep) {
    WVec<T> wa[NR], wb[NR];
    FFV_UNROLL
    for (int v = 0; v < NR; ++v) wa[v] = load_w(w0, v), wb[v] = load_w(w1, v);
    FFV_UNROLL
    for (int q = 0; q <= MR; ++q) {
      if ((q == 0 && !first) || (q == MR && !last)) continue;
      const WVec<T> xv = bcast(row + q * Ci, s);
      if (q > 0) {
        FFV_UNROLL
        for (int v = 0; v < NR; ++v) acc[q - 1][v] = madd<T>(acc[q - 1][v], xv, wa[v]);
      }
      if (q < MR) {
        FFV_UNROLL
        for (int v = 0; v < NR; ++v) acc[q][v] = madd<T>(acc[q][v], xv, wb[v]);
      }
    }
  }
}

// A run tile: MR pixels of one row i of phase (rh, rw) from column j0, x NR vectors of 16
// output channels from co0. xp is the image's input with a zero border ([H + 2][W + 2][Ci]).
// Per input-row tap a (skipped when the row is outside the image) the two column taps read
// the MR + 1 input pixels of one window: window pixel q is pixel q - 1's column tap 0 and pixel
// q's column tap 1, so each broadcast feeds 2 NR products.
template <int MR, int NR, typename T>
FFV_S2 void tile_run(const Plan<T>& t, const T* xp, T* out, int rh, int rw, int64_t i, int64_t j0, int64_t co0) {
  const int64_t W = t.d.W, Ci = t.d.Ci, ks = t.ks, cop = t.cop;
  constexpr int64_t kE = std::is_same<T, float>::value ? 1 : 2;  // elements per K step
  __m512 acc[MR][NR];
  init_acc<MR, NR>(acc, t.bias + co0);
  // window pixel 0 is input column j0 + kD[rw][1] (= j0 - 1 + rw); row tap a reads row i + kD[rh][a]
  const T* row = xp + ((i + 1) * (W + 2) + j0 + rw) * Ci;
  const T* w = t.wp + co0 * kE;
  const int64_t tap = ks * cop * kE;
  // the window's first / last pixel is the zero border at the image's left / right edge
  const bool first = rw == 1 || j0 > 0, last = rw == 0 || j0 + MR < W;
  const int64_t rs = (W + 2) * Ci, ws = cop * kE;
  if (i + kD[rh][0] < t.d.H) {
    run_row<MR, NR, T>(acc, row + kD[rh][0] * rs, w, w + tap, Ci, ks, ws, first, last);
  }
  if (i + kD[rh][1] >= 0) {
    run_row<MR, NR, T>(acc, row + kD[rh][1] * rs, w + 2 * tap, w + 3 * tap, Ci, ks, ws, first, last);
  }
  T* dst[MR];
  FFV_UNROLL
  for (int u = 0; u < MR; ++u) dst[u] = out + ((2 * i + rh) * 2 * W + 2 * (j0 + u) + rw) * t.d.Co + co0;
  store_tile<MR, NR, T>(acc, dst, t.d.Co - co0, t.relu);
}

// A rows tile: MR pixels of whole rows from row i0 (a grid narrower than a run tile), per tap
// one broadcast per pixel; a tap whose input row is outside the image for all the tile's
// pixels is skipped.
template <int MR, int NR, typename T>
FFV_S2 void tile_rows(const Plan<T>& t, const T* xp, T* out, int rh, int rw, int64_t i0, int64_t, int64_t co0) {
  const int64_t W = t.d.W, Ci = t.d.Ci, ks = t.ks, cop = t.cop;
  constexpr int64_t kE = std::is_same<T, float>::value ? 1 : 2;
  const T* src[MR];
  T* dst[MR];
  for (int64_t u = 0, i = i0, j = 0; u < MR; ++u) {
    src[u] = xp + ((i + 1) * (W + 2) + j + 1) * Ci;
    dst[u] = out + ((2 * i + rh) * 2 * W + 2 * j + rw) * t.d.Co + co0;
    if (++j == W) j = 0, ++i;
  }
  const int64_t i1 = i0 + (MR - 1) / W;
  __m512 acc[MR][NR];
  init_acc<MR, NR>(acc, t.bias + co0);
  for (int k = 0; k < 4; ++k) {
    const int di = kD[rh][k >> 1], dj = kD[rw][k & 1];
    if ((di < 0 && i1 == 0) || (di > 0 && i0 == t.d.H - 1)) continue;
    const int64_t off = (di * (W + 2) + dj) * Ci;
    const T* w = t.wp + (k * ks * cop + co0) * kE;
    for (int64_t s = 0; s < ks; ++s, w += cop * kE) {
      WVec<T> wv[NR];
      FFV_UNROLL
      for (int v = 0; v < NR; ++v) wv[v] = load_w(w, v);
      FFV_UNROLL
      for (int u = 0; u < MR; ++u) {
        const WVec<T> xv = bcast(src[u] + off, s);
        FFV_UNROLL
        for (int v = 0; v < NR; ++v) acc[u][v] = madd<T>(acc[u][v], xv, wv[v]);
      }
    }
  }
  store_tile<MR, NR, T>(acc, dst, t.d.Co - co0, t.relu);
}

template <typename T>
using TileFn = void (*)(const Plan<T>&, const T*, T*, int, int, int64_t, int64_t, int64_t);

// The most pixels per tile for NR vectors within the 32 zmm registers: a run tile holds MR x
// NR accumulators + 2 NR weight vectors + a broadcast, a rows tile MR x NR + NR + 1.
constexpr int kMaxRun[4] = {12, 12, 8, 5};
constexpr int kMaxRows[4] = {12, 12, 8, 6};

template <int NR, typename T, int... M>
constexpr std::array<TileFn<T>, sizeof...(M)> run_tiles(std::integer_sequence<int, M...>) {
  return {&tile_run<M + 1, NR, T>...};
}

template <int NR, typename T, int... M>
constexpr std::array<TileFn<T>, sizeof...(M)> rows_tiles(std::integer_sequence<int, M...>) {
  return {&tile_rows<M + 1, NR, T>...};
}

template <int NR, typename T>
FFV_S2 void run_tile(bool run, int mr, const Plan<T>& t, const T* xp, T* out, int rh, int rw, int64_t i0, int64_t j0,
                     int64_t co0) {
  static constexpr auto runs = run_tiles<NR, T>(std::make_integer_sequence<int, kMaxRun[NR - 1]>{});
  static constexpr auto rows = rows_tiles<NR, T>(std::make_integer_sequence<int, kMaxRows[NR - 1]>{});
  (run ? runs[mr - 1] : rows[mr - 1])(t, xp, out, rh, rw, i0, j0, co0);
}

// The tiles covering an H x W grid (the file's header comment).
struct TileAt {
  int64_t i0, j0;
  int mr;
  bool run;
};

inline std::vector<TileAt> tiling(int64_t H, int64_t W, int max_run, int max_rows) {
  std::vector<TileAt> ts;
  const int64_t rows = max_rows / W;
  if (rows < 2) {
    const int64_t n = (W + max_run - 1) / max_run;
    for (int64_t i = 0; i < H; ++i)
      for (int64_t p = 0, j = 0; p < n; ++p) {
        const int64_t mr = W / n + (p < W % n ? 1 : 0);
        ts.push_back({i, j, static_cast<int>(mr), true});
        j += mr;
      }
  } else {
    for (int64_t i = 0; i < H; i += rows) {
      const int64_t r = std::min(rows, H - i);
      ts.push_back({i, 0, static_cast<int>(r * W), r == 1 && W <= max_run});
    }
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
            case 1: run_tile<1>(a.run, a.mr, tp, xp.data(), ob, p >> 1, p & 1, a.i0, a.j0, co0); break;
            case 2: run_tile<2>(a.run, a.mr, tp, xp.data(), ob, p >> 1, p & 1, a.i0, a.j0, co0); break;
            case 3: run_tile<3>(a.run, a.mr, tp, xp.data(), ob, p >> 1, p & 1, a.i0, a.j0, co0); break;
            default: run_tile<4>(a.run, a.mr, tp, xp.data(), ob, p >> 1, p & 1, a.i0, a.j0, co0); break;
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
  if (d.B == 0 || d.H == 0 || d.W == 0 || d.Co == 0) return out;  // no element (and no tiling of an empty grid)
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
    for (int nr = 1; nr <= 4; ++nr) tilings[nr - 1] = tiling(d.H, d.W, kMaxRun[nr - 1], kMaxRows[nr - 1]);
    if (use_bf16) {
      // [phase][tap][Ci / 2][cop] channel pairs (input channel 2s in the low half)
      const at::Tensor w = weight.to(at::kBFloat16).contiguous();
      const uint16_t* wb = reinterpret_cast<const uint16_t*>(w.data_ptr());
      const int64_t ks = d.Ci / 2;
      std::vector<uint32_t> wp(16 * ks * cop, 0u);
      for (int64_t s = 0; s < ks; ++s) {  // one written row at a time (16 at once thrash L1's sets)
        const uint16_t* lo = wb + 2 * s * d.Co * 16;
        const uint16_t* hi = lo + d.Co * 16;
        for (int kk = 0; kk < 16; ++kk) {
          uint32_t* row = wp.data() + (slot[kk] * ks + s) * cop;
          for (int64_t co = 0; co < d.Co; ++co)
            row[co] = static_cast<uint32_t>(lo[co * 16 + kk]) | static_cast<uint32_t>(hi[co * 16 + kk]) << 16;
        }
      }
      const Plan<uint16_t> t{reinterpret_cast<const uint16_t*>(xc.data_ptr()),
                             reinterpret_cast<const uint16_t*>(wp.data()), bv.data(),
                             reinterpret_cast<uint16_t*>(out.data_ptr()), d, ks, cop, relu};
      at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) { deconv_512(t, tilings, b0, b1); });
    } else {
      const at::Tensor w = weight.to(at::kFloat).contiguous();
      const float* wf = w.data_ptr<float>();
      std::vector<float> wp(16 * d.Ci * cop, 0.0f);  // [phase][tap][Ci][cop]
      for (int64_t ci = 0; ci < d.Ci; ++ci)
        for (int kk = 0; kk < 16; ++kk) {
          float* row = wp.data() + (slot[kk] * d.Ci + ci) * cop;
          for (int64_t co = 0; co < d.Co; ++co) row[co] = wf[(ci * d.Co + co) * 16 + kk];
        }
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
