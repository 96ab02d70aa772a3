#include "cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace fastfvae_native {

static Isa detect() {
  Isa best = Isa::Scalar;
#if defined(FASTFVAE_HAVE_SIMD) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) {
    best = Isa::Avx512;
  } else if (__builtin_cpu_supports("avx2")) {
    best = Isa::Avx2;
  }
#endif
  const char* cap = std::getenv("FASTFVAE_NATIVE_ISA");
  if (cap != nullptr) {
    Isa limit = best;
    if (std::strcmp(cap, "scalar") == 0) limit = Isa::Scalar;
    if (std::strcmp(cap, "avx2") == 0) limit = Isa::Avx2;
    if (static_cast<int>(limit) < static_cast<int>(best)) best = limit;
  }
  return best;
}

Isa active_isa() {
  static const Isa isa = detect();
  return isa;
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace fastfvae_native
