// Warp and block reductions of a per-thread value (a sum, an online softmax
// state) with warp shuffles. The reduction tree is fixed by blockDim, so the
// result is deterministic (no atomics); every thread receives the same bits.
//
// A reducible type T is an aggregate (so that it can live in __shared__) with
//   static T identity();  static T merge(const T&, const T&);
//   T shfl_down(int delta) const;  T shfl(int src_lane) const;   (full-warp shuffles)
#pragma once

namespace grpo_kernels::cuda {

constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kWarpSize = 32;

// The warp's total, in lane 0 only.
template <typename T>
__device__ __forceinline__ T warp_reduce_to_lane0(T v) {
#pragma unroll
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2) v = T::merge(v, v.shfl_down(delta));
  return v;
}

// The warp's total in every lane (all 32 lanes must call it).
template <typename T>
__device__ __forceinline__ T warp_reduce(T v) {
  return warp_reduce_to_lane0(v).shfl(0);
}

// The block's total in every thread (all threads must call it; blockDim.x is a multiple of 32).
// smem: scratch for 32 values. Ends with a barrier, so smem may be reused right after.
template <typename T>
__device__ __forceinline__ T block_reduce(T v, T* smem) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_reduce_to_lane0(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  // every warp reduces the warps' totals the same way: the same bits in every thread
  v = lane < static_cast<int>(blockDim.x / kWarpSize) ? smem[lane] : T::identity();
  v = warp_reduce(v);
  __syncthreads();
  return v;
}

// K running sums.
template <int K, typename acc_t>
struct Sums {
  acc_t v[K];

  static __device__ __forceinline__ Sums identity() {
    Sums r;
#pragma unroll
    for (int k = 0; k < K; ++k) r.v[k] = acc_t(0);
    return r;
  }
  static __device__ __forceinline__ Sums merge(const Sums& a, const Sums& b) {
    Sums r;
#pragma unroll
    for (int k = 0; k < K; ++k) r.v[k] = a.v[k] + b.v[k];
    return r;
  }
  __device__ __forceinline__ Sums shfl_down(int delta) const {
    Sums r;
#pragma unroll
    for (int k = 0; k < K; ++k) r.v[k] = __shfl_down_sync(kFullWarp, v[k], delta);
    return r;
  }
  __device__ __forceinline__ Sums shfl(int src_lane) const {
    Sums r;
#pragma unroll
    for (int k = 0; k < K; ++k) r.v[k] = __shfl_sync(kFullWarp, v[k], src_lane);
    return r;
  }
};

}  // namespace grpo_kernels::cuda
