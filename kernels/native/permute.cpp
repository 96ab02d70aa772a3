// permute_dims: each column's rows ordered by a stable sort of that column's keys.
//
// A key becomes an unsigned integer with the same order (-0.0 folded onto +0.0, every NaN
// onto one value above +inf, as torch's sort orders them); the row index is the tie-break,
// so a plain sort of (key, row) pairs is the stable argsort. float16/bfloat16/float32 keys
// widen exactly to float32 and pack with the row into one 64-bit word.
#include "permute.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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

// The stable argsort of column j of keys [B, D] (any float dtype, any strides) into order.
template <typename key_t>
void column_order(const key_t* keys, int64_t B, int64_t stride_b, std::vector<uint64_t>& packed,
                  std::vector<std::pair<uint64_t, uint32_t>>& wide, uint32_t* order) {
  if constexpr (std::is_same_v<key_t, double>) {
    wide.resize(B);
    for (int64_t r = 0; r < B; ++r) wide[r] = {ordered_bits(keys[r * stride_b]), static_cast<uint32_t>(r)};
    std::sort(wide.begin(), wide.end());
    for (int64_t r = 0; r < B; ++r) order[r] = wide[r].second;
  } else {
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
    std::vector<uint64_t> packed;
    std::vector<std::pair<uint64_t, uint32_t>> wide;
    std::vector<uint32_t> order(B);
    for (int64_t j = j0; j < j1; ++j) {
      column_order(pk + j * skd, B, skb, packed, wide, order.data());
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

}  // namespace fastfvae_native
