// grpo_loss on CPU: per-token loss and per-sequence partials (forward), d loss
// / d logp (backward); one task per sequence, so every sum is formed in the same
// order for any thread count. float32 in the configurations of supported_fast
// (every loss family, both ratio levels, KL, importance weights, delta, dual
// clip, log-ratio clamp) runs the vectorized kernels of loss_simd.h; float64,
// rollout ratios and the off-policy mask run loss_terms.h token by token.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "../common/entry_points.h"
#include "../common/loss_terms.h"
#include "loss_simd.h"
#include "loss_tokens.h"

namespace grpo_kernels::cpu::GRPO_CPU_COPY {  // one copy per instruction set (setup.py)

namespace {

// Sequences per task: at least kMinTokensPerTask tokens, so that a small batch runs on the calling thread
// instead of paying the threads' start-up (8 × 256 tokens take a few microseconds).
constexpr int64_t kMinTokensPerTask = 8192;

inline int64_t sequence_grain(int64_t T) { return std::max<int64_t>(1, kMinTokensPerTask / std::max<int64_t>(T, 1)); }

// Forward. Sequence i reads logp, old_logp, adv, mask (ref_logp, iw,
// sampling_logp) over T (twice with a sequence pass: its statistics first);
// writes per_token_loss [i, :] and partials [:, i].
// Memory traffic ≈ B·T·(3..7 loads + 1 store), ×~2 loads with a sequence pass.
template <typename acc_t>
void forward_kernel(const LossTokens<acc_t>& in, const LossConfig& cfg, acc_t* per_token_loss, acc_t* partials) {
  const LossScalars<acc_t> s = rounded_scalars<acc_t>(cfg.scalars);
  const int64_t B = in.B, len = in.T;
  at::parallel_for(0, B, sequence_grain(len), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const loss::SeqStats<acc_t> seq = cfg.seq_pass ? in.sequence(cfg, s, i) : loss::SeqStats<acc_t>{};
      acc_t sum_loss = 0, n = 0, sum_kl = 0, low = 0, high = 0, region = 0;
      for (int64_t t = 0; t < len; ++t) {
        const acc_t m = in.mask(i, t);
        const loss::TokenTerms<acc_t> r = loss::token_terms(cfg, s, seq, in.token(i, t), in.has_ref);
        per_token_loss[i * len + t] = m != acc_t(0) ? r.loss : acc_t(0);  // 0 at masked tokens, by selection
        sum_loss += r.loss * m;
        n += m;
        sum_kl += r.kl * m;
        low += acc_t(r.is_low) * m;
        high += acc_t(r.is_high) * m;
        region += acc_t(r.is_low || r.is_high) * m;
      }
      if (cfg.per_seq_metrics) {  // one ratio and one advantage per sequence: a 0/1 flag per sequence
        const acc_t seq_coef_1 = std::exp(seq.log_ratio);
        const acc_t adv = n != acc_t(0) ? in.adv(i, 0) : acc_t(0);  // a fully masked sequence: neutral
        const loss::TokenTerms<acc_t> r = loss::policy_terms(cfg, s, seq_coef_1, adv, seq_coef_1, acc_t(0), seq);
        low = acc_t(r.is_low);
        high = acc_t(r.is_high);
        region = acc_t(r.is_low || r.is_high);
      }
      const acc_t values[kNumPartials] = {sum_loss, n, sum_kl, low, high, region, seq.log_ratio, seq.adv,
                                          seq.is_weight, seq.kl};
      for (int64_t k = 0; k < kNumPartials; ++k) partials[k * B + i] = values[k];
    }
  });
}

// Backward. d loss / d logp_{i,t} = seq_grad_i · m · dℓ_t/dlogp_t (loss_terms.h loss::dloss_dlogp). Token level:
// dℓ/dlogp = ∂ℓ/∂logp + ∂ℓ/∂c1 · d c1/d logp. Shared ratio (GSPO, GMPO): a first loop sums
// G_i = Σ_t m ∂ℓ_t/∂c1, then dℓ/dlogp_s = ∂ℓ_s/∂logp_s + G_i c1 / denominator · ratio_grad_s. Sequence i
// reads its inputs over T (twice with a shared ratio) and its partials; writes d logp [i, :].
template <typename acc_t>
void backward_kernel(const LossTokens<acc_t>& in, const LossConfig& cfg, const acc_t* partials, const acc_t* seq_grad,
                     acc_t* grad_logp) {
  const LossScalars<acc_t> s = rounded_scalars<acc_t>(cfg.scalars);
  const int64_t B = in.B, len = in.T;
  at::parallel_for(0, B, sequence_grain(len), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const loss::SeqStats<acc_t> seq = loss::stored_stats(partials, B, i);
      acc_t seq_term = 0;
      if (cfg.shared_ratio) {
        acc_t sum_g = 0;
        for (int64_t t = 0; t < len; ++t) {
          sum_g += loss::token_terms(cfg, s, seq, in.token(i, t), in.has_ref).dloss_dcoef * in.mask(i, t);
        }
        seq_term = loss::shared_ratio_term(cfg, sum_g, seq.log_ratio, partials[B + i]);
      }
      for (int64_t t = 0; t < len; ++t) {
        const loss::TokenTerms<acc_t> r = loss::token_terms(cfg, s, seq, in.token(i, t), in.has_ref);
        const acc_t m = in.mask(i, t);
        grad_logp[i * len + t] = m != acc_t(0) ? seq_grad[i] * (m * loss::dloss_dlogp(cfg, r, seq_term)) : acc_t(0);
      }
    }
  });
}

// The vectorized kernels (float32, configurations of supported_fast): the family, the shared ratio, the KL's
// presence and, with kSpecialize, the options fixed as constants (Fixed; kBare only for a token-level ratio) as
// template parameters, chosen once per call. Without kSpecialize every configuration runs Fixed::kGeneral (the
// separate backward: the fused loss's sequence level only; fewer instances to compile).
template <bool kSpecialize, typename Fn>
void with_token_kind(const LossConfig& cfg, bool has_ref, bool has_iw, Fn&& fn) {
  using General = std::integral_constant<Fixed, Fixed::kGeneral>;
  using Plain = std::integral_constant<Fixed, Fixed::kPlain>;
  using Bare = std::integral_constant<Fixed, Fixed::kBare>;
  auto with_plain = [&](auto family, auto shared, auto ref) {
    if constexpr (!kSpecialize) {
      fn(family, shared, ref, General{});
    } else {
      if constexpr (!decltype(shared)::value) {
        if (bare(cfg, has_ref, has_iw)) return fn(family, shared, ref, Bare{});
      }
      if (plain(cfg)) fn(family, shared, ref, Plain{});
      else fn(family, shared, ref, General{});
    }
  };
  auto with_ref = [&](auto family, auto shared) {
    if (has_ref) with_plain(family, shared, std::true_type{});
    else with_plain(family, shared, std::false_type{});
  };
  auto flags = [&](auto family) {
    if (cfg.shared_ratio) with_ref(family, std::true_type{});
    else with_ref(family, std::false_type{});
  };
  switch (cfg.family) {
    case Family::kClipped: flags(std::integral_constant<Family, Family::kClipped>{}); break;
    case Family::kCispo: flags(std::integral_constant<Family, Family::kCispo>{}); break;
    case Family::kSapo: flags(std::integral_constant<Family, Family::kSapo>{}); break;
    case Family::kVespo: flags(std::integral_constant<Family, Family::kVespo>{}); break;
    case Family::kGmpo: flags(std::integral_constant<Family, Family::kGmpo>{}); break;
    case Family::kGpg: flags(std::integral_constant<Family, Family::kGpg>{}); break;
    default: TORCH_CHECK(false, "grpo_loss: unknown loss family ", static_cast<int64_t>(cfg.family));
  }
}

inline TokenOptions token_options(const LossConfig& cfg) {
  TokenOptions o;
  o.has_log_clamp = cfg.has_log_clamp;
  o.has_delta = cfg.has_delta;
  o.has_clip_c = cfg.has_clip_c;
  o.bias_kl = cfg.bias_kl;
  o.add_kl = cfg.add_kl;
  o.kl_estimator = cfg.kl_estimator;
  o.s = rounded_scalars<float>(cfg.scalars);
  return o;
}

// The per-sequence numbers of TokenOptions from the sequence's statistics (as loss::token_terms forms them).
inline void set_sequence(TokenOptions& o, const LossConfig& cfg, const loss::SeqStats<float>& seq) {
  o.shared_coef = std::exp(seq.log_ratio);
  o.seq_adv = seq.adv;
  if (cfg.family == Family::kVespo) {
    o.phi_nonneg = loss::vespo_phi(o.s, seq.log_ratio, 0.0f);
    o.phi_neg = loss::vespo_phi(o.s, seq.log_ratio, -1.0f);
  }
}

// 0 in a row of an output outside the span of tokens the kernels visit.
inline void zero_outside(float* row, std::pair<int64_t, int64_t> span, int64_t len) {
  std::fill(row, row + span.first, 0.0f);
  std::fill(row + span.second, row + len, 0.0f);
}

// The sums of sequence_fast over a row, each in kSumLanes lanes (lane l: the tokens t ≡ l mod kSumLanes).
struct SequenceSums {
  LaneSum count, ratio, adv;
};

// sequence_fast's work on the n <= kSumLanes tokens of a group (mask, logp, old and, for GMPO, adv from the
// group's first token): the masked terms added to the sums' lanes in place.
template <Family F>
GRPO_ALWAYS_INLINE void sequence_lanes(const TokenOptions& o, const float* mask, const float* logp, const float* old,
                                       const float* adv, int64_t n, SequenceSums& sums) {
  const LossScalars<float>& s = o.s;
#pragma omp simd
  for (int64_t l = 0; l < n; ++l) {
    const float m = mask[l];
    const bool k = m != 0.0f;  // neutral values at masked tokens (token())
    float r = select_bits(k, logp[l], 0.0f) - select_bits(k, old[l], 0.0f);
    r = select_bits(o.has_log_clamp, clampf(r, -s.log_clamp, s.log_clamp), r);
    float x;
    if constexpr (F == Family::kGmpo) {  // loss::gmpo_log_ratio
      const float a_ = select_bits(k, adv[l], 0.0f);
      const float sign = select_bits(a_ > 0.0f, 1.0f, select_bits(a_ < 0.0f, -1.0f, 0.0f));
      x = sign * std::min(sign * r, sign * clampf(r, -s.eps_low, s.eps_high));
      sums.adv.lane[l] += a_ * m;
    } else if constexpr (F == Family::kVespo) {
      x = clampf(r, float(-kVespoLogMax), float(kVespoLogMax));
    } else {
      x = r;
    }
    sums.count.lane[l] += m;
    sums.ratio.lane[l] += x * m;
  }
}

// sequence_lanes over the n tokens of a block, kSumLanes at a time (the last group may be shorter).
template <Family F>
GRPO_ALWAYS_INLINE void sequence_block(const TokenOptions& o, const float* mask, const float* logp, const float* old,
                                       const float* adv, int64_t n, SequenceSums& sums) {
  const int64_t full = n / kSumLanes * kSumLanes;
  for (int64_t c = 0; c < full; c += kSumLanes) {
    sequence_lanes<F>(o, mask + c, logp + c, old + c, F == Family::kGmpo ? adv + c : nullptr, kSumLanes, sums);
  }
  if (full < n) {
    sequence_lanes<F>(o, mask + full, logp + full, old + full, F == Family::kGmpo ? adv + full : nullptr, n - full,
                      sums);
  }
}

// The sequence pass of sequence i (loss::add_sequence_terms without rollout ratios, off-policy mask or token
// importance weights): its sums in fixed lanes, straight from the rows (a contiguous row in place); only the
// inputs it needs are read.
template <Family F>
loss::SeqStats<float> sequence_fast(const LossRows& in, const LossConfig& cfg, const TokenOptions& o, int64_t i,
                                    std::pair<int64_t, int64_t> span, TokenBlock& b) {
  SequenceSums sums;
  for (int64_t t0 = span.first; t0 < span.second; t0 += kTokenBlock) {
    const int64_t n = std::min(kTokenBlock, span.second - t0);
    const float* logp = in.logp.view(i, t0, n, b.logp_buf, b.logp_fill);
    const float* old = in.has_old ? in.old.view(i, t0, n, b.old_buf, b.old_fill) : logp;  // absent: ratio 1
    const float* adv = F == Family::kGmpo ? in.adv.view(i, t0, n, b.adv_buf, b.adv_fill) : nullptr;
    in.mask.read(i, t0, n, b.mask);  // a bool mask as 0/1 (one vectorized loop; per group gcc 12 does not vectorize it)
    sequence_block<F>(o, b.mask, logp, old, adv, n, sums);
  }
  float sums_out[loss::kSequenceSums] = {sums.count.total(), 0.0f, sums.adv.total(), 0.0f, 0.0f, 0.0f};
  if (F == Family::kGmpo || F == Family::kVespo || cfg.seq_level) sums_out[1] = sums.ratio.total();
  return loss::sequence_stats(cfg, o.s, sums_out);
}

// Whether token_out's ratio_grad (d c1/d logp's token factor) is 1 at every token: a shared ratio without
// GMPO's clipped log-ratio and without the log-ratio clamp (Fixed::kPlain, kBare).
template <Family F, bool kShared, Fixed kFixed>
constexpr bool ratio_grad_one() {
  return kShared && F != Family::kGmpo && kFixed != Fixed::kGeneral;
}

// The shared ratio's completion of the gradient over n tokens: g = m · (∂ℓ/∂logp + seq_term · ratio_grad), 0 at
// masked tokens; ratio_grad 1 where kOne (not read).
template <bool kOne, typename M>
GRPO_ALWAYS_INLINE void complete_shared(const M* mask, const float* ratio_grad, float seq_term, int64_t n,
                                        float* g) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    const float m = mask_value(mask[t]);
    const float d = kOne ? seq_term : seq_term * ratio_grad[t];
    g[t] = select_bits(m != 0.0f, m * (g[t] + d), 0.0f);
  }
}

// The sums of forward_fast over a row, each in kSumLanes lanes (lane l: the tokens t ≡ l mod kSumLanes).
struct ForwardSums {
  LaneSum loss, n, kl, low, high, region, g;
};

// forward_fast's work on the tokens [c, c + kSumLanes) of block b: the per-token loss to loss_out, m · dℓ/dlogp
// (with a shared ratio ∂ℓ/∂logp, and d c1/d logp to rg_out) to grad_out, the masked terms added to the sums'
// lanes in place (no block buffers).
template <Family F, bool kShared, bool kRef, Fixed kFixed>
GRPO_ALWAYS_INLINE void forward_lanes(const TokenOptions& o, const TokenBlock& b, int64_t c, float* loss_out,
                                      float* grad_out, float* rg_out, ForwardSums& sums) {
#pragma omp simd
  for (int64_t l = 0; l < kSumLanes; ++l) {
    const TokenOut r = token_out<F, kShared, kRef, kFixed>(o, token(b, c + l));
    const float m = b.mask[c + l];
    const bool k = m != 0.0f;
    loss_out[l] = select_bits(k, r.loss, 0.0f);  // 0 at masked tokens, by selection
    // the gradient: at token level final; with a shared ratio ∂ℓ/∂logp, completed after the row
    grad_out[l] = kShared ? r.dlogp : select_bits(k, m * (r.dlogp + r.dcoef * r.ratio_grad), 0.0f);
    sums.loss.lane[l] += r.loss * m;
    sums.n.lane[l] += m;
    sums.kl.lane[l] += r.kl * m;
    sums.low.lane[l] += r.low * m;
    sums.high.lane[l] += r.high * m;
    sums.region.lane[l] += std::max(r.low, r.high) * m;
    if constexpr (kShared) {
      if constexpr (!ratio_grad_one<F, kShared, kFixed>()) rg_out[l] = r.ratio_grad;
      sums.g.lane[l] += r.dcoef * m;
    }
  }
}

// The forward and, when grad_sums is not null, d S_i / d logp = m · dℓ/dlogp from the same evaluation of the
// token terms (backward_fast's values for seq_grad = 1). With a shared ratio the row's d c1/d logp terms wait in
// ratio_grad until Σ_t m ∂ℓ_t/∂c1 is known at its end. The tokens go kSumLanes at a time straight into the
// outputs and the sums' lanes; a last group of fewer tokens goes through buffers padded with masked tokens
// (which add 0 to every lane).
template <Family F, bool kShared, bool kRef, Fixed kFixed>
void forward_fast(const LossRows& in, const LossConfig& cfg, int64_t B, int64_t len, float* per_token_loss,
                  float* partials, float* grad_sums) {
  constexpr bool kRatioGradOne = ratio_grad_one<F, kShared, kFixed>();
  const TokenOptions base = token_options(cfg);
  at::parallel_for(0, B, sequence_grain(len), [&](int64_t begin, int64_t end) {
    TokenOptions o = base;
    TokenBlock b;
    // the destinations of a padded last group, and of the gradient when it is not asked for
    float loss_pad[kSumLanes], grad_pad[kSumLanes], rg_pad[kSumLanes], grad_unused[kSumLanes];
    std::vector<float> ratio_grad(kShared && !kRatioGradOne && grad_sums != nullptr ? len : 0);
    for (int64_t i = begin; i < end; ++i) {
      const std::pair<int64_t, int64_t> span = in.span(i, len);  // the tokens outside are masked: 0 out
      float* loss_row = per_token_loss + i * len;
      float* grad_row = grad_sums != nullptr ? grad_sums + i * len : nullptr;
      zero_outside(loss_row, span, len);
      if (grad_row != nullptr) zero_outside(grad_row, span, len);
      const loss::SeqStats<float> seq =
          cfg.seq_pass ? sequence_fast<F>(in, cfg, o, i, span, b) : loss::SeqStats<float>{};
      set_sequence(o, cfg, seq);
      ForwardSums sums;
      for (int64_t t0 = span.first; t0 < span.second; t0 += kTokenBlock) {
        const int64_t count = std::min(kTokenBlock, span.second - t0);
        const int64_t full = count / kSumLanes * kSumLanes;
        in.read(i, t0, count, b);
        for (int64_t c = 0; c < full; c += kSumLanes) {
          const int64_t t = t0 + c;
          forward_lanes<F, kShared, kRef, kFixed>(o, b, c, loss_row + t,
                                                  grad_row != nullptr ? grad_row + t : grad_unused,
                                                  kShared && !kRatioGradOne && grad_row != nullptr
                                                      ? ratio_grad.data() + t
                                                      : rg_pad,
                                                  sums);
        }
        if (full < count) {  // the row's last tokens
          const int64_t rest = count - full;
          b.pad(full, rest);
          forward_lanes<F, kShared, kRef, kFixed>(o, b, full, loss_pad, grad_pad, rg_pad, sums);
          const int64_t t = t0 + full;
          std::memcpy(loss_row + t, loss_pad, rest * sizeof(float));
          if (grad_row != nullptr) {
            std::memcpy(grad_row + t, grad_pad, rest * sizeof(float));
            if (kShared && !kRatioGradOne) std::memcpy(ratio_grad.data() + t, rg_pad, rest * sizeof(float));
          }
        }
      }
      float values[kNumPartials] = {sums.loss.total(), sums.n.total(), sums.kl.total(), sums.low.total(),
                                    sums.high.total(), sums.region.total(), seq.log_ratio, seq.adv,
                                    seq.is_weight, seq.kl};
      if (kShared && grad_row != nullptr) {  // m · (∂ℓ/∂logp + G_i c1 / denominator · ratio_grad)
        const float seq_term = loss::shared_ratio_term(cfg, sums.g.total(), seq.log_ratio, values[1]);
        if (const uint8_t* bytes = in.mask.bytes(i, span.first)) {
          complete_shared<kRatioGradOne>(bytes, kRatioGradOne ? nullptr : ratio_grad.data() + span.first, seq_term,
                                         span.second - span.first, grad_row + span.first);
        } else {
          for (int64_t t0 = span.first; t0 < span.second; t0 += kTokenBlock) {
            const int64_t count = std::min(kTokenBlock, span.second - t0);
            in.mask.read(i, t0, count, b.mask);
            complete_shared<kRatioGradOne>(b.mask, kRatioGradOne ? nullptr : ratio_grad.data() + t0, seq_term, count,
                                           grad_row + t0);
          }
        }
      }
      if (cfg.per_seq_metrics) {  // one ratio and one advantage per sequence: a 0/1 flag per sequence
        const float seq_coef_1 = std::exp(seq.log_ratio);
        float adv0 = 0.0f;  // a fully masked sequence: neutral
        if (values[1] != 0.0f) in.adv.read(i, 0, 1, &adv0);
        const loss::TokenTerms<float> r = loss::policy_terms(cfg, o.s, seq_coef_1, adv0, seq_coef_1, 0.0f, seq);
        values[3] = float(r.is_low);
        values[4] = float(r.is_high);
        values[5] = float(r.is_low || r.is_high);
      }
      for (int64_t k = 0; k < kNumPartials; ++k) partials[k * B + i] = values[k];
    }
  });
}

template <Family F, bool kShared, bool kRef, Fixed kFixed>
void backward_fast(const LossRows& in, const LossConfig& cfg, int64_t B, int64_t len, const float* partials,
                   const float* seq_grad, float* grad_logp) {
  const TokenOptions base = token_options(cfg);
  at::parallel_for(0, B, sequence_grain(len), [&](int64_t begin, int64_t end) {
    TokenOptions o = base;
    TokenBlock b;
    float g[kTokenBlock];
    for (int64_t i = begin; i < end; ++i) {
      const std::pair<int64_t, int64_t> span = in.span(i, len);  // the tokens outside are masked: 0 out
      zero_outside(grad_logp + i * len, span, len);
      const loss::SeqStats<float> seq = loss::stored_stats(partials, B, i);
      set_sequence(o, cfg, seq);
      float seq_term = 0.0f;
      if (kShared) {  // G_i = Σ_t m ∂ℓ_t/∂c1
        LaneSum sum_g;
        for (int64_t t0 = span.first; t0 < span.second; t0 += kTokenBlock) {
          const int64_t count = std::min(kTokenBlock, span.second - t0);
          in.read(i, t0, count, b);
#pragma omp simd
          for (int64_t t = 0; t < count; ++t) {
            g[t] = token_out<F, kShared, kRef, kFixed>(o, token(b, t)).dcoef *
                   b.mask[t];
          }
          sum_g.add(g, count);
        }
        seq_term = loss::shared_ratio_term(cfg, sum_g.total(), seq.log_ratio, partials[B + i]);
      }
      const float w = seq_grad[i];
      for (int64_t t0 = span.first; t0 < span.second; t0 += kTokenBlock) {
        const int64_t count = std::min(kTokenBlock, span.second - t0);
        in.read(i, t0, count, b);
        float* out = grad_logp + i * len + t0;
#pragma omp simd
        for (int64_t t = 0; t < count; ++t) {
          const TokenOut r = token_out<F, kShared, kRef, kFixed>(o, token(b, t));
          const float m = b.mask[t];
          const float d = r.dlogp + (kShared ? seq_term : r.dcoef) * r.ratio_grad;
          out[t] = select_bits(m != 0.0f, w * (m * d), 0.0f);
        }
      }
    }
  });
}

// The mask as the kernels read it: a bool mask as is for the vectorized kernels, else in the compute dtype.
inline at::Tensor kernel_mask(const at::Tensor& mask, at::ScalarType dtype, bool fast) {
  return mask.scalar_type() == at::kBool && !fast ? mask.to(dtype) : mask;
}

inline bool fast_path(const at::Tensor& logp, const LossConfig& cfg) {
  return logp.scalar_type() == at::kFloat && supported_fast(cfg);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> grpo_loss_fwd_grad(
    const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp, const c10::optional<at::Tensor>& ref_logp,
    const at::Tensor& adv, const at::Tensor& mask, const c10::optional<at::Tensor>& iw,
    const c10::optional<at::Tensor>& sampling_logp, const LossConfig& cfg, bool compute_grad) {
  check_logp(logp, "grpo_loss_fwd");
  check_config(cfg, "grpo_loss_fwd");
  const int64_t B = logp.size(0), T = logp.size(1);
  check_loss_inputs("grpo_loss_fwd", logp, B, T, logp.scalar_type(), logp, old_logp, ref_logp, adv, mask, iw,
                    sampling_logp, /*bool_mask=*/true);
  at::Tensor per_token_loss = at::empty({B, T}, logp.options());
  at::Tensor partials = at::empty({kNumPartials, B}, logp.options());
  at::Tensor grad_sums = at::empty({compute_grad ? B : 0, T}, logp.options());
  const bool fast = fast_path(logp, cfg);
  const at::Tensor mask_k = kernel_mask(mask, logp.scalar_type(), fast);
  if (fast) {
    const LossRows rows(logp, old_logp, ref_logp, adv, mask_k, iw);
    with_token_kind</*kSpecialize=*/true>(cfg, ref_logp.has_value(), iw.has_value(),
                                       [&](auto family, auto shared, auto ref, auto fixed) {
      forward_fast<decltype(family)::value, decltype(shared)::value, decltype(ref)::value, decltype(fixed)::value>(
          rows, cfg, B, T, per_token_loss.data_ptr<float>(), partials.data_ptr<float>(),
          compute_grad ? grad_sums.data_ptr<float>() : nullptr);
    });
    return {per_token_loss, partials, grad_sums};
  }
  AT_DISPATCH_FLOATING_TYPES(logp.scalar_type(), "grpo_loss_fwd", [&] {
    const LossTokens<scalar_t> tokens(logp, old_logp, ref_logp, adv, mask_k, iw, sampling_logp);
    forward_kernel(tokens, cfg, per_token_loss.data_ptr<scalar_t>(), partials.data_ptr<scalar_t>());
    if (compute_grad) {  // the token-by-token kernels: the backward for seq_grad = 1
      const at::Tensor ones = at::ones({B}, logp.options());
      backward_kernel(tokens, cfg, partials.const_data_ptr<scalar_t>(), ones.const_data_ptr<scalar_t>(),
                      grad_sums.data_ptr<scalar_t>());
    }
  });
  return {per_token_loss, partials, grad_sums};
}

std::tuple<at::Tensor, at::Tensor> grpo_loss_fwd(const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp,
                                                 const c10::optional<at::Tensor>& ref_logp, const at::Tensor& adv,
                                                 const at::Tensor& mask, const c10::optional<at::Tensor>& iw,
                                                 const c10::optional<at::Tensor>& sampling_logp,
                                                 const LossConfig& cfg) {
  auto [per_token_loss, partials, grad_sums] =
      grpo_loss_fwd_grad(logp, old_logp, ref_logp, adv, mask, iw, sampling_logp, cfg, /*compute_grad=*/false);
  return {per_token_loss, partials};
}

at::Tensor grpo_loss_bwd(const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp,
                         const c10::optional<at::Tensor>& ref_logp, const at::Tensor& adv, const at::Tensor& mask,
                         const c10::optional<at::Tensor>& iw, const c10::optional<at::Tensor>& sampling_logp,
                         const at::Tensor& partials, const at::Tensor& seq_grad, const LossConfig& cfg) {
  check_logp(logp, "grpo_loss_bwd");
  check_config(cfg, "grpo_loss_bwd");
  const int64_t B = logp.size(0), T = logp.size(1);
  check_loss_inputs("grpo_loss_bwd", logp, B, T, logp.scalar_type(), logp, old_logp, ref_logp, adv, mask, iw,
                    sampling_logp, /*bool_mask=*/true);
  TORCH_CHECK(partials.dim() == 2 && partials.size(0) == kNumPartials && partials.size(1) == B,
              "grpo_loss_bwd: partials must be [", kNumPartials, ", ", B, "], got ", partials.sizes());
  at::Tensor grad_logp = at::empty({B, T}, logp.options());
  const at::Tensor partials_c =
      per_row_values(partials, logp.scalar_type(), kNumPartials * B, logp, "grpo_loss_bwd", "partials");
  const at::Tensor seq_grad_c = per_row_values(seq_grad, logp.scalar_type(), B, logp, "grpo_loss_bwd", "seq_grad");
  const bool fast = fast_path(logp, cfg);
  const at::Tensor mask_k = kernel_mask(mask, logp.scalar_type(), fast);
  if (fast) {
    const LossRows rows(logp, old_logp, ref_logp, adv, mask_k, iw);
    with_token_kind</*kSpecialize=*/false>(cfg, ref_logp.has_value(), iw.has_value(),
                                        [&](auto family, auto shared, auto ref, auto fixed) {
      backward_fast<decltype(family)::value, decltype(shared)::value, decltype(ref)::value, decltype(fixed)::value>(
          rows, cfg, B, T, partials_c.const_data_ptr<float>(), seq_grad_c.const_data_ptr<float>(),
          grad_logp.data_ptr<float>());
    });
    return grad_logp;
  }
  AT_DISPATCH_FLOATING_TYPES(logp.scalar_type(), "grpo_loss_bwd", [&] {
    backward_kernel(LossTokens<scalar_t>(logp, old_logp, ref_logp, adv, mask_k, iw, sampling_logp), cfg,
                    partials_c.const_data_ptr<scalar_t>(), seq_grad_c.const_data_ptr<scalar_t>(),
                    grad_logp.data_ptr<scalar_t>());
  });
  return grad_logp;
}

}  // namespace grpo_kernels::cpu::GRPO_CPU_COPY
