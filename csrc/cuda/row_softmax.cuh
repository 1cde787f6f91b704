// The softmax statistics of one row of logits x [V] at inverse temperature
// 1/T, computed by one block in one read of the row (shared by the
// token_logprobs and fused_grpo_loss kernels):
//
//   z = x / T,  lse = log Σ_v e^{z_v},  logp_y = z_y - lse,  p = e^{z - lse},
//   H = -Σ_v p_v log p_v = log s - a / s  with  s = Σ e^{z - m},  a = Σ e^{z - m} (z - m),  m = max z
//
// Each thread keeps an online state (m, s, a) relative to its running max m
// (a relative to m: no cancellation between numbers of the size of |z|); when
// the max moves from m to m', s' = α s and a' = α (a + (m - m') s) with
// α = e^{m - m'}. Terms with z = -inf count 0. The threads' states are merged
// by the same rule in a block reduction.
#pragma once

#include <cmath>
#include <limits>
#include <type_traits>

#include "block_reduce.cuh"
#include "row_io.cuh"

namespace grpo_kernels::cuda {

// e^x on the softmax's hot path: the hardware exp2 for float (__expf: ~2 ulp for the x <= 0 of the
// softmax, 0 at -inf), the exact exp for double.
__device__ __forceinline__ float row_exp(float x) { return __expf(x); }
__device__ __forceinline__ double row_exp(double x) { return ::exp(x); }

template <typename acc_t>
struct RowState {
  acc_t m;  // running max of z
  acc_t s;  // Σ e^{z - m}
  acc_t a;  // Σ e^{z - m} (z - m)   (kept at 0 without entropy)

  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  static __device__ __forceinline__ RowState identity() { return {kNegInf, acc_t(0), acc_t(0)}; }

  // Add K values z (already scaled by 1/T): one rescale when their max exceeds m, one exp per value.
  template <bool kEntropy, int K>
  __device__ __forceinline__ void add(const acc_t (&z)[K]) {
    acc_t z_max = z[0];
#pragma unroll
    for (int k = 1; k < K; ++k) z_max = z[k] > z_max ? z[k] : z_max;
    if (z_max > m) {
      const acc_t alpha = row_exp(m - z_max);  // 0 while m = -inf
      if (kEntropy) a = alpha * (a + (s > acc_t(0) ? (m - z_max) * s : acc_t(0)));  // s > 0: m is finite
      s *= alpha;
      m = z_max;
    }
    if (m == kNegInf) return;  // every value so far is -inf
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const acc_t d = z[k] - m;
      const acc_t e = row_exp(d);
      s += e;
      if (kEntropy) a += e > acc_t(0) ? e * d : acc_t(0);  // e = 0 where z = -inf (d = -inf)
    }
  }

  static __device__ __forceinline__ RowState merge(const RowState& x, const RowState& y) {
    const acc_t m_new = x.m > y.m ? x.m : y.m;
    if (m_new == kNegInf) return identity();
    const acc_t alpha = row_exp(x.m - m_new), beta = row_exp(y.m - m_new);
    const acc_t x_carried = x.s > acc_t(0) ? (x.m - m_new) * x.s : acc_t(0);
    const acc_t y_carried = y.s > acc_t(0) ? (y.m - m_new) * y.s : acc_t(0);
    return {m_new, alpha * x.s + beta * y.s, alpha * (x.a + x_carried) + beta * (y.a + y_carried)};
  }

  __device__ __forceinline__ RowState shfl_down(int delta) const {
    return {__shfl_down_sync(kFullWarp, m, delta), __shfl_down_sync(kFullWarp, s, delta),
            __shfl_down_sync(kFullWarp, a, delta)};
  }
  __device__ __forceinline__ RowState shfl(int src_lane) const {
    return {__shfl_sync(kFullWarp, m, src_lane), __shfl_sync(kFullWarp, s, src_lane),
            __shfl_sync(kFullWarp, a, src_lane)};
  }
};

template <typename acc_t>
struct RowStats {
  acc_t lse;
  acc_t entropy;  // 0 without kEntropy
};

// lse (and H with kEntropy) of the row x [V], in every thread of the block (all must call it).
// Reads the row once; smem: scratch for the block reduction.
template <bool kEntropy, typename scalar_t, typename acc_t>
__device__ __forceinline__ RowStats<acc_t> row_stats(const scalar_t* x, int64_t V, acc_t inv_t,
                                                     RowState<acc_t>* smem) {
  RowState<acc_t> state = RowState<acc_t>::identity();
  row_for_each(x, V, [&](const auto& pack) {
    constexpr int K = std::decay_t<decltype(pack)>::kSize;
    acc_t z[K];
#pragma unroll
    for (int k = 0; k < K; ++k) z[k] = static_cast<acc_t>(pack.v[k]) * inv_t;
    state.template add<kEntropy>(z);
  });
  state = block_reduce(state, smem);
  const acc_t log_s = ::log(state.s);
  return {state.m + log_s, kEntropy ? log_s - state.a / state.s : acc_t(0)};
}

// d logits of one value: (w (onehot_y - p) + g_H (-p (log p + H))) / T, p = e^{z - lse}
// (the g_H term only with kEntropyGrad, and 0 where p = 0).
template <bool kEntropyGrad, typename acc_t>
__device__ __forceinline__ acc_t softmax_grad(acc_t z, bool is_y, acc_t lse, acc_t w, acc_t g_ent, acc_t ent,
                                              acc_t inv_t) {
  const acc_t log_p = z - lse;
  const acc_t p = row_exp(log_p);
  acc_t dz = (is_y ? w : acc_t(0)) - w * p;
  if (kEntropyGrad) dz -= g_ent * p * (p > acc_t(0) ? log_p + ent : acc_t(0));
  return dz * inv_t;
}

}  // namespace grpo_kernels::cuda
