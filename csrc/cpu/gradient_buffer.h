// The logits-sized gradient buffer: a new contiguous tensor like the logits,
// backed by transparent huge pages when it is large. A fresh buffer is paid
// for by page faults on first touch; with 4 KiB pages that costs more than the
// kernel writing it (about 4x at 262 MB on the 2-core development machine),
// with 2 MiB pages a small fraction.
#pragma once

#include <cstdlib>

#include <ATen/ATen.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace grpo_kernels::cpu::GRPO_CPU_COPY {  // one copy per instruction set (setup.py)

constexpr size_t kHugePage = size_t(2) << 20;

inline at::Tensor empty_gradient_like(const at::Tensor& logits) {
  const size_t bytes = static_cast<size_t>(logits.numel()) * logits.element_size();
#ifdef __linux__
  if (bytes >= 4 * kHugePage) {
    void* data = nullptr;
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    if (posix_memalign(&data, kHugePage, rounded) == 0) {
      madvise(data, rounded, MADV_HUGEPAGE);  // advice only: without THP the buffer is ordinary memory
      return at::from_blob(data, logits.sizes(), [](void* p) { std::free(p); }, logits.options());
    }
  }
#endif
  return at::empty(logits.sizes(), logits.options());
}

}  // namespace grpo_kernels::cpu::GRPO_CPU_COPY
