// The entry-point table of one copy of the CPU kernels. setup.py compiles this file with the kernels
// once per instruction set, each copy in its namespace grpo_kernels::cpu::GRPO_CPU_COPY; module.cpp
// binds the table of the copy the running CPU supports.
#include "../common/entry_points.h"
#include "gradient_buffer.h"

#ifndef GRPO_CPU_COPY
#error "setup.py defines GRPO_CPU_COPY, the namespace of one copy of the CPU kernels"
#endif

namespace grpo_kernels::cpu::GRPO_CPU_COPY {

const Kernels& kernels() {
  static constexpr Kernels table{&token_logprobs_fwd, &token_logprobs_bwd, &group_normalize,
                                 &grpo_loss_fwd,      &grpo_loss_bwd,      &grpo_loss_fwd_grad,
                                 &fused_grpo_loss_fwd, &gradient_buffer_pages};
  return table;
}

}  // namespace grpo_kernels::cpu::GRPO_CPU_COPY
