// Which sources of the library thread: at::parallel_for is OpenMP inlined from ATen's headers,
// so it runs in parallel only in a source compiled with -fopenmp (CMakeLists.txt compiles every
// source so). Each source that threads defines its probe with FASTFVAE_PARALLEL_PROBE, so the
// probe's at::parallel_for is compiled exactly as that source's ops are.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

// int64_t fn(int64_t n): the number of distinct threads (at::get_thread_num) that ran a part of
// at::parallel_for(0, n, 1, ...) compiled in the calling source; 1 where that source is serial.
#define FASTFVAE_PARALLEL_PROBE(fn)                                   \
  int64_t fn(int64_t n) {                                             \
    std::atomic<uint64_t> seen{0};                                    \
    at::parallel_for(0, n, 1, [&](int64_t, int64_t) {                 \
      const int tid = at::get_thread_num();                           \
      seen.fetch_or(uint64_t{1} << (tid < 63 ? tid : 63));            \
    });                                                               \
    return __builtin_popcountll(seen.load());                         \
  }

namespace fastfvae_native {

int64_t parallel_probe_gaussian(int64_t n);
int64_t parallel_probe_permute(int64_t n);
int64_t parallel_probe_mlp(int64_t n);
int64_t parallel_probe_mlp_gemm(int64_t n);
int64_t parallel_probe_conv_image(int64_t n);
int64_t parallel_probe_conv_s2(int64_t n);

}  // namespace fastfvae_native
