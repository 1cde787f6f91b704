// The C++ entry points of grpo_kernels._C, declared for CPU tensors (namespace grpo_kernels::cpu,
// csrc/cpu/*.cpp) and, with the same signatures, for CUDA tensors (namespace grpo_kernels::cuda,
// csrc/cuda/*.cu). csrc/cpu/module.cpp binds each name once and dispatches on the device of the first
// tensor argument. The CPU kernels are compiled once per instruction set (setup.py), each copy in its
// namespace grpo_kernels::cpu::GRPO_CPU_COPY, and module.cpp takes the table (cpu::Kernels) of the copy
// the running CPU supports. The Python glue in grpo_kernels/native/ calls these functions; the math of every op is
// stated in grpo_kernels/reference.py.
//
// Conventions shared by every entry point:
// - Inputs were validated by grpo_kernels.ops (shapes, dtypes, ranges); the kernels check only what would
//   make them read out of bounds.
// - "compute dtype": float64 when the main input is float64, else float32. Outputs that are not gradients
//   of an input are in the compute dtype.
// - Logits are [..., V] with stride 1 over V and any strides over the leading dims (no copy is made); rows
//   are numbered row-major over the leading dims. All indexing is int64.
// - [B, T] inputs of the loss may be broadcast views (stride 0), e.g. advantages[:, None].expand(B, T);
//   they must be in the compute dtype.
// - Optional tensors are c10::nullopt when absent.
// - Results are independent of the number of threads (no cross-thread floating-point reductions).
#pragma once

#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "loss_config.h"

namespace grpo_kernels {

namespace cpu {
#ifdef GRPO_CPU_COPY  // a translation unit of one copy of the CPU kernels
inline namespace GRPO_CPU_COPY {
#endif

// token_logprobs forward. logits [..., V] float16/bfloat16/float32/float64; token_ids [...] int32/int64
// (values in [0, V) or ignore_index). Returns (logp [R], lse [R], entropy [R] or an empty tensor without
// return_entropy), R = number of rows, compute dtype; lse is of logits / temperature; ignored rows get 0
// everywhere. row_temperature: absent (every row at temperature), or [R] one temperature per row, read only
// at the rows that count (csrc/common/row_temperature.h); so for the backward and the fused loss.
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(
    const at::Tensor& logits, const at::Tensor& token_ids, double temperature, int64_t ignore_index,
    bool return_entropy, const c10::optional<at::Tensor>& row_temperature);

// token_logprobs backward: d logits = (g_logp (onehot_y - p) + g_H (-p (log p + H))) / T, p from lse.
// grad_logp, grad_entropy [R] (either may be absent; entropy [R] is required with grad_entropy). Returns
// d logits in the dtype and shape of logits: a new contiguous tensor, or logits itself (written in place,
// each row read before it is overwritten) when inplace. Ignored rows get 0.
at::Tensor token_logprobs_bwd(
    const at::Tensor& logits, const at::Tensor& token_ids, const at::Tensor& lse,
    const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& entropy,
    const c10::optional<at::Tensor>& grad_entropy, double temperature, int64_t ignore_index, bool inplace,
    const c10::optional<at::Tensor>& row_temperature);

// group_advantages, per group: rewards [B, K] compute dtype (NaN = missing), groups are the segments
// order[offsets[g] : offsets[g+1]] of the rows (order [B] int64 row indices; absent = rows in order),
// offsets [G + 1] int64. scale: 0 group std, 1 batch std (batch_std [K] required), 2 none; rloo: the
// leave-one-out baseline. Returns (adv [B, K], mean [G, K], std [G, K]): NaN where undefined (no
// nan_to_num), std unbiased and NaN for fewer than 2 values.
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_normalize(
    const at::Tensor& rewards, const c10::optional<at::Tensor>& order, const at::Tensor& offsets,
    const c10::optional<at::Tensor>& batch_std, double eps, int64_t scale, bool rloo);

// grpo_loss forward: logp, old_logp, ref_logp, adv, mask, iw, sampling_logp all [B, T] (views allowed),
// compute dtype; old_logp absent = logp (ratio 1); ref_logp absent = no KL; iw absent = 1; sampling_logp
// absent = old_logp. Returns (per_token_loss [B, T] contiguous, partials [kNumPartials, B]).
std::tuple<at::Tensor, at::Tensor> grpo_loss_fwd(
    const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp, const c10::optional<at::Tensor>& ref_logp,
    const at::Tensor& adv, const at::Tensor& mask, const c10::optional<at::Tensor>& iw,
    const c10::optional<at::Tensor>& sampling_logp, const LossConfig& cfg);

// grpo_loss forward with, when compute_grad, the gradient of each sequence's masked loss sum S_i:
// (per_token_loss, partials) as grpo_loss_fwd and grad_sums [B, T] = d S_i / d logp = m · dℓ/dlogp (compute
// dtype, contiguous; grpo_loss_bwd's result for seq_grad = 1, so d loss / d logp = g · dL/dS_i · grad_sums),
// else an empty [0, T] tensor. The CPU kernels form both from one evaluation of the token terms.
std::tuple<at::Tensor, at::Tensor, at::Tensor> grpo_loss_fwd_grad(
    const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp, const c10::optional<at::Tensor>& ref_logp,
    const at::Tensor& adv, const at::Tensor& mask, const c10::optional<at::Tensor>& iw,
    const c10::optional<at::Tensor>& sampling_logp, const LossConfig& cfg, bool compute_grad);

// grpo_loss backward: d loss / d logp [B, T] (compute dtype) for seq_grad [B] = g · dL/dS_i, from the
// forward's inputs and partials (the sequence statistics are read from them).
at::Tensor grpo_loss_bwd(
    const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp, const c10::optional<at::Tensor>& ref_logp,
    const at::Tensor& adv, const at::Tensor& mask, const c10::optional<at::Tensor>& iw,
    const c10::optional<at::Tensor>& sampling_logp, const at::Tensor& partials, const at::Tensor& seq_grad,
    const LossConfig& cfg);

// fused_grpo_loss forward, without a sequence pass only (cfg.seq_pass false): logits [B, T, V], token_ids
// [B, T]; old_logp, ref_logp, adv, keep (mask ∧ id != ignore_index), iw, sampling_logp as in grpo_loss_fwd;
// seq_weight [B] = dL/dS_i (aggregation.sequence_weights, known from the mask alone). One pass per row:
// log-sum-exp, logp, the token's d loss / d logp, and (with compute_grad) the row of d loss / d logits for
// an incoming gradient of 1, written in the logits dtype into a new contiguous tensor or, with inplace,
// into logits itself. Returns (logp [B, T], lse [B, T], entropy [B, T] or empty, per_token_loss [B, T],
// partials [kNumPartials, B], grad_logits or an empty tensor without compute_grad).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_grpo_loss_fwd(
    const at::Tensor& logits, const at::Tensor& token_ids, const c10::optional<at::Tensor>& old_logp,
    const c10::optional<at::Tensor>& ref_logp, const at::Tensor& adv, const at::Tensor& keep,
    const c10::optional<at::Tensor>& iw, const c10::optional<at::Tensor>& sampling_logp, const at::Tensor& seq_weight,
    const LossConfig& cfg, double temperature, int64_t ignore_index, bool return_entropy, bool compute_grad,
    bool inplace, const c10::optional<at::Tensor>& row_temperature);

#ifdef GRPO_CPU_COPY
}  // namespace GRPO_CPU_COPY
#endif
}  // namespace cpu

namespace cpu {

// The entry points of one copy of the CPU kernels (csrc/cpu/kernel_table.cpp defines its copy's
// kernels()): module.cpp binds through the table of the copy it chose when the module was loaded.
struct Kernels {
  decltype(&cpu::token_logprobs_fwd) token_logprobs_fwd;
  decltype(&cpu::token_logprobs_bwd) token_logprobs_bwd;
  decltype(&cpu::group_normalize) group_normalize;
  decltype(&cpu::grpo_loss_fwd) grpo_loss_fwd;
  decltype(&cpu::grpo_loss_bwd) grpo_loss_bwd;
  decltype(&cpu::grpo_loss_fwd_grad) grpo_loss_fwd_grad;
  decltype(&cpu::fused_grpo_loss_fwd) fused_grpo_loss_fwd;
  const char* (*gradient_buffer_pages)();  // not a kernel: how the copy pages its gradient buffers
};

}  // namespace cpu

#ifdef GRPO_WITH_CUDA
// The same entry points for CUDA tensors (documented above; tests/test_cuda_build.py checks that both
// namespaces declare the same names and that the objects define them with the CPU kernels' parameters).
namespace cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(
    const at::Tensor& logits, const at::Tensor& token_ids, double temperature, int64_t ignore_index,
    bool return_entropy, const c10::optional<at::Tensor>& row_temperature);

at::Tensor token_logprobs_bwd(
    const at::Tensor& logits, const at::Tensor& token_ids, const at::Tensor& lse,
    const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& entropy,
    const c10::optional<at::Tensor>& grad_entropy, double temperature, int64_t ignore_index, bool inplace,
    const c10::optional<at::Tensor>& row_temperature);

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_normalize(
    const at::Tensor& rewards, const c10::optional<at::Tensor>& order, const at::Tensor& offsets,
    const c10::optional<at::Tensor>& batch_std, double eps, int64_t scale, bool rloo);

std::tuple<at::Tensor, at::Tensor> grpo_loss_fwd(
    const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp, const c10::optional<at::Tensor>& ref_logp,
    const at::Tensor& adv, const at::Tensor& mask, const c10::optional<at::Tensor>& iw,
    const c10::optional<at::Tensor>& sampling_logp, const LossConfig& cfg);

at::Tensor grpo_loss_bwd(
    const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp, const c10::optional<at::Tensor>& ref_logp,
    const at::Tensor& adv, const at::Tensor& mask, const c10::optional<at::Tensor>& iw,
    const c10::optional<at::Tensor>& sampling_logp, const at::Tensor& partials, const at::Tensor& seq_grad,
    const LossConfig& cfg);

std::tuple<at::Tensor, at::Tensor, at::Tensor> grpo_loss_fwd_grad(
    const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp, const c10::optional<at::Tensor>& ref_logp,
    const at::Tensor& adv, const at::Tensor& mask, const c10::optional<at::Tensor>& iw,
    const c10::optional<at::Tensor>& sampling_logp, const LossConfig& cfg, bool compute_grad);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_grpo_loss_fwd(
    const at::Tensor& logits, const at::Tensor& token_ids, const c10::optional<at::Tensor>& old_logp,
    const c10::optional<at::Tensor>& ref_logp, const at::Tensor& adv, const at::Tensor& keep,
    const c10::optional<at::Tensor>& iw, const c10::optional<at::Tensor>& sampling_logp, const at::Tensor& seq_weight,
    const LossConfig& cfg, double temperature, int64_t ignore_index, bool return_entropy, bool compute_grad,
    bool inplace, const c10::optional<at::Tensor>& row_temperature);

}  // namespace cuda
#endif

}  // namespace grpo_kernels
