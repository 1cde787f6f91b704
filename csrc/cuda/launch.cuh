// Host-side helpers of the CUDA entry points: device and shape checks of the
// inputs, per-row vectors, block and grid sizes.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>
#include <cuda_runtime_api.h>

namespace grpo_kernels::cuda {

// A kernel dereferences every tensor it is given: all must be CUDA tensors on the main input's device.
inline void check_on_device(const at::Tensor& t, const at::Tensor& main, const char* what) {
  TORCH_CHECK(t.device() == main.device(), what, " must be on ", main.device(), ", got ", t.device());
}

inline void check_on_device(const c10::optional<at::Tensor>& t, const at::Tensor& main, const char* what) {
  if (t) check_on_device(*t, main, what);
}

// t (n values, any shape and strides) as a contiguous [n] tensor of dtype.
inline at::Tensor per_row(const at::Tensor& t, at::ScalarType dtype, int64_t n, const at::Tensor& main,
                          const char* what) {
  check_on_device(t, main, what);
  TORCH_CHECK(t.numel() == n, what, " must have ", n, " values, got ", t.numel());
  return t.reshape({-1}).to(dtype).contiguous();
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The smallest power of two >= work, clamped to [32, max_threads] (a whole number of warps).
inline int pow2_threads(int64_t work, int max_threads) {
  int threads = 32;
  while (threads < max_threads && threads < work) threads *= 2;
  return threads;
}

// Threads per block of the row kernels (one block per row of V values): about 4 packs of 16 bytes
// per thread, 32 to kMaxRowThreads.
constexpr int kMaxRowThreads = 512;

// Resident blocks per SM the row kernels are compiled for (__launch_bounds__): 3 x 512 threads (<= 42
// registers each) for the training dtypes; float64 (no bandwidth-bound use) gets the registers it needs.
template <typename scalar_t>
constexpr int kRowBlocksPerSm = sizeof(scalar_t) == 8 ? 1 : 3;

inline int row_threads(int64_t vocab, int64_t elem_size) {
  return pow2_threads(ceil_div(ceil_div(vocab, 16 / elem_size), 4), kMaxRowThreads);
}

// A 1-D grid of min(n, 2^31 - 1) blocks; the kernels loop over their work items with stride gridDim.x.
inline unsigned int grid_size(int64_t n) { return static_cast<unsigned int>(std::min<int64_t>(n, INT_MAX)); }

inline int device_attribute(cudaDeviceAttr attr, const at::Tensor& on) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, on.get_device()));
  return value;
}

}  // namespace grpo_kernels::cuda
