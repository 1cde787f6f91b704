// The per-token GRPO loss and its derivatives (formulas: reference.grpo_loss),
// shared by the grpo_loss and fused_grpo_loss kernels.
//
// Derivatives follow PyTorch's autograd on the reference at ties: clamp passes
// the gradient at its bounds, torch.min splits a tie 0.5 / 0.5.
#pragma once

#include <algorithm>
#include <cmath>

#include "../common/host_device.h"
#include "../grpo_kernels.h"

namespace grpo_kernels::cpu {

// The numeric options of a LossConfig rounded to the compute dtype T, as
// PyTorch rounds a Python scalar to a tensor's dtype.
template <typename T>
struct LossScalars {
  T lo, hi, eps_high, delta, clip_c, beta, tau_pos, tau_neg;

  explicit LossScalars(const LossConfig& cfg)
      : lo(static_cast<T>(cfg.lo)), hi(static_cast<T>(cfg.hi)), eps_high(static_cast<T>(cfg.eps_high)),
        delta(static_cast<T>(cfg.delta)), clip_c(static_cast<T>(cfg.clip_c)), beta(static_cast<T>(cfg.beta)),
        tau_pos(static_cast<T>(cfg.tau_pos)), tau_neg(static_cast<T>(cfg.tau_neg)) {}
};

// One token's loss ℓ (importance weight and beta·KL included), its KL estimate
// (times c1 with bias correction), clip flags, and the partial derivatives
// ∂ℓ/∂c1 and ∂ℓ/∂logp (logp at fixed c1).
template <typename T>
struct TokenTerms {
  T loss;
  T kl;
  bool is_low;
  bool is_high;
  T dloss_dcoef;
  T dloss_dlogp;
};

// KL estimate of d = ref_logp - logp and d KL / d logp.
template <typename T>
GRPO_HOST_DEVICE inline void kl_terms(int64_t estimator, T logp, T ref_logp, T& kl, T& dkl_dlogp) {
  const T d = ref_logp - logp;
  if (estimator == 1) {  // k1 = -d
    kl = -d;
    dkl_dlogp = T(1);
  } else if (estimator == 2) {  // k2 = d²/2
    kl = T(0.5) * d * d;
    dkl_dlogp = -d;
  } else if (estimator == 3) {  // low_var_kl: k3 of clamp(d, ±20), clamped to ±10
    const T dc = std::min(std::max(d, T(-20)), T(20));
    const T e = std::exp(dc);
    const T v = e - dc - T(1);
    kl = std::min(std::max(v, T(-10)), T(10));
    const bool inside = d >= T(-20) && d <= T(20) && v >= T(-10) && v <= T(10);
    dkl_dlogp = inside ? T(1) - e : T(0);
  } else {  // k3 = e^d - d - 1
    const T e = std::exp(d);
    kl = e - d - T(1);
    dkl_dlogp = T(1) - e;
  }
}

// torch.min(a, b)'s gradient share of a: 1, 0.5 at a tie, 0.
template <typename T>
GRPO_HOST_DEVICE inline T min_share(T a, T b) {
  return a < b ? T(1) : (a == b ? T(0.5) : T(0));
}

// Policy term of ℓ for ratio c1 = coef_1 and advantage adv (reference.grpo_loss, by loss family).
template <typename T>
GRPO_HOST_DEVICE inline TokenTerms<T> policy_terms(const LossConfig& cfg, const LossScalars<T>& s, T coef_1, T adv,
                                                     T logp) {
  TokenTerms<T> r{};
  if (cfg.family == 1) {  // cispo: -sg[min(c1, eps_high)] · A · logp
    const T capped = std::min(coef_1, s.eps_high);
    r.loss = -capped * adv * logp;
    r.dloss_dlogp = -capped * adv;
    r.is_high = coef_1 > s.eps_high && adv > T(0);
  } else if (cfg.family == 2) {  // sapo: -σ(τ(c1 - 1)) · 4/τ · A
    const T tau = adv > T(0) ? s.tau_pos : s.tau_neg;
    const T sig = T(1) / (T(1) + std::exp(-(tau * (coef_1 - T(1)))));
    r.loss = -sig * T(4) / tau * adv;
    r.dloss_dcoef = -(sig * (T(1) - sig)) * T(4) * adv;  // σ'·τ · 4/τ · A
    r.is_low = coef_1 < s.lo && adv < T(0);
    r.is_high = coef_1 > s.hi && adv > T(0);
  } else {  // clipped: -min(c1·A, clip(c1, lo, hi)·A) with the delta clamp of c1 and the dual clip
    const T coef_2 = std::min(std::max(coef_1, s.lo), s.hi);
    const T dcoef_2 = coef_1 >= s.lo && coef_1 <= s.hi ? T(1) : T(0);
    T coef_1d = coef_1, dcoef_1d = T(1);
    if (cfg.has_delta) {
      coef_1d = std::min(coef_1, s.delta);
      dcoef_1d = coef_1 <= s.delta ? T(1) : T(0);
    }
    const T x1 = coef_1d * adv, x2 = coef_2 * adv;
    const T g1 = min_share(x1, x2);
    r.loss = -std::min(x1, x2);
    r.dloss_dcoef = -(adv * (g1 * dcoef_1d + (T(1) - g1) * dcoef_2));
    if (cfg.has_clip_c && adv < T(0)) {
      const T cap = -adv * s.clip_c;
      r.dloss_dcoef *= min_share(r.loss, cap);
      r.loss = std::min(r.loss, cap);
    }
    r.is_low = coef_1d < s.lo && adv < T(0);
    r.is_high = coef_1d > s.hi && adv > T(0);
  }
  return r;
}

// The whole per-token loss: policy term, times iw, plus beta · KL (KL computed when has_ref).
template <typename T>
GRPO_HOST_DEVICE inline TokenTerms<T> token_terms(const LossConfig& cfg, const LossScalars<T>& s, T coef_1, T adv,
                                                    T logp, bool has_ref, T ref_logp, T iw) {
  TokenTerms<T> r = policy_terms(cfg, s, coef_1, adv, logp);
  r.loss *= iw;
  r.dloss_dcoef *= iw;
  r.dloss_dlogp *= iw;
  if (has_ref) {
    T dkl_dlogp;
    kl_terms(cfg.kl_estimator, logp, ref_logp, r.kl, dkl_dlogp);
    if (cfg.bias_kl) {  // KL · c1
      if (cfg.add_kl) r.dloss_dcoef += s.beta * r.kl;
      r.kl *= coef_1;
      dkl_dlogp *= coef_1;
    }
    if (cfg.add_kl) {
      r.loss += s.beta * r.kl;
      r.dloss_dlogp += s.beta * dkl_dlogp;
    }
  }
  return r;
}

}  // namespace grpo_kernels::cpu
