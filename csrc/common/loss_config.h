// The options of the GRPO loss kernels, decided once on the host (grpo_kernels/native/grpo_loss.py builds a
// LossConfig from grpo_kernels.kernel_options.KernelLossOptions), shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include <c10/util/Exception.h>

#include "loss_table.h"

namespace grpo_kernels {

// Code paths are named fields (the enums are generated from grpo_kernels/loss_table.py); the numeric options
// are one LossScalars<> (float64; the kernels round them to their compute dtype, as PyTorch rounds a Python
// scalar).
struct LossConfig {
  Family family = Family::kClipped;
  bool seq_level = false;     // importance_sampling_level == "sequence" (GSPO)
  bool seq_pass = false;      // a first pass over each sequence forms its statistics (the partials' P_SEQ_* rows)
  bool shared_ratio = false;  // one ratio per sequence with a gradient: GSPO's c1 or GMPO's geometric-mean ratio
  KlEstimator kl_estimator = KlEstimator::kK3;
  bool add_kl = false;        // ref_logprobs given and beta != 0: per-token loss += beta * KL
  bool bias_kl = false;       // use_bias_correction_kl: KL *= c1
  bool has_delta = false;     // c1 <- min(c1, delta)
  bool has_clip_c = false;    // dual clip for A < 0
  bool per_seq_metrics = false;  // clip flags are per sequence (sequence level, per-sequence advantages, T != 1)
  bool has_iw = false;        // importance_weights given
  RolloutLevel rollout_is = RolloutLevel::kNone;  // rollout importance sampling from sampling_logp
  bool rollout_is_mask = false;       // masked (MIS) instead of truncated (TIS)
  RolloutGate rollout_is_gate = RolloutGate::kRatio;  // the statistic the rollout importance sampling bounds
  bool has_off_policy_mask = false;   // off_policy_mask_threshold given
  bool has_log_clamp = false;         // log-ratios clamped to ±log_clamp before exp
  LossScalars<> scalars;              // the numeric options (loss_table.KERNEL_SCALARS); NaN until set
};

// Rows of the per-sequence partials [10, B] (grpo_kernels/aggregation.py): Σ m·ℓ, Σ m, Σ m·KL, Σ m·low,
// Σ m·high, Σ m·region, then the sequence statistics of loss::SeqStats: log-ratio, mean advantage (GMPO),
// importance weight, mean KL (off-policy mask).
constexpr int64_t kNumPartials = 10;

// Every entry point that takes a LossConfig calls this on the host before any kernel: a code outside the
// enums (a LossConfig filled in C++) stops here; the shared math of loss_terms.h has no such check and gives
// NaN for it instead.
inline void check_config(const LossConfig& cfg, const char* name) {
  TORCH_CHECK(is_known(cfg.family), name, ": unknown loss family ", static_cast<int64_t>(cfg.family));
  TORCH_CHECK(is_known(cfg.kl_estimator), name, ": unknown KL estimator ", static_cast<int64_t>(cfg.kl_estimator));
  TORCH_CHECK(is_known(cfg.rollout_is), name, ": unknown rollout importance-sampling level ",
              static_cast<int64_t>(cfg.rollout_is));
  TORCH_CHECK(is_known(cfg.rollout_is_gate), name, ": unknown rollout importance-sampling gate ",
              static_cast<int64_t>(cfg.rollout_is_gate));
  TORCH_CHECK(cfg.rollout_is_gate == RolloutGate::kRatio || cfg.rollout_is_mask, name,
              ": a rollout gate other than the ratio masks (rollout_is_mask)");
  TORCH_CHECK(cfg.rollout_is_gate != RolloutGate::kGeometricMean || cfg.rollout_is != RolloutLevel::kToken, name,
              ": the geometric-mean gate is a sequence statistic (not at token level)");
}

}  // namespace grpo_kernels
