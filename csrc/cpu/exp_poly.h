// The core shared by the float32 exponentials of the CPU kernels (exp_nonpositive and exp_sum_term in
// softmax_row.h, exp_any in loss_simd.h): x = n ln 2 + r with n = round(x / ln 2) and |r| <= ln 2 / 2, and
// e^r by a degree-5 polynomial (minimax for the relative error, constant term exactly 1). The callers apply
// 2^n through the exponent bits and handle the range where that would leave the normal floats. Free of
// branches and of selects, so that it vectorizes inside `omp simd` loops for AVX2 as for AVX-512.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// For the functions called inside `omp simd` loops: a call left there keeps the loop scalar (gcc stops
// inlining in large functions).
#define GRPO_ALWAYS_INLINE inline __attribute__((always_inline))

namespace grpo_kernels::cpu::GRPO_CPU_COPY {  // one copy per instruction set (setup.py)

// a·b + c, fused (one rounding) where the target has FMA instructions. The
// extension is built with -ffp-contract=off, so nothing else is fused.
GRPO_ALWAYS_INLINE float madd(float a, float b, float c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// How r = x - n ln 2 is formed.
enum class Ln2Split {
  // ln 2 as hi + lo (n·hi exact): r within about 1 ulp for every |n| <= 150. e^x within 2 ulp.
  kHiLo,
  // ln 2 as one float (off by 1.9e-9): one multiply-add less, r off by up to |n|·1.9e-9 more, so e^x off by
  // about |x|·2.8e-9 relative more (3e-8 at x = -10, where e^x is 5e-5 of e^0): for sums of e^x over x <= 0,
  // where the terms that matter have small |x|.
  kOne,
};

// 1.5·2^23: t = x / ln 2 + kRoundShifter holds round(x / ln 2) in its low mantissa bits (|x| < 2^22 ln 2).
constexpr float kRoundShifter = 12582912.0f;
constexpr uint32_t kRoundShifterBits = 0x4B400000u;  // its bits: t's bits minus these are n

// e^x = poly · 2^n for x in about [-150 ln 2, 150 ln 2] (outside, poly and n are meaningless: the callers
// clamp x or mask the result). n is t_bits - kRoundShifterBits, and also t_bits in two's complement in
// its low bits (so t_bits << 23 is n << 23). NaN gives a NaN poly.
struct ExpParts {
  float poly;       // e^r, in [0.70, 1.42]
  uint32_t t_bits;  // the bits of t = kRoundShifter + n
};

// t = x / ln 2 + kRoundShifter, n = round(x / ln 2) in its low mantissa bits.
GRPO_ALWAYS_INLINE float exp_shifted_n(float x) { return madd(x, 1.44269504088896341f, kRoundShifter); }

// exp_parts for t = exp_shifted_n(x) or a clamped value of it (r = x - n ln 2 then follows that n).
template <Ln2Split kSplit = Ln2Split::kHiLo>
GRPO_ALWAYS_INLINE ExpParts exp_parts(float x, float t) {
  const float n = t - kRoundShifter;
  const float r = kSplit == Ln2Split::kHiLo ? madd(n, 2.12194440e-4f, madd(n, -0.693359375f, x))
                                            : madd(n, -0.693147182464599609375f, x);
  float p = 8.2895793021e-3f;
  p = madd(p, r, 4.1897822171e-2f);
  p = madd(p, r, 1.6667649150e-1f);
  p = madd(p, r, 4.9999150634e-1f);
  p = madd(p, r, 9.9999970198e-1f);
  p = madd(p, r, 1.0f);
  uint32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof(t));
  return {p, t_bits};
}

template <Ln2Split kSplit = Ln2Split::kHiLo>
GRPO_ALWAYS_INLINE ExpParts exp_parts(float x) {
  return exp_parts<kSplit>(x, exp_shifted_n(x));
}

}  // namespace grpo_kernels::cpu::GRPO_CPU_COPY
