// Which instruction set the hot loops run with, chosen once at run time.
#pragma once

#include <string>

namespace fastfvae_native {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// The best variant this CPU supports and this build compiled, capped by the environment
// variable FASTFVAE_NATIVE_ISA (scalar | avx2 | avx512), read on first use: it lets the
// narrower variants be tested on a wider CPU.
Isa active_isa();
std::string isa_name(Isa isa);

}  // namespace fastfvae_native
