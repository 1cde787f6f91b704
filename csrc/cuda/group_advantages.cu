// group_advantages on CUDA (group_normalize): per-group NaN-ignoring mean,
// unbiased std and advantages of rewards [B, K], one warp per (group, reward
// column), grid-stride over those tasks. IEEE-rounded division and square
// root in float32 (as the reference's torch ops), whatever the build's
// fast-math flags.
#include <ATen/Dispatch.h>

#include <cmath>
#include <limits>

#include "../common/entry_points.h"
#include "block_reduce.cuh"
#include "launch.cuh"

namespace grpo_kernels::cuda {

namespace {

constexpr int64_t kScaleGroup = 0, kScaleBatch = 1;
constexpr int kThreads = 256;  // 8 warps: 8 (group, column) tasks per block

__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }

// Task (g, k) reads the group's rewards of column k three times (count and
// sum, squared deviations from the mean, advantages; the 2nd and 3rd reads
// mostly from L1/L2) and its order entries as many times; writes mean and std
// [g, k] and the group's advantages. Memory traffic: ~1 read + 1 write of
// rewards from DRAM, 2 writes per group.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    group_normalize_kernel(const acc_t* __restrict__ rewards, int64_t stride_b, int64_t stride_k,
                           const int64_t* __restrict__ order, const int64_t* __restrict__ offsets, int64_t n_groups,
                           int64_t B, int64_t K, const acc_t* __restrict__ batch_std, acc_t eps, int64_t scale,
                           bool rloo, acc_t* __restrict__ adv, acc_t* __restrict__ mean_out,
                           acc_t* __restrict__ std_out) {
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t n_tasks = n_groups * K;
  for (int64_t task = blockIdx.x * warps_per_block + threadIdx.x / kWarpSize; task < n_tasks;
       task += gridDim.x * warps_per_block) {  // warp-uniform: the shuffles below see all 32 lanes
    const int64_t g = task / K, k = task % K;
    const int64_t begin = offsets[g], end = offsets[g + 1];
    CUDA_KERNEL_ASSERT(0 <= begin && begin <= end && end <= B && "group offsets out of range");
    auto row = [&](int64_t j) {
      const int64_t b = order != nullptr ? order[j] : j;
      CUDA_KERNEL_ASSERT(0 <= b && b < B && "group order out of range");
      return b;
    };
    auto reward = [&](int64_t b) { return rewards[b * stride_b + k * stride_k]; };

    Sums<2, acc_t> count_total = Sums<2, acc_t>::identity();
    for (int64_t j = begin + lane; j < end; j += kWarpSize) {
      const acc_t x = reward(row(j));
      if (!isnan(x)) {
        count_total.v[0] += acc_t(1);
        count_total.v[1] += x;
      }
    }
    count_total = warp_reduce(count_total);
    const acc_t count = count_total.v[0];
    const acc_t mean = div_rn(count_total.v[1], count);  // NaN for a group without a value (0 / 0)

    Sums<1, acc_t> ss = Sums<1, acc_t>::identity();
    for (int64_t j = begin + lane; j < end; j += kWarpSize) {
      const acc_t x = reward(row(j));
      if (!isnan(x)) ss.v[0] += (x - mean) * (x - mean);
    }
    ss = warp_reduce(ss);
    const acc_t std_dev = count > acc_t(1) ? sqrt_rn(div_rn(ss.v[0], count - acc_t(1))) : nan;
    if (lane == 0) {
      mean_out[g * K + k] = mean;
      std_out[g * K + k] = std_dev;
    }

    const acc_t den = scale == kScaleGroup ? std_dev + eps : (scale == kScaleBatch ? batch_std[k] + eps : acc_t(1));
    const bool scaled = scale == kScaleGroup || scale == kScaleBatch;
    for (int64_t j = begin + lane; j < end; j += kWarpSize) {
      const int64_t b = row(j);
      acc_t a = reward(b) - mean;
      if (rloo) a = count > acc_t(1) ? div_rn(a * count, count - acc_t(1)) : nan;  // r - mean of the other n - 1
      adv[b * K + k] = scaled ? div_rn(a, den) : a;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_normalize(const at::Tensor& rewards,
                                                               const c10::optional<at::Tensor>& order,
                                                               const at::Tensor& offsets,
                                                               const c10::optional<at::Tensor>& batch_std,
                                                               double eps, int64_t scale, bool rloo) {
  const c10::cuda::CUDAGuard guard(rewards.device());
  TORCH_CHECK(rewards.dim() == 2, "group_normalize: rewards must be [B, K]");
  TORCH_CHECK(rewards.scalar_type() == at::kFloat || rewards.scalar_type() == at::kDouble,
              "group_normalize: rewards must be float32 or float64");
  TORCH_CHECK(scale != kScaleBatch || batch_std, "group_normalize: scale=batch needs batch_std");
  TORCH_CHECK(offsets.numel() >= 1, "group_normalize: offsets must have G + 1 values");
  const int64_t B = rewards.size(0), K = rewards.size(1), n_groups = offsets.numel() - 1;
  const at::Tensor offsets_c = per_row(offsets, at::kLong, n_groups + 1, rewards, "offsets");
  const at::Tensor order_c = order ? per_row(*order, at::kLong, B, rewards, "order") : at::Tensor();
  const at::Tensor batch_std_c =
      scale == kScaleBatch ? per_row(*batch_std, rewards.scalar_type(), K, rewards, "batch_std") : at::Tensor();
  at::Tensor adv = at::empty({B, K}, rewards.options());
  at::Tensor mean = at::empty({n_groups, K}, rewards.options());
  at::Tensor std_dev = at::empty({n_groups, K}, rewards.options());
  if (n_groups * K == 0) return {adv, mean, std_dev};
  const int64_t warps_per_block = kThreads / kWarpSize;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "group_normalize", [&] {
    group_normalize_kernel<scalar_t><<<grid_size(ceil_div(n_groups * K, warps_per_block)), kThreads, 0, stream>>>(
        rewards.const_data_ptr<scalar_t>(), rewards.stride(0), rewards.stride(1),
        order ? order_c.const_data_ptr<int64_t>() : nullptr, offsets_c.const_data_ptr<int64_t>(), n_groups, B, K,
        scale == kScaleBatch ? batch_std_c.const_data_ptr<scalar_t>() : nullptr, static_cast<scalar_t>(eps), scale,
        rloo, adv.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), std_dev.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {adv, mean, std_dev};
}

}  // namespace grpo_kernels::cuda
