// Build facts of the CUDA part of grpo_kernels._C.
// Reads nothing and launches nothing; the op kernels come in csrc/cuda/<op>.cu.
#include <cuda_runtime_api.h>

namespace grpo_kernels {

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace grpo_kernels
