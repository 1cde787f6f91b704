// The logits-sized gradient buffer: a new contiguous tensor like the logits,
// backed by transparent huge pages when it is large. A fresh buffer is paid
// for by page faults on first touch; with 4 KiB pages that costs more than the
// kernel writing it (about 4x at 262 MB on the 2-core development machine),
// with 2 MiB pages a small fraction — unless the machine is a VM that reports
// its free pages to the host (a virtio balloon with free page reporting): the
// host then takes back every freed 2 MiB block, and a fresh huge page is
// faulted in from the host again, at 2-10x the cost of 4 KiB pages from the
// guest's own free lists (development VM, a [2048, 32000] float32 gradient,
// calls 3 s apart: 256-942 ms on huge pages, 95-135 ms without). There the
// buffer takes 4 KiB pages.
#pragma once

#include <cstdlib>
#include <fstream>
#include <string>

#include <ATen/ATen.h>
#ifdef __linux__
#include <dirent.h>
#include <sys/mman.h>
#endif

namespace grpo_kernels::cpu::GRPO_CPU_COPY {  // one copy per instruction set (setup.py)

constexpr size_t kHugePage = size_t(2) << 20;

#ifdef __linux__
// Whether a virtio balloon of this machine reports free pages to the host (VIRTIO_BALLOON_F_REPORTING, feature
// bit 5 of the device's sysfs "features" string, one character per bit); read once.
inline bool free_page_reporting() {
  static const bool reporting = [] {
    const std::string driver = "/sys/bus/virtio/drivers/virtio_balloon/";
    DIR* dir = opendir(driver.c_str());
    if (dir == nullptr) return false;
    bool found = false;
    while (const dirent* entry = readdir(dir)) {
      if (std::string(entry->d_name).rfind("virtio", 0) != 0) continue;
      std::ifstream features(driver + entry->d_name + "/features");
      std::string bits;
      if (features >> bits && bits.size() > 5 && bits[5] == '1') found = true;
    }
    closedir(dir);
    return found;
  }();
  return reporting;
}
#endif

// How this copy's logits-sized gradient buffers are paged (grpo_kernels.extension_info()["gradient_buffer_pages"],
// recorded with benchmark results).
inline const char* gradient_buffer_pages() {
#ifdef __linux__
  return free_page_reporting() ? "4 KiB (free page reporting: the host takes freed memory back)"
                               : "2 MiB from 8 MiB up (transparent huge pages where enabled)";
#else
  return "4 KiB";
#endif
}

inline at::Tensor empty_gradient_like(const at::Tensor& logits) {
  const size_t bytes = static_cast<size_t>(logits.numel()) * logits.element_size();
#ifdef __linux__
  if (bytes >= 4 * kHugePage && !free_page_reporting()) {
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
