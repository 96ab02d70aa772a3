// conv_transpose_4s2 (conv_s2.h): three variants, chosen at run time with the GEMM's variant
// (mlp_gemm.h, through conv_common.h): bfloat16 with vdpbf16ps (AVX-512-BF16, an even Cin),
// float32 on AVX-512 (FMA), and a scalar loop for the rest (bfloat16 without vdpbf16ps, CPUs
// without AVX-512); the Python side (native_conv.s2_fits) calls it only where it measured faster
// than oneDNN. The AVX-512 tiles (conv_s2_tiles.inc) are compiled once per variant, each with its
// own target: float32 with AVX-512 alone (any compiler), bfloat16 with AVX-512-BF16 (GCC >= 11).
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

#include "conv_common.h"

namespace fastfvae_native {
namespace {

// Output phase r (0 / 1) along one axis: its two taps read the input at offset kD[r][a]
// through kernel index kK[r][a].
constexpr int kD[2][2] = {{0, -1}, {1, 0}};
constexpr int kK[2][2] = {{1, 3}, {0, 2}};

struct Dims {
  int64_t B, Ci, Co, H, W;  // input grid H x W, output 2H x 2W
};

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
              const float v = conv::ld(x, base + ci);
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

#if defined(FASTFVAE_MLP_SIMD)
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

template <typename T>
using WVec = typename std::conditional<std::is_same<T, float>::value, __m512, __m512i>::type;

template <typename T>
using TileFn = void (*)(const Plan<T>&, const T*, T*, int, int, int64_t, int64_t, int64_t);

// The most pixels per tile for NR vectors within the 32 zmm registers: a run tile holds MR x
// NR accumulators + 2 NR weight vectors + a broadcast, a rows tile MR x NR + NR + 1.
constexpr int kMaxRun[4] = {12, 12, 8, 5};
constexpr int kMaxRows[4] = {12, 12, 8, 6};

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

namespace tiles_f32 {
#define FFV_S2 FFV_TARGET_AVX512
#define FFV_S2_BF16 0
#include "conv_s2_tiles.inc"
#undef FFV_S2_BF16
#undef FFV_S2
}  // namespace tiles_f32

#if defined(FFV_HAVE_AVX512BF16)
namespace tiles_bf16 {
#define FFV_S2 FFV_TARGET_AVX512BF16
#define FFV_S2_BF16 1
#include "conv_s2_tiles.inc"
#undef FFV_S2_BF16
#undef FFV_S2
}  // namespace tiles_bf16
#endif
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
#if defined(FASTFVAE_MLP_SIMD)
  const bool use_bf16 = bf16 && d.Ci % 2 == 0 && conv::use_bf16_dot();
  const bool use_f32 = !bf16 && conv::use_avx512();
  if (use_bf16 || use_f32) {
    // Kernel position (kh, kw) = (kK[rh][a], kK[rw][c]) is tap 2a + c of phase 2rh + rw:
    // slot[kh * 4 + kw] = phase * 4 + tap.
    int slot[16];
    for (int p = 0; p < 4; ++p)
      for (int k = 0; k < 4; ++k) slot[kK[p >> 1][k >> 1] * 4 + kK[p & 1][k & 1]] = p * 4 + k;
    std::vector<TileAt> tilings[4];
    for (int nr = 1; nr <= 4; ++nr) tilings[nr - 1] = tiling(d.H, d.W, kMaxRun[nr - 1], kMaxRows[nr - 1]);
    if (use_bf16) {
#if defined(FFV_HAVE_AVX512BF16)
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
      at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) { tiles_bf16::deconv_512(t, tilings, b0, b1); });
#endif
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
      at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) { tiles_f32::deconv_512(t, tilings, b0, b1); });
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
