// Python bindings of grpo_kernels._C (pybind11 through torch/extension.h).
// For now the extension exposes build facts only; the kernels of each op are
// added next to this file (csrc/cpu/*.cpp) and in csrc/cuda/*.cu.
#include <torch/extension.h>

#ifndef GRPO_KERNELS_VERSION
#error "setup.py defines GRPO_KERNELS_VERSION from grpo_kernels/_version.py"
#endif

namespace grpo_kernels {

std::string version() { return GRPO_KERNELS_VERSION; }

#ifdef GRPO_WITH_CUDA
int cuda_runtime_version();  // csrc/cuda/build_info.cu
#endif

bool with_cuda() {
#ifdef GRPO_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// CUDA runtime version the CUDA kernels were compiled against (0 without CUDA).
int cuda_version() {
#ifdef GRPO_WITH_CUDA
  return cuda_runtime_version();
#else
  return 0;
#endif
}

}  // namespace grpo_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "grpo_kernels compiled extension";
  m.def("version", &grpo_kernels::version, "version of the grpo_kernels sources this extension was built from");
  m.def("with_cuda", &grpo_kernels::with_cuda, "whether the extension was built with its CUDA kernels");
  m.def("cuda_version", &grpo_kernels::cuda_version, "CUDART_VERSION of the CUDA kernels (0 without CUDA)");
}
