// The per-token GRPO loss and its derivatives (formulas: reference.grpo_loss),
// shared by the grpo_loss and fused_grpo_loss kernels, CPU (host) and CUDA
// (device): pure GRPO_HOST_DEVICE functions of one token or one sequence.
//
// A token's loss may depend on statistics of its whole sequence (GSPO's ratio,
// VESPO's and GMPO's sequence weights, the sequence-level rollout ratio, the
// off-policy mask): a first pass adds each token's terms into the sums of
// add_sequence_terms, and sequence_stats turns them into the SeqStats the
// tokens then read.
//
// Derivatives follow PyTorch's autograd on the reference at ties: clamp passes
// the gradient at its bounds, torch.min splits a tie 0.5 / 0.5.
//
// Every switch over a code (Family, KlEstimator, RolloutGate) names its cases; its default
// gives NaN (loss and derivatives). The entry points reject such a code on the
// host before any kernel runs (check_config, loss_config.h), so the default is
// reached only by a LossConfig that skipped that check, and then it cannot
// pass for another family's numbers.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "host_device.h"
#include "loss_config.h"

namespace grpo_kernels::loss {

// A code added to loss_table's enums stops the build here: give it its case in the switches below (Family:
// add_sequence_terms, sequence_stats, policy_terms; KlEstimator: kl_terms; RolloutLevel: the rollout_is
// tests), and in the Triton kernels, then count it here.
static_assert(kNumFamilyCodes == 6, "a new loss family: add its cases to loss_terms.h");
static_assert(kNumKlEstimatorCodes == 4, "a new KL estimator: add its case to kl_terms");
static_assert(kNumRolloutLevelCodes == 3, "a new rollout level: handle it where loss_terms.h tests rollout_is");
static_assert(kNumRolloutGateCodes == 4, "a new rollout gate: add its cases to the rollout_is_gate switches");

// The [B, T] inputs at one token (absent ones as documented in entry_points.h: old_logp = logp, iw = 1,
// sampling_logp = old_logp; ref_logp is read only with has_ref).
template <typename T>
struct TokenInputs {
  T logp, old_logp, adv, mask, ref_logp, iw, sampling_logp;
};

// The statistics of a sequence (rows P_SEQ_* of the partials): the log of its shared ratio (GSPO: mean
// log-ratio; GMPO: clipped mean log-ratio) or VESPO's log w; GMPO's mean advantage; its importance weight
// (GMPO: geometric mean of the token weights; else the sequence-level rollout ratio, or with a gate other than
// the ratio the sequence's 0/1 gate); the mean KL of the off-policy mask.
template <typename T>
struct SeqStats {
  T log_ratio = T(0);
  T adv = T(0);
  T is_weight = T(1);
  T kl = T(0);
};

// Sums of the sequence pass: Σ m, Σ m·(log-ratio term), Σ m·A, Σ m·(log importance weight term),
// Σ rollout log-ratio (a divergence gate: Σ m·statistic), Σ m·KL.
constexpr int kSequenceSums = 6;

// One token's loss ℓ (importance weights and beta·KL included), its KL estimate
// (times c1 with bias correction), clip flags, the partial derivatives
// ∂ℓ/∂c1 and ∂ℓ/∂logp (logp at fixed c1), and ratio_grad: at token level
// d c1 / d logp; with a shared ratio, d (the token's term of the sequence
// log-ratio) / d logp.
template <typename T>
struct TokenTerms {
  T loss;
  T kl;
  bool is_low;
  bool is_high;
  T dloss_dcoef;
  T dloss_dlogp;
  T ratio_grad;
};

// A masked token (mask 0) reads neutral inputs (log-probs 0, advantage 0, importance weight 1) instead of
// what it holds: selection, not multiplication by 0, so NaN or ±inf at masked positions reach no sum and no
// gradient.
template <typename T>
GRPO_HOST_DEVICE inline TokenInputs<T> select_unmasked(const TokenInputs<T>& in) {
  if (in.mask != T(0)) return in;
  return {T(0), T(0), T(0), T(0), T(0), T(1), T(0)};
}

// torch.nan_to_num(x, nan=0): NaN → 0, ±inf → the largest finite values.
template <typename T>
GRPO_HOST_DEVICE inline T nan_to_num(T x) {
  if (x != x) return T(0);
  return std::min(std::max(x, std::numeric_limits<T>::lowest()), std::numeric_limits<T>::max());
}

template <typename T>
GRPO_HOST_DEVICE inline T clamp(T x, T low, T high) {
  return std::min(std::max(x, low), high);
}

// KL estimate of d = ref_logp - logp and d KL / d logp.
template <typename T>
GRPO_HOST_DEVICE inline void kl_terms(KlEstimator estimator, T logp, T ref_logp, T& kl, T& dkl_dlogp) {
  const T d = ref_logp - logp;
  switch (estimator) {
    case KlEstimator::kK1: {  // k1 = -d
      kl = -d;
      dkl_dlogp = T(1);
      break;
    }
    case KlEstimator::kK2: {  // k2 = d²/2
      kl = T(0.5) * d * d;
      dkl_dlogp = -d;
      break;
    }
    case KlEstimator::kLowVarKl: {  // low_var_kl: k3 of clamp(d, ±20), clamped to ±10
      const T dc = std::min(std::max(d, T(-20)), T(20));
      const T e = std::exp(dc);
      const T v = e - dc - T(1);
      kl = std::min(std::max(v, T(-10)), T(10));
      const bool inside = d >= T(-20) && d <= T(20) && v >= T(-10) && v <= T(10);
      dkl_dlogp = inside ? T(1) - e : T(0);
      break;
    }
    case KlEstimator::kK3: {  // k3 = e^d - d - 1
      const T e = std::exp(d);
      kl = e - d - T(1);
      dkl_dlogp = T(1) - e;
      break;
    }
    default:  // rejected by check_config
      kl = dkl_dlogp = std::numeric_limits<T>::quiet_NaN();
  }
}

// torch.min(a, b)'s gradient share of a: 1, 0.5 at a tie, 0.
template <typename T>
GRPO_HOST_DEVICE inline T min_share(T a, T b) {
  return a < b ? T(1) : (a == b ? T(0.5) : T(0));
}

// r = logp - old_logp, clamped to ±log_clamp with has_log_clamp; dr = d r / d logp.
template <typename T>
GRPO_HOST_DEVICE inline T log_ratio(const LossConfig& cfg, const LossScalars<T>& s, T logp, T old_logp, T& dr) {
  T r = logp - old_logp;
  dr = T(1);
  if (cfg.has_log_clamp) {
    dr = r >= -s.log_clamp && r <= s.log_clamp ? T(1) : T(0);
    r = clamp(r, -s.log_clamp, s.log_clamp);
  }
  return r;
}

// The rollout ratio of a (token or summed sequence) log-ratio d: e^d (d clamped with has_log_clamp), then
// truncated to or masked outside [is_min, is_max].
template <typename T>
GRPO_HOST_DEVICE inline T rollout_ratio(const LossConfig& cfg, const LossScalars<T>& s, T d) {
  if (cfg.has_log_clamp) d = clamp(d, -s.log_clamp, s.log_clamp);
  const T rho = std::exp(d);
  if (cfg.rollout_is_mask) return rho < s.is_min || rho > s.is_max ? T(0) : rho;
  return clamp(rho, s.is_min, s.is_max);
}

// A token's rollout log-ratio, TRL's nan_to_num((old - sampling) · m).
template <typename T>
GRPO_HOST_DEVICE inline T rollout_log_ratio(const TokenInputs<T>& in) {
  return nan_to_num((in.old_logp - in.sampling_logp) * in.mask);
}

// ρ = e^d of a token's rollout log-ratio d (clamped with has_log_clamp), no bounds.
template <typename T>
GRPO_HOST_DEVICE inline T token_ratio(const LossConfig& cfg, const LossScalars<T>& s, T d) {
  if (cfg.has_log_clamp) d = clamp(d, -s.log_clamp, s.log_clamp);
  return std::exp(d);
}

template <typename T>
GRPO_HOST_DEVICE inline bool in_band(const LossScalars<T>& s, T g) {
  return g >= s.is_min && g <= s.is_max;
}

// A divergence gate's statistic of a token (reference.rollout_gate_statistic): p = e^sampling, q = e^old
// clamped to [c, 1 - c]; binary KL or |p - q|; 0 where the sampling log-prob is NaN. NaN for a gate without
// a token statistic (the ratio gates: never called for them).
template <typename T>
GRPO_HOST_DEVICE inline T gate_statistic(const LossConfig& cfg, const TokenInputs<T>& in) {
  if (in.sampling_logp != in.sampling_logp) return T(0);
  const T low = static_cast<T>(kRolloutGateProbClamp), high = static_cast<T>(1.0 - kRolloutGateProbClamp);
  const T p = clamp(std::exp(in.sampling_logp), low, high), q = clamp(std::exp(in.old_logp), low, high);
  switch (cfg.rollout_is_gate) {
    case RolloutGate::kBinaryKl:
      return p * std::log(p / q) + (T(1) - p) * std::log((T(1) - p) / (T(1) - q));
    case RolloutGate::kTv:
      return std::abs(p - q);
    case RolloutGate::kRatio:
    case RolloutGate::kGeometricMean:
    default:
      return std::numeric_limits<T>::quiet_NaN();
  }
}

// The token-level rollout weight: the ratio truncated to or masked outside [is_min, is_max] (the ratio gate),
// or the ratio where the token's divergence lies in [is_min, is_max], else 0.
template <typename T>
GRPO_HOST_DEVICE inline T token_rollout_weight(const LossConfig& cfg, const LossScalars<T>& s,
                                               const TokenInputs<T>& in) {
  const T d = rollout_log_ratio(in);
  switch (cfg.rollout_is_gate) {
    case RolloutGate::kRatio:
      return rollout_ratio(cfg, s, d);
    case RolloutGate::kBinaryKl:
    case RolloutGate::kTv:
      return in_band(s, gate_statistic(cfg, in)) ? token_ratio(cfg, s, d) : T(0);
    case RolloutGate::kGeometricMean:  // a sequence statistic: rejected at token level on the host
    default:
      return std::numeric_limits<T>::quiet_NaN();
  }
}

// The sequence-level rollout weight of a token: the sequence's ratio (the ratio gate), or the token's ratio
// where the sequence's 0/1 gate (seq_is, from sequence_stats) is 1, else 0.
template <typename T>
GRPO_HOST_DEVICE inline T sequence_rollout_weight(const LossConfig& cfg, const LossScalars<T>& s, T seq_is,
                                                  const TokenInputs<T>& in) {
  switch (cfg.rollout_is_gate) {
    case RolloutGate::kRatio:
      return seq_is;
    case RolloutGate::kGeometricMean:
    case RolloutGate::kBinaryKl:
    case RolloutGate::kTv:
      return seq_is != T(0) ? token_ratio(cfg, s, rollout_log_ratio(in)) : T(0);
    default:  // rejected by check_config
      return std::numeric_limits<T>::quiet_NaN();
  }
}

// VESPO and GMPO take a token importance weight into their sequence weight: the token-level rollout weight
// times importance_weights.
GRPO_HOST_DEVICE inline bool has_token_is(const LossConfig& cfg) {
  return cfg.rollout_is == RolloutLevel::kToken || cfg.has_iw;
}

template <typename T>
GRPO_HOST_DEVICE inline T token_is(const LossConfig& cfg, const LossScalars<T>& s, const TokenInputs<T>& in) {
  if (cfg.rollout_is != RolloutLevel::kToken) return in.iw;
  const T rho = token_rollout_weight(cfg, s, in);
  return cfg.has_iw ? rho * in.iw : rho;
}

// GMPO's log-space clipping s·min(s·r, s·clamp(r, -eps_low, eps_high)), s = sign(A); dr = its d / d r.
template <typename T>
GRPO_HOST_DEVICE inline T gmpo_log_ratio(const LossScalars<T>& s, T r, T adv, T& dr) {
  const T sign = adv > T(0) ? T(1) : (adv < T(0) ? T(-1) : T(0));
  const T clipped = clamp(r, -s.eps_low, s.eps_high);
  const T dclipped = r >= -s.eps_low && r <= s.eps_high ? T(1) : T(0);
  const T a = sign * r, b = sign * clipped;
  const T share = min_share(a, b);
  dr = sign * (share * sign + (T(1) - share) * sign * dclipped);
  return sign * std::min(a, b);
}

// VESPO's gamma weight φ = exp(λ + k log w - λ w), (k, λ) by the sign of A; NaN and inf → 0.
template <typename T>
GRPO_HOST_DEVICE inline T vespo_phi(const LossScalars<T>& s, T log_w, T adv) {
  const bool nonneg = adv >= T(0);
  const T k = nonneg ? s.k_pos : s.k_neg, lambda = nonneg ? s.lambda_pos : s.lambda_neg;
  const T phi = std::exp(lambda + k * log_w - lambda * std::exp(log_w));
  return phi <= std::numeric_limits<T>::max() ? phi : T(0);
}

// A token's term of the sequence's rollout sum: its log-ratio d (the ratio gates), or m·(its divergence).
template <typename T>
GRPO_HOST_DEVICE inline T sequence_rollout_term(const LossConfig& cfg, const TokenInputs<T>& in) {
  switch (cfg.rollout_is_gate) {
    case RolloutGate::kRatio:
    case RolloutGate::kGeometricMean:
      return rollout_log_ratio(in);
    case RolloutGate::kBinaryKl:
    case RolloutGate::kTv:
      return gate_statistic(cfg, in) * in.mask;
    default:  // rejected by check_config
      return std::numeric_limits<T>::quiet_NaN();
  }
}

// The sequence's rollout weight from its sums: its ratio e^{Σ d} (the ratio gate), else its 0/1 gate: 1 where
// its statistic (e^{mean d}, or the mean divergence) lies in [is_min, is_max].
template <typename T>
GRPO_HOST_DEVICE inline T sequence_rollout_weight_of(const LossConfig& cfg, const LossScalars<T>& s, T sum, T n) {
  switch (cfg.rollout_is_gate) {
    case RolloutGate::kRatio:
      return rollout_ratio(cfg, s, sum);
    case RolloutGate::kGeometricMean:
      return in_band(s, token_ratio(cfg, s, sum / std::max(n, T(1)))) ? T(1) : T(0);
    case RolloutGate::kBinaryKl:
    case RolloutGate::kTv:
      return in_band(s, sum / std::max(n, T(1))) ? T(1) : T(0);
    default:  // rejected by check_config
      return std::numeric_limits<T>::quiet_NaN();
  }
}

// Adds token `in`'s terms to the sequence pass's sums[kSequenceSums] (all zero at the start).
template <typename T>
GRPO_HOST_DEVICE inline void add_sequence_terms(const LossConfig& cfg, const LossScalars<T>& s,
                                                const TokenInputs<T>& in, T* sums) {
  const T m = in.mask;
  T dr;
  const T r = log_ratio(cfg, s, in.logp, in.old_logp, dr);
  sums[0] += m;
  switch (cfg.family) {
    case Family::kGmpo: {
      T dg;
      sums[1] += gmpo_log_ratio(s, r, in.adv, dg) * m;
      sums[2] += in.adv * m;
      if (has_token_is(cfg)) sums[3] += std::log(token_is(cfg, s, in) + T(1e-10)) * m;
      break;
    }
    case Family::kVespo:
      sums[1] += clamp(r, T(-kVespoLogMax), T(kVespoLogMax)) * m;
      if (has_token_is(cfg)) {
        sums[3] += clamp(std::log(token_is(cfg, s, in)), T(kVespoLogMin), T(kVespoLogMax)) * m;
      }
      break;
    case Family::kClipped:
    case Family::kCispo:
    case Family::kSapo:
    case Family::kGpg:  // a shared ratio only at sequence level (GSPO)
      if (cfg.seq_level) sums[1] += r * m;
      break;
    default:  // rejected by check_config
      sums[1] = std::numeric_limits<T>::quiet_NaN();
  }
  if (cfg.rollout_is == RolloutLevel::kSequence) sums[4] += sequence_rollout_term(cfg, in);
  if (cfg.has_off_policy_mask) sums[5] += nan_to_num(in.sampling_logp - in.logp) * m;
}

// The statistics of a sequence from the sums of its pass.
template <typename T>
GRPO_HOST_DEVICE inline SeqStats<T> sequence_stats(const LossConfig& cfg, const LossScalars<T>& s, const T* sums) {
  SeqStats<T> st;
  const T n = sums[0];
  switch (cfg.family) {
    case Family::kGmpo: {  // means over n + 1e-8 (verl)
      const T denom = n + T(1e-8);
      st.log_ratio = sums[1] / denom;
      st.adv = sums[2] / denom;
      if (has_token_is(cfg)) st.is_weight = std::exp(sums[3] / denom);
      break;
    }
    case Family::kVespo: {
      const T log_w = has_token_is(cfg) ? sums[1] + sums[3] : sums[1];
      st.log_ratio = clamp(log_w, T(kVespoLogMin), T(kVespoLogMax));
      break;
    }
    case Family::kClipped:
    case Family::kCispo:
    case Family::kSapo:
    case Family::kGpg:
      if (cfg.seq_level) st.log_ratio = sums[1] / std::max(n, T(1));
      break;
    default:  // rejected by check_config
      st.log_ratio = std::numeric_limits<T>::quiet_NaN();
  }
  if (cfg.rollout_is == RolloutLevel::kSequence) st.is_weight = sequence_rollout_weight_of(cfg, s, sums[4], n);
  if (cfg.has_off_policy_mask) st.kl = sums[5] / std::max(n, T(1));
  return st;
}

// Policy term of ℓ for ratio coef_1 (the sequence's shared ratio for GSPO and GMPO), advantage adv, log-ratio r
// (reference.grpo_loss, by loss family).
template <typename T>
GRPO_HOST_DEVICE inline TokenTerms<T> policy_terms(const LossConfig& cfg, const LossScalars<T>& s, T coef_1, T adv,
                                                     T logp, T r, const SeqStats<T>& seq) {
  TokenTerms<T> t{};
  switch (cfg.family) {
    case Family::kCispo: {  //: -sg[min(c1, eps_high)] · A · logp
      const T capped = std::min(coef_1, s.eps_high);
      t.loss = -capped * adv * logp;
      t.dloss_dlogp = -capped * adv;
      t.is_high = coef_1 > s.eps_high && adv > T(0);
      break;
    }
    case Family::kSapo: {  //: -σ(τ(c1 - 1)) · 4/τ · A
      const T tau = adv > T(0) ? s.tau_pos : s.tau_neg;
      const T sig = T(1) / (T(1) + std::exp(-(tau * (coef_1 - T(1)))));
      t.loss = -sig * T(4) / tau * adv;
      t.dloss_dcoef = -(sig * (T(1) - sig)) * T(4) * adv;  // σ'·τ · 4/τ · A
      t.is_low = coef_1 < s.lo && adv < T(0);
      t.is_high = coef_1 > s.hi && adv > T(0);
      break;
    }
    case Family::kVespo: {  // -sg[φ] · A · logp
      const T phi = vespo_phi(s, seq.log_ratio, adv);
      t.loss = -phi * adv * logp;
      t.dloss_dlogp = -phi * adv;
      break;
    }
    case Family::kGmpo: {  // -Ā · R · ψ, R = coef_1 the sequence's ratio
      const T psi = has_token_is(cfg) ? seq.is_weight : T(1);
      t.loss = -seq.adv * coef_1 * psi;
      t.dloss_dcoef = -seq.adv * psi;
      const bool clipped = r < -s.eps_low || r > s.eps_high;
      t.is_low = clipped && adv < T(0);
      t.is_high = clipped && adv > T(0);
      break;
    }
    case Family::kGpg:  // -logp · A
      t.loss = -logp * adv;
      t.dloss_dlogp = -adv;
      break;
    case Family::kClipped: {  // -min(c1·A, clip(c1, lo, hi)·A), the delta clamp of c1, the dual clip
      const T coef_2 = std::min(std::max(coef_1, s.lo), s.hi);
      const T dcoef_2 = coef_1 >= s.lo && coef_1 <= s.hi ? T(1) : T(0);
      T coef_1d = coef_1, dcoef_1d = T(1);
      if (cfg.has_delta) {
        coef_1d = std::min(coef_1, s.delta);
        dcoef_1d = coef_1 <= s.delta ? T(1) : T(0);
      }
      const T x1 = coef_1d * adv, x2 = coef_2 * adv;
      const T g1 = min_share(x1, x2);
      t.loss = -std::min(x1, x2);
      t.dloss_dcoef = -(adv * (g1 * dcoef_1d + (T(1) - g1) * dcoef_2));
      if (cfg.has_clip_c && adv < T(0)) {
        const T cap = -adv * s.clip_c;
        t.dloss_dcoef *= min_share(t.loss, cap);
        t.loss = std::min(t.loss, cap);
      }
      t.is_low = coef_1d < s.lo && adv < T(0);
      t.is_high = coef_1d > s.hi && adv > T(0);
      break;
    }
    default:  // rejected by check_config
      t.loss = t.dloss_dcoef = t.dloss_dlogp = std::numeric_limits<T>::quiet_NaN();
  }
  return t;
}

template <typename T>
GRPO_HOST_DEVICE inline void scale_policy(TokenTerms<T>& t, T factor) {
  t.loss *= factor;
  t.dloss_dcoef *= factor;
  t.dloss_dlogp *= factor;
}

// The whole per-token loss: policy term; times the off-policy mask, the rollout weight and iw (the last two
// folded into the sequence weight instead for vespo and gmpo); plus beta · KL (KL computed when has_ref).
// kRolloutGates = false: the ratio gate only (rollout_is_gate must be kRatio), for the single-pass fused kernels
// (the CUDA one's registers do not hold a divergence gate's statistic); the host composes the loss for the others.
template <typename T, bool kRolloutGates = true>
GRPO_HOST_DEVICE inline TokenTerms<T> token_terms(const LossConfig& cfg, const LossScalars<T>& s,
                                                    const SeqStats<T>& seq, const TokenInputs<T>& in, bool has_ref) {
  // A gate's rollout weight first, while few values are live.
  T rollout_w = T(1);
  if constexpr (kRolloutGates) {
    if (!folds_importance_weights(cfg.family)) {
      if (cfg.rollout_is == RolloutLevel::kToken) rollout_w = token_rollout_weight(cfg, s, in);
      if (cfg.rollout_is == RolloutLevel::kSequence) rollout_w = sequence_rollout_weight(cfg, s, seq.is_weight, in);
    }
  }
  T dr;
  const T r = log_ratio(cfg, s, in.logp, in.old_logp, dr);
  const T coef_1 = std::exp(cfg.shared_ratio ? seq.log_ratio : r);
  TokenTerms<T> t = policy_terms(cfg, s, coef_1, in.adv, in.logp, r, seq);
  if (cfg.shared_ratio) {
    T dg = T(1);
    if (cfg.family == Family::kGmpo) gmpo_log_ratio(s, r, in.adv, dg);  // GSPO: the plain log-ratio
    t.ratio_grad = dr * dg;
  } else {
    t.ratio_grad = coef_1 * dr;
  }
  if (cfg.has_off_policy_mask) {
    scale_policy(t, in.adv >= T(0) || seq.kl <= s.off_policy_threshold ? T(1) : T(0));
  }
  if (!folds_importance_weights(cfg.family)) {
    if constexpr (kRolloutGates) {
      if (cfg.rollout_is != RolloutLevel::kNone) scale_policy(t, rollout_w);
    } else {
      if (cfg.rollout_is == RolloutLevel::kToken) scale_policy(t, rollout_ratio(cfg, s, rollout_log_ratio(in)));
      if (cfg.rollout_is == RolloutLevel::kSequence) scale_policy(t, seq.is_weight);
    }
    scale_policy(t, in.iw);
  }
  if (has_ref) {
    T dkl_dlogp;
    kl_terms(cfg.kl_estimator, in.logp, in.ref_logp, t.kl, dkl_dlogp);
    if (cfg.bias_kl) {  // KL · c1
      if (cfg.add_kl) t.dloss_dcoef += s.beta * t.kl;
      t.kl *= coef_1;
      dkl_dlogp *= coef_1;
    }
    if (cfg.add_kl) {
      t.loss += s.beta * t.kl;
      t.dloss_dlogp += s.beta * dkl_dlogp;
    }
  }
  return t;
}

// d ℓ / d logp of a token, before the mask and the sequence weight: ∂ℓ/∂logp plus, at token level,
// ∂ℓ/∂c1 · d c1/d logp; with a shared ratio, seq_term · ratio_grad (seq_term = G_i c1 / denominator, G_i the
// sequence's Σ_t m ∂ℓ_t/∂c1: see shared_ratio_term).
template <typename T>
GRPO_HOST_DEVICE inline T dloss_dlogp(const LossConfig& cfg, const TokenTerms<T>& t, T seq_term) {
  return t.dloss_dlogp + (cfg.shared_ratio ? seq_term : t.dloss_dcoef) * t.ratio_grad;
}

// G_i · c1 / denominator: the shared ratio's part of d ℓ / d logp (GSPO: c1 = e^w, w = Σ m r / max(1, n);
// GMPO: R = e^w, w = Σ m r̃ / (n + 1e-8)).
template <typename T>
GRPO_HOST_DEVICE inline T shared_ratio_term(const LossConfig& cfg, T sum_g, T log_ratio, T n) {
  const T denom = cfg.family == Family::kGmpo ? n + T(1e-8) : std::max(n, T(1));
  return sum_g * std::exp(log_ratio) / denom;
}

// The sequence statistics kept in the partials [kNumPartials, B] (rows 6..9) for the backward.
template <typename T>
GRPO_HOST_DEVICE inline SeqStats<T> stored_stats(const T* partials, int64_t B, int64_t i) {
  SeqStats<T> st;
  st.log_ratio = partials[6 * B + i];
  st.adv = partials[7 * B + i];
  st.is_weight = partials[8 * B + i];
  st.kl = partials[9 * B + i];
  return st;
}

}  // namespace grpo_kernels::loss
