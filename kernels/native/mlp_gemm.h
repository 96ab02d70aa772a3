// The GEMM under the native linear + LeakyReLU ops and the native discriminator.
//
//   C[M, N] = epilogue(A[M, K] . B[K, N])
//
// A is row-major with its reduction dimension contiguous (row stride lda); B is packed in
// panels of kPanel = 48 output columns: float32 B as [panel][K][48], bfloat16 B as
// [panel][ceil(K/2)][48][2], each pair of consecutive k of one column side by side, which is
// the operand layout of AVX-512-BF16's vdpbf16ps (two products per 32-bit lane). Columns past
// N and the k past K of the last pair are zero in the panels. bfloat16 A rows are read in
// pairs too, so a row must have an even number of readable elements (ceil(K/2) * 2), the
// one past an odd K being finite (the callers keep it zero).
//
// The products accumulate in float32; the epilogue adds a float32 bias, applies
// LeakyReLU(slope), or multiplies by the LeakyReLU derivative read from the sign of another
// [M, N] tensor, then stores float32 or bfloat16 (round to nearest even, as torch).
#pragma once

#include <cstdint>

namespace fastfvae_native {
namespace mlp {

constexpr int64_t kPanel = 48;

enum class Elem { F32 = 0, BF16 = 1 };

// The instruction-set variant the GEMM runs, chosen once at run time (cpu_isa.h caps it).
enum class GemmIsa { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };
GemmIsa gemm_isa();
const char* gemm_isa_name(GemmIsa isa);

inline int64_t reduction_rows(int64_t K, Elem e) { return e == Elem::BF16 ? (K + 1) / 2 : K; }
inline int64_t panel_count(int64_t N) { return (N + kPanel - 1) / kPanel; }
// Elements (float32 or bfloat16) of the packed B of a K x N operand.
inline int64_t packed_numel(int64_t K, int64_t N, Elem e) {
  return panel_count(N) * reduction_rows(K, e) * (e == Elem::BF16 ? 2 : 1) * kPanel;
}
// Offset in the packed B of element (k, n).
inline int64_t packed_offset(int64_t k, int64_t n, int64_t K, Elem e) {
  const int64_t p = n / kPanel, c = n % kPanel;
  if (e == Elem::BF16) return ((p * ((K + 1) / 2) + k / 2) * kPanel + c) * 2 + (k & 1);
  return (p * K + k) * kPanel + c;
}

enum class Src { F32 = 0, BF16 = 1 };

// Packs B[k][n] = src[n * ld + k] (transposed: src is [N, K], an nn.Linear weight for the
// forward) or src[k * ld + n] (src is [K, N]) into `out` (packed_numel elements of `e`),
// converting float32 to bfloat16 where asked. Threads over panels.
void pack_b(const void* src, Src src_type, int64_t ld, bool transposed, int64_t K, int64_t N, Elem e, void* out);

// torch.optim.Adam's update (no weight decay / amsgrad), in its operation order, float32.
struct AdamScalars {
  float step_size, bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps;
};

// A weight-gradient GEMM's epilogue that applies Adam instead of storing the gradient: for
// C[n, k] = d(loss)/d(W[n, k]), W, its moments and both packed copies are updated in place,
// 48 rows of W at a time (their gradient kept in a buffer the size of L2, not in memory).
struct AdamUpdate {
  float* w;
  float* m;
  float* v;
  int64_t N, K;  // W [N, K], row-major
  AdamScalars s;
  Elem e;
  void* packed;    // forward copy (B = W^T)
  void* packed_t;  // input-gradient copy (B = W)
};

struct Epilogue {
  void* out = nullptr;            // C[m, n] at out + m * ldc + n
  int64_t ldc = 0;
  Elem out_elem = Elem::F32;
  const float* bias = nullptr;    // [N] added when given
  bool act = false;               // LeakyReLU(slope) after the bias
  float slope = 0.0f;
  const void* gate = nullptr;     // when given: C *= (gate[m, n] > 0 ? 1 : slope), gate [M, N]
  int64_t ldg = 0;
  Elem gate_elem = Elem::F32;
  const AdamUpdate* adam = nullptr;  // when given: Adam on C (a weight gradient), nothing stored
};

// C = epilogue(A . B) on the active variant; threads over (panel, row block) tiles.
void gemm(int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, Elem e, const void* B, const Epilogue& epi);


// Adam on n float32 elements (a bias).
void adam_vector(float* w, float* m, float* v, const float* g, int64_t n, const AdamScalars& s);

// Adam on rows [r0, r1) of a weight [N, K] (r0 a multiple of kPanel), g the gradient indexed as W, then the updated rows into both packed
// copies in e: `packed` (forward, B = W^T) and `packed_t` (input gradient, B = W).
void adam_rows(float* w, float* m, float* v, const float* g, int64_t N, int64_t K, int64_t r0, int64_t r1,
               const AdamScalars& s, Elem e, void* packed, void* packed_t);

}  // namespace mlp
}  // namespace fastfvae_native
