// The math of one row of logits x [V] at inverse temperature 1/T, shared by
// the token_logprobs and fused_grpo_loss kernels:
//
//   z = x / T,  lse = log Σ_v e^{z_v},  logp_y = z_y - lse,  p = e^{z - lse},
//   H = -Σ_v p_v log p_v = log s - a / s  with  s = Σ e^{z - m},  a = Σ e^{z - m} (z - m),  m = max z
//
// (a relative to m: no cancellation between numbers of the size of |z|).
// A row is processed in chunks of kChunk values that stay in L2: a chunk's max
// is taken first (no exponentials), then its exponentials relative to it, and
// the chunk's (max, s, a) are merged into the row's running state, so the row
// is read once from memory and every exponential is computed once.
//
// The inner loops are `omp simd` loops over the vocab: gcc emits vector code
// for the target ISA (AVX2 or AVX-512). Their bodies hold no branch and no
// select between floats (gcc 12 leaves such a loop scalar for AVX2, 5-7x
// slower). Sums run in 16 lanes in a fixed order, so results depend neither on
// the thread count nor on the vector width.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "exp_poly.h"

namespace grpo_kernels::cpu::GRPO_CPU_COPY {  // one copy per instruction set (setup.py)

// Values per chunk: 64 KiB of logits, whole rows of a 32k vocabulary in bfloat16 (the
// chunk stays in L2 between its two reads, its exponentials in L2 until the gradient pass).
template <typename scalar_t>
constexpr int64_t kChunk = 65536 / sizeof(scalar_t);

// Below this, exp_nonpositive and exp_sum_term give 0: above it, e^r 2^n is a normal float.
constexpr float kExpUnderflow = -87.0f;

// e^r 2^n (exp_parts) by adding n to the exponent bits of e^r: the low bits of t hold n (two's complement), so
// t_bits << 23 is n << 23. Right where e^x is a normal float; meaningless bits elsewhere.
GRPO_ALWAYS_INLINE float scale_by_exponent(const ExpParts& e) {
  uint32_t p_bits;
  std::memcpy(&p_bits, &e.poly, sizeof(p_bits));
  p_bits += e.t_bits << 23;
  float p;
  std::memcpy(&p, &p_bits, sizeof(p));
  return p;
}

// p, or 0 where x < kExpUnderflow, on the bits (NaN x keeps p).
GRPO_ALWAYS_INLINE float zero_below_underflow(float p, float x) {
  uint32_t p_bits;
  std::memcpy(&p_bits, &p, sizeof(p_bits));
  p_bits &= 0u - static_cast<uint32_t>(!(x < kExpUnderflow));  // all ones, or 0 where e^x underflows
  std::memcpy(&p, &p_bits, sizeof(p));
  return p;
}

// e^x for x <= 0 (softmax only exponentiates z - max; a rounding's worth above 0
// is fine too), within 2 ulp, 0 for x < -87 (below the smallest normal float)
// and for x = -inf, NaN for NaN. Free of branches and of selects between
// floats, so that gcc vectorizes it inside `omp simd` loops for AVX2 as for
// AVX-512 (a `cond ? 0.0f : p` here left the AVX2 loops scalar).
GRPO_ALWAYS_INLINE float exp_nonpositive(float x) { return zero_below_underflow(scale_by_exponent(exp_parts(x)), x); }

inline double exp_nonpositive(double x) { return std::exp(x); }  // float64: the simple, exact path

// Loads and stores between the logits dtype and the compute dtype that gcc vectorizes: bfloat16 by its
// bits (round to nearest even, NaN kept as the quiet NaN, as c10::BFloat16 rounds), the others by a cast.
template <typename acc_t, typename scalar_t>
GRPO_ALWAYS_INLINE acc_t to_acc(scalar_t x) {
  return static_cast<acc_t>(x);
}

template <>
GRPO_ALWAYS_INLINE float to_acc<float, c10::BFloat16>(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename scalar_t, typename acc_t>
inline scalar_t from_acc(acc_t v) {
  return static_cast<scalar_t>(v);
}

template <>
inline c10::BFloat16 from_acc<c10::BFloat16, float>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// Running state of a row: max m and s, a relative to m.
template <typename acc_t>
struct LseState {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  acc_t s = 0;
  acc_t a = 0;

  // Merge a chunk's (max cm, s relative to cm, a relative to cm).
  void merge(acc_t cm, acc_t cs, acc_t ca) {
    const acc_t m_new = std::max(m, cm);
    if (m_new == -std::numeric_limits<acc_t>::infinity()) return;  // all -inf so far: s = a = 0
    const acc_t alpha = std::exp(m - m_new), beta = std::exp(cm - m_new);
    // (m - m_new)·s only where s > 0 (then m is finite), likewise for the chunk
    const acc_t carried = s > 0 ? (m - m_new) * s : acc_t(0);
    const acc_t chunk_carried = cs > 0 ? (cm - m_new) * cs : acc_t(0);
    a = alpha * (a + carried) + beta * (ca + chunk_carried);
    s = alpha * s + beta * cs;
    m = m_new;
  }

  acc_t lse() const { return m + std::log(s); }
  acc_t entropy() const { return std::log(s) - a / s; }
};

// Sums of chunk_exp: kSumLanes running sums whatever the vector width (AVX2 and
// AVX-512 give the same bits), each fed by fresh partials of kSumBlock /
// kSumLanes values. One running sum over a row adds thousands of values to a sum
// that already holds e^0 = 1 and drops those below half its ulp: s off by 1.3e-5
// (relative) on a 16k row at T = 0.3, against 5e-7 here, which is the rounding of z.
constexpr int64_t kSumLanes = 16;
constexpr int64_t kSumBlock = 256;

// x·y where x = 0 means 0 even for y = -inf (the weight of a value whose e^d underflowed).
template <typename acc_t>
GRPO_ALWAYS_INLINE acc_t times_finite(acc_t x, acc_t y) {
  return x * std::max(y, std::numeric_limits<acc_t>::lowest());
}

// Adds kSumLanes partial sums in a fixed tree order.
template <typename acc_t>
inline acc_t sum_lanes(acc_t* s) {
  for (int64_t width = kSumLanes / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) s[l] += s[l + width];
  return s[0];
}

// Runs add_group(v, lanes, part, part_a) over the groups of kSumLanes values of [0, n) (the last group may be
// shorter), block by block of kSumBlock values with fresh partials, and returns the sums of part (cs) and
// part_a (ca, only kEntropy) in the fixed lane order. before_block(v0, end) runs ahead of each block.
// kUnroll: a whole block's groups unrolled, so that gcc keeps the partials in registers (AVX2 left them in
// memory; chunk_exp with the entropy, which also stores e, runs slower unrolled).
template <bool kEntropy, bool kUnroll, typename acc_t, typename AddGroup, typename BeforeBlock>
inline void sum_in_lanes(int64_t n, AddGroup&& add_group, BeforeBlock&& before_block, acc_t& cs, acc_t& ca) {
  acc_t sum[kSumLanes] = {}, sum_a[kSumLanes] = {};
  for (int64_t v0 = 0; v0 < n; v0 += kSumBlock) {
    const int64_t end = std::min(n, v0 + kSumBlock);
    before_block(v0, end);
    acc_t part[kSumLanes] = {}, part_a[kSumLanes] = {};
    int64_t v = v0;
    if (kUnroll && end - v0 == kSumBlock) {
#pragma GCC unroll 16
      for (int64_t g = 0; g < kSumBlock / kSumLanes; ++g) add_group(v0 + g * kSumLanes, kSumLanes, part, part_a);
      v = end;
    }
    for (; v + kSumLanes <= end; v += kSumLanes) add_group(v, kSumLanes, part, part_a);
    if (v < end) add_group(v, end - v, part, part_a);
#pragma omp simd
    for (int64_t l = 0; l < kSumLanes; ++l) {
      sum[l] += part[l];
      sum_a[l] += part_a[l];
    }
  }
  cs = sum_lanes(sum);
  ca = kEntropy ? sum_lanes(sum_a) : acc_t(0);
}

// The chunk's max z = (max x) / T (1/T > 0) and the shift its exponentials are taken relative to (0 for an
// all -inf chunk). Also the smallest x, where asked.
template <typename scalar_t, typename acc_t>
inline acc_t chunk_max(const scalar_t* x, int64_t n, acc_t inv_t, acc_t& cm, acc_t* min_x = nullptr) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity(), mn = std::numeric_limits<acc_t>::infinity();
  if (min_x) {
#pragma omp simd reduction(max : mx) reduction(min : mn)
    for (int64_t v = 0; v < n; ++v) {
      const acc_t xv = to_acc<acc_t>(x[v]);
      mx = std::max(mx, xv);
      mn = std::min(mn, xv);
    }
    *min_x = mn;
  } else {
#pragma omp simd reduction(max : mx)
    for (int64_t v = 0; v < n; ++v) mx = std::max(mx, to_acc<acc_t>(x[v]));
  }
  cm = mx * inv_t;
  return cm == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : cm;
}

// One chunk of n logits: writes e_v = exp(z_v - cm) into e [n] and returns
// cm = max z, cs = Σ e, ca = Σ e (z - cm) (ca only kEntropy). Reads x twice
// (the max, then the exponentials; the second time from L2), writes e once.
// z = x / T is rounded on its own everywhere
// (here, in logp = z_y - lse and in log p of the gradient), so they agree with
// lse = cm + log s: a dominant logit gets p = 1, not 1 + z's rounding error.
template <bool kEntropy, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void chunk_exp(const scalar_t* x, int64_t n, acc_t inv_t, acc_t* e, acc_t& cm, acc_t& cs, acc_t& ca) {
  const acc_t shift = chunk_max(x, n, inv_t, cm);
  // lanes [0, lanes) of the group of values at x + v
  auto add_group = [&](int64_t v, int64_t lanes, acc_t* part, acc_t* part_a) __attribute__((always_inline)) {
#pragma omp simd
    for (int64_t l = 0; l < lanes; ++l) {
      const acc_t d = to_acc<acc_t>(x[v + l]) * inv_t - shift;
      const acc_t ev = exp_nonpositive(d);
      e[v + l] = ev;
      part[l] += ev;
      if constexpr (kEntropy) part_a[l] += times_finite(ev, d);
    }
  };
  sum_in_lanes<kEntropy, !kEntropy>(n, add_group, [](int64_t, int64_t) {}, cs, ca);
}

// e^d for the sums of the forward (d = z - max <= 0, or NaN): exp_nonpositive with ln 2 as one float
// (Ln2Split::kOne: the terms that carry the sum have small |d|), one multiply-add less. kMasked = false
// leaves out the mask of exp_nonpositive for a caller that knows d >= kExpUnderflow or NaN (there the mask
// changes nothing). float64: std::exp.
template <bool kMasked>
GRPO_ALWAYS_INLINE float exp_sum_term(float d) {
  const float p = scale_by_exponent(exp_parts<Ln2Split::kOne>(d));
  return kMasked ? zero_below_underflow(p, d) : p;
}

template <bool kMasked>
inline double exp_sum_term(double d) {
  return std::exp(d);
}

// The values of one chunk, per lane as chunk_exp (kUnitT: T = 1, so z = x exactly; kMasked: some d may lie
// below kExpUnderflow).
template <bool kEntropy, bool kUnitT, bool kMasked, typename scalar_t, typename acc_t>
inline void chunk_sums_of(const scalar_t* x, int64_t n, acc_t inv_t, acc_t shift, const scalar_t* next, acc_t& cs,
                          acc_t& ca) {
  auto add_group = [&](int64_t v, int64_t lanes, acc_t* part, acc_t* part_a) __attribute__((always_inline)) {
#pragma omp simd
    for (int64_t l = 0; l < lanes; ++l) {
      const acc_t xv = to_acc<acc_t>(x[v + l]);
      const acc_t d = (kUnitT ? xv : xv * inv_t) - shift;
      const acc_t ev = exp_sum_term<kMasked>(d);
      part[l] += ev;
      if constexpr (kEntropy) part_a[l] += kMasked ? times_finite(ev, d) : ev * d;
    }
  };
  constexpr int64_t kLine = 64 / sizeof(scalar_t);  // values per cache line
  auto prefetch = [&](int64_t v0, int64_t end) {
    for (int64_t v = v0; v < end; v += kLine) __builtin_prefetch(next + v);
  };
  sum_in_lanes<kEntropy, true>(n, add_group, prefetch, cs, ca);
}

// The forward's chunk: cm, cs and ca as chunk_exp (each e by exp_sum_term), without writing the
// exponentials. Reads x twice, the second time from L1/L2 as chunk_exp, and meanwhile prefetches the chunk
// read next (`next`, as many values as this chunk: the rest of the row, or the next row), so that its
// first read (the max) comes from L2 while this chunk's exponentials keep the core busy. Every path gives
// the same bits: the mask only where the chunk's smallest d lies below kExpUnderflow (a -inf logit, a
// logit range over 87 T), the product x·(1/T) only where T != 1.
template <bool kEntropy, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void chunk_sums(const scalar_t* x, int64_t n, acc_t inv_t, const scalar_t* next, acc_t& cm, acc_t& cs,
                       acc_t& ca) {
  acc_t min_x;
  const acc_t shift = chunk_max(x, n, inv_t, cm, &min_x);
  const bool unit_t = inv_t == acc_t(1);
  // false where the chunk holds a -inf or a value more than 87 T below its max; float64 keeps the mask path
  const bool in_range = std::is_same_v<acc_t, float> && min_x * inv_t - shift >= acc_t(kExpUnderflow);
  if (unit_t && in_range) {
    chunk_sums_of<kEntropy, true, false>(x, n, inv_t, shift, next, cs, ca);
  } else if (unit_t) {
    chunk_sums_of<kEntropy, true, true>(x, n, inv_t, shift, next, cs, ca);
  } else if (in_range) {
    chunk_sums_of<kEntropy, false, false>(x, n, inv_t, shift, next, cs, ca);
  } else {
    chunk_sums_of<kEntropy, false, true>(x, n, inv_t, shift, next, cs, ca);
  }
}

// Writes the row dx = (w (onehot_y - p) + g_H (-p (log p + H))) / T with
// p = exp(z - lse) recomputed from x (one read of x, one write of dx; dx may
// be x). kEntropyGrad adds the g_H term (0 where p = 0). The label is written
// after the vectorized loop, from x_y read before it; a y outside [0, vocab)
// (a vocabulary shard whose row has its label in another shard) adds no label term.
template <bool kEntropyGrad, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void softmax_grad_row(const scalar_t* x, scalar_t* dx, int64_t vocab, int64_t y, acc_t inv_t, acc_t lse,
                             acc_t w, acc_t g_ent, acc_t ent) {
  auto dx_of = [&](acc_t xv, acc_t onehot_w) {  // onehot_w: w at the label, 0 elsewhere
    const acc_t log_p = xv * inv_t - lse;
    const acc_t p = exp_nonpositive(log_p);
    acc_t dz = onehot_w - w * p;
    if constexpr (kEntropyGrad) dz -= times_finite(g_ent * p, log_p + ent);
    return from_acc<scalar_t>(dz * inv_t);
  };
  const bool labelled = y >= 0 && y < vocab;
  const acc_t x_y = labelled ? to_acc<acc_t>(x[y]) : acc_t(0);
#pragma omp simd
  for (int64_t v = 0; v < vocab; ++v) dx[v] = dx_of(to_acc<acc_t>(x[v]), acc_t(0));
  if (labelled) dx[y] = dx_of(x_y, w);
}

}  // namespace grpo_kernels::cpu::GRPO_CPU_COPY
