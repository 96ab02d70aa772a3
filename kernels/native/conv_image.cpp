// The one-channel image-side convolutions (conv_image.h): a scalar variant, an AVX-512 one
// (float32 FMA, either dtype) and, for bfloat16, an AVX-512-BF16 one (vdpbf16ps); function target
// attributes (conv_common.h), chosen at run time with the GEMM's variant (mlp_gemm.h).
//
// Each batch item's image is first copied into a zero-bordered float32 plane P (bfloat16 in the
// AVX-512-BF16 variants), P[y + 1][x + 1] = img[y][x], so the 4x4 patch of block q is P[2i .. 2i + 3][2j .. 2j + 3] with no bounds tests.
//   image_conv:   16 channels in the lanes, 8 blocks at a time; each of the 16 taps is one
//                 broadcast of P times the tap's 16 weights.
//   weight grad:  16 channels in the lanes, the 16 taps in 16 accumulators; per block one load
//                 of h and 16 broadcasts of P.
//   transpose:    16 blocks of one row in the lanes, 4 block rows at a time (16 accumulators:
//                 4 rows x the 4 sub-pixels); h is transposed per batch item to T[row][c][col]
//                 (zero-bordered), so each (channel, row offset, column offset) is one vector
//                 load, and each output sub-pixel sums 2 x 2 taps of it.
#include "conv_image.h"
#include "parallel_probe.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv_common.h"
#include "simd_bf16.h"

namespace fastfvae_native {
namespace {

using conv::bf16f;
using conv::round_up;

inline float load_scalar(const void* p, bool bf16, int64_t i) {
  return bf16 ? bf16f(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

inline void store_scalar(void* p, bool bf16, int64_t i, float v) {
  if (bf16) {
    static_cast<at::BFloat16*>(p)[i] = at::BFloat16(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

// The one-channel image of a batch: element (b, y, x) of the 2H x 2W image.
struct Image {
  const void* data;
  bool bf16, s2d;
  int64_t sb, sc, sy, sx;  // strides of the tensor's dims 0..3
  int64_t offset(int64_t b, int64_t y, int64_t x) const {
    if (s2d) return b * sb + ((y & 1) * 2 + (x & 1)) * sc + (y >> 1) * sy + (x >> 1) * sx;
    return b * sb + y * sy + x * sx;
  }
  float at(int64_t b, int64_t y, int64_t x) const { return load_scalar(data, bf16, offset(b, y, x)); }
};

// P[(y + 1) * pw + x + 1] = img(b, y, x) for the 2H x 2W image; P is zeroed first ((2H + 2) rows).
void pad_image(const Image& im, int64_t b, int64_t H, int64_t W, float* P, int64_t pw) {
  std::fill(P, P + (2 * H + 2) * pw, 0.0f);
  const bool s2d_cl = im.s2d && im.sc == 1 && im.sx == 4 && im.sy == 4 * W;
  for (int64_t y = 0; y < 2 * H; ++y) {
    float* row = P + (y + 1) * pw + 1;
    if (s2d_cl) {  // channels_last space-to-depth: the pixel pair (2j, 2j + 1) of row y is contiguous
      const int64_t base = b * im.sb + (y >> 1) * im.sy + (y & 1) * 2;
      if (im.bf16) {
        const uint16_t* src = static_cast<const uint16_t*>(im.data) + base;
        for (int64_t j = 0; j < W; ++j) {
          row[2 * j] = bf16f(src[4 * j]);
          row[2 * j + 1] = bf16f(src[4 * j + 1]);
        }
      } else {
        const float* src = static_cast<const float*>(im.data) + base;
        for (int64_t j = 0; j < W; ++j) {
          row[2 * j] = src[4 * j];
          row[2 * j + 1] = src[4 * j + 1];
        }
      }
    } else {
      for (int64_t x = 0; x < 2 * W; ++x) row[x] = im.at(b, y, x);
    }
  }
}

struct Shape {
  int64_t B, C, H, W;
};

// --- scalar ------------------------------------------------------------------------------------

// h[b, i, j, c] (channels_last) = bias[c] + sum_k P[2i + kh][2j + kw] w[c * 16 + k]
void conv_scalar(const Image& im, const float* w, const float* bias, bool relu, void* out, bool bf16, Shape s,
                 int64_t b0, int64_t b1) {
  const int64_t pw = 2 * s.W + 2;
  std::vector<float> P((2 * s.H + 2) * pw);
  for (int64_t b = b0; b < b1; ++b) {
    pad_image(im, b, s.H, s.W, P.data(), pw);
    for (int64_t i = 0; i < s.H; ++i) {
      for (int64_t j = 0; j < s.W; ++j) {
        const float* patch = P.data() + 2 * i * pw + 2 * j;
        for (int64_t c = 0; c < s.C; ++c) {
          float acc = bias ? bias[c] : 0.0f;
          for (int kh = 0; kh < 4; ++kh)
            for (int kw = 0; kw < 4; ++kw) acc += patch[kh * pw + kw] * w[c * 16 + kh * 4 + kw];
          if (relu) acc = std::max(acc, 0.0f);
          store_scalar(out, bf16, ((b * s.H + i) * s.W + j) * s.C + c, acc);
        }
      }
    }
  }
}

// dw[c * 16 + k] += sum_{b, q} P[2i + kh][2j + kw] h[b, i, j, c]
void wgrad_scalar(const Image& im, const void* h, bool bf16, Shape s, int64_t c0, int64_t c1, float* dw) {
  const int64_t pw = 2 * s.W + 2;
  std::vector<float> P((2 * s.H + 2) * pw);
  for (int64_t b = 0; b < s.B; ++b) {
    pad_image(im, b, s.H, s.W, P.data(), pw);
    for (int64_t i = 0; i < s.H; ++i) {
      for (int64_t j = 0; j < s.W; ++j) {
        const float* patch = P.data() + 2 * i * pw + 2 * j;
        for (int64_t c = c0; c < c1; ++c) {
          const float g = load_scalar(h, bf16, ((b * s.H + i) * s.W + j) * s.C + c);
          for (int kh = 0; kh < 4; ++kh)
            for (int kw = 0; kw < 4; ++kw) dw[c * 16 + kh * 4 + kw] += patch[kh * pw + kw] * g;
        }
      }
    }
  }
}

// out(y, x) = bias + sum over (q, k) with 2q - 1 + k = (y, x) of h[q, c] w[c * 16 + k]
void convt_scalar(const void* h, bool bf16, const float* w, float bias, void* out, bool s2d, Shape s, int64_t b0,
                  int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t y = 0; y < 2 * s.H; ++y) {
      for (int64_t x = 0; x < 2 * s.W; ++x) {
        float acc = bias;
        for (int kh = (y + 1) & 1; kh < 4; kh += 2) {
          const int64_t qi = (y + 1 - kh) / 2;
          if (qi < 0 || qi >= s.H) continue;
          for (int kw = (x + 1) & 1; kw < 4; kw += 2) {
            const int64_t qj = (x + 1 - kw) / 2;
            if (qj < 0 || qj >= s.W) continue;
            const int64_t base = ((b * s.H + qi) * s.W + qj) * s.C;
            for (int64_t c = 0; c < s.C; ++c) acc += load_scalar(h, bf16, base + c) * w[c * 16 + kh * 4 + kw];
          }
        }
        const int64_t o = s2d ? (((b * s.H + (y >> 1)) * s.W + (x >> 1)) * 4 + (y & 1) * 2 + (x & 1))
                              : ((b * 2 * s.H + y) * 2 * s.W + x);
        store_scalar(out, bf16, o, acc);
      }
    }
  }
}

// --- AVX-512 -----------------------------------------------------------------------------------
#if defined(FASTFVAE_MLP_SIMD)
using conv::lanes;

FFV_TARGET_AVX512 inline __m512 load16(const void* p, bool bf16, int64_t i, __mmask16 m) {
  if (bf16) {
    const __m256i v = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  }
  return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
}

FFV_TARGET_AVX512 inline void store16(void* p, bool bf16, int64_t i, __m512 v, __mmask16 m) {
  if (bf16) {
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, m, simd::to_bf16(v));
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(p) + i, m, v);
  }
}

// r[0..15] (rows) -> their transpose.
FFV_TARGET_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + e], 128-bit lane l: rows 4i..4i+3 of element 4l + e
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int e = 0; e < 4; ++e) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x88), v1 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xDD);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x88),
                 w1 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xDD);
    r[e] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    r[8 + e] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    r[4 + e] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[12 + e] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
}

// wk: [16 taps][cp] (cp = C rounded up to 16, zero-padded), bias [cp] or null.
FFV_TARGET_AVX512 void conv_512(const Image& im, const float* wk, int64_t cp, const float* bias, bool relu, void* out,
                          bool bf16, Shape s, int64_t b0, int64_t b1) {
  constexpr int U = 8;  // blocks per step
  const int64_t pw = 2 * round_up(s.W, U) + 2;
  std::vector<float> P((2 * s.H + 2) * pw);
  for (int64_t b = b0; b < b1; ++b) {
    pad_image(im, b, s.H, s.W, P.data(), pw);
    for (int64_t c0 = 0; c0 < s.C; c0 += 16) {
      const __mmask16 m = lanes(s.C - c0);
      __m512 w[16];
      for (int k = 0; k < 16; ++k) w[k] = _mm512_loadu_ps(wk + k * cp + c0);
      const __m512 bv = bias ? _mm512_loadu_ps(bias + c0) : _mm512_setzero_ps();
      const __m512 zero = _mm512_setzero_ps();
      for (int64_t i = 0; i < s.H; ++i) {
        const float* rows = P.data() + 2 * i * pw;
        for (int64_t j0 = 0; j0 < s.W; j0 += U) {
          __m512 acc[U];
          for (int u = 0; u < U; ++u) acc[u] = bv;
          for (int kh = 0; kh < 4; ++kh) {
            const float* r = rows + kh * pw + 2 * j0;
            for (int kw = 0; kw < 4; ++kw)
              for (int u = 0; u < U; ++u) acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(r[2 * u + kw]), w[kh * 4 + kw], acc[u]);
          }
          const int64_t n = std::min<int64_t>(U, s.W - j0);
          for (int u = 0; u < n; ++u)
            store16(out, bf16, ((b * s.H + i) * s.W + j0 + u) * s.C + c0, relu ? _mm512_max_ps(acc[u], zero) : acc[u],
                    m);
        }
      }
    }
  }
}

// dw: [16 taps][cp], accumulated into.
FFV_TARGET_AVX512 void wgrad_512(const Image& im, const void* h, bool bf16, Shape s, int64_t cb, int64_t ce, float* dw,
                           int64_t cp) {
  const int64_t pw = 2 * s.W + 2;
  std::vector<float> P((2 * s.H + 2) * pw);
  for (int64_t b = 0; b < s.B; ++b) {
    pad_image(im, b, s.H, s.W, P.data(), pw);
    for (int64_t c0 = cb; c0 < ce; c0 += 16) {
      const __mmask16 m = lanes(s.C - c0);
      __m512 acc[16];
      for (int k = 0; k < 16; ++k) acc[k] = _mm512_loadu_ps(dw + k * cp + c0);
      for (int64_t i = 0; i < s.H; ++i) {
        for (int64_t j = 0; j < s.W; ++j) {
          const __m512 g = load16(h, bf16, ((b * s.H + i) * s.W + j) * s.C + c0, m);
          const float* r = P.data() + 2 * i * pw + 2 * j;
          for (int kh = 0; kh < 4; ++kh)
            for (int kw = 0; kw < 4; ++kw)
              acc[kh * 4 + kw] = _mm512_fmadd_ps(_mm512_set1_ps(r[kh * pw + kw]), g, acc[kh * 4 + kw]);
        }
      }
      for (int k = 0; k < 16; ++k) _mm512_storeu_ps(dw + k * cp + c0, acc[k]);
    }
  }
}

// The transposed convolution's accumulators acc[rr][2 rh + rw] (block row i0 + rr, 16 blocks
// from j0, output sub-pixel (rh, rw)) stored in out's dtype: the space-to-depth form
// [b, i, j, 2 rh + rw] (the four sub-pixels of a block side by side) or the image rows 2i + rh
// (columns 2j + rw side by side).
template <int R>
FFV_TARGET_AVX512 inline void store_convt(const __m512 (&acc)[R][4], void* out, bool bf16, bool s2d, const Shape& s,
                                    int64_t b, int64_t i0, int64_t j0) {
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  const __m512i lo64 = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);
  const __m512i hi64 = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
  const int64_t n = std::min<int64_t>(16, s.W - j0);
  for (int rr = 0; rr < R && i0 + rr < s.H; ++rr) {
    const int64_t i = i0 + rr;
    if (s2d) {
      const __m512 e0l = _mm512_permutex2var_ps(acc[rr][0], lo, acc[rr][1]);
      const __m512 e0h = _mm512_permutex2var_ps(acc[rr][0], hi, acc[rr][1]);
      const __m512 e1l = _mm512_permutex2var_ps(acc[rr][2], lo, acc[rr][3]);
      const __m512 e1h = _mm512_permutex2var_ps(acc[rr][2], hi, acc[rr][3]);
      const __m512 f[4] = {
          _mm512_castpd_ps(_mm512_permutex2var_pd(_mm512_castps_pd(e0l), lo64, _mm512_castps_pd(e1l))),
          _mm512_castpd_ps(_mm512_permutex2var_pd(_mm512_castps_pd(e0l), hi64, _mm512_castps_pd(e1l))),
          _mm512_castpd_ps(_mm512_permutex2var_pd(_mm512_castps_pd(e0h), lo64, _mm512_castps_pd(e1h))),
          _mm512_castpd_ps(_mm512_permutex2var_pd(_mm512_castps_pd(e0h), hi64, _mm512_castps_pd(e1h)))};
      const int64_t o = ((b * s.H + i) * s.W + j0) * 4;
      for (int q = 0; q < 4; ++q) store16(out, bf16, o + 16 * q, f[q], lanes(4 * n - 16 * q > 0 ? 4 * n - 16 * q : 0));
    } else {
      for (int rh = 0; rh < 2; ++rh) {
        const int64_t o = (b * 2 * s.H + 2 * i + rh) * 2 * s.W + 2 * j0;
        const __m512 a = acc[rr][rh * 2], c = acc[rr][rh * 2 + 1];
        store16(out, bf16, o, _mm512_permutex2var_ps(a, lo, c), lanes(2 * n));
        if (2 * n > 16) store16(out, bf16, o + 16, _mm512_permutex2var_ps(a, hi, c), lanes(2 * n - 16));
      }
    }
  }
}

// The tap of output sub-pixel r (0 / 1) from the input at block offset d - 1 (-1 when none).
constexpr int kTap[2][3] = {{3, 1, -1}, {-1, 2, 0}};

// w: [C][16 taps].
FFV_TARGET_AVX512 void convt_512(const void* h, bool bf16, const float* w, float bias, void* out, bool s2d, Shape s,
                           int64_t b0, int64_t b1) {
  constexpr int R = 4;  // block rows per step
  const int64_t tw = round_up(s.W, 16) + 2, th = round_up(s.H, R) + 2;
  // T[(row + 1) * C + c][col + 1] = h[row, col, c], zero border (written once: later items
  // overwrite the same interior)
  std::vector<float> T(th * s.C * tw, 0.0f);
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t i = 0; i < s.H; ++i) {
      for (int64_t j0 = 0; j0 < s.W; j0 += 16) {
        const int64_t n = std::min<int64_t>(16, s.W - j0);
        for (int64_t c0 = 0; c0 < s.C; c0 += 16) {
          const __mmask16 m = lanes(s.C - c0);
          __m512 v[16];
          for (int u = 0; u < 16; ++u)
            v[u] = u < n ? load16(h, bf16, ((b * s.H + i) * s.W + j0 + u) * s.C + c0, m) : _mm512_setzero_ps();
          transpose16(v);
          const int64_t nc = std::min<int64_t>(16, s.C - c0);
          for (int r = 0; r < nc; ++r) _mm512_storeu_ps(T.data() + ((i + 1) * s.C + c0 + r) * tw + j0 + 1, v[r]);
        }
      }
    }
    for (int64_t i0 = 0; i0 < s.H; i0 += R) {
      for (int64_t j0 = 0; j0 < s.W; j0 += 16) {
        __m512 acc[R][4];
        for (int rr = 0; rr < R; ++rr)
          for (int p = 0; p < 4; ++p) acc[rr][p] = _mm512_set1_ps(bias);
        for (int64_t c = 0; c < s.C; ++c) {
          const float* wc = w + c * 16;
#pragma GCC unroll 6
          for (int t = 0; t < R + 2; ++t) {
            const float* row = T.data() + ((i0 + t) * s.C + c) * tw + j0;
#pragma GCC unroll 3
            for (int dj = 0; dj < 3; ++dj) {
              const __m512 x = _mm512_loadu_ps(row + dj);
#pragma GCC unroll 4
              for (int rr = 0; rr < R; ++rr) {
                const int d = t - rr;
                if (d < 0 || d > 2) continue;
#pragma GCC unroll 2
                for (int rh = 0; rh < 2; ++rh) {
                  const int kh = kTap[rh][d];
                  if (kh < 0) continue;
#pragma GCC unroll 2
                  for (int rw = 0; rw < 2; ++rw) {
                    const int kw = kTap[rw][dj];
                    if (kw < 0) continue;
                    acc[rr][rh * 2 + rw] = _mm512_fmadd_ps(x, _mm512_set1_ps(wc[kh * 4 + kw]), acc[rr][rh * 2 + rw]);
                  }
                }
              }
            }
          }
        }
        store_convt<R>(acc, out, bf16, s2d, s, b, i0, j0);
      }
    }
  }
}

// --- AVX-512-BF16 (vdpbf16ps: two bfloat16 products per float32 lane) -------------------------
#if defined(FFV_HAVE_AVX512BF16)
FFV_TARGET_AVX512BF16 inline __m512i bcast32(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(static_cast<int>(v));
}

// The bfloat16 plane: P16[(y + 1) * pw + x + 1] = img(b, y, x) (pw even, so the tap pairs
// (kw 0, 1) and (kw 2, 3) of a patch are aligned 32-bit words).
void pad_image_bf16(const Image& im, int64_t b, int64_t H, int64_t W, uint16_t* P, int64_t pw) {
  std::fill(P, P + (2 * H + 2) * pw, uint16_t{0});
  const uint16_t* src = static_cast<const uint16_t*>(im.data);
  const bool s2d_cl = im.s2d && im.sc == 1 && im.sx == 4 && im.sy == 4 * W;
  for (int64_t y = 0; y < 2 * H; ++y) {
    uint16_t* row = P + (y + 1) * pw + 1;
    if (s2d_cl) {
      const uint16_t* s = src + b * im.sb + (y >> 1) * im.sy + (y & 1) * 2;
      for (int64_t j = 0; j < W; ++j) {
        row[2 * j] = s[4 * j];
        row[2 * j + 1] = s[4 * j + 1];
      }
    } else {
      for (int64_t x = 0; x < 2 * W; ++x) row[x] = src[im.offset(b, y, x)];
    }
  }
}

// image_conv on bfloat16: wp [8 tap pairs (kh, kw / 2)][cp][2] bfloat16 words.
FFV_TARGET_AVX512BF16 void conv_512bf16(const Image& im, const uint16_t* wp, int64_t cp, const float* bias, bool relu,
                                  void* out, Shape s, int64_t b0, int64_t b1) {
  constexpr int U = 8;
  const int64_t pw = 2 * round_up(s.W, U) + 4;
  std::vector<uint16_t> P((2 * s.H + 2) * pw);
  for (int64_t b = b0; b < b1; ++b) {
    pad_image_bf16(im, b, s.H, s.W, P.data(), pw);
    for (int64_t c0 = 0; c0 < s.C; c0 += 16) {
      const __mmask16 m = lanes(s.C - c0);
      __m512i w[8];
      for (int k = 0; k < 8; ++k) w[k] = _mm512_loadu_si512(wp + (k * cp + c0) * 2);
      const __m512 bv = bias ? _mm512_loadu_ps(bias + c0) : _mm512_setzero_ps();
      const __m512 zero = _mm512_setzero_ps();
      for (int64_t i = 0; i < s.H; ++i) {
        const uint16_t* rows = P.data() + 2 * i * pw;
        for (int64_t j0 = 0; j0 < s.W; j0 += U) {
          __m512 acc[U];
          for (int u = 0; u < U; ++u) acc[u] = bv;
          for (int kh = 0; kh < 4; ++kh) {
            const uint16_t* r = rows + kh * pw + 2 * j0;
            for (int t = 0; t < 2; ++t)
              for (int u = 0; u < U; ++u) acc[u] = conv::madd(acc[u], bcast32(r + 2 * u + 2 * t), w[kh * 2 + t]);
          }
          const int64_t n = std::min<int64_t>(U, s.W - j0);
          for (int u = 0; u < n; ++u)
            store16(out, true, ((b * s.H + i) * s.W + j0 + u) * s.C + c0, relu ? _mm512_max_ps(acc[u], zero) : acc[u],
                    m);
        }
      }
    }
  }
}

// image_conv_weight_grad on bfloat16: pixel pairs (j, j + 1) of a row per vdpbf16ps; Q[y][x] =
// the words (P16[y][x], P16[y][x + 2]) (the tap's value at both pixels), h's pair interleaved
// per channel. dw: [16 taps][cp] float32, accumulated into.
FFV_TARGET_AVX512BF16 void wgrad_512bf16(const Image& im, const uint16_t* h, Shape s, int64_t cb, int64_t ce, float* dw,
                                   int64_t cp) {
  const int64_t pw = 2 * s.W + 6, rows = 2 * s.H + 2;
  std::vector<uint16_t> P(rows * pw);
  std::vector<uint32_t> Q(rows * pw, 0u);
  for (int64_t b = 0; b < s.B; ++b) {
    pad_image_bf16(im, b, s.H, s.W, P.data(), pw);
    for (int64_t y = 0; y < rows; ++y)
      for (int64_t x = 0; x + 2 < pw; ++x)
        Q[y * pw + x] = static_cast<uint32_t>(P[y * pw + x]) | (static_cast<uint32_t>(P[y * pw + x + 2]) << 16);
    for (int64_t c0 = cb; c0 < ce; c0 += 16) {
      const __mmask16 m = lanes(s.C - c0);
      __m512 acc[16];
      for (int k = 0; k < 16; ++k) acc[k] = _mm512_loadu_ps(dw + k * cp + c0);
      for (int64_t i = 0; i < s.H; ++i) {
        for (int64_t j = 0; j < s.W; j += 2) {
          const uint16_t* hp = h + ((b * s.H + i) * s.W + j) * s.C + c0;
          const __m512i a = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hp));
          const __m512i c = j + 1 < s.W ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hp + s.C))
                                        : _mm512_setzero_si512();
          const __m512i g = _mm512_or_si512(a, _mm512_slli_epi32(c, 16));
          const uint32_t* r = Q.data() + 2 * i * pw + 2 * j;
          for (int kh = 0; kh < 4; ++kh)
            for (int kw = 0; kw < 4; ++kw)
              acc[kh * 4 + kw] = conv::madd(acc[kh * 4 + kw], _mm512_set1_epi32(static_cast<int>(r[kh * pw + kw])), g);
        }
      }
      for (int k = 0; k < 16; ++k) _mm512_storeu_ps(dw + k * cp + c0, acc[k]);
    }
  }
}

// image_conv_transpose on bfloat16: T holds channel pairs, T[(row + 1) * C2 + c / 2][col + 1]
// = the words (h[row, col, c], h[row, col, c + 1]); wp [C2][16 taps] words (w[c, k], w[c + 1, k]).
FFV_TARGET_AVX512BF16 void convt_512bf16(const void* h, const uint32_t* wp, float bias, void* out, bool s2d, Shape s,
                                   int64_t b0, int64_t b1) {
  constexpr int R = 4;
  const int64_t c2 = (s.C + 1) / 2;
  const int64_t tw = round_up(s.W, 16) + 2, th = round_up(s.H, R) + 2;
  std::vector<uint32_t> T(th * c2 * tw, 0u);
  const uint16_t* hp = static_cast<const uint16_t*>(h);
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t i = 0; i < s.H; ++i) {
      for (int64_t j0 = 0; j0 < s.W; j0 += 16) {
        const int64_t n = std::min<int64_t>(16, s.W - j0);
        for (int64_t c0 = 0; c0 < s.C; c0 += 32) {  // 16 channel pairs
          const __mmask32 m = s.C - c0 >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu)
                                             : static_cast<__mmask32>((1u << (s.C - c0)) - 1u);
          __m512 v[16];
          for (int u = 0; u < 16; ++u)
            v[u] = u < n ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, hp + ((b * s.H + i) * s.W + j0 + u) * s.C + c0))
                         : _mm512_setzero_ps();
          transpose16(v);
          const int64_t np = std::min<int64_t>(16, c2 - c0 / 2);
          for (int r = 0; r < np; ++r)
            _mm512_storeu_ps(reinterpret_cast<float*>(T.data() + ((i + 1) * c2 + c0 / 2 + r) * tw + j0 + 1), v[r]);
        }
      }
    }
    for (int64_t i0 = 0; i0 < s.H; i0 += R) {
      for (int64_t j0 = 0; j0 < s.W; j0 += 16) {
        __m512 acc[R][4];
        for (int rr = 0; rr < R; ++rr)
          for (int p = 0; p < 4; ++p) acc[rr][p] = _mm512_set1_ps(bias);
        for (int64_t c = 0; c < c2; ++c) {
          const uint32_t* wc = wp + c * 16;
#pragma GCC unroll 6
          for (int t = 0; t < R + 2; ++t) {
            const uint32_t* row = T.data() + ((i0 + t) * c2 + c) * tw + j0;
#pragma GCC unroll 3
            for (int dj = 0; dj < 3; ++dj) {
              const __m512i x = _mm512_loadu_si512(row + dj);
#pragma GCC unroll 4
              for (int rr = 0; rr < R; ++rr) {
                const int d = t - rr;
                if (d < 0 || d > 2) continue;
#pragma GCC unroll 2
                for (int rh = 0; rh < 2; ++rh) {
                  const int kh = kTap[rh][d];
                  if (kh < 0) continue;
#pragma GCC unroll 2
                  for (int rw = 0; rw < 2; ++rw) {
                    const int kw = kTap[rw][dj];
                    if (kw < 0) continue;
                    acc[rr][rh * 2 + rw] =
                        conv::madd(acc[rr][rh * 2 + rw], x, _mm512_set1_epi32(static_cast<int>(wc[kh * 4 + kw])));
                  }
                }
              }
            }
          }
        }
        store_convt<R>(acc, out, true, s2d, s, b, i0, j0);
      }
    }
  }
}
#endif
#endif

using conv::use_avx512;
using conv::use_bf16_dot;

uint16_t bf16_bits(float v) {
  const at::BFloat16 b(v);
  return b.x;
}

void check_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
              "fastfvae_native ", op, ": ", name, " must be a float32 or bfloat16 CPU tensor, got ", t.scalar_type(),
              " on ", t.device());
}

// The block grid (B, H, W) of an image tensor.
Image image_of(const at::Tensor& img, bool s2d, const char* op, int64_t* B, int64_t* H, int64_t* W) {
  check_dtype(img, op, "img");
  TORCH_CHECK(img.dim() == 4 && (s2d ? img.size(1) == 4 : (img.size(1) == 1 && img.size(2) % 2 == 0 &&
                                                             img.size(3) % 2 == 0)),
              "fastfvae_native ", op, ": img must be ", s2d ? "[B, 4, H, W] (space-to-depth)" : "[B, 1, 2H, 2W]",
              ", got ", img.sizes());
  *B = img.size(0);
  *H = s2d ? img.size(2) : img.size(2) / 2;
  *W = s2d ? img.size(3) : img.size(3) / 2;
  return Image{img.data_ptr(), img.scalar_type() == at::kBFloat16, s2d, img.stride(0), img.stride(1), img.stride(2),
               img.stride(3)};
}

at::Tensor weight_of(const at::Tensor& weight, int64_t C, const char* op) {
  TORCH_CHECK(weight.device().is_cpu() && weight.is_floating_point() && weight.dim() == 4 && weight.size(0) == C &&
                  weight.size(1) == 1 && weight.size(2) == 4 && weight.size(3) == 4,
              "fastfvae_native ", op, ": weight must be a floating [", C, ", 1, 4, 4] CPU tensor, got ",
              weight.scalar_type(), " ", weight.sizes(), " on ", weight.device());
  return weight.to(at::kFloat).contiguous();
}

void check_bias(const at::Tensor& bias, int64_t n, const char* op) {
  TORCH_CHECK(bias.device().is_cpu() && bias.is_floating_point() && bias.numel() == n, "fastfvae_native ", op,
              ": bias must be a floating CPU tensor of ", n, n == 1 ? " element" : " elements", ", got ",
              bias.scalar_type(), " ", bias.sizes(), " on ", bias.device());
}

at::Tensor channels_last(const at::Tensor& h, const char* op, Shape* s) {
  check_dtype(h, op, "h");
  TORCH_CHECK(h.dim() == 4, "fastfvae_native ", op, ": h must be [B, C, H, W], got ", h.sizes());
  *s = Shape{h.size(0), h.size(1), h.size(2), h.size(3)};
  return h.contiguous(at::MemoryFormat::ChannelsLast);
}


}  // namespace

at::Tensor image_conv(const at::Tensor& img, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      bool relu, bool s2d) {
  int64_t B, H, W;
  const Image im = image_of(img, s2d, "image_conv", &B, &H, &W);
  const int64_t C = weight.size(0);
  const at::Tensor w = weight_of(weight, C, "image_conv");
  const bool bf16 = im.bf16;
  at::Tensor out = at::empty({B, C, H, W}, img.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t cp = round_up(C, 16);
  std::vector<float> bv(cp, 0.0f), wk(16 * cp, 0.0f);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_bias(*bias, C, "image_conv");
    const at::Tensor b = bias->to(at::kFloat).contiguous();
    std::copy(b.data_ptr<float>(), b.data_ptr<float>() + C, bv.begin());
  }
  const float* wp = w.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c)
    for (int k = 0; k < 16; ++k) wk[k * cp + c] = wp[c * 16 + k];
  const Shape s{B, C, H, W};
  void* o = out.data_ptr();
  const bool simd = use_avx512(), dot = bf16 && use_bf16_dot();
  std::vector<uint16_t> wpairs(dot ? 16 * cp : 0, 0);  // [kh * 2 + kw / 2][c][kw % 2]
  for (int64_t c = 0; dot && c < C; ++c)
    for (int k = 0; k < 16; ++k) wpairs[((k / 2) * cp + c) * 2 + k % 2] = bf16_bits(wp[c * 16 + k]);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
#if defined(FFV_HAVE_AVX512BF16)
    if (dot) return conv_512bf16(im, wpairs.data(), cp, has_bias ? bv.data() : nullptr, relu, o, s, b0, b1);
#endif
#if defined(FASTFVAE_MLP_SIMD)
    if (simd) return conv_512(im, wk.data(), cp, has_bias ? bv.data() : nullptr, relu, o, bf16, s, b0, b1);
#endif
    (void)simd, (void)dot;
    conv_scalar(im, wp, has_bias ? bv.data() : nullptr, relu, o, bf16, s, b0, b1);
  });
  return out;
}

at::Tensor image_conv_transpose(const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                bool s2d) {
  Shape s;
  const at::Tensor hc = channels_last(h, "image_conv_transpose", &s);
  const at::Tensor w = weight_of(weight, s.C, "image_conv_transpose");
  float b = 0.0f;
  if (bias.has_value() && bias->defined()) {
    check_bias(*bias, 1, "image_conv_transpose");
    b = bias->to(at::kFloat).item<float>();
  }
  const bool bf16 = h.scalar_type() == at::kBFloat16;
  at::Tensor out = s2d ? at::empty({s.B, 4, s.H, s.W}, h.options().memory_format(at::MemoryFormat::ChannelsLast))
                       : at::empty({s.B, 1, 2 * s.H, 2 * s.W}, h.options());
  const void* hp = hc.data_ptr();
  const float* wp = w.data_ptr<float>();
  void* o = out.data_ptr();
  const bool simd = use_avx512(), dot = bf16 && use_bf16_dot();
  const int64_t c2 = (s.C + 1) / 2;
  std::vector<uint32_t> wpairs(dot ? 16 * c2 : 0, 0u);  // [c / 2][k]: (w[c, k], w[c + 1, k])
  for (int64_t c = 0; dot && c < s.C; ++c)
    for (int k = 0; k < 16; ++k) wpairs[(c / 2) * 16 + k] |= static_cast<uint32_t>(bf16_bits(wp[c * 16 + k])) << (16 * (c % 2));
  at::parallel_for(0, s.B, 1, [&](int64_t b0, int64_t b1) {
#if defined(FFV_HAVE_AVX512BF16)
    if (dot) return convt_512bf16(hp, wpairs.data(), b, o, s2d, s, b0, b1);
#endif
#if defined(FASTFVAE_MLP_SIMD)
    if (simd) return convt_512(hp, bf16, wp, b, o, s2d, s, b0, b1);
#endif
    (void)simd, (void)dot;
    convt_scalar(hp, bf16, wp, b, o, s2d, s, b0, b1);
  });
  return out;
}

at::Tensor image_conv_weight_grad(const at::Tensor& img, const at::Tensor& h, bool s2d) {
  int64_t B, H, W;
  const Image im = image_of(img, s2d, "image_conv_weight_grad", &B, &H, &W);
  Shape s;
  const at::Tensor hc = channels_last(h, "image_conv_weight_grad", &s);
  TORCH_CHECK(s.B == B && s.H == H && s.W == W && h.scalar_type() == img.scalar_type(),
              "fastfvae_native image_conv_weight_grad: h must be [", B, ", C, ", H, ", ", W, "] of img's dtype, got ",
              h.sizes(), " ", h.scalar_type());
  const int64_t C = s.C, cp = round_up(C, 16);
  const bool simd = use_avx512(), bf16 = im.bf16, dot = bf16 && use_bf16_dot();
  (void)dot;
  // Threads split the channels, 16 at a time; each channel sums over the images and pixels in
  // one order, so the result has the same bits on any number of threads.
  std::vector<float> dw(16 * cp, 0.0f);  // [16][cp] (AVX-512) or [C][16] (scalar)
  const void* hp = hc.data_ptr();
  at::parallel_for(0, cp / 16, 1, [&](int64_t k0, int64_t k1) {
    const int64_t c0 = 16 * k0, c1 = std::min(C, 16 * k1);
#if defined(FFV_HAVE_AVX512BF16)
    if (dot) {
      wgrad_512bf16(im, static_cast<const uint16_t*>(hp), s, c0, c1, dw.data(), cp);
      return;
    }
#endif
#if defined(FASTFVAE_MLP_SIMD)
    if (simd) {
      wgrad_512(im, hp, bf16, s, c0, c1, dw.data(), cp);
      return;
    }
#endif
    wgrad_scalar(im, hp, bf16, s, c0, c1, dw.data());
  });
  at::Tensor out = at::empty({C, 1, 4, 4}, img.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c)
    for (int k = 0; k < 16; ++k) op[c * 16 + k] = simd ? dw[k * cp + c] : dw[c * 16 + k];
  return out;
}

std::string conv_isa() { return use_bf16_dot() ? "avx512_bf16" : use_avx512() ? "avx512" : "scalar"; }

FASTFVAE_PARALLEL_PROBE(parallel_probe_conv_image)

}  // namespace fastfvae_native
