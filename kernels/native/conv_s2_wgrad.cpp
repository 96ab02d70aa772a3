// conv_4s2_weight_grad (conv_s2_wgrad.h): three variants, chosen at run time with the GEMM's
// variant (mlp_gemm.h, through conv_common.h): bfloat16 with vdpbf16ps (AVX-512-BF16), float32 on
// AVX-512 (FMA), and a scalar loop for the rest (bfloat16 without vdpbf16ps, CPUs without
// AVX-512). The tiles (conv_s2_wgrad_tiles.inc) are compiled once per variant, each with its own
// target: float32 with AVX-512 alone (any compiler), bfloat16 with AVX-512-BF16 (GCC >= 11).
//
// The AVX-512 variants see the sum as one GEMM: rows = the Cs channels of small (broadcast),
// columns = 16 taps x the Cb channels of big in vectors of 16 (a "column" is one tap and 16
// channels), reduction = the pixels. Tile: MR rows x NC columns, MR x NC float32 accumulators;
// per reduction step NC vector loads of big and MR broadcasts of small. The reduction step is
// one pixel (b, i, j) in float32 and a pair of images (b, b + 1) at pixel (i, j) in bfloat16
// (vdpbf16ps multiplies pairs of bfloat16 in each 32-bit lane): pairing the images rather than
// neighbouring pixels keeps a tap's shifted view of big a plain pointer offset. So big is
// packed into zero-bordered [2H + 2][2W + 2][Cb'] planes of 32-bit words, one per image (float32)
// or image pair (bfloat16: word = (big[b], big[b + 1]) of one channel, a missing last image
// zero), Cb' = Cb rounded up to 16 with the extra channels zero; tap (kh, kw) of small's pixel
// (i, j) is at row 2i + kh, column 2j + kw of its plane. bfloat16 small is packed the same way
// without the border (float32 small is read in place). The packing runs per chunk of planes
// (wgrad_512).
//
// Threads: the (row block, column group) tiles are split between them; each thread walks the
// batch in fixed chunks and, per chunk, runs its tiles from accumulators kept in a float32
// scratch, so every element is summed in the same order on any thread count.
#include "conv_s2_wgrad.h"
#include "parallel_probe.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv_common.h"

namespace fastfvae_native {
namespace {

struct Dims {
  int64_t B, Cs, Cb, H, W;  // small [B, Cs, H, W], big [B, Cb, 2H, 2W]
  int64_t cbp;              // Cb rounded up to 16: the row length of the scratch dw [Cs][16][cbp]
};

// Rows [cs0, cs1) of dw [Cs][16 taps][cbp], zeroed by the caller; each element sums b, i, j in order.
template <typename T>
void wgrad_scalar(const T* big, const T* small, const Dims& d, int64_t cs0, int64_t cs1, float* dw) {
  const int64_t H2 = 2 * d.H, W2 = 2 * d.W;
  for (int64_t cs = cs0; cs < cs1; ++cs) {
    float* acc = dw + cs * 16 * d.cbp;
    for (int64_t b = 0; b < d.B; ++b) {
      for (int64_t i = 0; i < d.H; ++i) {
        for (int64_t j = 0; j < d.W; ++j) {
          const float v = conv::ld(small, ((b * d.H + i) * d.W + j) * d.Cs + cs);
          for (int kh = 0; kh < 4; ++kh) {
            const int64_t y = 2 * i + kh - 1;
            if (y < 0 || y >= H2) continue;
            for (int kw = 0; kw < 4; ++kw) {
              const int64_t x = 2 * j + kw - 1;
              if (x < 0 || x >= W2) continue;
              const int64_t row = ((b * H2 + y) * W2 + x) * d.Cb;
              float* a = acc + (kh * 4 + kw) * d.cbp;
              for (int64_t cb = 0; cb < d.Cb; ++cb) a[cb] += v * conv::ld(big, row + cb);
            }
          }
        }
      }
    }
  }
}

#if defined(FASTFVAE_MLP_SIMD)
// The packed operands of one call (file comment): `units` reduction planes (images, or image
// pairs in bfloat16), big as [units][PH][PW][cbp] words, small as [units][H][W][Cs] words.
struct Packed {
  const uint32_t* big;
  const uint32_t* small;
  int64_t units, PH, PW;
};

namespace tiles_f32 {
#define FFV_WG FFV_TARGET_AVX512
#define FFV_WG_BF16 0
#include "conv_s2_wgrad_tiles.inc"
#undef FFV_WG_BF16
#undef FFV_WG
}  // namespace tiles_f32

#if defined(FFV_HAVE_AVX512BF16)
namespace tiles_bf16 {
#define FFV_WG FFV_TARGET_AVX512BF16
#define FFV_WG_BF16 1
#include "conv_s2_wgrad_tiles.inc"
#undef FFV_WG_BF16
#undef FFV_WG
}  // namespace tiles_bf16
#endif

// The tile of rows x cols (tiles_*::tile_any) of the variant: bfloat16 pairs or float32.
template <bool BF16>
inline void tile_any(int rows, int cols, const Packed& p, const Dims& d, int64_t r0, int64_t r1, int64_t cs0,
                     const int64_t* off, float* dw, int64_t ldd) {
  if constexpr (BF16) {
#if defined(FFV_HAVE_AVX512BF16)
    tiles_bf16::tile_any(rows, cols, p, d, r0, r1, cs0, off, dw, ldd);
#endif
  } else {
    tiles_f32::tile_any(rows, cols, p, d, r0, r1, cs0, off, dw, ldd);
  }
}

// Plane u of a packed operand from an NHWC [B][Hs][Ws][C] tensor: [Hs + 2 pad][Ws + 2 pad][Cp]
// words, the border and the channels past C zero. bfloat16 (pairs): word = (src[2u], src[2u + 1]);
// float32: the bits of src[u].
template <bool BF16>
FFV_TARGET_AVX512 void pack_plane(const void* src, int64_t B, int64_t Hs, int64_t Ws, int64_t C, int64_t Cp, int pad,
                          int64_t u, uint32_t* plane) {
  const int64_t PH = Hs + 2 * pad, PW = Ws + 2 * pad;
  if (pad) {
    std::memset(plane, 0, PW * Cp * sizeof(uint32_t));
    std::memset(plane + (PH - 1) * PW * Cp, 0, PW * Cp * sizeof(uint32_t));
  }
  for (int64_t y = 0; y < Hs; ++y) {
    uint32_t* row = plane + (y + pad) * PW * Cp;
    if (pad) {
      std::memset(row, 0, Cp * sizeof(uint32_t));
      std::memset(row + (PW - 1) * Cp, 0, Cp * sizeof(uint32_t));
    }
    for (int64_t x = 0; x < Ws; ++x) {
      uint32_t* o = row + (x + pad) * Cp;
      for (int64_t c0 = 0; c0 < Cp; c0 += 16) {
        const __mmask16 m = conv::lanes(C - c0), mo = conv::lanes(Cp - c0);
        __m512i w;
        if constexpr (BF16) {
          const uint16_t* s = static_cast<const uint16_t*>(src);
          const int64_t b0 = 2 * u, b1 = 2 * u + 1;
          const __m512i a = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s + ((b0 * Hs + y) * Ws + x) * C + c0));
          const __m512i c = b1 < B ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s + ((b1 * Hs + y) * Ws + x) * C + c0))
                                   : _mm512_setzero_si512();
          w = _mm512_or_si512(a, _mm512_slli_epi32(c, 16));
        } else {
          const uint32_t* s = static_cast<const uint32_t*>(src);
          w = _mm512_maskz_loadu_epi32(m, s + ((u * Hs + y) * Ws + x) * C + c0);
        }
        _mm512_mask_storeu_epi32(o + c0, mo, w);
      }
    }
  }
}

// Slice q of n of the bytes [p, p + len), 64-byte lines towards L2.
inline void prefetch_slice(const char* p, int64_t len, int64_t q, int64_t n) {
  const int64_t lines = (len + 63) / 64, l0 = lines * q / n, l1 = lines * (q + 1) / n;
  for (int64_t l = l0; l < l1; ++l) _mm_prefetch(p + 64 * l, _MM_HINT_T1);
}

// The GEMM into dw [Cs][16][cbp] (zeroed). The threads split the tiles; each walks the planes
// in chunks of at least 256 reduction steps (pixels or pixel pairs) between a tile's loads and
// stores of its accumulators (64 cost more in those than the tiles gained in cache hits), packs
// each chunk into its own buffer (one that fits in L2 at the VAE's sizes: every thread packs
// every chunk, which was faster than packing the whole of big once, between the threads, and
// reading it back from memory) and runs its tiles on it.
template <bool BF16>
void wgrad_512(const void* big, const void* small, const Dims& d, float* dw) {
  const int64_t units = BF16 ? (d.B + 1) / 2 : d.B, PH = 2 * d.H + 2, PW = 2 * d.W + 2;
  const int64_t bplane = PH * PW * d.cbp, splane = d.H * d.W * d.Cs;
  const bool by8 = d.Cs % 8 == 0;
  const int64_t MR = by8 ? 8 : 6, NC = by8 ? 3 : 4;
  const int64_t nv = d.cbp / 16, ncol = 16 * nv, groups = (ncol + NC - 1) / NC, rblocks = (d.Cs + MR - 1) / MR;
  std::vector<int64_t> off(groups * NC, 0);  // column c: tap c / nv, channels 16 (c % nv) ..
  for (int64_t c = 0; c < ncol; ++c) {
    const int64_t tap = c / nv, kh = tap / 4, kw = tap % 4;
    off[c] = (kh * PW + kw) * d.cbp + 16 * (c % nv);
  }
  const int64_t per = std::max<int64_t>(1, (256 + d.H * d.W - 1) / (d.H * d.W));  // planes per chunk
  const int64_t ldd = 16 * d.cbp;
  at::parallel_for(0, groups * rblocks, 1, [&](int64_t t0, int64_t t1) {
    // one per OpenMP thread, kept between calls at the largest size any call has asked for (it
    // never shrinks): every word a chunk uses is written by its packing, and a call that fits in
    // it needs no new pages
    thread_local std::vector<uint32_t> buf;
    const int64_t nbig = per * bplane, nsmall = BF16 ? per * splane : 0;
    if (static_cast<int64_t>(buf.size()) < nbig + nsmall) buf.resize(nbig + nsmall);
    uint32_t* bigp = buf.data();
    uint32_t* smallp = bigp + nbig;
    for (int64_t u0 = 0; u0 < units; u0 += per) {
      const int64_t n = std::min(per, units - u0);
      for (int64_t k = 0; k < n; ++k) {
        pack_plane<BF16>(big, d.B, 2 * d.H, 2 * d.W, d.Cb, d.cbp, 1, u0 + k, bigp + k * bplane);
        if (BF16) pack_plane<BF16>(small, d.B, d.H, d.W, d.Cs, d.Cs, 0, u0 + k, smallp + k * splane);
      }
      const Packed p{bigp, BF16 ? smallp : static_cast<const uint32_t*>(small) + u0 * splane, n, PH, PW};
      // the next chunk's inputs, fetched towards L2 a slice per tile while this chunk computes
      // (inputs that come from memory, as in the training step, took ~20% longer without)
      const int64_t imgs = BF16 ? 2 : 1, esz = BF16 ? 2 : 4;
      const int64_t nb0 = std::min(d.B, (u0 + n) * imgs), nb1 = std::min(d.B, (u0 + n + per) * imgs);
      const char* nbig = static_cast<const char*>(big) + nb0 * 4 * d.H * d.W * d.Cb * esz;
      const char* nsml = static_cast<const char*>(small) + nb0 * d.H * d.W * d.Cs * esz;
      const int64_t lbig = (nb1 - nb0) * 4 * d.H * d.W * d.Cb * esz, lsml = (nb1 - nb0) * d.H * d.W * d.Cs * esz;
      const int64_t ntiles = t1 - t0;
      for (int64_t t = t0; t < t1; ++t) {
        prefetch_slice(nbig, lbig, t - t0, ntiles);
        prefetch_slice(nsml, lsml, t - t0, ntiles);
        const int64_t g = t / rblocks, rb = t % rblocks, cs0 = rb * MR;
        const int rows = static_cast<int>(std::min(MR, d.Cs - cs0)), cols = static_cast<int>(std::min(NC, ncol - g * NC));
        tile_any<BF16>(rows, cols, p, d, 0, n * d.H, cs0, off.data() + g * NC, dw + cs0 * ldd + g * NC * 16, ldd);
      }
    }
  });
}
#endif

}  // namespace

namespace {

// meta: fake tensors (any device is theirs to say), else CPU tensors.
void check_inputs(const at::Tensor& big, const at::Tensor& small, bool meta) {
  const auto ok = [meta](const at::Tensor& t) {
    return (meta || t.device().is_cpu()) && t.dim() == 4 && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16);
  };
  TORCH_CHECK(ok(small), "fastfvae_native conv_4s2_weight_grad: small must be a float32 or bfloat16 [B, Cs, H, W] "
              "CPU tensor, got ", small.scalar_type(), " ", small.sizes(), " on ", small.device());
  TORCH_CHECK(ok(big) && big.scalar_type() == small.scalar_type() && big.size(0) == small.size(0) &&
                  big.size(2) == 2 * small.size(2) && big.size(3) == 2 * small.size(3),
              "fastfvae_native conv_4s2_weight_grad: big must be a ", small.scalar_type(), " [", small.size(0),
              ", Cb, ", 2 * small.size(2), ", ", 2 * small.size(3), "] CPU tensor (twice small's grid), got ",
              big.scalar_type(), " ", big.sizes(), " on ", big.device());
}

at::ScalarType out_dtype(c10::optional<at::ScalarType> dtype) {
  const at::ScalarType t = dtype.value_or(at::kFloat);
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16,
              "fastfvae_native conv_4s2_weight_grad: dtype must be float32 or bfloat16 (the result's), got ", t);
  return t;
}

}  // namespace

at::Tensor conv_4s2_weight_grad_meta(const at::Tensor& big, const at::Tensor& small,
                                     c10::optional<at::ScalarType> dtype) {
  check_inputs(big, small, true);
  return at::empty({small.size(1), big.size(1), 4, 4}, small.options().dtype(out_dtype(dtype)),
                   at::MemoryFormat::ChannelsLast);
}

at::Tensor conv_4s2_weight_grad(const at::Tensor& big, const at::Tensor& small, c10::optional<at::ScalarType> dtype) {
  check_inputs(big, small, false);
  const at::ScalarType odt = out_dtype(dtype);
  const Dims d{small.size(0), small.size(1), big.size(1), small.size(2), small.size(3), conv::round_up(big.size(1), 16)};
  at::Tensor out = at::empty({d.Cs, d.Cb, 4, 4}, small.options().dtype(odt), at::MemoryFormat::ChannelsLast);
  if (d.B == 0 || d.H == 0 || d.W == 0 || d.Cs == 0 || d.Cb == 0) return out.zero_();
  const at::Tensor bc = big.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor sc = small.contiguous(at::MemoryFormat::ChannelsLast);
  const bool bf16 = small.scalar_type() == at::kBFloat16;
  std::vector<float> dw(d.Cs * 16 * d.cbp, 0.0f);  // [cs][tap][cb]
  bool done = false;
#if defined(FFV_HAVE_AVX512BF16)
  if (bf16 && conv::use_bf16_dot()) {
    wgrad_512<true>(bc.data_ptr(), sc.data_ptr(), d, dw.data());
    done = true;
  }
#endif
#if defined(FASTFVAE_MLP_SIMD)
  if (!bf16 && conv::use_avx512()) {
    wgrad_512<false>(bc.data_ptr(), sc.data_ptr(), d, dw.data());
    done = true;
  }
#endif
  if (!done) {
    at::parallel_for(0, d.Cs, 1, [&](int64_t c0, int64_t c1) {
      if (bf16) {
        wgrad_scalar(bc.data_ptr<at::BFloat16>(), sc.data_ptr<at::BFloat16>(), d, c0, c1, dw.data());
      } else {
        wgrad_scalar(bc.data_ptr<float>(), sc.data_ptr<float>(), d, c0, c1, dw.data());
      }
    });
  }
  // out is channels_last: [cs][kh][kw][cb] in memory, dw's layout without the padding channels
  for (int64_t r = 0; r < d.Cs * 16; ++r) {
    const float* src = dw.data() + r * d.cbp;
    if (odt == at::kFloat) {
      std::copy(src, src + d.Cb, out.data_ptr<float>() + r * d.Cb);
    } else {
      at::BFloat16* o = out.data_ptr<at::BFloat16>() + r * d.Cb;
      for (int64_t cb = 0; cb < d.Cb; ++cb) o[cb] = at::BFloat16(src[cb]);
    }
  }
  return out;
}

FASTFVAE_PARALLEL_PROBE(parallel_probe_conv_s2_wgrad)

}  // namespace fastfvae_native
