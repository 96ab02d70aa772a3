// conv_4s2 (conv_s2_fwd.h): three variants, chosen at run time with the GEMM's variant
// (mlp_gemm.h, through conv_common.h): bfloat16 with vdpbf16ps (AVX-512-BF16, an even Cin),
// float32 on AVX-512 (FMA), and a scalar loop for the rest (bfloat16 without vdpbf16ps, CPUs
// without AVX-512, an odd Cin in bfloat16); the Python side (native_conv.s2_fwd_fits) calls it
// only where it measured faster than oneDNN. The AVX-512 tiles (conv_s2_fwd_tiles.inc) are
// compiled once per variant, each with its own target, as conv_s2.cpp's.
//
// AVX-512: per image and block of up to 32 output channels, run tiles of R output rows of M
// pixels x NR vectors of 16 output channels (R M x NR float32 accumulators, R and M template
// parameters so that they stay in registers through the stores). A row is split into runs of
// equal size (differing by at most one pixel), and narrow rows go up to 3 to a tile. The
// weights are packed once per call as [kh][kw][K step][Cout] (bfloat16: a K step is an
// input-channel pair, the operand of vdpbf16ps; float32: one input channel). Per kernel row, the M + 1 input pixels of odd columns
// (2 (j0 + q) - 1) are broadcast per K step, each feeding column tap 0 of output pixel q and
// tap 2 of pixel q - 1, then the even columns likewise for taps 1 and 3: 2 NR products per
// broadcast. The tiles read the input in place: a kernel row outside the image, and a window
// pixel outside it (column -1, and column Win for an even Win), are skipped, so that there is
// no product of the zero padding and no per-pixel edge test.
#include "conv_s2_fwd.h"
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

struct Dims {
  int64_t B, Ci, Co, Hin, Win, H, W;  // input Hin x Win, output H x W (Hin / 2 x Win / 2)
};

// w: float32 [Co, Ci, 4, 4]; bias float32 [Co] or null.
template <typename T>
void conv_scalar(const T* x, const float* w, const float* bias, bool relu, T* out, Dims d, int64_t b0, int64_t b1) {
  std::vector<float> acc(d.Co);
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t i = 0; i < d.H; ++i) {
      for (int64_t j = 0; j < d.W; ++j) {
        for (int64_t co = 0; co < d.Co; ++co) acc[co] = bias ? bias[co] : 0.0f;
        for (int kh = 0; kh < 4; ++kh) {
          const int64_t r = 2 * i + kh - 1;
          if (r < 0 || r >= d.Hin) continue;
          for (int kw = 0; kw < 4; ++kw) {
            const int64_t c = 2 * j + kw - 1;
            if (c < 0 || c >= d.Win) continue;
            const int64_t base = ((b * d.Hin + r) * d.Win + c) * d.Ci;
            for (int64_t ci = 0; ci < d.Ci; ++ci) {
              const float v = conv::ld(x, base + ci);
              const float* wr = w + ci * 16 + kh * 4 + kw;
              for (int64_t co = 0; co < d.Co; ++co) acc[co] += v * wr[co * d.Ci * 16];
            }
          }
        }
        T* o = out + ((b * d.H + i) * d.W + j) * d.Co;
        for (int64_t co = 0; co < d.Co; ++co) o[co] = static_cast<T>(relu ? std::max(acc[co], 0.0f) : acc[co]);
      }
    }
  }
}

#if defined(FASTFVAE_MLP_SIMD)
// One call's AVX-512 work, shared by its threads. T: uint16_t (bfloat16 bits, vdpbf16ps) or float (FMA).
template <typename T>
struct Plan {
  const T* x;         // the input, [B][Hin][Win][Ci]
  const T* wp;        // packed weights [kh][kw][ks][cop] (bfloat16: each entry a channel pair)
  const float* bias;  // [cop]
  T* out;             // [B][H][W][Co]
  Dims d;
  int64_t ks, cop;    // K steps per tap, Co rounded up to 16
  int64_t block;      // output channels per block (kBlock)
  bool relu;
};

template <typename T>
using WVec = typename std::conditional<std::is_same<T, float>::value, __m512, __m512i>::type;

template <typename T>
using TileFn = void (*)(const Plan<T>&, const T*, T*, int64_t, int64_t, int64_t);

// The most pixels per run tile for NR vectors within the 32 zmm registers: MR x NR
// accumulators + 2 NR weight vectors + a broadcast.
constexpr int kMaxRun[4] = {12, 12, 8, 5};

// Output channels per block: two vectors (NR <= 2). At the VAE's 64 output channels two blocks
// of 32 with twice the pixels per tile measured 1.05-1.15x one block of 64 (the weights per
// tile half as many, each reused by up to 12 pixels instead of 5); blocks of 16 were slower.
constexpr int64_t kBlock = 32;

// The most rows per tile.
constexpr int kMaxRows = 3;

struct RunAt {
  int64_t i0, j0;
  int r, mr;  // r rows of mr pixels
};

// An H x W output grid as tiles of r rows of mr pixels: each row split into runs of equal size
// (differing by at most one pixel) of at most max_run pixels, and as many rows to a tile (at
// most kMaxRows, row groups of equal size) as keep r mr within max_run.
inline std::vector<RunAt> tiling(int64_t H, int64_t W, int max_run) {
  std::vector<RunAt> ts;
  const int64_t n = (W + max_run - 1) / max_run;
  const int64_t widest = (W + n - 1) / n;
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>({kMaxRows, max_run / widest, H}));
  const int64_t groups = (H + rows - 1) / rows;
  for (int64_t g = 0, i = 0; g < groups; ++g) {
    const int64_t r = H / groups + (g < H % groups ? 1 : 0);
    for (int64_t p = 0, j = 0; p < n; ++p) {
      const int64_t mr = W / n + (p < W % n ? 1 : 0);
      ts.push_back({i, j, static_cast<int>(r), static_cast<int>(mr)});
      j += mr;
    }
    i += r;
  }
  return ts;
}

namespace tiles_f32 {
#define FFV_S2F FFV_TARGET_AVX512
#define FFV_S2F_BF16 0
#include "conv_s2_fwd_tiles.inc"
#undef FFV_S2F_BF16
#undef FFV_S2F
}  // namespace tiles_f32

#if defined(FFV_HAVE_AVX512BF16)
namespace tiles_bf16 {
#define FFV_S2F FFV_TARGET_AVX512BF16
#define FFV_S2F_BF16 1
#include "conv_s2_fwd_tiles.inc"
#undef FFV_S2F_BF16
#undef FFV_S2F
}  // namespace tiles_bf16
#endif
#endif

// x, weight and bias as conv_4s2 takes them (one line naming the problem otherwise).
void check_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 4 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "fastfvae_native conv_4s2: x must be a float32 or bfloat16 [B, Cin, H, W] tensor, got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(weight.is_floating_point() && weight.dim() == 4 && weight.size(1) == x.size(1) &&
                  weight.size(2) == 4 && weight.size(3) == 4,
              "fastfvae_native conv_4s2: weight must be a floating [Cout, ", x.size(1), ", 4, 4] tensor, got ",
              weight.scalar_type(), " ", weight.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_floating_point() && bias->dim() == 1 && bias->size(0) == weight.size(0),
                "fastfvae_native conv_4s2: bias must be a floating tensor of ", weight.size(0), " elements, got ",
                bias->scalar_type(), " ", bias->sizes());
  }
}

}  // namespace

at::Tensor conv_4s2_meta(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         bool) {
  check_inputs(x, weight, bias);
  return at::empty({x.size(0), weight.size(0), x.size(2) / 2, x.size(3) / 2},
                   x.options().memory_format(at::MemoryFormat::ChannelsLast));
}

at::Tensor conv_4s2(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool relu) {
  check_inputs(x, weight, bias);
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && (!has_bias || bias->device().is_cpu()),
              "fastfvae_native conv_4s2: x, weight and bias must be CPU tensors, got ", x.device(), ", ",
              weight.device(), has_bias ? ", " : "", has_bias ? bias->device().str() : std::string());
  const Dims d{x.size(0), x.size(1), weight.size(0), x.size(2), x.size(3), x.size(2) / 2, x.size(3) / 2};
  const int64_t cop = (d.Co + 15) / 16 * 16;
  std::vector<float> bv(cop, 0.0f);
  if (has_bias) {
    const at::Tensor bc = bias->to(at::kFloat).contiguous();
    std::copy(bc.data_ptr<float>(), bc.data_ptr<float>() + d.Co, bv.begin());
  }
  at::Tensor out = at::empty({d.B, d.Co, d.H, d.W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (d.B == 0 || d.H == 0 || d.W == 0 || d.Co == 0) return out;  // no element (and no tiling of an empty row)
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
#if defined(FASTFVAE_MLP_SIMD)
  const bool use_bf16 = bf16 && d.Ci % 2 == 0 && conv::use_bf16_dot();
  const bool use_f32 = !bf16 && conv::use_avx512();
  if (use_bf16 || use_f32) {
    std::vector<RunAt> tilings[4];
    for (int nr = 1; nr <= 4; ++nr) tilings[nr - 1] = tiling(d.H, d.W, kMaxRun[nr - 1]);
    const int64_t block = kBlock;
    if (use_bf16) {
#if defined(FFV_HAVE_AVX512BF16)
      // [kh * 4 + kw][Ci / 2][cop] channel pairs (input channel 2s in the low half)
      const at::Tensor w = weight.to(at::kBFloat16).contiguous();
      const uint16_t* wb = reinterpret_cast<const uint16_t*>(w.data_ptr());
      const int64_t ks = d.Ci / 2;
      std::vector<uint32_t> wp(16 * ks * cop, 0u);
      for (int kk = 0; kk < 16; ++kk)
        for (int64_t s = 0; s < ks; ++s) {  // one written row at a time
          uint32_t* row = wp.data() + (kk * ks + s) * cop;
          const uint16_t* lo = wb + 2 * s * 16 + kk;
          for (int64_t co = 0; co < d.Co; ++co)
            row[co] = static_cast<uint32_t>(lo[co * d.Ci * 16]) | static_cast<uint32_t>(lo[co * d.Ci * 16 + 16]) << 16;
        }
      const Plan<uint16_t> t{reinterpret_cast<const uint16_t*>(xc.data_ptr()),
                             reinterpret_cast<const uint16_t*>(wp.data()), bv.data(),
                             reinterpret_cast<uint16_t*>(out.data_ptr()), d, ks, cop, block, relu};
      at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) { tiles_bf16::conv_512(t, tilings, b0, b1); });
#endif
    } else {
      const at::Tensor w = weight.to(at::kFloat).contiguous();
      const float* wf = w.data_ptr<float>();
      std::vector<float> wp(16 * d.Ci * cop, 0.0f);  // [kh * 4 + kw][Ci][cop]
      for (int kk = 0; kk < 16; ++kk)
        for (int64_t ci = 0; ci < d.Ci; ++ci) {
          float* row = wp.data() + (kk * d.Ci + ci) * cop;
          for (int64_t co = 0; co < d.Co; ++co) row[co] = wf[(co * d.Ci + ci) * 16 + kk];
        }
      const Plan<float> t{xc.data_ptr<float>(), wp.data(), bv.data(), out.data_ptr<float>(), d, d.Ci, cop, block, relu};
      at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) { tiles_f32::conv_512(t, tilings, b0, b1); });
    }
    return out;
  }
#endif
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const float* wf = w.data_ptr<float>();
  const float* bp = has_bias ? bv.data() : nullptr;
  at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) {
    if (bf16) {
      conv_scalar(xc.data_ptr<at::BFloat16>(), wf, bp, relu, out.data_ptr<at::BFloat16>(), d, b0, b1);
    } else {
      conv_scalar(xc.data_ptr<float>(), wf, bp, relu, out.data_ptr<float>(), d, b0, b1);
    }
  });
  return out;
}

FASTFVAE_PARALLEL_PROBE(parallel_probe_conv_s2_fwd)

}  // namespace fastfvae_native
