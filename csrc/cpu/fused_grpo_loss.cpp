// fused_grpo_loss on CPU (no sequence pass: token-level ratios): logits → logp →
// loss, with d loss / d logits formed in the same pass over each row.
//
// The loss weights of sequence i, dL/dS_i (seq_weight), depend on the mask
// only, so a token's weight w = dL/dlogp = dL/dS_i · m · dℓ/dlogp is known as
// soon as its logp is: each row's exponentials are kept in a thread's buffer
// (V values, in L2) between the log-sum-exp and the gradient, so the row is
// read once and exponentiated once.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include "../common/entry_points.h"
#include "../common/row_temperature.h"
#include "gradient_buffer.h"
#include "logit_rows.h"
#include "../common/loss_terms.h"
#include "loss_tokens.h"
#include "scaled_store.h"
#include "softmax_row.h"

namespace grpo_kernels::cpu::GRPO_CPU_COPY {  // one copy per instruction set (setup.py)

namespace {

// Row r = (i, t) reads its id, its V logits once and a few [B, T] values;
// writes logp, lse (H) and, with kGrad, its V gradient values once (into the
// logits when in place: x_y is read first, and each chunk of the row is read
// before any of it is overwritten). Memory traffic: one read of the logits
// (+ one write with kGrad, non-temporal into a new gradient buffer); the
// exponentials round-trip through L2.
template <typename scalar_t, bool kEntropy, bool kGrad>
void fused_kernel(const at::Tensor& logits, const int64_t* ids, const LossTokens<at::opmath_type<scalar_t>>& in,
                  const at::opmath_type<scalar_t>* seq_weight, const LossConfig& cfg, double temperature,
                  const at::opmath_type<scalar_t>* row_t, int64_t ignore_index, at::opmath_type<scalar_t>* logp_out,
                  at::opmath_type<scalar_t>* lse_out, at::opmath_type<scalar_t>* ent_out, const at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const LogitRows rows(logits);
  const int64_t vocab = rows.vocab(), len = in.T;
  constexpr int64_t chunk = kChunk<scalar_t>;
  const int64_t n_chunks = (vocab + chunk - 1) / chunk;
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  scalar_t* dx = kGrad ? grad.data_ptr<scalar_t>() : nullptr;
  const LogitRows grad_rows(kGrad ? grad : logits);
  const acc_t inv_t_all = inverse_temperature<acc_t>(temperature);
  const bool streaming = kGrad && dx != x;  // a new gradient buffer: not read again by this kernel
  const LossScalars<acc_t> s = rounded_scalars<acc_t>(cfg.scalars);
  at::parallel_for(0, rows.rows(), 1, [&](int64_t begin, int64_t end) {
    acc_t* e = thread_buffer<acc_t>(vocab + n_chunks);  // the row's exponentials, then each chunk's max
    acc_t* chunk_max = e + vocab;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r / len, t = r % len, y = ids[r];
      scalar_t* dx_row = kGrad ? dx + grad_rows.offset(r) : nullptr;
      // An ignored or masked row is never read: whatever its logits hold changes nothing.
      if (y == ignore_index || in.mask(i, t) == acc_t(0)) {
        logp_out[r] = lse_out[r] = 0;
        if (kEntropy) ent_out[r] = 0;
        if (kGrad) std::fill(dx_row, dx_row + vocab, scalar_t(0));
        continue;
      }
      check_token_id(y, vocab, ignore_index, r);
      const scalar_t* x_row = x + rows.offset(r);
      const acc_t inv_t = row_inverse_temperature(row_t, r, inv_t_all);  // read only where the row counts
      LseState<acc_t> state;
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t v0 = c * chunk;
        acc_t cs, ca;
        chunk_exp<kEntropy>(x_row + v0, std::min(chunk, vocab - v0), inv_t, e + v0, chunk_max[c], cs, ca);
        state.merge(chunk_max[c], cs, ca);
      }
      const acc_t lse = state.lse();
      const acc_t logp = static_cast<acc_t>(x_row[y]) * inv_t - lse;
      logp_out[r] = logp;
      lse_out[r] = lse;
      if (kEntropy) ent_out[r] = state.entropy();
      if (!kGrad) continue;

      // w = dL/dS_i · m · (∂ℓ/∂logp + ∂ℓ/∂c1 · d c1/d logp), as grpo_loss_bwd at token level
      const acc_t m = in.mask(i, t);
      const loss::TokenTerms<acc_t> terms =
          loss::token_terms<acc_t, /*kRolloutGates=*/false>(cfg, s, loss::SeqStats<acc_t>{}, in.token(i, t, logp),
                                                             in.has_ref);
      const acc_t w = seq_weight[i] * (m * loss::dloss_dlogp(cfg, terms, acc_t(0)));
      // dx = w (onehot_y - p) / T with p = e · exp(chunk max - lse): -w p / T over the row, then dx_y
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t v0 = c * chunk;
        const acc_t k = -(w * exp_nonpositive(chunk_max[c] - lse)) * inv_t;
        scaled_store(e + v0, k, dx_row + v0, std::min(chunk, vocab - v0), streaming);
      }
      const acc_t p_y = e[y] * exp_nonpositive(chunk_max[y / chunk] - lse);
      dx_row[y] = from_acc<scalar_t>((w - w * p_y) * inv_t);
    }
    if (streaming) stream_fence();
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_grpo_loss_fwd(
    const at::Tensor& logits, const at::Tensor& token_ids, const c10::optional<at::Tensor>& old_logp,
    const c10::optional<at::Tensor>& ref_logp, const at::Tensor& adv, const at::Tensor& keep,
    const c10::optional<at::Tensor>& iw, const c10::optional<at::Tensor>& sampling_logp, const at::Tensor& seq_weight,
    const LossConfig& cfg, double temperature, int64_t ignore_index, bool return_entropy, bool compute_grad,
    bool inplace, const c10::optional<at::Tensor>& row_temperature) {
  const char* name = "fused_grpo_loss_fwd";
  check_config(cfg, name);
  TORCH_CHECK(!cfg.seq_pass, name, ": a loss with a sequence pass is composed by the caller");
  TORCH_CHECK(cfg.rollout_is_gate == RolloutGate::kRatio, name,
              ": a rollout gate other than the ratio is composed by the caller");
  TORCH_CHECK(logits.is_cpu(), name, ": logits must be a CPU tensor, got ", logits.device());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), name, ": logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.dim() == 3, name, ": logits must be [B, T, V], got ", logits.sizes());
  TORCH_CHECK(!(compute_grad && inplace) || at::has_internal_overlap(logits) != at::MemOverlap::Yes, name,
              ": in place needs logits whose rows do not overlap");
  const int64_t B = logits.size(0), T = logits.size(1);
  const at::Tensor ids = flat_ids(token_ids, logits, B * T, name);
  const auto acc = at::toOpMathType(logits.scalar_type());
  check_loss_inputs(name, logits, B, T, acc, c10::nullopt, old_logp, ref_logp, adv, keep, iw, sampling_logp);
  TORCH_CHECK(seq_weight.numel() == B || seq_weight.numel() == 1, name, ": seq_weight must have ", B,
              " values, got ", seq_weight.numel());
  TORCH_CHECK(seq_weight.device() == logits.device(), name, ": seq_weight must be on ", logits.device());
  const auto options = logits.options().dtype(acc);
  at::Tensor logp = at::empty({B, T}, options);
  at::Tensor lse = at::empty({B, T}, options);
  at::Tensor entropy = at::empty({return_entropy ? B : 0, return_entropy ? T : 0}, options);
  at::Tensor grad = !compute_grad ? at::empty({0}, logits.options())
                    : inplace     ? logits
                                  : empty_gradient_like(logits);
  const at::Tensor weights = seq_weight.reshape({-1}).to(acc).expand({B}).contiguous();
  const c10::optional<at::Tensor> row_t =
      row_temperature ? c10::optional<at::Tensor>(per_row_values(*row_temperature, acc, B * T, logits, name,
                                                                 "row_temperature"))
                      : c10::nullopt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fused_grpo_loss_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LossTokens<acc_t> in(logp, old_logp, ref_logp, adv, keep, iw, sampling_logp);
    auto run = [&](auto entropy_tag, auto grad_tag) {
      fused_kernel<scalar_t, decltype(entropy_tag)::value, decltype(grad_tag)::value>(
          logits, ids.const_data_ptr<int64_t>(), in, weights.const_data_ptr<acc_t>(), cfg, temperature,
          row_t ? row_t->const_data_ptr<acc_t>() : nullptr, ignore_index, logp.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
          return_entropy ? entropy.data_ptr<acc_t>() : nullptr, grad);
    };
    using Yes = std::true_type;
    using No = std::false_type;
    if (return_entropy) {
      compute_grad ? run(Yes{}, Yes{}) : run(Yes{}, No{});
    } else {
      compute_grad ? run(No{}, Yes{}) : run(No{}, No{});
    }
  });
  auto [per_token_loss, partials] = grpo_loss_fwd(logp, old_logp, ref_logp, adv, keep, iw, sampling_logp, cfg);
  return {logp, lse, entropy, per_token_loss, partials, grad};
}

}  // namespace grpo_kernels::cpu::GRPO_CPU_COPY
