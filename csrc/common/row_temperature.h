// The temperature of a row of logits, shared by the CPU and CUDA kernels. The entry points take a float
// temperature and an optional tensor row_temperature [R] (one temperature per row, the compute dtype,
// contiguous, on the logits' device), which wins when given; a kernel reads row r's entry only where the
// row counts (ignored and masked rows may hold anything there). Both are turned into 1/T the same way:
// computed in double, rounded to the compute dtype.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace grpo_kernels {

template <typename acc_t>
GRPO_HOST_DEVICE inline acc_t inverse_temperature(double temperature) {
  return static_cast<acc_t>(1.0 / temperature);
}

// Row r's 1/T: its own temperature when row_t is given, else inv_t (the float temperature's).
template <typename acc_t>
GRPO_HOST_DEVICE inline acc_t row_inverse_temperature(const acc_t* row_t, int64_t r, acc_t inv_t) {
  return row_t == nullptr ? inv_t : inverse_temperature<acc_t>(static_cast<double>(row_t[r]));
}

}  // namespace grpo_kernels
