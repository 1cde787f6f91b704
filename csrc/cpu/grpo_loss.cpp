// grpo_loss on CPU: per-token loss and per-sequence partials (forward), d loss
// / d logp (backward); one task per sequence, tokens in order, so every sum is
// formed in the same order for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../common/entry_points.h"
#include "../common/loss_terms.h"
#include "loss_tokens.h"

namespace grpo_kernels::cpu::GRPO_CPU_COPY {  // one copy per instruction set (setup.py)

namespace {

// Forward. Sequence i reads logp, old_logp, adv, mask (ref_logp, iw,
// sampling_logp) over T (twice with a sequence pass: its statistics first);
// writes per_token_loss [i, :] and partials [:, i].
// Memory traffic ≈ B·T·(3..7 loads + 1 store), ×~2 loads with a sequence pass.
template <typename acc_t>
void forward_kernel(const LossTokens<acc_t>& in, const LossConfig& cfg, acc_t* per_token_loss, acc_t* partials) {
  const LossScalars<acc_t> s = rounded_scalars<acc_t>(cfg.scalars);
  const int64_t B = in.B, len = in.T;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
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
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> grpo_loss_fwd(const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp,
                                                 const c10::optional<at::Tensor>& ref_logp, const at::Tensor& adv,
                                                 const at::Tensor& mask, const c10::optional<at::Tensor>& iw,
                                                 const c10::optional<at::Tensor>& sampling_logp,
                                                 const LossConfig& cfg) {
  check_logp(logp, "grpo_loss_fwd");
  check_config(cfg, "grpo_loss_fwd");
  const int64_t B = logp.size(0), T = logp.size(1);
  check_loss_inputs("grpo_loss_fwd", logp, B, T, logp.scalar_type(), logp, old_logp, ref_logp, adv, mask, iw,
                    sampling_logp);
  at::Tensor per_token_loss = at::empty({B, T}, logp.options());
  at::Tensor partials = at::empty({kNumPartials, B}, logp.options());
  AT_DISPATCH_FLOATING_TYPES(logp.scalar_type(), "grpo_loss_fwd", [&] {
    forward_kernel(LossTokens<scalar_t>(logp, old_logp, ref_logp, adv, mask, iw, sampling_logp), cfg,
                   per_token_loss.data_ptr<scalar_t>(), partials.data_ptr<scalar_t>());
  });
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
                    sampling_logp);
  TORCH_CHECK(partials.dim() == 2 && partials.size(0) == kNumPartials && partials.size(1) == B,
              "grpo_loss_bwd: partials must be [", kNumPartials, ", ", B, "], got ", partials.sizes());
  at::Tensor grad_logp = at::empty({B, T}, logp.options());
  const at::Tensor partials_c =
      per_row_values(partials, logp.scalar_type(), kNumPartials * B, logp, "grpo_loss_bwd", "partials");
  const at::Tensor seq_grad_c = per_row_values(seq_grad, logp.scalar_type(), B, logp, "grpo_loss_bwd", "seq_grad");
  AT_DISPATCH_FLOATING_TYPES(logp.scalar_type(), "grpo_loss_bwd", [&] {
    backward_kernel(LossTokens<scalar_t>(logp, old_logp, ref_logp, adv, mask, iw, sampling_logp), cfg,
                    partials_c.const_data_ptr<scalar_t>(), seq_grad_c.const_data_ptr<scalar_t>(),
                    grad_logp.data_ptr<scalar_t>());
  });
  return grad_logp;
}

}  // namespace grpo_kernels::cpu::GRPO_CPU_COPY
