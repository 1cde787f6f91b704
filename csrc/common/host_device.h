// GRPO_HOST_DEVICE marks pure per-element math (e.g. csrc/common/loss_terms.h) that
// the CPU kernels call on the host and the CUDA kernels call on the device:
// __host__ __device__ under nvcc, nothing for the host compiler.
#pragma once

#if defined(__CUDACC__)
#define GRPO_HOST_DEVICE __host__ __device__
#else
#define GRPO_HOST_DEVICE
#endif
