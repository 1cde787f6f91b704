// The C++ entry points of grpo_kernels._C: one declaration per kernel family,
// implemented for CPU tensors in csrc/cpu/*.cpp (namespace grpo_kernels::cpu)
// and, with the same signatures, for CUDA tensors in csrc/cuda/*.cu
// (namespace grpo_kernels::cuda). csrc/cpu/module.cpp binds each name once and
// dispatches on the device of the first tensor argument. The Python glue in
// grpo_kernels/native/ calls these functions; the math of every op is stated
// in grpo_kernels/reference.py.
//
// Conventions shared by every entry point:
// - Inputs were validated by grpo_kernels.ops (shapes, dtypes, ranges); the
//   kernels check only what would make them read out of bounds.
// - "compute dtype": float64 when the main input is float64, else float32.
//   Outputs that are not gradients of an input are in the compute dtype.
// - Logits are [..., V] with stride 1 over V and any strides over the leading
//   dims (no copy is made); rows are numbered row-major over the leading dims.
//   All indexing is int64.
// - [B, T] inputs of the loss may be broadcast views (stride 0), e.g.
//   advantages[:, None].expand(B, T); they must be in the compute dtype.
// - Optional tensors are c10::nullopt when absent.
// - Results are independent of the number of threads (no cross-thread
//   floating-point reductions).
#pragma once

#include <cmath>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace grpo_kernels {

// Options of the GRPO loss, decided once on the host (see
// grpo_kernels/native/grpo_loss.py, which builds it from the keyword options
// of reference.grpo_loss). Numeric options are rounded to the compute dtype
// inside the kernels, as PyTorch rounds a Python scalar.
struct LossConfig {
  int64_t family = 0;         // 0: clipped (grpo, bnpo, dr_grpo, dapo, luspo), 1: cispo, 2: sapo, 3: vespo,
                              // 4: gmpo, 5: gpg
  bool seq_level = false;     // importance_sampling_level == "sequence" (GSPO)
  bool seq_pass = false;      // a first pass over each sequence forms its statistics (the partials' P_SEQ_* rows)
  bool shared_ratio = false;  // one ratio per sequence with a gradient: GSPO's c1 or GMPO's geometric-mean ratio
  int64_t kl_estimator = 0;   // 0: k3, 1: k1, 2: k2, 3: low_var_kl
  bool add_kl = false;        // ref_logprobs given and beta != 0: per-token loss += beta * KL
  bool bias_kl = false;       // use_bias_correction_kl: KL *= c1
  bool has_delta = false;     // c1 <- min(c1, delta)
  bool has_clip_c = false;    // dual clip for A < 0
  bool per_seq_metrics = false;  // clip flags are per sequence (sequence level, per-sequence advantages, T != 1)
  bool has_iw = false;        // importance_weights given
  int64_t rollout_is = 0;     // rollout importance sampling from sampling_logp: 0 none, 1 token, 2 sequence level
  bool rollout_is_mask = false;       // masked (MIS) instead of truncated (TIS)
  bool has_off_policy_mask = false;   // off_policy_mask_threshold given
  bool has_log_clamp = false;         // log-ratios clamped to ±log_clamp before exp
  double lo = 0.8;            // 1 - epsilon_low
  double hi = 1.2;            // 1 + epsilon_high
  double eps_high = 0.2;      // epsilon_high (cispo's absolute cap)
  double delta = 0.0;
  double clip_c = 0.0;
  double beta = 0.0;
  double tau_pos = 1.0;       // SAPO temperatures
  double tau_neg = 1.05;
  double eps_low = 0.2;       // GMPO's log-space clip range is [-eps_low, eps_high]
  double is_min = -INFINITY;  // bounds of the rollout ratio (±inf: unbounded)
  double is_max = 3.0;
  double off_policy_threshold = 0.0;
  double k_pos = 2.0;         // VESPO's gamma weight (lambdas already at least 1e-4)
  double lambda_pos = 3.0;
  double k_neg = 3.0;
  double lambda_neg = 2.0;
  double log_clamp = 0.0;
};

// Rows of the per-sequence partials [10, B] (grpo_kernels/aggregation.py): Σ m·ℓ, Σ m, Σ m·KL, Σ m·low,
// Σ m·high, Σ m·region, then the sequence statistics of cpu::SeqStats: log-ratio, mean advantage (GMPO),
// importance weight, mean KL (off-policy mask).
constexpr int64_t kNumPartials = 10;

#define GRPO_KERNELS_ENTRY_POINTS                                                                               \
  /* token_logprobs forward.                                                                                   \
     logits [..., V] float16/bfloat16/float32/float64; token_ids [...] int32/int64 (values in [0, V) or        \
     ignore_index). Returns (logp [R], lse [R], entropy [R] or an empty tensor without return_entropy),         \
     R = number of rows, compute dtype; lse is of logits / temperature; ignored rows get 0 everywhere. */       \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(                                           \
      const at::Tensor& logits, const at::Tensor& token_ids, double temperature, int64_t ignore_index,         \
      bool return_entropy);                                                                                     \
                                                                                                               \
  /* token_logprobs backward: d logits = (g_logp (onehot_y - p) + g_H (-p (log p + H))) / T, p from lse.       \
     grad_logp, grad_entropy [R] (either may be absent; entropy [R] is required with grad_entropy).            \
     Returns d logits in the dtype and shape of logits: a new contiguous tensor, or logits itself (written     \
     in place, each row read before it is overwritten) when inplace. Ignored rows get 0. */                    \
  at::Tensor token_logprobs_bwd(                                                                                \
      const at::Tensor& logits, const at::Tensor& token_ids, const at::Tensor& lse,                            \
      const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& entropy,                    \
      const c10::optional<at::Tensor>& grad_entropy, double temperature, int64_t ignore_index, bool inplace);  \
                                                                                                               \
  /* group_advantages, per group: rewards [B, K] compute dtype (NaN = missing), groups are the segments        \
     order[offsets[g] : offsets[g+1]] of the rows (order [B] int64 row indices; absent = rows in order),       \
     offsets [G + 1] int64. scale: 0 group std, 1 batch std (batch_std [K] required), 2 none; rloo: the        \
     leave-one-out baseline. Returns (adv [B, K], mean [G, K], std [G, K]): NaN where undefined (no            \
     nan_to_num), std unbiased and NaN for fewer than 2 values. */                                              \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> group_normalize(                                              \
      const at::Tensor& rewards, const c10::optional<at::Tensor>& order, const at::Tensor& offsets,            \
      const c10::optional<at::Tensor>& batch_std, double eps, int64_t scale, bool rloo);                        \
                                                                                                               \
  /* grpo_loss forward: logp, old_logp, ref_logp, adv, mask, iw, sampling_logp all [B, T] (views allowed),     \
     compute dtype; old_logp absent = logp (ratio 1); ref_logp absent = no KL; iw absent = 1; sampling_logp      \
     absent = old_logp. Returns (per_token_loss [B, T] contiguous, partials [kNumPartials, B]). */              \
  std::tuple<at::Tensor, at::Tensor> grpo_loss_fwd(                                                            \
      const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp,                                       \
      const c10::optional<at::Tensor>& ref_logp, const at::Tensor& adv, const at::Tensor& mask,                \
      const c10::optional<at::Tensor>& iw, const c10::optional<at::Tensor>& sampling_logp,                     \
      const LossConfig& cfg);                                                                                   \
                                                                                                               \
  /* grpo_loss backward: d loss / d logp [B, T] (compute dtype) for seq_grad [B] = g · dL/dS_i, from the       \
     forward's inputs and partials (the sequence statistics are read from them). */                            \
  at::Tensor grpo_loss_bwd(                                                                                     \
      const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp,                                       \
      const c10::optional<at::Tensor>& ref_logp, const at::Tensor& adv, const at::Tensor& mask,                \
      const c10::optional<at::Tensor>& iw, const c10::optional<at::Tensor>& sampling_logp,                     \
      const at::Tensor& partials, const at::Tensor& seq_grad, const LossConfig& cfg);                           \
                                                                                                               \
  /* fused_grpo_loss forward, without a sequence pass only (cfg.seq_pass false): logits [B, T, V],              \
     token_ids [B, T]; old_logp, ref_logp, adv, keep (mask ∧ id != ignore_index), iw, sampling_logp as in       \
     grpo_loss_fwd;                                                                                             \
     seq_weight [B] = dL/dS_i (aggregation.sequence_weights, known from the mask alone).                       \
     One pass per row: log-sum-exp, logp, the token's d loss / d logp, and (with compute_grad) the row of      \
     d loss / d logits for an incoming gradient of 1, written in the logits dtype into a new contiguous        \
     tensor or, with inplace, into logits itself. Returns (logp [B, T], lse [B, T], entropy [B, T] or empty,   \
     per_token_loss [B, T], partials [kNumPartials, B], grad_logits or an empty tensor without compute_grad). */ \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_grpo_loss_fwd(      \
      const at::Tensor& logits, const at::Tensor& token_ids, const c10::optional<at::Tensor>& old_logp,        \
      const c10::optional<at::Tensor>& ref_logp, const at::Tensor& adv, const at::Tensor& keep,                \
      const c10::optional<at::Tensor>& iw, const c10::optional<at::Tensor>& sampling_logp,                     \
      const at::Tensor& seq_weight, const LossConfig& cfg,                                                      \
      double temperature, int64_t ignore_index, bool return_entropy, bool compute_grad, bool inplace);

namespace cpu {
GRPO_KERNELS_ENTRY_POINTS
}  // namespace cpu

#ifdef GRPO_WITH_CUDA
namespace cuda {
GRPO_KERNELS_ENTRY_POINTS
}  // namespace cuda
#endif

}  // namespace grpo_kernels
