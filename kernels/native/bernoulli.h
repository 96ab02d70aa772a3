// The Bernoulli reconstruction loss of the VAE (BCE with logits, summed) and its gradient, one
// pass each over the flat memory of logits and x:
//
//   bernoulli_nll_sum(l, x)         = sum_i (1 - x_i) l_i - logsigmoid(l_i)           (float32, 0-dim)
//   bernoulli_nll_grad(l, x, scale) = (sigmoid(l_i) - x_i) * scale                    (l's dtype and layout)
//
// with logsigmoid(l) = min(l, 0) - log1p(exp(-|l|)): torch's binary_cross_entropy_with_logits
// formula, so its inf and NaN results are torch's (l = +inf, x = 0: +inf; l = +inf, x = 1 or
// l = -inf: NaN; a NaN l or x: NaN) and sigmoid(l) = 1 / (1 + exp(-l)) as torch's sigmoid.
// logits is a float32 or bfloat16 CPU tensor, x a float32 one (or of logits' dtype), both of
// the same sizes and strides (a dimension of size 1 may have any stride), non-overlapping and
// dense (any layout: element i of the flat memory of one is element i of the other's). Every
// element is computed in float32 (bfloat16 widened exactly); a bfloat16 gradient is rounded to
// nearest even, NaN to 0x7fc0 (c10's rule).
//
// The sum runs in float32 within fixed blocks of elements (16 lane partials, reduced in a fixed
// tree, then the block's tail), the block partials added in block order in float64 and rounded
// once: the same bits on any thread count. The AVX-512 variant computes exp and log with glibc's
// vector math library (libmvec), the scalar variant (and the tail) with libm's expf / logf, in
// the same order: the variants differ only by those functions' last-bit differences.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace fastfvae_native {

at::Tensor bernoulli_nll_sum(const at::Tensor& logits, const at::Tensor& x);
at::Tensor bernoulli_nll_sum_meta(const at::Tensor& logits, const at::Tensor& x);
at::Tensor bernoulli_nll_grad(const at::Tensor& logits, const at::Tensor& x, double scale);
at::Tensor bernoulli_nll_grad_meta(const at::Tensor& logits, const at::Tensor& x, double scale);
// The variant both run: avx512 or scalar.
std::string bernoulli_isa();
int64_t parallel_probe_bernoulli(int64_t n);

}  // namespace fastfvae_native
