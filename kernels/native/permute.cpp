// permute_dims: each column's rows ordered by a stable sort of that column's keys.
//
// A key becomes an unsigned integer with the same order (-0.0 folded onto +0.0, every NaN
// onto one value above +inf, as torch's sort orders them); the row index is the tie-break,
// so a plain sort of (key, row) pairs is the stable argsort. float16/bfloat16/float32 keys
// widen exactly to float32: short columns sort (key, row) packed into one 64-bit word, longer
// ones go through a least-significant-digit radix sort of the 32-bit keys (three 11-bit
// passes, each stable, so equal keys keep their row order), which is linear in the rows.
#include "permute.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_probe.h"

namespace fastfvae_native {
namespace {

constexpr int64_t kElementsPerTask = 16384;

uint32_t ordered_bits(float key) {
  if (std::isnan(key)) return 0xFFFFFFFFu;
  if (key == 0.0f) key = 0.0f;  // -0.0 sorts with +0.0
  uint32_t u;
  std::memcpy(&u, &key, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

uint64_t ordered_bits(double key) {
  if (std::isnan(key)) return ~uint64_t{0};
  if (key == 0.0) key = 0.0;
  uint64_t u;
  std::memcpy(&u, &key, sizeof u);
  return (u >> 63) ? ~u : (u | (uint64_t{1} << 63));
}

// Rows from which a column's order comes from the radix sort rather than a comparison sort.
constexpr int64_t kRadixMinRows = 600;
constexpr int kRadixBits = 11;

// Per-thread buffers of column_order.
struct SortBuffers {
  std::vector<uint64_t> packed;
  std::vector<std::pair<uint64_t, uint32_t>> wide;
  std::vector<uint32_t> keys_a, keys_b, rows_b;
  std::vector<int64_t> counts;
};

// Stable LSD radix sort of the ordered keys keys_a[0, B); the rows end up in order.
void radix_order(int64_t B, SortBuffers& buf, uint32_t* order) {
  constexpr int64_t kBuckets = int64_t{1} << kRadixBits;
  buf.keys_b.resize(B);
  buf.rows_b.resize(B);
  buf.counts.resize(kBuckets);
  uint32_t *keys = buf.keys_a.data(), *rows = order, *keys_out = buf.keys_b.data(), *rows_out = buf.rows_b.data();
  for (int64_t r = 0; r < B; ++r) rows[r] = static_cast<uint32_t>(r);
  for (int shift = 0; shift < 32; shift += kRadixBits) {
    std::fill(buf.counts.begin(), buf.counts.end(), 0);
    for (int64_t r = 0; r < B; ++r) ++buf.counts[(keys[r] >> shift) & (kBuckets - 1)];
    if (buf.counts[(keys[0] >> shift) & (kBuckets - 1)] == B) continue;  // one digit: already in order
    int64_t offset = 0;
    for (int64_t d = 0; d < kBuckets; ++d) {
      const int64_t c = buf.counts[d];
      buf.counts[d] = offset;
      offset += c;
    }
    for (int64_t r = 0; r < B; ++r) {
      const int64_t pos = buf.counts[(keys[r] >> shift) & (kBuckets - 1)]++;
      keys_out[pos] = keys[r];
      rows_out[pos] = rows[r];
    }
    std::swap(keys, keys_out);
    std::swap(rows, rows_out);
  }
  if (rows != order) std::copy(rows, rows + B, order);
}

// The stable argsort of column j of keys [B, D] (any float dtype, any strides) into order.
template <typename key_t>
void column_order(const key_t* keys, int64_t B, int64_t stride_b, SortBuffers& buf, uint32_t* order) {
  if constexpr (std::is_same_v<key_t, double>) {
    auto& wide = buf.wide;
    wide.resize(B);
    for (int64_t r = 0; r < B; ++r) wide[r] = {ordered_bits(keys[r * stride_b]), static_cast<uint32_t>(r)};
    std::sort(wide.begin(), wide.end());
    for (int64_t r = 0; r < B; ++r) order[r] = wide[r].second;
  } else if (B >= kRadixMinRows) {
    buf.keys_a.resize(B);
    for (int64_t r = 0; r < B; ++r) buf.keys_a[r] = ordered_bits(static_cast<float>(keys[r * stride_b]));
    radix_order(B, buf, order);
  } else {
    auto& packed = buf.packed;
    packed.resize(B);
    for (int64_t r = 0; r < B; ++r) {
      packed[r] = (uint64_t{ordered_bits(static_cast<float>(keys[r * stride_b]))} << 32) | static_cast<uint64_t>(r);
    }
    std::sort(packed.begin(), packed.end());
    for (int64_t r = 0; r < B; ++r) order[r] = static_cast<uint32_t>(packed[r]);
  }
}

// Moves elements of one byte width; the values are never interpreted.
template <int kBytes>
struct Element {
  unsigned char bytes[kBytes];
};

template <typename elem_t, typename key_t>
void permute_columns(const at::Tensor& src, const at::Tensor& keys, at::Tensor& out, bool inverse) {
  const int64_t B = src.size(0), D = src.size(1);
  const auto* ps = static_cast<const elem_t*>(src.const_data_ptr());
  const int64_t ssb = src.stride(0), ssd = src.stride(1);
  const key_t* pk = keys.const_data_ptr<key_t>();
  const int64_t skb = keys.stride(0), skd = keys.stride(1);
  auto* po = static_cast<elem_t*>(out.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / B);
  at::parallel_for(0, D, grain, [&](int64_t j0, int64_t j1) {
    SortBuffers buf;
    std::vector<uint32_t> order(B);
    for (int64_t j = j0; j < j1; ++j) {
      column_order(pk + j * skd, B, skb, buf, order.data());
      const elem_t* col = ps + j * ssd;
      if (inverse) {
        for (int64_t r = 0; r < B; ++r) po[order[r] * D + j] = col[r * ssb];
      } else {
        for (int64_t r = 0; r < B; ++r) po[r * D + j] = col[order[r] * ssb];
      }
    }
  });
}

template <typename key_t>
void permute_by_width(const at::Tensor& src, const at::Tensor& keys, at::Tensor& out, bool inverse) {
  switch (src.element_size()) {
    case 1: return permute_columns<Element<1>, key_t>(src, keys, out, inverse);
    case 2: return permute_columns<Element<2>, key_t>(src, keys, out, inverse);
    case 4: return permute_columns<Element<4>, key_t>(src, keys, out, inverse);
    case 8: return permute_columns<Element<8>, key_t>(src, keys, out, inverse);
    case 16: return permute_columns<Element<16>, key_t>(src, keys, out, inverse);
    default: TORCH_CHECK(false, "fastfvae_native permute_dims: unsupported element size ", src.element_size());
  }
}

at::Tensor run(const at::Tensor& src, const at::Tensor& keys, bool inverse) {
  TORCH_CHECK(src.dim() == 2, "fastfvae_native permute_dims: z must be 2-D [batch, dims], got ", src.sizes());
  TORCH_CHECK(keys.sizes() == src.sizes(), "fastfvae_native permute_dims: keys must have z's shape ", src.sizes(),
              ", got ", keys.sizes());
  TORCH_CHECK(at::isFloatingType(keys.scalar_type()), "fastfvae_native permute_dims: keys must be a float tensor, got ",
              keys.scalar_type());
  TORCH_CHECK(src.device().is_cpu() && keys.device().is_cpu(), "fastfvae_native permute_dims: CPU tensors only");
  TORCH_CHECK(src.size(0) < (int64_t{1} << 32), "fastfvae_native permute_dims: at most 2^32 - 1 rows");
  at::Tensor out = at::empty(src.sizes(), src.options().memory_format(at::MemoryFormat::Contiguous));
  if (src.numel() == 0) return out;
  switch (keys.scalar_type()) {
    case at::kFloat: permute_by_width<float>(src, keys, out, inverse); break;
    case at::kDouble: permute_by_width<double>(src, keys, out, inverse); break;
    case at::kHalf: permute_by_width<at::Half>(src, keys, out, inverse); break;
    case at::kBFloat16: permute_by_width<at::BFloat16>(src, keys, out, inverse); break;
    default: TORCH_CHECK(false, "fastfvae_native permute_dims: unsupported key dtype ", keys.scalar_type());
  }
  return out;
}

}  // namespace

at::Tensor permute_dims(const at::Tensor& z, const at::Tensor& keys) { return run(z, keys, false); }

at::Tensor permute_dims_backward(const at::Tensor& grad, const at::Tensor& keys) { return run(grad, keys, true); }

FASTFVAE_PARALLEL_PROBE(parallel_probe_permute)

}  // namespace fastfvae_native
